"""The first-stage autoencoder of latent diffusion (KL or VQ): blocks, posterior, model.

Architecture of CompVis/latent-diffusion `ldm/modules/diffusionmodules/model.py` (the SD VAE and LDM's VQ
models). Module names follow diffusers' `AutoencoderKL` / `VQModel` exactly, so `state_dict()` loads strictly
into them; the numerics (GroupNorm eps 1e-6, (0, 1, 0, 1) padding before the stride-2 conv, single-head
attention with scale C**-0.5) are diffusers' too. The config and presets live in `config.py`, the VQ
bottleneck in `quantize.py`, the folder format in `diffusers_format.py` and which folder a path means in
`folders.py` (both imported here, neither importing this file); this file does not import diffusers.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import AutoencoderConfig
from .diffusers_format import CONFIG_NAME, WEIGHTS_NAME, read_diffusers, save_diffusers, state_dict_problems
from .folders import find_diffusers_folder
from .quantize import Latents, QuantizerConfig, QuantizerOutput, VectorQuantizer


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, diag(var)) from the encoder's moments (B, 2L, h, w), or (B, 2L, t, h, w) for a
    video autoencoder's clips."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        self.mean, logvar = torch.chunk(moments, 2, dim=1)  # (B, L, h, w) or (B, L, t, h, w) each
        # as LDM: keeps exp() finite early in training and for untrained encoders
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterized draw, mean + std * eps, so gradients reach mean and logvar."""
        # draw on the generator's device, then move, so a CPU generator gives the same latents on any device
        # (what diffusers' randn_tensor does)
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) in closed form, summed over every dim but the batch ((C, h, w) or (C, t, h, w)): (B,)."""
        dims = list(range(1, self.mean.dim()))
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)


class Checkpointable(nn.Module):
    """A block whose forward can be recomputed in backward (training mode only), trading compute for memory."""

    gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class ResnetBlock(Checkpointable):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(0.0)  # no parameters; kept so the module tree mirrors diffusers'
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.conv_shortcut is not None:
            if self.training:  # x may be channels-last (see Attention); as diffusers, so DDP sees dense grads
                x = x.contiguous()
            x = self.conv_shortcut(x)
        return x + h


class Attention(Checkpointable):
    """Single-head self-attention over the h*w positions, with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # norm over (B, C, HW) as diffusers does: on a channels-last x the 4-D kernel would round differently
        h = self.group_norm(x.flatten(2)).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C), scale C**-0.5
        h = self.to_out[1](self.to_out[0](h)).transpose(1, 2).reshape(B, C, H, W)  # a channels-last view
        # `h + x`, not `x + h`: the sum then takes h's channels-last layout, as in diffusers, and every later
        # conv and norm rounds the same way, so exported models match diffusers bit for bit
        return h + x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # asymmetric padding (LDM's choice), so H and W halve exactly for even sizes
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Level(nn.Module):
    """One resolution level: resnets, each optionally followed by attention, then an optional resampler."""

    def __init__(
        self, in_channels: int, out_channels: int, num_resnets: int, groups: int, attention: bool, resample: str
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_resnets)]
        )
        if attention:  # diffusers' Attn*Block2D; plain blocks have no `attentions` entry at all
            self.attentions = nn.ModuleList([Attention(out_channels, groups) for _ in range(num_resnets)])
        else:
            self.attentions = None
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(out_channels)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(out_channels)])
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.resample == "down":
            x = self.downsamplers[0](x)
        elif self.resample == "up":
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Level(widths[max(level - 1, 0)], width, cfg.layers_per_block, groups, attention=level in cfg.attn_levels,
                  resample="none" if level == len(widths) - 1 else "down")
            for level, width in enumerate(widths)
        )  # fmt: skip
        self.mid_block = MidBlock(widths[-1], groups, cfg.mid_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        # KL: mean and log-variance; VQ: the latents themselves (LDM's double_z)
        out_channels = 2 * cfg.latent_channels if cfg.bottleneck == "kl" else cfg.latent_channels
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, C0, H, W)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)  # (B, C_last, H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2L or L, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[-1], 3, padding=1)
        self.mid_block = MidBlock(widths[-1], groups, cfg.mid_attention)
        # diffusers order: up_blocks[0] is the lowest resolution
        self.up_blocks = nn.ModuleList(
            Level(widths[min(level + 1, len(widths) - 1)], widths[level], cfg.layers_per_block + 1, groups,
                  attention=level in cfg.attn_levels, resample="up" if level > 0 else "none")
            for level in reversed(range(len(widths)))
        )  # fmt: skip
        self.conv_norm_out = nn.GroupNorm(groups, widths[0], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))  # (B, C_last, h, w)
        for block in self.up_blocks:
            h = block(h)  # (B, C_level, ...) doubling h, w in all but the last
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, h*f, w*f)


