"""Three behaviours whose breakage would leave every other test green (issue 33): the probe's held-out loss is
computed on held-out latents, `loss.perceptual_weight` scales the perceptual term, and the reconstruction losses
are formed in fp32 under bf16 autocast. Each test was seen failing with its bug put in by hand."""

import json

import pytest
import torch
from accelerate import Accelerator

import training.step
from eval import denoiser as dn
from eval.probe import load_latents
from kl_ae.bench.step import LocalAccelerator
from kl_ae.commands.cli import main as kl_ae
from kl_ae.common.lpips import LPIPS
from kl_autoencoder import Autoencoder
from training.config import LossConfig
from training.discriminator import PatchDiscriminator
from training.losses import kl_loss
from training.step import AutoencoderWithLoss, StepModules, StepSchedule, TrainStep, adamw

from .conftest import tiny


def _rows_in(rows: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """For each latent of `rows` (N, ...), whether it is exactly one of `pool` (M, ...). (N,)"""
    return (rows.flatten(1)[:, None] == pool.flatten(1)[None]).all(-1).any(-1)


def test_probe_heldout_loss_is_computed_on_the_heldout_latents(tmp_path, monkeypatch):
    """Spies on the function that computes the held-out loss (`eval.denoiser.heldout_loss`, as `train_denoiser`
    calls it) and records the latents it actually iterates: they must be the held-out split written to disk, none
    of them a training latent, and the reported loss must be what that function returned. Checking only where the
    split is made would miss a probe that splits correctly and then evaluates on `train`."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights: no FID
    monkeypatch.setattr(dn, "SAMPLE_STEPS", 1)  # the samples are not what this test is about
    torch.manual_seed(0)
    # measured factors in the config: the probe uses the stored latents as they are (no rescale of its own)
    model = Autoencoder(tiny("tiny", sample_size=32)).save_pretrained(
        tmp_path / "model", extra_config={"scaling_factor": 2.0, "shift_factor": 0.1}
    )
    evaluated, returned = [], []
    real_heldout_loss = dn.heldout_loss

    def spy(model, loader, scheduler, seed, accelerator):
        class Recording:  # the loss sees exactly the batches recorded here
            def __iter__(self):
                for index, x0 in loader:
                    evaluated.append(x0.detach().cpu().clone())
                    yield index, x0

        values = real_heldout_loss(model, Recording(), scheduler, seed, accelerator)
        returned.append(values)
        return values

    monkeypatch.setattr(dn, "heldout_loss", spy)
    out = tmp_path / "probe"
    args = ["probe", "--model", str(model), "--out", str(out), "--data", "sample", "--steps", "2", "--eval-every",
            "2", "--batch-size", "8", "--crops", "1", "--resolution", "32", "--resize", "32"]  # fmt: skip
    assert kl_ae(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    train, _ = load_latents(out / "latents" / "model_train")
    heldout, _ = load_latents(out / "latents" / "model_val")
    assert len(train) == 24 and len(heldout) == 4  # 12 / 2 sample photos, one crop and its mirror each
    assert len(returned) == 1, "one held-out evaluation (step 2 of 2) expected"
    seen = torch.cat(evaluated)
    leaked = int(_rows_in(seen, train).sum())
    assert leaked == 0, f"the held-out loss was computed on {leaked} training latents (of {len(seen)})"
    assert seen.shape == heldout.shape and torch.equal(seen, heldout), (
        f"the held-out loss was computed on {tuple(seen.shape)} latents that are not the held-out split "
        f"{tuple(heldout.shape)}"
    )
    assert metrics["heldout_loss"]["per_timestep"] == returned[-1]
    assert metrics["num_heldout_latents"] == 4


# ----------------------------------------------------------------------------- the perceptual weight


def _built(seed: int = 0):
    """A tiny autoencoder (fixed logvar 0), its discriminator and a random-backbone LPIPS (no weights needed
    offline), built from the same seed every time: each call gives identical modules."""
    torch.manual_seed(seed)
    model = AutoencoderWithLoss(Autoencoder(tiny("tiny", sample_size=32)), learn_logvar=False, logvar_init=0.0)
    disc = PatchDiscriminator(base_channels=8, n_layers=2, norm="group")
    lpips = LPIPS(net="alex", random_backbone=True)
    return model, disc, lpips


def _step(accelerator, model, disc, lpips, cfg: LossConfig) -> TrainStep:
    """The trainer's step over modules prepared by `accelerator`, as `training.train.prepare_step` builds it."""
    opt_g = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    opt_d = adamw(disc.parameters(), lr=1e-4)
    if isinstance(accelerator, Accelerator):
        model, disc, opt_g, opt_d = accelerator.prepare(model, disc, opt_g, opt_d)
    else:  # the bench's stand-in: prepare each piece
        model, disc = accelerator.prepare_module(model), accelerator.prepare_module(disc)
        opt_g, opt_d = accelerator.prepare_optimizer(opt_g), accelerator.prepare_optimizer(opt_d)
    return TrainStep(accelerator, StepModules(model, disc, opt_g, opt_d, lpips), cfg, grad_clip=1.0, fp16=False)


def test_perceptual_weight_scales_the_perceptual_term_in_the_real_step(monkeypatch):
    """Weights 0, 1 and 2 on the same batch, modules and posterior noise, through `TrainStep` with an Accelerator:
    the loss and the gradient at the decoder's last layer are affine in the weight, 0 gives exactly the loss
    without LPIPS, and the slope is the perceptual term itself (LPIPS summed over C, H, W, per image)."""
    grads = []
    real_guarded_step = training.step.guarded_step

    def record(accelerator, optimizer, parameters, clip, fp16):  # the gradient before clipping and the update
        grads.append(step_under_test.core.last_layer.grad.detach().clone())
        return real_guarded_step(accelerator, optimizer, parameters, clip, fp16)

    monkeypatch.setattr(training.step, "guarded_step", record)
    x = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(1)) * 2 - 1
    losses, lpips_logs = {}, {}
    for weight in (0.0, 1.0, 2.0, None):  # None: no LPIPS module at all (the loop's `loss.lpips=off`)
        model, disc, lpips = _built()
        cfg = LossConfig(perceptual_weight=weight or 0.0)
        step_under_test = _step(Accelerator(cpu=True), model, disc, None if weight is None else lpips, cfg)
        torch.manual_seed(2)  # the same posterior sample in every run
        result = step_under_test(x, None, StepSchedule(disc_factor=0.0))
        losses[weight] = result.g_logs["train/loss"].double().item()
        lpips_logs[weight] = result.g_logs.get("train/lpips")
    g = dict(zip((0.0, 1.0, 2.0, None), grads, strict=True))
    # the perceptual term: LPIPS (B,) added to each of the C*H*W errors of its image, summed, batch mean
    term = lpips_logs[1.0].double().item() * 3 * 32 * 32
    assert term > 1e-3 * losses[0.0], "the random LPIPS must give a visible term for this test to mean anything"
    assert losses[0.0] == pytest.approx(losses[None], rel=1e-6), "weight 0 must remove the perceptual term"
    torch.testing.assert_close(g[0.0], g[None], rtol=1e-5, atol=1e-8)
    d1, d2 = losses[1.0] - losses[0.0], losses[2.0] - losses[0.0]
    assert d1 == pytest.approx(term, rel=1e-4), f"weight 1 adds {d1:.6g} to the loss, the perceptual term is {term:.6g}"
    assert d2 == pytest.approx(2 * d1, rel=1e-4), f"weight 2 adds {d2:.6g}, not twice what weight 1 adds ({d1:.6g})"
    one, two = g[1.0] - g[0.0], g[2.0] - g[0.0]
    assert one.norm() > 1e-3 * g[0.0].norm(), "the perceptual term must reach the decoder's last layer"
    assert (two - 2 * one).norm() <= 1e-3 * two.norm(), (
        f"gradient: weight 2 moves the decoder's last layer by {two.norm():.4g}, weight 1 by {one.norm():.4g}"
    )


