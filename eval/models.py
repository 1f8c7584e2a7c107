"""The autoencoders of the eval-side commands (eval, probe, encode / decode, reconstruct): any family that
`kl_autoencoder.interface.load_autoencoder` takes, loaded with one-line errors, and the size checks they share.
"""

from __future__ import annotations

import math

import torch

from kl_ae.common.config import ConfigError
from kl_autoencoder import Autoencoder
from kl_autoencoder.families.ours import wrap
from kl_autoencoder.interface import LatentAutoencoder, load_autoencoder


def load_model(path: str, flag: str = "--model") -> LatentAutoencoder:
    """The autoencoder at a diffusers, run or checkpoint folder or a hub name, in fp32 and eval mode; ConfigError
    (one line) for a class no family covers or a missing optional dependency (FileNotFoundError passes through)."""
    try:
        return load_autoencoder(path)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"{flag}: {path}: {e}") from None


def as_adapter(model: LatentAutoencoder | Autoencoder) -> LatentAutoencoder:
    """An adapter as it is; our bare `Autoencoder` (what these functions took before every family) wrapped in its."""
    return wrap(model) if isinstance(model, Autoencoder) else model


def device_of(ae: LatentAutoencoder) -> torch.device:
    return next(ae.module.parameters()).device


def image_multiple(*models: LatentAutoencoder) -> int:
    """What every image side must be a multiple of for all these models at once (own-size evaluation crops to it)."""
    return math.lcm(*(ae.image_multiple for ae in models))


def check_resolution(ae: LatentAutoencoder, resolution: int, who: str = "model") -> None:
    """ConfigError (one line, naming `--resolution`) when `ae` cannot take resolution x resolution images."""
    m = ae.image_multiple
    if resolution <= 0 or resolution % m:
        raise ConfigError(
            f"--resolution: {resolution} is not a multiple of the {who}'s image multiple {m} "
            f"({ae.class_name}, downsampling factor {ae.spatial_factor})"
        )
    try:
        ae.check_size(resolution, resolution)
    except ValueError as e:
        raise ConfigError(f"--resolution: {e}") from None


def check_sizes(ae: LatentAutoencoder, sizes: set[tuple[int, int]], who: str = "model") -> None:
    """ConfigError when one of the image sizes (H, W) cannot go through `ae` (RAE: one size only)."""
    for h, w in sorted(sizes):
        try:
            ae.check_size(h, w)
        except ValueError as e:
            raise ConfigError(f"--data: the {who}: {e}; bring the images to one size with --resolution N") from None


def longest_frames(*models: LatentAutoencoder):
    """n -> the longest clip length <= n that every model takes (causal video models: 1 + k * their factor)."""

    def longest(n: int) -> int:
        for m in range(n, 0, -1):
            if all(ae.longest_frames(m) == m for ae in models):
                return m
        raise ConfigError(f"--frames: no clip length <= {n} is taken by every model")

    return longest


def check_frames(ae: LatentAutoencoder, frames: int | None, who: str = "model") -> None:
    """ConfigError (one line, naming `--frames`) when the model cannot take clips of `frames` frames."""
    if frames is None:
        return
    if frames < 1:
        raise ConfigError(f"--frames: must be >= 1, got {frames}")
    try:
        ae.check_frames(frames)
    except ValueError as e:
        raise ConfigError(f"--frames: the {who}: {e}") from None
