"""The original LDM / Stable Diffusion VAE checkpoint layout, to and from ours (= diffusers').

Pure key maps (CompVis/latent-diffusion `ldm/modules/diffusionmodules/model.py` names on one side,
diffusers `AutoencoderKL` names on the other), so an SD `.safetensors` VAE, or the first stage of a
full SD checkpoint, can start a fine-tune. LDM's attention uses 1x1 convolutions where diffusers
uses linear layers: the weights are reshaped, nothing else changes.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .config import AutoencoderConfig

_PREFIXES = ("first_stage_model.", "vae.")  # full SD checkpoints; some single-file VAEs
_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _levels(cfg: AutoencoderConfig) -> int:
    return len(cfg.channel_mult)


def _ldm_to_ours_key(key: str, levels: int) -> str | None:
    """One LDM key -> our key (None for keys that are not part of the autoencoder, e.g. `loss.*`)."""
    rules: list[tuple[str, str]] = [
        (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
        (r"^(encoder|decoder)\.mid\.block_([12])\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."),
        (r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0."),
        (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
        (r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets."),
        (r"^decoder\.up\.(\d+)\.attn\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.attentions."),
        (r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0."),
    ]
    if not key.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")):
        return None
    for pattern, repl in rules:
        key, n = re.subn(pattern, repl, key)
        if n:
            break
    parts = key.split(".")
    if "attentions" in parts and parts[-2] in _ATTENTION:
        parts[-2:-1] = _ATTENTION[parts[-2]].split(".")
    elif parts[-2] in _RESNET:
        parts[-2] = _RESNET[parts[-2]]
    return ".".join(parts)


def from_ldm_state_dict(sd: dict[str, torch.Tensor], cfg: AutoencoderConfig) -> dict[str, torch.Tensor]:
    """An LDM / SD VAE state dict (optionally a whole SD checkpoint) -> our keys; the rest is dropped."""
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    out = {}
    for key, value in sd.items():
        ours = _ldm_to_ours_key(key, _levels(cfg))
        if ours is None:
            continue
        if ".attentions." in ours and ours.endswith(".weight") and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 conv -> linear
        out[ours] = value.contiguous()
    return out


def to_ldm_state_dict(sd: dict[str, torch.Tensor], cfg: AutoencoderConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> the LDM layout (the inverse of `from_ldm_state_dict`)."""
    levels = _levels(cfg)
    inverse_attention = {v: k for k, v in _ATTENTION.items()}
    out = {}
    for key, value in sd.items():
        k = key.replace("to_out.0", "to_out")
        k = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", k)
        k = k.replace(".mid_block.attentions.0.", ".mid.attn_1.").replace(".conv_norm_out.", ".norm_out.")
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.attentions\.", r"encoder.down.\1.attn.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", k)
        k = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.attentions\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.attn.", k
        )
        k = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.",
            k,
        )
        parts = k.split(".")
        is_attention = ".attn." in k or ".attn_1." in k
        name = "to_out.0" if parts[-2] == "to_out" else parts[-2]
        if is_attention and name in inverse_attention:
            parts[-2] = inverse_attention[name]
            if parts[-1] == "weight" and value.ndim == 2:
                value = value[:, :, None, None]  # linear -> 1x1 conv
        elif parts[-2] == "conv_shortcut":
            parts[-2] = "nin_shortcut"
        out[".".join(parts)] = value.contiguous()
    return out


def load_checkpoint_file(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file, or of a pickle `.ckpt`/`.pt`/`.bin` loaded with `weights_only=True`.

    A pickle that needs arbitrary code to load is refused unless `trust_pickle` (only for files you trust:
    unpickling runs whatever the file says).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # torch raises UnpicklingError for anything beyond plain tensors and containers
        if trust_pickle:
            raise
        raise ValueError(
            f"{path}: refused to unpickle it ({type(e).__name__}); it needs more than tensors to load. "
            "Prefer a .safetensors file; load it anyway only if you trust it (--trust-pickle)"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if torch.is_tensor(v)}


def load_ldm_checkpoint(path: str | Path, cfg: AutoencoderConfig, trust_pickle: bool = False):
    """An `Autoencoder` of architecture `cfg` with the weights of an LDM / SD VAE checkpoint file (strict)."""
    from .model import Autoencoder

    sd = from_ldm_state_dict(load_checkpoint_file(path, trust_pickle), cfg)
    model = Autoencoder(cfg)
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - sd.keys()), sorted(sd.keys() - expected.keys())
    wrong = sorted(
        f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    )
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
            if keys
        )
        raise ValueError(f"{path} does not fit this architecture ({details})")
    model.load_state_dict(sd, strict=True)
    return model
