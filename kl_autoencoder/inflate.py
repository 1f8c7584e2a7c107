"""Inflate an image autoencoder (SD's KL VAE, diffusers `AutoencoderKL`) into a causal video VAE of diffusers'
`AutoencoderKLCogVideoX`, so that a one-frame clip goes through it as the image went through the image model.

Open-Sora-Plan's CausalVAE "tail init": each 2-D kernel goes on the last temporal tap of a causal 3-D kernel, zeros
on the taps before it, so every frame is convolved alone, as an image, until training teaches the kernels to look
back. CogVideoX's class is SD's blocks made causal: the same resnets, GroupNorms (eps 1e-6), SD's own 2-D stride-2
conv after (0, 1, 0, 1) zero padding and nearest-2x-then-conv upsampler, causal convs padded in time with copies of
the first frame and in space with zeros, as SD's. Its temporal resampling has no weights: the first frame passes
alone, later frames are averaged in pairs (down) or repeated (up). What it cannot hold is said at each step below and
returned as notes: attention (the class has none: dropped), its quant convs (sized for 3 channels in diffusers 0.42:
ours fold into the neighbouring conv), a decoder GroupNorm it conditions on the latent (SpatialNorm: made constant).
HunyuanVideo's class keeps the mid-block attention but pads every conv in space by replication and samples the
stride-2 grid one pixel off SD's: no inflation of SD's weights is exact there (docs/video.md has the measurements).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .model import Autoencoder

CLASS_NAME = "AutoencoderKLCogVideoX"
# a causal conv's parameters sit one module deeper in the video class: `conv1.conv.weight` for SD's `conv1.weight`
_CAUSAL = re.compile(r"\b(conv_in|conv_out|conv1|conv2)\.conv\.")
_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.")  # an attention module's parameters


@dataclass
class Inflation:
    """The video module and what of the image model it could not hold exactly (one line each)."""

    module: nn.Module  # an AutoencoderKLCogVideoX in eval mode, fp32
    notes: list[str] = field(default_factory=list)


def tail(weight: torch.Tensor, taps: int) -> torch.Tensor:
    """A 2-D kernel (O, I, kh, kw) -> a causal 3-D one (O, I, taps, kh, kw): the 2-D kernel on the last tap (the
    current frame), zeros on the taps before it (the frames before), so a still frame, and a first frame padded
    with copies of itself, come out as the image did."""
    out = weight.new_zeros(*weight.shape[:2], taps, *weight.shape[2:])
    out[:, :, -1] = weight
    return out


def cogvideox_config(model: Autoencoder, temporal_factor: int) -> dict:
    """The `AutoencoderKLCogVideoX` constructor arguments of the inflated model; ValueError (one line) for a model
    or a temporal factor the class cannot take."""
    cfg = model.config
    if cfg.bottleneck != "kl":
        raise ValueError(f"inflate takes a KL autoencoder (AutoencoderKL), not a {cfg.bottleneck.upper()} model")
    levels = len(cfg.block_out_channels)
    factors = [2**k for k in range(levels)]  # time halves at most at each of the levels - 1 downsamplings
    if temporal_factor not in factors:
        raise ValueError(f"temporal factor {temporal_factor} is not one of {factors} (a power of 2, at most the "
                         f"spatial factor {2 ** (levels - 1)}: time halves only where space does)")  # fmt: skip
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
        down_block_types=("CogVideoXDownBlock3D",) * levels, up_block_types=("CogVideoXUpBlock3D",) * levels,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups, norm_eps=1e-6, temporal_compression_ratio=temporal_factor,
        sample_height=cfg.sample_size, sample_width=cfg.sample_size, scaling_factor=float(cfg.scaling_factor),
        force_upcast=cfg.force_upcast, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip


def source_key(key: str) -> str:
    """The image model's (diffusers `AutoencoderKL`) name for a parameter of the video class."""
    key = _CAUSAL.sub(r"\1.", key)
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
    return key.replace(".norm_layer.", ".")  # SpatialNorm's GroupNorm: SD's GroupNorm


def spatial_norm_constant(key: str, like: torch.Tensor) -> torch.Tensor:
    """SpatialNorm (decoder): GroupNorm(f) * conv_y(z) + conv_b(z). conv_y = 1 and conv_b = 0 whatever z (weights 0,
    biases 1 and 0) leave SD's GroupNorm alone, exactly; training may then condition the decoder on the latent."""
    is_scale_bias = ".conv_y." in key and key.endswith(".bias")
    return torch.ones_like(like) if is_scale_bias else torch.zeros_like(like)


