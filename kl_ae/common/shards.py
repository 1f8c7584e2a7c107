"""Shards: naming them (globs, brace patterns, URLs), opening them as `datasets` streams, writing a folder as some.

A shard source is a pattern of webdataset `.tar` or `.parquet` files: a local glob (`shards/*.tar`), a brace
pattern (`shards/{00000..00127}.tar`, `{a,b}.parquet`), or remote URLs (`https://`, `hf://`, `s3://` when
online) passed to `datasets` / fsspec unchanged. They are read by `datasets.load_dataset("webdataset" |
"parquet", streaming=True)`; hub datasets by `load_dataset(name, streaming=True)`. Nothing is parsed here.

`write_shards` turns a folder of images into webdataset shards (`kl-ae shards`): each image's file bytes,
unchanged, as `<key>.<ext>` with its relative path in `<key>.json` (img2dataset's layout); bad images are
copied as they are and skipped when read.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from kl_ae.common.config import ConfigError, DataConfig
from kl_ae.common.images import IMAGE_SUFFIXES, SAMPLE_VAL, list_images, sample_dir
from kl_ae.common.video_io import VIDEO_SUFFIXES

# the members / columns an image (a video) is taken from, first present wins (after data.image_column)
IMAGE_KEYS = tuple(s.lstrip(".") for s in sorted(IMAGE_SUFFIXES))
VIDEO_KEYS = ("video", *(s.lstrip(".") for s in sorted(VIDEO_SUFFIXES)))
SHARD_KINDS = {".tar": "webdataset", ".parquet": "parquet"}


def expand_braces(pattern: str) -> list[str]:
    """`a/{000..002}.tar` -> a/000.tar, a/001.tar, a/002.tar; `{x,y}` -> x, y; nested and repeated braces too.
    Numbers keep the zero padding of the first bound (webdataset's convention)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}|\{([^{}]*,[^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    if m.group(1) is not None:
        lo, hi = m.group(1), m.group(2)
        width = len(lo) if lo.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        items = m.group(3).split(",")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [out for item in items for out in expand_braces(head + item + tail)]


def is_remote(path: str) -> bool:
    return "://" in path


def shard_files(source: str, key: str = "data.source") -> tuple[str, list[str]] | None:
    """("webdataset" | "parquet", the files) when `source` names shards; None for anything else (a folder,
    "sample", a hub name). Local patterns must match files: a ConfigError naming `key` otherwise."""
    files = expand_braces(source.strip())
    kinds = {SHARD_KINDS.get(Path(f.split("?")[0]).suffix.lower()) for f in files}
    if kinds == {None}:
        return None
    if len(kinds) > 1:
        raise ConfigError(f"{key}: {source!r} mixes shard kinds; use only .tar (webdataset) or only .parquet files")
    kind = kinds.pop()
    if kind is None:
        raise ConfigError(f"{key}: {source!r}: every shard must end in .tar (webdataset) or .parquet")
    resolved: list[str] = []
    for f in files:
        if is_remote(f):
            resolved.append(f)  # fsspec resolves remote globs itself
            continue
        f = os.path.expanduser(f)
        found = sorted(glob.glob(f)) if glob.has_magic(f) else ([f] if os.path.isfile(f) else [])
        if not found:
            raise ConfigError(f"{key}: no shard file matches {f}")
        resolved += [os.path.abspath(p) for p in found]
    return kind, resolved


def _webdataset_features() -> datasets.Features:
    # given, not inferred from the first samples: shards may mix extensions, and a sample without an image
    # (a .txt or .json alone) reads as all-None image columns instead of stopping the builder
    return datasets.Features(
        {**{k: datasets.Image(decode=False) for k in IMAGE_KEYS}, **{k: datasets.Video(decode=False) for k in
         VIDEO_KEYS[1:]}, "__key__": datasets.Value("string"), "__url__": datasets.Value("string")}
    )  # fmt: skip


def open_stream(
    source: str,
    image_column: str = "image",
    split: str = "train",
    key: str = "data.source",
    shuffle_files=None,
    video: bool = False,
) -> tuple[datasets.IterableDataset, tuple[str, ...]]:
    """A `datasets.IterableDataset` of undecoded images and the columns an image may be in (first present wins):
    shards by their pattern (their order permuted by the seed `shuffle_files`, if given), anything else as a
    hub dataset name or a local hub-style folder (`split`). `video`: the columns a video may be in instead (VIDEO_KEYS,
    or data.image_column unless it holds images)."""
    shards = shard_files(source, key)
    try:
        if shards is not None:
            kind, files = shards
            if shuffle_files is not None:
                files = [files[i] for i in np.random.default_rng(shuffle_files).permutation(len(files))]
            features = _webdataset_features() if kind == "webdataset" else None
            files = {"train": files}
            ds = datasets.load_dataset(kind, data_files=files, split="train", streaming=True, features=features)
        else:
            ds = datasets.load_dataset(source, split=split, streaming=True)
    except Exception as e:  # network, auth, unknown name, unreadable file: all end the same way for the user
        raise ConfigError(f"{key}: cannot stream {source!r} (split {split!r}): {type(e).__name__}: {e}") from None
    features = ds.features or {}
    candidates = (image_column, *(VIDEO_KEYS if video else IMAGE_KEYS)) if features else (image_column,)
    columns = tuple(c for c in dict.fromkeys(candidates) if not features or c in features)
    if video:  # data.image_column's default, "image", may name the thumbnails of a video dataset
        columns = tuple(c for c in columns if not isinstance(features.get(c), datasets.Image))
    if not columns:
        what = "video" if video else "image"
        raise ConfigError(f"{key}: no {what} column in {source!r} (columns {list(features)}); set data.image_column")
    for c in columns:
        if isinstance(features.get(c), datasets.Image | datasets.Video) and features[c].decode:
            ds = ds.cast_column(c, type(features[c])(decode=False))  # decoding is ours: EXIF, alpha, limits, seeks
    return ds, columns


def image_of(example: dict, columns: tuple[str, ...]):
    """The undecoded image of a streamed sample ({"bytes", "path"}, a path, or a PIL image), or None."""
    for c in columns:
        value = example.get(c)
        if value is not None:
            return {"bytes": value, "path": None} if isinstance(value, bytes) else value
    return None


def label_of(example: dict, value, source: str) -> str:
    """How a streamed sample is named in skipped.txt and latent shards: `<shard>:<key>` for webdataset, else
    `<source>:<path>` from the image, else `<source>:sha1=<hash of its bytes>`."""
    if example.get("__key__") is not None:
        return f"{example.get('__url__')}:{example['__key__']}"
    if isinstance(value, dict) and value.get("path"):
        return f"{source}:{value['path']}"
    data = value.get("bytes") if isinstance(value, dict) else None
    return f"{source}:sha1={hashlib.sha1(data).hexdigest()[:16]}" if data else f"{source}:?"


def stable_seed(*parts) -> int:
    """A 63-bit seed from `parts` that is the same in every process (`hash()` of a str is salted per process)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


# ----------------------------------------------------------------------------- fixed sets


def files_table(paths: list[Path]) -> datasets.Dataset:
    table = datasets.Dataset.from_dict({"image": [str(p) for p in paths]})
    return table.cast_column("image", datasets.Image(decode=False))


def looks_like_hub_name(source: str) -> bool:
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) is not None and not source.startswith(".")


def fixed_table(source: str, cfg: DataConfig, key: str = "data.val_source") -> datasets.Dataset:
    """The first `cfg.val_max` images of a fixed set, undecoded, in column "image": the held-out photographs of
    "sample", a folder (sorted paths), shards, or a hub dataset "name" / "name:split" (default split
    "validation"), streamed so that only these images are read."""
    if source == "sample":
        return files_table([sample_dir() / n for n in SAMPLE_VAL][: cfg.val_max])
    folder = Path(source).expanduser()
    if folder.is_dir():
        files = list_images(folder)[: cfg.val_max]
        if not files:
            raise ValueError(f"{key}: no images found in {folder}")
        return files_table(files)
    name, split = source, "validation"
    if shard_files(source, key) is None:
        name, _, split = source.partition(":")
        if not looks_like_hub_name(name):
            raise FileNotFoundError(f"{key}: folder {folder} does not exist")
        split = split or "validation"
    stream, columns = open_stream(name, cfg.image_column, split, key)
    rows = []
    for example in stream:
        value = image_of(example, columns)
        if value is None:  # a sample without an image member is no image; it is not listed either
            continue
        if isinstance(value, Image.Image):  # a hub column we could not keep undecoded
            buffer = io.BytesIO()
            value.save(buffer, format="PNG")
            value = {"bytes": buffer.getvalue(), "path": None}
        elif isinstance(value, str):
            value = {"bytes": None, "path": value}
        data = value.get("bytes")  # named by its label: paths inside shards are not unique
        rows.append({"image": {"bytes": data, "path": label_of(example, value, name) if data else value["path"]}})
        if len(rows) == cfg.val_max:
            break
    if not rows:
        raise ValueError(f"{key}: no image in {source}")
    return datasets.Dataset.from_list(rows, features=datasets.Features({"image": datasets.Image(decode=False)}))


# ----------------------------------------------------------------------------- writing


class TarWriter:
    """Members appended to one tar file, written as `<path>.tmp` and renamed on close: a shard there is whole."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.tar = tarfile.open(self.tmp, "w")

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()
        os.replace(self.tmp, self.path)


def write_shards(folder: str | Path, out: str | Path, per_shard: int = 1000, progress: bool = True) -> str:
    """Write every image of `folder` (recursively, sorted) as webdataset shards `out/00000.tar`, ...; returns the
    brace pattern that names them, for `--data`."""
    from tqdm.auto import tqdm

    folder, out = Path(folder).expanduser(), Path(out).expanduser()
    if per_shard < 1:
        raise ConfigError(f"--per-shard: must be >= 1, got {per_shard}")
    if not folder.is_dir():
        raise ConfigError(f"FOLDER: {folder} is not a folder")
    files = list_images(folder)
    if not files:
        raise ConfigError(f"FOLDER: no images found in {folder}")
    out.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(files) // per_shard)
    width = max(5, len(str(n_shards - 1)))
    for stale in out.glob("*.tar.tmp"):  # left by a killed run
        stale.unlink()
    with tqdm(total=len(files), desc="shards", unit="img", disable=not progress) as bar:
        for s in range(n_shards):
            writer = TarWriter(out / f"{s:0{width}d}.tar")
            for i in range(s * per_shard, min((s + 1) * per_shard, len(files))):
                path = files[i]
                key = f"{i:09d}"  # no dot: webdataset splits the member name at the first one
                writer.add(f"{key}{path.suffix.lower()}", path.read_bytes())
                writer.add(f"{key}.json", json.dumps({"path": path.relative_to(folder).as_posix()}).encode())
                bar.update(1)
            writer.close()
    last = f"{n_shards - 1:0{width}d}"
    return str(out / (f"{{{0:0{width}d}..{last}}}.tar" if n_shards > 1 else f"{last}.tar"))
