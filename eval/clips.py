"""What `kl-ae eval` measures and shows of clips (B, 3, T, H, W) beyond what it measures of images.

Per clip: PSNR / SSIM / LPIPS over all frames, the first frame apart from the rest (a causal model encodes it
alone), the PSNR of frame differences (flicker that per-frame scores hide), and I3D features for rFVD. Figures:
frame strips of clips and reconstructions, the latent prior decoded as clips, and side-by-side videos.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from eval import report
from kl_ae.common.fvd import MIN_FRAMES, i3d_features
from kl_ae.common.metrics import clip_metrics, mse, to_unit
from kl_autoencoder.interface import LatentAutoencoder

STRIP_FRAMES = 8  # frames shown per clip in the figures, evenly spaced


def clip_row(a: Tensor, b: Tensor, lpips, i3d, real: bool) -> dict[str, Tensor]:
    """Per-clip values of one batch of clips in [0, 1]: `clip_metrics`, MSE, pixels (T*H*W), I3D features (of the
    real clips too where `real`) when `i3d` is given."""
    n = len(a)
    row = clip_metrics(a, b, lpips)
    row["mse"] = mse(a.flatten(1, 2), b.flatten(1, 2))  # over every frame's pixels
    row["ms_ssim"] = torch.full((n,), math.nan, device=a.device)
    row["pixels"] = torch.full((n,), float(a[0, 0].numel()), dtype=torch.float64, device=a.device)
    if i3d is not None:
        if real:
            row["i3d_real"] = i3d_features(i3d, a)
        row["i3d_fake"] = i3d_features(i3d, b)
    return row


def clip_summary(values: dict[str, Tensor], fvd_status: str) -> dict:
    """The clip-only entries of `reconstruction`: first frame / rest PSNR, temporal PSNR and rFVD (or why not:
    `fvd_status`, `fvd_status_for` says it)."""
    mean = lambda k: values[k].double().nanmean().item()  # noqa: E731 (one-frame clips have no rest)
    out = {"psnr_first_frame": mean("psnr_first"), "psnr_rest": mean("psnr_rest"),
           "temporal_psnr": mean("temporal_psnr")}  # fmt: skip
    real, fake = values.get("i3d_real"), values.get("i3d_fake")
    if real is not None and fake is not None and len(fake) >= 2:
        from kl_ae.common.metrics import frechet_distance

        out["rfvd"] = {"available": True, "value": frechet_distance(real, fake), "num_clips": len(fake),
                       "network": f"I3D (Kinetics-400) logits, 224 px: {fvd_status}"}  # fmt: skip
    else:
        why = fvd_status if fake is None else "needs at least 2 clips"
        out["rfvd"] = {"available": False, "reason": why}
    return out


def fvd_status_for(i3d, status: str, frames: int) -> tuple[object, str]:
    """(the I3D network to use, the status line): none for clips shorter than I3D takes."""
    if i3d is not None and frames < MIN_FRAMES:
        return None, f"clips of {frames} frames are shorter than the {MIN_FRAMES} frames I3D takes (--frames)"
    return i3d, status


def strip(clip: Tensor, frames: int = STRIP_FRAMES) -> list[Tensor]:
    """Up to `frames` evenly spaced frames (3, H, W) of a clip (3, T, H, W)."""
    t = clip.shape[1]
    picks = sorted({round(i * (t - 1) / max(frames - 1, 1)) for i in range(min(frames, t))})
    return [clip[:, i] for i in picks]


@torch.no_grad()
def clip_figures(ae: LatentAutoencoder, clips, tag: str, out: Path, count: int, seed: int, device) -> dict[str, str]:
    """Frame strips (clip, reconstruction, |error| x 5 per clip), the prior decoded as clips, and the first clip's
    side-by-side video (input | reconstruction). Returns {caption key: file}."""
    from kl_ae.common.video import write_video

    n = min(count, len(clips), 4)
    x = [clips[i].to(device) for i in range(n)]
    x_hat = [ae.decode(ae.encode(c[None]).mode())[0] for c in x]
    x, x_hat = [to_unit(c).cpu() for c in x], [to_unit(c).cpu() for c in x_hat]
    size = report.display_size([tuple(c.shape[2:]) for c in x], ae.image_multiple)
    rows = []
    for a, b in zip(x, x_hat):
        rows += [strip(a), strip(b), [((u - v).abs() * report.ERROR_GAIN).clamp(0, 1) for u, v in
                                      zip(strip(a), strip(b))]]  # fmt: skip
    width = max(len(r) for r in rows)
    tiles = [report.thumbnail(t, size) for r in rows for t in r + [torch.zeros_like(r[0])] * (width - len(r))]
    report.save_grid(torch.stack(tiles), width, out / f"recon_{tag}.png")
    video = f"recon_{tag}.mp4"
    write_video(out / video, torch.cat([x[0], x_hat[0]], dim=-1) * 2 - 1, fps=8)  # (3, T, H, 2W) in [-1, 1]
    # the prior: z ~ N(0, I) in the shape of the first clip's latent, decoded
    z = ae.encode(clips[0][None].to(device)).mode()
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    prior = to_unit(ae.decode(eps)[0]).cpu()
    report.save_grid(torch.stack([report.thumbnail(t, size) for t in strip(prior)]), STRIP_FRAMES,
                     out / f"prior_{tag}.png")  # fmt: skip
    return {"recon": f"recon_{tag}.png", "prior": f"prior_{tag}.png", "video": video}
