"""The model on its own: shapes per preset, the posterior's math, config validation, checkpointing, VQ paths."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import kl_autoencoder.model as model_module
from kl_autoencoder import PRESETS, Autoencoder, AutoencoderConfig, DiagonalGaussian, Latents, QuantizerConfig

from .conftest import tiny

FACTORS = {"tiny": 4, "kl-f8": 8, "kl-f8-c16": 8, "kl-f4": 4, "kl-f16": 16}
VQ_FACTORS = {"tiny-vq": 4, "vq-f4": 4, "vq-f8": 8}


def test_preset_names():
    assert set(PRESETS) == set(FACTORS) | set(VQ_FACTORS)
    assert {name for name, cfg in PRESETS.items() if cfg.bottleneck == "vq"} == set(VQ_FACTORS)


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
        ({"bottleneck": "fsq"}, "bottleneck"),
        ({"bottleneck": "vq", "num_codes": 0}, "num_codes"),
        ({"bottleneck": "vq", "code_dim": 3, "use_quant_conv": False}, "code_dim=3 != latent_channels=4"),
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


@pytest.mark.parametrize("name", sorted(VQ_FACTORS))
def test_vq_shapes(name):
    cfg = tiny(name)
    f, D = VQ_FACTORS[name], cfg.code_dim
    assert cfg.downsample_factor == PRESETS[name].downsample_factor == f
    model = Autoencoder(cfg).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        encoded = model.encode(x)
        assert isinstance(encoded, Latents)
        assert encoded.latents.shape == encoded.mode().shape == (2, D, 32 // f, 32 // f)
        reconstruction, quantized = model(x, return_posterior=True)
        assert reconstruction.shape == x.shape
        assert quantized.z_q.shape == (2, D, 32 // f, 32 // f) and quantized.indices.shape == (2, 32 // f, 32 // f)
        assert quantized.loss.shape == () and quantized.indices.max() < cfg.num_codes
        # forward = decode(quantize(encode)); decode does not quantize
        z_q, indices, _, _ = model.quantize(encoded.latents)
        torch.testing.assert_close(model.decode(z_q), reconstruction, rtol=0, atol=0)
        assert torch.equal(indices, quantized.indices)
        assert model(x).shape == x.shape


def test_vq_presets_are_ldms():
    def summary(cfg: AutoencoderConfig) -> tuple:
        return cfg.channel_mult, cfg.latent_channels, cfg.num_codes, cfg.code_dim, cfg.attn_levels, cfg.mid_attention

    assert summary(PRESETS["vq-f4"]) == ((1, 2, 4), 3, 8192, 3, (), True)
    assert summary(PRESETS["vq-f8"]) == ((1, 2, 2, 4), 4, 16384, 4, (3,), True)  # attn_resolutions [32] at 256px
    f8 = PRESETS["vq-f8"]
    with torch.device("meta"):
        sd = Autoencoder(f8).state_dict()
    assert tuple(sd["quantize.embedding.weight"].shape) == (16384, 4)
    assert tuple(sd["encoder.conv_out.weight"].shape) == (4, 512, 3, 3)  # double_z False
    assert tuple(sd["quant_conv.weight"].shape) == (4, 4, 1, 1)
    # training statistics are buffers outside the state dict
    assert not any(k.startswith("quantize.") and k != "quantize.embedding.weight" for k in sd)


def test_vq_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    model = Autoencoder(tiny("tiny-vq", code_dim=2)).train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    reconstruction, quantized = model(x, return_posterior=True)
    # the reconstruction alone (no VQ loss) must train the encoder through the straight-through estimator
    (reconstruction - x).abs().mean().backward()
    for p in (model.encoder.conv_in.weight, model.quant_conv.weight, model.post_quant_conv.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None  # EMA codebook: no gradient
    assert quantized.logs["train/vq_loss"].requires_grad is False


def test_vq_loss_mode_trains_the_codebook_by_gradient():
    model = Autoencoder(tiny("tiny-vq"), vq=QuantizerConfig(codebook="loss")).train()
    _, quantized = model(torch.rand(2, 3, 32, 32), return_posterior=True)
    quantized.loss.backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert model.quant_conv.weight.grad.abs().sum() > 0  # the commitment term reaches the encoder side


def test_quantizer_state_round_trip():
    torch.manual_seed(0)
    model = Autoencoder(tiny("tiny-vq"), vq=QuantizerConfig(dead_after=2, window=4, buffer_size=32)).train()
    for _ in range(4):
        model(torch.rand(2, 3, 32, 32))
    state = model.quantizer_state()
    assert int(state["steps"]) == 4 and int(state["restarts"]) > 0
    fresh = Autoencoder(tiny("tiny-vq"), vq=QuantizerConfig(dead_after=2, window=4, buffer_size=32))
    fresh.load_state_dict(model.state_dict())  # a weight load restarts the EMA from the loaded codebook ...
    torch.testing.assert_close(fresh.quantize.embed_sum, model.quantize.embedding.weight, rtol=0, atol=0)
    fresh.load_quantizer_state(state)  # ... and the statistics bring back the exact training state
    for k, v in model.quantizer_state().items():
        assert torch.equal(fresh.quantizer_state()[k], v), k
    assert Autoencoder(tiny("tiny")).quantizer_state() == {}
