"""The families section of `kl-ae bench` (`--what families`): encode and decode img/s (video families: clips of
CLIP_FRAMES frames, so "img/s" is clips/s) of every autoencoder family
through kl-ae's interface (`load_autoencoder(path)`: `ae.encode(x).mode()`, `ae.decode(z)`) against the family's
diffusers class called directly, fp32, same weights and same inputs, and the largest difference of their outputs.

Each model is a random init of its class's default architecture at a reduced width (`family_width`: the first
level's channels where SD has 128), saved by diffusers into a temporary folder and loaded from it twice: once
through kl-ae, once by the diffusers class itself. The diffusers side gets its inputs in its own convention
(Qwen-Image / Wan: a frame axis; RAE: images in [0, 1] and normalized latents), converted before timing: what
kl-ae adds on top of diffusers' call is part of what is measured.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from kl_ae.bench.common import FAMILIES, BenchConfig, images, interleaved_times
from kl_ae.bench.video import CLIP_FRAMES, VIDEO_FAMILIES, video_config

# the switches of diffusers' memory-saving paths (HunyuanVideo's framewise passes are turned off by our adapter)
TILING_FLAGS = ("use_tiling", "use_slicing", "use_framewise_encoding", "use_framewise_decoding")
_KL_LEVELS = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=2)  # fmt: skip


def _kl_widths(width: int) -> dict:
    """SD's four levels (128, 256, 512, 512) scaled to `width`, GroupNorm groups that divide every level."""
    return dict(_KL_LEVELS, block_out_channels=(width, 2 * width, 4 * width, 4 * width),
                norm_num_groups=math.gcd(32, width // 2))  # fmt: skip


def _rae_config(width: int, resolution: int) -> dict:
    """RAE over a random DINOv2 (with registers, patch 14) whose token grid the 16 px decoder patches turn into
    `resolution` px: encoder hidden 768 and decoder hidden 512 scaled to `width` (heads of 64 in the encoder, as
    diffusers builds it)."""
    if resolution % 16:
        raise ValueError(f"--resolution: the RAE bench model decodes 16 px patches; {resolution} is not a multiple")
    grid = resolution // 16
    decoder = max(32, 4 * width)
    return dict(encoder_type="dinov2", encoder_hidden_size=64 * max(1, round(12 * width / 128)),
                encoder_patch_size=14, encoder_num_hidden_layers=12, encoder_input_size=14 * grid,
                decoder_hidden_size=decoder, decoder_num_hidden_layers=8,
                decoder_num_attention_heads=max(1, decoder // 32), decoder_intermediate_size=4 * decoder,
                patch_size=16)  # fmt: skip


def family_config(name: str, width: int, resolution: int) -> tuple[str, dict]:
    """(diffusers class name, config) of `name`'s default architecture with its widths scaled by width / 128;
    latent channels, depth, levels and block types as the released models have them."""
    w = width
    if name == "sd":  # SD 1.x / SDXL: 4 channels, quant convs
        return "AutoencoderKL", dict(_kl_widths(w), latent_channels=4, scaling_factor=0.18215)
    if name == "sd3":  # SD3 / FLUX.1: 16 channels, no quant convs, a shift
        return "AutoencoderKL", dict(_kl_widths(w), latent_channels=16, use_quant_conv=False,
                                     use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)  # fmt: skip
    if name == "flux2":
        return "AutoencoderKLFlux2", dict(_kl_widths(w), latent_channels=32)
    if name == "dc-ae":  # SANA's f32c32: residual blocks at the three finest levels, linear attention below
        levels = (w, 2 * w, 4 * w, 4 * w, 8 * w, 8 * w)
        blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
        return "AutoencoderDC", dict(latent_channels=32, attention_head_dim=min(32, 4 * w),
                                     encoder_block_types=blocks, decoder_block_types=blocks,
                                     encoder_block_out_channels=levels, decoder_block_out_channels=levels,
                                     scaling_factor=0.41407)  # fmt: skip
    if name in ("qwen-image", "wan"):  # base_dim 96 at SD's 128; f8, 16 channels, single-frame images
        cls = "AutoencoderKLQwenImage" if name == "qwen-image" else "AutoencoderKLWan"
        return cls, dict(base_dim=max(8, 3 * w // 4), z_dim=16)
    if name == "hunyuan-image":  # f32, 64 channels
        # its GroupNorms have 32 groups, fixed: multiples of 32; its shortcuts fold the deepest level into 2 x 64
        levels = tuple(32 * max(1, round(c / 32)) for c in (w, 2 * w, 4 * w, 4 * w)) + (max(128, 8 * w),) * 2
        return "AutoencoderKLHunyuanImage", dict(in_channels=3, out_channels=3, latent_channels=64,
                                                 block_out_channels=levels, layers_per_block=2,
                                                 spatial_compression_ratio=32, sample_size=resolution,
                                                 scaling_factor=0.75289)  # fmt: skip
    if name == "rae":
        return "AutoencoderRAE", _rae_config(w, resolution)
    if name in VIDEO_FAMILIES:  # on clips of CLIP_FRAMES frames
        return video_config(name, w)
    raise ValueError(f"--families: unknown family {name!r}; choose from {', '.join(FAMILIES + VIDEO_FAMILIES)}")


def build_family_model(name: str, width: int, resolution: int, folder: Path, seed: int) -> str:
    """Save a random `name` model (`family_config`) into `folder` with diffusers' own `save_pretrained`; its class."""
    import diffusers

    class_name, config = family_config(name, width, resolution)
    torch.manual_seed(seed)
    getattr(diffusers, class_name)(**config).save_pretrained(folder)
    return class_name


def diffusers_calls(name: str, vae, x: torch.Tensor, z: torch.Tensor) -> tuple[Callable, Callable, Callable]:
    """(encode, decode, back): diffusers' own calls on `x` and raw latents `z`, put into the class's convention here
    (not timed), and `back`, which maps their (latent, image) outputs to kl-ae's convention for the comparison."""
    if name in VIDEO_FAMILIES:  # clips (B, C, T, H, W) both ways: nothing to convert
        return (lambda: vae.encode(x).latent_dist.mode()), (lambda: vae.decode(z).sample), (lambda lat, img: (lat, img))
    if name in ("qwen-image", "wan"):  # video VAEs: an image is one frame, (B, C, 1, H, W)
        x5, z5 = x[:, :, None], z[:, :, None]
        back = lambda lat, img: (lat[:, :, 0], img[:, :, 0])  # noqa: E731
        return (lambda: vae.encode(x5).latent_dist.mode()), (lambda: vae.decode(z5).sample), back
    if name == "dc-ae":  # deterministic
        return (lambda: vae.encode(x).latent), (lambda: vae.decode(z).sample), (lambda lat, img: (lat, img))
    if name == "rae":  # images in [0, 1]; encode gives, and decode takes, latents normalized by the model's buffers
        x01, scale = (x + 1) / 2, vae.config.scaling_factor
        zn = vae._normalize_latents(z) * scale

        def back(lat, img):
            return vae._denormalize_latents(lat / scale), img * 2 - 1

        return (lambda: vae.encode(x01).latent), (lambda: vae.decode(zn).sample), back
    return (lambda: vae.encode(x).latent_dist.mode()), (lambda: vae.decode(z).sample), (lambda lat, img: (lat, img))


def bench_family(name: str, cfg: BenchConfig) -> dict:
    """One family's row: img/s through kl-ae and through diffusers (median of the repeats), their ratios (median
    and best-of), the largest output difference, the model's size and latent shape."""
    import diffusers

    from kl_autoencoder.interface import load_autoencoder

    with tempfile.TemporaryDirectory() as tmp:
        class_name = build_family_model(name, cfg.family_width, cfg.resolution, Path(tmp), cfg.seed)
        ae = load_autoencoder(tmp).to(cfg.device)
        vae = getattr(diffusers, class_name).from_pretrained(tmp, torch_dtype=torch.float32).eval().to(cfg.device)
    ae.module.eval()
    for flag in TILING_FLAGS:  # the adapter may switch a class's windows off at load: the same work on both sides
        if hasattr(vae, flag) and hasattr(ae.module, flag):
            setattr(vae, flag, getattr(ae.module, flag))
    ae.check_size(cfg.resolution, cfg.resolution)
    x = images(cfg.resolution, cfg.batch_size, cfg.seed + 1, cfg.device)
    if name in VIDEO_FAMILIES:  # a clip: each frame a shifted copy of the image (motion)
        x = torch.stack([x.roll(k, dims=-1) for k in range(CLIP_FRAMES)], dim=2)
    with torch.no_grad():
        z = ae.encode(x).mode()  # (B, C, h, w): the decode input of both
        encode, decode, back = diffusers_calls(name, vae, x, z)
        lat, img = back(encode(), decode())
        max_diff = max((z - lat).abs().max().item(), (ae.decode(z) - img).abs().max().item())
        times = interleaved_times(
            {
                "kl_ae_encode": lambda: ae.encode(x).mode(),
                "diffusers_encode": encode,
                "kl_ae_decode": lambda: ae.decode(z),
                "diffusers_decode": decode,
            },
            cfg.steps,
            cfg.repeats,
        )
    median = {k: statistics.median(v) for k, v in times.items()}
    row: dict = {"class": class_name, "params_m": sum(p.numel() for p in vae.parameters()) / 1e6,
                 "latent": "x".join(map(str, z.shape[1:]))}  # fmt: skip
    for op in ("encode", "decode"):
        row[f"kl_ae_{op}_img_s"] = cfg.batch_size / median[f"kl_ae_{op}"]
        row[f"diffusers_{op}_img_s"] = cfg.batch_size / median[f"diffusers_{op}"]
        row[f"{op}_kl_ae_over_diffusers"] = median[f"diffusers_{op}"] / median[f"kl_ae_{op}"]
        row[f"{op}_kl_ae_over_diffusers_best"] = min(times[f"diffusers_{op}"]) / min(times[f"kl_ae_{op}"])
    row["max_abs_diff"] = max_diff
    return row


def bench_families(cfg: BenchConfig) -> dict:
    """Every family of `cfg.families`, one after the other (a model at a time in memory)."""
    if unknown := [f for f in cfg.families if f not in FAMILIES + VIDEO_FAMILIES]:
        raise ValueError(f"--families: unknown family {unknown}; choose from {', '.join(FAMILIES + VIDEO_FAMILIES)}")
    if cfg.family_width < 8 or cfg.family_width % 8:
        raise ValueError(
            f"--family-width: a multiple of 8 (every level's norms and heads divide it), got {cfg.family_width}"
        )
    out: dict = {
        "config": f"{cfg.resolution} px, batch {cfg.batch_size}, width {cfg.family_width}, fp32, random init, "
        f"{cfg.steps} calls x {cfg.repeats} interleaved repeats"
    }
    for name in cfg.families:
        out[name] = bench_family(name, cfg)
    return out
