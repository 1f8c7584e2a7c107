"""Three-channel views of images of any channel count: for the networks that take RGB (LPIPS, Inception) and for
pictures (sample grids, eval figures, previews of decoded bands).

Images here are in [0, 1], (B, C, H, W). RGBA (C == 4, channel 3 alpha): the metrics composite its RGB over a fixed
mid-grey (BACKGROUND), the pictures over a checkerboard. One channel: repeated to three. N bands: a false-colour
triplet, the first of the triplets named (`loss.lpips_channels`, which wins for any channel count in the metrics'
view) or the first three bands for pictures; the networks get no view of N bands unless bands are named (a reason
instead: never an average of bands).
"""

from __future__ import annotations

import torch
from torch import Tensor

BACKGROUND = 0.5  # the fixed background RGBA is composited over for metrics (mid-grey, 0 in [-1, 1])
CHECKER = 8  # checkerboard squares, in pixels
CHECKER_SHADES = (0.8, 0.6)


def composite(x: Tensor, background: Tensor | float = BACKGROUND) -> Tensor:
    """RGB of RGBA images (B, 4, H, W) in [0, 1] over `background` (a value or (B|1, 3, H, W)). (B, 3, H, W)"""
    alpha = x[:, 3:4]
    return x[:, :3] * alpha + background * (1 - alpha)


def checkerboard(h: int, w: int, device=None) -> Tensor:
    """A grey checkerboard (1, 3, h, w), the usual picture of transparency."""
    yy = torch.arange(h, device=device).view(-1, 1) // CHECKER
    xx = torch.arange(w, device=device).view(1, -1) // CHECKER
    light, dark = CHECKER_SHADES
    board = torch.where((yy + xx) % 2 == 0, light, dark)
    return board.expand(3, h, w)[None].float()


def triplet(channels: int, bands: list[int] | None) -> list[int]:
    """The three bands a false-colour picture shows: the first triplet of `bands`, or the first three bands
    (repeating the last if fewer)."""
    if bands is not None:
        return list(bands[:3])
    return [min(i, channels - 1) for i in range(3)]


def display(x: Tensor, bands: list[int] | None = None) -> Tensor:
    """A picture of images (B, C, H, W) in [0, 1]: RGB as it is, one channel in grayscale, RGBA over a checkerboard,
    N bands as a false-colour triplet. (B, 3, H, W)"""
    c = x.shape[1]
    if c == 3:
        return x
    if c == 1:
        return x.expand(-1, 3, -1, -1)
    if c == 4:
        return composite(x, checkerboard(*x.shape[-2:], device=x.device))
    return x[:, triplet(c, bands)]  # (B, 3, H, W)


def rgb_view(x: Tensor, bands: list[int] | None = None) -> tuple[Tensor | None, str]:
    """(the 3-channel view LPIPS and Inception see, how it was made) of images (B, C, H, W) in [0, 1]; None (and
    why) for N bands without `bands`."""
    c = x.shape[1]
    if bands is not None:
        return x[:, triplet(c, bands)], f"bands {triplet(c, bands)}"
    if c == 3:
        return x, "RGB"
    if c == 1:
        return x.expand(-1, 3, -1, -1), "the channel repeated to RGB"
    if c == 4:
        return composite(x), f"RGB composited over grey {BACKGROUND}"
    return None, f"{c} channels and no band triplet named (loss.lpips_channels): off, never an average of bands"
