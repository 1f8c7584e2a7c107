"""The frozen vision foundation model of VA-VAE's VF loss (Yao et al. 2025; hustvl/LightningDiT `vavae`).

DINOv2 (or a model of its family) through `transformers` (`pip install "kl-autoencoder[align]"`): images in
[-1, 1] -> patch features (B, D, h, w) on the latent's grid. The image is resized so that the model's patch grid
equals the latent's (VA-VAE resizes 256 px images to 224 for DINOv2's 14 px patches and its 16 x 16 f16 latent).

Its weights are handled as LPIPS's (`loss.align`): `required` stops before training with one line saying what is
missing, `auto` trains without the term and says so loudly, `off` never loads it. `transformers` fetches the
model into the Hugging Face cache when online; `HF_HUB_OFFLINE=1` never tries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's input normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)


class FoundationFeatures(nn.Module):
    """Frozen patch features of a ViT from `transformers` (a `Dinov2Model`-like module), in fp32, eval mode."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        config = model.config
        self.patch_size = int(config.patch_size)
        self.dim = int(config.hidden_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> FoundationFeatures:
        return super().train(False)  # frozen: a parent's .train() must not turn on dropout

    @torch.no_grad()
    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> features (B, D, *grid)."""
        h, w = grid
        with torch.autocast(x.device.type, enabled=False):
            x = F.interpolate(x.float(), size=(h * self.patch_size, w * self.patch_size), mode="bilinear")
            x = ((x + 1) / 2 - self.mean) / self.std
            tokens = self.model(pixel_values=x).last_hidden_state  # (B, specials + h*w, D)
        return tokens[:, -h * w :].transpose(1, 2).reshape(x.shape[0], self.dim, h, w)


def missing_message(name: str, why: str) -> str:
    return (
        f"loss.align_model: the vision foundation model {name!r} could not be loaded ({why}). Online, it is "
        f"downloaded into the Hugging Face cache on first use; for an offline machine run "
        f"`huggingface-cli download {name}` where there is internet (or give a local folder as loss.align_model). "
        f"To train without the VF loss: loss.align=off or loss.align_weight=0"
    )


def build_align(mode: str, name: str) -> tuple[FoundationFeatures | None, str]:
    """The foundation model per `loss.align` = required | auto | off: (module or None, status / why not)."""
    if mode == "off":
        return None, "disabled by config"
    try:
        from transformers import AutoModel
    except ImportError:
        why = "transformers is not installed: pip install 'kl-autoencoder[align]'"
    else:
        try:
            model = AutoModel.from_pretrained(name)
        except Exception as e:  # offline, not cached, not a model: one line for the user either way
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}" if str(e) else type(e).__name__
        else:
            if not hasattr(model.config, "patch_size"):
                raise ValueError(f"loss.align_model: {name} is not a ViT with patch features (no patch_size)")
            return FoundationFeatures(model), name
    if mode == "required":
        raise FileNotFoundError(missing_message(name, why))
    return None, f"{name} unavailable ({why}) (loss.align=auto): training WITHOUT the VF loss"
