"""The release of a trained autoencoder: a complete diffusers folder of its own class, with its latent normalization
measured on held-out data. Run at the end of training and by `kl-ae export`; any family of
`kl_autoencoder.interface` (a run that fine-tuned a FLUX.2 or Qwen-Image autoencoder is released as one).

What a diffusion model trained on the latents needs besides the weights is the family's latent normalization in
the convention its pipeline applies (`measure_normalization`): for our KL / VQ classes `scaling_factor` (and, KL
only, `shift_factor`, per-channel `latents_mean` / `latents_std`), LDM's scale_by_std on posterior samples;
per-channel `latents_mean` / `latents_std` (Qwen-Image, Wan, RAE); `scaling_factor` (DC-AE, HunyuanImage);
FLUX.2's BatchNorm running statistics of the patchified posterior means. Measured on the run's own validation
split (or `--data`). Also `force_upcast` where the class has it, decided by running the autoencoder in fp16 where
this machine can; a model card `README.md` naming the class and the normalization, whose YAML front matter is hub
metadata (library_name, tags, license, base_model, datasets); optionally an fp16 variant. `push_to_hub` uploads
the folder as a hub model repo.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from kl_ae.common.channels import card_lines, model_mapping
from kl_ae.common.config import ConfigError, DataConfig, merge
from kl_ae.common.data import build_datasets, build_val, load_images
from kl_ae.common.runs import find_run, latest_weights
from kl_ae.common.shards import looks_like_hub_name
from kl_ae.common.video import is_video_source, load_clips
from kl_ae.common.weights import offline_switch
from kl_autoencoder import Autoencoder
from kl_autoencoder.diffusers_format import WEIGHTS_NAME, is_hub_name
from kl_autoencoder.folders import EXPORT_KEY, find_diffusers_folder, weights_step
from kl_autoencoder.interface import LatentAutoencoder, load_autoencoder

FP16_WEIGHTS_NAME = "diffusion_pytorch_model.fp16.safetensors"  # diffusers' variant naming: variant="fp16"
# fp16 agrees with fp32 when the largest pixel difference (images in [-1, 1]) stays under this
FP16_TOLERANCE = 0.05
DEFAULT_RESOLUTION = 256  # held-out images for a model whose config records no size, outside a run


def held_out_images(run: Path | None, data: str | None, resolution: int, max_images: int | None,
                    longest=None) -> tuple[Dataset, str]:  # fmt: skip
    """(images in [-1, 1], a description): `data` (a folder: all its images; "sample" or a hub name: its held-out
    split, as the run's trainer splits it; videos: their clips, cut by `longest`, the model's `longest_frames`) or
    else the run's validation split."""
    if data is not None:
        run_data, seed = run_data_config(run) if run is not None else (None, 0)
        if is_video_source(data):
            clips = load_clips(data, 1, resolution, None, longest, max_images, seed, run_data)
            return clips, f"{data} ({len(clips)} clips of {clips.frames} frames at {resolution}px)"
        images = load_images(data, 1, resolution=resolution, max_images=max_images, seed=seed, run_data=run_data)
        return images, f"{data} ({len(images)} images at {resolution}px)"
    if run is None:
        raise ConfigError("export: not inside a training run (no config.yaml found); pass --data SPEC")
    data_cfg, seed = run_data_config(run)
    try:  # a fixed validation set of its own is read without the (maybe streamed) training source
        val = build_val(data_cfg, seed) if data_cfg.val_source else build_datasets(data_cfg, seed)[1]
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"export: the run's data ({data_cfg.source}) cannot be read: {e}") from None
    if max_images is not None and len(val) > max_images:
        val = torch.utils.data.Subset(val, range(max_images))
    name = f"validation set {data_cfg.val_source}" if data_cfg.val_source else f"validation split of {data_cfg.source}"
    items = "images" if data_cfg.num_frames == 1 else f"clips of {data_cfg.num_frames} frames"
    return val, f"{name} ({len(val)} {items} at {data_cfg.resolution}px)"


