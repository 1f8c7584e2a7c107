"""Spatial transforms that act the same way on images and on latents, for equivariance.

A latent space is equivariant to T when decode(T(z)) = T(decode(z)): EQ-VAE (Kouzelis et al. 2025) and
"Improving the diffusability of autoencoders" (Skorokhodov et al. 2025) train for it, and `kl-ae eval` measures
it. Training (`loss.eq_*`) and evaluation use these definitions, so they mean the same thing:
- `scale`: downscaling by area averaging (a box filter; exactly 2x2 average pooling at factor 1/2), of the
  image to the latent's new size times the model's downsampling factor;
- `rot90`, `rot180`, `rot270`: counter-clockwise rotations, exact on any grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TRANSFORMS = ("scale", "rot90", "rot180", "rot270")


def downscale(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area-average (B, C, H, W) down to `size`; in fp32 whatever autocast says."""
    with torch.autocast(t.device.type, enabled=False):
        return F.interpolate(t.float(), size=size, mode="area").to(t.dtype)


def apply_pair(
    name: str, x: torch.Tensor, z: torch.Tensor, factor: int, scale: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T(x), T(z)) for images x (B, 3, H, W) and their latents z (B, C, H/f, W/f).

    `scale` (for "scale") is the latent's new size relative to the old, rounded to whole latent positions (at
    least 1); the image goes to exactly `factor` times that size, so the pair stays aligned.
    """
    if name == "scale":
        h, w = z.shape[2:]
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        return downscale(x, (size[0] * factor, size[1] * factor)), downscale(z, size)
    if name in ("rot90", "rot180", "rot270"):
        k = int(name[3:]) // 90
        return torch.rot90(x, k, dims=(2, 3)), torch.rot90(z, k, dims=(2, 3))
    raise ValueError(f"unknown transform {name!r}; choose from {list(TRANSFORMS)}")
