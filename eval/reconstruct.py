"""`kl-ae reconstruct`: encode and decode one image (the posterior mode) with any supported autoencoder, whole or
tiled, and write it back in its own format.

The image is read at its own depth with the model's channels and mapped to [-1, 1] by the model's recorded value
mapping (a run's or an exported folder's; else the file's format range), and the decoding mapped back
(`kl_ae.common.channels`): a 16-bit PNG gives a 16-bit PNG (equal values after a perfect round trip), RGBA an RGBA
PNG, one channel a grayscale PNG; N bands (or float values) a TIFF beside `--out` and a false-colour PNG preview at it.

Tiling is the architecture's own: our KL / VQ model uses `kl_autoencoder.tiling` (tiles whose GroupNorms see the
whole image's statistics); a diffusers family uses the class's `enable_tiling()` (blended overlapping tiles) with
`tile`-pixel tiles (HunyuanImage: the decode only, diffusers' tiled encode of that class taking video tensors
only), through the family's `tiling(True, tile)`; a class without one (RAE) refuses `--tile` in one line. A video
goes through the family's chunks in time and its `tile`-pixel spatial tiles.
"""

from __future__ import annotations

from pathlib import Path

import torch

from eval.channels import run_bands
from eval.models import check_frames, load_model
from kl_ae.common.channels import files_mapping, model_mapping, read_fitted, to_model, to_stored
from kl_ae.common.config import ConfigError, DataConfig
from kl_ae.common.images import DECODE_ERRORS, reason
from kl_ae.common.metrics import to_unit
from kl_ae.common.runs import find_run
from kl_ae.common.stored import write_stored
from kl_ae.common.video import VIDEO_SUFFIXES, read_video, write_video
from kl_ae.common.views import display
from kl_autoencoder.interface import LatentAutoencoder
from kl_autoencoder.tiling import decode_tiled, encode_tiled


def enable_tiling(ae: LatentAutoencoder, tile: int) -> None:
    """Switch the model to its own tiled encode / decode with `tile`-pixel tiles (`tiling(True, tile)`: a quarter
    overlapping for diffusers' classes); ConfigError (one line) where the class has no tiling or the tile does not
    fit."""
    if ae.family not in ("kl", "vq") and not hasattr(ae.module, "use_tiling"):
        raise ConfigError(f"--tile: {ae.class_name} has no tiled encode / decode; run without --tile")
    multiple = ae.image_multiple
    if tile <= 0 or tile % multiple:
        raise ConfigError(f"--tile: {tile} is not a positive multiple of {multiple}, what {ae.class_name} takes")
    try:
        ae.tiling(True, tile)
    except ValueError as e:
        raise ConfigError(f"--tile: {e}") from None


@torch.no_grad()
def codec(ae: LatentAutoencoder, x: torch.Tensor, tile: int | None) -> torch.Tensor:
    """decode(encode(x).mode()), tiled with `tile`-pixel tiles when given. (B, 3, H, W) in [-1, 1]."""
    if not tile:
        return ae.decode(ae.encode(x).mode())
    if ae.family not in ("kl", "vq"):
        enable_tiling(ae, tile)
        # diffusers' tiled encode of AutoencoderKLHunyuanImage takes 5-D video tensors only: encode it whole
        ae.module.use_tiling = ae.class_name != "AutoencoderKLHunyuanImage"
        z = ae.encode(x).mode()
        ae.module.use_tiling = True
        return ae.decode(z)
    model = ae.module
    try:
        z = encode_tiled(model, x, tile).mode()
        if ae.family == "vq":  # through the codebook, as decode does (the tiled decoder takes quantized latents)
            z = model.quantize(z).z_q
        return decode_tiled(model, z, tile)
    except ValueError as e:
        raise ConfigError(f"--tile: {e}") from None


def reconstruct(image: str, model_path: str, out: str, tile: int | None = None, frames: int | None = None) -> Path:
    """Encode and decode one image (posterior mean), tiled when `tile` is given; writes it in its own format (see
    the module docstring) and returns the file. A video: its first `frames` frames (default: all, cut to the longest
    length the model takes), written as a side-by-side video (input | reconstruction) at the input's frame rate."""
    ae = load_model(model_path)
    if Path(image).suffix.lower() in VIDEO_SUFFIXES:
        return reconstruct_video(image, ae, out, tile, frames)
    m = ae.image_multiple
    try:
        mapping = model_mapping(model_path) or files_mapping([Path(image)], DataConfig(channels=ae.image_channels), 0)
        x = torch.from_numpy(to_model(read_fitted(image, mapping, DataConfig.max_pixels), mapping)).permute(2, 0, 1)
    except DECODE_ERRORS as e:  # a file of other channels than the model's is a mismatch, said in one line
        raise ConfigError(f"{image}: {reason(e)}") from None
    h, w = x.shape[1] // m * m, x.shape[2] // m * m
    if h == 0 or w == 0:
        raise ConfigError(f"{image}: smaller than {m}, the side multiple {ae.class_name} takes")
    try:
        ae.check_size(h, w)
    except ValueError as e:
        raise ConfigError(f"{image}: {e}") from None
    y = codec(ae, x[None, :, :h, :w], tile)  # (1, C, h, w) in [-1, 1]
    run = find_run(model_path) if Path(model_path).exists() else None
    preview = display(to_unit(y), run_bands(run))[0].mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return write_stored(out, to_stored(y[0], mapping), preview)


def reconstruct_video(video: str, ae: LatentAutoencoder, out: str, tile: int | None, frames: int | None) -> Path:
    """`reconstruct` of a video file: the clip and its reconstruction side by side, as .mp4 (or .gif)."""
    check_frames(ae, frames)
    try:
        clip, fps = read_video(video, max_frames=frames)  # uint8 (3, T, H, W)
    except DECODE_ERRORS as e:
        raise ConfigError(f"{video}: cannot be read as a video ({reason(e)})") from None
    t = clip.shape[1]
    if frames is not None and t < frames:
        raise ConfigError(f"--frames: {video} has {t} frames, fewer than {frames}")
    t = ae.longest_frames(t)
    m = ae.image_multiple
    h, w = clip.shape[2] // m * m, clip.shape[3] // m * m
    try:
        ae.check_size(h, w)
    except ValueError as e:
        raise ConfigError(f"{video}: {e}") from None
    x = clip[None, :, :t, :h, :w].float() / 127.5 - 1.0  # (1, 3, T, H, W)
    if tile:  # long clips and large frames through the class's own chunks and `tile`-pixel tiles
        enable_tiling(ae, tile)
    with torch.no_grad():
        y = ae.decode(ae.encode(x).mode()).clamp(-1, 1)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, torch.cat([x[0], y[0]], dim=-1), fps)  # input | reconstruction
    return path
