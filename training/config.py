"""The training configuration: typed dataclasses whose defaults are the recipe.

A run's config is built in three layers: the dataclass defaults, which ARE the CPU default run (the `tiny`
recipe on the bundled photos: `configs/tiny.yaml` adds nothing to them), then a YAML recipe
(`configs/<name>.yaml` or any file), then `section.key=value` overrides from the command line. Every key is
checked against the dataclasses and every value against its type and range before anything heavy starts; a
mistake is a `ConfigError` naming the key. The resolved config is saved as `<out>/config.yaml`.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from kl_ae.common.config import ConfigError, DataConfig, check_writable, merge, parse_override
from kl_ae.common.transforms import TRANSFORMS
from kl_autoencoder.diffusers_format import is_hub_name
from kl_autoencoder.quantize import QuantizerConfig


@dataclass
class ModelConfig:
    preset: str = "tiny"  # a name from kl_autoencoder.PRESETS; the fields below override it
    base_channels: int | None = None
    channel_mult: list[int] | None = None
    layers_per_block: int | None = None
    latent_channels: int | None = None
    norm_num_groups: int | None = None
    num_codes: int | None = None  # vq presets: codebook size
    code_dim: int | None = None  # vq presets: code width (< latent_channels: low-dimensional codes)
    normalize_codes: bool | None = None  # vq presets: L2-normalised codes and lookups (cosine similarity)
    # what a new run builds: "ours" (our KL / VQ Autoencoder: model.preset and the fields above), or a diffusers
    # family's class built from model.arch: "dc-ae" (AutoencoderDC, deterministic), "flux2" (AutoencoderKLFlux2), or
    # the causal video VAEs "wan" (AutoencoderKLWan) and "ltx-video" (AutoencoderKLLTXVideo). With model.init_from
    # the folder's own class trains; a family named here must be that class's
    family: Literal["ours", "dc-ae", "flux2", "wan", "ltx-video"] = "ours"
    # family dc-ae / flux2: the diffusers class's constructor arguments (its config.json keys; the others take its
    # defaults), e.g. {latent_channels: 32, encoder_block_out_channels: [...]}. An unknown key is an error; the
    # override model.arch.KEY=VALUE sets one key (null: the class's default). Not with model.init_from
    arch: dict[str, Any] | None = None
    # start from: a diffusers folder of any supported class (kl_autoencoder.interface), a run or checkpoint
    # folder, a hub model (org/name, or org/name/vae inside a pipeline), or an LDM / SD VAE checkpoint file
    # (.safetensors; a pickle .ckpt loads with weights_only unless trust_pickle)
    init_from: str | None = None
    trust_pickle: bool = False  # unpickle a .ckpt that needs more than tensors: only for files you trust
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    # a video family (wan, ltx-video) taken frame by frame: each frame a one-frame clip folded into the batch, so no
    # frame sees another; the baseline a video VAE's temporal compression is measured against (turn the arch's
    # temporal downsampling off too: its temporal convolutions never see a second frame). Recorded in the export,
    # whose reload takes frames alone too
    per_frame: bool = False

    def validate(self) -> None:
        from kl_autoencoder import PRESETS

        if self.preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        for key in ("base_channels", "layers_per_block", "latent_channels", "norm_num_groups", "num_codes", "code_dim"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"model.{key}: must be > 0, got {value}")
        if self.channel_mult is not None and (not self.channel_mult or min(self.channel_mult) <= 0):
            raise ConfigError(f"model.channel_mult: must be a non-empty list of positive ints, got {self.channel_mult}")
        if self.init_from is not None and not Path(self.init_from).exists() and not is_hub_name(self.init_from):
            raise ConfigError(f"model.init_from: {self.init_from} does not exist (nor is it a hub name org/name)")
        if self.per_frame and self.family not in ("wan", "ltx-video"):
            raise ConfigError(f"model.per_frame: takes a video family (model.family wan or ltx-video), got "
                              f"model.family {self.family}")  # fmt: skip
        if self.per_frame and self.init_from is not None:
            raise ConfigError("model.per_frame: model.init_from's folder records whether it is per frame; leave "
                              "model.per_frame out")  # fmt: skip
        if self.family != "ours":
            self.validate_family()
            return
        if self.arch is not None:
            raise ConfigError(
                "model.arch: the constructor arguments of a diffusers family's class (model.family dc-ae or flux2); "
                "our own model (model.family ours) is set by model.preset and its fields"
            )
        try:
            self.autoencoder_config()
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None

    def validate_family(self) -> None:
        """model.family dc-ae / flux2: model.arch instead of the preset's fields; a folder, not a file, to start
        from. The arguments themselves are checked by building the model (`TrainConfig.validate`)."""
        preset_fields = [name for name in self.preset_fields() if getattr(self, name) is not None]
        if preset_fields:
            raise ConfigError(
                f"model.{preset_fields[0]}: a field of our model's preset; model.family {self.family} is built from "
                "model.arch (its diffusers class's arguments)"
            )
        if self.arch is not None and not (isinstance(self.arch, dict) and all(isinstance(k, str) for k in self.arch)):
            raise ConfigError(f"model.arch: a mapping of argument names to values, got {self.arch!r}")
        if self.init_from is not None and self.arch is not None:
            raise ConfigError("model.arch: model.init_from brings its own architecture; leave model.arch out")
        if self.init_from is not None and Path(self.init_from).is_file():
            raise ConfigError(
                f"model.init_from: a checkpoint file holds an LDM / SD autoencoder (model.family ours); model.family "
                f"{self.family} starts from a diffusers folder, a run or a hub model"
            )

    def preset_fields(self) -> list[str]:
        """The fields that override the preset's `AutoencoderConfig` (our own model only)."""
        others = ("preset", "family", "arch", "init_from", "trust_pickle", "gradient_checkpointing", "per_frame")
        return [f.name for f in fields(self) if f.name not in others]

    def autoencoder_config(self):
        """The `AutoencoderConfig` this section describes: the preset with the overrides applied."""
        from kl_autoencoder import PRESETS

        overrides = {name: getattr(self, name) for name in self.preset_fields() if getattr(self, name) is not None}
        if "channel_mult" in overrides:
            overrides["channel_mult"] = tuple(overrides["channel_mult"])
        return dataclasses.replace(PRESETS[self.preset], **overrides)

    def new_autoencoder(self, channels: int = 3):
        """A new random model of `family` built from `arch` for `channels`-channel images
        (`kl_autoencoder.interface.new_autoencoder`)."""
        from kl_autoencoder.families.base import PerFrame
        from kl_autoencoder.interface import new_autoencoder

        ae = new_autoencoder(self.family, self.arch, channels)
        return PerFrame(ae) if self.per_frame else ae


