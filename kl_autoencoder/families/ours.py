"""Our own KL / VQ `Autoencoder` (diffusers `AutoencoderKL` / `VQModel`: SD, SDXL, SD3, FLUX.1, LDM) behind the
family interface.

The model already encodes to a posterior and decodes; the adapter adds the latent normalization of the
SD3 / FLUX.1 pipelines, (z - shift_factor) * scaling_factor (no shift: SD's z * scaling_factor), its
measurement as LDM's scale_by_std, and the parameter groups. A VQ model's latents are those before
quantization (what LDM diffuses): `encode` returns them as a point posterior and `decode` quantizes first,
as diffusers' `VQModel.decode` does.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from ..model import Autoencoder, DiagonalGaussian
from ..tiling import decode_tiled, encode_tiled
from .base import Adapter, ChannelConvs, ChannelMoments, PointPosterior, parameters


class Ours(Adapter):
    module: Autoencoder
    tiled = False  # tiling(): images with a side over `tile` pixels go through kl_autoencoder.tiling
    tile = 256  # tiling.py's default tile

    @property
    def family(self) -> str:
        return self.module.config.bottleneck  # "kl" or "vq"

    @property
    def vq(self) -> bool:
        return self.module.config.bottleneck == "vq"

    @property
    def spatial_factor(self) -> int:
        return self.module.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.module.config.code_dim if self.vq else self.module.config.latent_channels

    @property
    def sample_size(self) -> int:
        return self.module.config.sample_size

    @property
    def fp16_safe(self) -> bool:
        return not self.module.config.force_upcast

    @property
    def image_channels(self) -> int:
        return self.module.config.in_channels

    def channel_convs(self) -> ChannelConvs:
        return ChannelConvs(self.module.encoder.conv_in, self.module.decoder.conv_out)

    def set_image_channels(self, channels: int) -> None:
        self.module.config.in_channels = self.module.config.out_channels = channels

    def tiling(self, on: bool = True, tile: int | None = None) -> None:
        """Images larger than `tile` pixels (None: as set, 256 by default) encode and decode tile by tile, with the
        whole image's GroupNorm statistics ("exact"; the zero padding at tile borders remains: close to the whole
        pass, not equal)."""
        self.tiled = on
        if tile is not None:
            self.tile = tile

    def _tiled(self, side: int) -> bool:
        """Whether an image whose longer side is `side` pixels goes through in tiles."""
        return self.tiled and side > self.tile

    def _encode(self, x: torch.Tensor) -> DiagonalGaussian | PointPosterior:
        posterior = encode_tiled(self.module, x, self.tile) if self._tiled(max(x.shape[-2:])) else self.module.encode(x)
        return PointPosterior(posterior.latents) if self.vq else posterior

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.vq:
            z = self.module.quantize(z).z_q
        if self._tiled(max(z.shape[-2:]) * self.spatial_factor):
            return decode_tiled(self.module, z, self.tile)
        return self.module.decode(z)

    def _factors(self) -> tuple[float, float]:
        cfg = self.module.config
        return float(cfg.scaling_factor), float(cfg.shift_factor or 0.0)

    def _normalize(self, z: torch.Tensor) -> torch.Tensor:
        scale, shift = self._factors()
        return (z - shift) * scale

    def _denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        scale, shift = self._factors()
        return latents / scale + shift

    def measure_normalization(self, batches: Iterable[torch.Tensor]) -> dict:
        """LDM's scale_by_std: scaling_factor = 1 / std and shift_factor = mean of all values, plus the per-channel
        statistics some pipelines read; VQModel has a scaling_factor only."""
        moments = ChannelMoments(batches)
        mean, std = moments.pooled()
        if self.vq:
            return {"scaling_factor": 1.0 / std}
        return {"scaling_factor": 1.0 / std, "shift_factor": mean, "latents_mean": moments.mean.tolist(),
                "latents_std": moments.std.tolist()}  # fmt: skip

    def set_normalization(self, updates: dict) -> None:
        for key, value in updates.items():
            setattr(self.module.config, key, value)

    def normalization(self) -> dict:
        scale, shift = self._factors()
        return {"convention": "(z - shift_factor) * scaling_factor", "scaling_factor": scale, "shift_factor": shift}

    def param_groups(self) -> dict[str, list[torch.Tensor]]:
        m = self.module
        return {
            # the codebook belongs to the latent space: a decoder-only fine-tune keeps it
            "encoder": parameters(m.encoder, m.quant_conv, getattr(m, "quantize", None)),
            "decoder": parameters(m.post_quant_conv, m.decoder),
            "decoder_head": parameters(m.decoder.conv_norm_out, m.decoder.conv_out),
            # the projections at the latent (DC-AE's second phase trains only these)
            "encoder_out": parameters(m.encoder.conv_out, m.quant_conv),
            "decoder_in": parameters(m.post_quant_conv, m.decoder.conv_in),
            "normalization": [],  # scaling_factor / shift_factor live in the config
        }

    def freeze(self, trainable: Iterable[str]) -> None:
        trainable = list(trainable)
        super().freeze(trainable)
        if self.vq and "encoder" not in trainable:
            self.module.quantize.frozen = True  # no EMA update or restart of the codes either

    def save_pretrained(self, path: str | Path, extra_config: dict | None = None) -> Path:
        return Path(self.module.save_pretrained(path, extra_config=extra_config))


def load(folder: Path, class_name: str) -> Ours:
    return Ours(Autoencoder.from_pretrained(folder), class_name)


def wrap(model: Autoencoder) -> Ours:
    """Our model, built or loaded elsewhere (a preset, an LDM checkpoint), behind the interface."""
    return Ours(model, "VQModel" if model.config.bottleneck == "vq" else "AutoencoderKL")
