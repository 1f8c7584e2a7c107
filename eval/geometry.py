"""Latent geometry: how a diffusion model will find the latent space, measured without training one.

Per-image values, computed batch by batch and gathered across processes, then combined once:
- equivariance (EQ-VAE; "Improving the diffusability of autoencoders"): for T in `kl_ae.common.transforms.TRANSFORMS`
  (downscaling by 2, rotations by 90, 180, 270 degrees), PSNR(decode(T(z)), T(x)) and the equivariance gap
  PSNR(T(decode(z)), T(x)) - PSNR(decode(T(z)), T(x)): how much worse decoding a transformed latent is than
  transforming the reconstruction; 0 for a model as equivariant as its reconstruction allows;
- the spectrum: the share of power above half the Nyquist frequency (radial frequency > 1/4 cycle per sample)
  of the latent and of the image, and radial power profiles;
- the correlation matrix between latent channels;
- robustness: PSNR of decode(z + s * std * eps) for noise levels s relative to each image's latent std.
Equivariance and robustness use the posterior mode (as the reconstructions); the spectrum and the correlations use
the latents a diffusion model is trained on (posterior samples; VQ: the latents before quantization). A transform
the decoder cannot take (downscaling for RAE, whose decoder has a fixed number of patches) is left out: its
per-image values are NaN and its summary None.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kl_ae.common.metrics import mse, to_unit
from kl_ae.common.transforms import TRANSFORMS, apply_pair

NOISE_LEVELS = (0.1, 0.25, 0.5)  # latent noise relative to the latent std
RADIAL_BINS = 16  # radial frequency bins over [0, 0.5] cycles per sample (beyond 0.5: the corners, last bin)


def scale_size(size: tuple[int, int]) -> tuple[int, int]:
    """The latent size (h, w) after the `scale` transform (`kl_ae.common.transforms.apply_pair` at 1/2)."""
    return max(1, round(size[0] * 0.5)), max(1, round(size[1] * 0.5))


def equivariance_errors(
    decode: Callable[[Tensor], Tensor], x: Tensor, z: Tensor, recon: Tensor, factor: int,
    transforms: tuple[str, ...] = TRANSFORMS,
) -> dict[str, Tensor]:  # fmt: skip
    """Per-image MSEs (B,) in [0, 1] image space for every transform T: `{T}/latent` decode(T(z)) vs T(x),
    `{T}/image` T(decode(z)) vs T(x), `{T}/consistency` decode(T(z)) vs T(decode(z)); NaN for a transform not in
    `transforms` (one the decoder cannot take)."""
    out = {}
    for name in TRANSFORMS:
        if name not in transforms:
            nan = torch.full((x.shape[0],), float("nan"), device=x.device)
            out |= {f"{name}/latent": nan, f"{name}/image": nan, f"{name}/consistency": nan}
            continue
        x_t, z_t = apply_pair(name, x, z, factor)
        recon_t, _ = apply_pair(name, recon, z, factor)
        decoded = to_unit(decode(z_t))
        target, transformed = to_unit(x_t), to_unit(recon_t)
        out[f"{name}/latent"] = mse(decoded, target)
        out[f"{name}/image"] = mse(transformed, target)
        out[f"{name}/consistency"] = mse(decoded, transformed)
    return out


def radial_power(t: Tensor) -> Tensor:
    """Power per radial frequency bin (B, RADIAL_BINS) of each image's channels (mean removed), summed over channels."""
    t = t.double()
    t = t - t.mean(dim=(2, 3), keepdim=True)
    power = torch.fft.fft2(t).abs().square().sum(1)  # (B, H, W)
    fy = torch.fft.fftfreq(t.shape[2], device=t.device, dtype=torch.float64)
    fx = torch.fft.fftfreq(t.shape[3], device=t.device, dtype=torch.float64)
    r = (fy[:, None].square() + fx[None, :].square()).sqrt()  # cycles per sample
    bins = (r / 0.5 * RADIAL_BINS).long().clamp(max=RADIAL_BINS - 1).flatten()
    out = torch.zeros(t.shape[0], RADIAL_BINS, dtype=torch.float64, device=t.device)
    return out.index_add_(1, bins, power.flatten(1))


