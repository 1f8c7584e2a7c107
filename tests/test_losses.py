"""The loss stack: closed forms, the adaptive weight, and where each gradient goes."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kl_ae.common.lpips import LPIPS
from kl_autoencoder import PRESETS, Autoencoder
from training.config import LossConfig
from training.discriminator import PatchDiscriminator
from training.losses import (
    adaptive_weight,
    disc_factor,
    discriminator_loss,
    generator_adv_loss,
    kl_anneal,
    kl_loss,
    nll_loss,
    reconstruction_error,
)
from training.step import AutoencoderWithLoss, Forward, StepSchedule, discriminator_objective, generator_objective

LOGITS_REAL = torch.tensor([[2.0, -0.5], [0.3, 1.5]])
LOGITS_FAKE = torch.tensor([[-1.5, 0.2], [0.9, -3.0]])


def sigmoid_log(x):
    return torch.log(torch.sigmoid(x))


def objective(gen, x, out, disc, lpips, cfg, step):
    """The generator objective of `gen`'s forward `out` on x at `step`, with the schedule the loop gives it."""
    fwd = Forward(x, *out)
    return generator_objective(fwd, gen.loss_inputs(disc, lpips), cfg, StepSchedule.at(step, cfg))


def test_hinge_losses_closed_form():
    d, logs = discriminator_loss(LOGITS_REAL, LOGITS_FAKE, "hinge")
    expected = 0.5 * (torch.clamp(1 - LOGITS_REAL, min=0).mean() + torch.clamp(1 + LOGITS_FAKE, min=0).mean())
    assert torch.allclose(d, expected)
    assert torch.allclose(generator_adv_loss(LOGITS_FAKE, "hinge"), -LOGITS_FAKE.mean())
    assert torch.allclose(logs["logits/real"], LOGITS_REAL.mean())
    assert torch.allclose(logs["logits/fake"], LOGITS_FAKE.mean())


@pytest.mark.parametrize("kind", ["vanilla", "non_saturating"])
def test_logistic_discriminator_loss_closed_form(kind):
    d, _ = discriminator_loss(LOGITS_REAL, LOGITS_FAKE, kind)
    # -log D(x) - log(1 - D(x_hat)), halved as in LDM
    expected = 0.5 * (-sigmoid_log(LOGITS_REAL).mean() - torch.log(1 - torch.sigmoid(LOGITS_FAKE)).mean())
    assert torch.allclose(d, expected, atol=1e-6)


def test_generator_losses_closed_form():
    # vanilla keeps LDM's -mean(D(x_hat)); non-saturating is -log D(x_hat) = BCE(logits, 1)
    assert torch.allclose(generator_adv_loss(LOGITS_FAKE, "vanilla"), -LOGITS_FAKE.mean())
    ns = generator_adv_loss(LOGITS_FAKE, "non_saturating")
    assert torch.allclose(ns, -sigmoid_log(LOGITS_FAKE).mean(), atol=1e-6)
    assert torch.allclose(ns, F.binary_cross_entropy_with_logits(LOGITS_FAKE, torch.ones_like(LOGITS_FAKE)))
    with pytest.raises(ValueError, match="unknown gan loss"):
        generator_adv_loss(LOGITS_FAKE, "wgan")


def test_nll_forms():
    error = torch.rand(2, 3, 4, 4)
    logvar = torch.tensor(0.7)
    l1, logs = nll_loss(error, logvar, "l1", "sum")
    assert torch.allclose(l1, (error / logvar.exp() + logvar).sum() / 2)
    l2, _ = nll_loss(error, logvar, "l2", "mean")
    assert torch.allclose(l2, (0.5 * error / logvar.exp() + 0.5 * logvar).mean())
    assert logs["train/logvar"] == pytest.approx(0.7)
    # with logvar 0 the NLL is the plain reconstruction loss
    x, y = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    plain, _ = nll_loss(reconstruction_error(x, y, "l1"), torch.tensor(0.0), "l1", "mean")
    assert torch.allclose(plain, F.l1_loss(x, y))


def test_kl_reductions_and_free_bits():
    mean, logvar = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    per_elem = 0.5 * (mean**2 + logvar.exp() - 1 - logvar)
    s, logs = kl_loss(mean, logvar, "sum", pixels_per_image=3 * 40 * 40)
    assert torch.allclose(s, per_elem.sum() / 3, rtol=1e-5)
    m, _ = kl_loss(mean, logvar, "mean")
    assert torch.allclose(m, per_elem.mean(), rtol=1e-5)
    assert torch.allclose(
        logs["train/kl_bits_per_dim"], per_elem.sum() / 3 / (3 * 40 * 40 * torch.log(torch.tensor(2.0)))
    )
    # a channel at the prior costs nothing without free bits, and exactly the floor with them
    zero = torch.zeros(2, 2, 3, 3)
    assert kl_loss(zero, zero, "mean")[0] == 0
    floored, _ = kl_loss(zero, zero, "mean", free_bits=0.25)
    assert floored.item() == pytest.approx(0.25)


