"""What every family adapter shares: images and clips through one interface, the point posterior of deterministic
latents, exact per-channel latent moments, freezing by parameter group, writing a diffusers class with extra
config keys, and a video family taken frame by frame (`PerFrame`).

An adapter holds a module (our `Autoencoder`, or one of diffusers' autoencoder classes) and adds only what that
module lacks: images (B, C, H, W) and clips (B, C, T, H, W) in [-1, 1], the family's latent normalization as its
diffusers pipeline applies it, and the parameter groups a fine-tune freezes. A family implements the calls on its
native shape (images for an image family, clips for a causal video family); `Adapter` takes the other shape through
one helper: an image family folds T into the batch (frame by frame), a video family sees an image as a one-frame
clip. `kl_autoencoder.interface` lists the methods.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..diffusers_format import CONFIG_NAME
from ..model import DiagonalGaussian

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
        self.mean = z  # (B, C, h, w) or (B, C, t, h, w)

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


def fold_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W), batch-major: row b*T + t is frame t of clip b."""
    return x.transpose(1, 2).flatten(0, 1)


def unfold_frames(x: torch.Tensor, batch: int) -> torch.Tensor:
    """The inverse of `fold_frames`: (B*T, C, H, W) -> (B, C, T, H, W), contiguous."""
    return x.unflatten(0, (batch, -1)).transpose(1, 2).contiguous()


