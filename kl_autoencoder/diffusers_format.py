"""Conversion to and from diffusers' `AutoencoderKL` and `VQModel`: pure dict -> dict functions plus a writer/reader.

A diffusers folder is `config.json` + `diffusion_pytorch_model.safetensors`; it loads with
`diffusers.AutoencoderKL.from_pretrained(folder)` (or `VQModel`, as its `_class_name` says) and with
`Autoencoder.from_pretrained(folder)`. Our module names already equal diffusers' keys, so the state-dict
functions are the one place for renames. A name that is not a local path but looks like a hub repo
(`org/name`, or `org/name/subfolder` for a VAE inside a pipeline repo) is fetched with `huggingface_hub`:
only its config and safetensors weights, into the hub cache (offline with `HF_HUB_OFFLINE=1`: from there).
Which folder a run or checkpoint folder means is `folders.py`'s; this module imports only `config.py`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .config import AutoencoderConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# AutoencoderKL.__init__ defaults: what diffusers builds when a (older) config.json omits a key
_KL_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
# VQModel.__init__ defaults
_VQ_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 3,
    "sample_size": 32,
    "num_vq_embeddings": 256,
    "norm_num_groups": 32,
    "vq_embed_dim": None,
    "scaling_factor": 0.18215,
    "norm_type": "group",
    "mid_block_add_attention": True,
    "lookup_from_codebook": False,
    "force_upcast": False,
}
_DEFAULTS = {"AutoencoderKL": _KL_DEFAULTS, "VQModel": _VQ_DEFAULTS}
_CLASS_NAMES = {"kl": "AutoencoderKL", "vq": "VQModel"}
# our own key (diffusers ignores "_" keys): the codes were L2-normalised, so training can go on that way
_NORMALIZE_CODES = "_normalize_codes"


def check_exportable(cfg: AutoencoderConfig) -> None:
    """Raise ValueError if diffusers cannot reproduce `cfg` exactly (VQModel lacks some AutoencoderKL options)."""
    if cfg.bottleneck != "vq":
        return
    if not (cfg.use_quant_conv and cfg.use_post_quant_conv):
        raise ValueError(
            "diffusers' VQModel always has quant_conv and post_quant_conv; a VQ model with use_quant_conv or "
            "use_post_quant_conv False cannot be exported"
        )
    unsupported = [k for k in ("shift_factor", "latents_mean", "latents_std") if getattr(cfg, k) is not None]
    if unsupported:
        raise ValueError(f"diffusers' VQModel has no {unsupported}; a VQ model with them cannot be exported")


def to_diffusers_config(cfg: AutoencoderConfig) -> dict:
    """The `AutoencoderKL` or `VQModel` config for `cfg`; `VQModel(**to_diffusers_config(cfg))` builds it, say.

    Raises ValueError for a configuration diffusers cannot reproduce exactly (see `check_exportable`).
    """
    check_exportable(cfg)
    levels = range(len(cfg.channel_mult))
    down = ["AttnDownEncoderBlock2D" if i in cfg.attn_levels else "DownEncoderBlock2D" for i in levels]
    up = ["AttnUpDecoderBlock2D" if i in cfg.attn_levels else "UpDecoderBlock2D" for i in reversed(levels)]
    common = {
        "_class_name": _CLASS_NAMES[cfg.bottleneck],
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": down,
        "up_block_types": up,  # lowest resolution first, as diffusers' decoder runs them
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups,
        "sample_size": cfg.sample_size,
        "scaling_factor": cfg.scaling_factor,
        "force_upcast": cfg.force_upcast,
        "mid_block_add_attention": cfg.mid_attention,
    }
    if cfg.bottleneck == "vq":
        vq = {
            "num_vq_embeddings": cfg.num_codes,
            "vq_embed_dim": cfg.code_dim,
            "norm_type": "group",
            "lookup_from_codebook": False,
        }
        return common | vq | ({_NORMALIZE_CODES: True} if cfg.normalize_codes else {})
    return common | {
        "shift_factor": cfg.shift_factor,
        "latents_mean": cfg.latents_mean,
        "latents_std": cfg.latents_std,
        "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_post_quant_conv,
    }


def from_diffusers_config(d: dict) -> AutoencoderConfig:
    """Inverse of `to_diffusers_config` (dispatching on `_class_name`); ValueError for what we cannot represent."""
    class_name = d.get("_class_name", "AutoencoderKL")
    if class_name not in _DEFAULTS:
        raise ValueError(f"expected _class_name 'AutoencoderKL' or 'VQModel', got {class_name!r}")
    defaults = _DEFAULTS[class_name]
    unknown = sorted(k for k in d if not k.startswith("_") and k not in defaults)
    if unknown:  # refuse rather than silently build something else
        hint = " (AutoencoderKL arguments: is _class_name wrong?)" if set(unknown) <= set(_KL_DEFAULTS) else ""
        raise ValueError(f"not a {class_name} config we can represent: unknown keys {unknown}{hint}")
    d = {**defaults, **d}
    if d["act_fn"] != "silu":
        raise ValueError(f"only act_fn 'silu' is supported, got {d['act_fn']!r}")

    widths = [int(w) for w in d["block_out_channels"]]
    base = widths[0]
    if any(w % base for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first width")
    n = len(widths)
    down, up = list(d["down_block_types"]), list(d["up_block_types"])
    if len(down) != n or len(up) != n:
        raise ValueError(f"{len(down)} down and {len(up)} up block types for {n} block_out_channels")
    down_kinds = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
    up_kinds = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}
    bad = [t for t in down if t not in down_kinds] + [t for t in up if t not in up_kinds]
    if bad:
        raise ValueError(f"unsupported block types {bad}; expected {list(down_kinds)} and {list(up_kinds)}")
    enc_attn = [i for i, t in enumerate(down) if down_kinds[t]]
    dec_attn = [n - 1 - i for i, t in enumerate(up) if up_kinds[t]]
    if sorted(enc_attn) != sorted(dec_attn):
        raise ValueError(f"attention at encoder levels {enc_attn} but decoder levels {sorted(dec_attn)}; must match")

    sample_size = d["sample_size"]
    if isinstance(sample_size, (list, tuple)):
        if len(set(sample_size)) != 1:
            raise ValueError(f"only square sample_size is supported, got {sample_size}")
        sample_size = sample_size[0]

    if class_name == "VQModel":
        if d["norm_type"] != "group":
            raise ValueError(f"only norm_type 'group' is supported, got {d['norm_type']!r}")
        # lookup_from_codebook only changes how diffusers' decode reads indices; it is not part of the model
        bottleneck = {
            "bottleneck": "vq",
            "num_codes": int(d["num_vq_embeddings"]),
            "code_dim": int(d["vq_embed_dim"] or d["latent_channels"]),
            "normalize_codes": bool(d.get(_NORMALIZE_CODES, False)),
        }
    else:
        bottleneck = {
            "use_quant_conv": d["use_quant_conv"],
            "use_post_quant_conv": d["use_post_quant_conv"],
            "shift_factor": d["shift_factor"],
            "latents_mean": d["latents_mean"],
            "latents_std": d["latents_std"],
        }
    return AutoencoderConfig(
        in_channels=d["in_channels"],
        out_channels=d["out_channels"],
        base_channels=base,
        channel_mult=tuple(w // base for w in widths),
        layers_per_block=d["layers_per_block"],
        latent_channels=d["latent_channels"],
        norm_num_groups=d["norm_num_groups"],
        attn_levels=tuple(enc_attn),
        mid_attention=d["mid_block_add_attention"],
        sample_size=int(sample_size),
        scaling_factor=float(d["scaling_factor"]),
        force_upcast=d["force_upcast"],
        **bottleneck,
    )


CODEBOOK_KEY = "quantize.embedding.weight"


def to_diffusers_state_dict(
    sd: dict[str, torch.Tensor], config: AutoencoderConfig | None = None
) -> dict[str, torch.Tensor]:
    """Our keys are diffusers' keys; contiguous because safetensors refuses strided views.

    With a config that has normalize_codes, the codebook is written L2-normalised, as our lookup uses it
    (after optimizer steps in "loss" mode the stored rows drift off the unit sphere): diffusers' Euclidean
    argmin over unit codes is our cosine argmax, so it picks the same codes.
    """
    sd = {k: v.contiguous() for k, v in sd.items()}
    if config is not None and config.bottleneck == "vq" and config.normalize_codes:
        sd[CODEBOOK_KEY] = F.normalize(sd[CODEBOOK_KEY].float(), dim=1).to(sd[CODEBOOK_KEY].dtype)
    return sd


# diffusers < 0.14 named the attention projections like LDM; some hub VAEs (sd-vae-ft-*) still do
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_PATTERN = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)(\.(?:weight|bias))$")


def from_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' keys -> ours, renaming legacy attention names as diffusers does on load."""

    def rename(key: str) -> str:
        return _LEGACY_PATTERN.sub(lambda m: m[1] + _LEGACY_ATTENTION[m[2]] + m[3], key)

    return {rename(k): v.contiguous() for k, v in sd.items()}


