"""`kl-ae inflate IMAGE_MODEL --out DIR [--subfolder SUB] [--temporal-factor 4]`: a causal video VAE (diffusers'
`AutoencoderKLCogVideoX`) from an image autoencoder (ours, or any diffusers `AutoencoderKL`: SD, SDXL, SD3, FLUX.1),
by Open-Sora-Plan's "tail init" (`kl_autoencoder/inflate.py`), ready for `kl-ae train model.init_from=DIR`.

The folder is written, loaded back through `load_autoencoder`, and checked: a one-frame clip of a bundled photograph
through it against the image model (posterior mean and decoding). What the class cannot hold (attention, a
post_quant_conv bias at the border, a shift_factor) is one warning line each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from kl_ae.common.config import ConfigError

EXACT = 1e-5  # fp32: what "the image model's, exactly" means here


def add_inflate_command(sub) -> None:
    p = sub.add_parser("inflate", help="a causal video VAE (AutoencoderKLCogVideoX) from an image KL autoencoder")
    p.add_argument("model", help="a KL image autoencoder: a run, checkpoint or diffusers folder, or a hub name")
    p.add_argument("--subfolder", help="the model's subfolder: vae for the VAE inside a pipeline")
    p.add_argument("--out", required=True, help="the diffusers folder to write")
    p.add_argument("--temporal-factor", type=int, default=4, help="frames per latent frame: 1, 2, 4 (default), ... "
                   "up to the spatial factor; time halves at the first (highest-resolution) downsamplings, as "
                   "CogVideoX's class places it")  # fmt: skip


def check_images(channels: int, size: int) -> tuple[torch.Tensor, str]:
    """Images (1, C, size, size) in [-1, 1] for the one-frame check: a held-out bundled photograph (RGB), or seeded
    noise for another channel count; and what they are, in words."""
    if channels == 3:
        from PIL import Image

        from kl_ae.common.images import sample_dir

        img = Image.open(sample_dir() / "coffee.png").convert("RGB")
        side = min(img.size)
        img = img.crop(((img.width - side) // 2, (img.height - side) // 2, (img.width + side) // 2,
                        (img.height + side) // 2)).resize((size, size), Image.BICUBIC)  # fmt: skip
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
        return x[None].float() / 127.5 - 1.0, f"a {size} px photograph"
    noise = torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(0))
    return noise * 2 - 1, f"{size} px of uniform noise"


def inflate_model(model: str, out: str, subfolder: str | None = None, temporal_factor: int = 4) -> dict:
    """Inflate `model`, write it to `out`, load it back and check it; what the command prints, as a dict. ConfigError
    (one line) for a model that cannot be loaded or inflated."""
    from kl_autoencoder.families.cogvideox import CogVideoX
    from kl_autoencoder.inflate import CLASS_NAME, inflate, one_frame_gap
    from kl_autoencoder.interface import load_autoencoder

    try:
        image = load_autoencoder(model, subfolder)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"{model}: {e}") from None
    if image.family != "kl":
        raise ConfigError(f"{model}: inflate takes a KL image autoencoder (AutoencoderKL: SD, SDXL, SD3, FLUX.1, "
                          f"ours), not {image.class_name}")  # fmt: skip
    try:
        inflation = inflate(image.module, temporal_factor)
    except ValueError as e:
        raise ConfigError(f"{model}: {e}") from None
    name = f"{model.rstrip('/')}/{subfolder.strip('/')}" if subfolder else model
    path = CogVideoX(inflation.module, CLASS_NAME).save_pretrained(out, {"_inflated_from": str(name)})
    video = load_autoencoder(path)  # what `model.init_from` will load
    x, what = check_images(image.image_channels, 8 * image.spatial_factor)
    return {"path": path, "video": video, "gap": one_frame_gap(image.module, video.module, x), "checked_on": what,
            "notes": inflation.notes}  # fmt: skip


def run_inflate_command(args: argparse.Namespace) -> int:
    r = inflate_model(args.model, args.out, args.subfolder, args.temporal_factor)
    video, gap = r["video"], r["gap"]
    print(f"video autoencoder: {r['path']} ({video.class_name}, f{video.spatial_factor} t{video.temporal_factor}, "
          f"{video.latent_channels} latent channels; clips of 1 + {video.frame_step}k frames)")  # fmt: skip
    exact = "exact: <=" if max(gap["mean"], gap["decode"]) <= EXACT else "not exact: >"
    print(f"one-frame check ({r['checked_on']}, fp32): posterior mean max |diff| {gap['mean']:.3g}, decoding max "
          f"|diff| {gap['decode']:.3g} ({exact} {EXACT:g}; decoding PSNR {gap['psnr']:.1f} dB to the image "
          "model's)")  # fmt: skip
    for note in r["notes"]:
        print(f"warning: {note}", file=sys.stderr)
    print(f"train it: kl-ae train --data VIDEOS model.init_from={Path(r['path'])} data.num_frames="
          f"{1 + 2 * video.frame_step}")  # fmt: skip
    return 0
