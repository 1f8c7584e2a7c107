"""`kl-ae eval`: reconstruction metrics, latent statistics, latent geometry and VAE diagnostics of an autoencoder.

Any family `kl_autoencoder.interface.load_autoencoder` takes (our KL / VQ model, FLUX.2, DC-AE, Qwen-Image, Wan,
HunyuanImage, RAE). Gaussian posteriors: rate, active units, the aggregate posterior's distance to the prior.
Deterministic latents (DC-AE, RAE): no rate; the aggregate's distance to N(0, I). VQ models: codebook usage,
perplexity, dead codes and the code histogram, and statistics of the latents before quantization (what LDM
diffuses). Every model: the statistics of its raw latents and of its latents normalized as its diffusion pipeline
normalizes them (`normalized_latents`). One pass over the set per model, batched, under python or `accelerate
launch` (sharded loader, per-image values through `gather_for_metrics`). Images are evaluated at their own size
(cropped to what every model takes) or brought to `resolution` by a named protocol (`kl_ae.common.data.PROTOCOLS`);
protocol, posterior and FID implementation are recorded; rFID's real side is cached per image set and protocol
(`kl_ae.common.fid_stats`). A `--split` of `sample` or a hub name, or of a run's own folder, is the run's
held-out split when the model is a run (its split settings and seed); without `--data`, a run's own held-out split.
Images of any channel count, at their own bit depth, read with the model's recorded value mapping
(`eval.channels`). Clips (`eval.clips`) of a folder or file of videos, "sample-video", or the first videos of shards
or of a hub dataset streamed with `streaming` (`kl_ae.common.video.load_clips`); bad ones are skipped and listed.

    kl-ae eval --model RUN|CHECKPOINT|DIFFUSERS_DIR|HUB_NAME --data FOLDER|sample|HUB_NAME [--compare PATH2] ...
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from eval import channels as chans
from eval import diagnostics as diag
from eval import report
from eval.clips import clip_figures, clip_row, clip_summary, fvd_status_for
from eval.figures import figures
from eval.geometry import TRANSFORMS, geometry_row, scale_size
from eval.geometry import summarize as summarize_geometry
from eval.models import check_frames, check_resolution, check_sizes, image_multiple, load_model, longest_frames
from kl_ae.common.channels import model_mapping
from kl_ae.common.config import ConfigError
from kl_ae.common.data import PROTOCOLS, EvalImages, load_images
from kl_ae.common.fid_stats import load_reference, reference_file, reference_key, save_reference
from kl_ae.common.frames import is_clip
from kl_ae.common.fvd import build_i3d
from kl_ae.common.latent_stats import channel_moments, latent_statistics
from kl_ae.common.lpips import BACKBONE_FILES, build_lpips, find_backbone, missing_weights_message
from kl_ae.common.metrics import (
    build_inception,
    fid_implementation,
    frechet_distance_from_statistics,
    gaussian_statistics,
    inception_features,
    ms_ssim,
    mse,
    psnr,
    ssim,
    to_unit,
)
from kl_ae.common.release import run_data_config
from kl_ae.common.runs import find_run
from kl_ae.common.video import EvalClips, is_video_source, load_clips
from kl_ae.common.views import rgb_view
from kl_autoencoder.interface import LatentAutoencoder


@dataclass
class EvalConfig:
    model: str  # a run, checkpoint or diffusers folder of any supported class, or a hub name (REPO[/SUBFOLDER])
    # a folder (all its images or videos), a video file, "sample" / "sample-video" or a hub name (their held-out
    # split), shards (the first max_images, default 256); None: a run's own data, its held-out split
    data: str | None = "sample"
    streaming: bool = False  # data: a hub dataset of videos (or a local hub-style folder), streamed: its first clips
    split: str = "val"  # "sample" or a hub name: "val" (held out) or "train" (the images the recipe trains on)
    out: str | None = None  # default <model>/eval
    resolution: int | None = None  # None: each image at its own size (cropped to a multiple of what the models take)
    protocol: str = "torchvision"  # how images are brought to `resolution`: torchvision | adm (data.PROTOCOLS)
    posterior: str = "mode"  # reconstructions from the posterior's mode() or a sample() (EQ-VAE, LightningDiT)
    batch_size: int = 8  # per process; 1 when the images differ in size
    compare: str | None = None  # a second model evaluated on the same images
    lpips: str = "auto"  # required | auto | off
    max_images: int | None = None  # the first N images only
    frames: int | None = None  # videos: frames per clip (None: the whole video, cut to a length every model takes)
    seed: int = 0  # posterior noise (per process), the prior comparison's subsamples, the split outside a run
    kl_threshold: float = 0.01  # nats per latent element for an active channel / unit
    vectors_per_image: int = 64  # latent vectors kept per image for the MMD and the histograms
    grid_images: int = 8
    # N bands: the triplet LPIPS, rFID and the pictures see (None: the run's loss.lpips_channels; pictures: 0, 1, 2)
    bands: list[int] | None = None


def latent_row(ae: LatentAutoencoder, posterior, z: torch.Tensor, cfg: EvalConfig, gen) -> dict:
    """Per-image latent summaries of one batch: moments of z (what a diffusion model is trained on) and of z
    normalized as the family's pipeline does, a few latent vectors, the code histogram (VQ) or the posterior's
    mean moments and KL per channel (Gaussian posteriors)."""
    count, mean, m2 = channel_moments(z)
    n_count, n_mean, n_m2 = channel_moments(ae.normalize(z))  # FLUX.2: (B, 4C, h/2, w/2)
    row = {"count": count, "z_mean": mean, "z_m2": m2, "norm_count": n_count, "norm_mean": n_mean, "norm_m2": n_m2,
           "vectors": diag.subsample_positions(z, cfg.vectors_per_image, gen)}  # fmt: skip
    if ae.family == "vq":  # the codes the decoder sees: decode quantizes these latents
        row["code_counts"] = diag.code_histogram(ae.module.quantize(z).indices, ae.module.config.num_codes)
    elif posterior.logvar is not None:
        _, mu_mean, mu_m2 = channel_moments(posterior.mean)
        row |= {"mu_mean": mu_mean, "mu_m2": mu_m2, "kl": diag.kl_per_channel(posterior.mean, posterior.logvar)}
    return row


def scale_transform(ae: LatentAutoencoder, x: torch.Tensor) -> tuple[str, ...]:
    """The geometry transforms `ae` can decode for images like x: downscaling needs a latent size the decoder
    takes (RAE decodes its one size only); rotations keep the size."""
    z_size = (x.shape[2] // ae.spatial_factor, x.shape[3] // ae.spatial_factor)
    try:
        ae.check_size(*(s * ae.spatial_factor for s in scale_size(z_size)))
    except ValueError:
        return tuple(t for t in TRANSFORMS if t != "scale")
    return TRANSFORMS


@torch.no_grad()
def collect(
    ae: LatentAutoencoder, loader, accelerator: Accelerator, lpips, inception, cfg: EvalConfig, name: str, real: bool
):
    """Per-image metrics and latent summaries over the whole set, gathered from every process. (N, ...) each.

    real: also the Inception features of the images themselves (not needed when their statistics are cached).

    VQ: the per-image code histograms are summed as they are gathered ("code_counts", (1, K)), not kept.
    """
    gen = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
    geo_gen = torch.Generator().manual_seed(cfg.seed + 7919 * (1 + accelerator.process_index))  # latent noise
    values: dict[str, list[torch.Tensor]] = {}
    ms_ssim_reason = ""
    for x in tqdm(loader, desc=f"eval {name}", disable=not accelerator.is_main_process, dynamic_ncols=True):
        posterior = ae.encode(x)
        # statistics and rate describe what the diffusion model is trained on: a posterior sample (VQ: the latents
        # before quantization, which LDM diffuses and decode quantizes; deterministic families: the latent)
        z, z_mode = posterior.sample(gen), posterior.mode()
        x_hat = ae.decode(z if cfg.posterior == "sample" else z_mode)
        a, b = to_unit(x), to_unit(x_hat)
        if is_clip(x):  # inception is I3D here (rFVD)
            row = clip_row(a, b, lpips, inception, real)
            ms_ssim_reason = "clips: MS-SSIM is not measured"
        else:
            row = image_row(a, b, lpips, inception, real, cfg.bands)
            reason = row.pop("ms_ssim_reason")
            ms_ssim_reason = ms_ssim_reason or reason
        row |= latent_row(ae, posterior, z, cfg, gen)
        # clips: the latent geometry of the first frame, which a causal model encodes alone as an image
        first = (lambda t: t[:, :, 0]) if is_clip(x) else (lambda t: t)
        x1, z1, zs1, xh1 = first(x), first(z_mode), first(z), first(x_hat)
        row |= geometry_row(ae.decode, x1, z1, zs1, xh1, ae.spatial_factor, geo_gen, scale_transform(ae, x1))
        for key, v in accelerator.gather_for_metrics(row).items():
            if key == "code_counts":  # (N, K) per batch would not fit for large codebooks: keep the sum
                v = v.sum(0, keepdim=True).cpu()
                values[key] = [values[key][0] + v] if key in values else [v]
            else:
                values.setdefault(key, []).append(v.cpu())
    return {k: torch.cat(v) for k, v in values.items()}, ms_ssim_reason


def image_row(a: torch.Tensor, b: torch.Tensor, lpips, inception, real: bool, bands=None) -> dict[str, torch.Tensor]:
    """Per-image values of one batch of images in [0, 1]: PSNR, SSIM, MSE, MS-SSIM (NaN, and its reason under
    "ms_ssim_reason", where too small), pixels, PSNR per channel (RGBA: of alpha and the composite), LPIPS and
    Inception features (of the 3-channel view, `rgb_view` with `bands`) where their networks are given."""
    n = len(a)
    ms, reason = ms_ssim(a, b)
    row = {
        "psnr": psnr(a, b),
        "ssim": ssim(a, b),
        "mse": mse(a, b),
        "ms_ssim": ms if ms is not None else torch.full((n,), math.nan, device=a.device),
        "pixels": torch.full((n,), float(a.shape[2] * a.shape[3]), dtype=torch.float64, device=a.device),
        "ms_ssim_reason": reason,
    } | chans.channel_row(a, b)
    if lpips is not None:  # any channel count: `chans.rgb_networks` wrapped it in ChannelLPIPS
        row["lpips"] = lpips(a * 2 - 1, b * 2 - 1).float()
    a, b = rgb_view(a, bands)[0], rgb_view(b, bands)[0]  # `rgb_networks` left Inception only where these exist
    if inception is not None:
        if real:
            row["inception_real"] = inception_features(inception, a)
        row["inception_fake"] = inception_features(inception, b)
    return row


def reconstruction(values: dict[str, torch.Tensor], lpips_status: str, fid_status: str, reason: str, reference):
    """The `reconstruction` entry: PSNR, SSIM, MSE, MS-SSIM, LPIPS and rFID (the last three where available).

    reference: (mean, covariance, where they come from) of the real images' Inception features, or None.
    """
    n = len(values["psnr"])
    ms = values["ms_ssim"][~values["ms_ssim"].isnan()]
    rec = {
        "psnr": values["psnr"].double().mean().item(),  # mean of per-image PSNR
        "ssim": values["ssim"].double().mean().item(),
        "mse": values["mse"].double().mean().item(),
        "ms_ssim": {"available": True, "value": ms.double().mean().item(), "num_images": len(ms)}
        if len(ms)
        else {"available": False, "reason": reason or "images too small for 5 scales"},
    }
    if "psnr_channels" in values:
        rec |= chans.channel_summary(values)
    if "lpips" in values:
        rec["lpips"] = {"available": True, "value": values["lpips"].double().mean().item(), "net": lpips_status}
    else:
        rec["lpips"] = {"available": False, "reason": lpips_status}
    if "inception_fake" in values and n >= 2 and reference is not None:
        rfid = frechet_distance_from_statistics(*reference[:2], *gaussian_statistics(values["inception_fake"]))
        rec["rfid"] = {"available": True, "value": rfid, "num_images": n, "weights": fid_status, "real": reference[2]}
    elif "psnr_first" in values:  # clips: rFVD instead, from I3D (fid_status is its status)
        rec["rfid"] = {"available": False, "reason": "clips: see rfvd"}
        rec |= clip_summary(values, fid_status)
    else:
        why = fid_status if "inception_fake" not in values else "needs at least 2 images"
        rec["rfid"] = {"available": False, "reason": why}
    return rec


def normalized_latents(ae: LatentAutoencoder, values: dict[str, torch.Tensor]) -> dict:
    """Statistics of the latents as the family's pipeline normalizes them: what its diffusion model sees."""
    stats = latent_statistics(values["norm_count"], values["norm_mean"], values["norm_m2"])
    keep = ("num_values", "global_mean", "global_std", "latents_mean", "latents_std")
    return {"convention": ae.normalization()["convention"], "channels": len(stats["latents_mean"])} | {
        k: stats[k] for k in keep
    }