class Autoencoder(nn.Module):
    """x in [-1, 1] -> latents -> reconstruction; state dict = diffusers' AutoencoderKL (kl) or VQModel (vq).

    vq: `vq` says how the codebook trains (EMA or loss, restarts); it changes no parameter shape or name.
    """

    def __init__(self, config: AutoencoderConfig, vq: QuantizerConfig | None = None):
        super().__init__()
        self.config = config
        L = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.bottleneck == "kl":  # the 1x1 convs act on the moments (2L) and on z (L)
            self.quant_conv = nn.Conv2d(2 * L, 2 * L, 1) if config.use_quant_conv else None
            self.post_quant_conv = nn.Conv2d(L, L, 1) if config.use_post_quant_conv else None
        else:  # they project to and from the codes (L -> code_dim -> L)
            D = config.code_dim
            self.quant_conv = nn.Conv2d(L, D, 1) if config.use_quant_conv else None
            self.quantize = VectorQuantizer(config.num_codes, D, config.normalize_codes, vq)
            self.post_quant_conv = nn.Conv2d(D, L, 1) if config.use_post_quant_conv else None

    def encode(self, x: torch.Tensor) -> DiagonalGaussian | Latents:
        """kl: the posterior over (B, L, h, w). vq: the latents before quantization, (B, code_dim, h, w)."""
        h = self.encoder(x)  # (B, 2L or L, H/f, W/f)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return DiagonalGaussian(h) if self.config.bottleneck == "kl" else Latents(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, L, h, w) -> images (B, out_channels, h*f, w*f); scaling_factor is not applied.

        vq: z are quantized latents (B, code_dim, h, w), `quantize(h).z_q`; unlike diffusers' `VQModel.decode`,
        this does not quantize, so `decode(encode(x).mode())` skips the codebook. `forward` quantizes.
        """
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None,
        return_posterior: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, DiagonalGaussian | QuantizerOutput]:  # fmt: skip
        """Reconstruction, and with return_posterior the posterior (kl) or the quantizer's output (vq: .loss,
        .logs, .indices). vq ignores sample_posterior and generator; in training mode it updates the codebook."""
        # training goes through here (not encode/decode) so that DDP sees the forward and syncs gradients
        z, posterior = self.bottleneck(x, sample_posterior, generator)
        reconstruction = self.decode(z)
        return (reconstruction, posterior) if return_posterior else reconstruction

    def bottleneck(
        self, x: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian | QuantizerOutput]:
        """(z, posterior): the decoder's input for x, and the posterior (kl) or the quantizer's output (vq)."""
        if self.config.bottleneck == "vq":
            posterior = self.quantize(self.encode(x).latents)
            return posterior.z_q, posterior
        posterior = self.encode(x)
        return (posterior.sample(generator) if sample_posterior else posterior.mode()), posterior

    def quantizer_state(self) -> dict[str, torch.Tensor]:
        """vq: the codebook's training statistics (EMA, usage, restart candidates), which state_dict leaves out
        so that it stays diffusers'; save them with every checkpoint. kl: empty."""
        return self.quantize.statistics() if self.config.bottleneck == "vq" else {}

    def load_quantizer_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `quantizer_state()`, after the weights: loading weights restarts the EMA from the codebook."""
        if self.config.bottleneck == "vq":
            self.quantize.load_statistics(state)

    def freeze_encoder(self) -> None:
        """Keep the latent space as it is (decoder-only fine-tuning, SD's ft-EMA / ft-MSE): the encoder,
        quant_conv and a VQ codebook take no gradient, and the codebook no EMA update or restart either."""
        for module in (self.encoder, self.quant_conv, getattr(self, "quantize", None)):
            if module is not None:
                module.requires_grad_(False)
        if self.config.bottleneck == "vq":
            self.quantize.frozen = True

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight LDM's adaptive GAN weight differentiates the losses against."""
        return self.decoder.conv_out.weight

    def enable_gradient_checkpointing(self, flag: bool = True) -> None:
        """Recompute each resnet and attention block in backward (training mode only) to save memory."""
        for module in self.modules():
            if isinstance(module, Checkpointable):
                module.gradient_checkpointing = flag

    def disable_gradient_checkpointing(self) -> None:
        self.enable_gradient_checkpointing(False)  # diffusers' name for it

    @classmethod
    def from_pretrained(
        cls, path: str | Path, vq: QuantizerConfig | None = None, subfolder: str | None = None
    ) -> Autoencoder:
        """Load a diffusers, run or checkpoint folder or a hub name (`subfolder`: a pipeline's "vae"), upcast to fp32,
        in eval mode as diffusers does. A run folder means its newest weights (`find_diffusers_folder`). vq: how a VQ
        codebook trains from here (EMA state from the loaded codebook)."""
        config, state_dict = load_diffusers(find_diffusers_folder(path, subfolder))
        model = cls(config, vq)
        model.load_state_dict(state_dict, strict=True)
        return model.eval()

    def save_pretrained(self, path: str | Path, extra_config: dict | None = None, dtype: torch.dtype | None = None):
        """Write a diffusers `AutoencoderKL` or `VQModel` folder (config.json + diffusion_pytorch_model.safetensors)."""
        return save_diffusers(self, path, extra_config=extra_config, dtype=dtype)


def load_diffusers(path: str | Path) -> tuple[AutoencoderConfig, dict[str, torch.Tensor]]:
    """Read a diffusers AutoencoderKL or VQModel folder; strict: missing, unexpected or mis-shaped keys raise."""
    config, state_dict = read_diffusers(path)
    with torch.device("meta"):  # shapes only, no memory or init time
        expected = {k: v.shape for k, v in Autoencoder(config).state_dict().items()}
    if problems := state_dict_problems(state_dict, expected):
        raise ValueError(f"{Path(path) / WEIGHTS_NAME} does not match its {CONFIG_NAME}; {problems}")
    return config, state_dict
