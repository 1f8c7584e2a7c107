"""Tiled encode and decode for images larger than memory allows: overlapping tiles blended with a linear ramp.

Only the part of the network above the latent resolution is tiled: the encoder's `conv_in` and all its levels but
the last, the decoder's levels but the first, and its output layers. The latent-resolution part (the encoder's last
level and mid block, the decoder's mid block and first level, with their self-attention) runs on the whole
latent-sized feature map, so it is exact. One tile goes through the tiled part at a time, so peak activation memory
is set by the tile; only latent-sized features and the 3-channel image are held at full size.

Two things make tiles disagree with an untiled pass, and how each is handled:
- convolutions see zero padding at tile borders: tiles overlap and are cross-faded with a linear ramp
  (feathering, as diffusers' `enable_tiling`), so each output pixel comes mostly from tiles that see it well
  inside;
- every GroupNorm would normalise with that tile's own statistics, which on a real image differ from the whole
  image's. `norm` says which statistics the tiled GroupNorms use:
  - "tile": each tile's own (one pass; tiles visibly disagree, 25-35 dB PSNR against untiled on a trained model);
  - "exact": the whole image's, measured first: one pass over all tiles per GroupNorm, each stopping at the
    GroupNorm it measures, accumulates that GroupNorm's input sums over each tile's own share of the image (its
    "core"; the cores partition the image), with every earlier GroupNorm already using its whole-image
    statistics; then the output pass normalises every tile alike. What remains is the zero padding at tile
    borders leaking into the cores (>= 40 dB). Each statistic depends on all earlier ones, and the activations
    they are taken over are too large to keep (that is why we tile), so every GroupNorm needs its own sweep up
    to it: 10-11 plain tiled passes' FLOPs in all for kl-f8 at 1024-2048 px (BENCHMARKS.md);
  - "estimate": the whole image's statistics estimated in a few tile-sized forwards. A proxy, the latent-sized
    features average-pooled by a power of 2 until they fit in one tile, runs through the tiled part whole (exact
    statistics of the proxy, and its statistics over each tile's core). Pooling lowers the variance of the
    high-resolution features, so the tiles whose proxy statistics are closest to the whole proxy's (a quarter of
    the tiles, 1 to 8, per image) then run at full resolution, each GroupNorm adding to the proxy's mean and
    variance what full resolution adds over that tile's core, normalising with the result (so each forward is
    self-consistent); the statistics are the mean of those estimates. Costs 1.31 plain tiled passes for a kl-f8
    decode of 1024 px with 512 px tiles and 1.23 at 2048 px (FLOP-counted); on a trained model >= 40 dB PSNR
    against untiled on 14 of 16 decodes (34-56 dB; per-tile statistics 25-53), but an estimate: an image unlike
    its typical tiles can come out lower (BENCHMARKS.md).
Attention at levels other than the lowest (`attn_levels`) stays per-tile, an approximation.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .model import Autoencoder, DiagonalGaussian
from .quantize import Latents

NORMS = ("exact", "estimate", "tile")


def _starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering [0, size): every `stride`, the last one flush with the end."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, stride)) + [size - tile]


def _cores(starts: list[int], tile: int, size: int, align: int) -> list[tuple[int, int]]:
    """Each tile's share of [0, size) in tile coordinates: cut in the middle of each overlap, on `align`."""
    cuts = [0] + [(b + a + tile) // 2 // align * align for a, b in zip(starts, starts[1:])] + [size]
    return [(cuts[i] - s, cuts[i + 1] - s) for i, s in enumerate(starts)]


def _ramp(length: int, ramp: int, start: bool, end: bool, device, dtype) -> torch.Tensor:
    """1-D blending weight: rises linearly over `ramp` samples at an interior start edge, falls at an interior end."""
    w = torch.ones(length, device=device, dtype=dtype)
    ramp = min(ramp, length)
    if ramp > 0:
        r = (torch.arange(ramp, device=device, dtype=dtype) + 0.5) / ramp  # in (0, 1), never exactly 0
        if start:
            w[:ramp] = torch.minimum(w[:ramp], r)
        if end:
            w[-ramp:] = torch.minimum(w[-ramp:], r.flip(0))
    return w


class _Stop(Exception):
    """Ends a sequential statistics pass once the GroupNorm it measures has been reached."""


def _moments(x: torch.Tensor, groups: int, box: tuple[float, float, float, float] | None) -> torch.Tensor:
    """(3, B, G) float64 count, sum and sum of squares of x per group, over `box` (fractions y0, y1, x0, x1 of
    its height and width; None: all of it). Attention norms see (B, C, HW): all of their input is counted."""
    if box is not None and x.dim() == 4:
        H, W = x.shape[2:]
        x = x[:, :, round(box[0] * H) : round(box[1] * H), round(box[2] * W) : round(box[3] * W)]
    r = x.double().reshape(x.shape[0], groups, -1)
    return torch.stack([torch.full_like(r[..., 0], r.shape[-1]), r.sum(-1), r.square().sum(-1)])


def _mean_var(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = moments[1] / moments[0]
    return mean, (moments[2] / moments[0] - mean.square()).clamp_min(0)


class _Norms:
    """Replaces the forward of the GroupNorms in `modules`. Each normalises with `stats[m]` where there is one,
    else with its input's own statistics (per tile), and measures its input as `measure` says:
    - "next": the first GroupNorm reached that has no statistics accumulates its input's sums over `box` (the
      tile's core) and stops the forward (the exact, sequential pass);
    - "proxy": every GroupNorm records its whole input's moments and those over each of `boxes`;
    - "sample": x holds one tile per image, image b's being tile `sample[b]` with its core at `box[b]`; every
      GroupNorm measures its input over that core and normalises with (and stores as its statistics) the proxy's,
      corrected by the difference between this input's and the proxy's over the same core.
    """

    def __init__(self, modules: list[nn.GroupNorm]):
        self.modules = modules
        self.stats: dict[nn.GroupNorm, tuple[torch.Tensor, torch.Tensor]] = {}  # (B, G) mean, var
        self.sums: dict[nn.GroupNorm, torch.Tensor] = {}  # (3, B, G) float64: count, sum, sum of squares
        self.proxy: dict[nn.GroupNorm, tuple[torch.Tensor, torch.Tensor]] = {}  # the proxy's whole mean, var
        self.proxy_boxes: dict[nn.GroupNorm, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # and over each box
        self.measure = "none"
        # the current tile's core as fractions of the tile ("sample": one per image)
        self.box: tuple[float, float, float, float] | list[tuple[float, float, float, float]] | None = None
        self.boxes: list[tuple[float, float, float, float]] = []
        self.sample: list[int] = []  # per image: the tile it samples at full resolution

    def finish_pass(self) -> bool:
        """Turn the accumulated sums into statistics; False when nothing was measured."""
        for m, sums in self.sums.items():
            self.stats[m] = _mean_var(sums)
        measured, self.sums = bool(self.sums), {}
        return measured

    def most_typical(self, k: int) -> list[list[int]]:
        """The k boxes whose proxy statistics are closest to the whole proxy's, most typical first, for each image of
        the batch: (k, B) indices. Distance: summed over every GroupNorm, the means' difference in standard
        deviations plus |log| of the standard deviations' ratio."""
        distance = 0.0
        for m, (mean, var) in self.proxy.items():
            std = var.sqrt().clamp_min(1e-6)  # (B, G)
            box_mean, box_var = (torch.stack(t) for t in zip(*self.proxy_boxes[m]))  # (boxes, B, G) each
            d = (box_mean - mean).abs() / std + (box_var.sqrt() / std).clamp_min(1e-6).log().abs()
            distance = distance + d.mean(-1)  # (boxes, B)
        k = min(k, distance.shape[0])
        if distance.is_meta:  # shapes only (FLOP counting): no values to compare
            return [[i] * distance.shape[1] for i in range(k)]
        return distance.argsort(dim=0, stable=True)[:k].tolist()

    def _forward(self, m: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        B, C, G = x.shape[0], x.shape[1], m.num_groups
        if self.measure == "next" and m not in self.stats:
            self.sums[m] = self.sums[m] + _moments(x, G, self.box) if m in self.sums else _moments(x, G, self.box)
            raise _Stop
        if self.measure == "proxy":
            self.proxy[m] = _mean_var(_moments(x, G, None))
            self.proxy_boxes[m] = [_mean_var(_moments(x, G, box)) for box in self.boxes]
        elif self.measure == "sample":
            mean, var = self.proxy[m]
            box_mean, box_var = (torch.stack([self.proxy_boxes[m][i][k][b] for b, i in enumerate(self.sample)])
                                 for k in (0, 1))  # fmt: skip
            here = [_moments(x[b : b + 1], G, box) for b, box in enumerate(self.box)]
            here_mean, here_var = _mean_var(torch.cat(here, dim=1))
            # the proxy (whole image, lower resolution) plus what full resolution adds over the same region
            self.stats[m] = (mean + here_mean - box_mean, (var + here_var - box_var).clamp_min(0.1 * var))
        if m not in self.stats:
            return F.group_norm(x, G, m.weight, m.bias, m.eps)
        mean, var = (s.to(x.dtype) for s in self.stats[m])
        y = (x.reshape(B, G, -1) - mean[..., None]) * torch.rsqrt(var[..., None] + m.eps)
        shape = (1, C) + (1,) * (x.dim() - 2)
        return y.reshape(x.shape) * m.weight.reshape(shape) + m.bias.reshape(shape)

    @contextmanager
    def installed(self):
        for m in self.modules:
            m.forward = lambda x, m=m: self._forward(m, x)
        try:
            yield self
        finally:
            for m in self.modules:
                del m.forward


def _pool(x: torch.Tensor, tile: int) -> torch.Tensor:
    """x average-pooled by the smallest power of 2 that makes it fit in one tile: (B, C, ~H/s, ~W/s)."""
    s = 1
    while max(x.shape[2:]) > tile * s:
        s *= 2
    return F.avg_pool2d(x, s, ceil_mode=True) if s > 1 else x


def _tiled(
    fn,
    modules: nn.Module,
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale: tuple[int, int],
    align: int,
    norm: str,
) -> torch.Tensor:
    """Apply `fn` to overlapping tiles of x (B, C, H, W), its GroupNorms in `modules` as `norm` says.

    The output is scale[0] / scale[1] times the input's size; cores are cut on multiples of `align`.
    """
    H, W = x.shape[2:]
    num, den = scale
    rows, cols = _starts(H, tile, tile - overlap), _starts(W, tile, tile - overlap)
    row_cores, col_cores = _cores(rows, tile, H, align), _cores(cols, tile, W, align)
    tiles = [(top, left) for top in rows for left in cols]
    cores = [(top + y0, top + y1, left + x0, left + x1) for top, (y0, y1) in zip(rows, row_cores)
             for left, (x0, x1) in zip(cols, col_cores)]  # fmt: skip
    norms = _Norms([m for m in modules.modules() if isinstance(m, nn.GroupNorm)])
    ramp = overlap * num // den

    def crop(i: int, b: slice = slice(None)) -> torch.Tensor:
        return x[b, :, tiles[i][0] : tiles[i][0] + tile, tiles[i][1] : tiles[i][1] + tile]

    def box(i: int) -> tuple[float, float, float, float]:
        """Tile i's core as fractions of the tile."""
        (top, left), (y0, y1, x0, x1) = tiles[i], cores[i]
        th, tw = min(tile, H - top), min(tile, W - left)
        return (y0 - top) / th, (y1 - top) / th, (x0 - left) / tw, (x1 - left) / tw

    with norms.installed():
        if len(tiles) > 1 and norm == "exact":  # one pass per GroupNorm, each stopping at the one it measures
            norms.measure = "next"
            while True:
                for i in range(len(tiles)):
                    norms.box = box(i)
                    try:
                        fn(crop(i))
                    except _Stop:
                        pass
                if not norms.finish_pass():
                    break
        elif len(tiles) > 1 and norm == "estimate":
            # the proxy: the whole image pooled to one tile's size, its statistics over every tile's core too
            norms.measure, norms.boxes = "proxy", [(y0 / H, y1 / H, x0 / W, x1 / W) for y0, y1, x0, x1 in cores]
            fn(_pool(x, tile))
            # the tiles most like the whole image, at full resolution, correct what pooling changed: each forward
            # one self-consistent estimate, their mean the statistics
            norms.measure, estimates = "sample", []
            for picks in norms.most_typical(max(1, min(8, len(tiles) // 4))):  # per image of the batch
                norms.stats, norms.sample, norms.box = {}, picks, [box(i) for i in picks]
                fn(torch.cat([crop(i, slice(b, b + 1)) for b, i in enumerate(picks)]))
                estimates.append(norms.stats)
            norms.stats = {
                m: tuple(torch.stack(s).mean(0) for s in zip(*(e[m] for e in estimates))) for m in norms.stats
            }
        norms.measure = "none"
        out = weight = None
        for top, left in tiles:
            y = fn(x[:, :, top : top + tile, left : left + tile])  # (B, C_out, th * num / den, tw * num / den)
            if out is None:  # blended in fp32 whatever the tiles' precision
                out = y.new_zeros(*y.shape[:2], H * num // den, W * num // den, dtype=torch.float32)
                weight = y.new_zeros(1, 1, *out.shape[2:], dtype=torch.float32)
            th, tw = y.shape[2:]
            wy = _ramp(th, ramp, top > 0, top + tile < H, y.device, y.dtype)
            wx = _ramp(tw, ramp, left > 0, left + tile < W, y.device, y.dtype)
            w = wy[:, None] * wx[None, :]  # (th, tw)
            oy, ox = top * num // den, left * num // den
            out[:, :, oy : oy + th, ox : ox + tw] += y * w
            weight[:, :, oy : oy + th, ox : ox + tw] += w
    return (out / weight).to(y.dtype)


def _check(name: str, tile: int, overlap: int, factor: int, norm: str) -> None:
    if tile <= 0 or tile % factor:
        raise ValueError(f"{name}: tile {tile} must be a positive multiple of the downsampling factor {factor}")
    if overlap < 0 or overlap >= tile or overlap % factor:
        raise ValueError(f"{name}: overlap {overlap} must be a multiple of {factor} in [0, tile={tile})")
    if norm not in NORMS:
        raise ValueError(f"{name}: norm must be one of {NORMS}, got {norm!r}")


@torch.no_grad()
def encode_tiled(
    model: Autoencoder,
    x: torch.Tensor,
    tile: int = 256,
    overlap: int | None = None,
    norm: str = "exact",
) -> DiagonalGaussian | Latents:
    """`model.encode(x)` tile by tile: x (B, C, H, W), H and W multiples of the factor; tile, overlap in pixels.

    overlap defaults to tile // 2 (on a multiple of the factor); norm: "exact" (default), "estimate" or "tile",
    see the module docstring.
    """
    f = model.config.downsample_factor
    overlap = tile // 2 // f * f if overlap is None else overlap
    _check("encode_tiled", tile, overlap, f, norm)
    if x.shape[2] % f or x.shape[3] % f:
        raise ValueError(f"encode_tiled: image size {tuple(x.shape[2:])} is not a multiple of the factor {f}")
    enc = model.encoder
    tiled_levels = enc.down_blocks[:-1]  # each ends in a downsampler; the last level is at the latent resolution

    def down(t: torch.Tensor) -> torch.Tensor:
        h = enc.conv_in(t)
        for block in tiled_levels:
            h = block(h)
        return h  # (B, C, th/f, tw/f)

    h = _tiled(down, tiled_levels, x, tile, overlap, (1, f), f, norm)  # (B, C, H/f, W/f)
    h = enc.mid_block(enc.down_blocks[-1](h))
    h = enc.conv_out(F.silu(enc.conv_norm_out(h)))
    if model.quant_conv is not None:
        h = model.quant_conv(h)
    return DiagonalGaussian(h) if model.config.bottleneck == "kl" else Latents(h)


@torch.no_grad()
def decode_tiled(
    model: Autoencoder,
    z: torch.Tensor,
    tile: int = 256,
    overlap: int | None = None,
    norm: str = "exact",
) -> torch.Tensor:
    """`model.decode(z)` tile by tile; tile and overlap in output pixels (multiples of the factor).

    overlap defaults to tile // 2; norm as in `encode_tiled`. Returns images (B, out_channels, h*f, w*f).
    """
    f = model.config.downsample_factor
    overlap = tile // 2 // f * f if overlap is None else overlap
    _check("decode_tiled", tile, overlap, f, norm)
    dec = model.decoder
    if model.post_quant_conv is not None:
        z = model.post_quant_conv(z)
    first = dec.up_blocks[0]  # the lowest level, at the latent resolution: whole, up to its upsampler
    h = dec.mid_block(dec.conv_in(z))  # (B, C_last, h, w): latent-sized, whole
    for i, resnet in enumerate(first.resnets):
        h = resnet(h)
        if first.attentions is not None:
            h = first.attentions[i](h)
    upsample = first.upsamplers[0] if first.resample == "up" else nn.Identity()

    def up(t: torch.Tensor) -> torch.Tensor:
        t = upsample(t)
        for block in dec.up_blocks[1:]:
            t = block(t)
        return dec.conv_out(F.silu(dec.conv_norm_out(t)))

    tiled = nn.ModuleList([dec.up_blocks[1:], dec.conv_norm_out])
    return _tiled(up, tiled, h, tile // f, overlap // f, (f, 1), 1, norm)
