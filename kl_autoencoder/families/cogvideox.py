"""CogVideoX's autoencoder (diffusers `AutoencoderKLCogVideoX`): a causal 3-D VAE, f8 t4, 16 channels.

The class always runs in time chunks with a convolution cache: it encodes 8 frames at a time (the first chunk
taking the odd ones) and decodes 2 latent frames at a time, the first chunk 3 where the count is odd; a first frame
is told apart only by an odd length. So a clip round-trips only at 1 + 8k frames (an odd number of latent frames,
t = 1 + 2k: CogVideoX's 49 frames are 13): `check_frames` asks for those, and `decode` refuses an even number of
latent frames (which the class would decode to 4t frames, not 1 + 4(t - 1)).

Normalization as its pipelines (`CogVideoXPipeline.decode_latents`: `latents / vae.config.scaling_factor`; the
video-to-video pipeline `scaling_factor * init_latents`): z * scaling_factor, no shift; the config's
`shift_factor`, `latents_mean` and `latents_std` are read by no pipeline, so neither here. `invert_scale_latents`
(CogVideoX 1.5) changes only how the image-to-video pipeline scales its conditioning image (dividing instead of
multiplying), not the latent space the transformer denoises: it is not applied here.

`tiling()` turns on the class's spatial tiles (blended: close to the whole pass, not equal). The time chunks are
always on, as its pipelines run them, and are not a whole pass in disguise: its GroupNorms see one chunk's frames,
so another chunk size gives other latents (measured on a random model: 0.12 at most, latents of about 1).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..model import DiagonalGaussian
from .base import DiffusersAdapter, ScaledLatents, load_module


class CogVideoX(ScaledLatents, DiffusersAdapter):
    family = "cogvideox"
    is_video = True

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    @property
    def temporal_factor(self) -> int:
        return int(self.config["temporal_compression_ratio"])

    @property
    def frame_step(self) -> int:
        # latent frames decode in pairs after an odd first chunk (num_latent_frames_batch_size 2)
        return 2 * self.temporal_factor

    def tiling(self, on: bool = True, tile: int | None = None) -> None:
        """The class's spatial tiles: `tile` pixels overlapping by a quarter (None: its own sizes and shares)."""
        if not on or tile is None:
            self.module.enable_tiling() if on else self.module.disable_tiling()
            return
        f = self.spatial_factor  # its strides come from a share of the tile in pixels and in latents: whole numbers
        if tile % (4 * f):
            raise ValueError(f"{self.class_name} overlaps its tiles by a quarter: a tile must be a multiple of {4 * f} "
                             f"px, got {tile}")  # fmt: skip
        self.module.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
                                  tile_overlap_factor_height=0.25, tile_overlap_factor_width=0.25)  # fmt: skip

    def _encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.module.encode(x).latent_dist.parameters)  # over (B, C', t, h, w)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        t = z.shape[2]
        if t % 2 == 0:
            raise ValueError(f"AutoencoderKLCogVideoX decodes an odd number of latent frames (1, 3, 5, ...), got {t}")
        return self.module.decode(z).sample  # (B, C, T, H, W)


def load(folder: Path, class_name: str) -> CogVideoX:
    from diffusers import AutoencoderKLCogVideoX

    return CogVideoX(load_module(AutoencoderKLCogVideoX, folder), class_name)
