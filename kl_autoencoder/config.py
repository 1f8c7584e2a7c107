"""The autoencoder's configuration: one dataclass and the named presets (the only registry).

Its own module so that the model (`model.py`) and the diffusers conversion (`diffusers_format.py`) both read it
without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AutoencoderConfig:
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128  # width of the first level
    # width of each resolution level as a multiple of base_channels; one stride-2 downsampling between
    # consecutive levels, so the spatial downsampling factor is 2 ** (len(channel_mult) - 1)
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    # resnets per encoder level; the decoder has one more per level (as LDM and diffusers)
    layers_per_block: int = 2
    latent_channels: int = 4  # channels of the latent
    norm_num_groups: int = 32  # GroupNorm groups
    # levels (0 = full resolution) whose resnets are each followed by self-attention, in the encoder and
    # the decoder: LDM's attn_resolutions, expressed as levels so it does not depend on the image size
    attn_levels: tuple[int, ...] = ()
    mid_attention: bool = True  # self-attention between the two resnets of the lowest-resolution mid block
    # 1x1 convs on the moments after the encoder and on z before the decoder (SD 1/2: on; Flux/SD3: off)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    bottleneck: str = "kl"  # "kl": diagonal Gaussian posterior (AutoencoderKL); "vq": codebook (VQModel)
    # vq only: codebook size; code width, the quant_conv mapping latent_channels -> code_dim (low-dimensional
    # codes are used more evenly); L2-normalised codes and lookups (cosine similarity)
    num_codes: int = 16384
    code_dim: int = 4
    normalize_codes: bool = False
    sample_size: int = 256  # training resolution, recorded in the diffusers config (sets its tile size)
    # latent normalization for the diffusion model, latents = (z - shift_factor) * scaling_factor;
    # measured on data after training (LDM's scale_by_std), stored in the exported config only
    scaling_factor: float = 1.0
    shift_factor: float | None = None
    latents_mean: list[float] | None = None  # per-channel statistics, an alternative some pipelines use
    latents_std: list[float] | None = None
    force_upcast: bool = True  # hint to diffusers pipelines to run the VAE in fp32 (fp16 may overflow)

    def __post_init__(self) -> None:
        # YAML gives lists; tuples keep the config hashable and comparable
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attn_levels = tuple(sorted({int(level) for level in self.attn_levels}))
        for name in ("latents_mean", "latents_std"):
            if (value := getattr(self, name)) is not None:
                setattr(self, name, [float(v) for v in value])
                if len(value) != (n := self.latent_channels):
                    raise ValueError(f"{name} has {len(value)} entries, expected latent_channels={n}")
        if self.bottleneck not in ("kl", "vq"):
            raise ValueError(f"bottleneck must be 'kl' or 'vq', got {self.bottleneck!r}")
        positive = ("in_channels", "out_channels", "base_channels", "layers_per_block", "latent_channels",
                    "norm_num_groups", "num_codes", "code_dim")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.bottleneck == "vq" and not (self.use_quant_conv and self.use_post_quant_conv):
            if self.code_dim != self.latent_channels:
                raise ValueError(
                    f"code_dim={self.code_dim} != latent_channels={self.latent_channels} needs use_quant_conv and "
                    "use_post_quant_conv (the 1x1 projections to and from the codes)"
                )
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {self.channel_mult}")
        if any(width % self.norm_num_groups for width in self.block_out_channels):
            raise ValueError(
                f"every level width (base_channels * channel_mult = {list(self.block_out_channels)}) must be "
                f"divisible by norm_num_groups={self.norm_num_groups}"
            )
        if bad := [level for level in self.attn_levels if not 0 <= level < len(self.channel_mult)]:
            raise ValueError(f"attn_levels {bad} out of range for {len(self.channel_mult)} levels")

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


# f4 rather than f8: at the few thousand CPU steps of a default run, an f8 latent (4x8x8 at 64px) cannot
# learn the bundled photos (about 14 dB held-out PSNR); f4 reaches a useful reconstruction in minutes
_TINY = dict(base_channels=16, channel_mult=(1, 2, 2), layers_per_block=1, norm_num_groups=8, sample_size=64)

PRESETS: dict[str, AutoencoderConfig] = {
    # trains in minutes on 2 CPU cores at 64px (latents 4x16x16), fp32 or bf16; the default run, smoke tests
    "tiny": AutoencoderConfig(**_TINY),
    # the SD 1.x / 2.x VAE (LDM kl-f8)
    "kl-f8": AutoencoderConfig(),
    # 16 latent channels without the 1x1 quant convs, as the SD3 and Flux VAEs
    "kl-f8-c16": AutoencoderConfig(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False),
    # LDM kl-f4
    "kl-f4": AutoencoderConfig(channel_mult=(1, 2, 4), latent_channels=3),
    # LDM kl-f16: attention at level 4, i.e. at resolution 16 for 256px images
    "kl-f16": AutoencoderConfig(channel_mult=(1, 1, 2, 2, 4), latent_channels=16, attn_levels=(4,)),
    # `tiny` at 32 base channels with a 256-code VQ bottleneck (256 code positions per 64px image at f4)
    "tiny-vq": AutoencoderConfig(**(_TINY | {"base_channels": 32}), bottleneck="vq", num_codes=256, code_dim=4),
    # LDM vq-f4 (models/first_stage_models/vq-f4): no attention outside the mid block
    "vq-f4": AutoencoderConfig(channel_mult=(1, 2, 4), latent_channels=3, bottleneck="vq", num_codes=8192, code_dim=3),
    # LDM vq-f8 (the first stage of its cin/vq-f8 LDMs): attn_resolutions [32] at 256px, i.e. the lowest level
    "vq-f8": AutoencoderConfig(channel_mult=(1, 2, 2, 4), attn_levels=(3,), bottleneck="vq", num_codes=16384),
}
