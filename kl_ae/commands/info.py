"""`kl-ae info MODEL [--subfolder SUB]`: one screen about an autoencoder of any supported family.

Family and diffusers class, spatial factor, for a video family the temporal factor and the clip lengths it takes,
latent channels (raw, and as the family's pipeline normalizes them), the normalization and its values, parameter
counts (encoder / decoder / total) and whether fp16 is safe. Nothing is run through the model but a zero latent, to
read the normalized shape.
"""

from __future__ import annotations

import argparse

import torch

from kl_ae.common.config import ConfigError
from kl_autoencoder.interface import LatentAutoencoder, load_autoencoder


def clip_lengths(ae: LatentAutoencoder) -> str:
    """The clip lengths the model takes, from `longest_frames`: "1 + 4k frames (1, 5, 9, 13, ...)"."""
    lengths = sorted({ae.longest_frames(n) for n in range(1, 65)})
    if lengths == list(range(1, 65)):
        return "any number of frames"
    step = lengths[1] - lengths[0]
    return f"1 + {step}k frames ({', '.join(map(str, lengths[:4]))}, ...)"


def describe(ae: LatentAutoencoder) -> dict:
    """What `info` prints, as a dict (JSON-friendly)."""
    f, m = ae.spatial_factor, ae.image_multiple
    try:  # a family that takes one size only (RAE) refuses twice its multiple
        ae.check_size(2 * m, 2 * m)
        sizes = f"image sides: multiples of {m}"
    except ValueError:
        sizes = f"images: {m}x{m} only"
    size = ae.sample_size if ae.sample_size and ae.sample_size % m == 0 else 4 * m
    with torch.no_grad():  # a zero raw latent of one `size` image: the normalized shape is what the pipeline sees
        shape = ae.normalize(torch.zeros(1, ae.latent_channels, size // f, size // f)).shape
    return {
        "family": ae.family,
        "class_name": ae.class_name,
        "spatial_factor": f,
        "sizes": sizes,
        "is_video": ae.is_video,
        "temporal_factor": ae.temporal_factor,
        "clips": clip_lengths(ae),
        "latent_channels": ae.latent_channels,
        "normalized_channels": int(shape[1]),
        "normalized_factor": size // int(shape[-1]),
        "sample_size": ae.sample_size,
        "normalization": ae.normalization(),
        "parameters": ae.parameter_counts(),
        "fp16_safe": ae.fp16_safe,
    }


def _values(value) -> str:
    """A number as is; a long list of numbers as its count, range and mean."""
    if not isinstance(value, (list, tuple)):
        return f"{value:.6g}" if isinstance(value, float) else str(value)
    flat = torch.tensor(value, dtype=torch.float64).flatten()
    if len(flat) <= 4:
        return ", ".join(f"{v:.4g}" for v in flat.tolist())
    return f"{len(flat)} values in [{flat.min():.4g}, {flat.max():.4g}], mean {flat.mean():.4g}"


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10_000 else str(n)


def format_info(d: dict, model: str) -> str:
    fp16 = {True: "yes", False: "no (force_upcast: run it in fp32 or bf16)", None: "not known (measure it)"}
    norm = dict(d["normalization"])
    counts = d["parameters"]
    lines = [
        f"model:            {model}",
        f"family:           {d['family']} ({d['class_name']})",
        f"spatial factor:   {d['spatial_factor']} ({d['sizes']})",
        *([f"temporal factor:  {d['temporal_factor']} (clips: {d['clips']})"] if d["is_video"] else []),
        f"latent channels:  {d['latent_channels']} (normalized: {d['normalized_channels']} channels at "
        f"f{d['normalized_factor']})",
        f"sample size:      {d['sample_size'] or 'not recorded'}",
        f"normalization:    {norm.pop('convention')}",
        *(f"  {key + ':':16s}{_values(value)}" for key, value in norm.items()),
        f"parameters:       encoder {_millions(counts['encoder'])}, decoder {_millions(counts['decoder'])}, "
        f"total {_millions(counts['total'])}",
        f"fp16 safe:        {fp16[d['fp16_safe']]}",
    ]
    return "\n".join(lines)


def info(model: str, subfolder: str | None = None) -> str:
    """The info screen of `model` (a folder, run or hub name); ConfigError for what cannot be loaded."""
    try:
        ae = load_autoencoder(model, subfolder)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"--model: {model}: {e}") from None
    name = f"{model.rstrip('/')}/{subfolder.strip('/')}" if subfolder else model
    return format_info(describe(ae), name)


def run_info_command(args: argparse.Namespace) -> int:
    print(info(args.model, args.subfolder))
    return 0
