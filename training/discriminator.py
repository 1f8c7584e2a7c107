"""PatchGAN discriminator for the adversarial term of the autoencoder loss.

Adapted from pix2pix's NLayerDiscriminator as used by taming-transformers
(taming/modules/discriminator/model.py); layer order is kept so `main.{i}.*` state-dict
keys match taming / latent-diffusion checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NORMS = ("batch", "group")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    # largest group count <= 32 that divides the channels; GroupNorm's statistics are
    # per-sample, so the output does not depend on batch size or the number of processes
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """NLayerDiscriminator: returns one real/fake logit per overlapping patch, (B, 1, h, w).

    With the defaults (64 channels, 3 layers) each logit sees a 70x70 receptive field.
    `norm="batch"` is the reference; its batch statistics differ per process under DDP
    unless converted to SyncBatchNorm. `norm="group"` avoids that entirely.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"disc.norm: unknown norm {norm!r}; choose one of {list(NORMS)}")
        if n_layers < 1:
            raise ValueError(f"disc.n_layers: must be >= 1, got {n_layers}")
        k, pad = 4, 1
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, k, stride=2, padding=pad),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            c_in, c_out = base_channels * prev, base_channels * mult
            stride = 2 if n < n_layers else 1  # the last block keeps resolution
            # no conv bias: the norm's affine shift makes it redundant
            layers += [
                nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, bias=False),
                _norm(norm, c_out),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(base_channels * mult, 1, k, stride=1, padding=pad))
        self.main = nn.Sequential(*layers)
        self.apply(_weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, h, w) logits


def _weights_init(m: nn.Module) -> None:
    # taming's weights_init (DCGAN): conv biases keep PyTorch's default init
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
