"""`kl-ae eval`'s figures of one model: its reconstruction grid and its prior-sample grid (VQ: random codes).

Images of any channel count are drawn as `kl_ae.common.views.display` draws them: alpha over a checkerboard, one
channel in grayscale, N bands as a false-colour triplet (the run's `loss.lpips_channels`, or the first three).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from eval import report
from kl_ae.common.fixed_sets import EvalImages
from kl_ae.common.metrics import to_unit
from kl_ae.common.views import display
from kl_autoencoder.interface import LatentAutoencoder


@torch.no_grad()
def figures(ae: LatentAutoencoder, images: EvalImages, result: dict, tag: str, out: Path, cfg, device):
    """Reconstruction grid and prior-sample grid (VQ: random-code grid) of one model (main process); images of any
    channel count shown as `kl_ae.common.views.display` draws them (with `cfg.bands`).

    Returns {caption key: file}: "recon", and "prior" (continuous latents) or "codes" (VQ).
    """
    n = min(cfg.grid_images, len(images))
    x = [images[i].to(device) for i in range(n)]
    x_hat = [ae.decode(ae.encode(xi[None]).mode())[0] for xi in x]
    x, x_hat = [to_unit(t).cpu() for t in x], [to_unit(t).cpu() for t in x_hat]
    factor = ae.spatial_factor
    size = report.display_size([tuple(t.shape[1:]) for t in x], ae.image_multiple)
    pictures = [[display(t[None], cfg.bands)[0] for t in row] for row in (x, x_hat)]
    report.save_reconstruction_grid(*pictures, out / f"recon_{tag}.png", size)
    # prior samples at the tile size, next to the same images' reconstructions at that size
    gen = torch.Generator().manual_seed(cfg.seed)
    thumbs = [report.thumbnail(t, size)[None].to(device) * 2 - 1 for t in x]
    recon = torch.stack([to_unit(ae.decode(ae.encode(t).mode())[0]).cpu() for t in thumbs])
    recon = display(recon, cfg.bands)
    if ae.family == "vq":
        # codes drawn independently per position, uniformly over the used codes and from the code histogram
        counts = torch.tensor(result["codebook"]["histogram"], dtype=torch.float64)
        if counts.sum() == 0:
            counts = torch.ones_like(counts)
        shape = (n, size // factor, size // factor)
        uniform = torch.multinomial((counts > 0).double(), math.prod(shape), replacement=True, generator=gen)
        unigram = torch.multinomial(counts, math.prod(shape), replacement=True, generator=gen)
        rows = [recon]
        for idx in (uniform, unigram):  # quantized latents: the module's decode, which does not quantize again
            decoded = ae.module.decode(codes_to_latents(ae.module, idx.view(shape).to(device)))
            rows.append(display(to_unit(decoded).cpu(), cfg.bands))
        report.save_code_grid(*rows, out / f"codes_{tag}.png")
        return {"recon": f"recon_{tag}.png", "codes": f"codes_{tag}.png"}
    stats = result["latents"]
    shape = (n, ae.latent_channels, size // factor, size // factor)
    eps = torch.randn(shape, generator=gen).to(device)
    mean = torch.tensor(stats["latents_mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(stats["latents_std"], device=device).view(1, -1, 1, 1)
    prior = display(to_unit(ae.decode(eps)).cpu(), cfg.bands)
    aggregate = display(to_unit(ae.decode(eps * std + mean)).cpu(), cfg.bands)
    report.save_prior_grid(recon, prior, aggregate, out / f"prior_{tag}.png")
    return {"recon": f"recon_{tag}.png", "prior": f"prior_{tag}.png"}


def codes_to_latents(model: torch.nn.Module, indices: torch.Tensor) -> torch.Tensor:
    """Code indices (B, h, w) -> the quantized latents (B, code_dim, h, w) that `model.decode` takes."""
    codebook = model.quantize.embedding.weight
    if model.config.normalize_codes:  # the quantizer looks up (and outputs) unit-norm codes
        codebook = torch.nn.functional.normalize(codebook, dim=1)
    return codebook[indices].permute(0, 3, 1, 2).contiguous()
