"""The LDM first-stage losses as pure functions, each returning `(loss, logs)`.

Adapted from CompVis/latent-diffusion `ldm/modules/losses/contperceptual.py`, with its known
faults fixed: the learned output log-variance is a real parameter (the trainer optimizes it), the
adaptive weight is computed in fp32 on the gradients of the decoder's last layer, and the
non-saturating GAN loss has its arguments the right way round. `logs` hold detached tensors; the
trainer turns them into numbers only on logging steps, so no step waits on the device.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Logs = dict[str, Tensor]


def reconstruction_error(x: Tensor, x_hat: Tensor, kind: Literal["l1", "l2"] = "l1") -> Tensor:
    """Element-wise |x - x_hat| or (x - x_hat)^2, in fp32. (B, C, H, W)"""
    diff = x.float() - x_hat.float()
    if kind == "l1":
        return diff.abs()
    if kind == "l2":
        return diff.square()
    raise ValueError(f"unknown reconstruction loss {kind!r}; choose l1 or l2")


def nll_loss(
    error: Tensor,
    logvar: Tensor,
    kind: Literal["l1", "l2"] = "l1",
    reduction: Literal["sum", "mean"] = "sum",
) -> tuple[Tensor, Logs]:
    """Negative log-likelihood of the data under the decoder with output log-variance `logvar`.

    `error` is the per-element reconstruction error (perceptual term already added, as in LDM).
    l1 is the Laplace NLL  e / b + log b  with log b = logvar (exactly LDM's `rec / exp(logvar) + logvar`);
    l2 is the Gaussian NLL  0.5 e / sigma^2 + 0.5 log sigma^2. Constants are dropped. With a fixed
    logvar of 0 these are the plain reconstruction losses; `sum` reduces per image as LDM does.
    """
    logvar = logvar.float()
    if kind == "l1":
        nll = error / torch.exp(logvar) + logvar
    elif kind == "l2":
        nll = 0.5 * error / torch.exp(logvar) + 0.5 * logvar
    else:
        raise ValueError(f"unknown reconstruction loss {kind!r}; choose l1 or l2")
    loss = nll.sum() / nll.shape[0] if reduction == "sum" else nll.mean()
    return loss, {"train/nll": loss.detach(), "train/logvar": logvar.detach()}


def kl_loss(
    mean: Tensor,
    logvar: Tensor,
    reduction: Literal["sum", "mean"] = "sum",
    free_bits: float = 0.0,
    pixels_per_image: int | None = None,
) -> tuple[Tensor, Logs]:
    """KL(q(z|x) || N(0, I)) in closed form for a diagonal Gaussian posterior.

    `sum`: per-image sum over latent elements, batch mean (LDM, with kl_weight 1e-6).
    `mean`: mean per latent element. `free_bits` floors each channel's batch-mean KL (nats per
    element) so no channel is pushed all the way to the prior (Kingma et al. 2016).
    `pixels_per_image` (C*H*W of the input) gives the rate in bits per data dimension for the logs.
    """
    mean, logvar = mean.float(), logvar.clamp(-30.0, 20.0).float()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)  # (B, C, h, w), or (B, C, t, h, w) for clips
    positions = [d for d in range(kl.dim()) if d != 1]
    per_channel = kl.mean(dim=positions)  # (C,) nats per element
    if free_bits > 0:
        per_channel = per_channel.clamp(min=free_bits)
    spatial = kl[0, 0].numel()  # latent positions per image (per clip: t * h * w)
    loss = per_channel.sum() * spatial if reduction == "sum" else per_channel.mean()
    per_image = kl.detach().flatten(1).sum(1).mean()  # nats per image (clip), whatever the reduction
    logs = {"train/kl": per_image}
    if pixels_per_image:
        logs["train/kl_bits_per_dim"] = per_image / (pixels_per_image * math.log(2))
    return loss, logs


def kl_anneal(step: int, anneal_steps: int) -> float:
    """Beta warm-up factor: linear from 0 to 1 over `anneal_steps` (1 when off)."""
    return 1.0 if anneal_steps <= 0 else min(1.0, step / anneal_steps)


def generator_adv_loss(logits_fake: Tensor, kind: str = "hinge") -> Tensor:
    """The generator's adversarial loss on the discriminator's logits for reconstructions.

    hinge and vanilla use LDM's -mean(D(x_hat)); non_saturating is -log sigmoid(D(x_hat)),
    i.e. BCE against the "real" label (the form LlamaGen got with its arguments swapped).
    """
    logits_fake = logits_fake.float()
    if kind in ("hinge", "vanilla"):
        return -logits_fake.mean()
    if kind == "non_saturating":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"unknown gan loss {kind!r}; choose hinge, vanilla or non_saturating")


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor, kind: str = "hinge") -> tuple[Tensor, Logs]:
    """The discriminator's loss: hinge, or the logistic (vanilla / non-saturating) one."""
    logits_real, logits_fake = logits_real.float(), logits_fake.float()
    if kind == "hinge":
        loss = 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    elif kind in ("vanilla", "non_saturating"):
        loss = 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
    else:
        raise ValueError(f"unknown gan loss {kind!r}; choose hinge, vanilla or non_saturating")
    logs = {
        "train/d_loss": loss.detach(),
        "logits/real": logits_real.detach().mean(),
        "logits/fake": logits_fake.detach().mean(),
    }
    return loss, logs