def reshaped(out, fn: Callable[[torch.Tensor], torch.Tensor]):
    """A tensor, or a posterior over it, with `fn` applied to its tensors (dim 1, the channels, kept).

    A Gaussian's moments (mean and log-variance stacked on dim 1) reshape as the latents do, so the posterior over
    reshaped latents is the same distribution: mode(), sample() and kl() sum over every dim but the batch."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, PointPosterior):
        return PointPosterior(fn(out.mean))
    if isinstance(out, DiagonalGaussian):
        return DiagonalGaussian(fn(out.moments))
    raise TypeError(f"cannot reshape a {type(out).__name__}")


@dataclass
class ChannelConvs:
    """The two layers that see image channels (`kl_autoencoder.channels` widens and narrows them): the encoder's first
    conv and the decoder's last. Image channel c is `group` consecutive channels of the conv, c * group onwards, where
    a patchify (Wan 2.2) or a pixel shuffle (DC-AE's head) sits beside it; 1 elsewhere."""

    first: nn.Conv2d | nn.Conv3d  # its input channels are the image's
    last: nn.Conv2d | nn.Conv3d  # its output channels are the image's
    in_group: int = 1
    out_group: int = 1


def with_channels(cls: type, arch: dict, arguments: dict[str, int]) -> dict:
    """`arch` with the image channels (`arguments`: the class's own argument names) set from the data; ValueError
    (one line) where `arch` names one of them with another value, since data.channels decides them."""
    for key, value in arguments.items():
        if key in arch and arch[key] != value:
            raise ValueError(f"{cls.__name__}'s {key}={arch[key]} contradicts data.channels ({key}={value} for the "
                             f"data): leave {key} out, data.channels sets it")  # fmt: skip
    return {**arch, **arguments}


def parameters(*modules: nn.Module | None) -> list[nn.Parameter]:
    """The parameters of the modules that exist (quant convs are optional), in order."""
    return [p for m in modules if m is not None for p in m.parameters()]


class Adapter:
    """The shared part of every family: images and clips, freezing by group, parameter counts, size and length
    checks, device moves.

    A family sets `family` and implements `_encode`, `_decode`, `_normalize` and `_denormalize` on its native shape
    (`is_video`: clips (B, C, T, H, W); else images (B, C, H, W)), measure_normalization, set_normalization,
    normalization, param_groups, save_pretrained, spatial_factor, latent_channels, sample_size and fp16_safe; a video
    family also temporal_factor (`kl_autoencoder.interface.LatentAutoencoder` says what each means).
    """

    family = ""
    # a causal video model taking (B, C, T, H, W) natively; an image family takes clips frame by frame
    is_video = False

    def __init__(self, module: nn.Module, class_name: str):
        self.module = module  # what training prepares, moves and puts in train() mode
        self.class_name = class_name

    def __repr__(self) -> str:
        return f"<{self.family} autoencoder ({self.class_name}), f{self.spatial_factor}, {self.latent_channels} ch>"

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame (after the first, which a causal model encodes alone); 1 for image families."""
        return 1

    @property
    def frame_step(self) -> int:
        """Clip lengths are 1 + frame_step * k: the temporal factor, more where the class's chunking asks; 1 (any
        length) for an image family."""
        return self.temporal_factor if self.is_video else 1

    def check_frames(self, n: int) -> None:
        """Raise ValueError (one line naming the lengths it takes) for a clip of `n` frames it cannot take."""
        s = self.frame_step
        if n >= 1 and (n - 1) % s == 0:
            return
        examples = ", ".join(str(1 + s * k) for k in range(5))
        lengths = "any number of frames >= 1 (frame by frame)" if s == 1 else f"1 + {s}k frames ({examples}, ...)"
        raise ValueError(f"{self.class_name} takes clips of {lengths}, got {n}")

    def longest_frames(self, n: int) -> int:
        """The longest clip length <= n that the model takes (n for an image family)."""
        if n < 1:
            self.check_frames(n)
        return 1 + (n - 1) // self.frame_step * self.frame_step

    def _shaped(self, x: torch.Tensor, fn: Callable):
        """`fn`, the family's call on its native shape, on images (B, C, H, W) or clips (B, C, T, H, W): an image
        family folds T into the batch (frame by frame); a video family sees an image as a one-frame clip."""
        if x.dim() not in (4, 5):
            shape = tuple(x.shape)
            raise ValueError(f"{self.class_name} takes (B, C, H, W) images or (B, C, T, H, W) clips, got {shape}")
        if (x.dim() == 5) == self.is_video:
            return fn(x)
        if self.is_video:
            return reshaped(fn(x[:, :, None]), lambda t: t[:, :, 0])  # (B, C, 1, H, W) and back
        return reshaped(fn(fold_frames(x)), lambda t: unfold_frames(t, x.shape[0]))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian | PointPosterior:
        """(B, C, H, W) -> posterior over (B, C', h, w); (B, C, T, H, W) -> over (B, C', t, h, w)."""
        if x.dim() == 5:
            self.check_frames(x.shape[2])
        return self._shaped(x, self._encode)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C', h, w) -> (B, C, H, W); (B, C', t, h, w) -> (B, C, T, H, W)."""
        return self._shaped(z, self._decode)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents of either shape -> what the family's pipeline feeds its transformer."""
        return self._shaped(z, self._normalize)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return self._shaped(latents, self._denormalize)

    def gradient_checkpointing(self, on: bool = True) -> None:
        """Recompute activations in backward instead of keeping them (less memory, more time), through the class's own
        `enable_gradient_checkpointing`; ValueError where the class has none."""
        self.module.enable_gradient_checkpointing() if on else self.module.disable_gradient_checkpointing()

    def tiling(self, on: bool = True, tile: int | None = None) -> None:
        """Memory-bounded encode / decode of large frames through the class's own tiling where it has one (blended
        overlapping tiles: close to, not equal to, the whole pass); a no-op for a class without one. `tile`: tiles of
        that many pixels a side overlapping by a quarter (the stride a multiple of `image_multiple`), given to the
        class's `enable_tiling(tile_sample_min_height=..., ...)`; None: the sizes the class holds now (its defaults
        unless set before)."""
        if not hasattr(self.module, "use_tiling"):
            return
        if on and tile is not None:
            m = self.image_multiple
            stride = max(m, tile * 3 // 4 // m * m)
            self.module.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
                                      tile_sample_stride_height=stride, tile_sample_stride_width=stride)  # fmt: skip
        self.module.use_tiling = on

    @property
    def image_multiple(self) -> int:
        """Image height and width must be multiples of this (the spatial factor, more where latents are patched)."""
        return self.spatial_factor

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError (one line) when images of this size cannot go through encode, normalize and decode."""
        m = self.image_multiple
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ValueError(f"{self.class_name} takes images whose sides are multiples of {m}, got {height}x{width}")

    @property
    def image_channels(self) -> int:
        """Channels of the images it takes and gives: 1 gray, 3 RGB, 4 RGBA (channel 3 alpha), N bands."""
        return 3

    def channel_convs(self) -> ChannelConvs:
        """The layers `kl_autoencoder.channels.adapt_channels` widens or narrows; ValueError for a class whose
        channels it does not adapt."""
        raise ValueError(f"{self.class_name}'s image channels cannot be widened or narrowed here (our AutoencoderKL "
                         "and VQModel, AutoencoderKLFlux2, AutoencoderDC, AutoencoderKLQwenImage, AutoencoderKLWan "
                         "and AutoencoderKLHunyuanImage can)")  # fmt: skip

    def set_image_channels(self, channels: int) -> None:
        """Record a new channel count in the config, so that save_pretrained writes it (after `channel_convs` were
        resized)."""
        raise ValueError(f"{self.class_name}: its image channels are not recorded here")

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

    # the class's config keys that hold the image channels, and how many config channels one image channel is
    channel_keys: tuple[str, ...] = ("in_channels", "out_channels")
    channel_factor = 1

    @property
    def image_channels(self) -> int:
        return int(self.config[self.channel_keys[0]]) // self.channel_factor

    def set_image_channels(self, channels: int) -> None:
        self.module.register_to_config(**{key: channels * self.channel_factor for key in self.channel_keys})

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


class ModuleRatios:
    """The factors of the classes that hold them as module attributes (HunyuanVideo and 1.5, LTX-Video and LTX-2):
    `spatial_compression_ratio` and `temporal_compression_ratio`, derived by the class from its own levels."""

    module: nn.Module

    @property
    def spatial_factor(self) -> int:
        return int(self.module.spatial_compression_ratio)

    @property
    def temporal_factor(self) -> int:
        return int(self.module.temporal_compression_ratio)


class ScaledLatents:
    """The normalization of the pipelines that scale latents by `scaling_factor` alone (SANA, HunyuanImage,
    HunyuanVideo, CogVideoX): z * scaling_factor, measured as 1 / RMS, which makes the mean square of all values 1
    (a scalar cannot make every channel unit). A config without one (None) passes latents unscaled."""

    config: dict

    @property
    def scaling_factor(self) -> float:
        scale = self.config["scaling_factor"]
        return 1.0 if scale is None else float(scale)

    def _normalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scaling_factor

    def _denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scaling_factor

    def measure_normalization(self, batches: Iterable[torch.Tensor]) -> dict:
        return {"scaling_factor": 1.0 / ChannelMoments(batches).rms()}

    def normalization(self) -> dict:
        return {"convention": "z * scaling_factor", "scaling_factor": self.scaling_factor}


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


# config.json's record of a per-frame model: an "_" key, which diffusers keeps and ignores on load
PER_FRAME_KEY = "_per_frame"


class PerFrame(Adapter):
    """A causal video family taken frame by frame: every frame of a clip is a one-frame clip of its own, folded into
    the batch (`Adapter._shaped`, as for an image family), so no frame sees another and t = T. The baseline a video
    VAE's temporal compression is measured against: the same architecture, with `temperal_downsample` off, that
    cannot use time. (A class's causal 3-D convolutions see only zero padding before a first frame.)

    The rest is the video family's own (config, normalization, parameter groups, channels, saving);
    `save_pretrained` records `PER_FRAME_KEY`, so that `load_autoencoder` takes the folder frame by frame again.
    """

    is_video = False  # clips frame by frame: temporal_factor 1, any clip length

    def __init__(self, video: Adapter):
        if not video.is_video:
            raise ValueError(f"{video.class_name} is an image model: it takes clips frame by frame already")
        super().__init__(video.module, video.class_name)
        self.video = video

    def __getattr__(self, name: str):
        # called only for what neither this class nor Adapter defines: the family's config, param_groups, ...
        if name.startswith("__") or name == "video":  # copy and pickle probe before __dict__ is filled
            raise AttributeError(name)
        return getattr(self.video, name)

    def __repr__(self) -> str:
        return f"<{self.family} autoencoder ({self.class_name}) per frame, f{self.spatial_factor}, " \
               f"{self.latent_channels} ch>"  # fmt: skip

    @property
    def family(self) -> str:
        return self.video.family

    # each a call on frames (N, C, H, W), which the video family takes as N one-frame clips
    def _encode(self, x: torch.Tensor):
        return self.video.encode(x)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.video.decode(z)

    def _normalize(self, z: torch.Tensor) -> torch.Tensor:
        return self.video.normalize(z)

    def _denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return self.video.denormalize(latents)

    # what Adapter defines for every family and the video family may define otherwise
    @property
    def image_multiple(self) -> int:
        return self.video.image_multiple

    def check_size(self, height: int, width: int) -> None:
        self.video.check_size(height, width)

    @property
    def image_channels(self) -> int:
        return self.video.image_channels

    def channel_convs(self) -> ChannelConvs:
        return self.video.channel_convs()

    def set_image_channels(self, channels: int) -> None:
        self.video.set_image_channels(channels)

    def tiling(self, on: bool = True, tile: int | None = None) -> None:
        self.video.tiling(on, tile)

    def gradient_checkpointing(self, on: bool = True) -> None:
        self.video.gradient_checkpointing(on)

    def save_pretrained(self, path: str | Path, extra_config: dict | None = None) -> Path:
        return self.video.save_pretrained(path, {**(extra_config or {}), PER_FRAME_KEY: True})


def as_saved(folder: Path, ae: Adapter) -> Adapter:
    """`ae`, loaded from `folder`, frame by frame where its config.json records so (`PerFrame`)."""
    config = json.loads((folder / CONFIG_NAME).read_text())
    return PerFrame(ae) if config.get(PER_FRAME_KEY) else ae
