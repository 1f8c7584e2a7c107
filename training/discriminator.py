"""PatchGAN discriminator for the adversarial term of the autoencoder loss.

Adapted from pix2pix's NLayerDiscriminator as used by taming-transformers
(taming/modules/discriminator/model.py); layer order is kept so `main.{i}.*` state-dict
keys match taming / latent-diffusion checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kl_ae.common.frames import fold_frames

NORMS = ("batch", "group")


def _norm(kind: str, channels: int, dims: int = 2) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels) if dims == 3 else nn.BatchNorm2d(channels)
    # largest group count <= 32 that divides the channels; GroupNorm's statistics are
    # per-sample, so the output does not depend on batch size or the number of processes
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """NLayerDiscriminator: returns one real/fake logit per overlapping patch, (B, 1, h, w).

    With the defaults (64 channels, 3 layers) each logit sees a 70x70 receptive field.
    `norm="batch"` is the reference; under several processes the trainer synchronizes its
    batch statistics (training/sync_batchnorm.py). `norm="group"` needs no synchronization.

    `dims=3`: the same network over clips (B, C, T, H, W) with (3, 4, 4) kernels that keep the frame count (stride 1
    in time): one logit per patch of 3 frames and more, (B, 1, T, h, w), so it judges motion as well as each frame
    (as the 3-D discriminators of Open-Sora-Plan's and VidTok's video VAEs do); an image is a one-frame clip.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3, norm: str = "batch",
                 dims: int = 2):  # fmt: skip
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"disc.norm: unknown norm {norm!r}; choose one of {list(NORMS)}")
        if n_layers < 1:
            raise ValueError(f"disc.n_layers: must be >= 1, got {n_layers}")
        if dims not in (2, 3):
            raise ValueError(f"disc.dims: 2 (frames) or 3 (clips), got {dims}")
        self.dims = dims
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        k, pad = (4, 1) if dims == 2 else ((3, 4, 4), 1)

        def stride(s: int):
            return s if dims == 2 else (1, s, s)

        layers: list[nn.Module] = [
            conv(in_channels, base_channels, k, stride=stride(2), padding=pad),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            c_in, c_out = base_channels * prev, base_channels * mult
            s = 2 if n < n_layers else 1  # the last block keeps resolution
            # no conv bias: the norm's affine shift makes it redundant
            layers += [
                conv(c_in, c_out, k, stride=stride(s), padding=pad, bias=False),
                _norm(norm, c_out, dims),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(conv(base_channels * mult, 1, k, stride=1, padding=pad))
        self.main = nn.Sequential(*layers)
        self.apply(_weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3 and x.dim() == 4:  # images: one-frame clips
            x = x[:, :, None]
        elif self.dims == 2:  # clips: every frame judged as an image, (B*T, 1, h, w)
            x = fold_frames(x)
        return self.main(x)  # (B, 1, h, w) logits; dims=3: (B, 1, T, h, w)


def _weights_init(m: nn.Module) -> None:
    # taming's weights_init (DCGAN): conv biases keep PyTorch's default init
    if isinstance(m, (nn.Conv2d, nn.Conv3d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