def high_frequency_share(profile: Tensor) -> float:
    """The share of power above half the Nyquist frequency (bins of radius >= 0.25 cycles per sample)."""
    total = float(profile.sum())
    return float(profile[..., RADIAL_BINS // 2 :].sum()) / total if total > 0 else 0.0


def channel_products(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per image: count (B,), channel sums (B, C) and cross-products (B, C, C) of z (B, C, h, w), float64."""
    flat = z.double().flatten(2)  # (B, C, N)
    count = torch.full((z.shape[0],), float(flat.shape[2]), dtype=torch.float64, device=z.device)
    return count, flat.sum(2), flat @ flat.transpose(1, 2)


def correlation_matrix(count: Tensor, sums: Tensor, products: Tensor) -> list[list[float]]:
    """Pearson correlation between channels from the gathered per-image sums."""
    n, s, p = count.sum(), sums.sum(0), products.sum(0)
    cov = p / n - torch.outer(s, s) / n**2
    std = cov.diagonal().clamp_min(1e-24).sqrt()
    return (cov / torch.outer(std, std)).clamp(-1, 1).tolist()


def noise_errors(decode: Callable[[Tensor], Tensor], x: Tensor, z: Tensor, generator: torch.Generator) -> dict:
    """Per-image MSE (B,) of decode(z + s * std(z) * eps) against x, for each s in NOISE_LEVELS."""
    std = z.float().flatten(1).std(1).view(-1, 1, 1, 1)  # each image's own latent std
    out = {}
    for s in NOISE_LEVELS:
        eps = torch.randn(z.shape, generator=generator, dtype=torch.float32).to(z.device, z.dtype)
        out[f"noise_{s:g}"] = mse(to_unit(decode(z + s * std * eps)), to_unit(x))
    return out


def _psnr(mses: Tensor) -> float | None:
    """Mean of per-image PSNR (dB); None when some image is exact (infinite PSNR)."""
    if (mses <= 0).any():
        return None
    return float((-10 * torch.log10(mses.double())).mean())


def _gap(worse: Tensor, better: Tensor) -> float | None:
    """Mean over images of PSNR(better) - PSNR(worse) = 10 log10(mse_worse / mse_better); an image exact both ways
    counts 0, one exact only for `better` makes the gap infinite (None)."""
    worse, better = worse.double(), better.double()
    both = (worse <= 0) & (better <= 0)
    if ((better <= 0) & ~both).any():
        return None
    ratio = torch.where(both, torch.ones_like(worse), worse / better.clamp_min(1e-30))
    return float((10 * torch.log10(ratio.clamp_min(1e-30))).mean())


def summarize(values: dict[str, Tensor], reconstruction_psnr: float | None) -> dict:
    """The metrics.json `geometry` entry from gathered per-image values (keys as produced above, prefixed `geo/`)."""
    equivariance = {}
    for name in TRANSFORMS:
        latent, image = values[f"geo/{name}/latent"], values[f"geo/{name}/image"]
        taken = ~latent.isnan()  # the images whose latents the decoder could take transformed
        if not taken.any():
            equivariance[name] = dict.fromkeys(
                ("psnr_decode_transformed", "psnr_transform_decoded", "gap_db", "psnr_consistency")
            ) | {"reason": "the decoder cannot take the transformed latents' size"}
            continue
        latent, image = latent[taken], image[taken]
        equivariance[name] = {
            "psnr_decode_transformed": _psnr(latent),
            "psnr_transform_decoded": _psnr(image),
            "gap_db": _gap(latent, image),
            "psnr_consistency": _psnr(values[f"geo/{name}/consistency"][taken]),
        }
    rotations = [equivariance[r]["gap_db"] for r in ("rot90", "rot180", "rot270")]
    latent_profile, image_profile = values["geo/latent_spectrum"].sum(0), values["geo/image_spectrum"].sum(0)
    robustness = {}
    for s in NOISE_LEVELS:
        psnr = _psnr(values[f"geo/noise_{s:g}"])
        drop = None if psnr is None or reconstruction_psnr is None else reconstruction_psnr - psnr
        robustness[f"{s:g}"] = {"psnr": psnr, "drop_db": drop}
    return {
        "equivariance": equivariance,
        "gap_scale_db": equivariance["scale"]["gap_db"],
        "gap_rotation_db": None if None in rotations else sum(rotations) / len(rotations),
        "spectrum": {
            "latent_high_frequency_share": high_frequency_share(latent_profile),
            "image_high_frequency_share": high_frequency_share(image_profile),
            "latent_radial_power": (latent_profile / latent_profile.sum().clamp_min(1e-30)).tolist(),
            "image_radial_power": (image_profile / image_profile.sum().clamp_min(1e-30)).tolist(),
            "bins": f"{RADIAL_BINS} radial frequency bins of width {0.5 / RADIAL_BINS:g} cycles per sample",
        },
        "channel_correlation": correlation_matrix(
            values["geo/corr_count"], values["geo/corr_sums"], values["geo/corr_products"]
        ),
        "robustness": robustness,
        "definitions": (
            "gap_db = PSNR(T(decode(z)), T(x)) - PSNR(decode(T(z)), T(x)), mean over images, z the posterior mode; "
            "scale = area downscaling by 2 of latent and image; high-frequency share = power above half the "
            "Nyquist frequency (mean removed); robustness: decode(z + s * std(z) * eps), per-image latent std"
        ),
    }


def geometry_row(
    decode, x: Tensor, z_mode: Tensor, z_sample: Tensor, recon: Tensor, factor: int, generator,
    transforms: tuple[str, ...] = TRANSFORMS,
) -> dict:  # fmt: skip
    """Everything this module measures for one batch, as per-image tensors keyed `geo/...` (gather them);
    `transforms`: the equivariance transforms the decoder can take (the others are NaN)."""
    row = {f"geo/{k}": v for k, v in equivariance_errors(decode, x, z_mode, recon, factor, transforms).items()}
    row |= {f"geo/{k}": v for k, v in noise_errors(decode, x, z_mode, generator).items()}
    row["geo/latent_spectrum"] = radial_power(z_sample)
    row["geo/image_spectrum"] = radial_power(x)
    row["geo/corr_count"], row["geo/corr_sums"], row["geo/corr_products"] = channel_products(z_sample)
    return row
