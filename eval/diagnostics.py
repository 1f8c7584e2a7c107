"""VAE diagnostics as pure functions over latents: moments, rate, active units, distance to the prior, codebook use.

Per-image quantities (moments, KL per channel, a few latent vectors) are computed batch by batch, so a
caller can gather them across processes with accelerate's `gather_for_metrics`, and are combined once at
the end. The "holes" measures follow the VAE deep-dive: per-image KL pulls each q(z|x) towards N(0, I),
but nothing makes the aggregate posterior q(z) = E_x q(z|x) match the prior, and prior samples that fall
where no encoder output lies decode to garbage.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kl_ae.common.latent_stats import merge_moments


def kl_per_channel(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(q(z|x) || N(0, I)) in nats per image (clip) and channel, summed over positions, in float64. (B, C)"""
    mean, logvar = mean.double(), logvar.double().clamp(-30.0, 20.0)  # the posterior's clamp
    return (0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)).flatten(2).sum(-1)


def rate_summary(kl: Tensor, positions: Tensor, pixels: Tensor, threshold: float = 0.01) -> dict:
    """The rate from per-image KL (N, C) nats, latent positions h*w (N,) and pixels H*W (N,).

    Rates pool the whole set (total bits / total elements). A channel is active when its KL exceeds
    `threshold` nats per latent element; one below it carries (almost) no information about x.
    """
    total = float(kl.sum())
    per_channel = kl.sum(0) / positions.sum()  # (C,) nats per latent element
    active = per_channel > threshold
    channels = kl.shape[1]
    return {
        "kl_nats_per_image": total / kl.shape[0],
        "bits_per_latent_element": total / (float(positions.sum()) * channels * math.log(2)),
        "bits_per_pixel": total / (float(pixels.sum()) * math.log(2)),
        "kl_per_channel": per_channel.tolist(),  # nats per latent element
        "threshold": threshold,
        "active_channels": int(active.sum()),
        "inactive": [i for i in range(channels) if not active[i]],
    }


def burda_active_units(count: Tensor, mean: Tensor, m2: Tensor, threshold: float = 0.01) -> dict:
    """Burda et al. (2016): unit u is active when Cov_x(E_q[u|x]) > threshold.

    From the moments of the posterior MEAN. The latent is convolutional, so a channel is one unit and its
    positions are further samples of it: the variance is over images and positions.
    """
    n, _, m2 = merge_moments(count, mean, m2)
    var = m2[0] / n
    return {"variance": var.tolist(), "threshold": threshold, "active_units": int((var > threshold).sum())}


def collapse_warning(rate: dict, burda: dict) -> str | None:
    """A warning naming the channels that carry no information, or None when all of them do."""
    channels = len(rate["kl_per_channel"])
    if not rate["inactive"] and burda["active_units"] == channels:
        return None
    severity = "posterior collapse" if rate["active_channels"] <= channels // 2 else "partial posterior collapse"
    return (
        f"{severity}: {channels - rate['active_channels']} of {channels} latent channels have KL <= "
        f"{rate['threshold']} nats per element (channels {rate['inactive']}), {burda['active_units']} of "
        f"{channels} are active by Burda's Cov_x(E[z|x]) > {burda['threshold']}; those channels are ignored by "
        f"the decoder"
    )


