"""What every family adapter shares: the point posterior of deterministic latents, exact per-channel latent
moments, freezing by parameter group, and writing a diffusers class with extra config keys.

An adapter holds a module (our `Autoencoder`, or one of diffusers' autoencoder classes) and adds only what that
module lacks: images as (B, 3, H, W) in [-1, 1], the family's latent normalization as its diffusers pipeline
applies it, and the parameter groups a fine-tune freezes. `kl_autoencoder.interface` lists the methods.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..diffusers_format import CONFIG_NAME

# the groups a fine-tune may train; "normalization" (statistics, buffers) changes only through set_normalization
TRAINABLE = ("encoder", "decoder", "decoder_head")
# groups some families add: the encoder's output projection and the decoder's input projection, which DC-AE's
# high-resolution latent adaptation (its second phase) trains alone
PROJECTIONS = ("encoder_out", "decoder_in")


class PointPosterior:
    """A deterministic latent seen as a posterior (DC-AE, RAE, VQ latents before quantization).

    sample() == mode() and kl() == 0, so code written for the Gaussian posterior runs unchanged; `logvar` is
    None (there is no variance to report).
    """

    logvar = None

    def __init__(self, z: torch.Tensor):
        self.mean = z  # (B, C, h, w)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        return self.mean.new_zeros(self.mean.shape[0])  # (B,)


class ChannelMoments:
    """Per-channel count, mean and M2 (sum of squared deviations) in float64, merged batch by batch.

    Chan et al.'s parallel update: exact for any batching and without the cancellation of summed squares when
    |mean| >> std (latents with a large offset).
    """

    def __init__(self, batches: Iterable[torch.Tensor]):
        self.n, self.mean, self.m2 = 0, None, None
        for z in batches:
            self.add(z)
        if self.mean is None:
            raise ValueError("no latents to measure the normalization on")

    def add(self, z: torch.Tensor) -> None:
        z = z.detach().double().transpose(0, 1).flatten(1)  # (C, B*h*w)
        n, mean = z.shape[1], z.mean(1)
        m2 = (z - mean[:, None]).square().sum(1)
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * n / total)
        self.n = total

    @property
    def std(self) -> torch.Tensor:
        """Per-channel population standard deviation, (C,)."""
        return (self.m2 / self.n).sqrt()

    def pooled(self) -> tuple[float, float]:
        """(mean, std) of all values together: the channels are equal-sized groups of one pool."""
        mean = self.mean.mean()
        var = (self.m2.sum() + self.n * (self.mean - mean).square().sum()) / (self.n * len(self.mean))
        return float(mean), float(var.sqrt())

    def rms(self) -> float:
        """Root mean square of all values: what a scaling factor without a shift makes 1."""
        mean, std = self.pooled()
        return math.sqrt(std**2 + mean**2)


def parameters(*modules: nn.Module | None) -> list[nn.Parameter]:
    """The parameters of the modules that exist (quant convs are optional), in order."""
    return [p for m in modules if m is not None for p in m.parameters()]


class Adapter:
    """The shared part of every family: freezing by group, parameter counts, size checks, device moves.

    A family sets `family` and implements encode, decode, normalize, denormalize, measure_normalization,
    set_normalization, normalization, param_groups, save_pretrained, spatial_factor, latent_channels,
    sample_size and fp16_safe (`kl_autoencoder.interface.LatentAutoencoder` says what each means).
    """

    family = ""

    def __init__(self, module: nn.Module, class_name: str):
        self.module = module  # what training prepares, moves and puts in train() mode
        self.class_name = class_name

    def __repr__(self) -> str:
        return f"<{self.family} autoencoder ({self.class_name}), f{self.spatial_factor}, {self.latent_channels} ch>"

    @property
    def image_multiple(self) -> int:
        """Image height and width must be multiples of this (the spatial factor, more where latents are patched)."""
        return self.spatial_factor

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError (one line) when images of this size cannot go through encode, normalize and decode."""
        m = self.image_multiple
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ValueError(f"{self.class_name} takes images whose sides are multiples of {m}, got {height}x{width}")

    def freeze(self, trainable: Iterable[str]) -> None:
        """Train only the named groups (TRAINABLE, and the PROJECTIONS of the families that have them); every other
        parameter takes no gradient.

        Groups overlap ("decoder_head" is part of "decoder"), so a group is trainable when it is named, whatever
        contains it. Normalization statistics are buffers and never trained here.
        """
        trainable = list(trainable)
        groups = self.param_groups()
        known = [name for name in groups if name != "normalization"]
        unknown = sorted(set(trainable) - set(known))
        if unknown:
            raise ValueError(f"unknown parameter groups {unknown}; trainable groups are {known}")
        self.module.requires_grad_(False)
        for name in trainable:
            for p in groups[name]:
                p.requires_grad_(True)

    def parameter_counts(self) -> dict[str, int]:
        """Number of parameters in the encoder, the decoder and the whole module."""
        groups = self.param_groups()
        count = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
        return {"encoder": count(groups["encoder"]), "decoder": count(groups["decoder"]),
                "total": count(self.module.parameters())}  # fmt: skip

    def to(self, *args, **kwargs) -> Adapter:
        self.module.to(*args, **kwargs)
        return self


