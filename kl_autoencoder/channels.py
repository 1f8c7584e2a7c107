"""Start a non-RGB autoencoder from an RGB one: widen 3 -> 4 (RGBA) or narrow 3 -> 1 (gray) its first and last convs.

3 -> 4 is the initialisation of Qwen-Image-Layered's RGBA-VAE (arXiv 2512.15603: W_E[:, 3] = 0, W_D[3] = 0,
b_D[3] = 1; AlphaVAE also widens an RGB VAE with the RGB kernels kept): the encoder's first conv keeps its RGB
kernels and gets a zero alpha kernel, so the latent of an RGBA image is the RGB model's latent of its RGB channels;
the decoder's last conv keeps its RGB rows and gets a zero alpha row with bias +1, so every pixel decodes opaque
(alpha +1 in [-1, 1]). At step 0 the RGB channels therefore reconstruct exactly as the RGB model's.

3 -> 1: the first conv's kernels are summed over R, G and B, so a gray image g as one channel gives the first
activations of g repeated to RGB; the last conv's rows and biases are averaged, so the gray output is the mean of
the RGB outputs. A gray image then reconstructs as the channel mean of the RGB model's reconstruction of it (a class
that clamps its output, Wan's and Qwen-Image's, to [-1, 1], equally where no channel is clamped).

Works on any family adapter whose `channel_convs` names the two layers (`kl_autoencoder.interface`); the new count
goes into the module's config, so `save_pretrained` writes a folder its diffusers class loads strictly.
"""

from __future__ import annotations

import torch
from torch import nn

from .interface import LatentAutoencoder

ALPHA_BIAS = 1.0  # the alpha output at step 0: +1 is opaque in [-1, 1]


def adapt_channels(ae: LatentAutoencoder, channels: int) -> str:
    """Widen (3 -> 4) or narrow (3 -> 1) `ae` in place to take and give `channels`-channel images; returns a line
    saying what was done ("" when it has those channels already). ValueError (one line, naming both counts) for
    any other pair, or a class whose convs it does not adapt."""
    have = ae.image_channels
    if have == channels:
        return ""
    if (have, channels) not in ((3, 4), (3, 1)):
        raise ValueError(f"{ae.class_name} takes {have}-channel images and the data has {channels}; only an RGB model "
                         "is adapted, to RGBA (3 -> 4) or gray (3 -> 1)")  # fmt: skip
    convs = ae.channel_convs()
    if convs.last.bias is None:  # none of the adapted classes; the alpha row's bias is what makes it opaque
        raise ValueError(f"{ae.class_name}'s last conv has no bias: its new output channel cannot be initialised")
    with torch.no_grad():
        if channels == 4:
            _resize_input(convs.first, convs.in_group, lambda w: torch.cat([w, torch.zeros_like(w[:, :1])], 1))
            _resize_output(convs.last, convs.out_group, _with_alpha_row)
            what = "widened 3 -> 4 channels: RGB kernels kept, alpha input kernel 0, alpha output 0 * h + 1 (opaque)"
        else:
            _resize_input(convs.first, convs.in_group, lambda w: w.sum(1, keepdim=True))
            _resize_output(convs.last, convs.out_group, lambda w, b: (w.mean(0, keepdim=True), b.mean(0, keepdim=True)))
            what = "narrowed 3 -> 1 channel: input kernels summed over R, G, B, output rows and biases averaged"
    ae.set_image_channels(channels)
    return f"{ae.class_name} {what}"


def _with_alpha_row(w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output rows (3, g, ...) and biases (3, g) with the alpha row appended: zero kernel, bias ALPHA_BIAS."""
    return torch.cat([w, torch.zeros_like(w[:1])]), torch.cat([b, torch.full_like(b[:1], ALPHA_BIAS)])


def _resize_input(conv: nn.Conv2d | nn.Conv3d, group: int, fn) -> None:
    """Replace the conv's input kernels: `fn` maps (O, C, g, *k) -> (O, C', g, *k), image channels on dim 1."""
    w = conv.weight  # (O, C * g, *k)
    new = fn(w.unflatten(1, (-1, group))).flatten(1, 2)
    conv.weight = nn.Parameter(new.contiguous(), requires_grad=w.requires_grad)
    conv.in_channels = new.shape[1]


def _resize_output(conv: nn.Conv2d | nn.Conv3d, group: int, fn) -> None:
    """Replace the conv's output rows and biases: `fn` maps ((C, g, I, *k), (C, g)) -> the same with C'."""
    w, b = conv.weight, conv.bias  # (C * g, I, *k), (C * g,)
    new_w, new_b = fn(w.unflatten(0, (-1, group)), b.unflatten(0, (-1, group)))
    conv.weight = nn.Parameter(new_w.flatten(0, 1).contiguous(), requires_grad=w.requires_grad)
    conv.bias = nn.Parameter(new_b.flatten(0, 1).contiguous(), requires_grad=b.requires_grad)
    conv.out_channels = conv.weight.shape[0]
