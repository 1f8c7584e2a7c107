"""Data beyond 8-bit RGB: which files fit a set of `data.channels`, and the value mapping of stored values to [-1, 1]
and back (`value_mapping`, `to_model`, `to_stored`), recorded in the run and the exported model.

A folder's set has one stored type (uint8, uint16, float32, ...): the most common among the headers of up to 32 of
its training files, evenly spaced in sorted order, whose channel count fits `data.channels` (ties: the deeper type).
A file fits (`fit`) when its type is the set's and its channel count is `data.channels`, except that an RGBA set
takes RGB files (alpha opaque) and grayscale ones (repeated to RGB); an RGB file in a 1-channel set is a mismatch,
never converted. Mismatches are skipped and listed like broken files (`data.channel_mismatch=skip`), or the headers
of every file are checked before training and the first is one ConfigError naming it (`error`).

Sets of 3-channel 8-bit images keep the RGB reader (`kl_ae.common.images.to_rgb`: every mode converted, alpha on
white) and, with the format's range, the uint8 items of before: "reader": "rgb8" in the mapping; so do "sample",
hub datasets and shards, which are RGB only.

The mapping, per channel c: x = (v - low[c]) / ((high[c] - low[c]) / 2) - 1, clipped to [-1, 1], and its inverse
v = (x + 1) * (high[c] - low[c]) / 2 + low[c], rounded for integer types. "format": low 0, high the type's peak
(255, 65535; float files are expected in [0, 1] and one outside is skipped). "measured": the 0.1 and 99.9
percentiles of each channel over a seeded sample of the training split (up to 256 files, up to 16384 pixels of
each; a constant channel gets high = low + 1), values outside clipped.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from kl_ae.common.config import ConfigError, DataConfig, merge
from kl_ae.common.images import (
    DECODE_ERRORS,
    Unusable,
    list_images,
    open_image,
    pixel_limit_lifted,
    resize_shorter,
    seeded_split,
    to_rgb,
)
from kl_ae.common.stored import PEAKS, read_stored, stored_header, type_name
from kl_ae.common.video import list_videos

MAPPING_FILE = "value_mapping.json"  # in the run folder
HEADER_SAMPLE = 32  # headers read to find a folder's stored type
MEASURE_FILES, MEASURE_PIXELS = 256, 16384
PERCENTILES = (0.1, 99.9)
RULE = "x = (v - low) / ((high - low) / 2) - 1, clipped to [-1, 1]; v = (x + 1) * (high - low) / 2 + low"


class Mismatch(Unusable):
    """A file whose channel count or type does not fit the set (`data.channel_mismatch`)."""


def _bits(dtype: str) -> int:
    return 32 if dtype == "float32" else np.dtype(dtype).itemsize * 8


def _peak(dtype: str) -> float:
    return PEAKS.get(dtype) or float(np.iinfo(dtype).max)


def _fits(channels: int, have: int) -> bool:
    return have == channels or (channels == 4 and have < 4)


def fit(arr: np.ndarray, channels: int, dtype: str) -> np.ndarray:
    """(H, W, C) stored values as the set takes them, or Mismatch: RGBA sets add an opaque alpha to RGB and
    repeat grayscale to RGB; any other difference of channel count or type is a mismatch."""
    have, kind = arr.shape[-1], type_name(arr.dtype)
    what = f"{have} channel{'s' * (have != 1)} of {kind}, the set is data.channels={channels} of {dtype}"
    if kind != dtype or not _fits(channels, have):
        raise Mismatch(f"channel mismatch: {what} (data.channel_mismatch)")
    if have == channels:
        return arr
    rgb = arr[..., :1].repeat(3, -1) if have < 3 else arr
    alpha = arr[..., 1:2] if have == 2 else np.full_like(arr[..., :1], _peak(dtype))
    return np.concatenate([rgb, alpha], -1)


def is_rgb8(mapping: dict) -> bool:
    """Whether a set is read and mapped as 8-bit RGB always was: uint8 items, the RGB reader, the format's range."""
    return mapping["reader"] == "rgb8" and mapping["value_range"] == "format"


def format_mapping(channels: int, dtype: str, reader: str) -> dict:
    """The format's range: [0, peak] of the type (uint8 255, uint16 65535, float [0, 1]) -> [-1, 1]."""
    if dtype not in PEAKS:
        raise ConfigError(f"data.value_range: {dtype} files have no format range; set data.value_range=measured")
    peak = PEAKS[dtype]
    return {"value_range": "format", "channels": channels, "dtype": dtype, "bit_depth": _bits(dtype), "peak": peak,
            "reader": reader, "low": [0.0] * channels, "high": [peak] * channels, "rule": RULE}  # fmt: skip