def save_diffusers(
    model: torch.nn.Module | tuple[AutoencoderConfig, dict[str, torch.Tensor]],
    out_dir: str | Path,
    extra_config: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `model` (an `Autoencoder`, or a `(config, state_dict)` pair, e.g. EMA weights) as a diffusers folder.

    extra_config is merged over the config (e.g. a measured scaling_factor); its keys must be AutoencoderKL (or
    VQModel) arguments or start with "_", so that the folder still loads here and in diffusers. dtype (e.g.
    torch.float16) casts the floating-point weights of the written file only. A VQ model's training statistics
    are not written (they are not in its state_dict; see `Autoencoder.quantizer_state`).
    """
    cfg, sd = model if isinstance(model, tuple) else (model.config, model.state_dict())
    config = to_diffusers_config(cfg)
    extra_config = dict(extra_config or {})
    class_name = config["_class_name"]
    unknown = sorted(k for k in extra_config if not k.startswith("_") and k not in _DEFAULTS[class_name])
    if unknown:
        raise ValueError(f"extra_config keys {unknown} are not {class_name} arguments; prefix them with '_'")
    config.update(extra_config)
    from_diffusers_config(config)  # fail here, not at load time, if the merged config is not representable

    tensors = to_diffusers_state_dict(sd, cfg)
    tensors = {k: v.detach().to("cpu", dtype) if v.is_floating_point() else v.cpu() for k, v in tensors.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # write next to the target and rename, so an interrupted save never leaves a truncated file in place
    tmp = out_dir / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out_dir / WEIGHTS_NAME)
    tmp = out_dir / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / CONFIG_NAME)
    return out_dir


def _describe(keys: set[str], limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def read_diffusers(path: str | Path) -> tuple[AutoencoderConfig, dict[str, torch.Tensor]]:
    """The config and state dict of a diffusers AutoencoderKL or VQModel folder, keys not yet checked against the
    model (`kl_autoencoder.load_diffusers` checks them strictly)."""
    path = Path(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a diffusers AutoencoderKL/VQModel folder: expected {CONFIG_NAME} and {WEIGHTS_NAME} "
            "(only unsharded safetensors weights are supported)"
        )
    try:
        cfg = from_diffusers_config(json.loads(config_file.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON ({e})") from None
    try:
        sd = from_diffusers_state_dict(load_file(str(weights_file)))
    except Exception as e:  # safetensors raises its own error type for a truncated or corrupt file
        raise ValueError(f"{weights_file} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    return cfg, sd


def state_dict_problems(sd: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> str:
    """What keeps `sd` from loading strictly into a model whose state dict has the shapes `expected`; "" if nothing."""
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    wrong = {f"{k} {tuple(sd[k].shape)} != {tuple(s)}" for k, s in expected.items() if k in sd and sd[k].shape != s}
    if wrong:
        problems.append(f"shape mismatches: {_describe(wrong)}")
    return "; ".join(problems)


def is_diffusers_folder(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


_HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+(/[\w.-]+)*")


def is_hub_name(name: str | Path) -> bool:
    """`org/name[/subfolder]` that is not a local path: a model on the Hugging Face hub."""
    text = str(name)
    return not Path(text).exists() and not text.startswith((".", "/")) and _HUB_NAME.fullmatch(text) is not None


def download_from_hub(name: str) -> Path:
    """The local folder of hub model `org/name[/subfolder]`: its config.json and safetensors weights only."""
    from huggingface_hub import snapshot_download

    parts = name.strip("/").split("/")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    prefix = f"{subfolder}/" if subfolder else ""
    try:
        root = snapshot_download(repo_id, allow_patterns=[prefix + CONFIG_NAME, prefix + WEIGHTS_NAME])
    except Exception as e:  # offline and not cached, unknown repo, no access: one line for all
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FileNotFoundError(
            f"{name} is not a local folder, and the hub repo {repo_id!r} could not be fetched "
            f"({type(e).__name__}: {first})"
        ) from None
    folder = Path(root) / subfolder
    if not is_diffusers_folder(folder):
        hint = "" if subfolder else " (a VAE inside a pipeline repo: add its subfolder, e.g. --subfolder vae)"
        raise FileNotFoundError(f"hub repo {repo_id!r} has no {prefix}{CONFIG_NAME} + {prefix}{WEIGHTS_NAME}{hint}")
    return folder
