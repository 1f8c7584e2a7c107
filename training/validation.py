"""Validation during training: metrics over the held-out images, reconstruction grids, and the weights they use.

Validation, sample grids and export use the EMA weights when the run keeps an EMA (`weights_for_use`).
Metrics are computed per image with the same functions `kl-ae eval` uses and gathered from every process; the
reconstruction is the decoded posterior mode, through the family's adapter (`kl_autoencoder.interface`). Images of
any channel count: grids drawn as `kl_ae.common.views.display` draws them (alpha over a checkerboard, one channel in
grayscale, N bands as a false-colour triplet: the first of `bands`, or the first three).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import Accelerator
from PIL import Image
from torchvision.utils import make_grid

from kl_ae.common.frames import is_clip
from kl_ae.common.metrics import reconstruction_metrics
from kl_ae.common.runs import checkpoint_name
from kl_ae.common.views import display
from kl_autoencoder.interface import LatentAutoencoder
from training.step import GuardedEMA
from training.trackers import log_image


def weights_for_use(
    live: LatentAutoencoder, ema: GuardedEMA | None, ema_model: LatentAutoencoder | None
) -> LatentAutoencoder:
    """The EMA weights when EMA is on (copied into `ema_model`, with the live model's buffers: a BatchNorm's running
    statistics, which the EMA does not average), else the live ones."""
    if ema is None:
        return live
    ema.copy_to(ema_model.module.parameters())
    for kept, current in zip(ema_model.module.buffers(), live.module.buffers()):
        kept.copy_(current)
    return ema_model


def reconstruct(ae: LatentAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """The decoded posterior mode of x, in eval mode (dropout off, a VQ codebook not updated)."""
    was_training = ae.module.training
    ae.module.eval()
    recon = ae.decode(ae.encode(x).mode())
    ae.module.train(was_training)
    return recon


class Validator:
    """Held-out metrics (`val/psnr`, `val/ssim`, `val/lpips`) logged to the trackers, the console and
    `val.jsonl`, and reconstruction grids in `samples/` and the trackers (`val/samples`), for the weights
    `weights()` returns."""

    def __init__(
        self, accelerator: Accelerator, val_dl, sample_batch: torch.Tensor, lpips, out: Path, weights,
        bands: list[int] | None = None,
    ):  # fmt: skip
        self.accelerator, self.val_dl, self.lpips, self.out, self.weights = accelerator, val_dl, lpips, out, weights
        self.sample_batch = sample_batch  # a fixed batch of held-out images (main process only, unsharded)
        self.bands = bands  # N channels: the triplet the grids show (loss.lpips_channels)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics of the posterior mode over every held-out image, gathered from all processes."""
        model = self.weights()
        values: dict[str, list[torch.Tensor]] = {}
        for x in self.val_dl:
            for k, v in reconstruction_metrics(x, reconstruct(model, x), self.lpips).items():
                values.setdefault(k, []).append(self.accelerator.gather_for_metrics(v))
        metrics = {f"val/{k}": torch.cat(v).nanmean().item() for k, v in values.items()}  # one-frame clips: no rest
        metrics["val/images"] = len(torch.cat(values["psnr"]))
        return metrics

    def record(self, step: int, history: dict) -> dict:
        """Evaluate, log everywhere and keep the first and the last evaluation in `history`."""
        metrics = self.evaluate()
        entry = {"step": step, **metrics}
        history["first_eval"] = history["first_eval"] or entry
        history["last_eval"] = entry
        self.accelerator.log(metrics, step=step)
        self.accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if self.accelerator.is_main_process:
            with open(self.out / "val.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
        return entry

    @torch.no_grad()
    def save_samples(self, step: int) -> None:
        """Held-out images (top row) and their reconstructions (bottom row) as `samples/step_N.png`, and to the
        trackers as the image `val/samples`; clips: a row of frames per clip, its reconstruction below."""
        if not self.accelerator.is_main_process:
            return
        x = self.sample_batch.to(self.accelerator.device)
        recon = reconstruct(self.weights(), x).float().clamp(-1, 1)
        path = self.out / "samples" / f"{checkpoint_name(step)}.png"
        if is_clip(x):  # clips: each clip's frames in a row, its reconstruction's frames below
            x, recon = x[:4], recon[:4]
            rows = torch.stack([x, recon], 1).transpose(2, 3)  # (B, 2, T, 3, H, W)
            x, recon = rows.flatten(0, 2), None
            nrow = rows.shape[2]
        else:
            nrow = len(x)
        tiles = x if recon is None else torch.cat([x, recon])
        tiles = tiles * 0.5 + 0.5 if is_clip(self.sample_batch) else display(tiles * 0.5 + 0.5, self.bands)
        grid = make_grid(tiles, nrow=nrow)  # (3, H, W); as save_image writes it:
        pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()
        Image.fromarray(pixels).save(path)
        log_image(self.accelerator, "val/samples", pixels, path, step)
