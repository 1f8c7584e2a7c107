"""Several fixed crops per image, for latent sets from few images (`kl-ae probe` on the 14 bundled photographs).

`GridCrops` cuts a k x k grid of `resolution` px crops, spread evenly over each image of a fixed set
(`kl_ae.common.data.EvalImages`) resized to shorter side `resize`, corners included, and with `hflip` each crop mirrored
too: `grid.per_image` items per image, image by image (crops row-major, then the mirrored ones). When one side
has no room (resize == resolution), the k * k crops are spread along the other side instead; a square image at
resize == resolution gives the same crop k * k times. Deterministic: no random numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np
import torch

from kl_ae.common.config import ConfigError
from kl_ae.common.images import resize_shorter, to_rgb


@dataclass(frozen=True)
class CropGrid:
    k: int = 4  # a k x k grid
    resize: int | None = None  # shorter side before cropping; None: the resolution
    hflip: bool = True  # each crop also mirrored

    @property
    def per_image(self) -> int:
        return self.k * self.k * (2 if self.hflip else 1)


def _spread(j: int, n: int, room: int) -> int:
    """Offset of the j-th of n crops spread evenly over `room` spare pixels (one crop: centred)."""
    return round(j * room / (n - 1)) if n > 1 else room // 2


class GridCrops(torch.utils.data.Dataset):
    """The crops of `images` (a `kl_ae.common.data.EvalImages`: its table and resolution; not imported, as the data
    module imports this one through the clips' crops): (3, r, r) in [-1, 1]; `row(i)` is the image of item i."""

    def __init__(self, images, grid: CropGrid):
        r = images.resolution
        if r is None or grid.k < 1 or (grid.resize or r) < r:
            raise ConfigError(f"crop grid {grid}: needs a resolution (got {r}), k >= 1 and resize >= resolution")
        self.table, self.column, self.resolution, self.grid = images.table, images.column, r, grid
        self._last: tuple[int, torch.Tensor] | None = None  # one image's crops are read one after another

    def __len__(self) -> int:
        return len(self.table) * self.grid.per_image

    def row(self, i: int) -> int:
        return i // self.grid.per_image

    def sizes(self) -> set[tuple[int, int]]:
        return {(self.resolution, self.resolution)}

    def image(self, row: int) -> torch.Tensor:
        """The image of table row `row`, resized: uint8 (3, h, w) with min(h, w) == resize."""
        if self._last is None or self._last[0] != row:
            value = self.table[row][self.column]  # hub columns may hold plain paths
            value = {"path": value, "bytes": None} if isinstance(value, str) else value
            img = to_rgb(datasets.Image().decode_example(value))
            img = resize_shorter(img, self.grid.resize or self.resolution)
            self._last = row, torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
        return self._last[1]

    def __getitem__(self, i: int) -> torch.Tensor:
        row, crop = divmod(i, self.grid.per_image)
        return grid_crop(self.image(row), crop, self.grid.k, self.resolution)


def grid_crop(x: torch.Tensor, crop: int, k: int, r: int) -> torch.Tensor:
    """Crop number `crop` of the k x k grid (then the mirrored ones) of a uint8 image (3, h, w) or clip
    (3, T, h, w): (.., r, r) in [-1, 1], the same window in every frame."""
    flip, cell = divmod(crop, k * k)
    h, w = x.shape[-2:]
    if h > r and w > r:
        top, left = _spread(cell // k, k, h - r), _spread(cell % k, k, w - r)
    else:  # room along one side only
        top, left = _spread(cell, k * k, h - r), _spread(cell, k * k, w - r)
    x = x[..., top : top + r, left : left + r]
    return (x.flip(-1) if flip else x).float().div(127.5).sub(1.0)  # (3, [T,] r, r) in [-1, 1]
