"""The evaluation report: image grids, plots and one self-contained `report.html` next to its PNGs.

Grids are written with torchvision, plots with matplotlib's Agg backend (no display needed). Every
function takes plain tensors and numbers and writes one file, so `evaluate.py` decides what goes in.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import save_image

ERROR_GAIN = 5.0  # |x - x_hat| is multiplied by this in the error maps, so small errors are visible
MIN_TILE = 128  # smaller grid tiles are enlarged (nearest neighbour) to at least this many pixels


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def thumbnail(x: Tensor, size: int) -> Tensor:
    """Centre square of an image (3, H, W), resized to (3, size, size) with antialiasing."""
    _, h, w = x.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = x[:, top : top + s, left : left + s][None].float()
    if s != size:
        square = F.interpolate(square, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return square[0].clamp(0, 1)


def display_size(shapes: list[tuple[int, int]], factor: int, cap: int = 256) -> int:
    """Side of the grid tiles: the smallest image side, at most `cap`, a multiple of the downsampling factor."""
    side = min(cap, *(min(h, w) for h, w in shapes))
    return max(factor, side // factor * factor)


def save_reconstruction_grid(x: list[Tensor], x_hat: list[Tensor], path: Path, size: int) -> None:
    """Rows: images, reconstructions, |x - x_hat| x ERROR_GAIN; inputs in [0, 1], any sizes."""
    rows = [
        [thumbnail(a, size) for a in x],
        [thumbnail(b, size) for b in x_hat],
        [thumbnail(((a - b).abs() * ERROR_GAIN).clamp(0, 1), size) for a, b in zip(x, x_hat)],
    ]
    save_grid(torch.stack([t for row in rows for t in row]), len(x), path)


def save_prior_grid(reconstructions: Tensor, prior: Tensor, aggregate: Tensor, path: Path) -> None:
    """Rows: reconstructions, decoded z ~ N(0, I), decoded z ~ N(aggregate mean, aggregate std^2); (n, 3, s, s)."""
    save_grid(torch.cat([reconstructions, prior, aggregate]).clamp(0, 1), len(prior), path)


def save_code_grid(reconstructions: Tensor, uniform: Tensor, unigram: Tensor, path: Path) -> None:
    """VQ's prior grid. Rows: reconstructions; decoded codes uniform over the used codes; decoded codes drawn from
    the code histogram (each position independently); (n, 3, s, s) in [0, 1]."""
    save_grid(torch.cat([reconstructions, uniform, unigram]).clamp(0, 1), len(uniform), path)


def save_grid(tiles: Tensor, nrow: int, path: Path) -> None:
    """Tiles (n, 3, s, s) in [0, 1], `nrow` per row, small tiles enlarged to MIN_TILE px (nearest neighbour)."""
    scale = max(1, MIN_TILE // tiles.shape[-1])  # integer nearest-neighbour enlargement keeps pixels exact
    if scale > 1:
        tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest")
    save_image(tiles, path, nrow=nrow, padding=2, pad_value=1.0)


def save_kl_bars(kl: dict[str, list[float]], threshold: float, path: Path) -> None:
    """Per-channel KL (nats per latent element) as bars, one colour per model, with the active-unit threshold."""
    plt = pyplot()
    channels = max(len(v) for v in kl.values())
    width = 0.8 / len(kl)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * channels * len(kl) + 2), 3.2))
    for i, (name, values) in enumerate(kl.items()):
        heights = [max(v, 1e-6) for v in values]  # log axis: a collapsed channel (KL 0) shows as a stub
        ax.bar([c + (i - (len(kl) - 1) / 2) * width for c in range(len(values))], heights, width, label=name)
    ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"active threshold {threshold:g}")
    ax.set_yscale("log")
    ax.set_xlabel("latent channel")
    ax.set_ylabel("KL (nats / element)")
    ax.set_xticks(range(channels))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_code_usage(histograms: dict[str, list[int]], path: Path) -> None:
    """Code usage of VQ models: counts per code index (left) and code frequencies ranked, log scale (right)."""
    plt = pyplot()
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for name, counts in histograms.items():
        c = torch.tensor(counts, dtype=torch.float64)
        k, total = len(c), float(c.sum())
        axes[0].plot(range(k), c.numpy(), drawstyle="steps-mid", lw=1, alpha=0.8, label=f"{name} ({k} codes)")
        ranked = c.sort(descending=True).values / max(total, 1.0)
        used = int((c > 0).sum())
        axes[1].plot(range(1, used + 1), ranked[:used].numpy(), lw=1.2, label=f"{name}: {used} used")
        axes[1].axhline(1 / k, lw=0.8, ls="--", color=axes[1].lines[-1].get_color(), label=f"uniform over {k}")
    axes[0].set_xlabel("code index")
    axes[0].set_ylabel("count (all latent positions)")
    axes[1].set_xscale("log")
    axes[1].xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on a short log range
    axes[1].set_yscale("log")
    axes[1].set_xlabel("code rank")
    axes[1].set_ylabel("frequency")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_latent_histograms(samples: dict[str, Tensor], path: Path, max_channels: int = 16) -> None:
    """Histogram of each channel's posterior samples (N, C), per model, against the N(0, 1) density."""
    plt = pyplot()
    channels = min(max_channels, max(v.shape[1] for v in samples.values()))
    cols = min(4, channels)
    rows = math.ceil(channels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for c in range(rows * cols):
        ax = axes[c // cols][c % cols]
        if c >= channels:
            ax.axis("off")
            continue
        values = {name: v[:, c].double() for name, v in samples.items() if c < v.shape[1]}
        lo = min(-4.0, *(float(v.min()) for v in values.values()))
        hi = max(4.0, *(float(v.max()) for v in values.values()))
        for name, v in values.items():
            ax.hist(v.numpy(), bins=40, range=(lo, hi), density=True, alpha=0.5, label=name)
        grid = torch.linspace(lo, hi, 200, dtype=torch.float64)
        ax.plot(grid.numpy(), (torch.exp(-0.5 * grid**2) / math.sqrt(2 * math.pi)).numpy(), "k-", lw=1, label="N(0,1)")
        ax.set_title(f"channel {c}", fontsize=9)
        if c == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_spectra(profiles: dict[str, tuple[list[float], list[float]]], path: Path) -> None:
    """Radial power spectra (share of power per frequency bin, log scale): each model's latent, and the images."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for i, (name, (latent, image)) in enumerate(profiles.items()):
        freq = [(k + 0.5) * 0.5 / len(latent) for k in range(len(latent))]
        ax.plot(freq, [max(v, 1e-12) for v in latent], marker="o", markersize=3, label=f"{name}: latent")
        if i == 0:
            ax.plot(freq, [max(v, 1e-12) for v in image], color="black", linestyle="--", label="images")
    ax.axvline(0.25, color="grey", linewidth=1, linestyle=":", label="Nyquist / 2")
    ax.set_yscale("log")
    ax.set_xlabel("radial frequency (cycles / sample)")
    ax.set_ylabel("share of power")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_correlations(matrices: dict[str, list[list[float]]], path: Path) -> None:
    """Correlation matrices between latent channels, one panel per model."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.6 * len(matrices), 3.2), squeeze=False)
    for ax, (name, matrix) in zip(axes[0], matrices.items()):
        image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="coolwarm")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("channel")
        ax.set_ylabel("channel")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_rd_plot(points: list[dict], path: Path) -> None:
    """Distortion (MSE, and PSNR on a second panel) against rate in bits per pixel, one point per kl_weight."""
    plt = pyplot()
    from matplotlib.ticker import NullFormatter

    points = sorted(points, key=lambda p: p["bits_per_pixel"])
    rate = [max(p["bits_per_pixel"], 1e-6) for p in points]  # log axis: a collapsed model has rate ~0
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "mse", "distortion: MSE"), (axes[1], "psnr", "PSNR (dB)")):
        ax.plot(rate, [p[key] for p in points], "o-")
        for r, p in zip(rate, points):
            ax.annotate(f"kl_weight {p['kl_weight']:g}", (r, p[key]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on a short log range
        ax.set_xlabel("rate (bits per pixel)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("rate-distortion: one trained model per kl_weight")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- HTML

# (label, path into a model's results); optional metrics are {"available": ..., "value" | "reason": ...}
TABLE_ROWS = [
    ("autoencoder (diffusers class)", ("class_name",)),
    ("PSNR (dB)", ("reconstruction", "psnr")),
    ("SSIM", ("reconstruction", "ssim")),
    ("MS-SSIM", ("reconstruction", "ms_ssim")),
    ("LPIPS", ("reconstruction", "lpips")),
    ("rFID", ("reconstruction", "rfid")),
    ("clips: PSNR of the first frame (dB)", ("reconstruction", "psnr_first_frame")),
    ("clips: PSNR of the other frames (dB)", ("reconstruction", "psnr_rest")),
    ("clips: PSNR of frame differences (dB, flicker)", ("reconstruction", "temporal_psnr")),
    ("clips: rFVD (I3D)", ("reconstruction", "rfvd")),
    ("MSE", ("reconstruction", "mse")),
    ("KL (nats / image)", ("rate", "kl_nats_per_image")),
    ("rate (bits / latent element)", ("rate", "bits_per_latent_element")),
    ("rate (bits / pixel)", ("rate", "bits_per_pixel")),
    ("active channels (KL > threshold)", ("rate", "active_channels")),
    ("active units (Burda)", ("active_units", "active_units")),
    ("latent mean (shift_factor)", ("latents", "shift_factor")),
    ("latent std", ("latents", "global_std")),
    ("scaling_factor (1 / std)", ("latents", "scaling_factor")),
    ("normalized latents (the pipeline's): channels", ("normalized_latents", "channels")),
    ("normalized latents: mean", ("normalized_latents", "global_mean")),
    ("normalized latents: std", ("normalized_latents", "global_std")),
    ("aggregate vs prior: sum_c KL(N(m_c, s_c^2) || N(0,1))", ("prior_distance", "gaussian_kl_per_vector")),
    ("aggregate vs prior: MMD^2", ("prior_distance", "mmd2")),
    ("standardised aggregate vs prior: MMD^2", ("prior_distance", "mmd2_standardized")),
    ("VQ: codebook size", ("codebook", "num_codes")),
    ("VQ: used codes", ("codebook", "used_codes")),
    ("VQ: codebook usage (fraction used)", ("codebook", "usage")),
    ("VQ: perplexity (exp entropy of the code histogram)", ("codebook", "perplexity")),
    ("VQ: dead codes (never used)", ("codebook", "dead_codes")),
    ("VQ: code entropy (bits / position)", ("codebook", "entropy_bits")),
    ("VQ: index rate (bits / pixel, log2 K per position)", ("codebook", "bits_per_pixel")),
    ("VQ: entropy rate (bits / pixel)", ("codebook", "entropy_bits_per_pixel")),
    ("equivariance gap, downscale x2 (dB)", ("geometry", "gap_scale_db")),
    ("equivariance gap, rotations (dB, mean of 3)", ("geometry", "gap_rotation_db")),
    ("PSNR decode(downscaled z) vs downscaled x", ("geometry", "equivariance", "scale", "psnr_decode_transformed")),
    ("latent power above Nyquist / 2 (share)", ("geometry", "spectrum", "latent_high_frequency_share")),
    ("image power above Nyquist / 2 (share)", ("geometry", "spectrum", "image_high_frequency_share")),
    ("PSNR drop, latent noise 0.1 std (dB)", ("geometry", "robustness", "0.1", "drop_db")),
    ("PSNR drop, latent noise 0.25 std (dB)", ("geometry", "robustness", "0.25", "drop_db")),
    ("PSNR drop, latent noise 0.5 std (dB)", ("geometry", "robustness", "0.5", "drop_db")),
]


STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1400px; }
table { border-collapse: collapse; margin-bottom: 1em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; font-size: 14px; }
.na { color: #888; font-size: 12px; } .warn { color: #b00; }
.row { display: flex; flex-wrap: wrap; gap: 16px; } figure { margin: 0; }
img { max-width: 100%; image-rendering: pixelated; } figcaption { font-size: 13px; color: #444; }
"""


def cell(value) -> str:
    """A table cell: numbers to 5 significant digits; an unavailable metric greyed out with its reason."""
    if isinstance(value, dict):
        if not value.get("available", True):
            return f'<span class="na">unavailable: {html.escape(str(value.get("reason", "")))}</span>'
        value = value.get("value")
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.5g}"
    return html.escape(str(value))


def _lookup(result: dict, keys: tuple[str, ...]):
    for key in keys:
        result = result.get(key, {}) if isinstance(result, dict) else {}
    return result if result != {} else "-"


def images(files: dict[str, str]) -> str:
    """A row of captioned figures, {caption: png file name relative to the report}."""
    cells = "".join(
        f"<figure>{_media(f, name)}<figcaption>{html.escape(name)}</figcaption></figure>" for name, f in files.items()
    )
    return f'<div class="row">{cells}</div>'


def _media(file: str, name: str) -> str:
    """An <img> for a picture, a looping <video> for a clip (mp4)."""
    if file.endswith(".mp4"):
        return f'<video src="{html.escape(file)}" controls loop muted></video>'
    return f'<img src="{html.escape(file)}" alt="{html.escape(name)}">'


def write_html(path: Path, header: dict, results: dict[str, dict], figures: dict[str, dict[str, str]]) -> None:
    """report.html: the settings, the metrics table (one column per model), warnings and the figures.

    figures: {section title: {caption: png file name relative to the report}}.
    """
    head = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in header.items())
    names = list(results)
    table = "<tr><th>metric</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"
    for label, keys in TABLE_ROWS:
        if all(_lookup(results[n], keys) == "-" for n in names):
            continue  # a row no model has: the VQ rows for KL models, the rate and prior rows for VQ models
        cells = "".join(f"<td>{cell(_lookup(results[n], keys))}</td>" for n in names)
        table += f"<tr><th>{html.escape(label)}</th>{cells}</tr>"
    warnings = "".join(
        f'<p class="warn">{html.escape(n)}: {html.escape(w)}</p>' for n in names for w in results[n].get("warnings", [])
    )
    sections = "".join(f"<h2>{html.escape(title)}</h2>{images(files)}" for title, files in figures.items())
    kl = [n for n in names if "prior_distance" in results[n]]
    vq = [n for n in names if "codebook" in results[n]]
    notes = ""
    if kl:
        estimator = html.escape(results[kl[0]]["prior_distance"]["estimator"])
        start = "KL models: r" if vq else "R"
        notes += f"<p>{start}econstructions use the posterior mode; latent statistics, rate and the prior comparison "
        notes += f"""use posterior
samples. Rates pool the whole set. MMD: {estimator}. The standardised MMD first maps each channel to zero
mean and unit variance with the aggregate's own moments, so it measures shape rather than scale.</p>
"""
    if vq:
        notes += """<p>VQ models: reconstructions go through the codebook (encode, nearest code, decode). Codebook
statistics count the code of every latent position of every image (all processes): usage is the fraction of codes
used at least once, perplexity the exp of the entropy of that histogram (1: one code, K: all codes equally often),
dead codes the codes never used. Latent statistics (scaling_factor) are of the latents before quantization,
encode(x).latents, which a latent diffusion model is trained on; diffusers' VQModel.decode quantizes them. Its
config has scaling_factor only: the latent mean is shown for information and is not exported as a shift.
The rate, active-unit and prior rows need a Gaussian posterior (-: not applicable).</p>
"""
    if any("posterior" in results[n] for n in names):
        notes += """<p>Deterministic latents (DC-AE, RAE): the encoder gives a point, not a distribution, so there
is no rate, KL or active units; statistics and the prior comparison use the latent itself.</p>
"""
    notes += """<p>Normalized latents: the raw latents as the model's own diffusion pipeline normalizes them
(scaling / shift; per-channel mean / std; FLUX.2: 2x2 patchified, then its BatchNorm statistics), what a diffusion
model trained on this latent space sees.</p>
"""
    grids = ""
    if kl:
        grids += """ Prior grids:
reconstructions; decoded z ~ N(0, I); decoded z ~ N(aggregate mean, aggregate std^2) per channel. Where the
middle row is garbage and the last is not, the prior puts mass on holes of the aggregate posterior."""
    if vq:
        grids += """ Random-code grids (VQ): reconstructions; codes drawn independently per position,
uniformly over the codes used on this set; codes drawn from the code histogram. With no spatial prior over the
codes these are textures, not images: they show what the used codes decode to."""
    Path(path).write_text(
        f"""<!doctype html>
<html><head><meta charset="utf-8"><title>kl-ae eval</title>
<style>{STYLE}</style></head><body>
<h1>Autoencoder evaluation</h1>
<table>{head}</table>
<h2>Metrics</h2>
<table>{table}</table>
{warnings}
{notes}{sections}
<p>Reconstruction grids: images, reconstructions and |x - x_hat| x {ERROR_GAIN:g} (centre crops).{grids}</p>
</body></html>
"""
    )
