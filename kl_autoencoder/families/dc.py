"""DC-AE (diffusers `AutoencoderDC`; SANA): a deterministic deep-compression autoencoder (f32c32 and others).

The latent is a point, not a distribution: `encode` returns a `PointPosterior` (sample() == mode(), kl() == 0).
SANA's pipelines scale the latents by `scaling_factor` alone, which its config describes as the inverse of
the latents' root mean square; `measure_normalization` measures it that way. `build` makes a new random model of
any `AutoencoderDC` configuration for training from scratch; besides the usual groups, `encoder_out` (the encoder's
output projection) and `decoder_in` (the decoder's input projection) are what DC-AE's second phase trains.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import (
    ChannelConvs,
    DiffusersAdapter,
    PointPosterior,
    ScaledLatents,
    load_module,
    new_module,
    parameters,
    with_channels,
)


class DC(ScaledLatents, DiffusersAdapter):
    family = "dc-ae"
    channel_keys = ("in_channels",)  # the decoder's output channels too

    @property
    def spatial_factor(self) -> int:
        return int(self.module.spatial_compression_ratio)

    @property
    def fp16_safe(self) -> bool | None:
        return None  # no force_upcast in the config

    def _encode(self, x: torch.Tensor) -> PointPosterior:
        return PointPosterior(self.module.encode(x).latent)  # (B, C, H/f, W/f)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.module.decode(z).sample

    def channel_convs(self) -> ChannelConvs:
        """The first and last convs, inside the up / down blocks a level without resnets uses: the down block's conv
        reads the image before its pixel unshuffle; the up block's pixel shuffle makes 4 conv channels one image
        channel (its interpolate variant convolves after upsampling: 1)."""
        first, last = self.module.encoder.conv_in, self.module.decoder.conv_out
        group = 1
        if not isinstance(last, torch.nn.Conv2d):  # a DCUpBlock2d
            group = 1 if last.interpolate else last.factor**2
            last = last.conv
        return ChannelConvs(getattr(first, "conv", first), last, out_group=group)

    def param_groups(self) -> dict[str, list[torch.Tensor]]:
        """The usual groups, and the projections at the latent: the residual shortcuts around them have no weights."""
        m = self.module
        return super().param_groups() | {"encoder_out": parameters(m.encoder.conv_out),
                                         "decoder_in": parameters(m.decoder.conv_in)}  # fmt: skip


def load(folder: Path, class_name: str) -> DC:
    from diffusers import AutoencoderDC

    return DC(load_module(AutoencoderDC, folder), class_name)


def build(arch: dict, channels: int = 3) -> DC:
    """A new, randomly initialised `AutoencoderDC(**arch)` for images of `channels` channels (training mode);
    ValueError for arguments it rejects."""
    from diffusers import AutoencoderDC

    arch = with_channels(AutoencoderDC, arch, {"in_channels": channels})
    return DC(new_module(AutoencoderDC, arch), "AutoencoderDC")
