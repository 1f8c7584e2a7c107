"""Two sections of `kl-ae bench` meant for a GPU, runnable anywhere: the largest batch our training step fits
(`--what maxbatch`) and the fp16 path with its loss scaler against bf16 (`--what fp16`).

On a CPU an allocation that does not fit usually ends the process (the kernel's out-of-memory killer) instead of
raising, so there `--max-batch` must stay below what the memory holds.
"""

from __future__ import annotations

import math

import torch

from kl_ae.bench.common import BenchConfig, images, interleaved, lpips_random, model_pair
from kl_ae.bench.device import largest_batch, peak_memory_mib, reset_peak_memory, timed
from kl_ae.bench.step import our_step_fn

PRECISIONS = ("fp16", "bf16")


def bench_maxbatch(cfg: BenchConfig) -> dict:
    """The largest batch (doubling from `cfg.batch_size` up to `cfg.max_batch`) for which two bf16 steps of ours,
    GAN on, run at `cfg.resolution`; its peak memory and img/s (best of `cfg.repeats` steps)."""
    autoencoder, _ = model_pair(cfg.preset, cfg.seed, cfg.device)
    lpips = lpips_random(device=cfg.device)
    best: dict = {}

    def run(batch: int) -> None:
        x = images(cfg.resolution, batch, cfg.seed, cfg.device)
        step = our_step_fn(autoencoder, x, "bf16", True, lpips)
        reset_peak_memory(cfg.device)
        step()
        step()  # the second step also holds the optimizers' state
        seconds = min(timed(step) for _ in range(cfg.repeats))
        best.update(batch=batch, peak_memory_mib=peak_memory_mib(cfg.device), img_s=batch / seconds)

    out = largest_batch(run, cfg.batch_size, cfg.max_batch)
    if best:
        out |= {"peak_memory_mib": best["peak_memory_mib"], "img_s_at_largest": best["img_s"]}
    out["settings"] = f"{cfg.preset}, {cfg.resolution} px, bf16 autocast, GAN on, EMA on"
    return out


def bench_fp16(cfg: BenchConfig) -> dict:
    """Our step (GAN on) in fp16 autocast with a GradScaler, as the trainer runs `train.mixed_precision=fp16`,
    against bf16, interleaved; the loss scale after the timed steps (it halves at every skipped overflow)."""
    autoencoder, _ = model_pair(cfg.preset, cfg.seed, cfg.device)
    x, lpips = images(cfg.resolution, cfg.batch_size, cfg.seed, cfg.device), lpips_random(device=cfg.device)
    scaler = torch.amp.GradScaler(cfg.device)
    initial = scaler.get_scale()
    fns = {p: our_step_fn(autoencoder, x, p, True, lpips, scaler=scaler if p == "fp16" else None) for p in PRECISIONS}
    s = interleaved(fns, cfg.steps, cfg.repeats)
    finite = all(torch.isfinite(p).all() for p in autoencoder.parameters())
    B = cfg.batch_size
    return {
        "fp16_gan_img_s": B / s["fp16"],
        "bf16_gan_img_s": B / s["bf16"],
        "fp16_over_bf16": s["bf16"] / s["fp16"],
        "loss_scale_initial": initial,
        "loss_scale_final": scaler.get_scale(),  # no growth within 2000 steps: each halving is a skipped step
        "skipped_overflow_steps": round(math.log2(initial / scaler.get_scale())),
        "weights_finite": finite,
        "settings": f"{cfg.preset}, {cfg.resolution} px, batch {B}, GAN on, EMA on",
    }


def _get(d: dict, *keys, default="n/a"):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _fmt(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def summarize(folder: str) -> str:
    """The figures of `benchmarks/gpu.sh`'s JSON files in `folder`, as the Markdown BENCHMARKS.md takes."""
    import json
    from pathlib import Path

    def load(name: str) -> dict:
        path = Path(folder) / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    train, fp16, tiled = load("train"), load("fp16"), load("tiled")
    machine = train.get("machine") or fp16.get("machine") or {}
    cfg = train.get("config", {})
    lines = [
        f"GPU: {machine.get('gpu', machine.get('device', 'n/a'))}, torch {machine.get('torch', 'n/a')}, "
        f"CUDA {machine.get('cuda', 'n/a')}, bf16 datasheet peak {_get(train, 'peak', 'bf16_datasheet_tflop_s')} "
        "TFLOP/s",
        "",
        f"| {cfg.get('preset', '?')}, {cfg.get('resolution', '?')} px, batch {cfg.get('batch_size', '?')}, "
        "bf16, GAN on | value |",
        "|---|---:|",
        f"| ours img/s | {_fmt(_get(train, 'train', 'bf16', 'ours_gan_img_s'), '.2f')} |",
        f"| reference loop img/s | {_fmt(_get(train, 'train', 'bf16', 'reference_gan_img_s'), '.2f')} |",
        f"| ours / reference | {_fmt(_get(train, 'train', 'bf16', 'speedup_gan_vs_reference'), '.2f')}x |",
        f"| achieved TFLOP/s (best step) | {_fmt(_get(train, 'peak', 'bf16', 'achieved_gflop_s') / 1e3, '.1f')} |"
        if isinstance(_get(train, "peak", "bf16", "achieved_gflop_s"), float)
        else "| achieved TFLOP/s | n/a |",
        f"| MFU vs the bf16 datasheet peak | {_fmt(_get(train, 'peak', 'bf16', 'mfu_bf16_datasheet'), '.1%')} |",
        f"| of the measured bf16 GEMM peak | {_fmt(_get(train, 'peak', 'bf16', 'fraction_of_gemm_peak'), '.1%')} |",
    ]
    for name in sorted(p.stem for p in Path(folder).glob("maxbatch_*.json")):
        m = load(name)
        lines.append(
            f"| largest batch at {_get(m, 'config', 'resolution')} px | {_get(m, 'maxbatch', 'largest_batch')} "
            f"(out of memory at {_get(m, 'maxbatch', 'out_of_memory_at')}; "
            f"{_fmt(_get(m, 'maxbatch', 'peak_memory_mib'), '.0f')} MiB, "
            f"{_fmt(_get(m, 'maxbatch', 'img_s_at_largest'), '.1f')} img/s) |"
        )
    lines += [
        f"| fp16 + loss scaler img/s | {_fmt(_get(fp16, 'fp16', 'fp16_gan_img_s'), '.2f')} "
        f"({_fmt(_get(fp16, 'fp16', 'fp16_over_bf16'), '.2f')}x bf16; scale "
        f"{_get(fp16, 'fp16', 'loss_scale_initial')} -> {_get(fp16, 'fp16', 'loss_scale_final')}) |",
        "",
        "| tiled decode | seconds | peak MiB | PSNR vs untiled | time / tile | FLOPs / tile |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for size, row in _get(tiled, "tiled", default={}).items():
        if not isinstance(row, dict):
            continue
        for norm, r in row.items():
            lines.append(
                f"| {size.removeprefix('size_')} px, {norm} | {_fmt(_get(r, 'seconds'), '.2f')} | "
                f"{_fmt(_get(r, 'peak_memory_mib'), '.0f')} | {_fmt(_get(r, 'psnr_vs_untiled_db'), '.1f')} | "
                f"{_fmt(_get(r, 'time_over_tile'), '.2f')} | {_fmt(_get(r, 'flops_over_tile'), '.2f')} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(summarize(sys.argv[1]))
