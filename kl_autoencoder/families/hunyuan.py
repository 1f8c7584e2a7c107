"""HunyuanImage 2.1's autoencoder (diffusers `AutoencoderKLHunyuanImage`): f32, 64 latent channels, DC-AE-style
residual shortcuts, a Gaussian posterior. Its pipeline scales the latents by `scaling_factor` alone (no shift).
`tiling` switches the class's tiled decode; the encode runs whole (the class's tiled encode takes video tensors).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..model import DiagonalGaussian
from .base import ChannelConvs, DiffusersAdapter, ScaledLatents, load_module


class Hunyuan(ScaledLatents, DiffusersAdapter):
    family = "hunyuan-image"

    @property
    def spatial_factor(self) -> int:
        return int(self.config["spatial_compression_ratio"])

    def tiling(self, on: bool = True, tile: int | None = None) -> None:
        """The class's tiled decode, `tile` pixels (its own overlap share; None: its own size)."""
        if on and tile is not None:
            self.module.enable_tiling(tile_sample_min_size=tile)
        self.module.use_tiling = on

    def _encode(self, x: torch.Tensor) -> DiagonalGaussian:
        # the class's tiled encode takes 5-D video tensors only: its tiling is for the decode, the encode runs whole
        tiled, self.module.use_tiling = self.module.use_tiling, False
        try:
            return DiagonalGaussian(self.module.encode(x).latent_dist.parameters)  # over (B, C, H/f, W/f)
        finally:
            self.module.use_tiling = tiled

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.module.decode(z).sample

    def channel_convs(self) -> ChannelConvs:
        return ChannelConvs(self.module.encoder.conv_in, self.module.decoder.conv_out)


def load(folder: Path, class_name: str) -> Hunyuan:
    from diffusers import AutoencoderKLHunyuanImage

    return Hunyuan(load_module(AutoencoderKLHunyuanImage, folder), class_name)
