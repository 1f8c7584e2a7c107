"""Training and validation images through Hugging Face `datasets`.

Three sources: a local folder (searched recursively), a hub dataset name, or "sample" —
real photographs bundled inside scikit-image, so a run works with no data and no network.
Rows hold undecoded images (`datasets.Image(decode=False)`); decoding, resizing, cropping
and flipping happen here with PIL and torch's RNG, so DataLoader worker seeding applies.

Bad input. Real folders are dirty; no single file may end a run, and none is dropped silently:
- Listing: only files with an image suffix (`IMAGE_SUFFIXES`, any case) are listed; other files are
  ignored, not logged.
- Modes: every image becomes upright RGB (`to_rgb`): EXIF orientation is applied; grayscale and
  CMYK are converted; 16-bit grayscale (I;16, I) is rescaled to 8 bits, not clipped; alpha (RGBA,
  LA, PA, palette transparency) is composited on WHITE; multi-frame files give their first frame.
- Skipped: files that cannot be decoded (truncated, corrupt, zero bytes, not an image despite the
  suffix, unreadable, vanished since listing), images whose header says width*height >
  `data.max_pixels` (checked before decoding, so a decompression bomb is never decoded; PIL's own
  limit is lifted while we decode so that ours is the one that applies), and, with
  `data.small_images=skip`, images whose original shorter side is < `data.resolution` (the default,
  "upscale", resizes them up like any other). Truncated files are not half-decoded into grey.
- A skipped file is logged (`logging` warning) and remembered, so it is tried once per process and
  never again; with `ImageDataset.skip_log` set, it is appended there as "<path><TAB><reason>"
  (`read_skipped` reads it back), and files already listed there are not tried at all (delete the
  file to retry them). The item is replaced by the next usable image of the split, so crops still
  depend on (seed, epoch, index) only; the dataset raises only if every image of the split fails.
- `build_datasets` raises `ValueError("data.source: no usable image in <split> ...")` when the
  training or the validation split has no image that decodes (files are tried in order, stopping
  at the first good one).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
# photographs in skimage/data; grayscale ones are converted to RGB. motorcycle_right.png is
# left out on purpose: it is a near-duplicate of motorcycle_left.png
SAMPLE_TRAIN = (
    "astronaut.png", "chelsea.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
    "retina.jpg", "camera.png", "coins.png", "moon.png", "brick.png", "grass.png", "gravel.png",
)  # fmt: skip
SAMPLE_VAL = ("coffee.png", "rocket.jpg")  # fixed: no near-duplicates of these in train
CACHE_MAX_IMAGES = 512  # below this, decoded+resized images are kept in memory
# what PIL's many decoders raise on a broken file; the type name goes into the skip log, so a bug of
# ours caught here still shows, and `build_datasets` fails loudly if nothing decodes at all
DECODE_ERRORS = (
    OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, KeyError, TypeError,
    ZeroDivisionError, MemoryError, Image.DecompressionBombError,
)  # fmt: skip

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    # "sample", a local folder, or a hub dataset name (e.g. "user/name")
    source: str = "sample"
    resolution: int = 256  # crop size
    resize: int | None = None  # shorter side before cropping; None = resolution
    random_crop: bool = True  # False: center crop (training); validation always center-crops
    hflip: bool = True
    batch_size: int = 8  # per process
    num_workers: int = 0
    # held-out images: a seeded split of the file list, at least 1, never trained on
    # (the "sample" source uses a fixed split instead)
    val_fraction: float = 0.1
    val_max: int = 256
    image_column: str = "image"  # hub sources only
    hub_split: str = "train"  # hub sources only
    # visits of each training image per epoch; each visit draws a fresh crop (tiny sets)
    repeats: int = 1
    # images whose original shorter side is < resolution: "upscale" (resize up) or "skip"
    small_images: str = "upscale"
    # skip images with more pixels than this, judged from the header before decoding (2x PIL's default limit)
    max_pixels: int = 178_956_970

    def validate(self) -> None:
        def bad(key: str, reason: str) -> ValueError:
            return ValueError(f"data.{key}: {reason}")

        if not self.source:
            raise bad("source", "must be 'sample', a folder or a hub dataset name")
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
        if self.small_images not in ("upscale", "skip"):
            raise bad("small_images", f"must be 'upscale' or 'skip', got {self.small_images!r}")
        if self.max_pixels <= 0:
            raise bad("max_pixels", f"must be > 0, got {self.max_pixels}")


def sample_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def list_sample_images() -> list[Path]:
    """All bundled sample photographs, training ones first, then the two validation ones."""
    return [sample_dir() / name for name in SAMPLE_TRAIN + SAMPLE_VAL]


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, sorted so splits do not depend on the filesystem."""
    files = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def to_rgb(img: Image.Image) -> Image.Image:
    """Upright RGB image; transparency is composited on white (not on black garbage)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):
        # 16-bit grayscale: convert("RGB") would clip at 255 instead of rescaling. I;16 is 16-bit by
        # definition (a dark one must stay dark); 32-bit "I" counts as 16-bit once it exceeds 255
        arr = np.asarray(img, dtype=np.float32)
        scale = 255.0 / 65535.0 if img.mode != "I" or arr.max() > 255 else 1.0
        img = Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if min(w, h) == size:
        return img
    s = size / min(w, h)
    new = (size, max(size, round(h * s))) if w <= h else (max(size, round(w * s)), size)
    # PIL's bicubic filter widens its support when downsampling, i.e. it antialiases
    return img.resize(new, Image.BICUBIC)


class ImageDataset(torch.utils.data.Dataset):
    """Rows of a `datasets.Dataset` -> float32 tensors (3, resolution, resolution) in [-1, 1].

    Bad images are skipped and replaced by the next usable one (see the module docstring).
    Set `skip_log` to a file to have each skip appended to it as a line "<path><TAB><reason>".
    """

    def __init__(self, table: datasets.Dataset, cfg: DataConfig, train: bool, column: str = "image", seed: int = 0):
        self.table, self.column, self.train = table, column, train
        # crops and flips come from (seed, epoch, index) alone, not from the global RNG: a resumed run
        # draws exactly the crops the uninterrupted run would have, whatever was prefetched or skipped
        self.seed, self.epoch = seed, 0
        self.resolution = cfg.resolution
        self.resize = cfg.resize or cfg.resolution
        self.random_crop = train and cfg.random_crop
        self.hflip = train and cfg.hflip
        self.repeats = cfg.repeats if train else 1
        self.min_side = cfg.resolution if cfg.small_images == "skip" else 0
        self.max_pixels = cfg.max_pixels
        # small sets (the sample set) are decoded over and over; keep uint8 (3, H, W) tensors
        self.cache: dict[int, torch.Tensor] | None = {} if len(table) < CACHE_MAX_IMAGES else None
        self.bad: dict[int, str] = {}  # row -> reason, found by this process: never tried again
        self._skip_log: Path | None = None
        self._unlogged: dict[str, str] = {}  # skips not yet in skip_log (none set, or writing failed)
        self._logged: set[str] = set()  # what skip_log held when this process first read it
        self._logged_pid: int | None = None

    def __len__(self) -> int:
        return len(self.table) * self.repeats

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def skip_log(self) -> Path | None:
        """File that each skip is appended to; setting it writes the skips found before."""
        return self._skip_log

    @skip_log.setter
    def skip_log(self, path: str | os.PathLike | None) -> None:
        self._skip_log = None if path is None else Path(path)
        self._logged_pid = None  # read the new file on next use
        self._flush_skips()

    def paths(self) -> list[str | None]:
        """Source path of every row (None for hub images stored as bytes)."""
        return [_path_of(v) for v in self.table.select_columns([self.column])[self.column]]

    def label(self, index: int) -> str:
        """How row `index` is named in logs: its path, or its row number for hub images held as bytes."""
        value = self.table[index][self.column]
        path = _path_of(value)
        if path is None or (isinstance(value, dict) and value.get("bytes") is not None):
            # hub paths are bare file names, not unique: the row number is
            return f"{'train' if self.train else 'val'} row {index}" + (f" ({path})" if path else "")
        return path

    def load(self, index: int) -> torch.Tensor:
        """Decoded and resized image as a uint8 tensor (3, H, W) with min(H, W) == resize.

        Raises one of `DECODE_ERRORS` for a bad image.
        """
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        with _our_pixel_limit():
            img = _open(self.table[index][self.column], self.max_pixels, self.min_side)
            img = resize_shorter(to_rgb(img), self.resize)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, H, W)
        if self.cache is not None:
            self.cache[index] = x
        return x

    def _load_or_skip(self, index: int) -> torch.Tensor:
        # one bad file must not end a multi-day run: log it and use the next usable row. The substitute
        # is the first good row from `index` on whatever this process already knows, so it is the same
        # in every process, epoch and resume
        n = len(self.table)
        for k in range(n):
            j = (index + k) % n
            if self.cache is not None and j in self.cache:
                return self.cache[j]
            if j in self.bad or self._in_skip_log(j):
                continue
            try:
                return self.load(j)
            except DECODE_ERRORS as e:
                self._skip(j, _reason(e))
        split = "training" if self.train else "validation"
        raise RuntimeError(f"data: every image of the {split} split ({n}) is unusable; see the warnings or skip log")

    def _in_skip_log(self, index: int) -> bool:
        # DataLoader workers are fresh copies of this object each epoch (unless persistent): what other
        # workers, ranks and earlier epochs skipped is in the log, read once per process
        if self._skip_log is None:
            return False
        if self._logged_pid != os.getpid():
            self._logged, self._logged_pid = set(read_skipped(self._skip_log)), os.getpid()
        if not self._logged or self.label(index) not in self._logged:
            return False
        self.bad[index] = "in skip log"
        return True

    def _skip(self, index: int, reason: str) -> None:
        self.bad[index] = reason
        label = self.label(index)
        log.warning("data: skipping %s: %s", label, reason)
        self._unlogged[label] = reason
        self._flush_skips()

    def _flush_skips(self) -> None:
        if self._skip_log is None or not self._unlogged:
            return
        lines = "".join(f"{_one_line(p)}\t{_one_line(r)[:500]}\n" for p, r in self._unlogged.items())
        try:
            # one write to an O_APPEND descriptor: lines from DataLoader workers and ranks do not interleave
            fd = os.open(self._skip_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, lines.encode("utf-8", "replace"))
            finally:
                os.close(fd)
        except OSError as e:  # a full disk must not end the run either; retried at the next skip
            log.warning("data: cannot write the skip log %s: %s", self._skip_log, e)
            return
        self._unlogged.clear()

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self._load_or_skip(i % len(self.table))
        _, h, w = x.shape
        r = self.resolution
        rng = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF_FFFF_FFFF)
        if self.random_crop:
            top = int(torch.randint(0, h - r + 1, (), generator=rng))
            left = int(torch.randint(0, w - r + 1, (), generator=rng))
        else:
            top, left = (h - r) // 2, (w - r) // 2
        x = x[:, top : top + r, left : left + r]
        if self.hflip and bool(torch.rand((), generator=rng) < 0.5):
            x = x.flip(-1)
        return x.float().div_(127.5).sub_(1.0)  # (3, r, r) in [-1, 1]


def read_skipped(path: str | os.PathLike) -> dict[str, str]:
    """Unique path -> reason from a skip log (the first reason wins); {} when there is no log."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return {}
    out: dict[str, str] = {}
    for line in text.split("\n"):
        label, tab, reason = line.rpartition("\t")
        if tab:
            out.setdefault(label, reason)
    return out