@dataclass
class LossConfig:
    rec_loss: Literal["l1", "l2"] = "l1"  # l1: Laplace NLL (LDM); l2: Gaussian NLL
    perceptual_weight: float = 1.0  # weight of LPIPS added to the per-pixel error (0: off)
    lpips: Literal["required", "auto", "off"] = "auto"  # auto: train without LPIPS (loudly) if weights are missing
    lpips_net: Literal["vgg", "alex"] = "alex"  # AlexNet costs a quarter of VGG16 here; the full-size recipes use vgg
    lpips_weights: str | None = None  # explicit path to the torchvision backbone file
    lpips_autocast: bool = False  # run LPIPS in the step's bf16/fp16 (faster) instead of fp32 (more exact)
    # clips: LPIPS on this many frames of each clip, drawn at random each step (0: every frame); bounds its memory
    lpips_frames: int = 0
    # the bands LPIPS sees, as triplets: [r, g, b] indices of the data's channels, or 3k indices (k triplets, LPIPS
    # averaged over them). null: 3 channels as they are, 1 repeated to 3, 4 (RGBA) composited over a random solid
    # background per image; other counts train without LPIPS (said loudly at start). Set, it wins for any count
    lpips_channels: list[int] | None = None
    learn_logvar: bool = False  # learn the decoder's output log-variance (sigma_x^2), LDM's `logvar`
    logvar_init: float = 0.0  # the initial (or, without learn_logvar, fixed) output log-variance
    kl_weight: float = 1e-6  # beta; relative to the reduction below
    # sum: LDM's per-image sums (nll over pixels, KL over latent elements);
    # mean: per-element means, so kl_weight means the same at any resolution and compression ratio.
    reduction: Literal["sum", "mean"] = "sum"
    kl_anneal_steps: int = 0  # linear beta warm-up from 0 over this many steps (0: off)
    free_bits: float = 0.0  # per-channel KL floor, nats per latent element (0: off)
    # generator loss: hinge / vanilla -mean(D(x_hat)); non_saturating -log sigmoid(D(x_hat))
    gan_loss: Literal["hinge", "vanilla", "non_saturating"] = "hinge"
    disc_weight: float = 0.5  # multiplies the adaptive GAN weight
    disc_start: int = 900  # step at which the discriminator starts (LDM's ImageNet recipes: 50001)
    disc_ramp: int = 300  # linear ramp of the adversarial factor over this many steps after disc_start
    disc_norm: Literal["batch", "group"] = "group"  # batch (pix2pix) or group (the same on any number of processes)
    disc_channels: int = 32  # the discriminator's first width (LDM's: 64)
    disc_layers: int = 3  # PatchGAN layers
    # 2: a 2-D PatchGAN judging each frame of a clip as an image; 3: a 3-D one over (T, H, W) that judges motion too
    disc_dims: Literal[2, 3] = 2
    codebook_weight: float = 1.0  # vq models: weight of the VQ loss, which takes the KL term's place
    # latent shaping for diffusion (training/shaping.py, training/align.py); all off by default
    eq_weight: float = 0.0  # EQ-VAE: weight of reconstructing T(x) from T(z) (same terms as the main loss)
    eq_prob: float = 0.5  # share of the steps that add that term
    eq_transforms: list[str] = field(default_factory=lambda: list(TRANSFORMS))  # T, drawn uniformly
    latent_noise: float = 0.0  # std of noise added to the decoder's input, relative to the latent's std
    channel_mask: float = 0.0  # share of the steps in which the decoder sees only the first k latent channels
    align_weight: float = 0.0  # VA-VAE's VF loss to a frozen vision model's patch features (x adaptive weight)
    align_model: str = "facebook/dinov2-large"  # a transformers model id or folder (DINOv2 family)
    align: Literal["required", "auto", "off"] = "auto"  # as loss.lpips: auto trains without it, loudly, if missing

    def validate(self) -> None:
        for key in ("perceptual_weight", "kl_weight", "disc_weight", "free_bits", "codebook_weight", "eq_weight",
                    "latent_noise", "align_weight"):  # fmt: skip
            if getattr(self, key) < 0:
                raise ConfigError(f"loss.{key}: must be >= 0, got {getattr(self, key)}")
        for key in ("eq_prob", "channel_mask"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"loss.{key}: must be in [0, 1], got {getattr(self, key)}")
        unknown = [t for t in self.eq_transforms if t not in TRANSFORMS]
        if unknown or not self.eq_transforms:
            raise ConfigError(f"loss.eq_transforms: a non-empty list from {list(TRANSFORMS)}, got {self.eq_transforms}")
        for key in ("kl_anneal_steps", "disc_start", "disc_ramp", "lpips_frames"):
            if getattr(self, key) < 0:
                raise ConfigError(f"loss.{key}: must be >= 0, got {getattr(self, key)}")
        for key in ("disc_channels", "disc_layers"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"loss.{key}: must be > 0, got {getattr(self, key)}")
        if self.lpips_weights is not None and not Path(self.lpips_weights).is_file():
            raise ConfigError(f"loss.lpips_weights: {self.lpips_weights} is not a file")
        bands = self.lpips_channels
        if bands is not None and (not bands or len(bands) % 3 or min(bands) < 0):
            raise ConfigError(f"loss.lpips_channels: band triplets, 3k channel indices >= 0, or null; got {bands}")


