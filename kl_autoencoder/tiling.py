"""Tiled encode and decode for images larger than memory allows: overlapping tiles blended with a linear ramp.

Only the full-resolution part of the network is tiled: the encoder's `conv_in` + `down_blocks`, the decoder's
`up_blocks` + output layers. The mid block (with its self-attention) runs on the whole lowest-resolution
feature map, which is latent-sized, so attention there is exact. One tile goes through the tiled part at a
time, so peak activation memory is set by the tile; only latent-sized features and the 3-channel image are
held at full size.

Two things make tiles disagree with an untiled pass, and how each is handled:
- convolutions see zero padding at tile borders: tiles overlap and are cross-faded with a linear ramp
  (feathering, as diffusers' `enable_tiling`), so each output pixel comes mostly from tiles that see it well
  inside;
- every GroupNorm would normalise with that tile's own statistics, which on a real image differ from the
  whole image's (20-30 dB PSNR against untiled on the tiny test models, whatever the overlap). So with
  `global_norm` (the default) the statistics are measured over the whole image first: one pass over all
  tiles per GroupNorm, each stopping at the GroupNorm it measures, accumulates that GroupNorm's input sums
  over each tile's own share of the image (its "core"; the cores partition the image), with every earlier
  GroupNorm already using its whole-image statistics. The output pass then normalises every tile alike.
  Costs about (number of GroupNorms) / 2 extra tiled passes; gives >= 40 dB PSNR against untiled on the
  tiny test models at tile 64 / overlap 32 (tests/test_tiling.py); what remains is the zero padding at
  tile borders leaking into the cores.
Attention at levels other than the lowest (`attn_levels`) stays per-tile, an approximation.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .model import Autoencoder, DiagonalGaussian
from .quantize import Latents


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
    """Ends a statistics pass once the GroupNorm it measures has been reached."""


class _GlobalGroupNorm:
    """Replaces the forward of the GroupNorms in `modules` so that they use whole-image statistics.

    In a statistics pass, the first GroupNorm reached that has no statistics yet accumulates its input's sums
    over the tile's core and stops the tile's forward; all GroupNorms before it use their measured statistics.
    """

    def __init__(self, modules: list[nn.GroupNorm]):
        self.modules = modules
        self.stats: dict[nn.GroupNorm, tuple[torch.Tensor, torch.Tensor]] = {}  # (B, G) mean, var
        self.sums: torch.Tensor | None = None  # (3, B, G) float64: count, sum, sum of squares
        self.target: nn.GroupNorm | None = None
        self.collect = False
        self.core = (0, 1, 0, 1)  # the current tile's core, in tile-input units
        self.size = (1, 1)  # the current tile's input size

    def finish_pass(self) -> bool:
        """Store the measured statistics; False when no GroupNorm was left to measure."""
        if self.target is None:
            return False
        n, s, s2 = self.sums
        mean = s / n
        self.stats[self.target] = (mean, (s2 / n - mean.square()).clamp_min(0))
        self.sums = self.target = None
        return True

    def _forward(self, m: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        B, C, G = x.shape[0], x.shape[1], m.num_groups
        if m not in self.stats:
            if not self.collect:
                return F.group_norm(x, G, m.weight, m.bias, m.eps)
            region = x
            if x.dim() == 4:  # attention norms see (B, C, HW): their whole tile is counted
                (y0, y1, x0, x1), (h, w) = self.core, self.size
                H, W = x.shape[2:]
                region = x[:, :, y0 * H // h : y1 * H // h, x0 * W // w : x1 * W // w]
            r = region.double().reshape(B, G, -1)
            add = torch.stack([torch.full_like(r[..., 0], r.shape[-1]), r.sum(-1), r.square().sum(-1)])
            self.sums = add if self.sums is None else self.sums + add
            self.target = m
            raise _Stop
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


def _tiled(
    fn,
    modules: nn.Module,
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale: tuple[int, int],
    align: int,
    global_norm: bool,
) -> torch.Tensor:
    """Apply `fn` to overlapping tiles of x (B, C, H, W), GroupNorms in `modules` with whole-image statistics.

    The output is scale[0] / scale[1] times the input's size; cores are cut on multiples of `align`.
    """
    H, W = x.shape[2:]
    num, den = scale
    rows, cols = _starts(H, tile, tile - overlap), _starts(W, tile, tile - overlap)
    row_cores, col_cores = _cores(rows, tile, H, align), _cores(cols, tile, W, align)
    norms = _GlobalGroupNorm([m for m in modules.modules() if isinstance(m, nn.GroupNorm)])
    ramp = overlap * num // den
    with norms.installed():
        # one statistics pass per GroupNorm (each stops at the GroupNorm it measures), then the output pass
        norms.collect = global_norm
        while norms.collect:
            for top, core_y in zip(rows, row_cores):
                for left, core_x in zip(cols, col_cores):
                    t = x[:, :, top : top + tile, left : left + tile]
                    norms.core, norms.size = (*core_y, *core_x), tuple(t.shape[2:])
                    try:
                        fn(t)
                    except _Stop:
                        pass
            norms.collect = norms.finish_pass()
        out = weight = None
        for top in rows:
            for left in cols:
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


def _check(name: str, tile: int, overlap: int, factor: int) -> None:
    if tile <= 0 or tile % factor:
        raise ValueError(f"{name}: tile {tile} must be a positive multiple of the downsampling factor {factor}")
    if overlap < 0 or overlap >= tile or overlap % factor:
        raise ValueError(f"{name}: overlap {overlap} must be a multiple of {factor} in [0, tile={tile})")


@torch.no_grad()
def encode_tiled(
    model: Autoencoder, x: torch.Tensor, tile: int = 256, overlap: int | None = None, global_norm: bool = True
) -> DiagonalGaussian | Latents:
    """`model.encode(x)` tile by tile: x (B, C, H, W), H and W multiples of the factor; tile, overlap in pixels.

    overlap defaults to tile // 2 (on a multiple of the factor); global_norm: see the module docstring
    (False = per-tile GroupNorm statistics, one pass, visibly different tiles).
    """
    f = model.config.downsample_factor
    overlap = tile // 2 // f * f if overlap is None else overlap
    _check("encode_tiled", tile, overlap, f)
    if x.shape[2] % f or x.shape[3] % f:
        raise ValueError(f"encode_tiled: image size {tuple(x.shape[2:])} is not a multiple of the factor {f}")
    enc = model.encoder

    def down(t: torch.Tensor) -> torch.Tensor:
        h = enc.conv_in(t)
        for block in enc.down_blocks:
            h = block(h)
        return h  # (B, C_last, th/f, tw/f)

    h = _tiled(down, enc.down_blocks, x, tile, overlap, (1, f), f, global_norm)  # (B, C_last, H/f, W/f)
    h = enc.conv_out(F.silu(enc.conv_norm_out(enc.mid_block(h))))
    if model.quant_conv is not None:
        h = model.quant_conv(h)
    return DiagonalGaussian(h) if model.config.bottleneck == "kl" else Latents(h)


@torch.no_grad()
def decode_tiled(
    model: Autoencoder, z: torch.Tensor, tile: int = 256, overlap: int | None = None, global_norm: bool = True
) -> torch.Tensor:
    """`model.decode(z)` tile by tile; tile and overlap in output pixels (multiples of the factor).

    overlap defaults to tile // 2. Returns images (B, out_channels, h*f, w*f).
    """
    f = model.config.downsample_factor
    overlap = tile // 2 // f * f if overlap is None else overlap
    _check("decode_tiled", tile, overlap, f)
    dec = model.decoder
    if model.post_quant_conv is not None:
        z = model.post_quant_conv(z)
    h = dec.mid_block(dec.conv_in(z))  # (B, C_last, h, w): latent-sized, whole

    def up(t: torch.Tensor) -> torch.Tensor:
        for block in dec.up_blocks:
            t = block(t)
        return dec.conv_out(F.silu(dec.conv_norm_out(t)))

    tiled = nn.ModuleList([dec.up_blocks, dec.conv_norm_out])
    return _tiled(up, tiled, h, tile // f, overlap // f, (f, 1), 1, global_norm)
