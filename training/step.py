"""One training step's pieces: the generator wrapper, both objectives, and the guarded optimizer step.

Kept apart from the loop in `train.py` so tests can drive exactly the code the trainer runs.
"""

from __future__ import annotations

import contextlib
import math

import torch
from accelerate import Accelerator
from torch import nn

from kl_autoencoder import Autoencoder, QuantizerOutput
from training.config import LossConfig
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


class Generator(nn.Module):
    """The autoencoder plus the decoder's output log-variance, trained together under one DDP wrapper.

    Keeping `logvar` inside the wrapped module means it sits in the optimizer and its gradient is
    all-reduced with the autoencoder's (LDM declares it and never optimizes it).
    """

    def __init__(self, autoencoder: Autoencoder, learn_logvar: bool, logvar_init: float):
        super().__init__()
        self.autoencoder = autoencoder
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)), requires_grad=learn_logvar)

    def forward(self, x: torch.Tensor):
        return self.autoencoder(x, sample_posterior=True, return_posterior=True)


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    """The autoencoder's loss: NLL(rec + perceptual) + beta * KL or the VQ loss (+ adaptive-weighted adversarial).

    The discriminator runs only once `disc_start` is reached, frozen, and outside DDP's gradient
    bookkeeping (`no_sync`), so its parameters get no gradient while the reconstruction does.
    Returns (loss, logs, disc_factor).
    """
    error = reconstruction_error(x, recon, cfg.rec_loss)
    logs = {f"train/{cfg.rec_loss}": error.detach().mean()}
    if lpips is not None:
        p_loss = lpips(x, recon)  # (B,)
        error = error + cfg.perceptual_weight * p_loss.view(-1, 1, 1, 1)
        logs["train/lpips"] = p_loss.detach().mean()
    nll, nll_logs = nll_loss(error, logvar, cfg.rec_loss, cfg.reduction)
    logs |= nll_logs
    if isinstance(posterior, QuantizerOutput):  # vq: the codebook + commitment loss takes the KL's place
        loss = nll + cfg.codebook_weight * posterior.loss
        logs |= posterior.logs
    else:
        kl, kl_logs = kl_loss(posterior.mean, posterior.logvar, cfg.reduction, cfg.free_bits, x[0].numel())
        loss = nll + cfg.kl_weight * kl_anneal(step, cfg.kl_anneal_steps) * kl
        logs |= kl_logs
    factor = disc_factor(step, cfg.disc_start, cfg.disc_ramp)
    if factor > 0:
        discriminator.requires_grad_(False)
        with no_sync():
            g_adv = generator_adv_loss(discriminator(recon), cfg.gan_loss)
        discriminator.requires_grad_(True)
        d_weight = adaptive_weight(nll, g_adv, last_layer) * cfg.disc_weight
        loss = loss + d_weight * factor * g_adv
        logs |= {"train/g_adv": g_adv.detach(), "train/d_weight": d_weight}
    logs["train/disc_factor"] = torch.tensor(factor)
    return loss, logs, factor


def discriminator_objective(
    x: torch.Tensor, recon: torch.Tensor, discriminator: nn.Module, cfg: LossConfig, factor: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The discriminator's loss on real images and the DETACHED reconstruction of the same forward."""
    loss, logs = discriminator_loss(discriminator(x), discriminator(recon.detach()), cfg.gan_loss)
    return factor * loss, logs


def guarded_step(
    accelerator: Accelerator, optimizer, parameters: list[torch.Tensor], clip: float, fp16: bool
) -> tuple[bool, torch.Tensor]:
    """Clip and step only if every gradient is finite; returns (stepped, grad_norm).

    A non-finite step leaves the weights and the optimizer state untouched (its gradients are
    dropped). Under fp16 the optimizer is still called so the GradScaler sees the overflow and
    lowers its scale (it skips the update itself). The check costs one host sync per step.
    """
    norm = accelerator.clip_grad_norm_(parameters, clip if clip > 0 else math.inf)
    finite = bool(torch.isfinite(norm))
    if finite or fp16:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return finite, norm


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