@dataclass
class OptimConfig:
    lr: float = 1e-3  # AdamW learning rate of the autoencoder
    disc_lr: float | None = None  # None: the same as lr
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # LDM's Adam betas
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 100  # linear learning-rate warm-up
    # after the warm-up: constant, or a cosine decay to lr * min_lr_ratio at train.max_steps
    schedule: Literal["constant", "cosine"] = "cosine"
    min_lr_ratio: float = 0.0  # the cosine schedule's final learning rate relative to lr
    grad_clip: float = 1.0  # max global grad norm per model (0: off)
    scale_lr: bool = False  # LDM rule: lr x batch_size x processes x grad_accum

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.lr}")
        if self.disc_lr is not None and self.disc_lr <= 0:
            raise ConfigError(f"optim.disc_lr: must be > 0, got {self.disc_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas: must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay: must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip: must be >= 0, got {self.grad_clip}")


@dataclass
class TrainSection:
    max_steps: int = 1200  # optimizer steps
    grad_accum: int = 1  # gradient accumulation (both models)
    log_every: int = 10  # steps between log lines in metrics.jsonl and the trackers
    sample_every: int = 300  # steps between reconstruction grids
    checkpoint_every: int = 600  # steps between checkpoints
    eval_every: int = 300  # steps between validations
    keep_checkpoints: int = 3  # keep the last K checkpoints
    # auto: bf16 autocast where the device runs it natively (CUDA with bf16, CPUs with AVX-512 BF16 / AMX)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    seed: int = 0  # seed of the initialisation, data order and noise
    # any tracker Accelerate supports (training/trackers.py); the sample grids go to it as images
    tracker: Literal[
        "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio", "none"
    ] = "tensorboard"
    ema: bool = True  # keep an EMA of the autoencoder; validation, samples and export use it
    ema_decay: float = 0.999  # the cap; the decay warms up as 1 - (1 + step)^(-2/3)
    max_nonfinite: int = 10  # stop after this many non-finite steps in a row
    # the parameter groups that train: all; decoder (SD's ft-EMA / ft-MSE: the latent space stays as it is); or a
    # list of the autoencoder interface's groups, e.g. [decoder_head] (our model, DC-AE and FLUX.2 also have
    # encoder_out and decoder_in, the projections at the latent: DC-AE's second phase). The others take no gradient
    trainable: (
        Literal["all", "decoder"] | list[Literal["encoder", "decoder", "decoder_head", "encoder_out", "decoder_in"]]
    ) = "all"
    compile: bool = False  # torch.compile the encoder and decoder (the first steps pay for the compilation)
    # wall-clock budget, "H:MM:SS" or "D-HH:MM:SS" (SLURM) or seconds: checkpoint and exit 0 before it runs out.
    # YAML 1.1 reads an unquoted 3:50:00 as the integer 13800 (base 60): the same number of seconds
    max_time: str | int | None = None
    export: bool = True  # write RUN/diffusers/ with measured latent factors when the run finishes (false: skip it)

    def trainable_groups(self) -> list[str] | None:
        """The groups `trainable` names (kl_autoencoder.interface.TRAINABLE); None for all."""
        if self.trainable == "all":
            return None
        return ["decoder"] if self.trainable == "decoder" else list(self.trainable)

    def max_time_seconds(self) -> int | None:
        """`max_time` in seconds (None: no budget); a ConfigError for a malformed value."""
        value = self.max_time
        if value is None:
            return None
        if isinstance(value, bool):
            raise ConfigError(f"train.max_time: expected H:MM:SS, D-HH:MM:SS or seconds, got {value!r}")
        if isinstance(value, int):
            seconds = value
        else:
            m = re.fullmatch(r"(?:(\d+)-)?(\d+):([0-5]\d):([0-5]\d)|(\d+)", value.strip())
            if m is None:
                raise ConfigError(f"train.max_time: expected H:MM:SS, D-HH:MM:SS or seconds, got {value!r}")
            days, hours, minutes, secs, plain = (int(g) if g else 0 for g in m.groups())
            seconds = plain if m.group(5) else ((days * 24 + hours) * 60 + minutes) * 60 + secs
        if seconds <= 0:
            raise ConfigError(f"train.max_time: must be more than 0 seconds, got {value!r}")
        return seconds

    def validate(self) -> None:
        for key in ("max_steps", "grad_accum", "log_every", "sample_every", "checkpoint_every", "eval_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key}: must be > 0, got {getattr(self, key)}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"train.keep_checkpoints: must be >= 1, got {self.keep_checkpoints}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay: must be in (0, 1), got {self.ema_decay}")
        if self.max_nonfinite < 1:
            raise ConfigError(f"train.max_nonfinite: must be >= 1, got {self.max_nonfinite}")
        if isinstance(self.trainable, list) and (not self.trainable or len(set(self.trainable)) < len(self.trainable)):
            raise ConfigError(f"train.trainable: a non-empty list of distinct groups, got {self.trainable}")
        self.max_time_seconds()


@dataclass
class TrainDataConfig(DataConfig):
    """The data section of a run: `DataConfig` (shared with the evaluation commands, whose images come at any
    size) with the default run's sizes."""

    resolution: int = 64  # crop size
    resize: int | None = 128  # shorter side before cropping
    repeats: int = 64  # visits of each training image per epoch (the bundled photos: 12 train, 2 held out)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    vq: QuantizerConfig = field(default_factory=QuantizerConfig)  # how a vq model's codebook trains
    out_dir: str = "runs/default"  # the run folder (--out)

    def validate(self) -> TrainConfig:
        self.model.validate()
        self.data.validate()
        self.loss.validate()
        self.optim.validate()
        self.train.validate()
        groups = self.train.trainable_groups()
        if groups is not None and "encoder" not in groups:  # the frozen encoder must come trained
            if not self.model.init_from:
                what = "decoder-only" if groups == ["decoder"] else f"{groups}-only"
                raise ConfigError(f"train.trainable: {what} training needs model.init_from (a trained encoder)")
            if self.loss.align_weight > 0:
                raise ConfigError(
                    f"loss.align_weight: the VF loss trains the encoder; train.trainable={self.train.trainable} "
                    "freezes it"
                )
        check_writable("out_dir", Path(self.out_dir))
        self.check_channels()
        try:
            QuantizerConfig(**asdict(self.vq))  # its own checks
        except ValueError as e:
            raise ConfigError(f"vq: {e}") from None
        if self.model.family != "ours":
            self.check_family()
            return self
        ae = self.model.autoencoder_config()
        if ae.bottleneck != "vq":
            vq_keys = [
                f"model.{k}" for k in ("num_codes", "code_dim", "normalize_codes") if getattr(self.model, k) is not None
            ]
            vq_keys += [f"vq.{f.name}" for f in fields(self.vq) if getattr(self.vq, f.name) != f.default]
            if vq_keys:
                raise ConfigError(f"{vq_keys[0]}: a VQ option, but model.preset {self.model.preset} is a KL model")
        # a folder or hub model brings its own architecture: its sizes are checked when it is loaded
        init_folder = self.model.init_from is not None and not Path(self.model.init_from).is_file()
        factor = ae.downsample_factor
        if not init_folder and self.data.resolution % factor:
            raise ConfigError(
                f"data.resolution: {self.data.resolution} is not a multiple of the model's downsampling factor {factor}"
            )
        return self

    def check_channels(self) -> None:
        """What the losses ask of data.channels: band indices that exist; the VF loss's vision model reads RGB."""
        channels, bands = self.data.channels, self.loss.lpips_channels
        if bands is not None and max(bands) >= channels:
            raise ConfigError(f"loss.lpips_channels: index {max(bands)} is not a channel of data.channels={channels}")
        if self.loss.align_weight > 0 and channels != 3:
            raise ConfigError(f"loss.align_weight: the VF loss's vision model reads RGB; data.channels is {channels}")

    def check_family(self) -> None:
        """model.family dc-ae / flux2: no VQ option; a new model's arguments and the image size, checked by building
        it on the meta device and passing one image of data.resolution through it (no memory, no compute)."""
        vq_keys = [f"vq.{f.name}" for f in fields(self.vq) if getattr(self.vq, f.name) != f.default]
        if vq_keys:
            raise ConfigError(f"{vq_keys[0]}: a VQ option, but model.family {self.model.family} is not a VQ model")
        if self.model.init_from is not None:  # its own architecture: checked when it is loaded
            return
        r, c = self.data.resolution, self.data.channels
        with torch.device("meta"):
            try:
                ae = self.model.new_autoencoder(c)
            except ValueError as e:
                raise ConfigError(f"model.arch: {e}") from None
            try:
                ae.check_size(r, r)
            except ValueError as e:
                raise ConfigError(f"data.resolution: {e}") from None
            try:
                ae.decode(ae.encode(torch.empty(1, c, r, r)).mode())
            except (RuntimeError, ValueError, AssertionError, IndexError) as e:
                why = " ".join(str(e).split())[:300]
                what = f"{ae.class_name} cannot encode and decode {r} px images"
                raise ConfigError(f"model.arch: {what}: {why}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in importlib.resources.files("kl_ae.configs").iterdir() if p.name.endswith(".yaml"))


def find_recipe(name_or_path: str) -> Path:
    """A YAML file path, or the name of a recipe shipped in `configs/` (found from any directory)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"--config: {name_or_path} is not a file")
        return path
    resource = importlib.resources.files("kl_ae.configs") / f"{name_or_path}.yaml"
    if not resource.is_file():
        names = recipe_names()
        raise ConfigError(f"--config: unknown recipe {name_or_path!r}; choose from {names} or give a YAML file")
    return Path(str(resource))


def merge_config(cfg: TrainConfig, updates: dict, replace_arch: bool) -> None:
    """`merge`, with `model.arch` taken out first and merged here: a mapping of a diffusers class's arguments, whose
    values no type hint describes (building the class checks them). A recipe's arch replaces the one before it
    (`replace_arch`); an override's keys update it, a null value dropping its key."""
    model = updates.get("model") if isinstance(updates, dict) else None
    if not (isinstance(model, dict) and "arch" in model):
        merge(cfg, updates)
        return
    model = dict(model)
    arch = model.pop("arch")
    merge(cfg, {**updates, "model": model})
    if arch is None:
        cfg.model.arch = None
        return
    if not isinstance(arch, dict) or not all(isinstance(k, str) for k in arch):
        raise ConfigError(f"model.arch: a mapping of argument names to values, got {arch!r}")
    merged = {} if replace_arch or cfg.model.arch is None else dict(cfg.model.arch)
    for key, value in arch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    cfg.model.arch = merged


def load_config(config: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults, then the YAML recipe, then the overrides; validated."""
    cfg = TrainConfig()
    if config is not None:
        path = find_recipe(config)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        merge_config(cfg, data, replace_arch=True)
    for text in overrides:
        merge_config(cfg, parse_override(text, TrainConfig), replace_arch=False)
    return cfg.validate()


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config as {"section.key": value}, values the trackers take (numbers, strings, booleans; others as text)."""

    def flat(d: dict, prefix: str) -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out |= flat(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
        return out

    return flat(cfg.to_dict(), "")