def adaptive_weight(
    recon: Tensor, grad_nll: Tensor, grad_adv: Tensor, last_layer: Tensor, max_weight: float = 1e4
) -> Tensor:
    """LDM's balance ||d nll / dW|| / (||d g_loss / dW|| + 1e-4) on the decoder's last layer W, in fp32, detached.

    Takes the two losses' gradients with respect to the reconstruction (the output of the layer owning W):
    their gradients at W then need only that layer's weight backward, not a second pass through LPIPS and the
    discriminator as in LDM, which backpropagates each loss to W.
    """
    nll_grad = torch.autograd.grad(recon, last_layer, grad_nll, retain_graph=True)[0]
    g_grad = torch.autograd.grad(recon, last_layer, grad_adv, retain_graph=True)[0]
    weight = torch.linalg.vector_norm(nll_grad.float()) / (torch.linalg.vector_norm(g_grad.float()) + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def disc_factor(step: int, start: int, ramp: int = 0) -> float:
    """0 before `start`, then 1 (or a linear ramp from 0 to 1 over `ramp` steps)."""
    if step < start:
        return 0.0
    return 1.0 if ramp <= 0 else min(1.0, (step - start + 1) / ramp)


def vf_loss(z: Tensor, features: Tensor, cos_margin: float = 0.5, distmat_margin: float = 0.25) -> tuple[Tensor, Logs]:
    """VA-VAE's visual-foundation loss (Yao et al. 2025; hustvl/LightningDiT `vavae`), in fp32.

    z: the latent projected to the foundation model's width, features: its frozen patch features, both
    (B, D, h, w) on the same grid. Margin cosine similarity: mean over positions of relu(1 - m1 - cos(z_i, f_i));
    margin distance-matrix similarity: mean over pairs of positions of relu(|cos(z_i, z_j) - cos(f_i, f_j)| - m2),
    within each image. The margins leave the latent room for what reconstruction needs.
    """
    zn = F.normalize(z.float().flatten(2), dim=1)  # (B, D, N)
    fn = F.normalize(features.detach().float().flatten(2), dim=1)
    cos = F.relu(1.0 - cos_margin - (zn * fn).sum(1)).mean()
    distmat = F.relu((zn.transpose(1, 2) @ zn - fn.transpose(1, 2) @ fn).abs() - distmat_margin).mean()
    return cos + distmat, {"train/vf_cos": cos.detach(), "train/vf_distmat": distmat.detach()}


def gradient_ratio(main: Tensor, term: Tensor, layer: Tensor, max_weight: float = 1e8) -> Tensor:
    """||d main / d layer|| / (||d term / d layer|| + 1e-4), clamped and detached: an adaptive weight that puts
    `term` on the scale of `main` at `layer` (VA-VAE weighs its VF loss so, on the encoder's last layer)."""
    g_main = torch.autograd.grad(main, layer, retain_graph=True)[0]
    g_term = torch.autograd.grad(term, layer, retain_graph=True)[0]
    weight = torch.linalg.vector_norm(g_main.float()) / (torch.linalg.vector_norm(g_term.float()) + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
