"""Training and validation images through Hugging Face `datasets`.

Three sources: a local folder (searched recursively), a hub dataset name, or "sample" —
real photographs bundled inside scikit-image, so a run works with no data and no network.
Rows hold undecoded images (`datasets.Image(decode=False)`); decoding, resizing, cropping
and flipping happen here with PIL and torch's RNG, so DataLoader worker seeding applies.
Videos ("sample-video", a folder holding videos) take the same path as `kl_ae.common.video.ClipDataset`s, with the
same skip machinery (`kl_ae.common.images.SkippingDataset`) and the same crop (`crop_flip`).

Bad input. Real folders are dirty; no single file may end a run, and none is dropped silently:
- Listing: only files with an image suffix (`IMAGE_SUFFIXES`, any case) are listed; other files are
  ignored, not logged.
- Modes: in a set of 3-channel 8-bit images (`data.channels=3`, the default) every image becomes upright RGB
  (`to_rgb`): EXIF orientation is applied; grayscale and CMYK are converted; 16-bit grayscale (I;16, I) is
  rescaled to 8 bits, not clipped; alpha (RGBA, LA, PA, palette transparency) is composited on WHITE; multi-frame
  files give their first frame. Other sets (1, 4 or N channels, 16-bit or float values; folders only) are read at
  their stored depth and mapped to [-1, 1] by the set's value mapping; a file that does not fit the set's channels
  or type is skipped like a broken one, or stops the build (`data.channel_mismatch`): `kl_ae.common.channels`.
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
from pathlib import Path

import datasets
import torch

from kl_ae.common.channels import (
    check_files,
    files_mapping,
    folder_only,
    format_mapping,
    is_rgb8,
    stored_resized,
    value_mapping,
)
from kl_ae.common.config import ConfigError, DataConfig
from kl_ae.common.fixed_sets import PROTOCOLS as PROTOCOLS  # the fixed sets are imported from here
from kl_ae.common.fixed_sets import EvalImages as EvalImages
from kl_ae.common.fixed_sets import resize_and_crop as resize_and_crop
from kl_ae.common.images import (
    DECODE_ERRORS,
    SAMPLE_TRAIN,
    SAMPLE_VAL,
    SkippingDataset,
    crop_flip,
    decode_resized,
    list_images,
    path_of,
    reason,
    sample_dir,
    seeded_split,
)
from kl_ae.common.images import read_skipped as read_skipped  # training.progress reads skip logs through here
from kl_ae.common.shards import files_table, fixed_table, looks_like_hub_name, shard_files
from kl_ae.common.video import SAMPLE_VIDEO_VAL, ClipDataset, list_videos, sample_video_dir, split_files

CACHE_MAX_IMAGES = 512  # below this, decoded+resized images are kept in memory


class ImageDataset(SkippingDataset):
    """Rows of a `datasets.Dataset` -> float32 tensors (C, resolution, resolution) in [-1, 1]; C and the values as
    `mapping` says (`kl_ae.common.channels`; by default 8-bit RGB).

    Bad images are skipped and replaced by the next usable one (see the module docstring), and so are files that do
    not fit the set's channels or type. Set `skip_log` to a file to have each skip appended to it as a line
    "<path><TAB><reason>".
    """

    what = "image"

    def __init__(
        self, table: datasets.Dataset, cfg: DataConfig, train: bool, column: str = "image", seed: int = 0,
        mapping: dict | None = None,
    ):  # fmt: skip
        super().__init__(train, seed)
        self.mapping = mapping or format_mapping(3, "uint8", "rgb8")
        self.table, self.column = table, column
        self.resolution = cfg.resolution
        self.resize = cfg.resize or cfg.resolution
        self.random_crop = train and cfg.random_crop
        self.hflip = train and cfg.hflip
        self.repeats = cfg.repeats if train else 1
        self.min_side = cfg.resolution if cfg.small_images == "skip" else 0
        self.max_pixels = cfg.max_pixels
        # small sets (the sample set) are decoded over and over; keep uint8 (3, H, W) tensors (other sets: float)
        self.cache: dict[int, torch.Tensor] | None = {} if len(table) < CACHE_MAX_IMAGES else None

    def __len__(self) -> int:
        return len(self.table) * self.repeats

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

    @property
    def entries(self) -> int:
        """How many files `check` can be asked about."""
        return len(self.table)

    def load(self, index: int) -> torch.Tensor:
        """Decoded and resized image as a uint8 tensor (3, H, W) with min(H, W) == resize (sets beyond 8-bit RGB:
        float (C, H, W) in [-1, 1]). Raises one of `DECODE_ERRORS` for a bad image or one that does not fit the set.
        """
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        value = self.table[index][self.column]
        if is_rgb8(self.mapping):
            x = decode_resized(value, self.resize, self.max_pixels, self.min_side)
        else:
            x = stored_resized(value, self.mapping, self.resize, self.max_pixels, self.min_side)
        if self.cache is not None:
            self.cache[index] = x
        return x

    check = load  # `build_datasets` asks whether a row is usable

    def _known_bad(self, key: int) -> bool:
        return not (self.cache is not None and key in self.cache) and super()._known_bad(key)  # cached: good

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self._first_usable(i % len(self.table), len(self.table), self.load, key=int)
        seed = hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF_FFFF_FFFF  # ints hash alike in every process
        return crop_flip(x, self.resolution, self.random_crop, self.hflip, seed)


def _check_usable(ds: ImageDataset | ClipDataset, split: str, source: str) -> None:
    # a dataset with no usable image (clip) is a config error before training, not a crash in epoch 0
    reasons = []
    for j in range(ds.entries):
        try:
            ds.check(j)
            return
        except DECODE_ERRORS as e:
            reasons.append(f"{ds.label(j)}: {reason(e)}")
    what = "clip" if isinstance(ds, ClipDataset) and ds.num_frames > 1 else "image"
    raise ValueError(
        f"data.source: no usable {what} in {split} of {source} ({len(reasons)} files tried: {'; '.join(reasons[:3])})"
    )


def _seeded_split(n: int, cfg: DataConfig, seed: int) -> tuple[list[int], list[int]]:
    return seeded_split(n, cfg.val_fraction, cfg.val_max, seed)


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


def _clip_datasets(cfg: DataConfig, seed: int) -> tuple[ClipDataset, ClipDataset]:
    """(train, held-out val) of "sample-video" or a folder holding videos (`split_files` says which files)."""
    train_files, val_files, photos = split_files(cfg, seed)
    if cfg.num_frames == 1:
        return ClipDataset([], cfg, True, seed, train_files), ClipDataset([], cfg, False, seed, val_files)
    return ClipDataset(train_files, cfg, True, seed, photos or train_files), ClipDataset(val_files, cfg, False, seed)


def _no_clips(source: str, cfg: DataConfig) -> ValueError:
    return ValueError(
        f"data.source: {source} holds no videos; data.num_frames={cfg.num_frames} needs videos "
        "('sample-video', a folder of videos, video shards)"
    )


def build_datasets(
    cfg: DataConfig, seed: int, mapping: dict | None = None
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """(train, val) torch datasets for `cfg.source`; the split depends only on `seed` and the files. With
    `cfg.val_source` nothing is held out: validation is that fixed set. Videos ("sample-video", a folder holding
    videos) give `ClipDataset`s (`kl_ae.common.video`). Images map to [-1, 1] by `mapping` (a run's record), else by
    the folder's (`kl_ae.common.channels.files_mapping` of the training split), found on `.mapping` of both."""
    cfg.validate()
    column = "image"
    held_out = cfg.val_source is None
    folder = Path(cfg.source).expanduser()
    videos = list_videos(folder) if cfg.source != "sample" and folder.is_dir() else []
    if cfg.source == "sample-video" or videos:
        if cfg.channels != 3:
            raise ConfigError(f"data.channels: {folder} holds videos, which are 3-channel (RGB); got {cfg.channels}")
        train, val = _clip_datasets(cfg, seed)
        return _checked(train, val if held_out else None, cfg, seed)
    if cfg.num_frames > 1:
        raise _no_clips(repr(cfg.source) if cfg.source == "sample" or not folder.is_dir() else str(folder), cfg)
    if cfg.source == "sample" or not folder.is_dir():  # RGB only: read as 8-bit RGB
        folder_only(cfg)
        mapping = format_mapping(3, "uint8", "rgb8")
    if cfg.source == "sample":
        train_table = files_table([sample_dir() / n for n in SAMPLE_TRAIN])
        val_table = files_table([sample_dir() / n for n in SAMPLE_VAL])
    else:
        if folder.is_dir():
            files = list_images(folder)
            if not files:
                tars = any(folder.glob("*.tar"))
                hint = "; it holds .tar shards: pass them as a pattern, e.g. DIR/*.tar" if tars else ""
                raise ValueError(f"data.source: no images found in {folder}{hint}")
            train_idx, val_idx = _seeded_split(len(files), cfg, seed) if held_out else (range(len(files)), [])
            mapping = mapping or files_mapping([files[i] for i in train_idx], cfg, seed)
            if cfg.channel_mismatch == "error" and not is_rgb8(mapping):
                check_files([str(f) for f in files], mapping, str(folder))
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
    train = ImageDataset(train_table, cfg, True, column, seed, mapping)
    val = ImageDataset(val_table, cfg, False, column, seed, mapping) if held_out else None
    return _checked(train, val, cfg, seed, mapping)


def _checked(train, val, cfg: DataConfig, seed: int, mapping: dict | None = None):
    _check_usable(train, "train", cfg.source)
    if val is None:
        return train, build_val(cfg, seed, mapping)
    _check_usable(val, "val", cfg.source)
    return train, val


def build_val(cfg: DataConfig, seed: int, mapping: dict | None = None) -> ImageDataset | ClipDataset:
    """The validation set of `cfg.val_source`, checked to hold a usable image (clip): videos for
    'sample-video' and folders holding videos, images otherwise, mapped to [-1, 1] by `mapping` (the training
    split's; by default the set's own, which only a folder can hold beyond 8-bit RGB)."""
    folder = Path(cfg.val_source).expanduser()
    files = []
    if cfg.val_source == "sample-video":
        files = [sample_video_dir() / n for n in SAMPLE_VIDEO_VAL]
    elif cfg.val_source != "sample" and folder.is_dir() and list_videos(folder):  # all of it: cfg.val_source is set
        files = split_files(dataclasses.replace(cfg, source=cfg.val_source), seed)[0]
    if files:
        files, clips = files[: cfg.val_max], cfg.num_frames > 1
        val = ClipDataset(files if clips else [], cfg, False, seed, [] if clips else files)
    elif cfg.num_frames > 1:
        raise _no_clips(f"data.val_source {cfg.val_source!r}", cfg)
    else:
        if cfg.val_source == "sample" or not Path(cfg.val_source).expanduser().is_dir():
            folder_only(dataclasses.replace(cfg, source=cfg.val_source))
        mapping = mapping or value_mapping(cfg, seed)  # the training source's, measured there
        val = ImageDataset(fixed_table(cfg.val_source, cfg), cfg, False, "image", seed, mapping)
    _check_usable(val, "val", cfg.val_source)
    return val


# ----------------------------------------------------------------------------- fixed image sets


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
    channels: int = 3,
    mapping: dict | None = None,
) -> EvalImages:
    """A fixed image set (evaluation, export, encoding): every image of a folder; the first `max_images` (default
    256) of shards; the held-out (`split="val"`) or training (`"train"`) split of `sample` or a hub dataset, brought
    to `resolution` by `protocol` (PROTOCOLS). `folder_split`: a folder is split too. A split is the trainer's
    (`build_datasets`) seeded by `seed`, with the split settings of `run_data`, the run's data section, when given
    (`trainer_split`): pass it and the run's seed wherever the held-out images must be the run's validation set.
    Images have `channels` (the model's) and map to [-1, 1] by `mapping` (the model's record), else by the run's data
    section or the files' own type (`kl_ae.common.channels`). Errors name the command's `--data` / `--split`."""
    folder = Path(data).expanduser()
    try:
        if shard_files(data, "--data") is not None:  # shards: the first images of the stream
            if split != "val":
                raise ConfigError(
                    "--split: shards are evaluated as a fixed set; --split train is for 'sample' or a hub name"
                )
            folder_only(DataConfig(source=data, channels=channels))
            table, column = fixed_table(data, DataConfig(val_max=max_images or DataConfig.val_max), "--data"), "image"
        elif data != "sample" and folder.is_dir() and not folder_split:
            if split != "val":
                raise ConfigError("--split: a folder is evaluated whole; --split train is for 'sample' or a hub name")
            files = list_images(folder)
            if not files:
                raise ConfigError(f"--data: no images found in {folder}")
            mapping = mapping or files_mapping(files, DataConfig(source=data, channels=channels), seed)
            table = datasets.Dataset.from_dict({"image": [str(p) for p in files]})
            table, column = table.cast_column("image", datasets.Image(decode=False)), "image"
        else:
            cfg = trainer_split(data, run_data)
            cfg.channels = channels if run_data is None else cfg.channels
            train, val = build_datasets(cfg, seed, mapping)
            chosen = train if split == "train" else val
            if isinstance(chosen, ClipDataset):
                raise ConfigError(f"--data: {data} holds videos: a fixed clip set is kl_ae.common.video.load_clips'")
            table, column, mapping = chosen.table, chosen.column, chosen.mapping
    except (ValueError, FileNotFoundError) as e:  # build_datasets' messages name data.source; here it is --data
        raise ConfigError(str(e).replace("data.source", "--data")) from None
    if max_images is not None:
        table = table.select(range(min(max_images, len(table))))
    return EvalImages(table, column, factor, resolution, protocol, mapping)