def inflated_state_dict(image: dict[str, torch.Tensor], target: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Image model state dict (SD's `AutoencoderKL` names) -> the video class's state dict with the shapes `target`.

    Pure: 3x3 kernels tail-initialised over 3 causal taps, 1x1 kernels given a time axis of 1, the resamplers'
    2-D convs and every norm as they are; SD's quant_conv (a 1x1 conv on the moments) folded into encoder.conv_out
    and post_quant_conv into decoder.conv_in, since the class has no usable quant convs. KeyError for a parameter
    of the class the image model has no counterpart for.
    """
    out = {}
    for key, shape in target.items():
        if ".conv_y." in key or ".conv_b." in key:
            out[key] = spatial_norm_constant(key, torch.empty(shape))
            continue
        w = image[source_key(key)]
        if len(shape) == 5 and w.dim() == 4:  # (O, I, kh, kw) -> (O, I, kt, kh, kw)
            w = tail(w, shape[2])
        out[key] = w.clone()
    if "quant_conv.weight" in image:
        out["encoder.conv_out.conv.weight"], out["encoder.conv_out.conv.bias"] = fold_after(
            out["encoder.conv_out.conv.weight"], out["encoder.conv_out.conv.bias"],
            image["quant_conv.weight"], image["quant_conv.bias"],
        )  # fmt: skip
    if "post_quant_conv.weight" in image:
        out["decoder.conv_in.conv.weight"], out["decoder.conv_in.conv.bias"] = fold_before(
            out["decoder.conv_in.conv.weight"], out["decoder.conv_in.conv.bias"],
            image["post_quant_conv.weight"], image["post_quant_conv.bias"],
        )  # fmt: skip
    for key, shape in target.items():
        if out[key].shape != shape:
            raise ValueError(f"{key}: inflated to {tuple(out[key].shape)}, the class expects {tuple(shape)}")
    return out


def fold_after(w: torch.Tensor, b: torch.Tensor, q: torch.Tensor, qb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A 1x1 conv (q, qb) after the conv (w, b) as one conv: exact up to rounding (a 1x1 conv sees no padding)."""
    q = q.flatten(1).double()  # (O', O)
    return (torch.einsum("po,oi...->pi...", q, w.double()).float(), (q @ b.double() + qb.double()).float())


def fold_before(w: torch.Tensor, b: torch.Tensor, p: torch.Tensor, pb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A 1x1 conv (p, pb) before the conv (w, b) as one conv. Its weight folds exactly; its bias only where every
    tap of w lands inside the latent: the zero padding around it sees no bias in the image model, here it does."""
    p, w = p.flatten(1).double(), w.double()  # (I, I'), (O, I, kt, kh, kw)
    bias = b.double() + w.sum(dim=(2, 3, 4)) @ pb.double()  # what the interior sees: every tap on p's bias
    return torch.einsum("oi...,ij->oj...", w, p).float(), bias.float()


def image_only(image: dict[str, torch.Tensor], used: set[str]) -> list[str]:
    """The image model's modules with no place in the class: its attention layers; ValueError for anything else."""
    left = [k for k in image if k not in used and not k.startswith(("quant_conv.", "post_quant_conv."))]
    modules = {m.group(1) for k in left if (m := _ATTENTION.match(k))}
    if bad := [k for k in left if not _ATTENTION.match(k)]:
        raise ValueError(f"no place in {CLASS_NAME} for {bad[:3]} ({len(bad)} parameters)")
    return sorted(modules)


def inflate(model: Autoencoder, temporal_factor: int = 4) -> Inflation:
    """A causal `AutoencoderKLCogVideoX` from our KL model (any diffusers `AutoencoderKL`): a one-frame clip encodes
    to the image model's posterior and decodes as it did, exactly where the notes say nothing (fp32)."""
    from diffusers import AutoencoderKLCogVideoX

    config = cogvideox_config(model, temporal_factor)
    with torch.device("meta"):  # shapes only: the weights come from the image model
        target = {k: v.shape for k, v in AutoencoderKLCogVideoX(**config).state_dict().items()}
    image = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    state = inflated_state_dict(image, target)
    video = AutoencoderKLCogVideoX(**config)
    video.load_state_dict(state, strict=True)
    return Inflation(video.eval(), notes(model, image, {source_key(k) for k in target}))


def notes(model: Autoencoder, image: dict[str, torch.Tensor], used: set[str]) -> list[str]:
    """One line for each way the inflated model departs from the image model."""
    out = []
    if dropped := image_only(image, used):
        out.append(f"{CLASS_NAME} has no attention layers: {len(dropped)} dropped ({', '.join(dropped)}); a "
                   "one-frame clip is not the image model's until training makes up for them")  # fmt: skip
    if "post_quant_conv.bias" in image and (bias := image["post_quant_conv.bias"].abs().max()) > 0:
        out.append(f"post_quant_conv folded into decoder.conv_in: its bias (max |b| {bias:.3g}) now also reaches the "
                   "latent's 1-position border, where the image model zero-pads")  # fmt: skip
    if model.config.shift_factor:
        out.append(f"shift_factor {model.config.shift_factor:g} dropped: CogVideoX's pipelines scale by "
                   "scaling_factor alone (z * scaling_factor); measure anew with kl-ae export after "
                   "training")  # fmt: skip
    return out


@torch.no_grad()
def one_frame_gap(model: Autoencoder, video: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Max |difference| between the image model on images x (B, C, H, W) in [-1, 1] and the video model on the
    one-frame clips (B, C, 1, H, W): of the posterior mean, and of the decoding of the image model's posterior mean;
    and that decoding's PSNR to the image model's (peak-to-peak 2; inf where equal)."""
    mean = model.encode(x).mean  # (B, L, h, w)
    video_mean = video.encode(x[:, :, None]).latent_dist.mean[:, :, 0]
    decoded, expected = video.decode(mean[:, :, None]).sample[:, :, 0], model.decode(mean)
    mse = float((decoded - expected).square().mean())
    return {"mean": float((video_mean - mean).abs().max()), "decode": float((decoded - expected).abs().max()),
            "psnr": 10 * math.log10(4 / mse) if mse > 0 else math.inf}  # fmt: skip
