"""The model on its own: shapes per preset, the posterior's math, config validation, checkpointing."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import kl_autoencoder.model as model_module
from kl_autoencoder import PRESETS, Autoencoder, AutoencoderConfig, DiagonalGaussian

from .conftest import tiny

FACTORS = {"tiny": 8, "kl-f8": 8, "kl-f8-c16": 8, "kl-f4": 4, "kl-f16": 16}


def test_preset_names():
    assert set(PRESETS) == set(FACTORS)


@pytest.mark.parametrize("name", sorted(FACTORS))
def test_shapes_and_downsample_factor(name):
    cfg = tiny(name)
    assert cfg.downsample_factor == PRESETS[name].downsample_factor == FACTORS[name]
    model = Autoencoder(cfg).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    f = FACTORS[name]
    with torch.no_grad():
        reconstruction, posterior = model(x, return_posterior=True)
        assert posterior.mean.shape == posterior.logvar.shape == (2, cfg.latent_channels, 64 // f, 64 // f)
        assert posterior.kl().shape == (2,)
        assert reconstruction.shape == x.shape
        assert model.decode(posterior.sample()).shape == x.shape


def test_kl_f8_is_the_sd_vae():
    with torch.device("meta"):  # full size, shapes only
        model = Autoencoder(PRESETS["kl-f8"])
    assert sum(p.numel() for p in model.parameters()) == 83_653_863  # stabilityai/sd-vae-ft-mse


def test_forward_modes():
    torch.manual_seed(0)
    model = Autoencoder(tiny("tiny")).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        posterior = model.encode(x)
        torch.testing.assert_close(model(x), model.decode(posterior.mode()), rtol=0, atol=0)
        sampled = model(x, sample_posterior=True, generator=torch.Generator().manual_seed(1))
        expected = model.decode(posterior.sample(torch.Generator().manual_seed(1)))
        torch.testing.assert_close(sampled, expected, rtol=0, atol=0)
        assert not torch.allclose(sampled, model(x))


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    moments = torch.randn(3, 8, 5, 6, dtype=torch.float64) * 2
    posterior = DiagonalGaussian(moments)
    reference = kl_divergence(Normal(posterior.mean, posterior.std), Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert posterior.kl().shape == (3,)
    torch.testing.assert_close(posterior.kl(), reference, rtol=0, atol=1e-6)
    # zero exactly at the prior
    assert DiagonalGaussian(torch.zeros(2, 8, 3, 3)).kl().abs().max() == 0


def test_sample_has_posterior_mean_and_std():
    torch.manual_seed(0)
    mean, logvar = torch.randn(1, 2, 2, 2) * 3, torch.randn(1, 2, 2, 2)
    n = 20_000
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1).expand(n, -1, -1, -1))
    draws = posterior.sample(torch.Generator().manual_seed(0))
    std = torch.exp(0.5 * logvar[0])
    assert (draws.mean(0) - mean[0]).abs().max() < 5 * std.max() / n**0.5
    torch.testing.assert_close(draws.std(0), std, rtol=0.05, atol=0)
    assert torch.equal(posterior.mode(), posterior.mean)


def test_sample_is_reparameterized():
    moments = torch.randn(2, 8, 4, 4, requires_grad=True)
    posterior = DiagonalGaussian(moments)
    z = posterior.sample(torch.Generator().manual_seed(0))
    z.sum().backward()
    grad_mean, grad_logvar = moments.grad.chunk(2, dim=1)
    torch.testing.assert_close(grad_mean, torch.ones_like(grad_mean))
    # d z / d logvar = 0.5 * std * eps = 0.5 * (z - mean)
    torch.testing.assert_close(grad_logvar, 0.5 * (z - posterior.mean).detach())


def test_sample_is_reproducible_with_a_generator():
    posterior = DiagonalGaussian(torch.randn(2, 8, 4, 4))
    a = posterior.sample(torch.Generator().manual_seed(3))
    b = posterior.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_logvar_is_clamped():
    mean = torch.zeros(1, 4, 2, 2)
    for value, clamped in ((100.0, 20.0), (-100.0, -30.0)):
        posterior = DiagonalGaussian(torch.cat([mean, torch.full_like(mean, value)], dim=1))
        assert torch.all(posterior.logvar == clamped)
        assert torch.isfinite(posterior.var).all() and torch.isfinite(posterior.kl()).all()


def test_last_layer_gets_gradient():
    model = Autoencoder(tiny("tiny"))
    assert model.last_layer is model.decoder.conv_out.weight
    model(torch.rand(1, 3, 32, 32)).mean().backward()
    assert model.last_layer.grad is not None and model.last_layer.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    torch.manual_seed(0)
    model = Autoencoder(tiny("kl-f16", attn_levels=(3,))).train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        reconstruction, posterior = model(
            x, sample_posterior=True, generator=torch.Generator().manual_seed(0), return_posterior=True
        )
        ((reconstruction - x).abs().mean() + 1e-3 * posterior.kl().mean()).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    reference = grads()
    calls = []
    original = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    # every resnet and attention block went through checkpoint: kl-f16 at tiny width has 5 levels
    n_resnets = 5 * 2 + 5 * 3 + 2 * 2
    n_attentions = 2 + 3 + 2 * 1
    assert len(calls) == n_resnets + n_attentions
    for k in reference:
        torch.testing.assert_close(checkpointed[k], reference[k], rtol=1e-5, atol=1e-7, msg=k)

    calls.clear()
    with torch.no_grad():  # no recomputation needed without autograd, nor in eval mode
        model(x)
    model.eval()
    model(x)
    assert not calls
    model.enable_gradient_checkpointing(False)
    model.train()
    model(x)
    assert not calls


def test_config_lists_become_tuples():
    cfg = AutoencoderConfig(channel_mult=[1, 2], attn_levels=[1, 0, 1], latents_mean=[0, 1, 2, 3])
    assert cfg.channel_mult == (1, 2) and cfg.attn_levels == (0, 1)
    assert cfg.latents_mean == [0.0, 1.0, 2.0, 3.0]
    assert cfg.downsample_factor == 2 and cfg.block_out_channels == (128, 256)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bottleneck": "vq"}, "bottleneck"),
        ({"base_channels": 48, "norm_num_groups": 32}, "divisible by norm_num_groups"),
        ({"attn_levels": (4,)}, "attn_levels"),
        ({"channel_mult": ()}, "channel_mult"),
        ({"latents_std": [1.0, 1.0]}, "latents_std"),
        ({"latent_channels": 0}, "latent_channels"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderConfig(**kwargs)
