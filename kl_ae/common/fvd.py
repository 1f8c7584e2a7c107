"""rFVD: the Fréchet distance between I3D features of clips and of their reconstructions.

The network is the FVD papers' I3D (Kinetics-400) as the `cd-fvd` package (content-debiased FVD, Ge et al. 2024)
ships its PyTorch port; its weights are fetched on first use into the torch hub cache like LPIPS's backbone
(`kl_ae.common.weights`, "fvd-i3d"). Without the package or the file rFVD is reported unavailable with one line
saying what to install or where to put the file, and everything else is measured: never an rFVD from random
weights. Clips are resized to 224 x 224 and scaled to [-1, 1] as cd-fvd's `preprocess_i3d` does; the features are
its 400 logits, the `get_i3d_logits` features cd-fvd's FVD compares.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from kl_ae.common.weights import KNOWN, cache_dir, fetch

MIN_FRAMES = 9  # I3D's temporal pooling needs at least this many frames (its last pool spans 2 of T/8 steps)


def build_i3d(download: bool = True) -> tuple[torch.nn.Module | None, str]:
    """The I3D network in eval mode, or (None, why): what to install, or where to put which file."""
    if importlib.util.find_spec("cdfvd") is None:
        return None, "rFVD needs the cd-fvd package (pip install cd-fvd)"
    path, why = fetch("fvd-i3d", download)
    w = KNOWN["fvd-i3d"]
    if path is None:
        return None, f"{w.file} is not in {cache_dir()} ({why}; download {w.url} there, or run " \
                     "`kl-ae fetch-weights --what fvd`)"  # fmt: skip
    from cdfvd.third_party.i3d.pytorch_i3d import InceptionI3d

    net = InceptionI3d(400, in_channels=3)
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, OSError, ValueError) as e:  # a truncated or foreign file: say so, measure the rest
        return None, f"{path} does not load into I3D ({type(e).__name__}); delete it and fetch it again"
    return net.eval(), str(path)


@torch.no_grad()
def i3d_features(net: torch.nn.Module, clips: Tensor) -> Tensor:
    """400-d I3D features of clips in [0, 1] (B, 3, T, H, W), quantized to uint8 as a saved video would be. (B, 400)"""
    b, c, t, h, w = clips.shape
    frames = (clips * 255).round().transpose(1, 2).reshape(b * t, c, h, w)  # as cd-fvd reads uint8 frames
    frames = torch.nn.functional.interpolate(frames, size=(224, 224), mode="bilinear", align_corners=False)
    x = (frames.view(b, t, c, 224, 224).transpose(1, 2) * (2 / 255) - 1).to(next(net.parameters()).dtype)
    return net(x).reshape(b, -1).double()
