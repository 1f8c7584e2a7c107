"""Latent statistics: per-channel moments of latents, merged exactly across batches and processes.

What a diffusion model needs to normalise its latents (`scaling_factor`, `shift_factor`, per-channel
`latents_mean` / `latents_std`) is measured from these, by `kl-ae export`, at the end of training and by
`kl-ae eval`.
"""

from __future__ import annotations

import torch
from torch import Tensor

# (count (N,), mean (N, C), m2 (N, C)), float64, one row per group of values (an image, a process, ...);
# m2 is the sum of squared deviations from the group's mean
Moments = tuple[Tensor, Tensor, Tensor]


def channel_moments(z: Tensor) -> Moments:
    """Per-image, per-channel count, mean and M2 of z (B, C, h, w), in float64."""
    z = z.double().flatten(2)  # (B, C, h*w)
    mean = z.mean(-1)
    m2 = (z - mean[..., None]).square().sum(-1)
    count = torch.full((z.shape[0],), float(z.shape[-1]), dtype=torch.float64, device=z.device)
    return count, mean, m2


def merge_moments(count: Tensor, mean: Tensor, m2: Tensor) -> Moments:
    """Combine the groups (rows) into one row; exact for any split, so merging merged rows is fine.

    Chan et al.'s parallel update generalised to k groups (the law of total variance):
    M2 = sum_i M2_i + sum_i n_i (mean_i - mean)^2. Unlike accumulating sums of squares it does not
    cancel catastrophically when |mean| >> std, as for latents with a large offset.
    """
    n = count.sum()
    total_mean = (count[:, None] * mean).sum(0) / n
    total_m2 = m2.sum(0) + (count[:, None] * (mean - total_mean).square()).sum(0)
    return n.reshape(1), total_mean[None], total_m2[None]


def latent_statistics(count: Tensor, mean: Tensor, m2: Tensor) -> dict:
    """Global and per-channel mean and std (population, ddof 0) of latent samples from per-group moments.

    scaling_factor = 1 / std and shift_factor = mean are LDM's scale_by_std (diffusers applies
    (z - shift_factor) * scaling_factor); latents_mean / latents_std are the per-channel alternative.
    """
    n, mu, m2 = merge_moments(count, mean, m2)  # (1,), (1, C), (1, C)
    channels = mu.shape[1]
    # every channel has the same count, so the channels are equal-sized groups of one pool
    g_n, g_mu, g_m2 = merge_moments(n.expand(channels), mu.T, m2.T)
    std = (m2[0] / n).sqrt()
    g_std = float((g_m2 / g_n).sqrt())
    return {
        "num_values": int(g_n),
        "global_mean": float(g_mu),
        "global_std": g_std,
        "shift_factor": float(g_mu),
        "scaling_factor": 1.0 / g_std if g_std > 0 else float("inf"),
        "latents_mean": mu[0].tolist(),
        "latents_std": std.tolist(),
    }
