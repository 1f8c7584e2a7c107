"""Image-quality metrics as pure functions over batches of images, one value per image: `psnr`, `ssim`,
`mse`, `ms_ssim` and `inception_features` take images in [0, 1], `reconstruction_metrics` the model's [-1, 1].
Any channel count: PSNR per channel, and for RGBA the PSNR of alpha and of the RGB composited over a fixed grey
(`kl_ae.common.views`). [0, 1] is the data's own range (its format's peak, or
the measured one): no 8-bit quantization on the way, so 16-bit data is scored at its 16-bit peak.

Thin wrappers over torchmetrics' functional API so that training-time validation and `kl-ae eval`
compute the same numbers; per-image values let callers gather them across processes exactly.
The optional metrics (MS-SSIM, LPIPS, rFID) come with a reason when they cannot be computed:
a metric is reported unavailable rather than computed at the wrong size or with random weights.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from kl_ae.common.frames import is_clip, per_frame
from kl_ae.common.views import composite
from kl_ae.common.weights import INCEPTION_FILE, KNOWN, cache_dir, fetch

# the file torch-fidelity's FeatureExtractorInceptionV3 fetches with torch.hub.load_state_dict_from_url,
# which saves it under the URL's file name in torch.hub.get_dir()/checkpoints
INCEPTION_URL = KNOWN["fid-inception"].url


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] model space -> [0, 1] metric space, in fp32, clamped as a saved image would be."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [0, 1]. (B,)"""
    return peak_signal_noise_ratio(x.float(), y.float(), data_range=1.0, reduction="none", dim=(1, 2, 3))


def psnr_per_channel(x: Tensor, y: Tensor) -> Tensor:
    """Per-image, per-channel PSNR in dB of images in [0, 1]. (B, C)"""
    err = (x.float() - y.float()).square().mean(dim=(2, 3))
    return 10 * torch.log10(1.0 / err)


def alpha_metrics(x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """RGBA images (B, 4, H, W) in [0, 1]: PSNR of alpha and of the RGB composited over the fixed grey, each image's
    over its own alpha. {"psnr_alpha": (B,), "psnr_composite": (B,)}"""
    return {"psnr_alpha": psnr(x[:, 3:], y[:, 3:]), "psnr_composite": psnr(composite(x), composite(y))}


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5) of images in [0, 1]. (B,)"""
    return structural_similarity_index_measure(x.float(), y.float(), data_range=1.0, reduction="none")


def mse(x: Tensor, y: Tensor) -> Tensor:
    """Per-image mean squared error of images in [0, 1]. (B,)"""
    return (x.float() - y.float()).square().mean(dim=(1, 2, 3))


def ms_ssim(x: Tensor, y: Tensor) -> tuple[Tensor | None, str]:
    """Per-image MS-SSIM (5 scales, window 11) of images in [0, 1], or (None, why) when they are too small.

    torchmetrics needs each side // 16 > 10, i.e. at least 176 px; its own message is the reason.
    """
    try:
        value = multiscale_structural_similarity_index_measure(x.float(), y.float(), data_range=1.0, reduction="none")
    except ValueError as e:
        return None, f"MS-SSIM needs larger images than {x.shape[-2]}x{x.shape[-1]}: {e}"
    return value, ""


@torch.no_grad()
def reconstruction_metrics(x: Tensor, x_hat: Tensor, lpips=None) -> dict[str, Tensor]:
    """PSNR, SSIM (and LPIPS when a perceptual model is given: one that takes x's channels, such as
    `kl_ae.common.lpips.ChannelLPIPS`) per image, for images in [-1, 1]; RGBA adds `alpha_metrics`; clips
    (B, C, T, H, W) give each clip's mean over its frames and the figures of `clip_metrics`."""
    a, b = to_unit(x), to_unit(x_hat)
    if is_clip(x):
        return clip_metrics(a, b, lpips)
    out = {"psnr": psnr(a, b), "ssim": ssim(a, b)}
    if a.shape[1] == 4:
        out |= alpha_metrics(a, b)
    if lpips is not None:
        out["lpips"] = lpips(a * 2 - 1, b * 2 - 1).float()
    return out