def set_type(files: list[Path], channels: int) -> str:
    """The stored type of a folder's set: the most common among the headers of up to HEADER_SAMPLE files."""
    step = max(1, len(files) // HEADER_SAMPLE)
    kinds = []
    for f in files[::step][:HEADER_SAMPLE]:
        try:
            head = stored_header(str(f))
        except DECODE_ERRORS:  # listed when the trainer reads it
            continue
        if _fits(channels, head.channels):
            kinds.append(head.dtype)
    if not kinds:  # no file fits: every one is a mismatch, and the errors say so
        return "uint8"
    counts = Counter(kinds)
    return max(counts, key=lambda k: (counts[k], _bits(k)))


def read_fitted(value, mapping: dict, max_pixels: int, min_side: int = 0) -> np.ndarray:
    """(H, W, C) stored values of a file as the set takes them; one of DECODE_ERRORS (Mismatch included) if not."""
    with pixel_limit_lifted():
        if mapping["reader"] == "rgb8":
            return np.asarray(to_rgb(open_image(value, max_pixels, min_side)), dtype=np.uint8)
        arr = fit(read_stored(value, max_pixels, min_side), mapping["channels"], mapping["dtype"])
    if mapping["value_range"] == "format" and mapping["dtype"] == "float32" and (arr.min() < 0 or arr.max() > 1):
        lo, hi = float(arr.min()), float(arr.max())
        raise Unusable(f"float values in [{lo:.4g}, {hi:.4g}], outside [0, 1] (see data.value_range=measured)")
    return arr


def to_model(arr: np.ndarray, mapping: dict) -> np.ndarray:
    """(H, W, C) stored values -> float32 (H, W, C) in [-1, 1] by the mapping."""
    # uint8 in fp32, the RGB path's arithmetic (v / 127.5 - 1); deeper types in fp64
    dtype = np.float32 if arr.dtype == np.uint8 else np.float64
    low, high = np.asarray(mapping["low"], dtype), np.asarray(mapping["high"], dtype)
    return ((arr.astype(dtype) - low) / ((high - low) / 2) - 1).clip(-1, 1).astype(np.float32)


def to_stored(x: torch.Tensor | np.ndarray, mapping: dict) -> np.ndarray:
    """The inverse of the mapping: (C, H, W) in [-1, 1] -> (H, W, C) values in the set's type (integers rounded)."""
    dtype = np.dtype(mapping["dtype"])
    # uint8 in fp32 as the RGB path always wrote PNGs; deeper types in fp64 so that every 16-bit value is exact
    t = torch.as_tensor(x).detach().cpu().to(torch.float32 if dtype == np.uint8 else torch.float64).clamp(-1, 1)
    low = torch.tensor(mapping["low"], dtype=t.dtype).view(-1, 1, 1)
    half = (torch.tensor(mapping["high"], dtype=t.dtype) - low.flatten()).view(-1, 1, 1) / 2
    v = (t + 1) * half + low
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        v = v.round().clamp(info.min, info.max)
    return v.permute(1, 2, 0).numpy().astype(dtype)


def measure(files: list[Path], cfg: DataConfig, dtype: str, reader: str, seed: int) -> dict:
    """Per-channel PERCENTILES of a seeded sample of `files` (the training split), as a "measured" mapping."""
    base = {"channels": cfg.channels, "dtype": dtype, "reader": reader, "value_range": "measured"}
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(files), min(len(files), MEASURE_FILES), replace=False).tolist())
    samples, used = [], 0
    for i in picks:
        try:
            flat = read_fitted(str(files[i]), base, cfg.max_pixels)
        except DECODE_ERRORS:  # listed when the trainer reads it
            continue
        flat = flat.reshape(-1, cfg.channels)
        take = rng.integers(0, len(flat), MEASURE_PIXELS) if len(flat) > MEASURE_PIXELS else slice(None)
        samples.append(flat[take].astype(np.float64))
        used += 1
    if not samples:
        raise ValueError(f"data.value_range: measured needs a usable training image; none of {len(picks)} read")
    low, high = np.percentile(np.concatenate(samples), PERCENTILES, axis=0)
    high = np.where(high > low, high, low + 1)
    return {"value_range": "measured", "channels": cfg.channels, "dtype": dtype, "bit_depth": _bits(dtype),
            "peak": _peak(dtype), "reader": reader, "low": low.tolist(), "high": high.tolist(), "rule": RULE,
            "measured_on": {"split": "train", "files": used, "pixels_per_file": MEASURE_PIXELS,
                            "percentiles": list(PERCENTILES), "seed": seed}}  # fmt: skip


def files_mapping(files: list[Path], cfg: DataConfig, seed: int) -> dict:
    """The mapping of a set of files (a folder's training split): its stored type, then the format's range or the
    measured one."""
    dtype = set_type(files, cfg.channels)
    reader = "rgb8" if cfg.channels == 3 and dtype == "uint8" else "stored"
    if cfg.value_range == "measured":
        return measure(files, cfg, dtype, reader, seed)
    return format_mapping(cfg.channels, dtype, reader)


