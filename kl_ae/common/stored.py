"""Image files at their own bit depth and channel count: the header (`stored_header`), the pixels (`read_stored`,
(H, W, C) in the stored type) and writing decodings back (`write_stored`).

PIL reads PNG and the other formats at their depth: 8-bit modes as uint8, 16-bit grayscale ("I;16") as uint16, "F"
as float32; palette images become RGB (RGBA with transparency); CMYK and the other colour spaces RGB; EXIF orientation
is applied. PIL cuts 16-bit colour PNGs to 8 bits: they are read (and written) through pypng where it is installed
(`pip install "kl-autoencoder[channels]"`), and refused otherwise, never truncated. TIFF goes through tifffile
((H, W), (H, W, N) or (N, H, W): the one axis besides Y and X holds the bands); a TIFF that tifffile cannot decode
(a GeoTIFF compression it lacks) through rasterio where that is installed. Everything a reader raises for a broken
file is one of `kl_ae.common.images.DECODE_ERRORS`, so the skip machinery lists it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tifffile
from PIL import Image, ImageOps

from kl_ae.common.images import Unusable, check_size, image_source, open_image, pixel_limit_lifted

PEAKS = {"uint8": 255.0, "uint16": 65535.0, "float32": 1.0}  # each type's format range is [0, peak]
TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF, both byte orders
PNG16_INSTALL = 'pip install pypng (or "kl-autoencoder[channels]")'
# channels of a PIL mode as `_pil_array` returns it; modes not listed are converted to RGB (3)
PIL_CHANNELS = {"1": 1, "L": 1, "I": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "I;16N": 1, "F": 1, "LA": 2, "La": 2,
                "PA": 4, "RGBA": 4, "RGBa": 4}  # fmt: skip


class Stored(NamedTuple):
    """What a file's header says: upright size, channels and the numpy type name of its values."""

    height: int
    width: int
    channels: int
    dtype: str  # "uint8", "uint16", "float32" (any float), or another numpy type name


def type_name(dtype) -> str:
    """The set's name of a numpy type: every float is "float32" (what the model sees), integers by name."""
    dtype = np.dtype(dtype)
    return "float32" if dtype.kind == "f" else dtype.name


def _is_tiff(source: str | io.BytesIO) -> bool:
    if isinstance(source, io.BytesIO):
        return source.getvalue()[:4] in TIFF_MAGIC
    with open(source, "rb") as f:
        return f.read(4) in TIFF_MAGIC


def _tiff_layout(axes: str, shape: tuple[int, ...]) -> tuple[list[int], int, int, int]:
    """(the axis order Y, X[, bands], height, width, channels) of a TIFF series."""
    other = [i for i, a in enumerate(axes) if a not in "YX"]
    if "Y" not in axes or "X" not in axes or len(other) > 1:
        raise ValueError(f"TIFF of shape {shape} (axes {axes}): expected (H, W), (H, W, N) or (N, H, W)")
    order = [axes.index("Y"), axes.index("X"), *other]
    return order, shape[order[0]], shape[order[1]], shape[other[0]] if other else 1


def _rasterio_read(source: str, max_pixels: int, min_side: int, header_only: bool):
    """(H, W, bands) values (or the header) of a GeoTIFF that tifffile cannot decode, through rasterio."""
    import rasterio  # optional: GDAL's codecs

    with rasterio.open(source) as ds:
        if header_only:
            return Stored(ds.height, ds.width, ds.count, type_name(ds.dtypes[0]))
        check_size((ds.width, ds.height), max_pixels, min_side)
        return np.moveaxis(ds.read(), 0, -1)


def _tiff(source: str | io.BytesIO, max_pixels: int, min_side: int, header_only: bool = False):
    try:
        with tifffile.TiffFile(source) as tif:
            series = tif.series[0]
            order, h, w, c = _tiff_layout(series.axes, series.shape)
            if header_only:
                return Stored(h, w, c, type_name(series.dtype))
            check_size((w, h), max_pixels, min_side)
            arr = series.asarray().transpose(order)
    except Unusable:
        raise
    except (ValueError, NotImplementedError, KeyError, OSError) as e:  # a codec tifffile lacks, or not a TIFF
        if not isinstance(source, str):
            raise ValueError(f"TIFF: {e}") from None
        try:
            return _rasterio_read(source, max_pixels, min_side, header_only)
        except ImportError:
            raise ValueError(f"TIFF: {e} (rasterio, where installed, reads GeoTIFFs tifffile cannot)") from None
    return arr if arr.ndim == 3 else arr[..., None]  # (H, W, C)


