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

import dataclasses
import io
import logging
import os
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

from kl_ae.common.config import ConfigError, DataConfig
from kl_ae.common.images import (
    DECODE_ERRORS,
    SAMPLE_TRAIN,
    SAMPLE_VAL,
    append_skips,
    list_images,
    open_image,
    path_of,
    pixel_limit_lifted,
    read_skipped,
    reason,
    resize_shorter,
    sample_dir,
    to_rgb,
)
from kl_ae.common.shards import files_table, fixed_table, looks_like_hub_name, shard_files

CACHE_MAX_IMAGES = 512  # below this, decoded+resized images are kept in memory

log = logging.getLogger(__name__)


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
        return [path_of(v) for v in self.table.select_columns([self.column])[self.column]]

    def label(self, index: int) -> str:
        """How row `index` is named in logs: its path, or its row number for hub images held as bytes."""
        value = self.table[index][self.column]
        path = path_of(value)
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
        x = decode_resized(self.table[index][self.column], self.resize, self.max_pixels, self.min_side)
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
                self._skip(j, reason(e))
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
        try:
            append_skips(self._skip_log, self._unlogged)
        except OSError as e:  # a full disk must not end the run either; retried at the next skip
            log.warning("data: cannot write the skip log %s: %s", self._skip_log, e)
            return
        self._unlogged.clear()

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self._load_or_skip(i % len(self.table))
        seed = hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF_FFFF_FFFF  # ints hash alike in every process
        return crop_flip(x, self.resolution, self.random_crop, self.hflip, seed)


def decode_resized(value, resize: int, max_pixels: int, min_side: int = 0) -> torch.Tensor:
    """An undecoded image -> uint8 (3, H, W), upright RGB, shorter side `resize`; raises one of DECODE_ERRORS."""
    with pixel_limit_lifted():
        img = resize_shorter(to_rgb(open_image(value, max_pixels, min_side)), resize)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, H, W)


def crop_flip(x: torch.Tensor, r: int, random_crop: bool, hflip: bool, seed: int) -> torch.Tensor:
    """uint8 (3, H, W) -> float (3, r, r) in [-1, 1]: a random (or centre) crop and flip drawn from `seed` alone."""
    _, h, w = x.shape
    rng = torch.Generator().manual_seed(seed)
    if random_crop:
        top = int(torch.randint(0, h - r + 1, (), generator=rng))
        left = int(torch.randint(0, w - r + 1, (), generator=rng))
    else:
        top, left = (h - r) // 2, (w - r) // 2
    x = x[:, top : top + r, left : left + r]
    if hflip and bool(torch.rand((), generator=rng) < 0.5):
        x = x.flip(-1)
    return x.float().div_(127.5).sub_(1.0)  # (3, r, r) in [-1, 1]


def _check_usable(ds: ImageDataset, split: str, source: str) -> None:
    # a dataset with no usable image is a config error before training, not a crash in epoch 0
    reasons = []
    for j in range(len(ds.table)):
        try:
            ds.load(j)
            return
        except DECODE_ERRORS as e:
            reasons.append(f"{ds.label(j)}: {reason(e)}")
    raise ValueError(
        f"data.source: no usable image in {split} of {source} ({len(reasons)} files tried: {'; '.join(reasons[:3])})"
    )


