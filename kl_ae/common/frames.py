"""Video is a dimension: clips (B, C, T, H, W) through code written for images (B, C, H, W).

One small helper folds the frames into the batch where a 2-D network (LPIPS, a 2-D discriminator, SSIM) needs
it and unfolds its per-frame output again; everything else (L1, the KL term, latent moments) takes either shape
as it is. A 4-D batch passes through unchanged, so image code pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def is_clip(x: Tensor) -> bool:
    """A (B, C, T, H, W) clip batch rather than a (B, C, H, W) image batch."""
    return x.dim() == 5


def fold_frames(x: Tensor) -> Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W), frames of one clip consecutive; a 4-D batch unchanged."""
    if not is_clip(x):
        return x
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def unfold_frames(y: Tensor, frames: int) -> Tensor:
    """The inverse of `fold_frames` on a per-frame output (B*T, ...) -> (B, T, ...)."""
    return y.reshape(-1, frames, *y.shape[1:])


def per_frame(fn: Callable[..., Tensor], *clips: Tensor) -> Tensor:
    """fn over the frames of clips, which returns one value per image (B*T,), as (B, T); images give (B, 1)."""
    frames = clips[0].shape[2] if is_clip(clips[0]) else 1
    return unfold_frames(fn(*(fold_frames(c) for c in clips)), frames)


def pick_frames(clips: tuple[Tensor, ...], count: int, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
    """The same `count` frames of each clip batch, drawn at random without replacement (0 or >= T: all frames).

    A perceptual network on every frame of a long clip costs more memory than the autoencoder itself; a random
    subset each step is an unbiased estimate of the all-frame mean."""
    x = clips[0]
    if not is_clip(x) or count <= 0 or count >= x.shape[2]:
        return clips
    index = torch.randperm(x.shape[2], generator=generator)[:count].sort().values.to(x.device)
    return tuple(c.index_select(2, index) for c in clips)