def summarize(
    values: dict[str, torch.Tensor], lpips_status: str, fid_status: str, cfg: EvalConfig, reason: str, reference,
    ae: LatentAutoencoder,
):  # fmt: skip
    """The metrics.json entry of one model from its gathered per-image values (`reconstruction` for `reference`)."""
    rec = reconstruction(values, lpips_status, fid_status, reason, reference)
    stats = latent_statistics(values["count"], values["z_mean"], values["z_m2"])
    geometry = summarize_geometry(values, rec["psnr"])
    family = {"family": ae.family, "class_name": ae.class_name, "normalized_latents": normalized_latents(ae, values)}
    if "code_counts" in values:  # VQ: codebook use instead of the Gaussian posterior's diagnostics
        codebook = diag.codebook_statistics(values["code_counts"][0], float(values["pixels"].sum()))
        warning = diag.codebook_warning(codebook)
        return {
            "bottleneck": "vq",
            "reconstruction": rec,
            "latents": stats,  # of the latents before quantization: what a diffusion model is trained on
            "codebook": codebook,
            "geometry": geometry,
            "warnings": [warning] if warning else [],
        } | family
    prior = diag.prior_distance(values["vectors"].flatten(0, 1), stats, seed=cfg.seed)
    if "kl" not in values:  # a deterministic latent: no posterior variance, so no rate or KL
        why = f"{ae.class_name} encodes to a point (no posterior variance): no rate, KL or active units"
        return {"reconstruction": rec, "latents": stats, "posterior": {"deterministic": True, "note": why},
                "prior_distance": prior, "geometry": geometry, "warnings": []} | family  # fmt: skip
    positions = values["count"]
    rate = diag.rate_summary(values["kl"], positions, values["pixels"], cfg.kl_threshold)
    burda = diag.burda_active_units(positions, values["mu_mean"], values["mu_m2"], cfg.kl_threshold)
    warning = diag.collapse_warning(rate, burda)
    return {
        "reconstruction": rec,
        "latents": stats,
        "rate": rate,
        "active_units": burda,
        "prior_distance": prior,
        "geometry": geometry,
        "warnings": [warning] if warning else [],
    } | family


