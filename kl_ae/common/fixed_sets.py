"""Fixed image sets for evaluation, export and encoding: `EvalImages`, and the named protocols (`PROTOCOLS`) that
bring an image to N x N.

Images of 8-bit RGB sets are decoded as the training data is (`kl_ae.common.images.to_rgb`); other sets (another
channel count, 16-bit or float values) are read at their stored depth and mapped to [-1, 1] by the set's value
mapping (`kl_ae.common.channels`), each channel resampled as a float image, so nothing is quantized to 8 bits on the
way to the metrics.
"""

from __future__ import annotations

import io

import datasets
import numpy as np
import torch
from PIL import Image

from kl_ae.common.channels import format_mapping, is_rgb8, read_fitted, to_model
from kl_ae.common.config import ConfigError, DataConfig
from kl_ae.common.images import DECODE_ERRORS, path_of, reason, to_rgb
from kl_ae.common.stored import stored_header

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
    """A fixed set: rows of an image table -> (C, H, W) in [-1, 1], at own size (centre-cropped to a multiple of
    the factor) or brought to resolution x resolution by `protocol` (see PROTOCOLS); C and the values as `mapping`
    says (`kl_ae.common.channels`; by default 8-bit RGB)."""

    def __init__(
        self, table: datasets.Dataset, column: str, factor: int, resolution: int | None, protocol: str = "torchvision",
        mapping: dict | None = None,
    ):  # fmt: skip
        if protocol not in PROTOCOLS:
            raise ConfigError(f"--protocol: unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
        self.table, self.column, self.factor, self.resolution = table, column, factor, resolution
        self.protocol = protocol
        # how stored values map to [-1, 1] (kl_ae.common.channels); None: 8-bit RGB as always
        self.mapping = mapping or format_mapping(3, "uint8", "rgb8")
        self.stored = not is_rgb8(self.mapping)

    def __len__(self) -> int:
        return len(self.table)

    def row(self, i: int) -> int:
        """The table row of item `i` (`kl_ae.common.crops.GridCrops` cuts several items from one row)."""
        return i

    def __getitem__(self, i: int) -> torch.Tensor:
        planes = self._planes(i)  # one RGB image, or one float image in [-1, 1] per channel
        if self.resolution is not None:
            planes = [resize_and_crop(p, self.resolution, self.protocol) for p in planes]
        w, h = planes[0].size
        th, tw = self.target_size(h, w)
        if th == 0 or tw == 0:
            raise ConfigError(f"--data: image {i} ({w}x{h}) is smaller than the downsampling factor {self.factor}")
        top, left = (h - th) // 2, (w - tw) // 2
        if self.stored:
            x = torch.from_numpy(np.stack([np.asarray(p) for p in planes])).clamp_(-1, 1)  # (C, h, w)
            return x[:, top : top + th, left : left + tw].clone()
        x = torch.from_numpy(np.array(planes[0], dtype=np.uint8)).permute(2, 0, 1)  # (3, h, w)
        return x[:, top : top + th, left : left + tw].float().div(127.5).sub(1.0)  # (3, th, tw) in [-1, 1]

    def _planes(self, i: int) -> list[Image.Image]:
        value = _row(self.table[i][self.column])
        if not self.stored:
            return [to_rgb(datasets.Image().decode_example(value))]
        try:
            x = to_model(read_fitted(value, self.mapping, DataConfig.max_pixels), self.mapping)  # (H, W, C)
        except DECODE_ERRORS as e:
            raise ConfigError(f"--data: {path_of(value) or f'image {i}'}: {reason(e)}") from None
        return [Image.fromarray(x[..., c]) for c in range(x.shape[-1])]  # float ("F") images keep every bit

    def target_size(self, h: int, w: int) -> tuple[int, int]:
        if self.resolution is not None:
            return self.resolution, self.resolution
        return h // self.factor * self.factor, w // self.factor * self.factor

    def sizes(self) -> set[tuple[int, int]]:
        """The evaluated sizes, from the file headers only (EXIF rotation included)."""
        if self.resolution is not None:
            return {(self.resolution, self.resolution)}
        column = self.table.select_columns([self.column])[self.column]
        if self.stored:
            return {self.target_size(*stored_header(_row(value))[:2]) for value in column}
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