def write_config_updates(folder: Path, allowed: Iterable[str], extra_config: dict | None, class_name: str) -> None:
    """Merge `extra_config` into folder/config.json; its keys must be `class_name` arguments or start with "_"
    (diffusers keeps those and ignores them on load), so the folder still loads here and in diffusers."""
    if not extra_config:
        return
    allowed = set(allowed)
    unknown = sorted(k for k in extra_config if not k.startswith("_") and k not in allowed)
    if unknown:
        raise ValueError(f"extra_config keys {unknown} are not {class_name} arguments; prefix them with '_'")
    path = folder / CONFIG_NAME
    config = json.loads(path.read_text()) | dict(extra_config)
    tmp = folder / (CONFIG_NAME + ".tmp")  # write, then rename: never a half-written config
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class DiffusersAdapter(Adapter):
    """A family whose module is a diffusers class: config, fp16 hint, saving and the usual groups from it."""

    @property
    def config(self):
        return self.module.config

    @property
    def latent_channels(self) -> int:
        return int(self.config["latent_channels"])

    @property
    def sample_size(self) -> int | None:
        """The size the model was trained at (the default resolution of eval and probe), where the config says."""
        size = self.config.get("sample_size")
        return int(size[0] if isinstance(size, (list, tuple)) else size) if size else None

    @property
    def fp16_safe(self) -> bool | None:
        """`not force_upcast` where the config has it; None (not known: measure it) elsewhere."""
        return None if "force_upcast" not in self.config else not self.config["force_upcast"]

    def set_normalization(self, updates: dict) -> None:
        """Apply `measure_normalization`'s result to this model (its config), so normalize and save use it."""
        self.module.register_to_config(**updates)

    def param_groups(self) -> dict[str, list[torch.Tensor]]:
        """encoder (with quant_conv), decoder (with post_quant_conv), its output head, normalization buffers."""
        m = self.module
        return {
            "encoder": parameters(m.encoder, getattr(m, "quant_conv", None)),
            "decoder": parameters(getattr(m, "post_quant_conv", None), m.decoder),
            "decoder_head": parameters(*self.head()),
            "normalization": [],
        }

    def head(self) -> tuple[nn.Module, ...]:
        """The decoder's output layers: its last norm and conv."""
        return self.module.decoder.norm_out, self.module.decoder.conv_out

    def save_pretrained(self, path: str | Path, extra_config: dict | None = None) -> Path:
        """Write the module in its own diffusers class (config.json + one safetensors file), extra_config merged."""
        path = Path(path)
        self.module.save_pretrained(path, safe_serialization=True)
        write_config_updates(path, self.config.keys(), extra_config, self.class_name)
        return path


def constructor_arguments(cls: type) -> list[str]:
    """The arguments of a diffusers class's constructor: the keys of its config.json."""
    return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]


def new_module(cls: type, arch: dict) -> nn.Module:
    """A new, randomly initialised `cls(**arch)`; ValueError (one line) for an argument the class does not take, or
    values its constructor rejects (its own asserts and shape checks)."""
    allowed = constructor_arguments(cls)
    unknown = sorted(set(arch) - set(allowed))
    if unknown:
        raise ValueError(f"{cls.__name__} takes no argument {unknown}; its arguments are {allowed}")
    try:
        return cls(**arch)
    except (AssertionError, ValueError, TypeError, KeyError, IndexError, RuntimeError, ZeroDivisionError) as e:
        why = " ".join(str(e).split()) or "an assertion of its constructor failed"
        raise ValueError(f"{cls.__name__} cannot be built from these arguments: {type(e).__name__}: {why}") from None


def load_module(cls: type, folder: Path) -> nn.Module:
    """A diffusers autoencoder from its folder, in fp32 (as our loader upcasts) and eval mode (as diffusers)."""
    return cls.from_pretrained(folder, torch_dtype=torch.float32).eval()
