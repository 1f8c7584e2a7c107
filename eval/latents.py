"""`kl-ae encode` / `kl-ae decode`: a latent dataset for diffusion training, and images back from one.

encode writes `latents = (z - shift_factor) * scaling_factor` (z the posterior mean, or with `sample` a
posterior sample; VQ: the latents before quantization), the factors read from the model's config, as a
`datasets` dataset on disk (`datasets.load_from_disk(out)`; columns `latent` (C, h, w) float32, `index`,
`path`; with a crop grid, `index` numbers the crops and `path` names the image each is cut from). The factors and
settings are recorded in `out/latents_config.json` and the dataset's description.

Under `accelerate launch` every process encodes a contiguous shard of the images and saves it as
`<out>.shards/shard_<rank>` (written to a temporary folder, then renamed, so a folder there is complete);
the main process then concatenates them into `out` and removes the shards. Re-running the same command
skips the shards already written, and does nothing when `out` is complete. A streamed source (shards, or a
hub dataset with `--streaming`) is written as latent shards instead: see `eval/latent_shards.py`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from torch.utils.data import DataLoader, Subset

from kl_ae.common.config import ConfigError
from kl_ae.common.crops import CropGrid, GridCrops
from kl_ae.common.data import load_images
from kl_autoencoder import Autoencoder

CONFIG_FILE = "latents_config.json"


def _load_model(path: str) -> Autoencoder:
    try:
        return Autoencoder.from_pretrained(path)
    except ValueError as e:
        raise ConfigError(f"--model: {path}: {e}") from None


def latent_factors(model: Autoencoder) -> tuple[float, float]:
    """(scaling_factor, shift_factor) from the model's config; no shift is 0."""
    return float(model.config.scaling_factor), float(model.config.shift_factor or 0.0)


def latent_features(latents: list[np.ndarray]) -> datasets.Features:
    """float32 latents: a fixed-shape Array3D when all share one shape (one resolution), else nested lists."""
    shapes = {z.shape for z in latents}
    if len(shapes) == 1:
        latent = datasets.Array3D(shape=shapes.pop(), dtype="float32")
    else:
        latent = datasets.List(datasets.List(datasets.List(datasets.Value("float32"))))
    return datasets.Features({"latent": latent, "index": datasets.Value("int64"), "path": datasets.Value("string")})


