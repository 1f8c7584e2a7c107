"""The KL (and VQ) autoencoder of latent diffusion and its diffusers export; usable without the training code."""

from .config import PRESETS, AutoencoderConfig
from .diffusers_format import (
    check_exportable,
    from_diffusers_config,
    from_diffusers_state_dict,
    save_diffusers,
    to_diffusers_config,
    to_diffusers_state_dict,
)
from .folders import find_diffusers_folder, run_weights
from .model import Autoencoder, DiagonalGaussian, load_diffusers
from .quantize import Latents, QuantizerConfig, QuantizerOutput, VectorQuantizer

__all__ = [
    "PRESETS",
    "Autoencoder",
    "AutoencoderConfig",
    "DiagonalGaussian",
    "Latents",
    "QuantizerConfig",
    "QuantizerOutput",
    "VectorQuantizer",
    "check_exportable",
    "find_diffusers_folder",
    "from_diffusers_config",
    "from_diffusers_state_dict",
    "load_diffusers",
    "run_weights",
    "save_diffusers",
    "to_diffusers_config",
    "to_diffusers_state_dict",
]
