"""Reading images safely: listing, decoding with limits, upright RGB, resizing, the training crop; the bundled
sample photographs; the skip machinery that the map-style datasets (images and video clips) share.

Shared by training (`kl_ae.common.data`, `kl_ae.common.video`), evaluation and export, so that every path decodes an
image the same way: EXIF orientation applied, grayscale / CMYK / 16-bit / palette converted to RGB (16-bit
rescaled, not clipped), alpha composited on white, the header's size checked against `data.max_pixels` before any
pixel is decoded. That is the reader of 3-channel 8-bit sets; sets of other channel counts or bit depths are read
as stored (`kl_ae.common.stored`, `kl_ae.common.channels`). A file that cannot be used raises one of
`DECODE_ERRORS`; `reason()` turns it into the skip log's text, and `SkippingDataset` logs, lists and replaces it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
# photographs in skimage/data; grayscale ones are converted to RGB. motorcycle_right.png is
# left out on purpose: it is a near-duplicate of motorcycle_left.png
SAMPLE_TRAIN = (
    "astronaut.png", "chelsea.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
    "retina.jpg", "camera.png", "coins.png", "moon.png", "brick.png", "grass.png", "gravel.png",
)  # fmt: skip
SAMPLE_VAL = ("coffee.png", "rocket.jpg")  # fixed: no near-duplicates of these in train
# what PIL's many decoders raise on a broken file; the type name goes into the skip log, so a bug of
# ours caught here still shows, and `build_datasets` fails loudly if nothing decodes at all
DECODE_ERRORS = (
    OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, KeyError, TypeError,
    ZeroDivisionError, MemoryError, Image.DecompressionBombError,
)  # fmt: skip

log = logging.getLogger("kl_ae.common.data")  # the name skips were always logged under
T = TypeVar("T")


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


def append_skips(path: str | os.PathLike, skips: dict[str, str]) -> None:
    """Append a "<label><TAB><reason>" line per skip; raises OSError (a full disk) for the caller to judge."""
    lines = "".join(f"{one_line(label)}\t{one_line(why)[:500]}\n" for label, why in skips.items())
    # one write to an O_APPEND descriptor: lines from DataLoader workers and ranks do not interleave
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, lines.encode("utf-8", "replace"))
    finally:
        os.close(fd)


class Unusable(ValueError):
    """An image we refuse on purpose (too big, too small, empty); its message is the whole reason."""


def reason(e: BaseException) -> str:
    return str(e) if isinstance(e, Unusable) else f"{type(e).__name__}: {e}"


def one_line(text: str) -> str:
    return text.translate({9: " ", 10: " ", 13: " "})


@contextlib.contextmanager
def pixel_limit_lifted() -> Iterator[None]:
    # PIL warns above MAX_IMAGE_PIXELS and raises above twice that, on open, load and crop; `_open`
    # enforces data.max_pixels on the header instead, so PIL's limit is lifted while we decode
    # (DataLoader workers are processes, and nothing else decodes in our threads meanwhile)
    before, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def check_size(size: tuple[int, int], max_pixels: int, min_side: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise Unusable(f"too large: {w}x{h} = {w * h} pixels > data.max_pixels={max_pixels}")
    if min(w, h) < min_side:
        raise Unusable(f"too small: {w}x{h}, shorter side < data.resolution={min_side} (data.small_images=skip)")


def path_of(value) -> str | None:
    if isinstance(value, dict):
        return value.get("path")
    if isinstance(value, str):
        return value
    return getattr(value, "filename", None) or None


def image_source(value) -> str | io.BytesIO:
    """A path or an in-memory file of an undecoded image cell; Unusable for an empty one."""
    # hub columns may hold {"path", "bytes"} dicts (decode=False) or path strings
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            value = io.BytesIO(value["bytes"])
        else:
            value = value.get("path")
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str | io.BytesIO):
        raise ValueError(f"cannot read an image from {type(value).__name__}")
    if (len(value.getbuffer()) if isinstance(value, io.BytesIO) else os.path.getsize(value)) == 0:
        raise Unusable("empty file (0 bytes)")
    return value


def open_image(value, max_pixels: int, min_side: int = 0) -> Image.Image:
    """Decoded image; its header size is checked against the limits before any pixel is decoded."""
    if isinstance(value, Image.Image):  # a hub column we could not keep undecoded
        check_size(value.size, max_pixels, min_side)
        return value
    value = image_source(value)
    try:
        img = Image.open(value)  # reads the header only
    except UnidentifiedImageError:
        if isinstance(value, str):
            raise
        # PIL names the buffer object by its address: a skip log line would differ from run to run
        raise UnidentifiedImageError("cannot identify image data") from None
    with img:
        check_size(img.size, max_pixels, min_side)
        img.load()  # decode now so the file handle closes
        return img


def seeded_split(n: int, val_fraction: float, val_max: int, seed: int, what: str = "images"):
    """(training, held-out) indices of n files: a seeded split, at least 1 held out, at most `val_max`."""
    if n < 2:
        raise ValueError(f"data.source: need at least 2 {what} (1 is held out for validation), found {n}")
    n_val = min(val_max, max(1, round(val_fraction * n)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def decode_resized(value, resize: int, max_pixels: int, min_side: int = 0) -> torch.Tensor:
    """An undecoded image -> uint8 (3, H, W), upright RGB, shorter side `resize`; raises one of DECODE_ERRORS."""
    with pixel_limit_lifted():
        img = resize_shorter(to_rgb(open_image(value, max_pixels, min_side)), resize)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, H, W)


def crop_flip(x: torch.Tensor, r: int, random_crop: bool, hflip: bool, seed: int) -> torch.Tensor:
    """uint8 (3, H, W) or a clip (3, T, H, W) -> float (3, [T,] r, r) in [-1, 1]: a random (or centre) crop and flip
    drawn from `seed` alone; a clip gets one crop and one flip for all its frames (its motion stays intact). A float
    image (C, H, W) is already in [-1, 1] (`kl_ae.common.channels.stored_resized`): cropped and flipped only."""
    h, w = x.shape[-2:]
    rng = torch.Generator().manual_seed(seed)
    if random_crop:
        top = int(torch.randint(0, h - r + 1, (), generator=rng))
        left = int(torch.randint(0, w - r + 1, (), generator=rng))
    else:
        top, left = (h - r) // 2, (w - r) // 2
    x = x[..., top : top + r, left : left + r]
    if hflip and bool(torch.rand((), generator=rng) < 0.5):
        x = x.flip(-1)
    if x.is_floating_point():
        return x.clone()  # a copy: the crop is a view of a cached image
    return x.float().div_(127.5).sub_(1.0)  # (3, [T,] r, r) in [-1, 1]


class SkippingDataset(torch.utils.data.Dataset):
    """A map-style dataset whose unusable files are logged, listed and replaced by the next usable one.

    A skipped file is logged (`logging` warning) and remembered under its key, so it is tried once per process;
    with `skip_log` set, it is appended there as "<label><TAB><reason>", and labels already listed there are not
    tried at all. Subclasses name a key in logs with `label(key)` and load through `_first_usable`.
    """

    what = "file"  # how the error names the entries when none is usable

    def __init__(self, train: bool, seed: int):
        self.train = train
        # crops, flips and clip starts come from (seed, epoch, index) alone, not from the global RNG: a resumed run
        # draws exactly what the uninterrupted run would have, whatever was prefetched or skipped
        self.seed, self.epoch = seed, 0
        self.bad: dict[Hashable, str] = {}  # key -> reason, found by this process: never tried again
        self._skip_log: Path | None = None
        self._unlogged: dict[str, str] = {}  # skips not yet in skip_log (none set, or writing failed)
        self._logged: set[str] = set()  # what skip_log held when this process first read it
        self._logged_pid: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def label(self, key) -> str:
        raise NotImplementedError

    @property
    def skip_log(self) -> Path | None:
        """File that each skip is appended to; setting it writes the skips found before."""
        return self._skip_log

    @skip_log.setter
    def skip_log(self, path: str | os.PathLike | None) -> None:
        self._skip_log = None if path is None else Path(path)
        self._logged_pid = None  # read the new file on next use
        self._flush_skips()

    def _first_usable(self, index: int, n: int, load: Callable[[int], T], key: Callable[[int], Hashable]) -> T:
        # one bad file must not end a multi-day run: log it and use the next usable one. The substitute is the first
        # good one from `index` on whatever this process already knows, so it is the same in every process, epoch
        # and resume
        for k in range(n):
            j = (index + k) % n
            if self._known_bad(key(j)):
                continue
            try:
                return load(j)
            except DECODE_ERRORS as e:
                self._skip(key(j), reason(e))
        split = "training" if self.train else "validation"
        what = f"every {self.what} of the {split} split ({n})"
        raise RuntimeError(f"data: {what} is unusable; see the warnings or skip log")

    def _known_bad(self, key: Hashable) -> bool:
        # DataLoader workers are fresh copies of this object each epoch (unless persistent): what other workers,
        # ranks and earlier epochs skipped is in the log, read once per process
        if key in self.bad:
            return True
        if self._skip_log is None:
            return False
        if self._logged_pid != os.getpid():
            self._logged, self._logged_pid = set(read_skipped(self._skip_log)), os.getpid()
        if not self._logged or self.label(key) not in self._logged:
            return False
        self.bad[key] = "in skip log"
        return True

    def _skip(self, key: Hashable, why: str) -> None:
        self.bad[key] = why
        label = self.label(key)
        log.warning("data: skipping %s: %s", label, why)
        self._unlogged[label] = why
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