def _shard(n: int, rank: int, world: int) -> range:
    per = -(-n // world)
    return range(min(rank * per, n), min((rank + 1) * per, n))


def encode_dataset(
    model_path: str,
    data: str,
    out: str | Path,
    resolution: int | None = None,
    batch_size: int = 8,
    sample: bool = False,
    seed: int = 0,
    split: str | None = None,
    grid: CropGrid | None = None,
    max_images: int | None = None,
    split_seed: int = 0,
    fmt: str | None = None,
    per_shard: int = 1000,
    streaming: bool = False,
) -> Path:
    """Encode `data` (a folder: all its images; "sample" or a hub name: its held-out split) into `out`.

    `split` ("train" | "val"): that split of the trainer's split of `data` (seeded by `split_seed`), folders
    included. `grid`: several fixed crops per image (`kl_ae.common.crops.CropGrid`). `max_images`: the first N images.
    A stream (shards, or a hub name with `streaming`) is written as latent shards (`eval.latent_shards`, format
    `fmt`).
    """
    from kl_ae.common.shards import shard_files

    out = Path(out)
    accelerator = Accelerator()
    if (out / CONFIG_FILE).is_file():
        accelerator.print(f"{out} is complete; nothing to do")
        return out
    stream = streaming or shard_files(data, "--data") is not None
    if fmt is not None and not stream:
        raise ConfigError("--format: latent shards are written from a stream (shards, or a hub name with --streaming)")
    model = _load_model(model_path).to(accelerator.device)
    factor = model.config.downsample_factor
    if resolution is not None and (resolution <= 0 or resolution % factor):
        raise ConfigError(f"--resolution: {resolution} is not a positive multiple of the factor {factor}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {batch_size}")
    if split not in (None, "train", "val"):
        raise ConfigError(f"--split: must be 'train' or 'val', got {split!r}")
    if stream and (split is not None or grid is not None):
        raise ConfigError("--split / crops: a stream is encoded as it comes; split or crop a folder or hub dataset")
    scale, shift = latent_factors(model)
    settings = {
        "model": str(model_path),
        "data": data,
        "resolution": resolution,
        "latent": "posterior sample" if sample else "posterior mean",
        "seed": seed,
        "scaling_factor": scale,
        "shift_factor": shift,
        "formula": "latent = (z - shift_factor) * scaling_factor; z = latent / scaling_factor + shift_factor",
    }
    if split is not None or grid is not None or max_images is not None:
        settings |= {"split": split, "split_seed": split_seed, "max_images": max_images}
        settings["crops"] = None if grid is None else {"k": grid.k, "resize": grid.resize, "hflip": grid.hflip}
    if model.config.bottleneck == "vq":
        settings["latent"] = "latents before quantization"
    if stream:
        from eval.latent_shards import encode_stream

        args = (resolution, batch_size, sample, seed, fmt or "parquet", per_shard)
        return encode_stream(model, data, out, settings, accelerator, *args)
    images = load_images(data, factor, split or "val", resolution, max_images, split_seed, split is not None)
    if grid is not None:
        images = GridCrops(images, grid)
    rows = [v.get("path") if isinstance(v, dict) else v for v in images.table[images.column]]
    paths = [rows[images.row(i)] for i in range(len(images))]
    settings |= {"num_images": len(images.table), "num_latents": len(images)}

    shards = out.parent / f".{out.name}.shards"
    rank, world = accelerator.process_index, accelerator.num_processes
    shard_dir = shards / f"shard_{rank:05d}"
    if not shard_dir.is_dir():
        indices = _shard(len(images), rank, world)
        bs = batch_size if len(images.sizes()) == 1 else 1  # different sizes cannot share a batch
        gen = torch.Generator().manual_seed(seed + rank)
        rows = {"latent": [], "index": [], "path": []}
        with torch.no_grad():
            for i, x in zip(range(0, len(indices), bs), DataLoader(Subset(images, indices), batch_size=bs)):
                posterior = model.encode(x.to(accelerator.device))
                z = posterior.sample(gen) if sample else posterior.mode()
                latents = ((z.float() - shift) * scale).cpu().numpy()  # (B, C, h, w)
                for j, latent in enumerate(latents):
                    rows["latent"].append(latent)
                    rows["index"].append(indices[i + j])
                    rows["path"].append(paths[indices[i + j]])
        tmp = shards / f".tmp_shard_{rank:05d}"
        shutil.rmtree(tmp, ignore_errors=True)
        datasets.Dataset.from_dict(rows, features=latent_features(rows["latent"])).save_to_disk(str(tmp))
        os.replace(tmp, shard_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        parts = [datasets.load_from_disk(str(shards / f"shard_{r:05d}")) for r in range(world)]
        table = datasets.concatenate_datasets([p for p in parts if len(p)] or parts[:1])
        table.info.description = json.dumps(settings)
        tmp = out.parent / f".{out.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        table.save_to_disk(str(tmp))
        (tmp / CONFIG_FILE).write_text(json.dumps(settings, indent=1) + "\n")  # written last: marks completion
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        shutil.rmtree(shards, ignore_errors=True)
    accelerator.wait_for_everyone()
    return out


def read_latents(path: str | Path) -> tuple[datasets.Dataset, dict]:
    """(the latent dataset, its settings: scaling_factor, shift_factor, ...) from an `encode_dataset` folder."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise ConfigError(f"--latents: {path} is not a complete latent dataset (no {CONFIG_FILE})")
    settings = json.loads((path / CONFIG_FILE).read_text())
    if "format" in settings:  # latent shards written from a stream
        from eval.latent_shards import read_latent_shards

        return read_latent_shards(path), settings
    return datasets.load_from_disk(str(path)), settings


def decode_z(model: Autoencoder, z: torch.Tensor) -> torch.Tensor:
    """Unscaled latents (B, C, h, w) -> images in [-1, 1]; VQ latents stored before quantization are quantized."""
    if model.config.bottleneck == "vq":  # the latents were stored before quantization, as LDM diffuses them
        z = model.quantize(z).z_q
    return model.decode(z)


@torch.no_grad()
def decode_latents(model: Autoencoder, table: datasets.Dataset, settings: dict, batch_size: int = 8):
    """Yield (index, path, image (C, H, W) in [-1, 1]) for every row, unscaling with the recorded factors."""
    scale, shift = settings["scaling_factor"], settings["shift_factor"]
    device = next(model.parameters()).device
    table = table.with_format("numpy")
    for start in range(0, len(table), batch_size):
        rows = table[start : start + batch_size]
        latents = rows["latent"]
        if latents.dtype == object:  # rows of different sizes: one at a time
            batches = [torch.from_numpy(np.asarray(v, dtype=np.float32))[None] for v in latents]
        else:
            batches = [torch.from_numpy(latents.astype(np.float32))]
        images = torch.cat([decode_z(model, z.to(device) / scale + shift).float().cpu() for z in batches])
        for index, path, image in zip(rows["index"], rows["path"], images):
            yield int(index), path, image


def decode_dataset(model_path: str, latents: str | Path, out: str | Path, batch_size: int = 8) -> Path:
    """Write every latent of an `encode_dataset` folder back to `out/<index>_<name>.png`."""
    model = _load_model(model_path)
    table, settings = read_latents(latents)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for index, path, image in decode_latents(model, table, settings, batch_size):
        name = f"{index:06d}" + (f"_{Path(path).stem}" if path else "")
        pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(out / f"{name}.png")
    return out