def temporal_psnr(a: Tensor, b: Tensor) -> Tensor:
    """PSNR in dB of the frame-to-frame differences of clips in [0, 1] (B, C, T, H, W) against the reference's,
    per clip (B,): flicker that per-frame scores hide shows here. NaN for one-frame clips."""
    if a.shape[2] < 2:
        return torch.full((a.shape[0],), math.nan, device=a.device)
    da, db = a.float().diff(dim=2), b.float().diff(dim=2)  # (B, C, T-1, H, W), values in [-1, 1]
    err = (da - db).square().flatten(1).mean(1)
    return 10 * torch.log10(1.0 / err)  # the same peak as the frames' PSNR, so the two read alike


def clip_metrics(a: Tensor, b: Tensor, lpips=None) -> dict[str, Tensor]:
    """Per clip (B,) of clips in [0, 1] (B, C, T, H, W): PSNR / SSIM (/ LPIPS) averaged over all frames, PSNR of the
    first frame and of the rest apart (a causal model encodes the first frame alone), and `temporal_psnr`."""
    frame_psnr = per_frame(psnr, a, b)  # (B, T)
    rest = frame_psnr[:, 1:].mean(1) if a.shape[2] > 1 else torch.full_like(frame_psnr[:, 0], math.nan)
    out = {"psnr": frame_psnr.mean(1), "ssim": per_frame(ssim, a, b).mean(1), "psnr_first": frame_psnr[:, 0],
           "psnr_rest": rest, "temporal_psnr": temporal_psnr(a, b)}  # fmt: skip
    if lpips is not None:
        out["lpips"] = per_frame(lambda u, v: lpips(u * 2 - 1, v * 2 - 1).float(), a, b).mean(1)
    return out


# ----------------------------------------------------------------------------- rFID


def inception_weights() -> Path:
    """Where torch-fidelity would download its Inception weights (torch.hub.get_dir()/checkpoints)."""
    return cache_dir() / INCEPTION_FILE


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def fid_implementation() -> dict:
    """What computes rFID here, with versions, for metrics.json: published numbers differ by implementation."""
    return {
        "features": "torchmetrics NoTrainInceptionV3('inception-v3-compat'), 2048-d pool features of uint8 images "
        "resized to 299 inside the network (torch-fidelity's port of TF-FID's inception-2015-12-05)",
        "weights": INCEPTION_FILE,
        "distance": "frechet_distance in kl_ae/common/metrics.py (float64, trace of sqrt via eigenvalues of S_a S_b)",
        "torchmetrics": _version("torchmetrics"),
        "torch_fidelity": _version("torch-fidelity"),
    }


def build_inception(download: bool = True) -> tuple[torch.nn.Module | None, str]:
    """The FID Inception network (2048-d pool features), or (None, why).

    torchmetrics' FrechetInceptionDistance needs torch-fidelity; its weights are fetched into the torch hub
    cache (hash-checked) unless offline or `download` is False, and then handed over as a path.
    """
    problems = []
    installed = importlib.util.find_spec("torch_fidelity") is not None
    if not installed:  # then the weights would be of no use: nothing is downloaded
        problems.append("torch-fidelity is not installed (pip install torch-fidelity)")
    path, why = fetch("fid-inception", download and installed)
    if path is None:
        why = f"{why}; " if installed else ""
        problems.append(
            f"{INCEPTION_FILE} is not in {inception_weights().parent} ({why}download {INCEPTION_URL} there, "
            f"or run `kl-ae fetch-weights --what fid`)"
        )
    if problems:
        return None, "; ".join(problems)
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3("inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path))
    return net.eval(), str(path)


def inception_features(net: torch.nn.Module, x: Tensor) -> Tensor:
    """2048-d features of images in [0, 1] (quantized to uint8 as a saved image would be). (B, 2048)"""
    return net((x * 255).round().to(torch.uint8)).reshape(x.shape[0], -1).double()


def gaussian_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """(mean (D,), covariance (D, D)) of a feature set (N, D), in float64: one side of a Fréchet distance."""
    f = features.double()
    return f.mean(0), torch.atleast_2d(torch.cov(f.T))


def frechet_distance_from_statistics(mu_a: Tensor, s_a: Tensor, mu_b: Tensor, s_b: Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)), the last term from the eigenvalues of S_a S_b."""
    mu_a, s_a, mu_b, s_b = (t.double() for t in (mu_a, s_a, mu_b, s_b))
    covmean_trace = torch.linalg.eigvals(s_a @ s_b).sqrt().real.sum()
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * covmean_trace)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D), as torchmetrics' FID computes it."""
    return frechet_distance_from_statistics(*gaussian_statistics(a), *gaussian_statistics(b))
