"""The probe's report: the sample grid, the loss plots and `report.html`, in the style of `kl-ae eval`'s report.

Every function takes plain numbers and tensors and writes one file; `eval/probe.py` decides what goes in.
"""

from __future__ import annotations

import html
from pathlib import Path

import torch
from torch import Tensor

from eval import report


def save_samples(reference: Tensor, samples: Tensor, path: Path, per_row: int = 8) -> None:
    """First row: held-out latents decoded (what the autoencoder can show); then the samples. (n, 3, s, s) in [0, 1]"""
    report.save_grid(torch.cat([reference[:per_row], samples]), per_row, path)


def save_curves(results: dict[str, dict], path: Path) -> None:
    """Held-out denoising loss (mean over the timestep grid) against training step, one line per model."""
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, r in results.items():
        ax.plot([p["step"] for p in r["curve"]], [p["mean"] for p in r["curve"]], "o-", ms=3, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out loss (MSE / element)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_per_timestep(results: dict[str, dict], timesteps: list[int], baseline: list[float], path: Path) -> None:
    """Final held-out loss per timestep against the Gaussian baseline abar_t (left) and their ratio (right)."""
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(timesteps, baseline, "k--", lw=1, label="N(0, I) data: abar_t")
    for name, r in results.items():
        h = r["heldout_loss"]
        axes[0].plot(timesteps, h["per_timestep"], "o-", ms=3, label=name)
        axes[1].plot(timesteps, h["ratio_to_gaussian"], "o-", ms=3, label=name)
    axes[1].axhline(1.0, color="k", ls="--", lw=1)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("held-out loss (MSE / element)")
    axes[1].set_ylabel("loss / abar_t")
    for ax in axes:
        ax.set_xlabel("timestep t")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


ROWS = [  # (label, path into a model's results)
    ("held-out loss, mean over the grid", ("heldout_loss", "mean")),
    ("held-out loss / Gaussian baseline, mean", ("heldout_loss", "mean_ratio")),
    ("FID of decoded samples vs held-out crops", ("fid",)),
    ("FID: samples", ("fid", "num_samples")),
    ("autoencoder (diffusers class)", ("class_name",)),
    ("latent shape (normalised, as the denoiser sees it)", ("latent_shape",)),
    ("crop size (px)", ("latents", "resolution")),
    ("training / held-out latents", None),
    ("the family's normalisation", ("latents", "convention")),
    ("normalisation", ("latents", "source")),
    ("scaling_factor", ("latents", "scaling_factor")),
    ("shift_factor", ("latents", "shift_factor")),
    ("std of the normalised training latents", ("latents", "train_std")),
    ("std of the normalised held-out latents", ("latents", "heldout_std")),
    ("denoiser: patch / width / depth / tokens", None),
    ("denoiser parameters", ("denoiser", "parameters")),
]


def _value(r: dict, label: str, keys: tuple[str, ...] | None):
    if keys is None:
        d = r["denoiser"]
        if label.startswith("denoiser"):
            return f"{d['patch_size']} / {d['width']} / {d['depth']} / {d['tokens']}"
        return f"{r['num_train_latents']} / {r['num_heldout_latents']}"
    for key in keys:
        r = r.get(key, "-") if isinstance(r, dict) else "-"
    return r


def write_report(out: Path, summary: dict, results: dict[str, dict]) -> None:
    """The plots and report.html: settings, the metrics table (one column per model), per-timestep table, figures."""
    timesteps, baseline = summary["timesteps"], summary["gaussian_baseline"]
    save_curves(results, out / "curve.png")
    save_per_timestep(results, timesteps, baseline, out / "per_timestep.png")
    settings = summary["settings"]
    header = {"model": settings["model"], "compare": settings["compare"] or "-", "data": settings["data"],
              "steps": settings["steps"], "batch size": settings["batch_size"], "seed": settings["seed"],
              "processes": summary["num_processes"], **summary["recipe"]}  # fmt: skip
    names = list(results)
    head = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in header.items())
    table = "<tr><th>metric</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"
    for label, keys in ROWS:
        cells = "".join(f"<td>{report.cell(_value(results[n], label, keys))}</td>" for n in names)
        table += f"<tr><th>{html.escape(label)}</th>{cells}</tr>"
    per_t = "<tr><th>t</th><th>abar_t (N(0, I) baseline)</th>" + "".join(
        f"<th>{html.escape(n)}</th><th>{html.escape(n)} / abar_t</th>" for n in names
    )
    per_t += "</tr>"
    for k, t in enumerate(timesteps):
        cells = "".join(
            f"<td>{results[n]['heldout_loss']['per_timestep'][k]:.5g}</td>"
            f"<td>{results[n]['heldout_loss']['ratio_to_gaussian'][k]:.4g}</td>"
            for n in names
        )
        per_t += f"<tr><td>{t}</td><td>{baseline[k]:.5g}</td>{cells}</tr>"
    figures = {
        "Held-out loss during training": {"mean over the timestep grid": "curve.png"},
        "Held-out loss per timestep": {"against the Gaussian baseline, and the ratio": "per_timestep.png"},
        "Samples": {
            f"{n}: decoded held-out latents (first row), then DDIM samples": results[n]["samples"] for n in names
        },
    }
    sections = "".join(f"<h2>{html.escape(title)}</h2>{report.images(files)}" for title, files in figures.items())
    (out / "report.html").write_text(
        f"""<!doctype html>
<html><head><meta charset="utf-8"><title>kl-ae probe</title>
<style>{report.STYLE}</style></head><body>
<h1>Diffusability probe</h1>
<table>{head}</table>
<h2>Metrics</h2>
<table>{table}</table>
<h2>Held-out denoising loss per timestep</h2>
<table>{per_t}</table>
<p>The held-out loss is the epsilon-prediction MSE per latent element at each timestep of the grid, with the same
noise draws for every model of a latent shape. For latents drawn from N(0, I) the least achievable loss is abar_t,
from a linear denoiser; a ratio below 1 means the denoiser exploits structure of the latents beyond a Gaussian.
Lower is easier to diffuse, for latents normalised to unit variance as here. The FID of a few dozen samples is
far above its large-sample value and noisy: compare models at the same sample count only.</p>
{sections}
</body></html>
"""
    )