def subsample_positions(z: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k latent vectors per image at random positions of z (B, C, h, w) or (B, C, t, h, w). (B, k, C)

    Without replacement when there are >= k positions, else with, so that every image gives k rows (gatherable).
    """
    b, c = z.shape[:2]
    flat = z.flatten(2).transpose(1, 2)  # (B, positions, C)
    n = flat.shape[1]
    if n >= k:
        idx = torch.stack([torch.randperm(n, generator=generator)[:k] for _ in range(b)])
    else:
        idx = torch.randint(0, n, (b, k), generator=generator)
    return torch.gather(flat, 1, idx.to(z.device)[..., None].expand(b, k, c))


def mmd2_rbf(a: Tensor, b: Tensor, bandwidth: float | None = None) -> tuple[float, float]:
    """Unbiased MMD^2 between samples a (m, d) and b (n, d) with a Gaussian RBF kernel; (mmd2, bandwidth).

    k(x, y) = exp(-||x - y||^2 / (2 h^2)); h = `bandwidth`, or by the median heuristic the median pairwise
    distance of the pooled sample. The U-statistic of Gretton et al. (2012, Eq. 3) leaves out the i == j
    terms, so it is unbiased and may be slightly negative when the distributions are equal.
    """
    a, b = a.double(), b.double()
    m, n = len(a), len(b)
    pooled = torch.cat([a, b])
    d2 = torch.cdist(pooled, pooled).square()  # (m + n, m + n)
    if bandwidth is None:
        off = d2[~torch.eye(m + n, dtype=torch.bool, device=d2.device)]
        bandwidth = float(off.median().sqrt())
    k = torch.exp(-d2 / (2 * bandwidth**2))
    k_aa, k_bb, k_ab = k[:m, :m], k[m:, m:], k[:m, m:]
    mmd2 = (
        (k_aa.sum() - k_aa.diagonal().sum()) / (m * (m - 1))
        + (k_bb.sum() - k_bb.diagonal().sum()) / (n * (n - 1))
        - 2 * k_ab.mean()
    )
    return float(mmd2), bandwidth


def gaussian_kl_to_prior(mean: list[float], std: list[float]) -> float:
    """sum_c KL(N(mean_c, std_c^2) || N(0, 1)): how far the aggregate's per-channel moments are from the prior."""
    m, s = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    return float(0.5 * (m.square() + s.square() - 1 - 2 * s.log()).sum())


def prior_distance(vectors: Tensor, stats: dict, max_vectors: int = 1024, seed: int = 0) -> dict:
    """How far the aggregate posterior q(z) is from N(0, I): moments and MMD on latent vectors (N, C).

    MMD compares at most `max_vectors` random rows of `vectors` (posterior samples at random positions)
    with as many N(0, I) draws, once as they are and once standardised per channel with the aggregate's
    mean and std (what a diffusion model sees after latents_mean / latents_std normalisation).
    """
    gen = torch.Generator().manual_seed(seed)
    vectors = vectors.double().cpu()
    if len(vectors) > max_vectors:
        vectors = vectors[torch.randperm(len(vectors), generator=gen)[:max_vectors]]
    prior = torch.randn(vectors.shape, generator=gen, dtype=torch.float64)
    mean = torch.tensor(stats["latents_mean"], dtype=torch.float64)
    std = torch.tensor(stats["latents_std"], dtype=torch.float64).clamp_min(1e-12)
    mmd2, h = mmd2_rbf(vectors, prior)
    mmd2_std, h_std = mmd2_rbf((vectors - mean) / std, prior)
    return {
        "gaussian_kl_per_vector": gaussian_kl_to_prior(stats["latents_mean"], stats["latents_std"]),
        "mmd2": mmd2,
        "mmd2_bandwidth": h,
        "mmd2_standardized": mmd2_std,
        "mmd2_standardized_bandwidth": h_std,
        "num_vectors": len(vectors),
        "estimator": (
            "unbiased U-statistic MMD^2 (Gretton et al. 2012), Gaussian RBF kernel exp(-d^2 / (2 h^2)), h = median "
            f"pairwise distance of the pooled sample; {len(vectors)} posterior-sample latent vectors (C-dim, random "
            f"positions) against {len(vectors)} N(0, I) draws"
        ),
    }


def code_histogram(indices: Tensor, num_codes: int) -> Tensor:
    """Per-image code counts from VQ indices (B, h, w): (B, num_codes) int64, so it can be gathered per image."""
    b = indices.shape[0]
    flat = indices.reshape(b, -1).long()
    counts = torch.zeros(b, num_codes, dtype=torch.long, device=indices.device)
    return counts.scatter_add_(1, flat, torch.ones_like(flat))


def codebook_statistics(counts: Tensor, pixels: float | None = None) -> dict:
    """Codebook use from the code histogram (K,) over every latent position of a set (all images, all processes).

    usage: fraction of the K codes used at least once; perplexity: exp of the entropy (nats) of the empirical
    code distribution, between 1 (one code) and K (uniform); dead_codes: codes never used. With `pixels` (the
    set's total H*W), the code rate in bits per pixel: log2(K) per position (fixed-length indices) and the
    entropy in bits per position (what an ideal entropy coder of the unigram code distribution would spend).
    """
    counts = counts.detach().long().cpu().flatten()
    k, total = len(counts), int(counts.sum())
    used = int((counts > 0).sum())
    p = counts.double() / max(total, 1)
    entropy = float(torch.special.entr(p).sum())  # nats; 0 log 0 = 0
    stats = {
        "num_codes": k,
        "num_positions": total,
        "used_codes": used,
        "usage": used / k,
        "perplexity": math.exp(entropy),
        "entropy_bits": entropy / math.log(2),
        "dead_codes": k - used,
    }
    if pixels:
        stats["bits_per_pixel"] = total * math.log2(k) / pixels
        stats["entropy_bits_per_pixel"] = total * entropy / math.log(2) / pixels
    stats["histogram"] = counts.tolist()
    return stats


def codebook_warning(stats: dict, fraction: float = 0.1) -> str | None:
    """A warning when fewer than `fraction` of the codes the set could have used (min(K, positions)) were used."""
    possible = min(stats["num_codes"], stats["num_positions"])
    if stats["used_codes"] >= fraction * possible:
        return None
    return (
        f"codebook collapse: {stats['used_codes']} of {stats['num_codes']} codes used over {stats['num_positions']} "
        f"latent positions (perplexity {stats['perplexity']:.3g}); most codes are dead"
    )
