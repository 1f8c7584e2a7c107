"""Wan's and Qwen-Image's autoencoders (diffusers `AutoencoderKLWan`, `AutoencoderKLQwenImage`): causal 3-D
convolutional VAEs, f8 t4, for clips (B, C, 1 + 4k, H, W), of which an image is a single frame.

Both classes take clips natively (`is_video`): the first frame is encoded alone, then every 4 frames make one latent
frame, each chunk through the causal feature cache (`_encode` / `_decode` of the class), so a long clip costs the
memory of one chunk and comes out exactly as a whole pass would. Qwen-Image's pipeline only ever feeds one frame,
but its class is Wan's architecture and takes clips alike, so it counts as a video model here too. An image
(B, C, H, W) goes through as the clip (B, C, 1, H, W) and its latents back to (B, C', h, w).

The class refuses gradient checkpointing: its cache is a list its layers overwrite, so a recompute in backward
would start from the wrong state. `gradient_checkpointing` here runs the same chunks, each a checkpointed function
from the cache it is given to the cache it leaves: training keeps the chunks' boundaries, and a recompute sees the
state the forward saw.

Both pipelines (diffusers `QwenImagePipeline`, `WanPipeline`) normalize per channel with the config's
`latents_mean` / `latents_std`, multiplying by the reciprocal of the std: `normalize` / `denormalize` do the same
arithmetic, so they round the same way. `build` makes a new random `AutoencoderKLWan` for training from scratch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model import DiagonalGaussian
from .base import ChannelConvs, ChannelMoments, DiffusersAdapter, load_module, new_module, with_channels


def _chunk(net: nn.Module, x: torch.Tensor, cache: list, **kwargs) -> tuple[torch.Tensor, list]:
    """One chunk through the class's encoder or decoder: the cache it reads in, a new cache out (the list it is given
    stays as it was, so a recompute in backward starts from the same state)."""
    cache = list(cache)
    return net(x, feat_cache=cache, feat_idx=[0], **kwargs), cache


def checkpointed_encode(vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`AutoencoderKLWan._encode` (the first frame alone, then chunks of 4, a shorter last chunk dropped) with each
    chunk checkpointed; the same moments (B, 2C', t, h, w)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

    if vae.config.patch_size is not None:
        x = patchify(x, patch_size=vae.config.patch_size)
    cache, out = [None] * vae._cached_conv_counts["encoder"], []
    for i in range(1 + (x.shape[2] - 1) // 4):
        frames = x[:, :, :1] if i == 0 else x[:, :, 1 + 4 * (i - 1) : 1 + 4 * i]
        h, cache = checkpoint(_chunk, vae.encoder, frames, cache, use_reentrant=False)
        out.append(h)
    return vae.quant_conv(torch.cat(out, 2))


def checkpointed_decode(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """`AutoencoderKLWan._decode` (one latent frame a chunk) with each chunk checkpointed; the same clip."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    x = vae.post_quant_conv(z)
    cache, out = [None] * vae._cached_conv_counts["decoder"], []
    for i in range(x.shape[2]):
        y, cache = checkpoint(_chunk, vae.decoder, x[:, :, i : i + 1], cache, first_chunk=i == 0, use_reentrant=False)
        out.append(y)
    out = torch.cat(out, 2)
    if vae.config.patch_size is not None:
        out = unpatchify(out, patch_size=vae.config.patch_size)
    return out.clamp(-1.0, 1.0)


