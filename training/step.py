"""One training step's pieces: the generator wrapper, both objectives, and the guarded optimizer step.

Kept apart from the loop in `train.py` so tests can drive exactly the code the trainer runs.
"""

from __future__ import annotations

import contextlib
import math

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch import nn

from kl_ae.common.transforms import apply_pair
from kl_autoencoder import Autoencoder, QuantizerOutput
from training.config import LossConfig
from training.losses import (
    adaptive_weight,
    disc_factor,
    discriminator_loss,
    generator_adv_loss,
    gradient_ratio,
    kl_anneal,
    kl_loss,
    nll_loss,
    reconstruction_error,
    vf_loss,
)
from training.shaping import Shaping, shape_latent


class Generator(nn.Module):
    """The autoencoder plus what trains with it: the decoder's output log-variance and, with the VF loss, the
    projection of the latent to the foundation model's width. All under one DDP wrapper.

    Keeping `logvar` inside the wrapped module means it sits in the optimizer and its gradient is all-reduced
    with the autoencoder's (LDM declares it and never optimizes it). Every decoder call of a step, the shaped
    ones included, runs inside `forward`, so DDP sees them.
    """

    def __init__(self, autoencoder: Autoencoder, learn_logvar: bool, logvar_init: float, align_dim: int = 0):
        super().__init__()
        self.autoencoder = autoencoder
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)), requires_grad=learn_logvar)
        # VA-VAE's reverse projection: latent channels -> foundation feature width (not part of the export)
        self.align_proj = nn.Conv2d(autoencoder.config.latent_channels, align_dim, 1) if align_dim else None

    def forward(self, x: torch.Tensor, shaping: Shaping | None = None):
        """(reconstruction, posterior, extras): extras["eq"] = (T(x), decode(T(z))) on an EQ step, and
        extras["align"] = the projected latent when the VF loss is on."""
        ae = self.autoencoder
        z, posterior = ae.bottleneck(x, sample_posterior=True)
        extras = {}
        if self.align_proj is not None:
            extras["align"] = self.align_proj(z)
        if shaping is not None and shaping.transform is not None:
            x_t, z_t = apply_pair(shaping.transform, x, z, ae.config.downsample_factor, shaping.scale)
            extras["eq"] = (x_t, ae.decode(z_t))
        if shaping is not None and shaping.changes_latent:
            z = shape_latent(z, shaping)
        return ae.decode(z), posterior, extras


