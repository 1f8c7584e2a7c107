"""Latent statistics, rate, active units and the distance to the prior on synthetic latents with known answers."""

import math

import pytest
import torch

from eval import diagnostics as diag
from kl_ae.common.latent_stats import channel_moments, latent_statistics, merge_moments
from kl_autoencoder.model import DiagonalGaussian

MEANS = torch.tensor([3.0, -1.0, 0.5, 1e4])  # the last channel: a large offset over a small spread
STDS = torch.tensor([0.5, 2.0, 1.0, 0.1])


def f64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def synthetic_latents(n: int = 96, size: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, 4, size, size, generator=gen, dtype=torch.float64)
    return (eps * STDS.double().view(1, -1, 1, 1) + MEANS.double().view(1, -1, 1, 1)).float()  # (B, C, h, w)


def test_statistics_merged_across_processes_match_the_direct_computation():
    z = synthetic_latents()
    per_image = channel_moments(z)
    # three "processes" of unequal size, each merged locally, then the gathered rows merged again
    chunks = [slice(0, 10), slice(10, 61), slice(61, 96)]
    merged = [merge_moments(*(t[c] for t in per_image)) for c in chunks]
    gathered = tuple(torch.cat([m[i] for m in merged]) for i in range(3))
    stats = latent_statistics(*gathered)

    direct = z.double().transpose(0, 1).flatten(1)  # (C, all values)
    assert stats["num_values"] == direct.numel()
    assert torch.allclose(f64(stats["latents_mean"]), direct.mean(1), rtol=0, atol=1e-9)
    assert torch.allclose(f64(stats["latents_std"]), direct.std(1, correction=0), rtol=1e-9)
    assert stats["global_mean"] == pytest.approx(float(direct.mean()), rel=1e-12)
    assert stats["global_std"] == pytest.approx(float(direct.std(correction=0)), rel=1e-9)
    assert stats["scaling_factor"] == pytest.approx(1 / stats["global_std"])
    assert stats["shift_factor"] == stats["global_mean"]
    # and the known moments, to sampling accuracy (6144 values per channel)
    assert torch.allclose(f64(stats["latents_mean"]), MEANS.double(), atol=0.1)
    assert torch.allclose(f64(stats["latents_std"]), STDS.double(), rtol=0.05)
    # merging every image at once gives the same answer as merging chunks
    assert latent_statistics(*per_image)["latents_std"] == pytest.approx(stats["latents_std"], rel=1e-12)


def test_kl_per_channel_equals_the_posterior_kl_and_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 8, 4, 4, generator=gen)
    posterior = DiagonalGaussian(moments)
    kl = diag.kl_per_channel(posterior.mean, posterior.logvar)  # (3, 4)
    assert torch.allclose(kl.sum(1).float(), posterior.kl(), rtol=1e-5)
    q = torch.distributions.Normal(posterior.mean.double(), posterior.std.double())
    p = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
    assert torch.allclose(kl, torch.distributions.kl_divergence(q, p).sum(dim=(2, 3)), rtol=1e-6)


def test_rate_units_active_channels_and_collapse_warning():
    # 2 images of 4x4 latent positions and 32x32 pixels; channel 2 sits exactly on the prior
    kl = torch.tensor([[16.0, 8.0, 0.0], [16.0, 8.0, 0.0]], dtype=torch.float64)
    positions = torch.tensor([16.0, 16.0], dtype=torch.float64)
    pixels = torch.tensor([1024.0, 1024.0], dtype=torch.float64)
    rate = diag.rate_summary(kl, positions, pixels, threshold=0.01)
    assert rate["kl_nats_per_image"] == 24.0
    assert rate["kl_per_channel"] == [1.0, 0.5, 0.0]  # nats per latent element
    assert rate["bits_per_latent_element"] == pytest.approx(48 / (32 * 3 * math.log(2)))
    assert rate["bits_per_pixel"] == pytest.approx(48 / (2048 * math.log(2)))
    assert rate["active_channels"] == 2 and rate["inactive"] == [2]
    burda = {"active_units": 2, "threshold": 0.01}
    warning = diag.collapse_warning(rate, burda)
    assert warning.startswith("partial posterior collapse") and "channels [2]" in warning
    rate_ok = diag.rate_summary(kl[:, :2], positions, pixels)
    assert diag.collapse_warning(rate_ok, {"active_units": 2, "threshold": 0.01}) is None


def test_burda_active_units_from_the_spread_of_posterior_means():
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(50, 3, 4, 4, generator=gen)
    mean[:, 1] = 0.7  # the same for every x: carries nothing
    mean[:, 2] *= 0.05  # variance 0.0025 < 0.01
    au = diag.burda_active_units(*channel_moments(mean))
    assert au["active_units"] == 1
    assert au["variance"][1] == pytest.approx(0.0, abs=1e-12)


def test_mmd_is_near_zero_for_prior_samples_and_large_for_shifted_ones():
    gen = torch.Generator().manual_seed(0)
    prior = torch.randn(500, 4, generator=gen)
    same = torch.randn(500, 4, generator=gen)
    shifted = torch.randn(500, 4, generator=gen) + 1.0
    wide = torch.randn(500, 4, generator=gen) * 3.0
    near, _ = diag.mmd2_rbf(same, prior)
    assert abs(near) < 0.01
    far, bandwidth = diag.mmd2_rbf(shifted, prior)
    assert far > 0.1 and bandwidth > 0
    assert diag.mmd2_rbf(wide, prior)[0] > 0.1
    # the U-statistic is unbiased: over many independent pairs it averages to ~0 (the V-statistic does not)
    values = [diag.mmd2_rbf(torch.randn(40, 2, generator=gen), torch.randn(40, 2, generator=gen))[0] for _ in range(50)]
    assert abs(sum(values) / 50) < 0.005


def test_prior_distance_separates_scale_from_shape():
    gen = torch.Generator().manual_seed(1)
    vectors = torch.randn(800, 4, generator=gen) * 5.0 + 2.0  # an SD-like latent: the right shape, wrong scale
    stats = {"latents_mean": [2.0] * 4, "latents_std": [5.0] * 4}
    d = diag.prior_distance(vectors, stats, max_vectors=400)
    assert d["num_vectors"] == 400 and "U-statistic" in d["estimator"]
    assert d["mmd2"] > 0.1 and abs(d["mmd2_standardized"]) < 0.02
    assert d["gaussian_kl_per_vector"] == pytest.approx(4 * 0.5 * (4 + 25 - 1 - math.log(25)))


def test_subsample_positions_shapes():
    z = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    gen = torch.Generator().manual_seed(0)
    v = diag.subsample_positions(z, 5, gen)
    assert v.shape == (2, 5, 3)
    # each row is one position's channel vector: channels are 16 apart in this arange
    assert torch.equal(v[..., 1] - v[..., 0], torch.full((2, 5), 16.0))
    assert len(set(v[0, :, 0].tolist())) == 5  # without replacement
    assert diag.subsample_positions(z, 40, gen).shape == (2, 40, 3)  # more than h*w: with replacement
