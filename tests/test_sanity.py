"""The pPCA sanity check: closed form against the generating model, the linear VAE against the closed form."""

import torch

import training.sanity as sanity
from kl_ae.commands.cli import main as kl_ae


def test_closed_form_ppca_recovers_the_generating_model():
    cfg = sanity.SanityConfig(num_samples=20000)
    x = sanity.linear_gaussian_data(cfg)
    w_ml, sigma2 = sanity.ppca_ml(x, cfg.latent_dim)
    assert abs(sigma2 - cfg.noise_var) / cfg.noise_var < 0.05
    # the generating W, rebuilt from the same seed as linear_gaussian_data draws it
    gen = torch.Generator().manual_seed(cfg.seed)
    w_true = torch.randn(cfg.data_dim, cfg.latent_dim, generator=gen, dtype=torch.float64)
    assert sanity.principal_angles_deg(w_ml, w_true).max() < 2.0
    # W_ML W_ML^T + sigma^2 I is the ML covariance: it matches the sample covariance on the top-d subspace
    cov = torch.cov(x.T, correction=0)
    u = torch.linalg.qr(w_ml)[0]
    assert torch.allclose(u.T @ (w_ml @ w_ml.T + sigma2 * torch.eye(cfg.data_dim, dtype=torch.float64)) @ u,
                          u.T @ cov @ u, atol=1e-8)  # fmt: skip


def test_principal_angles():
    e = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(sanity.principal_angles_deg(e[:, :2], e[:, :2] @ torch.tensor([[2.0, 1], [0, 3]]).double()),
                          torch.zeros(2, dtype=torch.float64), atol=1e-6)  # fmt: skip
    tilted = torch.stack([e[:, 0], (e[:, 1] + e[:, 2]) / 2**0.5], dim=1)
    assert torch.allclose(sanity.principal_angles_deg(e[:, :2], tilted), torch.tensor([0.0, 45.0]).double(), atol=1e-6)


def test_linear_vae_with_our_losses_recovers_ppca():
    r = sanity.run_sanity()
    assert r["passed"]
    assert max(r["angles_deg"]) < 1.0 and r["sigma2_rel_error"] < 0.03  # far inside the 5 degree / 10% criteria
    # a lower bound on the learned model's log-likelihood, itself at most the ML one; nearly tight
    assert r["ppca_log_likelihood_nats"] - 0.5 < r["elbo_nats"] < r["ppca_log_likelihood_nats"] + 0.01


def test_sanity_cli_passes(capsys):
    assert kl_ae(["sanity"]) == 0
    out = capsys.readouterr().out
    assert "principal angles" in out and "sigma^2_ML" in out and "PASSED" in out


def test_sanity_fails_when_the_kl_is_weighted_wrong(monkeypatch, capsys):
    """beta = 2 instead of 1 (a doubled KL) moves the optimum: the check must notice and exit non-zero."""
    kl_loss = sanity.kl_loss
    monkeypatch.setattr(sanity, "kl_loss", lambda *a, **k: (2 * kl_loss(*a, **k)[0], {}))
    assert kl_ae(["sanity"]) == 1
    assert "FAILED" in capsys.readouterr().out