def folder_only(cfg: DataConfig) -> None:
    """ConfigError unless `cfg.source` can hold data of `cfg`'s channels and range: only folders can."""
    if cfg.channels != 3 or cfg.value_range != "format":
        key = "channels" if cfg.channels != 3 else "value_range"
        value = cfg.channels if cfg.channels != 3 else cfg.value_range
        raise ConfigError(f"data.{key}: {value} reads a folder of PNG / TIFF files; {cfg.source!r} is not one")


def value_mapping(cfg: DataConfig, seed: int) -> dict:
    """How `cfg`'s stored values map to [-1, 1] (JSON-serialisable; `to_stored` inverts it): measured on the
    training split `seed` gives (`kl_ae.common.data.build_datasets`) where `data.value_range=measured`."""
    folder = Path(cfg.source).expanduser()
    if cfg.source in ("sample", "sample-video") or not folder.is_dir() or list_videos(folder):  # stills read as RGB
        folder_only(cfg)
        return format_mapping(3, "uint8", "rgb8")
    files = list_images(folder)
    if cfg.val_source is None:
        files = [files[i] for i in seeded_split(len(files), cfg.val_fraction, cfg.val_max, seed)[0]]
    return files_mapping(files, cfg, seed)


def check_files(files: list, mapping: dict, source: str) -> None:
    """`data.channel_mismatch=error`: the first file whose header does not fit the set, as one ConfigError."""
    for f in files:
        try:
            head = stored_header(f)
        except DECODE_ERRORS:
            continue  # a broken file is skipped and listed, as always
        if head.dtype != mapping["dtype"] or not _fits(mapping["channels"], head.channels):
            what = f"{head.channels} channel(s) of {head.dtype}, the set of {source} is "
            raise ConfigError(f"data.channel_mismatch=error: {f}: {what}{mapping['channels']} of {mapping['dtype']}")


def stored_resized(value, mapping: dict, resize: int, max_pixels: int, min_side: int = 0) -> torch.Tensor:
    """An undecoded file -> float32 (C, H, W) in [-1, 1], shorter side `resize` (each channel resampled as PIL's
    float images, the RGB path's filter, at full precision); raises one of DECODE_ERRORS."""
    x = to_model(read_fitted(value, mapping, max_pixels, min_side), mapping)  # (H, W, C)
    planes = [np.asarray(resize_shorter(Image.fromarray(x[..., c]), resize)) for c in range(x.shape[-1])]
    return torch.from_numpy(np.stack(planes)).clamp_(-1, 1)  # (C, H, W)


# ----------------------------------------------------------------------------- the record


def save_mapping(run: str | Path, mapping: dict) -> None:
    (Path(run) / MAPPING_FILE).write_text(json.dumps(mapping, indent=1))


def run_mapping(run: Path) -> dict:
    """A run's recorded mapping; a run from before the record has the 8-bit RGB one, or its data's anew."""
    if (run / MAPPING_FILE).is_file():
        return json.loads((run / MAPPING_FILE).read_text())
    saved = yaml.safe_load((run / "config.yaml").read_text()) or {}
    data = saved.get("data", {})
    if data.get("channels", 3) == 3 and data.get("value_range", "format") == "format":
        return format_mapping(3, "uint8", "rgb8")
    cfg = DataConfig()
    merge(cfg, data, prefix="data.")
    return value_mapping(cfg, int(saved.get("train", {}).get("seed", 0)))


def model_mapping(path: str) -> dict | None:
    """The mapping a model was trained with: its run's record, or the `_kl_ae` record of an exported folder."""
    from kl_ae.common.runs import find_run
    from kl_autoencoder.folders import EXPORT_KEY

    if not Path(path).exists():
        return None
    run = find_run(path)
    if run is not None:
        return run_mapping(run)
    config = Path(path) / "config.json"
    if config.is_file():
        return (json.loads(config.read_text()).get(EXPORT_KEY) or {}).get("value_mapping")
    return None


def card_lines(mapping: dict | None) -> list[str]:
    """The model card's section on how the data's values map to the model's [-1, 1] and back."""
    if mapping is None or is_rgb8(mapping):
        return []
    ch = mapping["channels"]
    kind = {1: "grayscale", 3: "RGB", 4: "RGBA (channel 3 is alpha, -1 = transparent)"}.get(ch, f"{ch} bands")
    how = "the format's range" if mapping["value_range"] == "format" else (
        f"measured on the training split ({mapping['measured_on']})")  # fmt: skip
    return ["", "## Data values", "", f"{ch} channels ({kind}), stored as {mapping['dtype']} "
            f"({mapping['bit_depth']} bit); mapped by {how}, per channel: `{RULE}`", "",
            f"- `low` = {[round(v, 6) for v in mapping['low']]}",
            f"- `high` = {[round(v, 6) for v in mapping['high']]}",
            "", "The same record is in `config.json` under `_kl_ae_export.value_mapping`; "
            "`kl_ae.common.channels.to_stored(x, mapping)` maps decodings back to stored values."]  # fmt: skip
