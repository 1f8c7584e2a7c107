"""Training and validation images through Hugging Face `datasets`.

Three sources: a local folder (searched recursively), a hub dataset name, or "sample" —
real photographs bundled inside scikit-image, so a run works with no data and no network.
Rows hold undecoded images (`datasets.Image(decode=False)`); decoding, resizing, cropping
and flipping happen here with PIL and torch's RNG, so DataLoader worker seeding applies.
"""

from __future__ import annotations

import io
import re
import warnings
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
        # 16-bit grayscale: convert("RGB") would clip at 255 instead of rescaling
        arr = np.asarray(img, dtype=np.float32)
        scale = 255.0 / 65535.0 if arr.max() > 255 else 1.0
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8))
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
    """Rows of a `datasets.Dataset` -> float32 tensors (3, resolution, resolution) in [-1, 1]."""

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
        # small sets (the sample set) are decoded over and over; keep uint8 (3, H, W) tensors
        self.cache: dict[int, torch.Tensor] | None = {} if len(table) < CACHE_MAX_IMAGES else None

    def __len__(self) -> int:
        return len(self.table) * self.repeats

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def paths(self) -> list[str | None]:
        """Source path of every row (None for hub images stored as bytes)."""
        return [_path_of(v) for v in self.table.select_columns([self.column])[self.column]]

    def load(self, index: int) -> torch.Tensor:
        """Decoded and resized image as a uint8 tensor (3, H, W) with min(H, W) == resize."""
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        img = resize_shorter(to_rgb(_open(self.table[index][self.column])), self.resize)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, H, W)
        if self.cache is not None:
            self.cache[index] = x
        return x

    def _load_or_skip(self, index: int, tries: int = 8) -> torch.Tensor:
        # one corrupt file should not end a multi-day run: say which one and use the next
        for k in range(tries):
            j = (index + k) % len(self.table)
            try:
                return self.load(j)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's errors
                warnings.warn(f"skipping unreadable image {_path_of(self.table[j][self.column])}: {e}")
        raise RuntimeError(f"data: {tries} unreadable images in a row from index {index}; check the dataset")

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


def _path_of(value) -> str | None:
    if isinstance(value, dict):
        return value.get("path")
    if isinstance(value, str):
        return value
    return getattr(value, "filename", None) or None


def _open(value) -> Image.Image:
    # hub columns may hold PIL images, {"path", "bytes"} dicts (decode=False) or path strings
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        value = value.get("path")
    if not isinstance(value, str):
        raise ValueError(f"cannot read an image from {type(value).__name__}")
    with Image.open(value) as img:
        img.load()  # decode now so the file handle closes
        return img


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
    return ImageDataset(train_table, cfg, True, column, seed), ImageDataset(val_table, cfg, False, column, seed)
