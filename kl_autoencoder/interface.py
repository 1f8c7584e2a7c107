"""The one autoencoder interface that eval, probe, encode / decode, training and export use, and its loader.

`load_autoencoder(path)` reads the folder's `config.json` `_class_name` and returns the family's adapter
(`kl_autoencoder/families/`): our own KL / VQ model for `AutoencoderKL` / `VQModel`, thin wrappers of diffusers'
classes for the others. Every adapter takes images (B, C, H, W) and clips (B, C, T, H, W) in [-1, 1] and gives raw
latents (B, C', h, w) and (B, C', t, h, w): a causal video family (`is_video`) takes clips of 1 + k *
`temporal_factor` frames (`check_frames`) whole and an image as a one-frame clip; an image family takes a clip frame
by frame (t = T). `normalize` turns raw latents into exactly what the family's diffusion pipeline feeds its
transformer (its shape included: FLUX.2's are patchified to (B, 4C, h/2, w/2)).
`new_autoencoder(family, arch, channels)` builds a new random model of a diffusers family (DC-AE, FLUX.2, Wan,
LTX-Video) from its class's constructor arguments and the data's channels, for training from scratch. C is
`image_channels` (1, 3, 4 or N); `kl_autoencoder.channels` widens or narrows it through `channel_convs`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .diffusers_format import CONFIG_NAME
from .families.base import PROJECTIONS, TRAINABLE, ChannelConvs, PointPosterior, as_saved
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
    "AutoencoderKLHunyuanVideo": "hunyuan-video",
    "AutoencoderKLHunyuanVideo15": "hunyuan-video-1.5",
    "AutoencoderKLLTXVideo": "ltx-video",
    "AutoencoderKLLTX2Video": "ltx2-video",
    "AutoencoderKLCogVideoX": "cogvideox",
}

# family -> the diffusers class `new_autoencoder` builds: the families a run trains from scratch (`model.family`)
BUILDABLE = {"dc-ae": "AutoencoderDC", "flux2": "AutoencoderKLFlux2", "wan": "AutoencoderKLWan",
             "ltx-video": "AutoencoderKLLTXVideo"}  # fmt: skip

__all__ = ["BUILDABLE", "PROJECTIONS", "SUPPORTED", "TRAINABLE", "ChannelConvs", "LatentAutoencoder",
           "PointPosterior", "load_autoencoder", "new_autoencoder"]  # fmt: skip


@runtime_checkable
class LatentAutoencoder(Protocol):
    """What every family adapter provides. Posteriors have .mean, .mode(), .sample(generator), .kl() (B,) and
    .logvar (None for a point posterior: deterministic families, where sample() == mode() and kl() == 0)."""

    family: str  # "kl", "vq", "flux2", "dc-ae", "qwen-image", "wan", "hunyuan-image", "rae", "hunyuan-video", ...
    class_name: str  # the diffusers class it loads from and saves as
    module: nn.Module  # the underlying module: what training prepares, moves and puts in train() mode
    # a causal video model taking clips (B, C, T, H, W) natively (Wan, Qwen-Image's class, HunyuanVideo, LTX-Video,
    # CogVideoX); False: an image model, which takes a clip frame by frame
    is_video: bool

    @property
    def spatial_factor(self) -> int: ...  # image pixels per raw latent position, per side

    @property
    def temporal_factor(self) -> int: ...  # frames per latent frame after the first; 1 for image families

    @property
    def latent_channels(self) -> int: ...  # channels of the raw latent z

    @property
    def sample_size(self) -> int | None: ...  # the training resolution where the config records it

    @property
    def fp16_safe(self) -> bool | None: ...  # not force_upcast; None where the family does not say

    @property
    def image_multiple(self) -> int: ...  # sides must be multiples (FLUX.2: 2x the factor; RAE: its one size)

    @property
    def image_channels(self) -> int: ...  # channels of its images: 1 gray, 3 RGB, 4 RGBA (channel 3 alpha), N bands

    def check_size(self, height: int, width: int) -> None: ...  # ValueError, one line, for a size it cannot take

    def check_frames(self, n: int) -> None: ...  # ValueError, one line naming the clip lengths it takes

    def longest_frames(self, n: int) -> int: ...  # the longest clip length <= n it takes (n for image families)

    # (B, C, H, W) in [-1, 1] -> posterior over (B, C', H/f, W/f); (B, C, T, H, W) -> over (B, C', t, H/f, W/f),
    # t = 1 + (T - 1) / temporal_factor (T for an image family, frame by frame)
    def encode(self, x: torch.Tensor): ...

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...  # raw latents, 4-D or 5-D -> images or clips, about [-1, 1]

    def normalize(self, z: torch.Tensor) -> torch.Tensor: ...  # raw latents (4-D or 5-D) -> the pipeline's latents

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor: ...  # the inverse

    # memory-bounded encode / decode of long clips and large frames through the class's own mechanisms (each family
    # says whether that is exact or blended); off: one pass. `tile`: the spatial tiles' side in pixels, where the class
    # takes sizes (None: its own)
    def tiling(self, on: bool = True, tile: int | None = None) -> None: ...

    def measure_normalization(self, batches: Iterable[torch.Tensor]) -> dict: ...  # raw latents -> updates

    def set_normalization(self, updates: dict) -> None: ...  # apply them; save_pretrained then writes them

    def normalization(self) -> dict: ...  # {"convention": formula, and its current values}

    # encoder, decoder, decoder_head, normalization; our model, DC-AE and FLUX.2 also encoder_out, decoder_in
    # (PROJECTIONS)
    def param_groups(self) -> dict[str, list[torch.Tensor]]: ...

    def freeze(self, trainable: Iterable[str]) -> None: ...  # only these groups (param_groups') take gradients

    def parameter_counts(self) -> dict[str, int]: ...  # encoder, decoder, total

    # the encoder's first and the decoder's last conv, which `kl_autoencoder.channels.adapt_channels` resizes
    # (ValueError for a class it does not adapt), and the new count recorded in the config that save_pretrained writes
    def channel_convs(self) -> ChannelConvs: ...

    def set_image_channels(self, channels: int) -> None: ...

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
    elif name in ("AutoencoderKLHunyuanVideo", "AutoencoderKLHunyuanVideo15"):
        from .families import hunyuan_video as family
    elif name in ("AutoencoderKLLTXVideo", "AutoencoderKLLTX2Video"):
        from .families import ltx_video as family
    elif name == "AutoencoderKLCogVideoX":
        from .families import cogvideox as family
    else:
        raise ValueError(f"{folder}: _class_name {name!r} is not supported; supported: {', '.join(SUPPORTED)}")
    return as_saved(folder, family.load(folder, name))  # a video model saved per frame stays per frame


def new_autoencoder(family: str, arch: dict | None = None, channels: int = 3) -> LatentAutoencoder:
    """A new, randomly initialised autoencoder of a diffusers family (BUILDABLE), in training mode: its class
    built with the constructor arguments `arch` (the class's config.json keys; the others take its defaults) and
    its image channels set to `channels` under the class's own argument names (`arch` may not contradict them).
    ValueError (one line) for another family, an argument the class does not take, or values it rejects.
    Under `torch.device("meta")` it allocates nothing: a cheap check of a configuration."""
    if family == "dc-ae":
        from .families import dc as module
    elif family == "flux2":
        from .families import flux2 as module
    elif family == "wan":
        from .families import qwen_wan as module
    elif family == "ltx-video":
        from .families import ltx_video as module
    else:
        raise ValueError(f"no new {family!r} autoencoder can be built; families built from scratch: {list(BUILDABLE)}")
    return module.build(dict(arch or {}), channels)
