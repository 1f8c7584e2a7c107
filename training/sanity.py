"""The pPCA sanity check: a linear VAE trained with OUR loss functions must recover probabilistic PCA.

With a linear encoder and decoder and isotropic Gaussian decoder noise, the ELBO's optimum is the pPCA
maximum-likelihood solution (Tipping & Bishop 1999; Lucas et al. 2019, "Don't blame the ELBO"): the
decoder's columns span the top-d principal subspace and the learned sigma_x^2 is the mean of the
discarded eigenvalues of the sample covariance. Training goes through `training.losses.nll_loss` (l2,
learned scalar logvar) and `training.losses.kl_loss` with beta = 1, so a wrong factor or sign there
shows up here as a wrong noise variance or subspace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from training.losses import kl_loss, nll_loss


@dataclass
class SanityConfig:
    num_samples: int = 2000
    data_dim: int = 10  # D
    latent_dim: int = 3  # d
    noise_var: float = 0.1  # variance of the isotropic noise in the generating model
    steps: int = 1500  # full-batch Adam steps
    lr: float = 0.05
    seed: int = 0
    max_angle_deg: float = 5.0  # pass: every principal angle between the subspaces below this
    max_var_rel_error: float = 0.10  # pass: |exp(logvar) - sigma^2_ML| / sigma^2_ML below this


def linear_gaussian_data(cfg: SanityConfig) -> Tensor:
    """x = W z + mu + eps, z ~ N(0, I_d), eps ~ N(0, noise_var I_D), with a random W of well-separated scales."""
    gen = torch.Generator().manual_seed(cfg.seed)
    w = torch.randn(cfg.data_dim, cfg.latent_dim, generator=gen, dtype=torch.float64)
    w = w * torch.linspace(2.0, 1.0, cfg.latent_dim, dtype=torch.float64)  # distinct principal variances
    mu = torch.randn(cfg.data_dim, generator=gen, dtype=torch.float64)
    z = torch.randn(cfg.num_samples, cfg.latent_dim, generator=gen, dtype=torch.float64)
    eps = torch.randn(cfg.num_samples, cfg.data_dim, generator=gen, dtype=torch.float64)
    return z @ w.T + mu + math.sqrt(cfg.noise_var) * eps  # (N, D)


def ppca_ml(x: Tensor, d: int) -> tuple[Tensor, float]:
    """Closed-form pPCA maximum likelihood (Tipping & Bishop 1999): (W_ML (D, d), sigma^2_ML).

    From the eigendecomposition of the sample covariance S (1/N): sigma^2 is the mean of the D - d
    discarded eigenvalues and W_ML = U_d (Lambda_d - sigma^2 I)^(1/2) (up to a rotation).
    """
    xc = x.double() - x.double().mean(0)
    s = xc.T @ xc / len(x)  # (D, D)
    eigvals, eigvecs = torch.linalg.eigh(s)  # ascending
    eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
    sigma2 = float(eigvals[d:].mean())
    return eigvecs[:, :d] * (eigvals[:d] - sigma2).sqrt(), sigma2


def principal_angles_deg(a: Tensor, b: Tensor) -> Tensor:
    """Principal angles (degrees, ascending) between the column spaces of a (D, k) and b (D, k)."""
    qa, qb = torch.linalg.qr(a.double())[0], torch.linalg.qr(b.double())[0]
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cosines))  # cosines come sorted descending


class LinearVAE(nn.Module):
    """Linear encoder x -> (mean, logvar) of q(z|x), linear decoder z -> x, and a learned scalar log sigma_x^2."""

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__()
        self.encoder = nn.Linear(data_dim, 2 * latent_dim)
        self.decoder = nn.Linear(latent_dim, data_dim)
        self.logvar = nn.Parameter(torch.zeros(()))

    def loss(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Negative ELBO per sample (up to 0.5 D log 2 pi): Gaussian NLL + KL, beta = 1, with our loss functions."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        error = (x - self.decoder(z)).square()  # (N, D)
        nll, _ = nll_loss(error, self.logvar, kind="l2", reduction="sum")
        # kl_loss expects a latent image (B, C, h, w): a vector latent is C channels at one position
        kl, _ = kl_loss(mean[..., None, None], logvar[..., None, None], reduction="sum")
        return nll + kl


def train_linear_vae(x: Tensor, cfg: SanityConfig) -> LinearVAE:
    """Full-batch Adam on the negative ELBO, the learning rate decayed so the final iterate settles."""
    torch.manual_seed(cfg.seed)
    model = LinearVAE(cfg.data_dim, cfg.latent_dim).double()
    with torch.no_grad():
        model.decoder.bias.copy_(x.mean(0))  # start at the data mean; the rest is learned
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    for _ in range(cfg.steps):
        loss = model.loss(x, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model


def ppca_log_likelihood(x: Tensor, w: Tensor, sigma2: float) -> float:
    """Mean log p(x) in nats under pPCA: x ~ N(mean of x, W W^T + sigma^2 I)."""
    x = x.double()
    cov = w @ w.T + sigma2 * torch.eye(len(w), dtype=torch.float64)
    return float(torch.distributions.MultivariateNormal(x.mean(0), cov).log_prob(x).mean())


@torch.no_grad()
def elbo(model: LinearVAE, x: Tensor, draws: int = 16, seed: int = 0) -> float:
    """Mean ELBO in nats (Monte Carlo over `draws` posterior samples), constants included."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum(float(model.loss(x, gen)) for _ in range(draws)) / draws
    return -loss - 0.5 * x.shape[1] * math.log(2 * math.pi)


def run_sanity(cfg: SanityConfig | None = None) -> dict:
    """Train the linear VAE, compare with closed-form pPCA; the dict says what was measured and whether it passed."""
    cfg = cfg or SanityConfig()
    x = linear_gaussian_data(cfg)
    w_ml, sigma2_ml = ppca_ml(x, cfg.latent_dim)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (2000, 10) matmuls: extra threads only synchronise (3x slower on 2 busy cores)
    try:
        model = train_linear_vae(x, cfg)
    finally:
        torch.set_num_threads(threads)
    angles = principal_angles_deg(model.decoder.weight.detach(), w_ml)
    sigma2_vae = float(model.logvar.detach().exp())
    rel = abs(sigma2_vae - sigma2_ml) / sigma2_ml
    return {
        "angles_deg": angles.tolist(),
        "sigma2_vae": sigma2_vae,
        "sigma2_ml": sigma2_ml,
        "sigma2_true": cfg.noise_var,
        "sigma2_rel_error": rel,
        # at the optimum the true posterior is diagonal and the bound tight; the last step there, making the
        # decoder's columns orthogonal, is a slow flat direction, so a small gap remains (not a pass criterion)
        "elbo_nats": elbo(model, x),
        "ppca_log_likelihood_nats": ppca_log_likelihood(x, w_ml, sigma2_ml),
        "passed": bool(angles.max() < cfg.max_angle_deg and rel < cfg.max_var_rel_error),
        "config": cfg.__dict__.copy(),
    }
