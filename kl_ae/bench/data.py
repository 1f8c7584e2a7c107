"""The data section of `kl-ae bench` (`--what data`): images per second the default recipe's training set
delivers (decoded from its files, and cached) against what the default step consumes (`bench_data_pipeline`);
and images per second ONE data worker delivers from JPEG webdataset shards (the streamed path: `datasets`
webdataset streaming, our shuffle blocks, decoding, resizing, a random crop and flip) against the same images as
a folder (the map-style path), at `--resolution` (256 for the recorded figure), and how many such workers one
training step of `--preset` (kl-f8) consumes (`bench_shards`).

The shards' images are the bundled photographs, cut into `32 x --steps` distinct JPEGs (quality 90) whose shorter side
is 1.25x the resolution, as img2dataset writes them. Both paths run in this process (one worker), interleaved,
`--repeats` times, from the page cache; the median is reported. The step is our training step (G and D, random
LPIPS backbone, fp32) on CUDA when there is one, else on this CPU.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from kl_ae.bench.common import BenchConfig, images, interleaved, lpips_random
from kl_ae.bench.step import our_step_fn


def write_jpegs(folder: Path, count: int, resolution: int, seed: int) -> None:
    """`count` distinct JPEGs cut from the bundled photographs: random crops, shorter side 1.25x `resolution`."""
    from kl_ae.common.images import list_sample_images, resize_shorter, to_rgb

    photos = [resize_shorter(to_rgb(Image.open(p)), round(1.6 * resolution)) for p in list_sample_images()]
    g = torch.Generator().manual_seed(seed)
    side = round(1.25 * resolution)
    for i in range(count):
        img = photos[i % len(photos)]
        w, h = img.size
        cw, ch = min(w, round(side * 1.33)), side  # landscape crops, as most web images
        left, top = (int(torch.randint(0, max(1, d) + 1, (), generator=g)) for d in (w - cw, h - ch))
        crop = img.crop((left, top, left + cw, top + ch))
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i // len(photos) % 2 else crop
        crop.save(folder / f"{i:06d}.jpg", quality=90)


def step_seconds(preset: str, resolution: int, batch_size: int, steps: int, repeats: int, seed: int) -> tuple:
    """(median seconds of one training step of `preset`, the device it ran on)."""
    from kl_autoencoder import PRESETS, Autoencoder

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    model = Autoencoder(PRESETS[preset]).to(device)
    x, lpips = images(resolution, batch_size, seed).to(device), lpips_random().to(device)
    step = our_step_fn(model, x, "fp32", True, lpips)

    def synced() -> None:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return interleaved({"step": synced}, steps, repeats)["step"], device.type


def bench_shards(preset: str, resolution: int, batch_size: int, steps: int, repeats: int, seed: int) -> dict:
    from kl_ae.common.config import DataConfig
    from kl_ae.common.data import build_datasets
    from kl_ae.common.shards import write_shards
    from kl_ae.common.stream import build_stream

    count = 32 * steps
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "folder", Path(tmp) / "shards"
        folder.mkdir()
        write_jpegs(folder, count, resolution, seed)
        pattern = write_shards(folder, shards, per_shard=max(1, count // 4), progress=False)
        common = dict(resolution=resolution, repeats=1, val_source="sample", num_workers=0)
        table, _ = build_datasets(DataConfig(source=str(folder), **common), seed)
        table.cache = None  # every image decoded from its file, as in a real run on a large folder
        stream, _, _ = build_stream(DataConfig(source=pattern, **common), seed, 0, 1)
        times: dict[str, list[float]] = {"folder": [], "stream": []}

        def folder_pass(epoch: int) -> int:
            table.set_epoch(epoch)
            for i in range(len(table)):
                table[i]
            return len(table)

        def stream_pass(epoch: int) -> int:
            stream.set_epoch(epoch)
            return sum(1 for _ in stream)

        folder_pass(0), stream_pass(0)  # warm-up: page cache, imports
        for r in range(repeats):
            for name, run in (("folder", folder_pass), ("stream", stream_pass)):
                t = time.perf_counter()
                n = run(r + 1)
                times[name].append((time.perf_counter() - t) / n)
    folder_s, stream_s = statistics.median(times["folder"]), statistics.median(times["stream"])
    step_s, device = step_seconds(preset, resolution, batch_size, max(1, steps // 4), repeats, seed)
    consume = batch_size / step_s
    return {
        "folder_img_s_per_worker": 1 / folder_s,
        "stream_img_s_per_worker": 1 / stream_s,
        "stream_over_folder": folder_s / stream_s,  # target >= 0.9
        "step_s": step_s,
        "step_img_s": consume,
        "workers_needed": consume * stream_s,  # data workers to keep one step of `preset` fed
        "config": (
            f"{count} JPEGs (q90, shorter side {round(1.25 * resolution)} px) in 4 shards vs a folder, "
            f"{resolution} px random crops + flips, one worker; step: {preset} at {resolution} px, batch "
            f"{batch_size}, G+D, fp32, on {device}"
        ),
    }


def bench_data_pipeline(cfg: BenchConfig) -> dict:
    """The data section: images/s decoded and augmented by the default recipe's training set, against what the
    default step eats; and JPEG shards against a folder (`bench_shards`)."""
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