# ----------------------------------------------------------------------------- fp32 losses under autocast


class AutocastOnly(LocalAccelerator):
    """The bench's stand-in accelerator, minus accelerate's fp32 conversion of a prepared module's outputs: the
    reconstruction reaches the step in bf16, as from an engine that runs the whole model in bf16 (DeepSpeed's).
    The step promises fp32 losses by itself; with accelerate's conversion that promise would go untested."""

    def prepare_module(self, module: torch.nn.Module) -> torch.nn.Module:
        module.forward = torch.autocast(self.device.type, dtype=self.dtype)(module.forward)
        return module


@pytest.mark.parametrize("make", [lambda: Accelerator(cpu=True, mixed_precision="bf16"),
                                  lambda: AutocastOnly("bf16", "cpu")], ids=["accelerate", "bf16-outputs"])  # fmt: skip
def test_reconstruction_losses_are_fp32_under_bf16_autocast(monkeypatch, make):
    """Under bf16 autocast through `TrainStep`: the model's forward really runs in bf16, the reconstruction that
    reaches `reconstruction_error` and the error that reaches `nll_loss` are fp32, and the logged loss equals the
    fp32 computation on the same (bf16-produced) reconstruction. With accelerate the prepared forward already hands
    back fp32 outputs, so only the `bf16-outputs` variant fails when the step stops upcasting (seen: it does)."""
    seen = {}
    real_error, real_nll = training.step.reconstruction_error, training.step.nll_loss

    def error_spy(x, x_hat, kind="l1"):
        seen.setdefault("x_hat", x_hat.detach().clone())
        return real_error(x, x_hat, kind)

    def nll_spy(error, logvar, kind="l1", reduction="sum"):
        seen.setdefault("error", error.dtype)
        return real_nll(error, logvar, kind, reduction)

    def kl_spy(mean, logvar, *args, **kwargs):
        seen.setdefault("moments", (mean.detach().clone(), logvar.detach().clone()))
        return kl_loss(mean, logvar, *args, **kwargs)

    monkeypatch.setattr(training.step, "reconstruction_error", error_spy)
    monkeypatch.setattr(training.step, "nll_loss", nll_spy)
    monkeypatch.setattr(training.step, "kl_loss", kl_spy)
    model, disc, lpips = _built()
    decoder_out = set()  # proves autocast was on: the decoder's last convolution ran in bf16
    model.autoencoder.decoder.conv_out.register_forward_hook(lambda m, args, out: decoder_out.add(out.dtype))
    cfg = LossConfig(kl_weight=1e-2)  # the KL visible in the fp32 comparison below
    step = _step(make(), model, disc, lpips, cfg)
    x = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.manual_seed(2)
    result = step(x, None, StepSchedule(disc_factor=0.0))
    assert decoder_out == {torch.bfloat16}, f"the decoder ran in {decoder_out}, not under bf16 autocast"
    recon = seen["x_hat"]
    assert recon.dtype == torch.float32, f"the reconstruction reached reconstruction_error as {recon.dtype}"
    assert seen["error"] == torch.float32, f"the error reached nll_loss as {seen['error']}"
    # the reconstruction is bf16-valued (it came out of bf16 convolutions), only its type is fp32
    assert torch.equal(recon, recon.bfloat16().float())
    # the loss by hand (fp64, the KL fp32) on that reconstruction: L1 + LPIPS (logvar 0, per image) + kl_weight * KL
    with torch.no_grad():
        error = (x.double() - recon.double()).abs() + lpips(x, recon).double().view(-1, 1, 1, 1)
        kl = kl_loss(*(t.double() for t in seen["moments"]), "sum")[0]
        expected = (error.sum() / len(x) + cfg.kl_weight * kl).item()
    assert result.g_logs["train/loss"].dtype == torch.float32
    assert result.g_logs["train/loss"].item() == pytest.approx(expected, rel=1e-5)