def keeps_latent_space(run: Path | None) -> bool:
    """Whether the run fine-tuned a loaded model with its encoder frozen (`model.init_from` with
    `train.trainable` = decoder or a list with neither "encoder" nor "encoder_out"): its latents are the loaded
    model's, so the normalization the loaded model ships stays, as a diffusion model trained on that latent space
    expects. A run that trains the encoder's output projection (DC-AE's phase 2) moves the latents: measured anew."""
    if run is None:
        return False
    saved = yaml.safe_load((run / "config.yaml").read_text()) or {}
    trainable = saved.get("train", {}).get("trainable", "all")
    frozen = trainable == "decoder" or (isinstance(trainable, list) and not {"encoder", "encoder_out"} & {*trainable})
    return frozen and bool(saved.get("model", {}).get("init_from"))


def run_data_config(run: Path) -> tuple[DataConfig, int]:
    """(the data section, the seed) of a run's resolved `config.yaml`."""
    saved = yaml.safe_load((run / "config.yaml").read_text()) or {}
    data = DataConfig()
    merge(data, saved.get("data", {}), prefix="data.")
    return data, int(saved.get("train", {}).get("seed", 0))


# families whose latent normalization is measured on posterior means, as their pipelines encode (FLUX.2's
# BatchNorm statistics are those of the patchified means); the others on posterior samples (LDM's scale_by_std),
# which for a deterministic latent are the same
MEASURED_ON_MEANS = {"flux2"}
POSITIVE = ("scaling_factor", "latents_std", "running_var")  # measured values that constant latents make 0 or inf


@torch.no_grad()
def measure_normalization(
    ae: LatentAutoencoder, images: Dataset, batch_size: int = 8, seed: int = 0
) -> tuple[dict, dict, tuple[torch.Tensor, torch.Tensor]]:
    """The family's latent normalization (`ae.measure_normalization`) measured on the latents of `images`.

    Returns (the updates for `ae.set_normalization`, a record: the posterior used and the number of latent values,
    (the first batch of images, its latents) for the fp16 check). Posterior samples draw from one generator
    seeded with `seed`, batch by batch in order. VQ: the latents before quantization.
    """
    posterior = "mean" if ae.family in MEASURED_ON_MEANS else "sample"
    gen = torch.Generator().manual_seed(seed)
    device = next(ae.module.parameters()).device
    first, count = [], [0]

    def latents():
        for x in DataLoader(images, batch_size=batch_size, shuffle=False):
            x = x.to(device)
            q = ae.encode(x)
            z = q.mode() if posterior == "mean" else q.sample(gen)
            if not first:
                first.append((x, z))
            count[0] += z.numel()
            yield z

    try:
        updates = ae.measure_normalization(latents())
    except ZeroDivisionError:  # 1 / std of constant latents
        raise ValueError("the latents have zero variance") from None
    for key, value in updates.items():
        v = torch.as_tensor(value, dtype=torch.float64)
        if not torch.isfinite(v).all() or (key in POSITIVE and (v <= 0).any()):
            raise ValueError(f"the latents have zero variance ({key})")
    return updates, {"posterior": posterior, "num_values": count[0]}, first[0]


