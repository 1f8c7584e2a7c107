"""`kl-ae bench`: runs the sections asked for and returns their figures. Each section is a module of its own:
our training step against reference-style loops, bf16 against fp32, the default run's step, the optimizer and EMA,
and achieved FLOP/s against a measured GEMM peak (`step.py`); our codec against diffusers' `AutoencoderKL`
(`codec.py`); the data pipeline against the trainer's consumption, and JPEG shards against a folder (`data.py`);
tiled decoding (`tiled.py`); on a GPU the largest batch and the fp16 path (`gpu.py`); every autoencoder family
through kl-ae against its diffusers class (`families.py`); the modern formats: DC-AE's architecture against SD's at
f32, our DC step, the step time and memory of dc-f32c32 and flux2-f8c32 against kl-f8 (`formats.py`).
`--device cuda` runs every section on the GPU (`device.py`: synchronised timing, peak allocation, MFU against the
GPU's bf16 datasheet peak); video: memory of long clips whole against chunked, and clips decoded per second
against a video step's demand (`video.py`); a Wan training step against a plain loop over diffusers' class, and its
memory with gradient checkpointing off and on (`video_train.py`).

Every comparison is measured in one process, interleaved (ours, baseline, ours, ...), and reported as a median;
on a shared machine only the ratios are meaningful. LPIPS runs with a RANDOM VGG backbone (no weights offline):
the cost is right, the values are not.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from kl_ae.bench.codec import bench_codec, peak_memory
from kl_ae.bench.common import NORMS, SECTIONS, BenchConfig
from kl_ae.bench.data import bench_data_pipeline
from kl_ae.bench.device import device_info
from kl_ae.bench.families import bench_families
from kl_ae.bench.formats import SECTIONS as FORMAT_SECTIONS
from kl_ae.bench.formats import bench_formats
from kl_ae.bench.gpu import bench_fp16, bench_maxbatch
from kl_ae.bench.step import bench_default, bench_optim, bench_peak, bench_train
from kl_ae.bench.tiled import bench_tiled
from kl_ae.bench.video import bench_video_data, bench_video_memory
from kl_ae.bench.video_train import bench_video_train

__all__ = ["BenchConfig", "format_table", "run_bench"]


def run_bench(cfg: BenchConfig) -> dict:
    unknown = set(cfg.what) - set(SECTIONS) - set(FORMAT_SECTIONS)
    if unknown:
        raise ValueError(f"--what: unknown section(s) {sorted(unknown)}; choose from {[*SECTIONS, *FORMAT_SECTIONS]}")
    if cfg.precision not in ("fp32", "bf16", "both"):
        raise ValueError(f"--precision: choose fp32, bf16 or both, got {cfg.precision!r}")
    if unknown := set(cfg.tiled_norms) - set(NORMS):
        raise ValueError(f"--tiled-norms: unknown mode(s) {sorted(unknown)}; choose from {list(NORMS)}")
    precisions = ["fp32", "bf16"] if cfg.precision == "both" else [cfg.precision]
    result: dict = {
        "config": {k: v for k, v in vars(cfg).items()} | {"what": list(cfg.what)},
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), **device_info(cfg.device)},
    }
    # first: children started after LPIPS/torchvision were imported here report 0 MiB rises (cause not found)
    memory = peak_memory(cfg) if "codec" in cfg.what else {}
    if "train" in cfg.what:
        result["train"] = bench_train(cfg, precisions)
    if "default" in cfg.what:
        result["default"] = bench_default(cfg, precisions)
    if "peak" in cfg.what:
        result["peak"] = bench_peak(cfg, precisions)
    if "codec" in cfg.what:
        result["codec"] = bench_codec(cfg, memory)
    if "data" in cfg.what:
        result["data"] = bench_data_pipeline(replace(cfg))
    if "optim" in cfg.what:
        result["optim"] = bench_optim(cfg)
    if "tiled" in cfg.what:
        result["tiled"] = bench_tiled(cfg)
    if "maxbatch" in cfg.what:
        result["maxbatch"] = bench_maxbatch(cfg)
    if "fp16" in cfg.what:
        result["fp16"] = bench_fp16(cfg)
    if "families" in cfg.what:
        result["families"] = bench_families(cfg)
    if "video-memory" in cfg.what:
        result["video-memory"] = bench_video_memory(cfg)
    if "video-data" in cfg.what:
        result["video-data"] = bench_video_data(cfg)
    if "video-train" in cfg.what:
        result["video-train"] = bench_video_train(cfg, precisions)
    result |= bench_formats(cfg)  # the sections of FORMAT_SECTIONS that cfg.what names
    return result


def format_table(result: dict) -> str:
    """The measurements as `section  name  value` lines."""
    lines = []

    def walk(prefix: str, d: dict) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            elif isinstance(v, float):
                lines.append(f"{prefix}{k:<40} {v:12.4g}")
            else:
                lines.append(f"{prefix}{k:<40} {v}")

    walk("", {k: v for k, v in result.items() if k != "config"})
    return "\n".join(lines)
