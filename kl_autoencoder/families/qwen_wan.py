"""Qwen-Image's and Wan's autoencoders (diffusers `AutoencoderKLQwenImage`, `AutoencoderKLWan`): causal 3-D
convolutional VAEs for video, of which an image is a single frame.

Our images are (B, 3, H, W) and our latents (B, C, h, w): the adapter adds the frame axis, (B, C, 1, H, W),
on the way in and removes it on the way out. Both pipelines (diffusers `QwenImagePipeline`, `WanPipeline`)
normalize per channel with the config's `latents_mean` / `latents_std`, multiplying by the reciprocal of the
std: `normalize` / `denormalize` do the same arithmetic, so they round the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from ..model import DiagonalGaussian
from .base import ChannelMoments, DiffusersAdapter, load_module


class QwenWan(DiffusersAdapter):
    @property
    def family(self) -> str:
        return "wan" if self.class_name == "AutoencoderKLWan" else "qwen-image"

    @property
    def latent_channels(self) -> int:
        return int(self.config["z_dim"])

    @property
    def spatial_factor(self) -> int:
        # one stride-2 level per entry of temperal_downsample; Wan 2.2 also folds patch_size x patch_size pixels
        patch = self.config.get("patch_size") or 1
        return 2 ** len(self.config["temperal_downsample"]) * int(patch)

    @property
    def sample_size(self) -> int | None:
        return None  # not in these configs: any multiple of the spatial factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        moments = self.module.encode(x[:, :, None]).latent_dist.parameters  # (B, 2C, 1, h, w)
        return DiagonalGaussian(moments[:, :, 0])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.module.decode(z[:, :, None]).sample[:, :, 0]  # (B, 3, H, W), clamped to [-1, 1] by diffusers

    def _statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents_mean, 1 / latents_std), each (1, C, 1, 1), as the pipelines build them."""
        C = self.latent_channels
        mean = torch.tensor(self.config["latents_mean"]).view(1, C, 1, 1).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(self.config["latents_std"]).view(1, C, 1, 1).to(like.device, like.dtype)
        return mean, inv_std

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self._statistics(z)
        return (z - mean) * inv_std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self._statistics(latents)
        return latents / inv_std + mean

    def measure_normalization(self, batches: Iterable[torch.Tensor]) -> dict:
        moments = ChannelMoments(batches)
        return {"latents_mean": moments.mean.tolist(), "latents_std": moments.std.tolist()}

    def normalization(self) -> dict:
        c = self.config
        return {"convention": "(z - latents_mean) / latents_std, per channel",
                "latents_mean": list(c["latents_mean"]), "latents_std": list(c["latents_std"])}  # fmt: skip


def load(folder: Path, class_name: str) -> QwenWan:
    from diffusers import AutoencoderKLQwenImage, AutoencoderKLWan

    cls = AutoencoderKLWan if class_name == "AutoencoderKLWan" else AutoencoderKLQwenImage
    return QwenWan(load_module(cls, folder), class_name)