def generator_objective(
    x: torch.Tensor,
    recon: torch.Tensor,
    posterior,
    logvar: torch.Tensor,
    lpips: nn.Module | None,
    discriminator: nn.Module,
    last_layer: torch.Tensor,
    cfg: LossConfig,
    step: int,
    no_sync=contextlib.nullcontext,
    extras: dict | None = None,
    align: nn.Module | None = None,
    align_layer: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    """The autoencoder's loss: NLL(rec + perceptual) + beta * KL or the VQ loss (+ adaptive-weighted adversarial),
    + the latent-shaping terms of `extras` (`Generator.forward`): eq_weight * NLL of the transformed pair, and the
    VF loss against `align`'s features of x, adaptively weighted at `align_layer` (the encoder's last layer).

    The discriminator runs only once `disc_start` is reached, frozen, and outside DDP's gradient
    bookkeeping (`no_sync`), so its parameters get no gradient while the reconstruction does.
    Returns (loss to backpropagate, logs, disc_factor); with the adversarial term on, that loss is a surrogate
    with the objective's gradients (its value is in logs["train/loss"]).
    """
    recon = recon.float()  # fp32 losses, and fp32 gradients at the reconstruction (no fp16 underflow)
    error, logs = _error(x, recon, lpips, cfg)
    nll, nll_logs = nll_loss(error, logvar, cfg.rec_loss, cfg.reduction)
    logs |= nll_logs
    if isinstance(posterior, QuantizerOutput):  # vq: the codebook + commitment loss takes the KL's place
        rest = cfg.codebook_weight * posterior.loss
        logs |= posterior.logs
    else:
        kl, kl_logs = kl_loss(posterior.mean, posterior.logvar, cfg.reduction, cfg.free_bits, x[0].numel())
        rest = cfg.kl_weight * kl_anneal(step, cfg.kl_anneal_steps) * kl
        logs |= kl_logs
    extras = extras or {}
    if "eq" in extras:  # EQ-VAE: the transformed latent must decode to the transformed image
        x_t, recon_t = extras["eq"]
        eq, _ = nll_loss(_error(x_t, recon_t.float(), lpips, cfg)[0], logvar, cfg.rec_loss, cfg.reduction)
        rest = rest + cfg.eq_weight * eq
        logs["train/eq"] = eq.detach()
    if "align" in extras and align is not None:  # VA-VAE: the latent's structure follows the foundation model's
        vf, vf_logs = vf_loss(extras["align"], align(x, extras["align"].shape[2:]))
        vf_weight = gradient_ratio(nll, vf, align_layer) * cfg.align_weight
        rest = rest + vf_weight * vf
        logs |= vf_logs | {"train/vf": vf.detach(), "train/vf_weight": vf_weight}
    loss = nll + rest
    factor = disc_factor(step, cfg.disc_start, cfg.disc_ramp)
    if factor > 0:
        discriminator.requires_grad_(False)
        with no_sync():
            g_adv = generator_adv_loss(discriminator(recon), cfg.gan_loss)
        discriminator.requires_grad_(True)
        # LDM's adaptive weight, with LPIPS and the discriminator differentiated once each (see below)
        grad_nll, grad_adv = (torch.autograd.grad(t, recon, retain_graph=True)[0] for t in (nll, g_adv))
        d_weight = adaptive_weight(recon, grad_nll, grad_adv, last_layer) * cfg.disc_weight
        logs |= {"train/g_adv": g_adv.detach(), "train/d_weight": d_weight}
        logs["train/loss"] = (loss + d_weight * factor * g_adv).detach()
        # the same gradients as loss + d_weight * factor * g_adv: d/d(recon) is handed to the decoder directly
        # (LDM backpropagates that loss again through LPIPS and the discriminator, so each runs backward twice)
        grad = grad_nll + (d_weight * factor).to(grad_nll.dtype) * grad_adv
        loss = (recon * grad).sum() + rest
        if logvar.requires_grad:  # nll's other input: the learned log-variance
            loss = loss + nll_loss(error.detach(), logvar, cfg.rec_loss, cfg.reduction)[0]
        return loss, logs, factor
    logs["train/loss"] = loss.detach()
    return loss, logs, factor


def _error(x: torch.Tensor, recon: torch.Tensor, lpips, cfg: LossConfig) -> tuple[torch.Tensor, dict]:
    """The per-element reconstruction error with the perceptual term added (LDM's `rec_loss`), and its logs."""
    error = reconstruction_error(x, recon, cfg.rec_loss)
    logs = {f"train/{cfg.rec_loss}": error.detach().mean()}
    if lpips is not None:
        p_loss = lpips(x, recon)  # (B,)
        error = error + cfg.perceptual_weight * p_loss.view(-1, 1, 1, 1)
        logs["train/lpips"] = p_loss.detach().mean()
    return error, logs


def discriminator_objective(
    x: torch.Tensor, recon: torch.Tensor, discriminator: nn.Module, cfg: LossConfig, factor: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The discriminator's loss on real images and the DETACHED reconstruction of the same forward."""
    loss, logs = discriminator_loss(discriminator(x), discriminator(recon.detach()), cfg.gan_loss)
    return factor * loss, logs


def adamw(parameters, lr: float, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused kernel: one pass over all tensors (~3x faster than the default on a CPU), and it can
    cancel a step on the device (`found_inf`), which lets `guarded_step` skip non-finite steps without a sync."""
    return torch.optim.AdamW(parameters, lr=lr, fused=True, **kwargs)


def guarded_step(
    accelerator: Accelerator, optimizer, parameters: list[torch.Tensor], clip: float, fp16: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip and step only if every gradient is finite; returns (finite: 0-dim bool tensor, grad_norm).

    A non-finite step leaves the weights and the optimizer state untouched (its gradients are dropped).
    With a fused optimizer (`adamw`) the decision stays on the device: the optimizer reads `found_inf` and
    skips the update itself, so the step needs no host synchronisation. Under fp16 the GradScaler owns
    `found_inf` (an overflow lowers its scale and skips the update). Other optimizers cost one sync.
    """
    norm = accelerator.clip_grad_norm_(parameters, clip if clip > 0 else math.inf)
    finite = torch.isfinite(norm)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    if fp16:
        optimizer.step()
    elif all(group.get("fused") for group in inner.param_groups):
        inner.found_inf = (~finite).float()
        optimizer.step()
    elif finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return finite, norm


class NonFiniteGuard:
    """Counts skipped (non-finite) steps on the device; the host reads the counts only in `check`."""

    def __init__(self, device: torch.device):
        self.new = torch.zeros((), dtype=torch.long, device=device)  # skipped since the last check
        self.streak = torch.zeros_like(self.new)  # skipped in a row, up to now
        self.longest = torch.zeros_like(self.new)  # longest streak since the last check

    def update(self, ok: torch.Tensor) -> None:
        bad = (~ok).long()
        self.new.add_(bad)
        self.streak.mul_(bad).add_(bad)
        torch.maximum(self.longest, self.streak, out=self.longest)

    def check(self) -> tuple[int, int]:
        """(steps skipped since the last check, longest streak of skipped steps since then): one host sync."""
        new, longest = torch.stack([self.new, self.longest]).tolist()
        self.new.zero_()
        self.longest.copy_(self.streak)
        return new, longest


class GuardedEMA(EMAModel):
    """diffusers' EMAModel with a device-side skip: `step(parameters, keep)` leaves the average unchanged where
    `keep` (0-dim bool tensor) is False, without a host sync; one fused lerp over all tensors (~2x faster)."""

    @torch.no_grad()
    def step(self, parameters, keep: torch.Tensor | None = None) -> None:
        parameters = list(parameters)
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        trained = [(s, p) for s, p in zip(self.shadow_params, parameters) if p.requires_grad]
        frozen = [(s, p) for s, p in zip(self.shadow_params, parameters) if not p.requires_grad]
        if frozen:
            torch._foreach_copy_(*map(list, zip(*frozen)))
        if trained:
            weight = torch.full((), 1 - decay, device=trained[0][1].device)
            if keep is not None:
                weight = weight * keep
            torch._foreach_lerp_(*map(list, zip(*trained)), weight)


@torch.no_grad()
def replicas_identical(accelerator: Accelerator, *modules: nn.Module) -> bool:
    """True when every process holds the same weights: per-tensor fingerprints gathered and compared.

    Cheap enough to run at the end of every run; it catches the failure of the reference scripts,
    whose forwards bypassed DDP so each process trained its own model.
    """
    if accelerator.num_processes == 1:
        return True
    gen = torch.Generator().manual_seed(0)
    prints = []
    for module in modules:
        for p in module.parameters():
            flat = p.detach().double().flatten().cpu()
            prints.append(
                torch.stack(
                    [flat.sum(), flat.abs().sum(), flat @ torch.rand(flat.numel(), generator=gen, dtype=torch.float64)]
                )
            )
    mine = torch.stack(prints).to(accelerator.device)
    everyone = accelerator.gather(mine[None])  # (P, n, 3)
    return bool((everyone == everyone[0:1]).all())
