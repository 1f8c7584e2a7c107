"""HunyuanVideo's and HunyuanVideo 1.5's autoencoders (diffusers `AutoencoderKLHunyuanVideo`, f8 t4, 16 channels;
`AutoencoderKLHunyuanVideo15`, f16 t4, 32 channels): causal 3-D VAEs for clips (B, C, 1 + 4k, H, W); an image is a
one-frame clip. Their pipelines scale the latents by `scaling_factor` alone (`HunyuanVideoPipeline` and
`HunyuanVideo15Pipeline`: `latents / vae.config.scaling_factor` before decoding; the image-to-video pipelines
multiply the image's latents by it).

HunyuanVideo's class starts with framewise encoding and decoding on (windows of 16 frames blended over 4); the
adapter turns them off at load, so that a clip goes through in one pass (what a training step differentiates), and
`tiling()` turns them back on with the class's spatial tiles: what its pipeline runs, memory-bounded, and blended in
time and space (close to the whole pass, not equal). HunyuanVideo 1.5's class has spatial tiles only (blended), and
its causal attention mask does not broadcast over a batch of more than one clip (diffusers 0.42): the adapter turns
on the class's slicing, which encodes and decodes each clip alone (exact: clips are independent).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..model import DiagonalGaussian
from .base import DiffusersAdapter, ModuleRatios, ScaledLatents, load_module


class HunyuanVideo(ModuleRatios, ScaledLatents, DiffusersAdapter):
    is_video = True

    @property
    def family(self) -> str:
        return "hunyuan-video-1.5" if self.class_name == "AutoencoderKLHunyuanVideo15" else "hunyuan-video"

    def head(self) -> tuple:
        decoder = self.module.decoder
        return getattr(decoder, "conv_norm_out", None) or decoder.norm_out, decoder.conv_out  # 1.5: norm_out

    def tiling(self, on: bool = True, tile: int | None = None) -> None:
        """The class's spatial tiles (`tile` pixels overlapping by a quarter; None: its own 256) and time windows."""
        if on and tile is not None and self.class_name == "AutoencoderKLHunyuanVideo15":
            f = self.spatial_factor  # its strides come from a share of the tile in pixels and in latents: whole numbers
            if tile % (4 * f):
                raise ValueError(f"{self.class_name} overlaps its tiles by a quarter: a tile must be a multiple of "
                                 f"{4 * f} px, got {tile}")  # fmt: skip
            self.module.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile, tile_overlap_factor=0.25,
                                      tile_latent_min_height=tile // f, tile_latent_min_width=tile // f)  # fmt: skip
        elif on and tile is not None:
            super().tiling(on, tile)
        for switch in ("use_tiling", "use_framewise_encoding", "use_framewise_decoding"):  # 1.5: spatial tiles only
            if hasattr(self.module, switch):
                setattr(self.module, switch, on)

    def _encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.module.encode(x).latent_dist.parameters)  # over (B, C', t, h, w)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.module.decode(z).sample  # (B, C, T, H, W)


def load(folder: Path, class_name: str) -> HunyuanVideo:
    from diffusers import AutoencoderKLHunyuanVideo, AutoencoderKLHunyuanVideo15

    cls = AutoencoderKLHunyuanVideo15 if class_name == "AutoencoderKLHunyuanVideo15" else AutoencoderKLHunyuanVideo
    adapter = HunyuanVideo(load_module(cls, folder), class_name)
    adapter.tiling(False)
    adapter.module.use_slicing = class_name == "AutoencoderKLHunyuanVideo15"  # one clip at a time: see above
    return adapter
