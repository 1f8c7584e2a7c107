"""Latent-shaping regularizers: each one's gradient reaches the parts it must and no others, the VF loss matches
its margin formulas, per-step draws are reproducible, and a run with all of them on resumes exactly."""

import dataclasses
import json
import math

import pytest
import torch

from kl_ae.common.transforms import apply_pair
from kl_autoencoder import PRESETS, Autoencoder
from training.align import FoundationFeatures
from training.config import LossConfig, load_config
from training.discriminator import PatchDiscriminator
from training.losses import nll_loss, reconstruction_error, vf_loss
from training.shaping import Shaping, draw, shape_latent
from training.step import AutoencoderWithLoss, Forward, StepSchedule, generator_objective

from .conftest import TINY, checkpoint_tensors


def _tiny_generator(align_dim: int = 0) -> AutoencoderWithLoss:
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], base_channels=8, norm_num_groups=4)
    return AutoencoderWithLoss(Autoencoder(cfg), learn_logvar=False, logvar_init=0.0, align_dim=align_dim)


def random_align(hidden_size: int = 32, patch_size: int = 4) -> FoundationFeatures:
    """A tiny DINOv2 with RANDOM weights, in place of the foundation model this machine does not have."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * hidden_size,
        patch_size=patch_size, image_size=8 * patch_size,
    )  # fmt: skip
    torch.manual_seed(0)
    return FoundationFeatures(Dinov2Model(config))


def _grads(module) -> dict[str, float]:
    return {n: float(p.grad.abs().sum()) if p.grad is not None else 0.0 for n, p in module.named_parameters()}


def _part(grads: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in grads.items() if k.startswith(prefix))


def test_draws_depend_only_on_seed_and_step():
    cfg = LossConfig(eq_weight=1.0, eq_prob=0.5, channel_mask=0.25, latent_noise=0.1)
    draws = [draw(cfg, seed=3, step=s, channels=4) for s in range(400)]
    assert draws == [draw(cfg, seed=3, step=s, channels=4) for s in range(400)]  # every process, every resume
    assert draws != [draw(cfg, seed=4, step=s, channels=4) for s in range(400)]
    eq = [d.transform for d in draws if d.transform]
    assert 0.4 < len(eq) / 400 < 0.6 and set(eq) == {"scale", "rot90", "rot180", "rot270"}
    masked = [d.keep_channels for d in draws if d.keep_channels is not None]
    assert 0.17 < len(masked) / 400 < 0.33 and set(masked) == {1, 2, 3}
    assert all(d.noise == 0.1 for d in draws) and {d.scale for d in draws} == {0.25, 0.5, 0.75}
    assert draw(LossConfig(), seed=0, step=0, channels=4) is None  # all off: nothing to do


def test_latent_noise_is_relative_to_the_latent_std_and_passes_gradients_unchanged():
    torch.manual_seed(0)
    z = (3.0 * torch.randn(4, 4, 16, 16)).requires_grad_()
    out = shape_latent(z, Shaping(noise=0.5))
    assert (out - z).std().item() == pytest.approx(0.5 * z.std().item(), rel=0.05)
    (out * 2).sum().backward()
    # the noise's scale is not trained through: d out / d z is the identity
    assert torch.equal(z.grad, torch.full_like(z, 2.0))


def test_channel_mask_keeps_the_leading_channels():
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = shape_latent(z, Shaping(keep_channels=2))
    assert torch.equal(out[:, :2], z[:, :2]) and not out[:, 2:].any()
    out.sum().backward()
    assert z.grad[:, :2].eq(1).all() and z.grad[:, 2:].eq(0).all()  # no gradient through dropped channels


@pytest.mark.parametrize("transform", ["scale", "rot90"])
def test_eq_term_is_the_nll_of_the_transformed_pair_and_trains_encoder_and_decoder(transform):
    gen = _tiny_generator()
    disc = PatchDiscriminator(base_channels=8, n_layers=2, norm="group")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.manual_seed(1)
    recon, post, extras = gen(x, Shaping(transform=transform))
    x_t, recon_t = extras["eq"]
    # the pair: T(x), and the decoding of T applied to the same latent sample
    torch.manual_seed(1)
    z, _ = gen.autoencoder.bottleneck(x, sample_posterior=True)
    expected_x, z_t = apply_pair(transform, x, z, 4)
    assert torch.equal(x_t, expected_x) and torch.allclose(recon_t, gen.autoencoder.decode(z_t), atol=1e-6)
    if transform == "scale":  # 0.5 by default
        assert x_t.shape[2:] == (16, 16) and z_t.shape[2:] == (4, 4)
    cfg = LossConfig(disc_start=10**9, eq_weight=1.0)
    fwd, inputs, schedule = Forward(x, recon, post, extras), gen.loss_inputs(disc), StepSchedule.at(0, cfg)
    with_eq, logs = generator_objective(fwd, inputs, cfg, schedule)
    without, _ = generator_objective(fwd, inputs, dataclasses.replace(cfg, eq_weight=0.0), schedule)
    eq = nll_loss(reconstruction_error(x_t, recon_t), gen.logvar)[0]
    assert torch.allclose(with_eq - without, eq) and torch.allclose(logs["train/eq"], eq)
    (with_eq - without).backward()
    grads = _grads(gen)
    assert _part(grads, "autoencoder.encoder.") > 0 and _part(grads, "autoencoder.decoder.") > 0
    assert all(p.grad is None for p in disc.parameters())


def test_vf_loss_matches_the_margin_formulas_on_hand_made_features():
    # two positions; latent vectors (1, 0), (0, 1); features (1, 0), (1, 0.1), as (B=1, D=2, h=1, w=2)
    z = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    f = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.1]]]])
    cos_f = 1 / math.sqrt(1.01)  # cos(f1, f2); the latents are orthogonal: cos(z1, z2) = 0
    margin_cos = (max(0, 1 - 0.5 - 1.0) + max(0, 1 - 0.5 - 0.1 / math.sqrt(1.01))) / 2  # cos(z_i, f_i): 1, 0.0995
    margin_distmat = (0 + 0 + 2 * max(0, abs(0 - cos_f) - 0.25)) / 4  # |Z - F| over the 2 x 2 pairs
    loss, logs = vf_loss(z, f, cos_margin=0.5, distmat_margin=0.25)
    assert logs["train/vf_cos"].item() == pytest.approx(margin_cos, rel=1e-6)
    assert logs["train/vf_distmat"].item() == pytest.approx(margin_distmat, rel=1e-6)
    assert loss.item() == pytest.approx(margin_cos + margin_distmat, rel=1e-6)
    assert vf_loss(f, f)[0].item() == 0  # aligned features cost nothing


def test_vf_loss_trains_the_encoder_and_projection_not_the_decoder():
    align = random_align(hidden_size=16, patch_size=4)
    gen = _tiny_generator(align_dim=align.dim)
    disc = PatchDiscriminator(base_channels=8, n_layers=2, norm="group")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, post, extras = gen(x)
    assert extras["align"].shape == (2, 16, 8, 8) and align(x, (8, 8)).shape == (2, 16, 8, 8)
    cfg = LossConfig(disc_start=10**9, align_weight=0.5)
    fwd, schedule = Forward(x, recon, post, extras), StepSchedule.at(0, cfg)
    inputs = gen.loss_inputs(disc, align=align)
    assert inputs.align_layer is gen.autoencoder.encoder.conv_out.weight  # the VF loss's adaptive weight is there
    with_vf, logs = generator_objective(fwd, inputs, cfg, schedule)
    without, _ = generator_objective(fwd, gen.loss_inputs(disc), cfg, schedule)
    assert logs["train/vf_weight"] > 0 and torch.allclose(with_vf - without, logs["train/vf_weight"] * logs["train/vf"])
    (with_vf - without).backward()
    grads = _grads(gen)
    assert _part(grads, "autoencoder.encoder.") > 0 and _part(grads, "align_proj.") > 0
    assert _part(grads, "autoencoder.decoder.") == 0 and _part(grads, "autoencoder.post_quant_conv.") == 0
    assert all(p.grad is None for p in align.parameters()) and all(p.grad is None for p in disc.parameters())


SHAPED = ["loss.eq_weight=1.0", "loss.eq_prob=0.5", "loss.latent_noise=0.1", "loss.channel_mask=0.5",
          "loss.align_weight=0.1", "loss.align=required"]  # fmt: skip


@pytest.mark.slow
def test_a_run_with_every_regularizer_resumes_exactly(tmp_path, monkeypatch):
    import training.train

    monkeypatch.setattr(training.train, "build_align", lambda mode, name: (random_align(16, 4), "random (test)"))

    def run(out, steps):
        return training.train.main(load_config(None, [*TINY, *SHAPED, f"out_dir={out}", f"train.max_steps={steps}"]))

    run(tmp_path / "straight", 6)
    run(tmp_path / "split", 3)
    summary = run(tmp_path / "split", 6)
    a = checkpoint_tensors(tmp_path / "straight" / "checkpoints" / "step_0000006")
    b = checkpoint_tensors(tmp_path / "split" / "checkpoints" / "step_0000006")
    assert a.keys() == b.keys() and "model/align_proj.weight" in a
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/eq" in r for r in rows) and all("train/vf" in r for r in rows)
    assert summary["align"] == "random (test)"
    # the projection is training state, not part of the exported autoencoder
    assert "align_proj.weight" not in dict(Autoencoder.from_pretrained(tmp_path / "split").named_parameters())