def _seeded_split(n: int, cfg: DataConfig, seed: int) -> tuple[list[int], list[int]]:
    if n < 2:
        raise ValueError(f"data.source: need at least 2 images (1 is held out for validation), found {n}")
    n_val = min(cfg.val_max, max(1, round(cfg.val_fraction * n)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


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
    """(train, val) torch datasets for `cfg.source`; the split depends only on `seed` and the files. With
    `cfg.val_source` nothing is held out: validation is that fixed set."""
    cfg.validate()
    column = "image"
    held_out = cfg.val_source is None
    if cfg.source == "sample":
        train_table = files_table([sample_dir() / n for n in SAMPLE_TRAIN])
        val_table = files_table([sample_dir() / n for n in SAMPLE_VAL])
    else:
        folder = Path(cfg.source).expanduser()
        if folder.is_dir():
            files = list_images(folder)
            if not files:
                tars = any(folder.glob("*.tar"))
                hint = "; it holds .tar shards: pass them as a pattern, e.g. DIR/*.tar" if tars else ""
                raise ValueError(f"data.source: no images found in {folder}{hint}")
            train_idx, val_idx = _seeded_split(len(files), cfg, seed) if held_out else (range(len(files)), [])
            train_table = files_table([files[i] for i in train_idx])
            val_table = files_table([files[i] for i in val_idx])
        elif folder.exists():
            raise ValueError(f"data.source: {folder} is a file, expected a folder of images")
        elif not looks_like_hub_name(cfg.source):
            raise FileNotFoundError(f"data.source: folder {folder} does not exist")
        else:
            table = _load_hub(cfg)
            column = cfg.image_column
            train_idx, val_idx = _seeded_split(len(table), cfg, seed) if held_out else (range(len(table)), [])
            train_table, val_table = table.select(train_idx), table.select(val_idx)
    train = ImageDataset(train_table, cfg, True, column, seed)
    _check_usable(train, "train", cfg.source)
    if not held_out:
        return train, build_val(cfg, seed)
    val = ImageDataset(val_table, cfg, False, column, seed)
    _check_usable(val, "val", cfg.source)
    return train, val


def build_val(cfg: DataConfig, seed: int) -> ImageDataset:
    """The validation set of `cfg.val_source`, checked to hold a usable image."""
    val = ImageDataset(fixed_table(cfg.val_source, cfg), cfg, False, "image", seed)
    _check_usable(val, "val", cfg.val_source)
    return val


# ----------------------------------------------------------------------------- fixed image sets


# how a fixed set is brought to N x N; published rFID / PSNR tables differ mostly here
PROTOCOLS = {
    "torchvision": "torchvision Resize(N) (bilinear, antialiased; shorter side to N) then CenterCrop(N)",
    "adm": "ADM center_crop_arr: BOX halvings while the shorter side >= 2N, BICUBIC to N, centre crop",
}


def resize_and_crop(img: Image.Image, size: int, protocol: str) -> Image.Image:
    """`img` as `protocol` brings it to size x size (see PROTOCOLS)."""
    if protocol == "adm":
        # guided-diffusion's image_datasets.center_crop_arr (ADM; LlamaGen, REPA and LightningDiT reuse it)
        while min(img.size) >= 2 * size:
            img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
        scale = size / min(img.size)
        img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        return img.crop((left, top, left + size, top + size))
    if protocol == "torchvision":
        from torchvision.transforms.v2 import functional as tvf

        return tvf.center_crop(tvf.resize(img, size), size)
    raise ValueError(f"unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")


class EvalImages(torch.utils.data.Dataset):
    """A fixed set: rows of an image table -> (3, H, W) in [-1, 1], at own size (centre-cropped to a multiple of
    the factor) or brought to resolution x resolution by `protocol` (see PROTOCOLS)."""

    def __init__(
        self, table: datasets.Dataset, column: str, factor: int, resolution: int | None, protocol: str = "torchvision"
    ):
        if protocol not in PROTOCOLS:
            raise ConfigError(f"--protocol: unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
        self.table, self.column, self.factor, self.resolution = table, column, factor, resolution
        self.protocol = protocol

    def __len__(self) -> int:
        return len(self.table)

    def row(self, i: int) -> int:
        """The table row of item `i` (`kl_ae.common.crops.GridCrops` cuts several items from one row)."""
        return i

    def __getitem__(self, i: int) -> torch.Tensor:
        img = to_rgb(datasets.Image().decode_example(_row(self.table[i][self.column])))
        if self.resolution is not None:
            img = resize_and_crop(img, self.resolution, self.protocol)
        w, h = img.size
        th, tw = self.target_size(h, w)
        if th == 0 or tw == 0:
            raise ConfigError(f"--data: image {i} ({w}x{h}) is smaller than the downsampling factor {self.factor}")
        top, left = (h - th) // 2, (w - tw) // 2
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # (3, h, w)
        return x[:, top : top + th, left : left + tw].float().div(127.5).sub(1.0)  # (3, th, tw) in [-1, 1]

    def target_size(self, h: int, w: int) -> tuple[int, int]:
        if self.resolution is not None:
            return self.resolution, self.resolution
        return h // self.factor * self.factor, w // self.factor * self.factor

    def sizes(self) -> set[tuple[int, int]]:
        """The evaluated sizes, from the file headers only (EXIF rotation included)."""
        if self.resolution is not None:
            return {(self.resolution, self.resolution)}
        column = self.table.select_columns([self.column])[self.column]
        return {self.target_size(*_stored_size(_row(value))) for value in column}


def _row(value) -> dict:
    """An undecoded image cell as datasets' {"path", "bytes"} dict (hub columns may hold plain paths)."""
    return {"path": value, "bytes": None} if isinstance(value, str) else value


def _stored_size(value: dict) -> tuple[int, int]:
    """(H, W) of an undecoded image row, upright; PIL reads the header only."""
    source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
    with Image.open(source) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)  # EXIF 5-8 are transposed


def trainer_split(data: str, run_data: DataConfig | None = None) -> DataConfig:
    """The data section that splits `data` as the trainer did: a run's (`val_fraction`, `val_max`, its fixed
    validation set, hub split and column) with `source` = `data`, or the defaults without a run. A run's fixed
    validation set (`val_source`) is its held-out set only for the run's own source."""
    if run_data is None:
        return DataConfig(source=data)
    cfg = dataclasses.replace(run_data, source=data)
    if data != run_data.source:
        cfg.val_source = None
    return cfg


def load_images(
    data: str,
    factor: int,
    split: str = "val",
    resolution: int | None = None,
    max_images: int | None = None,
    seed: int = 0,
    folder_split: bool = False,
    protocol: str = "torchvision",
    run_data: DataConfig | None = None,
) -> EvalImages:
    """A fixed image set (evaluation, export, encoding): every image of a folder; the first `max_images` (default
    256) of shards; the held-out (`split="val"`) or training (`"train"`) split of `sample` or a hub dataset, brought
    to `resolution` by `protocol` (PROTOCOLS). `folder_split`: a folder is split too. A split is the trainer's
    (`build_datasets`) seeded by `seed`, with the split settings of `run_data`, the run's data section, when given
    (`trainer_split`): pass it and the run's seed wherever the held-out images must be the run's validation set.
    Errors name the command's `--data` / `--split`."""
    folder = Path(data).expanduser()
    try:
        if shard_files(data, "--data") is not None:  # shards: the first images of the stream
            if split != "val":
                raise ConfigError(
                    "--split: shards are evaluated as a fixed set; --split train is for 'sample' or a hub name"
                )
            table, column = fixed_table(data, DataConfig(val_max=max_images or DataConfig.val_max), "--data"), "image"
        elif data != "sample" and folder.is_dir() and not folder_split:
            if split != "val":
                raise ConfigError("--split: a folder is evaluated whole; --split train is for 'sample' or a hub name")
            files = list_images(folder)
            if not files:
                raise ConfigError(f"--data: no images found in {folder}")
            table = datasets.Dataset.from_dict({"image": [str(p) for p in files]})
            table, column = table.cast_column("image", datasets.Image(decode=False)), "image"
        else:
            train, val = build_datasets(trainer_split(data, run_data), seed)
            chosen = train if split == "train" else val
            table, column = chosen.table, chosen.column
    except (ValueError, FileNotFoundError) as e:  # build_datasets' messages name data.source; here it is --data
        raise ConfigError(str(e).replace("data.source", "--data")) from None
    if max_images is not None:
        table = table.select(range(min(max_images, len(table))))
    return EvalImages(table, column, factor, resolution, protocol)