def lpips_for_eval(mode: str, download: bool = True) -> tuple[torch.nn.Module | None, str]:
    """LPIPS (VGG) per `--lpips`, or (None, why); `required` with the weights missing raises FileNotFoundError."""
    if mode == "off":
        return None, "disabled (--lpips off)"
    path, why = find_backbone("vgg", None, download)
    if path is not None:
        return build_lpips(mode, "vgg", weights_path=str(path))  # status "vgg: <weights file>"
    if mode == "required":
        raise FileNotFoundError(missing_weights_message("vgg", None, why))
    file = BACKBONE_FILES["vgg"]
    return None, (
        f"{file} (torchvision VGG16, the LPIPS backbone) is not in {Path(torch.hub.get_dir()) / 'checkpoints'} "
        f"({why}; download https://download.pytorch.org/models/{file} there, or run `kl-ae fetch-weights`)"
    )


def _json_safe(value):
    """inf / nan -> None so metrics.json stays strict JSON (identical images have infinite PSNR)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def default_out(model: str) -> Path:
    """MODEL/eval for a local model; eval/<org>--<name>[--sub] for a hub name."""
    return Path(model) / "eval" if Path(model).exists() else Path("eval") / model.strip("/").replace("/", "--")


def check_config(cfg: EvalConfig) -> None:
    """One-line ConfigErrors for values no model or data could make right."""
    if cfg.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {cfg.batch_size}")
    if cfg.split not in ("val", "train"):
        raise ConfigError(f"--split: must be 'val' or 'train', got {cfg.split!r}")
    if cfg.max_images is not None and cfg.max_images < 1:
        raise ConfigError(f"--max-images: must be >= 1, got {cfg.max_images}")
    if cfg.protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol: must be one of {list(PROTOCOLS)}, got {cfg.protocol!r}")
    if cfg.protocol == "adm" and cfg.resolution is None:
        raise ConfigError("--protocol: adm makes N x N images; give --resolution N")
    if cfg.posterior not in ("mode", "sample"):
        raise ConfigError(f"--posterior: must be 'mode' or 'sample', got {cfg.posterior!r}")


def load_models(cfg: EvalConfig) -> dict[str, LatentAutoencoder]:
    """{"model": ..., "compare": ...}: two families may differ in factor, channels and normalized shape; each is
    measured in its own shapes, on the same images."""
    models = {"model": load_model(cfg.model)}
    if cfg.compare:
        models["compare"] = load_model(cfg.compare, "--compare")
    for name, ae in models.items():
        check_frames(ae, cfg.frames, name)
        if cfg.resolution is not None:
            check_resolution(ae, cfg.resolution, name)
    return models


def same_folder(data: str, source: str) -> bool:
    """Whether `data` names the folder `source` names (a run's own data, however the path is written)."""
    return Path(data).expanduser().is_dir() and Path(data).expanduser().resolve() == Path(source).expanduser().resolve()


def eval_images(cfg: EvalConfig, models: dict[str, LatentAutoencoder]) -> tuple[EvalImages, dict]:
    """The images and how they were split: a run's held-out (or training) split when the model is a run (its split
    settings and seed, its own folder split as its trainer split it), else `cfg.seed`'s split of `sample` or a hub
    name, or a whole folder."""
    run = find_run(cfg.model) if Path(cfg.model).exists() else None
    run_data, seed = run_data_config(run) if run is not None else (None, cfg.seed)
    if cfg.data is None:
        if run_data is None:
            raise ConfigError("--data: required unless --model is a run folder (whose held-out split is then used)")
        cfg.data = run_data.source
    own_folder = run_data is not None and same_folder(cfg.data, run_data.source)
    multiple = image_multiple(*models.values())
    channels = {name: ae.image_channels for name, ae in models.items()}
    if len(set(channels.values())) > 1:
        raise ConfigError(f"--compare: takes {channels['compare']} channels, --model {channels['model']}")
    mapping = model_mapping(cfg.model)
    chans.check_mapping(mapping, channels["model"], cfg.model)
    cfg.bands = cfg.bands if cfg.bands is not None else chans.run_bands(run)
    if is_video_source(cfg.data, cfg.streaming):
        clips = load_clips(cfg.data, multiple, cfg.resolution, cfg.frames, longest_frames(*models.values()),
                           cfg.max_images, seed, run_data, streaming=cfg.streaming)  # fmt: skip
        return clips, {"split_seed": seed, "run": str(run) if run is not None else None, "frames": clips.frames,
                       "skipped": clips.skipped}  # fmt: skip
    if cfg.streaming:
        raise ConfigError(f"--streaming: {cfg.data} holds no videos; a hub image dataset is read by its name alone")
    images = load_images(cfg.data, multiple, cfg.split, cfg.resolution, cfg.max_images, seed, own_folder,
                         cfg.protocol, run_data, channels["model"], mapping)  # fmt: skip
    for name, ae in models.items():
        check_sizes(ae, images.sizes(), name)
    split = {"split_seed": seed, "run": str(run) if run is not None else None}
    return images, split | {"value_mapping": images.mapping, "psnr_peak": chans.peak_note(images.mapping)}


def measure(cfg: EvalConfig, models: dict, images: EvalImages, accelerator: Accelerator) -> tuple[dict, dict, int]:
    """(results, latent vectors for the histograms, batch size): every model over the loader, summarized."""
    sizes = images.sizes()
    batch_size = cfg.batch_size if len(sizes) == 1 else 1  # different sizes cannot share a batch
    loader = accelerator.prepare(DataLoader(images, batch_size=batch_size, shuffle=False))
    clips = isinstance(images, EvalClips)
    with accelerator.local_main_process_first():  # one download per machine; the others find it in the cache
        first = accelerator.is_local_main_process
        lpips, lpips_status = lpips_for_eval(cfg.lpips, download=first)
        # clips: I3D for rFVD takes Inception's place (its real side is measured every time, not cached)
        inception, fid_status = build_i3d(download=first) if clips else build_inception(download=first)
    if clips:
        inception, fid_status = fvd_status_for(inception, fid_status, images.frames)
    else:  # LPIPS and Inception take RGB: the view of other channel counts, or off with the reason
        channels = images.mapping["channels"]
        lpips, lpips_status, inception, fid_status = chans.rgb_networks(channels, cfg.bands, lpips, lpips_status,
                                                                  inception, fid_status)  # fmt: skip
    for module in (lpips, inception, *(ae.module for ae in models.values())):
        if module is not None:
            module.to(accelerator.device).eval()
    fid_key = reference = None
    if inception is not None and not clips:
        # every process looks before its first gather; the main process writes only after the last one
        fid_key = reference_key(images, sizes, fid_implementation()) | chans.view_key(images.mapping, cfg.bands)
        cached = load_reference(fid_key)
        reference = None if cached is None else (cached[0], cached[1], f"cached statistics: {cached[2]}")
    results, vectors = {}, {}
    for name, ae in models.items():
        values, reason = collect(ae, loader, accelerator, lpips, inception, cfg, name, real=reference is None)
        if reference is None and len(values.get("inception_real", ())) >= 2:
            mu, sigma = gaussian_statistics(values["inception_real"])
            if accelerator.is_main_process:
                save_reference(fid_key, mu, sigma)
            reference = (mu, sigma, f"computed here, cached in {reference_file(fid_key)}")
        results[name] = {"path": cfg.model if name == "model" else cfg.compare}
        results[name] |= summarize(values, lpips_status, fid_status, cfg, reason, reference, ae)
        vectors[name] = values["vectors"].flatten(0, 1)  # (N * k, C), for the histograms
    return results, vectors, batch_size


def write_report(cfg, models, images, results, vectors, out: Path, accelerator: Accelerator, summary: dict) -> None:
    """The figures, report.html and the console summary (main process)."""
    figs: dict[str, dict[str, str]] = {"Reconstructions": {}, "Prior samples (holes)": {}, "Random codes": {}}
    for name, ae in models.items():
        if isinstance(images, EvalClips):
            files = clip_figures(ae, images, name, out, cfg.grid_images, cfg.seed, accelerator.device)
            figs["Reconstructions"][f"{name}: frames of clips, reconstructions, |x - x_hat| x 5"] = files["recon"]
            figs["Prior samples (holes)"][f"{name}: frames of a clip decoded from N(0, I)"] = files["prior"]
            figs.setdefault("Videos", {})[f"{name}: input | reconstruction"] = files["video"]
            continue
        files = figures(ae, images, results[name], name, out, cfg, accelerator.device)
        figs["Reconstructions"][f"{name}: images, reconstructions, |x - x_hat| x 5"] = files["recon"]
        if "prior" in files:
            figs["Prior samples (holes)"][f"{name}: reconstructions, N(0, I), N(mean, std^2)"] = files["prior"]
        else:
            caption = f"{name}: reconstructions, codes uniform over the used codes, codes from the histogram"
            figs["Random codes"][caption] = files["codes"]
    kl_results = {n: r for n, r in results.items() if "rate" in r}
    vq_results = {n: r for n, r in results.items() if "codebook" in r}
    if kl_results:
        report.save_kl_bars({n: r["rate"]["kl_per_channel"] for n, r in kl_results.items()}, cfg.kl_threshold,
                            out / "kl_per_channel.png")  # fmt: skip
        figs["Rate per channel"] = {"KL per channel": "kl_per_channel.png"}
    if vq_results:
        histograms = {n: r["codebook"]["histogram"] for n, r in vq_results.items()}
        report.save_code_usage(histograms, out / "code_usage.png")
        figs["Code usage"] = {"code histogram, and code frequencies ranked": "code_usage.png"}
    geometry = {n: r["geometry"] for n, r in results.items()}
    spectra = {n: (g["spectrum"]["latent_radial_power"], g["spectrum"]["image_radial_power"]) for n, g in
               geometry.items()}  # fmt: skip
    report.save_spectra(spectra, out / "spectrum.png")
    report.save_correlations({n: g["channel_correlation"] for n, g in geometry.items()}, out / "correlation.png")
    figs["Latent geometry"] = {
        "radial power spectrum of the latents and of the images": "spectrum.png",
        "correlation between latent channels": "correlation.png",
    }
    report.save_latent_histograms(vectors, out / "latent_hist.png")
    what = "posterior samples" if not vq_results else "VQ: latents before quantization" if not kl_results else (
        "posterior samples (KL), latents before quantization (VQ)")  # fmt: skip
    figs["Latent histograms"] = {f"{what} against N(0, 1)": "latent_hist.png"}
    figs = {title: files for title, files in figs.items() if files}
    header = {"model": cfg.model, "compare": cfg.compare or "-", "data": cfg.data, "images": len(images),
              "sizes": ", ".join(summary["image_sizes"]), "processes": accelerator.num_processes}  # fmt: skip
    report.write_html(out / "report.html", header, results, figs)
    print_summary(results, out)


def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate `cfg.model` (and `cfg.compare`) on `cfg.data`; writes metrics.json + report.html; returns the dict."""
    check_config(cfg)
    accelerator = Accelerator()  # no mixed precision argument: evaluation runs the model in fp32
    models = load_models(cfg)
    images, split = eval_images(cfg, models)
    results, vectors, batch_size = measure(cfg, models, images, accelerator)
    factor = image_multiple(*models.values())
    summary = {
        "data": cfg.data,
        "split": cfg.split,
        "num_images": len(images),
        "image_sizes": sorted(f"{h}x{w}" for h, w in images.sizes()),
        "batch_size": batch_size,
        "num_processes": accelerator.num_processes,
        "protocol": {
            "name": cfg.protocol if cfg.resolution is not None else "own size",
            "resolution": cfg.resolution,
            "resize": PROTOCOLS[cfg.protocol]
            if cfg.resolution is not None
            else f"none: each image centre-cropped to a multiple of {factor}",
            "posterior": cfg.posterior,  # Gaussian posteriors; VQ reconstructs through the codebook
            "rfid": fid_implementation(),
        },
        "settings": asdict(cfg),
        **split,
    }
    # metrics.json: the main model's results at the top level, the second model's under "compare"
    metrics = _json_safe({**summary, **results["model"], **({"compare": results["compare"]} if cfg.compare else {})})
    out = Path(cfg.out) if cfg.out else default_out(cfg.model)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
        write_report(cfg, models, images, results, vectors, out, accelerator, summary)
    accelerator.wait_for_everyone()
    return metrics


def print_summary(results: dict, out: Path) -> None:
    for name, r in results.items():
        rec = r["reconstruction"]
        head = f"{name}: PSNR {rec['psnr']:.2f} dB, SSIM {rec['ssim']:.4f}"
        if "codebook" in r:
            cb = r["codebook"]
            print(
                f"{head}, codebook usage {cb['usage']:.4g} "
                f"({cb['used_codes']}/{cb['num_codes']}), perplexity {cb['perplexity']:.4g}, {cb['dead_codes']} dead "
                f"codes, scaling_factor {r['latents']['scaling_factor']:.5g} (latents before quantization)"
            )
        elif "rate" in r:
            rate = r["rate"]
            print(
                f"{head}, rate {rate['bits_per_pixel']:.4g} "
                f"bits/pixel, {rate['active_channels']}/{len(rate['kl_per_channel'])} active channels, "
                f"MMD^2 to N(0, I) {r['prior_distance']['mmd2']:.4f}, "
                f"scaling_factor {r['latents']['scaling_factor']:.5g}"
            )
        else:
            print(f"{head}, deterministic latents (no rate), standardised MMD^2 to N(0, I) "
                  f"{r['prior_distance']['mmd2_standardized']:.4f}")  # fmt: skip
        norm = r["normalized_latents"]
        print(f"{name}: normalized latents ({norm['convention']}): {norm['channels']} channels, mean "
              f"{norm['global_mean']:.4g}, std {norm['global_std']:.4g}")  # fmt: skip
        geo, fmt = r["geometry"], lambda v: "n/a" if v is None else f"{v:.2f}"
        print(
            f"{name}: equivariance gap {fmt(geo['gap_scale_db'])} dB (downscale x2), {fmt(geo['gap_rotation_db'])} dB "
            f"(rotations); high-frequency power share {geo['spectrum']['latent_high_frequency_share']:.3f} (latents), "
            f"{geo['spectrum']['image_high_frequency_share']:.3f} (images)"
        )
        for w in r["warnings"]:
            print(f"WARNING ({name}): {w}")
    print(f"report: {out / 'report.html'}")
