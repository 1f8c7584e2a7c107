"""`kl-ae encode` / `kl-ae decode`: a latent dataset for diffusion training, and images back from one.

encode writes `latent = ae.normalize(z)`: z the posterior mean, or with `sample` a posterior sample (VQ: the
latents before quantization; deterministic families: the latent), normalized exactly as the model family's
diffusion pipeline normalizes it (`kl_autoencoder.interface`: SD's `(z - shift_factor) * scaling_factor`,
per-channel `latents_mean` / `latents_std`, FLUX.2's 2x2 patchify and BatchNorm statistics, so its latents are
(4C, h/2, w/2)). They go to a `datasets` dataset on disk (`datasets.load_from_disk(out)`; columns `latent`
(C, h, w) float32, `index`, `path`; with a crop grid, `index` numbers the crops and `path` names the image each is
cut from). The model's `normalization()` (its convention and values; for our KL / VQ model also as
`scaling_factor` / `shift_factor`) and the settings are recorded in `out/latents_config.json` and the dataset's
description; decode reads that record back, so latents decode with the normalization they were written with.

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

from eval.latent_shards import encode_stream, latent_features, read_latent_shards
from eval.models import as_adapter, check_frames, check_resolution, check_sizes, device_of, load_model
from kl_ae.common.config import ConfigError, DataConfig
from kl_ae.common.crops import CropGrid, GridCrops
from kl_ae.common.data import EvalImages, load_images, trainer_split
from kl_ae.common.video import ClipCrops, EvalClips, is_video_source, load_clips, write_video
from kl_autoencoder import Autoencoder
from kl_autoencoder.interface import LatentAutoencoder

CONFIG_FILE = "latents_config.json"


OURS = "(z - shift_factor) * scaling_factor"  # our KL / VQ model's convention (`families.ours`)


def _shard(n: int, rank: int, world: int) -> range:
    per = -(-n // world)
    return range(min(rank * per, n), min((rank + 1) * per, n))


def latent_settings(ae: LatentAutoencoder, model_path: str, data: str, resolution: int | None, sample: bool,
                    seed: int) -> dict:  # fmt: skip
    """What latents_config.json records about the latents: the model, data and size, and the normalization applied
    (our KL / VQ model: also its scaling_factor / shift_factor at the top level, where readers have found them)."""
    norm = ae.normalization()
    settings = {
        "model": str(model_path),
        "data": data,
        "resolution": resolution,
        "latent": "posterior sample" if sample else "posterior mean",
        "seed": seed,
    }
    if ae.family in ("kl", "vq"):
        settings |= {"scaling_factor": norm["scaling_factor"], "shift_factor": norm["shift_factor"]}
        settings["formula"] = f"latent = {OURS}; z = latent / scaling_factor + shift_factor"
    else:
        settings["formula"] = f"latent = {norm['convention']}, z the raw latent (kl-ae decode applies the inverse)"
    settings["normalization"] = norm
    if ae.family == "vq":
        settings["latent"] = "latents before quantization"
    return settings


def split_settings(data: str, split: str | None, grid: CropGrid | None, max_images: int | None, split_seed: int,
                   run_data: DataConfig | None) -> dict:  # fmt: skip
    """The record of which images were encoded, when a split, a crop grid or a count chose them."""
    if split is None and grid is None and max_images is None:
        return {}
    settings = {"split": split, "split_seed": split_seed, "max_images": max_images}
    if split is not None:  # what decides the trainer's split besides the seed
        split_cfg = trainer_split(data, run_data)
        settings["split_config"] = {k: getattr(split_cfg, k) for k in ("val_fraction", "val_max", "val_source")}
    settings["crops"] = None if grid is None else {"k": grid.k, "resize": grid.resize, "hflip": grid.hflip}
    return settings


def check_arguments(ae: LatentAutoencoder, resolution, batch_size: int, split, stream: bool, fmt, grid) -> None:
    if resolution is not None:
        check_resolution(ae, resolution)
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {batch_size}")
    if split not in (None, "train", "val"):
        raise ConfigError(f"--split: must be 'train' or 'val', got {split!r}")
    if fmt is not None and not stream:
        raise ConfigError("--format: latent shards are written from a stream (shards, or a hub name with --streaming)")
    if stream and (split is not None or grid is not None):
        raise ConfigError("--split / crops: a stream is encoded as it comes; split or crop a folder or hub dataset")


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
    run_data: DataConfig | None = None,
    frames: int | None = None,
) -> Path:
    """Encode `data` (a folder: all its images; "sample" or a hub name: its held-out split) into `out`.

    Videos (a folder of them, a video file, "sample-video"): one latent (C, t, h, w) per video, of its first
    `frames` frames (default: all, cut to the longest length the model takes); frame count and rate are recorded.

    `split` ("train" | "val"): that split of the trainer's split of `data` (seeded by `split_seed`, with the split
    settings of `run_data`, the run's data section: `kl_ae.common.data.trainer_split`), folders included. `grid`:
    several fixed crops per image (`kl_ae.common.crops.CropGrid`). `max_images`: the first N images.
    A stream (shards, or a hub name with `streaming`) is written as latent shards (`eval.latent_shards`, format
    `fmt`); a stream of videos cut by a crop `grid` (`kl-ae probe`) is its first clips' windows, as for a folder.
    """
    from kl_ae.common.shards import shard_files

    out = Path(out)
    accelerator = Accelerator()
    if (out / CONFIG_FILE).is_file():
        accelerator.print(f"{out} is complete; nothing to do")
        return out
    stream = streaming or shard_files(data, "--data") is not None
    clips_of_stream = stream and grid is not None and is_video_source(data, streaming)
    stream = stream and not clips_of_stream
    ae = load_model(model_path).to(accelerator.device)
    check_arguments(ae, resolution, batch_size, split, stream, fmt, grid)
    settings = latent_settings(ae, model_path, data, resolution, sample, seed)
    settings |= split_settings(data, split, grid, max_images, split_seed, run_data)
    if stream:  # of videos with --frames: one clip of that many frames per video
        if frames is None and is_video_source(data, streaming):  # a stream's video lengths are not known ahead
            raise ConfigError(f"--frames: {data} holds videos; a stream of them is encoded one clip of --frames N "
                              "frames per video (e.g. --frames 17)")  # fmt: skip
        check_frames(ae, frames)
        if frames is not None:
            settings |= {"frames": frames, "temporal_factor": ae.temporal_factor}
        args = (resolution, batch_size, sample, seed, fmt or "parquet", per_shard, frames)
        return encode_stream(ae, data, out, settings, accelerator, *args)
    if clips_of_stream or is_video_source(data):
        check_frames(ae, frames)
        clips = load_clips(data, ae.image_multiple, None if grid else resolution, frames, ae.longest_frames,
                           max_images, split_seed, run_data, split or "val", clips_of_stream)  # fmt: skip
        if grid is not None:  # windows of each video, each cut by the crop grid
            clips = ClipCrops(clips, grid, resolution)
        check_sizes(ae, clips.sizes())
        videos = clips if isinstance(clips, EvalClips) else clips.clips
        settings |= {"frames": videos.frames, "fps": dict(zip(videos.paths(), videos.fps_list())),
                     "temporal_factor": ae.temporal_factor, "num_videos": len(videos),
                     "num_latents": len(clips)}  # fmt: skip
        # long clips through a video class's chunks and tiles, so memory does not grow with length (exact for Wan's
        # causal cache; blended windows for HunyuanVideo, LTX and CogVideoX, recorded below). An image family
        # encodes frame by frame already: its spatial tiles would change its latents and save nothing here
        if ae.is_video and videos.frames > 2 * ae.temporal_factor:
            ae.tiling(True)
            settings["chunked"] = True
        write_latents(ae, clips, out, settings, accelerator, batch_size, sample, seed)
        return out
    images = load_images(data, ae.image_multiple, split or "val", resolution, max_images, split_seed,
                         split is not None, run_data=run_data)  # fmt: skip
    check_sizes(ae, images.sizes())
    if grid is not None:
        images = GridCrops(images, grid)
    settings |= {"num_images": len(images.table), "num_latents": len(images)}
    write_latents(ae, images, out, settings, accelerator, batch_size, sample, seed)
    return out


def write_latents(ae: LatentAutoencoder, images: EvalImages | GridCrops | EvalClips | ClipCrops, out: Path,
                  settings: dict, accelerator: Accelerator, batch_size: int, sample: bool,
                  seed: int) -> None:  # fmt: skip
    """Each process's shard of the images as `<out>.shards/shard_<rank>` (kept when it is there), then the main
    process's concatenation into `out`, with latents_config.json written last (it marks completion)."""
    if isinstance(images, (EvalClips, ClipCrops)):
        paths = images.paths()
    else:
        rows = [v.get("path") if isinstance(v, dict) else v for v in images.table[images.column]]
        paths = [rows[images.row(i)] for i in range(len(images))]
    shards = out.parent / f".{out.name}.shards"
    rank, world = accelerator.process_index, accelerator.num_processes
    shard_dir = shards / f"shard_{rank:05d}"
    if not shard_dir.is_dir():
        gen = torch.Generator().manual_seed(seed + rank)
        rows = encode_rows(ae, images, paths, _shard(len(images), rank, world), batch_size, sample, gen)
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


