"""FLUX.2's autoencoder (diffusers `AutoencoderKLFlux2`): SD's encoder and decoder, 32 latent channels, and a
`BatchNorm2d(128, affine=False)` whose running statistics normalize the 2x2-patchified latents.

The module's forward never runs the BatchNorm; the pipeline (diffusers `Flux2Pipeline._encode_vae_image` and
its decoding) patchifies the posterior mean to (B, 4C, h/2, w/2) and applies (p - running_mean) /
sqrt(running_var + batch_norm_eps). `normalize` / `denormalize` do exactly that. `build` makes a new random model
for training from scratch: the statistics are then measured at export, never trained.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from ..model import DiagonalGaussian
from .base import (
    ChannelConvs,
    ChannelMoments,
    DiffusersAdapter,
    fold_frames,
    load_module,
    new_module,
    parameters,
    with_channels,
)


class Flux2(DiffusersAdapter):
    family = "flux2"

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    @property
    def patch(self) -> tuple[int, int]:
        ph, pw = self.config["patch_size"]
        return int(ph), int(pw)

    @property
    def image_multiple(self) -> int:
        # the latents are patchified, so their sides must be multiples of the patch too
        return self.spatial_factor * max(self.patch)

    @property
    def fp16_safe(self) -> bool | None:
        return None  # the config has no force_upcast; FLUX.2's pipelines run the VAE in bf16

    def tiling(self, on: bool = True, tile: int | None = None) -> None:
        """The class's tiles; its `enable_tiling` takes no sizes: `tile` is set as its `__init__` sets them."""
        super().tiling(on)
        if on and tile is not None:
            self.module.tile_sample_min_size, self.module.tile_latent_min_size = tile, tile // self.spatial_factor

    def _encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.module.encode(x).latent_dist.parameters)  # over (B, C, H/f, W/f)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.module.decode(z).sample

    def patchify(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C*ph*pw, h/ph, w/pw), as `Flux2Pipeline._patchify_latents`."""
        (ph, pw), (B, C, h, w) = self.patch, z.shape
        z = z.view(B, C, h // ph, ph, w // pw, pw).permute(0, 1, 3, 5, 2, 4)
        return z.reshape(B, C * ph * pw, h // ph, w // pw)

    def unpatchify(self, p: torch.Tensor) -> torch.Tensor:
        """The inverse of `patchify`, as `Flux2Pipeline._unpatchify_latents`."""
        (ph, pw), (B, C, h, w) = self.patch, p.shape
        p = p.reshape(B, C // (ph * pw), ph, pw, h, w).permute(0, 1, 4, 2, 5, 3)
        return p.reshape(B, C // (ph * pw), h * ph, w * pw)

    def _statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.module.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.config["batch_norm_eps"]).to(like.device, like.dtype)
        return mean, std

    def _normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, C, h, w) -> what the FLUX.2 transformer sees, (B, 4C, h/2, w/2)."""
        p = self.patchify(z)
        mean, std = self._statistics(p)
        return (p - mean) / std

    def _denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._statistics(latents)
        return self.unpatchify(latents * std + mean)

    def measure_normalization(self, batches: Iterable[torch.Tensor]) -> dict:
        """The BatchNorm's running statistics: per-channel mean and variance of the patchified latents."""
        moments = ChannelMoments(self.patchify(fold_frames(z) if z.dim() == 5 else z) for z in batches)
        return {"running_mean": moments.mean.tolist(), "running_var": moments.std.square().tolist()}

    def set_normalization(self, updates: dict) -> None:
        bn = self.module.bn
        with torch.no_grad():
            bn.running_mean.copy_(torch.tensor(updates["running_mean"], dtype=bn.running_mean.dtype))
            bn.running_var.copy_(torch.tensor(updates["running_var"], dtype=bn.running_var.dtype))

    def normalization(self) -> dict:
        bn = self.module.bn
        return {"convention": "patchify 2x2, then (p - bn.running_mean) / sqrt(bn.running_var + batch_norm_eps)",
                "running_mean": bn.running_mean.tolist(), "running_var": bn.running_var.tolist(),
                "batch_norm_eps": self.config["batch_norm_eps"]}  # fmt: skip

    def head(self) -> tuple:
        return self.module.decoder.conv_norm_out, self.module.decoder.conv_out

    def channel_convs(self) -> ChannelConvs:
        return ChannelConvs(self.module.encoder.conv_in, self.module.decoder.conv_out)

    def param_groups(self) -> dict[str, list[torch.Tensor]]:
        """The usual groups; the projections at the latent (the encoder's conv_out with quant_conv, post_quant_conv
        with the decoder's conv_in); the BatchNorm's statistics as normalization."""
        m = self.module
        return super().param_groups() | {
            "encoder_out": parameters(m.encoder.conv_out, m.quant_conv),
            "decoder_in": parameters(m.post_quant_conv, m.decoder.conv_in),
            "normalization": [m.bn.running_mean, m.bn.running_var],
        }

    def freeze(self, trainable: Iterable[str]) -> None:
        super().freeze(trainable)
        # the statistics define the latent space the transformer was trained on: a BatchNorm forward in train()
        # mode must not move them (momentum 0 keeps running_mean / running_var exactly)
        self.module.bn.momentum = 0.0
        self.module.bn.eval()


def load(folder: Path, class_name: str) -> Flux2:
    from diffusers import AutoencoderKLFlux2

    return Flux2(load_module(AutoencoderKLFlux2, folder), class_name)


def build(arch: dict, channels: int = 3) -> Flux2:
    """A new, randomly initialised `AutoencoderKLFlux2(**arch)` for images of `channels` channels (training mode);
    ValueError for arguments it rejects."""
    from diffusers import AutoencoderKLFlux2

    arch = with_channels(AutoencoderKLFlux2, arch, {"in_channels": channels, "out_channels": channels})
    return Flux2(new_module(AutoencoderKLFlux2, arch), "AutoencoderKLFlux2")
