"""The tiled-decoding section of `kl-ae bench` (`--what tiled`): for each image size and each GroupNorm mode of
`decode_tiled` (`norm`: tile, estimate, exact; kl_autoencoder/tiling.py), the wall time, the peak memory, the FLOPs
and the PSNR against the untiled decode, with the plain tiled pass (`norm="tile"`) as the baseline of the ratios.

Every decode runs in a fresh Python process, so its peak memory is its own (CPU: the process's peak RSS, weights,
latents, output and workspace included; CUDA: torch's peak allocation). FLOPs are counted on the meta device
(shapes only, exact, no compute), so the cost ratios do not depend on a noisy clock.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from kl_ae.bench.common import BenchConfig, photos
from kl_ae.bench.device import autocast, peak_memory_mib, reset_peak_memory, timed

UNTILED_MAX = {"cpu": 2048, "cuda": 4096}  # the largest size whose untiled decode (the PSNR reference) is run


def _model(preset: str, model: str | None, seed: int):
    from kl_autoencoder import PRESETS, Autoencoder

    if model is None:
        torch.manual_seed(seed)
        return Autoencoder(PRESETS[preset]).eval()
    from kl_ae.common.runs import latest_weights

    return Autoencoder.from_pretrained(latest_weights(model))


def tiled_child(
    preset: str,
    model: str | None,
    seed: int,
    latents: str,
    tile: int,
    overlap: int,
    norm: str | None,
    device: str,
    save: str,
    bf16: bool,
) -> dict:
    """Decode the latents saved at `latents`, tiled with `norm` (None: untiled), in bf16 autocast if asked and the
    device runs it natively (else fp32); writes the images to `save`, returns the seconds and the peak memory."""
    from kl_autoencoder.tiling import decode_tiled

    ae = _model(preset, model, seed).to(device)
    z = torch.load(latents).to(device)
    bf16 = bf16 and (torch.cuda.is_bf16_supported() if device == "cuda" else torch.cpu._is_avx512_bf16_supported())
    reset_peak_memory(device)
    result = {}

    def decode() -> None:
        with torch.no_grad(), autocast(torch.bfloat16 if bf16 else None, device):
            result["y"] = ae.decode(z) if norm is None else decode_tiled(ae, z, tile, overlap, norm)

    seconds = timed(decode)
    torch.save(result["y"].float().cpu(), save)
    return {"seconds": seconds, "peak_memory_mib": peak_memory_mib(device), "precision": "bf16" if bf16 else "fp32"}


def tiled_flops(preset: str, model: str | None, shape: tuple[int, ...], tile: int, overlap: int, norm: str | None):
    """FLOPs of one decode of latents of `shape`, counted on the meta device (no values, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from kl_autoencoder import PRESETS, Autoencoder
    from kl_autoencoder.tiling import decode_tiled

    cfg = PRESETS[preset] if model is None else _model(preset, model, 0).config
    with torch.device("meta"):
        ae = Autoencoder(cfg).eval()
    z = torch.empty(shape, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        ae.decode(z) if norm is None else decode_tiled(ae, z, tile, overlap, norm)
    return counter.get_total_flops()


def _child(call: str, timeout: float) -> dict:
    code = f"import json; from kl_ae.bench.tiled import *; print(json.dumps({call}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """PSNR per image, images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).square().flatten(1).mean(1)
    return [10 * math.log10(4.0 / max(m, 1e-20)) for m in mse.tolist()]


def _latents(cfg: BenchConfig, size: int) -> torch.Tensor:
    """The latents of the bundled photographs resized to `size` (one for the preset's random init, `batch_size`
    for a trained model), encoded tiled with estimated statistics, so that no untiled encode of a large image is
    needed. Photographs, not random latents: white-noise latents have none of the spatial correlation the
    statistics modes are about."""
    from kl_autoencoder.tiling import encode_tiled

    ae = _model(cfg.preset, cfg.model, cfg.seed).to(cfg.device)
    x = photos(size, cfg.batch_size if cfg.model else 1).to(cfg.device)
    tile = min(cfg.tile, size)
    return encode_tiled(ae, x, tile, min(cfg.overlap, tile // 2), "estimate").mode().cpu()


def bench_tiled(cfg: BenchConfig) -> dict:
    """Per size: the untiled decode (the PSNR reference) and each of `cfg.tiled_norms`; ratios against "tile".
    In bf16 (`--precision bf16` or `both`, where native) the tiled and untiled decodes also round differently, which
    lowers every PSNR; `--precision fp32` measures the modes alone."""
    out: dict = {}
    for size in sorted(cfg.tiled_sizes):
        row: dict = {}
        with tempfile.TemporaryDirectory() as tmp:
            latents = str(Path(tmp) / "z.pt")
            z = _latents(cfg, size)
            torch.save(z, latents)
            runs = ([None] if size <= UNTILED_MAX[cfg.device] else []) + list(cfg.tiled_norms)
            for norm in runs:
                save = str(Path(tmp) / f"{norm}.pt")
                bf16 = cfg.precision != "fp32"
                args = (cfg.preset, cfg.model, cfg.seed, latents, cfg.tile, cfg.overlap, norm, cfg.device, save, bf16)
                r = _child(f"tiled_child{args!r}", timeout=24 * 3600)
                if "error" not in r:
                    r["gflop"] = tiled_flops(cfg.preset, cfg.model, tuple(z.shape), cfg.tile, cfg.overlap, norm) / 1e9
                    if None in runs and norm is not None and "error" not in row.get("untiled", {}):
                        psnr = _psnr(torch.load(save), torch.load(str(Path(tmp) / "None.pt")))
                        r["psnr_vs_untiled_db"] = min(psnr)
                        if len(psnr) > 1:
                            r["psnr_vs_untiled_db_per_image"] = psnr
                row["untiled" if norm is None else norm] = r
        base = row.get("tile", {})
        for name, r in row.items():
            if name != "tile" and "error" not in r and "error" not in base and base:
                r["time_over_tile"] = r["seconds"] / base["seconds"]
                r["flops_over_tile"] = r["gflop"] / base["gflop"]
        out[f"size_{size}"] = row
    memory = "torch's peak CUDA allocation" if cfg.device == "cuda" else "the process's peak RSS"
    weights = cfg.model or "random init"
    out["settings"] = (
        f"{cfg.preset} ({weights}), latents of the bundled photographs, tile {cfg.tile} px, overlap {cfg.overlap} px;"
        f" memory: {memory}"
    )
    return out