class QwenWan(DiffusersAdapter):
    is_video = True
    checkpointing = False  # gradient checkpointing per causal chunk (`gradient_checkpointing`)

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
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.config["temperal_downsample"])  # the levels that also halve time

    @property
    def frame_step(self) -> int:
        # the class encodes the first frame, then chunks of 4 frames (a literal 4 in its `_encode`), and drops the
        # frames a last, shorter chunk would hold
        return math.lcm(4, self.temporal_factor)

    @property
    def sample_size(self) -> int | None:
        return None  # not in these configs: any multiple of the spatial factor

    @property
    def channel_keys(self) -> tuple[str, ...]:
        # Qwen-Image's class has one argument for both ends (Qwen-Image-Layered's RGBA VAE: input_channels=4)
        return ("in_channels", "out_channels") if self.class_name == "AutoencoderKLWan" else ("input_channels",)

    @property
    def channel_factor(self) -> int:
        # Wan 2.2 patchifies p x p pixels into channels before its first conv (channel-major), and its config counts
        # those: in_channels 12 for RGB at patch_size 2
        return (self.config.get("patch_size") or 1) ** 2

    def channel_convs(self) -> ChannelConvs:
        g = self.channel_factor
        return ChannelConvs(self.module.encoder.conv_in, self.module.decoder.conv_out, g, g)

    def tiling(self, on: bool = True, tile: int | None = None) -> None:
        """The class's spatial tiles, `tile` pixels (default 256) overlapping by a quarter, blended where frames exceed
        a tile: close to the whole pass, not equal. Zero padding at tile borders reaches every position a tile's
        receptive field spans: a tiny random Wan (f4) on 64 px frames in 32 px tiles differs from the whole pass by
        at most 0.5 in the latents (std 0.15-0.25) and 0.45 in the frames in [-1, 1] (three random inits measured:
        up to 0.45 and 0.42; tests/test_video_streams_eval.py), a trained model by what its own weights make of it.
        In time the causal cache is always on, and exact."""
        super().tiling(on, tile)

    def gradient_checkpointing(self, on: bool = True) -> None:
        """Recompute each causal chunk's activations in backward (training only: a pass without gradients, or one
        through the spatial tiles, is the class's own). Wan's class only: Qwen-Image's chunks its decoder otherwise
        (no `first_chunk`, no patches), and its pipeline feeds single frames."""
        if on and self.class_name != "AutoencoderKLWan":
            raise ValueError(f"{self.class_name}: gradient checkpointing per causal chunk is for AutoencoderKLWan")
        self.checkpointing = on

    def _checkpointed(self) -> bool:
        return self.checkpointing and torch.is_grad_enabled() and not self.module.use_tiling

    def _encode(self, x: torch.Tensor) -> DiagonalGaussian:
        if self._checkpointed():
            return DiagonalGaussian(checkpointed_encode(self.module, x))
        return DiagonalGaussian(self.module.encode(x).latent_dist.parameters)  # over (B, C', t, h, w)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self._checkpointed():
            return checkpointed_decode(self.module, z)
        return self.module.decode(z).sample  # (B, C, T, H, W), clamped to [-1, 1] by diffusers

    def _statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents_mean, 1 / latents_std), each (1, C, 1, 1, 1), as the pipelines build them."""
        C = self.latent_channels
        mean = torch.tensor(self.config["latents_mean"]).view(1, C, 1, 1, 1).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(self.config["latents_std"]).view(1, C, 1, 1, 1).to(like.device, like.dtype)
        return mean, inv_std

    def _normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self._statistics(z)
        return (z - mean) * inv_std

    def _denormalize(self, latents: torch.Tensor) -> torch.Tensor:
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


def build(arch: dict, channels: int = 3) -> QwenWan:
    """A new, randomly initialised `AutoencoderKLWan(**arch)` for images of `channels` channels (training mode);
    ValueError for arguments it rejects."""
    from diffusers import AutoencoderKLWan

    patch = arch.get("patch_size") or 1
    per_channel = patch**2  # see QwenWan.channel_factor
    arch = with_channels(AutoencoderKLWan, arch, {"in_channels": channels * per_channel,
                                                  "out_channels": channels * per_channel})  # fmt: skip
    # WanPipeline sizes its latents from these config keys, not from the architecture: keep them true to it
    levels = arch.get("dim_mult", [1, 2, 4, 4])
    downsample = arch.get("temperal_downsample", [False, True, True])
    arch.setdefault("scale_factor_spatial", 2 ** (len(levels) - 1) * patch)
    arch.setdefault("scale_factor_temporal", 2 ** sum(map(bool, downsample)))
    return QwenWan(new_module(AutoencoderKLWan, arch), "AutoencoderKLWan")
