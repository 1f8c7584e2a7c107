"""Reading images safely: listing, decoding with limits, upright RGB, resizing; the bundled sample photographs.

Shared by training (`kl_ae.common.data`), evaluation and export, so that every path decodes an image the same way:
EXIF orientation applied, grayscale / CMYK / 16-bit / palette converted to RGB (16-bit rescaled, not clipped),
alpha composited on white, the header's size checked against `data.max_pixels` before any pixel is decoded.
A file that cannot be used raises one of `DECODE_ERRORS`; `reason()` turns it into the skip log's text.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
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


def _check_size(size: tuple[int, int], max_pixels: int, min_side: int) -> None:
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


def open_image(value, max_pixels: int, min_side: int = 0) -> Image.Image:
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
        raise Unusable("empty file (0 bytes)")
    try:
        img = Image.open(value)  # reads the header only
    except UnidentifiedImageError:
        if isinstance(value, str):
            raise
        # PIL names the buffer object by its address: a skip log line would differ from run to run
        raise UnidentifiedImageError("cannot identify image data") from None
    with img:
        _check_size(img.size, max_pixels, min_side)
        img.load()  # decode now so the file handle closes
        return img
