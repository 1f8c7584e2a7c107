"""The one autoencoder interface that eval, probe, encode / decode, training and export use, and its loader.

`load_autoencoder(path)` reads the folder's `config.json` `_class_name` and returns the family's adapter
(`kl_autoencoder/families/`): our own KL / VQ model for `AutoencoderKL` / `VQModel`, thin wrappers of diffusers'
classes for the others. Every adapter takes images (B, 3, H, W) in [-1, 1] and gives raw latents (B, C, h, w);
`normalize` turns those into exactly what the family's diffusion pipeline feeds its transformer (its shape
included: FLUX.2's are patchified to (B, 4C, h/2, w/2)). `new_autoencoder(family, arch)` builds a new random model
of a diffusers family (DC-AE, FLUX.2) from its class's constructor arguments, for training from scratch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .diffusers_format import CONFIG_NAME
from .families.base import PROJECTIONS, TRAINABLE, PointPosterior
from .folders import find_diffusers_folder

# _class_name -> family, the classes `load_autoencoder` takes
SUPPORTED = {
    "AutoencoderKL": "kl",  # SD, SDXL, SD3, FLUX.1: our own model
    "VQModel": "vq",  # LDM's VQ: our own model
    "AutoencoderKLFlux2": "flux2",
    "AutoencoderDC": "dc-ae",  # SANA
    "AutoencoderKLQwenImage": "qwen-image",
    "AutoencoderKLWan": "wan",
    "AutoencoderKLHunyuanImage": "hunyuan-image",
    "AutoencoderRAE": "rae",
}

# family -> the diffusers class `new_autoencoder` builds: the families a run trains from scratch (`model.family`)
BUILDABLE = {"dc-ae": "AutoencoderDC", "flux2": "AutoencoderKLFlux2"}

__all__ = ["BUILDABLE", "PROJECTIONS", "SUPPORTED", "TRAINABLE", "LatentAutoencoder", "PointPosterior",
           "load_autoencoder", "new_autoencoder"]  # fmt: skip


@runtime_checkable
class LatentAutoencoder(Protocol):
    """What every family adapter provides. Posteriors have .mean, .mode(), .sample(generator), .kl() (B,) and
    .logvar (None for a point posterior: deterministic families, where sample() == mode() and kl() == 0)."""

    family: str  # "kl", "vq", "flux2", "dc-ae", "qwen-image", "wan", "hunyuan-image", "rae"
    class_name: str  # the diffusers class it loads from and saves as
    module: nn.Module  # the underlying module: what training prepares, moves and puts in train() mode

    @property
    def spatial_factor(self) -> int: ...  # image pixels per raw latent position, per side

    @property
    def latent_channels(self) -> int: ...  # channels of the raw latent z

    @property
    def sample_size(self) -> int | None: ...  # the training resolution where the config records it

    @property
    def fp16_safe(self) -> bool | None: ...  # not force_upcast; None where the family does not say

    @property
    def image_multiple(self) -> int: ...  # sides must be multiples (FLUX.2: 2x the factor; RAE: its one size)

    def check_size(self, height: int, width: int) -> None: ...  # ValueError, one line, for a size it cannot take

    def encode(self, x: torch.Tensor): ...  # (B, 3, H, W) in [-1, 1] -> posterior over (B, C, H/f, W/f)

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...  # raw latents -> (B, 3, H, W), about [-1, 1]

    def normalize(self, z: torch.Tensor) -> torch.Tensor: ...  # raw latents -> the pipeline's latents

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor: ...  # the inverse

    def measure_normalization(self, batches: Iterable[torch.Tensor]) -> dict: ...  # raw latents -> updates

    def set_normalization(self, updates: dict) -> None: ...  # apply them; save_pretrained then writes them

    def normalization(self) -> dict: ...  # {"convention": formula, and its current values}

    # encoder, decoder, decoder_head, normalization; our model, DC-AE and FLUX.2 also encoder_out, decoder_in
    # (PROJECTIONS)
    def param_groups(self) -> dict[str, list[torch.Tensor]]: ...

    def freeze(self, trainable: Iterable[str]) -> None: ...  # only these groups (param_groups') take gradients

    def parameter_counts(self) -> dict[str, int]: ...  # encoder, decoder, total

    def save_pretrained(self, path: str | Path, extra_config: dict | None = None) -> Path: ...  # its own class

    def to(self, *args, **kwargs) -> LatentAutoencoder: ...


def read_class_name(folder: Path) -> str:
    """The `_class_name` of a diffusers folder's config (AutoencoderKL where it is missing, as diffusers reads it)."""
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / CONFIG_NAME} is not valid JSON ({e})") from None
    return config.get("_class_name", "AutoencoderKL")


def load_autoencoder(path: str | Path, subfolder: str | None = None) -> LatentAutoencoder:
    """The autoencoder at a diffusers, run or checkpoint folder or a hub name `org/name[/subfolder]`, in fp32 and
    eval mode; ValueError (one line naming the supported classes) for a class no family covers."""
    folder = find_diffusers_folder(path, subfolder)
    name = read_class_name(folder)
    if name in ("AutoencoderKL", "VQModel"):
        from .families import ours as family
    elif name == "AutoencoderKLFlux2":
        from .families import flux2 as family
    elif name == "AutoencoderDC":
        from .families import dc as family
    elif name in ("AutoencoderKLQwenImage", "AutoencoderKLWan"):
        from .families import qwen_wan as family
    elif name == "AutoencoderKLHunyuanImage":
        from .families import hunyuan as family
    elif name == "AutoencoderRAE":
        from .families import rae as family
    else:
        raise ValueError(f"{folder}: _class_name {name!r} is not supported; supported: {', '.join(SUPPORTED)}")
    return family.load(folder, name)


def new_autoencoder(family: str, arch: dict | None = None) -> LatentAutoencoder:
    """A new, randomly initialised autoencoder of a diffusers family (BUILDABLE), in training mode: its class
    built with the constructor arguments `arch` (the class's config.json keys; the others take its defaults).
    ValueError (one line) for another family, an argument the class does not take, or values it rejects.
    Under `torch.device("meta")` it allocates nothing: a cheap check of a configuration."""
    if family == "dc-ae":
        from .families import dc as module
    elif family == "flux2":
        from .families import flux2 as module
    else:
        raise ValueError(f"no new {family!r} autoencoder can be built; families built from scratch: {list(BUILDABLE)}")
    return module.build(dict(arch or {}))
