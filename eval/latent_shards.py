"""`kl-ae encode` from a stream: latents written as shards, one shard set per process, resumable, with an index.

For shard sources (webdataset `.tar` / `.parquet` patterns) and hub datasets with `--streaming`. Each process
encodes its share of the stream (`datasets.distributed.split_dataset_by_node`, in stream order) in chunks of
`per_shard` samples and writes each chunk as `OUT/<process>-<k>.parquet` (columns `latent`, `index`, `path`)
or, with `--format webdataset`, `OUT/<process>-<k>.tar` (members `<index>.latent.npy` and `<index>.json`
holding index and path), each written under a temporary name and renamed. After each file,
`OUT/.progress/<process>.json` records the stream's `state_dict`, so a re-run continues with the next chunk.

`path` is the sample's label (`<shard>:<key>`), `index` its position in the process's stream times the
process count plus the process index: unique and stable. Bad samples are skipped and listed in
`OUT/skipped.txt`. When every process is done, the main process writes `OUT/index.json` (format, files, rows)
and then `latents_config.json` (the normalization and settings), which marks the set complete.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from datasets.distributed import split_dataset_by_node

from kl_ae.common.config import ConfigError
from kl_ae.common.data import crop_flip, decode_resized
from kl_ae.common.images import (
    DECODE_ERRORS,
    Unusable,
    append_skips,
    open_image,
    pixel_limit_lifted,
    read_skipped,
    reason,
    to_rgb,
)
from kl_ae.common.shards import TarWriter, image_of, label_of, open_stream
from kl_ae.common.video_io import read_video
from kl_autoencoder.interface import LatentAutoencoder

CONFIG_FILE = "latents_config.json"
INDEX_FILE = "index.json"
FORMATS = ("parquet", "webdataset")
MAX_PIXELS = 178_956_970  # data.max_pixels' default


def pixels(value, resolution: int | None, factor: int) -> torch.Tensor:
    """(3, H, W) in [-1, 1]: resized and centre-cropped to `resolution`, or at own size cropped to a multiple of
    the downsampling factor; raises one of DECODE_ERRORS."""
    if resolution is not None:
        return crop_flip(decode_resized(value, resolution, MAX_PIXELS), resolution, False, False, 0)
    with pixel_limit_lifted():
        img = to_rgb(open_image(value, MAX_PIXELS))
    w, h = img.size
    th, tw = h // factor * factor, w // factor * factor
    if th == 0 or tw == 0:
        raise ValueError(f"{w}x{h} is smaller than the downsampling factor {factor}")
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # (3, h, w)
    top, left = (h - th) // 2, (w - tw) // 2
    return x[:, top : top + th, left : left + tw].float().div(127.5).sub(1.0)  # (3, th, tw)


def latent_features(latents: list[np.ndarray]) -> datasets.Features:
    """float32 latents: a fixed-shape Array3D (clips' (C, t, h, w): Array4D) when all share one shape (one
    resolution), else nested lists."""
    shapes = {z.shape for z in latents}
    rank = len(next(iter(shapes)))
    if len(shapes) == 1:
        array = datasets.Array4D if rank == 4 else datasets.Array3D
        latent = array(shape=shapes.pop(), dtype="float32")
    else:
        latent = datasets.Value("float32")
        for _ in range(rank):
            latent = datasets.List(latent)
    return datasets.Features({"latent": latent, "index": datasets.Value("int64"), "path": datasets.Value("string")})


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_shard(path: Path, rows: dict, fmt: str, features: datasets.Features) -> None:
    if fmt == "parquet":
        tmp = path.with_name(path.name + ".tmp")
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp))
        os.replace(tmp, path)
        return
    writer = TarWriter(path)
    for latent, index, label in zip(rows["latent"], rows["index"], rows["path"]):
        buffer = io.BytesIO()
        np.save(buffer, latent)
        writer.add(f"{index:012d}.latent.npy", buffer.getvalue())
        writer.add(f"{index:012d}.json", json.dumps({"index": index, "path": label}).encode())
    writer.close()


def clip_pixels(value, frames: int, resolution: int | None, factor: int) -> torch.Tensor:
    """A streamed video's first `frames` frames, (3, T, H, W) in [-1, 1]: resized (shorter side) and centre-cropped
    to `resolution`, or at own size cropped to a multiple of the factor; raises one of DECODE_ERRORS."""
    x, _ = read_video(value, frames, resolution)  # uint8 (3, T, h, w)
    if x.shape[1] < frames:
        raise Unusable(f"too short: {x.shape[1]} frames, {frames} asked for")
    h, w = x.shape[-2:]
    th, tw = (resolution, resolution) if resolution is not None else (h // factor * factor, w // factor * factor)
    if th == 0 or tw == 0:
        raise Unusable(f"{w}x{h} is smaller than the downsampling factor {factor}")
    top, left = (h - th) // 2, (w - tw) // 2
    return x[..., top : top + th, left : left + tw].float().div(127.5).sub(1.0)


def encode_chunk(ae: LatentAutoencoder, chunk: list, indices: list[int], data: str, columns, skip,
                 resolution: int | None, batch_size: int, sample: bool, gen,
                 frames: int | None = None) -> dict:  # fmt: skip
    """The rows {"latent", "index", "path"} of one chunk of the stream (its samples numbered `indices`): latent =
    ae.normalize(z) of each good sample; `skip(label, error)` is told of each bad one. `frames`: a stream of videos,
    each encoded as one clip of its first `frames` frames."""
    good = []  # (index, label, pixels)
    for index, example in zip(indices, chunk):
        value = image_of(example, columns)
        label = label_of(example, value, data)
        try:
            if value is None:
                raise ValueError(f"no {'video' if frames else 'image'} member (none of the columns / extensions)")
            if frames:
                x = clip_pixels(value, frames, resolution, ae.image_multiple)
            else:
                x = pixels(value, resolution, ae.image_multiple)
            ae.check_size(*x.shape[-2:])  # RAE: its one size only
            good.append((index, label, x))
        except DECODE_ERRORS as e:
            skip(label, e)
    rows = {"latent": [], "index": [], "path": []}
    bs = batch_size if resolution is not None else 1  # images of their own sizes cannot share a batch
    device = next(ae.module.parameters()).device
    with torch.no_grad():
        for b in range(0, len(good), bs):
            part = good[b : b + bs]
            posterior = ae.encode(torch.stack([p for _, _, p in part]).to(device))
            z = posterior.sample(gen) if sample else posterior.mode()
            for (index, label, _), latent in zip(part, ae.normalize(z.float()).cpu().numpy()):
                rows["latent"].append(latent)  # (C, h, w); clips (C, t, h, w)
                rows["index"].append(index)
                rows["path"].append(label)
    return rows


def encode_stream(
    ae: LatentAutoencoder,
    data: str,
    out: str | Path,
    settings: dict,
    accelerator: Accelerator,
    resolution: int | None = None,
    batch_size: int = 8,
    sample: bool = False,
    seed: int = 0,
    fmt: str = "parquet",
    per_shard: int = 1000,
    frames: int | None = None,
) -> Path:
    """Encode the stream `data` into latent shards under `out` (see the module docstring). `settings` go to
    latents_config.json; they record `ae.normalization()`, the normalization `ae.normalize` applies here, so the
    record and the latents cannot disagree. `frames`: the stream holds videos; each becomes one latent of its first
    `frames` frames (videos shorter than that are skipped and listed)."""
    out = Path(out)
    if fmt not in FORMATS:
        raise ConfigError(f"--format: choose one of {list(FORMATS)}, got {fmt!r}")
    if per_shard < 1:
        raise ConfigError(f"--per-shard: must be >= 1, got {per_shard}")
    rank, world = accelerator.process_index, accelerator.num_processes
    stream, columns = open_stream(data, key="--data", video=frames is not None)
    stream = split_dataset_by_node(stream, rank=rank, world_size=world)
    progress_file = out / ".progress" / f"{rank:05d}.json"
    progress_file.parent.mkdir(parents=True, exist_ok=True)
    progress = {"files": [], "position": 0, "state": None, "done": False}
    if progress_file.is_file():
        progress = json.loads(progress_file.read_text())
    if progress["done"]:
        accelerator.print(f"process {rank}: its latents are written; nothing to encode")
    gen = torch.Generator(accelerator.device).manual_seed(seed + rank)
    listed = set(read_skipped(out / "skipped.txt"))

    def skip(label: str, error: Exception) -> None:
        if label not in listed:
            listed.add(label)
            append_skips(out / "skipped.txt", {label: reason(error)})

    stream.load_state_dict(progress["state"])  # None: from the start
    samples = iter(stream) if not progress["done"] else iter(())
    ext = "parquet" if fmt == "parquet" else "tar"
    while chunk := list(itertools.islice(samples, per_shard)):
        state = stream.state_dict()
        indices = [(progress["position"] + j) * world + rank for j in range(len(chunk))]
        rows = encode_chunk(ae, chunk, indices, data, columns, skip, resolution, batch_size, sample, gen, frames)
        if rows["latent"]:
            name = f"{rank:05d}-{len(progress['files']):05d}.{ext}"
            _write_shard(out / name, rows, fmt, latent_features(rows["latent"]))
            progress["files"].append({"file": name, "rows": len(rows["latent"])})
        progress["position"] += len(chunk)
        progress["state"] = state
        _write_atomic(progress_file, json.dumps(progress))
    if not progress["done"]:
        progress["done"] = True
        _write_atomic(progress_file, json.dumps(progress))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        parts = [json.loads((out / ".progress" / f"{r:05d}.json").read_text()) for r in range(world)]
        files = [f for p in parts for f in p["files"]]
        index = {"format": fmt, "files": files, "num_latents": sum(f["rows"] for f in files), "processes": world}
        _write_atomic(out / INDEX_FILE, json.dumps(index, indent=1) + "\n")
        skipped = len(read_skipped(out / "skipped.txt"))
        settings = settings | {"format": fmt, "num_images": index["num_latents"], "skipped_images": skipped}
        _write_atomic(out / CONFIG_FILE, json.dumps(settings, indent=1) + "\n")  # written last: marks completion
        shutil.rmtree(out / ".progress", ignore_errors=True)
    accelerator.wait_for_everyone()
    return out


def read_latent_shards(path: Path) -> datasets.Dataset:
    """The latent shards of a complete `encode_stream` folder as one dataset (columns latent, index, path)."""
    index = json.loads((path / INDEX_FILE).read_text())
    files = [str(path / f["file"]) for f in index["files"]]
    if not files:
        raise ConfigError(f"--latents: {path} holds no latents (every image was skipped)")
    if index["format"] == "parquet":
        return datasets.load_dataset("parquet", data_files=files, split="train")
    table = datasets.load_dataset("webdataset", data_files=files, split="train")
    return table.map(
        lambda r: {"latent": r["latent.npy"], "index": r["json"]["index"], "path": r["json"]["path"]},
        remove_columns=table.column_names,
    )