def fp16_device() -> torch.device | None:
    """Where fp16 convolutions run: CUDA, else the CPU if this torch has fp16 conv kernels there; else None."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    try:
        torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3, dtype=torch.half), torch.ones(1, 1, 3, 3, dtype=torch.half))
    except RuntimeError:
        return None
    return torch.device("cpu")


@torch.no_grad()
def check_fp16(model: Autoencoder | LatentAutoencoder, x: torch.Tensor, z: torch.Tensor) -> tuple[bool, str]:
    """(force_upcast, why): encode x and decode z in fp16 and compare with fp32; True when it cannot be checked."""
    device = fp16_device()
    if device is None:
        return True, "not checked: this machine runs no fp16 convolutions; left True"
    ref = copy.deepcopy(model).to(device, torch.float32)
    half = copy.deepcopy(model).to(device, torch.float16)
    x, z = x.to(device), z.to(device)
    mean32, mean16 = ref.encode(x).mode(), half.encode(x.half()).mode().float()
    img32, img16 = ref.decode(z), half.decode(z.half()).float()
    if not (torch.isfinite(mean16).all() and torch.isfinite(img16).all()):
        return True, f"fp16 on {device.type} overflows (inf/NaN) on {len(x)} held-out images"
    latent_err = float((mean16 - mean32).abs().max() / mean32.abs().max().clamp_min(1e-12))
    image_err = float((img16 - img32).abs().max())
    summary = f"fp16 vs fp32 on {device.type}, {len(x)} held-out images: max image error {image_err:.2g}, " + (
        f"max relative latent error {latent_err:.2g}"
    )
    if image_err > FP16_TOLERANCE or latent_err > FP16_TOLERANCE:
        return True, summary + f" (> {FP16_TOLERANCE})"
    return False, summary


class PushError(RuntimeError):
    """The upload to the hub failed; the exported folder is intact."""


def hub_metadata(cls: str, run: Path | None, data: str | None, license: str) -> str:
    """The model card's YAML front matter (the hub's model card metadata), written with huggingface_hub."""
    from huggingface_hub import ModelCardData

    saved = (yaml.safe_load((run / "config.yaml").read_text()) or {}) if run is not None else {}
    init_from = (saved.get("model") or {}).get("init_from")
    source = data or (saved.get("data") or {}).get("source")
    # a hub base model is its repo id, without the subfolder of a pipeline's VAE
    base_model = "/".join(str(init_from).split("/")[:2]) if init_from and is_hub_name(init_from) else None
    hub_data = source and source != "sample" and not Path(source).exists() and looks_like_hub_name(source)
    card = ModelCardData(
        library_name="diffusers",
        license=license,
        tags=[
            "diffusers",
            cls,
            "autoencoder",
            "vq" if cls == "VQModel" else "vae",
            "latent-diffusion",
            "kl-autoencoder",
        ],  # fmt: skip
        base_model=base_model,
        datasets=[source] if hub_data else None,
    )
    return f"---\n{card.to_yaml()}\n---\n\n"


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload an exported folder as the hub model repo `repo_id` (created if needed); returns the repo URL."""
    from huggingface_hub import HfApi

    switch = offline_switch()
    if switch:
        raise PushError(f"--push-to-hub: offline ({switch}); {folder} is ready, upload it later with `hf upload`")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message="Upload from kl-ae export"
        )
    except Exception as e:  # no token, no network, no rights: the folder stays as exported
        raise PushError(f"--push-to-hub {repo_id}: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from None
    return str(url)


def _measured(info: dict, posterior: str) -> str:
    """Where the card's normalization comes from: measured here, or kept from the fine-tuned model."""
    if "normalization" in info:  # a decoder-only fine-tune: the latent space, and so its normalization, is kept
        return f"Kept from the fine-tuned model, whose encoder was frozen (held-out data checked: {info['data']})"
    return f"Measured on {info['data']}, {posterior} (seed {info['seed']})"


def _ours_lines(config: dict, info: dict, fp16_variant: bool) -> tuple[list[str], list[str]]:
    """(normalization section, usage) of our own classes' card: scaling / shift factors, force_upcast."""
    cls = config["_class_name"]
    lines = [
        _measured(info, "posterior samples") + ":",
        "",
        f"- `scaling_factor` = {config['scaling_factor']:.6g} (1 / std of the latents)",
    ]
    if cls == "AutoencoderKL":
        rounded = lambda v: None if v is None else [round(x, 5) for x in v]  # noqa: E731
        shift = config.get("shift_factor")
        lines += [
            f"- `shift_factor` = {'None' if shift is None else f'{shift:.6g}'} (mean of the latents)",
            f"- `latents_mean` = {rounded(config.get('latents_mean'))}",
            f"- `latents_std` = {rounded(config.get('latents_std'))}",
        ]
    lines += [
        f"- `force_upcast` = {config['force_upcast']}: {info['fp16_check']}",
        "",
        "A diffusion model is trained on `latents = (z - shift_factor) * scaling_factor` (SD 1.x-style pipelines "
        "use `z * scaling_factor` only) and its samples are decoded with `decode(latents / scaling_factor + "
        "shift_factor)`.",
    ]
    usage = [
        f"from diffusers import {cls}",
        "",
        f'vae = {cls}.from_pretrained("PATH"'
        + (', variant="fp16", torch_dtype=torch.float16' if fp16_variant else "")
        + ")",
        "z = vae.encode(images).latent_dist.sample()  # images (B, 3, H, W) in [-1, 1]"
        if cls == "AutoencoderKL"
        else "z = vae.encode(images).latents  # images (B, 3, H, W) in [-1, 1]",
        "latents = (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor"
        if cls == "AutoencoderKL"
        else "latents = z * vae.config.scaling_factor",
        "images = vae.decode(latents / vae.config.scaling_factor"
        + (" + (vae.config.shift_factor or 0.0)" if cls == "AutoencoderKL" else "")
        + ").sample",
    ]
    return lines, usage


def _family_lines(ae: LatentAutoencoder, info: dict, fp16_variant: bool) -> tuple[list[str], list[str]]:
    """(normalization section, usage) of another family's card: its pipeline's convention and measured values."""
    norm = ae.normalization()
    shown = lambda v: [round(float(x), 5) for x in v] if isinstance(v, list) else f"{v:.6g}"  # noqa: E731
    posterior = "posterior means" if info["posterior"] == "mean" else "posterior samples"
    lines = [
        _measured(info, posterior) + f", in the convention the {ae.class_name} pipelines apply: `{norm['convention']}`",
        "",
        *(f"- `{k}` = {shown(v)}" for k, v in norm.items() if k != "convention"),
    ]
    usage = [
        f"from diffusers import {ae.class_name}",
        "",
        f'vae = {ae.class_name}.from_pretrained("PATH"'
        + (', variant="fp16", torch_dtype=torch.float16' if fp16_variant else "")
        + ")",
        f"# normalize its latents as above before a diffusion model sees them: {norm['convention']}",
    ]
    return lines, usage


def _model_card(ae: LatentAutoencoder, config: dict, info: dict, run: Path | None, fp16_variant: bool) -> str:
    cls = config["_class_name"]
    ours = ae.family in ("kl", "vq")
    normalization, usage = _ours_lines(config, info, fp16_variant) if ours else _family_lines(ae, info, fp16_variant)
    lines = [
        f"# {cls} trained with kl-autoencoder",
        "",
        f"A first-stage autoencoder for latent diffusion ({cls}, diffusers format, safetensors).",
        "",
        "## Latent normalization (measured)",
        "",
        *normalization,
        "",
        "## Usage",
        "",
        "```python",
        *usage,
        "```",
        *card_lines(info.get("value_mapping")),
    ]
    if fp16_variant:
        lines += ["", f'`{FP16_WEIGHTS_NAME}` holds fp16 weights (`variant="fp16"`).']
    if run is not None:
        lines += ["", "## Training", "", f"Run folder: `{run}`", ""]
        config_file = run / "config.yaml"
        lines += ["```yaml", config_file.read_text().rstrip(), "```"]
        summary_file = run / "summary.json"
        if summary_file.is_file():
            summary = json.loads(summary_file.read_text())
            if str(summary.get("lpips", "")).startswith("OFF"):  # say it where a user of the weights reads
                lines += ["", f"**Trained WITHOUT the LPIPS perceptual loss** ({summary['lpips'][5:]})."]
            lines += ["", "## Validation metrics (summary.json)", "", "```json"]
            keep = {k: summary[k] for k in ("steps", "ema", "lpips", "first_eval", "last_eval") if k in summary}
            lines += [json.dumps(keep, indent=1), "```"]
    return "\n".join(lines) + "\n"


def export_run(
    source: str | Path,
    out_dir: str | Path,
    data: str | None = None,
    fp16_variant: bool = False,
    max_images: int | None = 256,
    batch_size: int = 8,
    seed: int = 0,
    license: str = "apache-2.0",
) -> Path:
    """Write `source`'s weights (a run: its newest, EMA, weights, as `load_autoencoder`) as a diffusers folder of
    the same class, with the family's latent normalization measured (`measure_normalization`); a run that fine-tuned
    a loaded model with its encoder frozen keeps that model's normalization (its latent space) unless `data` is given.

    Held-out images: `data` (a folder: all its images; "sample" or a hub name: its held-out split) or, by
    default, the run's validation split; at most `max_images` of them. `force_upcast` is decided where the
    class has it. The config records how the normalization was measured and the training step of the weights
    (`EXPORT_KEY`), by which a run folder's release is known to be current (`kl_autoencoder.folders.run_weights`).
    """
    try:
        ae = load_autoencoder(source)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"export: {source}: {e}") from None
    weights = find_diffusers_folder(source)
    run = find_run(source)
    ae.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    resolution = ae.sample_size or DEFAULT_RESOLUTION
    if run is not None and data is not None:
        resolution = run_data_config(run)[0].resolution
    images, description = held_out_images(run, data, resolution, max_images, ae.longest_frames)
    try:
        updates, info, (x, z) = measure_normalization(ae, images, batch_size, seed)
    except ValueError as e:
        raise ValueError(f"export: {e} on {description}; no latent normalization") from None
    info = {"data": description, "seed": seed, **info}
    if (mapping := model_mapping(str(source))) is not None:  # how its data's values map to [-1, 1] and back
        info["value_mapping"] = mapping
    extra = {}
    if ae.fp16_safe is not None:  # the class has force_upcast: decided by running it in fp16
        # our model as itself: a VQ model's latents go through the decoder unquantized, in fp16 throughout
        model = ae.module if ae.family in ("kl", "vq") else ae
        extra["force_upcast"], info["fp16_check"] = check_fp16(model.to("cpu"), x.cpu(), z.cpu())
    # a decoder-only fine-tune keeps the loaded normalization unless `data` asks for a measurement on other images
    if data is None and keeps_latent_space(run):  # measured for the card and the fp16 check only
        info["normalization"] = "kept: the loaded model's (the encoder was frozen)"
    else:
        ae.set_normalization(updates)
    extra[EXPORT_KEY] = {**info, "weights": str(weights), "step": weights_step(weights)}
    out = write_release(ae, out_dir, extra, fp16_variant)
    config = json.loads((out / "config.json").read_text())
    card = hub_metadata(config["_class_name"], run, data, license) + _model_card(ae, config, info, run, fp16_variant)
    (out / "README.md").write_text(card)
    return out


