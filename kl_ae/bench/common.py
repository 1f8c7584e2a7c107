"""What every section of `kl-ae bench` shares: its settings (`BenchConfig`), the inputs (smooth random images, the
bundled photographs), the models (a preset's random init and its diffusers twin), LPIPS on a random backbone, and
interleaved timing. The sections import this module; `run.py` imports the sections.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
from dataclasses import dataclass

import torch

from kl_ae.bench.device import timed

SECTIONS = (
    "train",
    "default",
    "codec",
    "data",
    "peak",
    "optim",
    "tiled",
    "maxbatch",
    "fp16",
    "families",
    "video-memory",
    "video-data",
    "video-train",
)
# tiled decoding of large images takes minutes on a CPU; maxbatch and fp16 are meant for a GPU; families builds
# and times eight models
DEFAULT_SECTIONS = ("train", "codec", "data", "peak", "optim")
NORMS = ("tile", "estimate", "exact")
# the families section's autoencoder families (`kl_ae.bench.families.family_config`)
FAMILIES = ("flux2", "dc-ae", "qwen-image", "wan", "hunyuan-image", "rae", "sd", "sd3")


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
    # families section: which families, and the width of their first level (SD's is 128)
    families: tuple[str, ...] = FAMILIES
    # video-memory section: the video families measured (kl_ae.bench.video.VIDEO_FAMILIES)
    video_families: tuple[str, ...] = ("wan-video", "hunyuan-video", "ltx-video", "cogvideox")
    family_width: int = 32
    # dc-vs-sd section: one pair of training runs per seed, and the optimizer steps of each
    seeds: tuple[int, ...] = (0, 1, 2)
    train_steps: int = 300


def in_child(target, *args) -> dict:
    """`target(*args, queue)` in a fresh spawned process (a CPU process's peak RSS only grows, so each memory figure
    needs one): the dict it puts on the queue, or {"error": "exit N"} where it failed."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=target, args=(*args, queue))
    child.start()
    child.join()
    return queue.get() if child.exitcode == 0 else {"error": f"exit {child.exitcode}"}


def interleaved_times(fns: dict, steps: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function in each of `repeats` turns, timed in turns after one untimed warm-up call
    each (the device's queued work waited for at both ends of each timing)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(lambda fn=fn: [fn() for _ in range(steps)]) / steps)
    return times


def interleaved(fns: dict, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function (`interleaved_times`)."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, steps, repeats).items()}


def images(resolution: int, batch: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """Smooth random images in [-1, 1] (B, 3, H, W): cheaper than decoding files, not constant."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, max(resolution // 8, 1), max(resolution // 8, 1), generator=g)
    x = torch.nn.functional.interpolate(low, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1).to(device)


def photos(resolution: int, count: int) -> torch.Tensor:
    """The bundled photographs as the trainer's `sample` source loads them, held-out ones first, shorter side
    resized to `resolution` and center-cropped: (count, 3, resolution, resolution) in [-1, 1]."""
    from kl_ae.common.data import DataConfig, build_datasets

    train, val = build_datasets(DataConfig(resolution=resolution, random_crop=False, hflip=False), seed=0)
    indexed = [(val, i) for i in range(len(val))] + [(train, i) for i in range(len(train))]
    return torch.stack([ds[i] for ds, i in indexed[:count]])


def diffusers_twin(ours):
    """diffusers' AutoencoderKL holding our KL autoencoder's weights (loaded strictly), fp32."""
    from diffusers import AutoencoderKL

    from kl_autoencoder import to_diffusers_config, to_diffusers_state_dict

    theirs = AutoencoderKL(**to_diffusers_config(ours.config))
    theirs.load_state_dict(to_diffusers_state_dict(ours.state_dict()), strict=True)
    return theirs


def model_pair(preset: str, seed: int, device: str = "cpu"):
    """Our autoencoder of `preset` (initialised from `seed`) and its diffusers twin, both fp32."""
    from kl_autoencoder import PRESETS, Autoencoder

    torch.manual_seed(seed)
    ours = Autoencoder(PRESETS[preset])
    return ours.to(device), diffusers_twin(ours).to(device)


def lpips_random(dtype: torch.dtype | None = None, device: str = "cpu"):
    """LPIPS on a RANDOM VGG backbone (no weights offline): the cost is right, the values are not."""
    from kl_ae.common.lpips import LPIPS

    return LPIPS(net="vgg", random_backbone=True, dtype=dtype).to(device)
