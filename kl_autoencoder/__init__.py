"""The KL autoencoder of latent diffusion and its diffusers export; usable without the training code."""

from .export import (
    find_diffusers_folder,
    from_diffusers_config,
    from_diffusers_state_dict,
    load_diffusers,
    save_diffusers,
    to_diffusers_config,
    to_diffusers_state_dict,
)
from .model import PRESETS, Autoencoder, AutoencoderConfig, DiagonalGaussian

__all__ = [
    "PRESETS",
    "Autoencoder",
    "AutoencoderConfig",
    "DiagonalGaussian",
    "find_diffusers_folder",
    "from_diffusers_config",
    "from_diffusers_state_dict",
    "load_diffusers",
    "save_diffusers",
    "to_diffusers_config",
    "to_diffusers_state_dict",
]
