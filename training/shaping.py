"""Latent-shaping regularizers: what a training step does to the latent so that a diffusion model learns it better.

All are off by default (`loss.*`, docs/diffusability.md):
- `eq_weight`, `eq_prob`, `eq_transforms` (EQ-VAE, Kouzelis et al. 2025; scale equivariance, Skorokhodov et al.
  2025): in a share `eq_prob` of the steps the decoder also reconstructs T(x) from T(z), T drawn uniformly from
  `eq_transforms` (`kl_ae.common.transforms`: downscaling by 2, rotations), with the main loss's reconstruction and
  perceptual terms, weighted by `eq_weight`. `scale` downscales by a factor drawn from EQ_SCALES (EQ-VAE's
  discrete choice; `kl-ae eval` measures the factor 1/2).
- `latent_noise` (the noisy-latent decoders of NextStep-1 and others): Gaussian noise of this std relative to the
  batch's latent std is added to the decoder's input, so the decoder tolerates what a diffusion model gets wrong.
- `channel_mask` (DC-AE 1.5's structured latent space): in this share of the steps the decoder sees only the first
  k channels (k uniform in 1..C-1, the rest zeroed), so the leading channels carry the coarse content.

A step's choices come from a generator seeded with (seed, step): every process and a resumed run draw the same,
and nothing waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.config import LossConfig

EQ_SCALES = (0.25, 0.5, 0.75)  # the `scale` transform's factors (latent and image sides), drawn uniformly


@dataclass(frozen=True)
class Shaping:
    """One step's latent shaping."""

    transform: str | None = None  # EQ: also reconstruct T(x) from T(z)
    scale: float = 0.5  # the factor of a `scale` transform
    keep_channels: int | None = None  # channel mask: the decoder sees only the first k channels
    noise: float = 0.0  # std of the noise on the decoder's input, relative to the latent's std

    @property
    def changes_latent(self) -> bool:
        return self.keep_channels is not None or self.noise > 0


def active(cfg: LossConfig) -> bool:
    return cfg.eq_weight > 0 or cfg.latent_noise > 0 or cfg.channel_mask > 0


def draw(cfg: LossConfig, seed: int, step: int, channels: int) -> Shaping | None:
    """The shaping of training step `step` (None when every regularizer is off)."""
    if not active(cfg):
        return None
    # tuples of ints hash the same in every process (unlike strings); the CPU generator keeps 32 bits of a seed
    rng = torch.Generator().manual_seed(hash((seed, step, 0x5EA9)) & 0xFFFF_FFFF)
    u = torch.rand(5, generator=rng).tolist()
    transform = None
    if cfg.eq_weight > 0 and u[0] < cfg.eq_prob:
        transform = cfg.eq_transforms[int(u[1] * len(cfg.eq_transforms))]
    keep = None
    if cfg.channel_mask > 0 and channels > 1 and u[2] < cfg.channel_mask:
        keep = 1 + int(u[3] * (channels - 1))
    scale = EQ_SCALES[int(u[4] * len(EQ_SCALES))]
    return Shaping(transform=transform, scale=scale, keep_channels=keep, noise=cfg.latent_noise)


def shape_latent(z: torch.Tensor, shaping: Shaping) -> torch.Tensor:
    """The decoder's input: z (B, C, h, w) with noise added and trailing channels zeroed, as `shaping` says."""
    if shaping.noise > 0:  # relative to the batch's latent std, which is not trained through
        z = z + shaping.noise * z.detach().float().std().to(z.dtype) * torch.randn_like(z)
    if shaping.keep_channels is not None:
        mask = torch.zeros(1, z.shape[1], 1, 1, device=z.device, dtype=z.dtype)
        mask[:, : shaping.keep_channels] = 1
        z = z * mask
    return z