def _png16_colour(img: Image.Image) -> bool:
    """A 16-bit colour PNG, which PIL would decode to 8 bits (its raw mode names 16 bits per sample)."""
    if img.format != "PNG" or img.mode not in ("RGB", "RGBA", "LA") or not img.tile:
        return False
    return str(img.tile[0][3]).endswith(";16B")


def _png16(source: str | io.BytesIO, max_pixels: int, min_side: int, header_only: bool = False):
    try:
        import png
    except ImportError:
        raise ValueError(f"16-bit colour PNG: PIL reads only 8 of its 16 bits; {PNG16_INSTALL}") from None
    reader = png.Reader(filename=source) if isinstance(source, str) else png.Reader(bytes=source.getvalue())
    try:
        w, h, rows, info = reader.asDirect()
        if header_only:
            return Stored(h, w, info["planes"], "uint16")
        check_size((w, h), max_pixels, min_side)
        return np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(h, w, info["planes"])
    except png.Error as e:  # a broken file: one of DECODE_ERRORS, so it is skipped and listed
        raise OSError(f"png: {e}") from None


def _pil_array(img: Image.Image) -> np.ndarray:
    """(H, W, C) in the stored type of a decoded PIL image, upright."""
    png = img.format == "PNG"  # 16-bit grayscale PNGs open as "I" in some Pillow versions
    img = ImageOps.exif_transpose(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("PA", "RGBa", "La", "1"):
        img = img.convert({"PA": "RGBA", "RGBa": "RGBA", "La": "LA", "1": "L"}[img.mode])
    elif img.mode not in PIL_CHANNELS and img.mode != "RGB":  # CMYK, YCbCr, LAB, HSV
        img = img.convert("RGB")
    arr = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and png):
        arr = arr.astype(np.uint16)
    return arr if arr.ndim == 3 else arr[..., None]


def stored_header(value) -> Stored:
    """The upright size, channels and type of an undecoded image (a path, `datasets` cell or bytes), from its header."""
    source = image_source(value)
    if _is_tiff(source):
        return _tiff(source, 0, 0, header_only=True)
    with pixel_limit_lifted(), Image.open(source) as img:
        if _png16_colour(img):
            return _png16(_rewound(source), 0, 0, header_only=True)
        w, h = img.size
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF 5-8 are transposed
            w, h = h, w
        channels = PIL_CHANNELS.get(img.mode, 3) if img.mode != "P" else 3 + ("transparency" in img.info)
        dtype = {"I;16": "uint16", "F": "float32", "I": "uint16" if img.format == "PNG" else "int32"}
        return Stored(h, w, channels, dtype.get(img.mode[:4], "uint8"))


def _rewound(source: str | io.BytesIO) -> str | io.BytesIO:
    if isinstance(source, io.BytesIO):
        source.seek(0)
    return source


def read_stored(value, max_pixels: int, min_side: int = 0) -> np.ndarray:
    """(H, W, C) values of an image in its stored type (uint8, uint16, float32, ...), upright; the header size is
    checked against the limits first. Raises one of DECODE_ERRORS for a file that cannot be used."""
    source = image_source(value)
    if _is_tiff(source):
        return _tiff(_rewound(source), max_pixels, min_side)
    with pixel_limit_lifted():
        with Image.open(source) as img:
            colour16 = _png16_colour(img)
        if colour16:
            return _png16(_rewound(source), max_pixels, min_side)
        return _pil_array(open_image(_rewound(source), max_pixels, min_side))


def write_stored(path: str | Path, arr: np.ndarray, preview: np.ndarray | None = None) -> Path:
    """Write (H, W, C) stored values losslessly; returns the file written. PNG (at `path`) for 1, 3 or 4 channels of
    uint8 or uint16 (16-bit colour through pypng); anything else (N bands, floats, 16-bit colour without pypng) as a
    TIFF beside it (`path` with suffix .tif), with `preview` ((H, W, 3) uint8, a false-colour view) as the PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w, c = arr.shape
    png_ok = c in (1, 3, 4) and arr.dtype in (np.uint8, np.uint16)
    if png_ok and (arr.dtype == np.uint8 or c == 1):
        Image.fromarray(arr[..., 0] if c == 1 else arr).save(path, format="PNG")  # uint16 gray: mode I;16
        return path
    if png_ok:
        try:
            import png

            with open(path, "wb") as f:
                png.Writer(w, h, greyscale=False, alpha=c == 4, bitdepth=16).write(f, arr.reshape(h, w * c))
            return path
        except ImportError:
            pass  # written as TIFF below: lossless all the same
    tiff = path.with_suffix(".tif") if path.suffix.lower() not in (".tif", ".tiff") else path
    tifffile.imwrite(tiff, arr, photometric="rgb" if c == 3 else "minisblack", planarconfig="contig")
    if preview is not None and tiff != path:
        Image.fromarray(preview).save(path, format="PNG")
    return tiff