class _Unusable(ValueError):
    """An image we refuse on purpose (too big, too small, empty); its message is the whole reason."""


def _reason(e: BaseException) -> str:
    return str(e) if isinstance(e, _Unusable) else f"{type(e).__name__}: {e}"


def _one_line(text: str) -> str:
    return text.translate({9: " ", 10: " ", 13: " "})


@contextlib.contextmanager
def _our_pixel_limit() -> Iterator[None]:
    # PIL warns above MAX_IMAGE_PIXELS and raises above twice that, on open, load and crop; `_open`
    # enforces data.max_pixels on the header instead, so PIL's limit is lifted while we decode
    # (DataLoader workers are processes, and nothing else decodes in our threads meanwhile)
    before, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def _check_size(size: tuple[int, int], max_pixels: int, min_side: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise _Unusable(f"too large: {w}x{h} = {w * h} pixels > data.max_pixels={max_pixels}")
    if min(w, h) < min_side:
        raise _Unusable(f"too small: {w}x{h}, shorter side < data.resolution={min_side} (data.small_images=skip)")


def _path_of(value) -> str | None:
    if isinstance(value, dict):
        return value.get("path")
    if isinstance(value, str):
        return value
    return getattr(value, "filename", None) or None


def _open(value, max_pixels: int, min_side: int = 0) -> Image.Image:
    """Decoded image; its header size is checked against the limits before any pixel is decoded."""
    # hub columns may hold PIL images, {"path", "bytes"} dicts (decode=False) or path strings
    if isinstance(value, Image.Image):
        _check_size(value.size, max_pixels, min_side)
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            value = io.BytesIO(value["bytes"])
        else:
            value = value.get("path")
    if not isinstance(value, str | io.BytesIO):
        raise ValueError(f"cannot read an image from {type(value).__name__}")
    if (len(value.getbuffer()) if isinstance(value, io.BytesIO) else os.path.getsize(value)) == 0:
        raise _Unusable("empty file (0 bytes)")
    with Image.open(value) as img:  # reads the header only
        _check_size(img.size, max_pixels, min_side)
        img.load()  # decode now so the file handle closes
        return img


def _check_usable(ds: ImageDataset, split: str, source: str) -> None:
    # a dataset with no usable image is a config error before training, not a crash in epoch 0
    reasons = []
    for j in range(len(ds.table)):
        try:
            ds.load(j)
            return
        except DECODE_ERRORS as e:
            reasons.append(f"{ds.label(j)}: {_reason(e)}")
    raise ValueError(
        f"data.source: no usable image in {split} of {source} ({len(reasons)} files tried: {'; '.join(reasons[:3])})"
    )


def _seeded_split(n: int, cfg: DataConfig, seed: int) -> tuple[list[int], list[int]]:
    if n < 2:
        raise ValueError(f"data.source: need at least 2 images (1 is held out for validation), found {n}")
    n_val = min(cfg.val_max, max(1, round(cfg.val_fraction * n)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def _files_table(paths: list[Path]) -> datasets.Dataset:
    table = datasets.Dataset.from_dict({"image": [str(p) for p in paths]})
    return table.cast_column("image", datasets.Image(decode=False))


def _looks_like_hub_name(source: str) -> bool:
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) is not None and not source.startswith(".")


def _load_hub(cfg: DataConfig) -> datasets.Dataset:
    try:
        table = datasets.load_dataset(cfg.source, split=cfg.hub_split)
    except Exception as e:  # network, auth, unknown name: all end the same way for the user
        raise ValueError(
            f"data.source: {cfg.source!r} is not a local folder and could not be loaded from the "
            f"Hugging Face hub (split {cfg.hub_split!r}): {type(e).__name__}: {e}"
        ) from e
    if cfg.image_column not in table.column_names:
        raise ValueError(f"data.image_column: {cfg.image_column!r} not in {table.column_names}")
    if isinstance(table.features[cfg.image_column], datasets.Image):
        # undecoded rows: decoding is ours (EXIF, alpha) and workers do not pickle PIL images
        table = table.cast_column(cfg.image_column, datasets.Image(decode=False))
    return table


def build_datasets(cfg: DataConfig, seed: int) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """(train, val) torch datasets for `cfg.source`; the split depends only on `seed` and the files."""
    cfg.validate()
    column = "image"
    if cfg.source == "sample":
        train_table = _files_table([sample_dir() / n for n in SAMPLE_TRAIN])
        val_table = _files_table([sample_dir() / n for n in SAMPLE_VAL])
    else:
        folder = Path(cfg.source).expanduser()
        if folder.is_dir():
            files = list_images(folder)
            if not files:
                raise ValueError(f"data.source: no images found in {folder}")
            train_idx, val_idx = _seeded_split(len(files), cfg, seed)
            train_table = _files_table([files[i] for i in train_idx])
            val_table = _files_table([files[i] for i in val_idx])
        elif folder.exists():
            raise ValueError(f"data.source: {folder} is a file, expected a folder of images")
        elif not _looks_like_hub_name(cfg.source):
            raise FileNotFoundError(f"data.source: folder {folder} does not exist")
        else:
            table = _load_hub(cfg)
            column = cfg.image_column
            train_idx, val_idx = _seeded_split(len(table), cfg, seed)
            train_table, val_table = table.select(train_idx), table.select(val_idx)
    train = ImageDataset(train_table, cfg, True, column, seed)
    val = ImageDataset(val_table, cfg, False, column, seed)
    _check_usable(train, "train", cfg.source)
    _check_usable(val, "val", cfg.source)
    return train, val
