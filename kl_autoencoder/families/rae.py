"""RAE, the representation autoencoder (diffusers `AutoencoderRAE`): a frozen pretrained encoder (DINOv2,
SigLIP2 or MAE, from `transformers`) and a trained ViT decoder.

What differs from the other families:
- its images are in [0, 1] (it applies ImageNet's mean / std itself): the adapter maps ours from [-1, 1];
- diffusers' `encode` returns latents already normalized with the model's `latents_mean` / `latents_std`
  buffers (and `scaling_factor`), and `decode` takes them so. Our raw latent z is the encoder's patch tokens
  (B, hidden, h, w): `encode` undoes that normalization, `decode` applies it before diffusers' decode;
- the encoder is frozen always (a fine-tune trains the decoder only), and the decoder has a fixed number of
  patches: images go in at any size (resized to `encoder_input_size`) but come out at `image_size`, so only
  that size round-trips.
Needs `transformers` (the `align` extra).
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.util import find_spec
from pathlib import Path

import torch

from .base import TRAINABLE, ChannelMoments, DiffusersAdapter, PointPosterior, load_module, parameters


class RAE(DiffusersAdapter):
    family = "rae"
    channel_keys = ("num_channels",)  # the decoder's output; the frozen vision encoder reads RGB

    @property
    def latent_channels(self) -> int:
        return int(self.config["encoder_hidden_size"])

    @property
    def spatial_factor(self) -> int:
        return int(self.module.decoder_patch_size)  # output pixels per latent position

    @property
    def sample_size(self) -> int:
        return int(self.module.decoder_image_size)

    @property
    def image_multiple(self) -> int:
        return self.sample_size  # one size only: see check_size

    @property
    def fp16_safe(self) -> bool | None:
        return None

    def check_size(self, height: int, width: int) -> None:
        if height != self.sample_size or width != self.sample_size:
            raise ValueError(
                f"AutoencoderRAE decodes to {self.sample_size}x{self.sample_size} only (a fixed number of patches); "
                f"got {height}x{width}"
            )

    def _encode(self, x: torch.Tensor) -> PointPosterior:
        latents = self.module.encode((x + 1) / 2).latent  # normalized, (B, hidden, h, w)
        return PointPosterior(self._denormalize(latents))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        # contiguous: diffusers' decode views the latents as tokens, which a rotated or sliced latent is not
        return self.module.decode(self._normalize(z).contiguous()).sample * 2 - 1

    def _normalize(self, z: torch.Tensor) -> torch.Tensor:
        latents = self.module._normalize_latents(z)
        scale = self.config["scaling_factor"]
        return latents * scale if scale != 1.0 else latents  # diffusers skips the product at 1

    def _denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        scale = self.config["scaling_factor"]
        return self.module._denormalize_latents(latents / scale if scale != 1.0 else latents)

    def measure_normalization(self, batches: Iterable[torch.Tensor]) -> dict:
        """Per-channel mean and std, shaped (C, 1, 1) so that they broadcast over (B, C, h, w) latents."""
        moments = ChannelMoments(batches)
        return {
            "latents_mean": moments.mean[:, None, None].tolist(),
            "latents_std": moments.std[:, None, None].tolist(),
        }

    def set_normalization(self, updates: dict) -> None:
        m = self.module
        mean = torch.tensor(updates["latents_mean"], dtype=torch.float32, device=m._latents_mean.device)
        std = torch.tensor(updates["latents_std"], dtype=torch.float32, device=m._latents_std.device)
        if mean.dim() == 1 and len(mean) > 1:  # per-channel values listed flat (as `normalization` gives them)
            mean, std = mean[:, None, None], std[:, None, None]  # (C, 1, 1): they broadcast over (B, C, h, w)
        updates = updates | {"latents_mean": mean.tolist(), "latents_std": std.tolist()}
        super().set_normalization(updates)  # the config, for save_pretrained; the buffers are what runs
        m._latents_mean, m._latents_std = mean, std

    def normalization(self) -> dict:
        m = self.module
        return {"convention": "(z - latents_mean) / (latents_std + 1e-5) * scaling_factor, per channel",
                "latents_mean": m._latents_mean.flatten().tolist(), "latents_std": m._latents_std.flatten().tolist(),
                "scaling_factor": self.config["scaling_factor"]}  # fmt: skip

    def head(self) -> tuple:
        return self.module.decoder.decoder_norm, self.module.decoder.decoder_pred

    def param_groups(self) -> dict[str, list[torch.Tensor]]:
        m = self.module
        head = parameters(*self.head())
        return {"encoder": parameters(m.encoder), "decoder": parameters(m.decoder), "decoder_head": head,
                "normalization": [m._latents_mean, m._latents_std]}  # fmt: skip

    def freeze(self, trainable: Iterable[str]) -> None:
        trainable = list(trainable)
        if "encoder" in trainable:
            allowed = [g for g in TRAINABLE if g != "encoder"]
            raise ValueError(f"AutoencoderRAE's encoder is a frozen pretrained representation; train {allowed}")
        super().freeze(trainable)


def load(folder: Path, class_name: str) -> RAE:
    if find_spec("transformers") is None:
        raise ImportError("AutoencoderRAE builds its encoder with transformers: pip install 'kl-autoencoder[align]'")
    from diffusers import AutoencoderRAE

    module = load_module(AutoencoderRAE, folder)
    if not module.config["reshape_to_2d"]:
        raise ValueError("AutoencoderRAE with reshape_to_2d false (token latents) is not supported")
    return RAE(module, class_name)
