"""Image-quality metrics as pure functions over batches of images in [0, 1], one value per image.

Thin wrappers over torchmetrics' functional API so that training-time validation and `kl-ae eval`
compute the same numbers; per-image values let callers gather them across processes exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] model space -> [0, 1] metric space, in fp32, clamped as a saved image would be."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [0, 1]. (B,)"""
    return peak_signal_noise_ratio(x.float(), y.float(), data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5) of images in [0, 1]. (B,)"""
    return structural_similarity_index_measure(x.float(), y.float(), data_range=1.0, reduction="none")


@torch.no_grad()
def reconstruction_metrics(x: Tensor, x_hat: Tensor, lpips=None) -> dict[str, Tensor]:
    """PSNR, SSIM (and LPIPS when a perceptual model is given) per image, for images in [-1, 1]."""
    a, b = to_unit(x), to_unit(x_hat)
    out = {"psnr": psnr(a, b), "ssim": ssim(a, b)}
    if lpips is not None:
        out["lpips"] = lpips(a * 2 - 1, b * 2 - 1).float()
    return out
