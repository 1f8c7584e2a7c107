"""What `kl-ae eval` measures of images beyond 8-bit RGB (1, 4 or N channels; 16-bit or float values).

PSNR per channel (`psnr_per_channel` in metrics.json), and for RGBA the PSNR of alpha and of the RGB composited over
a fixed grey (`psnr_alpha`, `psnr_composite`). LPIPS and rFID see a 3-channel view (`kl_ae.common.views.rgb_view`):
a grayscale channel repeated, RGBA composited (LPIPS as validation scores it: over black and over white, averaged;
Inception: over grey), the band triplets the run named (`loss.lpips_channels`; Inception: the first); with N bands
and none named they are off, with the reason. Every metric is computed on values in [0, 1] of the data's own
range (the set's value mapping, recorded in metrics.json): 16-bit data is scored at its 16-bit peak.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from kl_ae.common.channels import is_rgb8
from kl_ae.common.config import ConfigError
from kl_ae.common.lpips import ChannelLPIPS
from kl_ae.common.metrics import alpha_metrics, psnr_per_channel
from kl_ae.common.views import rgb_view


def run_bands(run: Path | None) -> list[int] | None:
    """The band triplet a run's LPIPS saw (`loss.lpips_channels` of its config.yaml), or None."""
    if run is None:
        return None
    saved = yaml.safe_load((run / "config.yaml").read_text()) or {}
    bands = (saved.get("loss") or {}).get("lpips_channels")
    return [int(b) for b in bands] if bands else None


def rgb_networks(channels: int, bands: list[int] | None, lpips, lpips_status: str, inception, fid_status: str):
    """(lpips, its status, inception, its status) for images of `channels`. LPIPS as validation scores it
    (`ChannelLPIPS`: a channel repeated, RGBA over black and white averaged, every named triplet averaged);
    Inception on `rgb_view`; both off, with the reason, for N bands and no triplet named."""
    if channels == 3 and bands is None:
        return lpips, lpips_status, inception, fid_status
    view, how = rgb_view(torch.zeros(1, channels, 1, 1), bands)
    if view is None:
        return None, how, None, how
    if lpips is not None:
        lpips = ChannelLPIPS(lpips, bands, random_background=False)
        what = f"bands {bands}, triplets averaged" if bands else "the channel repeated" if channels == 1 else (
            "RGBA composited over black and over white, averaged")  # fmt: skip
        lpips_status = f"{lpips_status} (on {what})"
    return lpips, lpips_status, inception, f"{fid_status} (on {how})"


def view_key(mapping: dict, bands: list[int] | None) -> dict:
    """What the real side of rFID depends on beyond the files: how they are read and viewed as RGB ({} for 8-bit
    RGB, so the statistics cached before stay found)."""
    return {} if is_rgb8(mapping) and bands is None else {"view": {"mapping": mapping, "bands": bands}}


def channel_row(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image values of images in [0, 1] beyond the overall PSNR: PSNR per channel (B, C); RGBA: alpha and
    composite PSNR (B,)."""
    row = {"psnr_channels": psnr_per_channel(a, b)}
    if a.shape[1] == 4:
        row |= alpha_metrics(a, b)
    return row


def channel_summary(values: dict[str, torch.Tensor]) -> dict:
    """metrics.json's per-channel entries: the mean over images of each channel's PSNR, and the RGBA ones."""
    out = {"psnr_per_channel": values["psnr_channels"].double().mean(0).tolist()}
    for key in ("psnr_alpha", "psnr_composite"):
        if key in values:
            out[key] = values[key].double().mean().item()
    return out


def peak_note(mapping: dict) -> str:
    """How PSNR's peak relates to the stored values, for metrics.json."""
    if mapping["value_range"] == "format":
        return f"the format's peak: {mapping['peak']:g} of {mapping['dtype']} ({mapping['bit_depth']} bit)"
    return "each channel's measured range (high - low of value_mapping), in [0, 1] after the mapping"


def check_mapping(mapping: dict | None, channels: int, model: str) -> None:
    if mapping is not None and mapping["channels"] != channels:
        raise ConfigError(f"--model: {model} takes {channels} channels; its recorded data had {mapping['channels']}")
