"""Throughput and memory measurements: our training step against reference-style loops, bf16 against fp32,
achieved FLOP/s against a measured GEMM peak (those two in `bench_step.py`), our codec against diffusers'
`AutoencoderKL`, the data pipeline against the trainer's consumption (and JPEG shards against a folder,
`bench_data.py`), tiled decoding (`bench_tiled.py`), and on a GPU the largest batch and the fp16 path
(`bench_gpu.py`). `--device cuda` runs every section on the GPU
(`bench_device.py`: synchronised timing, peak allocation, MFU against the GPU's bf16 datasheet peak).

Every comparison is measured in one process, interleaved (ours, baseline, ours, ...), and reported as a median;
on a shared machine only the ratios are meaningful. LPIPS runs with a RANDOM VGG backbone (no weights offline):
the cost is right, the values are not.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import torch

from kl_ae.bench.data import bench_shards
from kl_ae.bench.device import autocast, device_info, peak_memory_mib, reset_peak_memory
from kl_ae.bench.gpu import bench_fp16, bench_maxbatch
from kl_ae.bench.step import (
    bench_default,
    bench_optim,
    bench_peak,
    bench_train,
    diffusers_twin,
    images,
    interleaved,
    lpips_random,
    model_pair,
    our_step_fn,
)
from kl_ae.bench.tiled import bench_tiled

SECTIONS = ("train", "default", "codec", "data", "peak", "optim", "tiled", "maxbatch", "fp16")
# tiled decoding of large images takes minutes on a CPU; maxbatch and fp16 are meant for a GPU
DEFAULT_SECTIONS = ("train", "codec", "data", "peak", "optim")
NORMS = ("tile", "estimate", "exact")


@dataclass
class BenchConfig:
    preset: str = "kl-f8"
    resolution: int = 128
    batch_size: int = 2
    steps: int = 2  # timed steps (or calls) per measurement; each measurement is repeated `repeats` times
    repeats: int = 3
    precision: str = "both"  # fp32 | bf16 | both
    what: tuple[str, ...] = DEFAULT_SECTIONS
    seed: int = 0
    tiled_sizes: tuple[int, ...] = (1024, 2048)  # output sizes (px, square) for the tiled-decode section
    tile: int = 512  # tile size in output pixels
    overlap: int = 64
    tiled_norms: tuple[str, ...] = NORMS  # decode_tiled's GroupNorm modes to measure ("tile" is the baseline)
    model: str | None = None  # codec and tiled sections: a trained KL model (run or folder) instead of the init
    device: str = "cpu"  # cpu or cuda
    max_batch: int = 1024  # maxbatch section: the largest batch tried


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float().clamp(-1, 1) - b.float().clamp(-1, 1)).square().mean().item()
    return 10 * math.log10(4.0 / max(mse, 1e-20))  # images in [-1, 1]: peak-to-peak 2


def peak_rss_child(
    preset: str, resolution: int, batch: int, model: str, op: str, seed: int, device: str = "cpu"
) -> float:
    """The rise of this process's peak memory (MiB; CPU: RSS, CUDA: torch's allocation) over one fp32 encode or
    decode under no_grad."""
    from kl_autoencoder import PRESETS, Autoencoder

    torch.set_num_threads(1)  # the four children run side by side
    torch.manual_seed(seed)
    cfg = PRESETS[preset]
    if model == "ours":
        ae = Autoencoder(cfg).eval().to(device)
        encode, decode = (lambda x: ae.encode(x).mode()), ae.decode
    else:
        from diffusers import AutoencoderKL

        from kl_autoencoder.diffusers_format import to_diffusers_config

        vae = AutoencoderKL(**to_diffusers_config(cfg)).eval().to(device)
        encode, decode = (lambda x: vae.encode(x).latent_dist.mode()), (lambda z: vae.decode(z).sample)
    f = cfg.downsample_factor
    x = images(resolution, batch, seed, device)
    z = torch.randn(batch, cfg.latent_channels, resolution // f, resolution // f, device=device)
    with torch.no_grad():
        reset_peak_memory(device)
        before = peak_memory_mib(device) if device == "cpu" else torch.cuda.memory_allocated() / 2**20
        encode(x) if op == "encode" else decode(z)
        return peak_memory_mib(device) - before


def peak_memory(cfg: BenchConfig) -> dict[str, float]:
    """Peak-memory rise (MiB) of each (model, op), each in a fresh Python process: a clean heap, so the rise is
    what the call itself needed (activations and workspace), not memory freed earlier and reused."""
    running = {}
    for m in ("ours", "diffusers"):
        for op in ("encode", "decode"):
            args = (cfg.preset, cfg.resolution, cfg.batch_size, m, op, cfg.seed, cfg.device)
            code = f"from kl_ae.bench.run import peak_rss_child; print(peak_rss_child(*{args!r}))"
            running[f"{m}_{op}_peak_mib"] = subprocess.Popen(
                [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
    return {k: float(p.communicate(timeout=600)[0].split()[-1]) for k, p in running.items()}


def photos(resolution: int, count: int) -> torch.Tensor:
    """The bundled photographs as the trainer's `sample` source loads them, held-out ones first, shorter side
    resized to `resolution` and center-cropped: (count, 3, resolution, resolution) in [-1, 1]."""
    from kl_ae.common.data import DataConfig, build_datasets

    train, val = build_datasets(DataConfig(resolution=resolution, random_crop=False, hflip=False), seed=0)
    indexed = [(val, i) for i in range(len(val))] + [(train, i) for i in range(len(train))]
    return torch.stack([ds[i] for ds, i in indexed[:count]])


def codec_models(cfg: BenchConfig):
    """(ours, diffusers' AutoencoderKL with the same weights, input images): the preset's random init on smooth
    random images, or `cfg.model`'s trained weights on the bundled photographs."""
    if cfg.model is None:
        ours, theirs = model_pair(cfg.preset, cfg.seed, cfg.device)
        return ours, theirs, images(cfg.resolution, cfg.batch_size, cfg.seed + 1, cfg.device)
    from kl_ae.common.runs import latest_weights
    from kl_autoencoder import Autoencoder

    ours = Autoencoder.from_pretrained(latest_weights(cfg.model))
    if ours.config.bottleneck != "kl":
        raise ValueError(f"--model: {cfg.model} is a VQ model; the codec section compares KL models")
    return (
        ours.to(cfg.device),
        diffusers_twin(ours).to(cfg.device),
        photos(cfg.resolution, cfg.batch_size).to(cfg.device),
    )


def bench_codec(cfg: BenchConfig, memory: dict[str, float]) -> dict:
    """Encode/decode img/s of our model (fp32, and bf16 autocast) against diffusers fp32 on identical weights."""
    ours, theirs, x = codec_models(cfg)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        z = theirs.encode(x).latent_dist.mode()
        ref = theirs.decode(z).sample
        max_diff = max((ours.encode(x).mode() - z).abs().max().item(), (ours.decode(z) - ref).abs().max().item())
        with autocast(torch.bfloat16, cfg.device):
            fast = ours.decode(ours.encode(x).mode()).float()

        def bf16(fn):
            def run():
                with autocast(torch.bfloat16, cfg.device):
                    fn()

            return run

        s = interleaved(
            {
                "ours_encode": lambda: ours.encode(x).mode(),
                "diffusers_encode": lambda: theirs.encode(x).latent_dist.mode(),
                "ours_bf16_encode": bf16(lambda: ours.encode(x).mode()),
                "ours_decode": lambda: ours.decode(z),
                "diffusers_decode": lambda: theirs.decode(z).sample,
                "ours_bf16_decode": bf16(lambda: ours.decode(z)),
            },
            cfg.steps,
            cfg.repeats,
        )
    out = {f"{k}_img_s": cfg.batch_size / v for k, v in s.items()}
    for op in ("encode", "decode"):
        out[f"{op}_fp32_over_diffusers"] = s[f"diffusers_{op}"] / s[f"ours_{op}"]
        out[f"{op}_bf16_over_diffusers_fp32"] = s[f"diffusers_{op}"] / s[f"ours_bf16_{op}"]
    out["max_abs_diff_fp32"] = max_diff
    out["psnr_diffusers_fp32_db"] = _psnr(ref, x)
    out["psnr_ours_bf16_db"] = _psnr(fast, x)
    out["psnr_diff_db"] = abs(out["psnr_ours_bf16_db"] - out["psnr_diffusers_fp32_db"])
    out |= memory
    out["weights"] = (
        f"{cfg.model} on the bundled photographs" if cfg.model else "random init (same weights in both models)"
    )
    if cfg.model:
        out["memory_measured_for"] = f"preset {cfg.preset}, random init"
    return out


def bench_data(cfg: BenchConfig) -> dict:
    """Images/s decoded and augmented by the default recipe's training set, against what the default step eats."""
    from kl_ae.common.data import build_datasets
    from kl_autoencoder import PRESETS, Autoencoder
    from training.config import TrainConfig

    data_cfg = TrainConfig().data  # the default recipe: 64 px crops from 128 px, the bundled sample photos
    train_ds, _ = build_datasets(data_cfg, cfg.seed)
    n = min(len(train_ds), 16 * cfg.steps)
    cache, train_ds.cache = train_ds.cache, None  # cold: every image decoded from its file and resized

    def per_image() -> float:
        t = time.perf_counter()
        for i in range(n):
            train_ds[i]
        return (time.perf_counter() - t) / n

    cold = statistics.median(per_image() for _ in range(cfg.repeats))
    train_ds.cache = cache  # warm: the trainer's steady state on this small set (decoded uint8 cached)
    per_image()
    warm = statistics.median(per_image() for _ in range(cfg.repeats))
    torch.manual_seed(cfg.seed)
    tiny = Autoencoder(PRESETS["tiny"]).to(cfg.device)
    x = images(data_cfg.resolution, data_cfg.batch_size, cfg.seed, cfg.device)
    lpips = lpips_random(device=cfg.device)
    s = interleaved(
        {gan: our_step_fn(tiny, x, "bf16", gan == "gan", lpips) for gan in ("gan", "nogan")}, cfg.steps, cfg.repeats
    )
    consume = data_cfg.batch_size / min(s.values())  # the faster step (before disc_start) eats the most
    return {
        "data_img_s": 1 / cold,
        "data_cached_img_s": 1 / warm,
        "train_tiny_bf16_gan_img_s": data_cfg.batch_size / s["gan"],
        "train_tiny_bf16_nogan_img_s": data_cfg.batch_size / s["nogan"],
        "data_over_consumption": 1 / cold / consume,
        "data_cached_over_consumption": 1 / warm / consume,
        "config": f"sample source, {data_cfg.resolution} px crops from {data_cfg.resize} px, num_workers 0",
        "shards_vs_folder": bench_shards(cfg.preset, cfg.resolution, cfg.batch_size, cfg.steps, cfg.repeats, cfg.seed),
    }


def run_bench(cfg: BenchConfig) -> dict:
    unknown = set(cfg.what) - set(SECTIONS)
    if unknown:
        raise ValueError(f"--what: unknown section(s) {sorted(unknown)}; choose from {list(SECTIONS)}")
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
        result["data"] = bench_data(replace(cfg))
    if "optim" in cfg.what:
        result["optim"] = bench_optim(cfg)
    if "tiled" in cfg.what:
        result["tiled"] = bench_tiled(cfg)
    if "maxbatch" in cfg.what:
        result["maxbatch"] = bench_maxbatch(cfg)
    if "fp16" in cfg.what:
        result["fp16"] = bench_fp16(cfg)
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