def write_release(ae: LatentAutoencoder, out_dir: str | Path, extra: dict, fp16_variant: bool) -> Path:
    """`ae` in its own class at `out_dir` (config keys `extra` merged), and optionally its fp16 variant."""
    out = Path(ae.save_pretrained(out_dir, extra_config=extra))
    if fp16_variant:
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            copy.deepcopy(ae).to(torch.float16).save_pretrained(tmp, extra_config=extra)
            os.replace(Path(tmp) / WEIGHTS_NAME, out / FP16_WEIGHTS_NAME)
    elif (out / FP16_WEIGHTS_NAME).exists():  # a stale variant from an earlier export must not mismatch
        (out / FP16_WEIGHTS_NAME).unlink()
    return out


def export_after_training(run: str | Path, fp16_variant: bool = False) -> Path:
    """What the trainer calls at the end of a run: `<run>/diffusers` from the run's newest weights (the final
    checkpoint's), with measured factors, force_upcast, the step and a model card."""
    run = Path(run)
    tmp = run / ".diffusers_export"
    shutil.rmtree(tmp, ignore_errors=True)
    export_run(latest_weights(run), tmp, fp16_variant=fp16_variant)
    shutil.rmtree(run / "diffusers", ignore_errors=True)
    os.replace(tmp, run / "diffusers")
    return run / "diffusers"