def test_schedules():
    assert [disc_factor(s, 10) for s in (0, 9, 10, 11)] == [0.0, 0.0, 1.0, 1.0]
    assert [disc_factor(s, 10, ramp=4) for s in (9, 10, 11, 13, 20)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert [kl_anneal(s, 0) for s in (0, 5)] == [1.0, 1.0]
    assert [kl_anneal(s, 10) for s in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]


def test_adaptive_weight_equals_ldm_computation():
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(3, 3, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    out = layer(x)
    nll = (out - x).abs().sum()
    g = -(out**2).mean()
    grad_nll, grad_g = (torch.autograd.grad(t, out, retain_graph=True)[0] for t in (nll, g))
    w = adaptive_weight(out, grad_nll, grad_g, layer.weight)
    # LDM: each loss backpropagated to the last layer's weight
    g1 = torch.autograd.grad(nll, layer.weight, retain_graph=True)[0]
    g2 = torch.autograd.grad(g, layer.weight, retain_graph=True)[0]
    assert torch.allclose(w, g1.norm() / (g2.norm() + 1e-4))
    assert not w.requires_grad
    assert adaptive_weight(out, grad_nll, 1e-12 * grad_g, layer.weight).item() == pytest.approx(1e4)  # clamped


# ----------------------------------------------------------------------------- gradient flow through the step


@pytest.fixture
def parts():
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], base_channels=8, norm_num_groups=4)
    gen = AutoencoderWithLoss(Autoencoder(cfg), learn_logvar=True, logvar_init=0.0)
    disc = PatchDiscriminator(base_channels=8, n_layers=2, norm="group")
    lpips = LPIPS(net="alex", random_backbone=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loss_cfg = LossConfig(disc_start=0, disc_ramp=0, kl_weight=1e-6)
    return gen, disc, lpips, x, loss_cfg


def _decoder_grad(gen):
    return torch.cat([p.grad.flatten() for p in gen.autoencoder.decoder.parameters() if p.grad is not None])


def test_perceptual_and_adversarial_terms_reach_the_decoder(parts):
    gen, disc, lpips, x, loss_cfg = parts
    out = gen(x)
    recon = out[0]
    # each term alone: perceptual only (no L1, no D), then adversarial only
    p_cfg = dataclasses.replace(loss_cfg, disc_start=10**9)
    error = lpips(x, recon).sum()
    error.backward(retain_graph=True)
    assert _decoder_grad(gen).abs().sum() > 0
    gen.zero_grad()
    loss, logs = objective(gen, x, out, disc, lpips, loss_cfg, step=0)
    assert StepSchedule.at(0, loss_cfg).disc_factor == 1.0 and "train/g_adv" in logs and logs["train/d_weight"] > 0
    adv = generator_adv_loss(disc(recon), loss_cfg.gan_loss)
    grads = torch.autograd.grad(adv, list(gen.autoencoder.decoder.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    # the perceptual term is in the objective: it changes when LPIPS is dropped
    no_p, _ = objective(gen, x, out, disc, None, p_cfg, 0)
    with_p, _ = objective(gen, x, out, disc, lpips, p_cfg, 0)
    assert with_p > no_p


def test_generator_update_leaves_discriminator_alone(parts):
    gen, disc, lpips, x, loss_cfg = parts
    loss, _ = objective(gen, x, gen(x), disc, lpips, loss_cfg, 0)
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())  # unfrozen again for its own update
    assert _decoder_grad(gen).abs().sum() > 0


def test_discriminator_update_leaves_autoencoder_gradients_untouched(parts):
    gen, disc, lpips, x, loss_cfg = parts
    out = gen(x)
    recon = out[0]
    loss, _ = objective(gen, x, out, disc, lpips, loss_cfg, 0)
    loss.backward()
    before = {n: p.grad.clone() for n, p in gen.named_parameters() if p.grad is not None}
    d_loss, logs = discriminator_objective(x, recon, disc, loss_cfg, factor=1.0)
    d_loss.backward()
    after = {n: p.grad for n, p in gen.named_parameters() if p.grad is not None}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(p.grad is not None for p in disc.parameters())
    assert set(logs) == {"train/d_loss", "logits/real", "logits/fake"}


def test_learned_logvar_gets_gradient_and_moves(parts):
    gen, disc, lpips, x, loss_cfg = parts
    cfg = dataclasses.replace(loss_cfg, disc_start=10**9)
    opt = torch.optim.AdamW([p for p in gen.parameters() if p.requires_grad], lr=1e-2)
    assert any(p is gen.logvar for g in opt.param_groups for p in g["params"])
    start = gen.logvar.item()
    for _ in range(3):
        loss, logs = objective(gen, x, gen(x), disc, None, cfg, 0)
        loss.backward()
        assert gen.logvar.grad is not None and gen.logvar.grad != 0
        opt.step()
        opt.zero_grad()
    assert gen.logvar.item() != start
    # and it is a fixed buffer-like parameter when not learned
    assert not AutoencoderWithLoss(gen.autoencoder, learn_logvar=False, logvar_init=0.0).logvar.requires_grad


def test_no_discriminator_before_disc_start(parts):
    gen, disc, lpips, x, loss_cfg = parts
    calls = []
    disc.register_forward_hook(lambda *a: calls.append(1))
    cfg = dataclasses.replace(loss_cfg, disc_start=5)
    out = gen(x)
    _, logs = objective(gen, x, out, disc, None, cfg, 4)
    assert StepSchedule.at(4, cfg).disc_factor == 0.0 and not calls and "train/g_adv" not in logs
    objective(gen, x, out, disc, None, cfg, 5)
    assert calls


@pytest.mark.parametrize("vq", [False, True], ids=["kl", "vq"])
def test_adversarial_objective_has_the_gradients_of_ldm_loss(parts, vq):
    """The objective hands d loss / d recon to the decoder instead of backpropagating through LPIPS and D twice:
    every parameter gradient (encoder, decoder, learned logvar) must equal that of LDM's loss, written out."""
    gen, disc, lpips, x, loss_cfg = parts
    if vq:
        torch.manual_seed(0)
        gen = AutoencoderWithLoss(Autoencoder(dataclasses.replace(PRESETS["tiny-vq"], base_channels=8,
                                  norm_num_groups=4)), learn_logvar=True, logvar_init=0.0)  # fmt: skip
        gen.autoencoder.quantize.embedding.weight.requires_grad_(True)
    cfg = dataclasses.replace(loss_cfg, disc_ramp=4, disc_weight=0.7, codebook_weight=1.0)
    gen.train()
    torch.manual_seed(1)
    out = gen(x)
    recon, post, _ = out
    last = gen.autoencoder.last_layer
    loss, logs = objective(gen, x, out, disc, lpips, cfg, 1)
    factor = StepSchedule.at(1, cfg).disc_factor
    assert 0 < factor < 1
    params = [p for p in gen.parameters() if p.requires_grad]
    ours = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    # LDM's way, on the same forward
    error = (x - recon).abs() + lpips(x, recon).view(-1, 1, 1, 1)
    nll = nll_loss(error, gen.logvar, "l1", "sum")[0]
    rest = post.loss if vq else 1e-6 * kl_loss(post.mean, post.logvar, "sum")[0]
    g_adv = generator_adv_loss(disc(recon), cfg.gan_loss)
    g1, g2 = (torch.autograd.grad(t, last, retain_graph=True)[0] for t in (nll, g_adv))
    d_weight = (g1.norm() / (g2.norm() + 1e-4)).clamp(0, 1e4).detach() * cfg.disc_weight
    reference = nll + rest + d_weight * factor * g_adv
    theirs = torch.autograd.grad(reference, params, allow_unused=True)
    assert logs["train/loss"].item() == pytest.approx(reference.item(), rel=1e-5)
    assert logs["train/d_weight"].item() == pytest.approx(d_weight.item(), rel=1e-5)
    assert all((a is None) == (b is None) for a, b in zip(ours, theirs, strict=True))
    a = torch.cat([g.flatten() for g in ours if g is not None])
    b = torch.cat([g.flatten() for g in theirs if g is not None])
    assert a.numel() >= 0.9 * sum(p.numel() for p in params)  # encoder, decoder, logvar (not an EMA codebook)
    # equal up to fp32 summation order (biases before a GroupNorm have a gradient of ~0 plus rounding)
    assert (a - b).norm() <= 1e-5 * b.norm() and (a - b).abs().max() <= 1e-5 * b.abs().max()


@pytest.mark.parametrize("disc_factor", [0.0, 0.5], ids=["no-gan", "gan"])
def test_the_kl_term_pulls_the_posterior_towards_the_prior(parts, disc_factor):
    """The objective's KL term is +kl_weight x KL: its gradient at the encoder's moments is KL's own (a step
    against it lowers the KL), and it adds kl_weight x KL to the logged loss. At a weight where it shows (the
    LDM-equality test above runs at 1e-6, below its tolerance), with and without the adversarial term."""
    gen, disc, lpips, x, loss_cfg = parts
    out = gen(x)
    post = out[1]
    schedule = StepSchedule(disc_factor=disc_factor)

    def at_moments(kl_weight):
        cfg = dataclasses.replace(loss_cfg, kl_weight=kl_weight)
        loss, logs = generator_objective(Forward(x, *out), gen.loss_inputs(disc, lpips), cfg, schedule)
        return torch.autograd.grad(loss, post.moments, retain_graph=True)[0], logs["train/loss"]

    weight = 100.0  # the KL's part of the gradient well above the rest's rounding
    (with_kl, loss_1), (without, loss_0) = at_moments(weight), at_moments(0.0)
    kl = kl_loss(post.mean, post.logvar, "sum")[0]
    kl_grad = weight * torch.autograd.grad(kl, post.moments, retain_graph=True)[0]
    assert kl_grad.abs().max() > without.abs().max()
    assert (with_kl - without - kl_grad).abs().max() <= 1e-4 * kl_grad.abs().max()
    assert (loss_1 - loss_0).item() == pytest.approx(weight * kl.item(), rel=1e-4)
