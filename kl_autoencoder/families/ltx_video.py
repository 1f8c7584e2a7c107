"""LTX-Video's and LTX-2's autoencoders (diffusers `AutoencoderKLLTXVideo`, `AutoencoderKLLTX2Video`): f32 t8, 128
channels, a causal encoder (the first frame alone, then every 8 frames one latent frame: clips of 1 + 8k frames)
and a decoder that sees the whole clip (LTX-2's causal by default).

Normalization, as `LTXPipeline._normalize_latents` / `_denormalize_latents` (LTX2Pipeline's are copies):
(z - latents_mean) * scaling_factor / latents_std per channel, with the module's `latents_mean` / `latents_std`
BUFFERS (saved in the safetensors file, not the config) and the config's `scaling_factor`. `measure_normalization`
measures the buffers and sets scaling_factor to 1, which also makes LTX's image-to-video and condition pipelines
agree (they normalize their conditioning latents without the scaling_factor).

A decoder with `timestep_conditioning` (LTX 0.9.1 on) takes a timestep: `decode` passes the pipeline's default
`decode_timestep` 0.0 (with `decode_noise_scale` 0: the latents as they are). A decoder with `decoder_inject_noise`
adds fresh noise in its forward, as the class does: its decode is random unless torch's seed is set.

`tiling()` turns on the class's spatial tiles and its framewise (temporal-window) encode and decode; all blend
overlapping tiles (close to the whole pass, not equal). `build` makes a new random model for training from scratch.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from ..model import DiagonalGaussian
from .base import ChannelMoments, DiffusersAdapter, ModuleRatios, load_module, new_module, with_channels


class LTXVideo(ModuleRatios, DiffusersAdapter):
    is_video = True

    @property
    def family(self) -> str:
        return "ltx2-video" if self.class_name == "AutoencoderKLLTX2Video" else "ltx-video"

    def tiling(self, on: bool = True, tile: int | None = None) -> None:
        """The class's spatial tiles (`tile` pixels overlapping by a quarter; None: its own 512) and time windows."""
        super().tiling(on, tile)
        m = self.module
        # the class's `_encode` reads use_framewise_decoding (not ..._encoding) for its temporal windows: set both
        m.use_tiling = m.use_framewise_encoding = m.use_framewise_decoding = on

    def _encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.module.encode(x).latent_dist.parameters)  # over (B, C', t, h, w)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        temb = None
        if self.config["timestep_conditioning"]:  # LTXPipeline's default decode_timestep, one per clip
            temb = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
        return self.module.decode(z, temb).sample  # (B, C, T, H, W)

    def _statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(latents_mean, latents_std) as (1, C, 1, 1, 1) from the buffers, and scaling_factor, as the pipeline."""
        m = self.module
        mean = m.latents_mean.view(1, -1, 1, 1, 1).to(like.device, like.dtype)
        std = m.latents_std.view(1, -1, 1, 1, 1).to(like.device, like.dtype)
        return mean, std, self.config["scaling_factor"]

    def _normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std, scale = self._statistics(z)
        return (z - mean) * scale / std

    def _denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std, scale = self._statistics(latents)
        return latents * std / scale + mean

    def measure_normalization(self, batches: Iterable[torch.Tensor]) -> dict:
        moments = ChannelMoments(batches)
        return {"latents_mean": moments.mean.tolist(), "latents_std": moments.std.tolist(), "scaling_factor": 1.0}

    def set_normalization(self, updates: dict) -> None:
        """The statistics into the buffers (what the pipelines read and save_pretrained writes); scaling_factor into
        the config."""
        m, updates = self.module, dict(updates)
        with torch.no_grad():
            for name in ("latents_mean", "latents_std"):
                if name in updates:
                    buffer = getattr(m, name)
                    buffer.copy_(torch.tensor(updates.pop(name), dtype=buffer.dtype))
        if updates:
            super().set_normalization(updates)

    def normalization(self) -> dict:
        m = self.module
        return {"convention": "(z - latents_mean) * scaling_factor / latents_std, per channel (buffers)",
                "latents_mean": m.latents_mean.tolist(), "latents_std": m.latents_std.tolist(),
                "scaling_factor": self.config["scaling_factor"]}  # fmt: skip

    def param_groups(self) -> dict[str, list[torch.Tensor]]:
        """The usual groups (no quant convs: the encoder ends at the moments), the statistics buffers as
        normalization."""
        m = self.module
        return super().param_groups() | {"normalization": [m.latents_mean, m.latents_std]}


def load(folder: Path, class_name: str) -> LTXVideo:
    from diffusers import AutoencoderKLLTX2Video, AutoencoderKLLTXVideo

    cls = AutoencoderKLLTX2Video if class_name == "AutoencoderKLLTX2Video" else AutoencoderKLLTXVideo
    return LTXVideo(load_module(cls, folder), class_name)


def build(arch: dict, channels: int = 3) -> LTXVideo:
    """A new, randomly initialised `AutoencoderKLLTXVideo(**arch)` for images of `channels` channels (training mode);
    ValueError for arguments it rejects."""
    from diffusers import AutoencoderKLLTXVideo

    arch = with_channels(AutoencoderKLLTXVideo, arch, {"in_channels": channels, "out_channels": channels})
    return LTXVideo(new_module(AutoencoderKLLTXVideo, arch), "AutoencoderKLLTXVideo")