@torch.no_grad()
def encode_rows(ae: LatentAutoencoder, images, paths: list, indices: range, batch_size: int, sample: bool,
                gen) -> dict:  # fmt: skip
    """The rows {"latent", "index", "path"} of `images[indices]`: latent = ae.normalize(z), z the posterior mean, or
    with `sample` a posterior sample drawn from the generator `gen`."""
    device = device_of(ae)
    bs = batch_size if len(images.sizes()) == 1 else 1  # different sizes cannot share a batch
    rows = {"latent": [], "index": [], "path": []}
    for i, x in zip(range(0, len(indices), bs), DataLoader(Subset(images, indices), batch_size=bs)):
        posterior = ae.encode(x.to(device))
        z = posterior.sample(gen) if sample else posterior.mode()
        # (C, h, w) each (FLUX.2: (4C, ...)); clips (C, t, h, w)
        for j, latent in enumerate(ae.normalize(z.float()).cpu().numpy()):
            rows["latent"].append(latent)
            rows["index"].append(indices[i + j])
            rows["path"].append(paths[indices[i + j]])
    return rows


def read_latents(path: str | Path) -> tuple[datasets.Dataset, dict]:
    """(the latent dataset, its settings: normalization, model, ...) from an `encode_dataset` folder."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise ConfigError(f"--latents: {path} is not a complete latent dataset (no {CONFIG_FILE})")
    settings = json.loads((path / CONFIG_FILE).read_text())
    if "format" in settings:  # latent shards written from a stream
        return read_latent_shards(path), settings
    return datasets.load_from_disk(str(path)), settings


def recorded_normalization(settings: dict) -> dict:
    """The normalization latents were written with (latents written before every family had its own record only
    our model's scaling_factor / shift_factor)."""
    if "normalization" in settings:
        return settings["normalization"]
    return {"convention": OURS, "scaling_factor": settings["scaling_factor"], "shift_factor": settings["shift_factor"]}


def use_normalization(ae: LatentAutoencoder, recorded: dict) -> None:
    """Make `ae` denormalize with the recorded values (the model may have been exported again since, with newly
    measured ones); ConfigError when the recorded convention is not this model's."""
    current = ae.normalization()
    if recorded == current:
        return
    if recorded.get("convention") != current["convention"]:
        raise ConfigError(
            f"--latents: written with the normalization {recorded.get('convention')!r}, but the model's is "
            f"{current['convention']!r}; decode them with the model (family) that encoded them"
        )
    ae.set_normalization({k: v for k, v in recorded.items() if k not in ("convention", "batch_norm_eps")})


def decode_z(model: LatentAutoencoder | Autoencoder, z: torch.Tensor) -> torch.Tensor:
    """Raw latents (B, C, h, w) -> images in [-1, 1]; VQ latents stored before quantization are quantized."""
    return as_adapter(model).decode(z)


@torch.no_grad()
def decode_latents(model: LatentAutoencoder | Autoencoder, table: datasets.Dataset, settings: dict,
                   batch_size: int = 8):  # fmt: skip
    """Yield (index, path, image (C, H, W) in [-1, 1]) for every row, denormalized with the recorded normalization."""
    ae = as_adapter(model)
    use_normalization(ae, recorded_normalization(settings))
    device = device_of(ae)
    table = table.with_format("numpy")
    for start in range(0, len(table), batch_size):
        rows = table[start : start + batch_size]
        latents = rows["latent"]
        if latents.dtype == object:  # rows of different sizes: one at a time
            batches = [torch.from_numpy(np.asarray(v, dtype=np.float32))[None] for v in latents]
        else:
            batches = [torch.from_numpy(latents.astype(np.float32))]
        images = torch.cat([ae.decode(ae.denormalize(z.to(device))).float().cpu() for z in batches])
        for index, path, image in zip(rows["index"], rows["path"], images):
            yield int(index), path, image


def decode_dataset(model_path: str, latents: str | Path, out: str | Path, batch_size: int = 8) -> Path:
    """Write every latent of an `encode_dataset` folder back to `out/<index>_<name>.png` (clips: `.mp4`)."""
    ae = load_model(model_path)
    table, settings = read_latents(latents)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fps = settings.get("fps") or {}  # frame rate per video path
    for index, path, image in decode_latents(ae, table, settings, batch_size):
        name = f"{index:06d}" + (f"_{Path(path).stem}" if path else "")
        if image.dim() == 4:  # a clip (3, T, H, W): a video at the rate it was read
            write_video(out / f"{name}.mp4", image.clamp(-1, 1), fps.get(path, 8.0))
            continue
        pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(out / f"{name}.png")
    return out
