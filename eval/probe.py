"""`kl-ae probe`: how well a small diffusion model learns an autoencoder's latents, the use the latents are for.

    kl-ae probe --model RUN|CHECKPOINT|DIFFUSERS_DIR|HUB_NAME [--data FOLDER|sample|HUB_NAME] [--compare PATH2] ...

For each model: the training split and the held-out split of `--data` (default: a run's own `data.source`), as
the trainer splits it (a run's seed and split settings: its held-out images are its validation set; `sample`: its
12 training and 2 held-out photographs) are cut into fixed crops (`kl_ae.common.crops.CropGrid`: a k x k grid over
each image resized to `resize`, and mirrors) and encoded by `eval.latents.encode_dataset` (posterior samples,
seeded; VQ: the latents before quantization) into `OUT/latents/<model|compare>_<train|val>`, reused when the
probe is re-run with the same settings. Any family `kl_autoencoder.interface` loads: the latents are normalised
exactly as the family's diffusion pipeline normalises them (`ae.normalize`: scaling / shift, per-channel
statistics, FLUX.2's 2x2 patchify and BatchNorm statistics), so the denoiser is sized from, and sees, the latents
the family's diffusion model sees (FLUX.2: 4C channels at twice the factor); two families compared may have
different latent shapes. A model whose normalization is the identity (no measured factors: a checkpoint folder,
scaling_factor 1 and no shift) gets its latents rescaled by their global mean and std on the training latents,
which metrics.json says. Then the recipe of
`eval.denoiser` trains a small DiT on the training latents for `--steps` steps and reports its held-out
denoising loss on a fixed timestep grid (same noise draws for every model), the curve of that loss over
training, samples decoded through the autoencoder (DDIM, seeded), and the FID of the decoded samples against the
held-out crops when the Inception weights are installed (otherwise "unavailable" with the reason). Videos: windows
of `--frames` frames of the clips `kl_ae.common.video.load_clips` gives (a folder, "sample-video", shards, or a hub
dataset streamed with `streaming`), cut by the same crop grid.

Defaults: a run folder's own `data.resolution` / `data.resize` (the default run: 64 px crops of images resized
to 128 px), else the model's `sample_size` with resize = resolution; a 4 x 4 grid with mirrors (32 crops per
image: 384 training and 64 held-out latents for `sample`); 600 steps of 32 latents. `--compare` probes a second
model on the same crops (chosen by the flags or the first model's run), seeds and budget. Under `accelerate
launch` encoding is sharded, the denoiser's batches are split over the processes, and held-out values are
gathered; the main process samples and writes `metrics.json` and `report.html` (default `MODEL/probe`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import torch
from accelerate import Accelerator

from eval import denoiser as dn
from eval import probe_report
from eval.latents import encode_dataset, read_latents, recorded_normalization, use_normalization
from eval.models import check_frames, check_resolution, device_of, image_multiple, load_model, longest_frames
from kl_ae.common.config import ConfigError, DataConfig
from kl_ae.common.crops import CropGrid, GridCrops
from kl_ae.common.data import load_images, trainer_split
from kl_ae.common.metrics import build_inception, frechet_distance, inception_features, to_unit
from kl_ae.common.release import run_data_config
from kl_ae.common.runs import find_run
from kl_ae.common.video import ClipCrops, is_video_source, load_clips
from kl_autoencoder import find_diffusers_folder
from kl_autoencoder.interface import LatentAutoencoder

GRID_SAMPLES = 16  # samples shown in the report
MAX_FID_SAMPLES = 1024


@dataclass
class ProbeConfig:
    model: str  # a run, checkpoint or diffusers folder of any supported class, or a hub name (REPO[/SUBFOLDER])
    # a folder, "sample" or a hub name: its training split and its held-out split; None: a run's own data.source.
    # Shards or a streamed hub dataset of videos: their first max_images videos for both (a stream holds nothing out)
    data: str | None = None
    streaming: bool = False  # data: a hub dataset of videos (or a local hub-style folder), streamed
    out: str | None = None  # default <model>/probe
    steps: int = 600  # denoiser training steps (the budget)
    compare: str | None = None  # a second model probed on the same images, seeds and budget
    seed: int = 0  # denoiser init, data order, training noise, held-out noise, sampling noise, posterior samples
    batch_size: int = 32  # latents per step, over all processes
    resolution: int | None = None  # crop size; None: the run's data.resolution, else the model's sample_size
    resize: int | None = None  # shorter side before cropping; None: the run's data.resize (without --resolution),
    # else the resolution
    crops: int = 4  # k: a k x k grid of crops per image, each also mirrored
    max_images: int | None = None  # at most N images per split
    eval_every: int | None = None  # steps between held-out evaluations; None: steps // 8
    frames: int | None = None  # videos: frames per clip (None: the shortest video, cut to what the models take)


def _check(cfg: ProbeConfig) -> None:
    for key in ("steps", "batch_size", "crops", "max_images", "eval_every", "resolution", "resize", "frames"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"--{key.replace('_', '-')}: must be >= 1, got {value}")


class Crops(NamedTuple):
    """What every probed model's latents are cut from: the crop size and grid, and the trainer's split of the data
    (its seed and, for a run, its data section, so that the held-out images are the run's validation set)."""

    resolution: int
    grid: CropGrid
    split_seed: int
    run_data: DataConfig | None


def with_data(cfg: ProbeConfig) -> ProbeConfig:
    """`cfg` with `data` set: as given, else the run's own `data.source` (a ConfigError for a model without a run)."""
    if cfg.data is not None:
        return cfg
    run = find_run(cfg.model)
    if run is None:
        raise ConfigError(f"--data: {cfg.model} is not a run folder (no config.yaml), so it has no data of its own")
    return replace(cfg, data=run_data_config(run)[0].source)


def crop_settings(cfg: ProbeConfig, model_path: str, ae: LatentAutoencoder) -> Crops:
    """The crops and split: the flags, else the run's data section, else the model's sample_size."""
    run = find_run(model_path) if Path(model_path).exists() else None
    data, split_seed = run_data_config(run) if run is not None else (None, 0)
    resolution = cfg.resolution or (data.resolution if data else ae.sample_size)
    if resolution is None:
        raise ConfigError(f"--resolution: {ae.class_name} records no sample_size; give the crop size, --resolution N")
    resize = cfg.resize or (data.resize if data and not cfg.resolution else None) or resolution
    if resize < resolution:
        raise ConfigError(f"--resize: must be >= the resolution {resolution}, got {resize}")
    return Crops(resolution, CropGrid(k=cfg.crops, resize=resize, hflip=True), split_seed, data)


def encode_split(cfg: ProbeConfig, path: str, crops: Crops, split: str, folder: Path, accelerator: Accelerator) -> Path:
    """The latent dataset of one split (encoded, or reused when its settings and the weights have not changed)."""
    resolution, grid, split_seed, run_data = crops
    split_cfg = trainer_split(cfg.data, run_data)
    expect = {"model": str(path), "data": cfg.data, "resolution": resolution, "seed": cfg.seed, "split": split,
              "split_seed": split_seed, "max_images": cfg.max_images,
              "split_config": {k: getattr(split_cfg, k) for k in ("val_fraction", "val_max", "val_source")},
              "crops": {"k": grid.k, "resize": grid.resize, "hflip": grid.hflip}, "frames": cfg.frames}  # fmt: skip
    weights = max(f.stat().st_mtime for f in find_diffusers_folder(path).iterdir())
    if accelerator.is_main_process and (folder / "latents_config.json").is_file():
        settings = read_latents(folder)[1]
        stale = any(settings.get(k) != v for k, v in expect.items() if k != "frames" or v is not None)
        if stale or (folder / "latents_config.json").stat().st_mtime < weights:
            accelerator.print(f"{folder}: other settings or newer weights; encoding again")
            shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    try:
        return encode_dataset(path, cfg.data, folder, resolution, batch_size=16, sample=True, seed=cfg.seed,
                              split=split, grid=grid, max_images=cfg.max_images, split_seed=split_seed,
                              run_data=run_data, frames=cfg.frames, streaming=cfg.streaming)  # fmt: skip
    except ConfigError as e:
        raise ConfigError(f"{e} (probe of {path}, {split} split)") from None


def load_latents(folder: Path) -> tuple[torch.Tensor, dict]:
    """(the latents (N, C, h, w), the settings); clips' (N, C, t, h, w) as (N, C * t, h, w): the denoiser's tokens
    are patches over all latent frames (`eval.denoiser`)."""
    table, settings = read_latents(folder)
    latents = torch.from_numpy(np.array(table.with_format("numpy")["latent"]))  # a copy
    return latents.flatten(1, 2) if latents.dim() == 5 else latents, settings


@torch.no_grad()
def has_normalization(ae: LatentAutoencoder) -> bool:
    """Whether the model's normalization does anything: False for the identity (scaling_factor 1 and no shift, unit
    statistics), up to a rearrangement of the values (FLUX.2's patchify) and float rounding (RAE's, FLUX.2's eps)."""
    side = 2 * ae.image_multiple // ae.spatial_factor
    z = torch.randn(1, ae.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    latents = ae.normalize(z.to(device_of(ae))).cpu()
    if latents.numel() != z.numel():
        return True
    return not torch.allclose(latents.flatten().sort().values, z.flatten().sort().values, rtol=1e-3, atol=1e-6)


def normalise(ae: LatentAutoencoder, train: torch.Tensor, heldout: torch.Tensor, settings: dict):
    """(train, held-out, the record): the stored latents (normalised as the family's pipeline does), rescaled to the
    training latents' mean and std when the model's normalization is the identity. The record's `rescale` maps the
    stored latents to the probe's, (stored - shift) * scale (None: as stored); for our KL / VQ model its
    scaling_factor / shift_factor give the whole map from the raw latents z, (z - shift_factor) * scaling_factor."""
    norm = recorded_normalization(settings)
    record = {"source": "the model's config (measured at export)", "convention": norm["convention"]}
    rescale = None
    if not has_normalization(ae):
        mean, std = train.double().mean().item(), train.double().std(correction=0).item()
        if std == 0:
            raise ConfigError("--model: the training latents have zero variance; nothing to diffuse")
        train, heldout = (train - mean) / std, (heldout - mean) / std
        rescale = {"scale": 1 / std, "shift": mean}
        record["source"] = "measured on the probe's training latents (the model has no measured factors)"
    if ae.family in ("kl", "vq"):
        scale, shift = norm["scaling_factor"], norm["shift_factor"]
        if rescale is not None:
            scale, shift = scale / std, shift + mean / norm["scaling_factor"]
        record |= {"scaling_factor": scale, "shift_factor": shift}
    std = lambda x: x.double().std(correction=0).item()  # noqa: E731
    mean = lambda x: x.double().mean().item()  # noqa: E731
    record |= {"rescale": rescale, "train_mean": mean(train), "train_std": std(train), "heldout_mean": mean(heldout),
               "heldout_std": std(heldout)}  # fmt: skip
    return train, heldout, record


def split_images(cfg: ProbeConfig, crops: Crops, factor: int, split: str, longest=None) -> GridCrops | ClipCrops:
    """The crops of one split ("train" or "val") of the trainer's split of `cfg.data` (videos: of their windows)."""
    if is_video_source(cfg.data, cfg.streaming):
        clips = load_clips(cfg.data, factor, None, cfg.frames, longest, cfg.max_images, crops.split_seed,
                           crops.run_data, split, cfg.streaming)  # fmt: skip
        return ClipCrops(clips, crops.grid, crops.resolution)
    images = load_images(cfg.data, factor, split, crops.resolution, cfg.max_images, crops.split_seed, True,
                         run_data=crops.run_data)  # fmt: skip
    return GridCrops(images, crops.grid)


def held_out_images(cfg: ProbeConfig, crops: Crops, factor: int, n: int) -> torch.Tensor:
    """The first n held-out crops in [0, 1], the FID reference. (n, 3, r, r)"""
    images = split_images(cfg, crops, factor, "val")
    return torch.stack([to_unit(images[i]) for i in range(min(n, len(images)))])


@torch.no_grad()
def decode(ae: LatentAutoencoder, latents: torch.Tensor, factors: dict, frames: int | None = None) -> torch.Tensor:
    """The probe's latents (n, C, h, w) -> images in [0, 1] (n, 3, H, W), in batches of 16: back to the stored
    latents (undoing the probe's rescale), then the family's denormalize and decode. `frames`: clips' latents with
    that many latent frames in the channels, shown by the middle frame of each decoded clip."""
    out, rescale = [], factors["rescale"]
    for x in latents.split(16):
        stored = x.to(device_of(ae))
        if rescale is not None:
            stored = stored / rescale["scale"] + rescale["shift"]
        if frames:
            stored = stored.unflatten(1, (-1, frames))  # (n, C, t, h, w)
        image = ae.decode(ae.denormalize(stored))
        out.append(to_unit(image[:, :, image.shape[2] // 2] if frames else image).cpu())
    return torch.cat(out)


def plan(cfg: ProbeConfig, paths: dict[str, str]) -> Crops:
    """The crops and split for every model, from the flags or the first model's run: the same images for both.
    Checks what can be checked before any compute."""
    models = {tag: load_model(path, "--model" if tag == "model" else "--compare") for tag, path in paths.items()}
    crops = crop_settings(cfg, paths["model"], models["model"])
    for tag, ae in models.items():
        check_resolution(ae, crops.resolution, tag)
        check_frames(ae, cfg.frames, tag)
    n = len(split_images(cfg, crops, image_multiple(*models.values()), "train", longest_frames(*models.values())))
    if n < cfg.batch_size:
        raise ConfigError(f"--batch-size: {cfg.batch_size} is more than the {n} training latents")
    return crops


def probe_one(cfg: ProbeConfig, path: str, crops: Crops, tag: str, out: Path, accelerator, inception, fid_status):
    """One model's metrics.json entry; also writes its sample grid (main process)."""
    start = time.perf_counter()
    ae = load_model(path).to(accelerator.device)
    folders = {
        s: encode_split(cfg, path, crops, s, out / "latents" / f"{tag}_{s}", accelerator) for s in ("train", "val")
    }
    (train, settings), (heldout, _) = load_latents(folders["train"]), load_latents(folders["val"])
    frames = None if "frames" not in settings else 1 + (settings["frames"] - 1) // ae.temporal_factor
    use_normalization(ae, recorded_normalization(settings))  # decode as the latents were written
    train, heldout, factors = normalise(ae, train, heldout, settings)
    encoded = time.perf_counter()
    eval_every = cfg.eval_every or max(1, cfg.steps // 8)
    accelerator.print(f"probe {tag}: {len(train)} training and {len(heldout)} held-out latents of shape "
                      f"{tuple(train.shape[1:])}; {cfg.steps} steps of {cfg.batch_size}")  # fmt: skip
    denoiser, curve = dn.train_denoiser(
        train, heldout, cfg.steps, cfg.batch_size, cfg.seed, accelerator, eval_every, accelerator.print
    )
    trained = time.perf_counter()
    baseline = dn.gaussian_baseline(dn.noise_scheduler())
    loss = curve[-1]["loss"]
    result = {
        "path": path,
        "family": ae.family,
        "class_name": ae.class_name,
        "latent_shape": list(train.shape[1:]),  # normalised: what the denoiser sees (FLUX.2: 4C, h/2, w/2)
        "num_train_latents": len(train),
        "num_heldout_latents": len(heldout),
        "latents": {
            **factors,
            "encoded": {k: str(v) for k, v in folders.items()},
            "crops": settings.get("crops"),
            "resolution": settings["resolution"],
            "posterior": settings["latent"],
        },
        "denoiser": {
            **dn.denoiser_size(tuple(train.shape[1:])),
            "parameters": sum(p.numel() for p in denoiser.parameters()),
        },
        "heldout_loss": {
            "per_timestep": loss,
            "mean": sum(loss) / len(loss),
            "ratio_to_gaussian": [v / b for v, b in zip(loss, baseline)],
            "mean_ratio": sum(v / b for v, b in zip(loss, baseline)) / len(loss),
        },
        "curve": curve,
    }
    if accelerator.is_main_process:
        n = min(len(heldout), MAX_FID_SAMPLES) if inception is not None else GRID_SAMPLES
        n = max(n, GRID_SAMPLES)
        noise = dn.sample(denoiser, tuple(train.shape[1:]), n, cfg.seed, accelerator.device)
        samples = decode(ae, noise, factors, frames)
        reference = decode(ae, heldout[:8], factors, frames)  # reconstructions of held-out latents
        probe_report.save_samples(reference, samples[:GRID_SAMPLES], out / f"samples_{tag}.png")
        result["samples"] = f"samples_{tag}.png"
        if inception is None or frames:
            result["fid"] = {"available": False, "reason": "clips: no FID of frames" if frames else fid_status}
        else:
            real = held_out_images(cfg, crops, ae.image_multiple, len(heldout))
            k = min(len(real), len(samples))
            if k < 2:
                result["fid"] = {"available": False, "reason": "needs at least 2 held-out images"}
            else:
                feats = [torch.cat([inception_features(inception, x.to(accelerator.device)).cpu()
                                    for x in t[:k].split(32)]) for t in (real, samples)]  # fmt: skip
                result["fid"] = {"available": True, "value": frechet_distance(*feats), "num_samples": k,
                                 "weights": fid_status, "note": "FID from fewer than a few thousand samples is "
                                 "biased upwards and noisy; compare models at the same sample count only"}  # fmt: skip
    result["timing_s"] = {"encode": encoded - start, "train_and_eval": trained - encoded,
                          "sample_and_fid": time.perf_counter() - trained}  # fmt: skip
    return result


def probe(cfg: ProbeConfig) -> dict:
    """Probe `cfg.model` (and `cfg.compare`); writes metrics.json + report.html; returns the dict."""
    _check(cfg)
    cfg = with_data(cfg)
    start = time.perf_counter()
    accelerator = dn.probe_accelerator(cfg.seed)
    if cfg.batch_size % accelerator.num_processes:
        raise ConfigError(f"--batch-size: {cfg.batch_size} is not a multiple of the {accelerator.num_processes} "
                          "processes (it is the batch over all of them)")  # fmt: skip
    paths = {"model": cfg.model} | ({"compare": cfg.compare} if cfg.compare else {})
    crops = plan(cfg, paths)  # bad values fail before any compute
    out = Path(cfg.out) if cfg.out else Path(cfg.model) / "probe"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    inception, fid_status = build_inception() if accelerator.is_main_process else (None, "")
    if inception is not None:
        inception.to(accelerator.device)
    datasets.disable_progress_bars()
    results = {t: probe_one(cfg, p, crops, t, out, accelerator, inception, fid_status) for t, p in paths.items()}
    summary = {
        "data": cfg.data,
        "num_processes": accelerator.num_processes,
        "settings": asdict(cfg),
        "recipe": dn.RECIPE,
        "timesteps": dn.TIMESTEPS,
        "gaussian_baseline": dn.gaussian_baseline(dn.noise_scheduler()),
        "wall_s": time.perf_counter() - start,
    }
    metrics = {**summary, **results["model"], **({"compare": results["compare"]} if cfg.compare else {})}
    if accelerator.is_main_process:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
        probe_report.write_report(out, summary, results)
        for tag, r in results.items():
            h = r["heldout_loss"]
            fid = f"{r['fid']['value']:.2f}" if r["fid"]["available"] else "unavailable"
            print(f"{tag}: held-out denoising loss {h['mean']:.4f} per element ({h['mean_ratio']:.3f} x the "
                  f"Gaussian baseline), FID {fid}")  # fmt: skip
        print(f"report: {out / 'report.html'}")
    accelerator.wait_for_everyone()
    return metrics
