"""LPIPS perceptual distance: a thin, frozen, fp32 wrapper over the `lpips` package.

The `lpips` package ships its calibrated linear heads but fetches the ImageNet backbone
(torchvision VGG16 / AlexNet) itself. We build it with a random backbone and then load the
torchvision file ourselves, from an explicit path or the torch hub cache (downloaded there
with its hash checked on first use, unless offline: `kl_ae.common.weights`), strictly, so a wrong
or truncated file is an error rather than a silently random trunk (taming / latent-diffusion
load with strict=False).

LPIPS is defined for RGB. `ChannelLPIPS` feeds it images of any channel count, each as 3 channels it can take (1
channel repeated, RGBA composited over solid backgrounds, N channels as named band triplets) and refuses the
rest in one line; the trainer decides from data.channels beforehand whether LPIPS runs at all.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import nn

from kl_ae.common import weights
from kl_ae.common.views import BACKGROUND, composite

# torchvision's file names (the hash suffix is part of the name torch.hub looks for)
BACKBONE_FILES = {net: weights.KNOWN[f"lpips-{net}"].file for net in ("vgg", "alex")}
MODES = ("required", "auto", "off")


def _hub_checkpoints() -> Path:
    return weights.cache_dir()


def _check_net(net: str) -> str:
    if net not in BACKBONE_FILES:
        raise ValueError(f"loss.lpips_net: unknown backbone {net!r}; choose one of {list(BACKBONE_FILES)}")
    return BACKBONE_FILES[net]


def find_backbone(net: str, weights_path: str | None = None, download: bool = True) -> tuple[Path | None, str]:
    """(the torchvision backbone file for `net`, "") or (None, why it is not there); fetched when allowed."""
    _check_net(net)
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"loss.lpips_weights: {path} does not exist")
        return path, ""
    return weights.fetch(f"lpips-{net}", download)


def missing_weights_message(net: str, weights_path: str | None = None, why: str = "") -> str:
    """One message that says exactly which file is missing, why, where it goes and where it comes from."""
    file = _check_net(net)
    where = f"the file {weights_path} does not exist" if weights_path else f"{file} was not found"
    return (
        f"LPIPS ({net}) needs the torchvision ImageNet backbone, and {where}" + (f" ({why})" if why else "") + ".\n"
        f"  Download {weights.KNOWN[f'lpips-{net}'].url}\n"
        f"  and put it in {_hub_checkpoints()}/\n"
        f"  (that is torch.hub.get_dir()/checkpoints; set $TORCH_HOME to move it; `kl-ae fetch-weights` does it),\n"
        f"  or point the config key loss.lpips_weights=/path/to/{file} at it.\n"
        f"  To train without the perceptual loss use loss.lpips=off "
        f"(or loss.lpips=auto to use it only when the file is present)."
    )


def _load_backbone(backbone: nn.Module, path: Path) -> None:
    """Copy torchvision `features.{i}.*` tensors into lpips' `slice{k}.{i}.*`, strictly."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a torchvision state dict, got {type(state).__name__}")
    ours = backbone.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    problems: list[str] = []
    for key, tensor in ours.items():
        # lpips keeps torchvision's layer index inside each slice: slice2.5.weight <- features.5.weight
        m = re.fullmatch(r"slice\d+\.(\d+)\.(.+)", key)
        src = f"features.{m.group(1)}.{m.group(2)}" if m else key
        if src not in state:
            problems.append(f"missing {src}")
        elif state[src].shape != tensor.shape:
            problems.append(f"{src} has shape {tuple(state[src].shape)}, expected {tuple(tensor.shape)}")
        else:
            mapped[key] = state[src]
            used.add(src)
    unused = sorted(k for k in state if k.startswith("features.") and k not in used)
    if unused:
        problems.append(f"unexpected backbone tensors {unused[:4]}")
    if problems:
        raise ValueError(f"{path} is not a matching torchvision backbone: " + "; ".join(problems[:6]))
    backbone.load_state_dict(mapped, strict=True)


class LPIPS(nn.Module):
    """Frozen LPIPS distance. Inputs in [-1, 1], shape (B, 3, H, W); returns (B,) in fp32.

    Gradients flow to the inputs (the perceptual loss must reach the decoder; diffusers'
    trainer computed it under no_grad). The module is permanently in eval mode because the
    heads contain Dropout.
    """

    def __init__(
        self,
        net: str = "vgg",
        weights_path: str | None = None,
        random_backbone: bool = False,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.dtype = dtype  # None: fp32 whatever the caller's autocast; bf16/fp16: under autocast to that type
        import lpips  # heavy import (torchvision models); keep it off the module import path

        _check_net(net)
        self.net_name = net
        self.random = random_backbone
        path = None
        if not random_backbone:
            try:
                path, why = find_backbone(net, weights_path)
            except FileNotFoundError:
                path, why = None, ""
            if path is None:
                raise FileNotFoundError(missing_weights_message(net, weights_path, why))
        with warnings.catch_warnings():
            # lpips still passes torchvision's deprecated `pretrained=` argument
            warnings.simplefilter("ignore", UserWarning)
            # pretrained=True loads the calibrated heads from the package; pnet_rand=True keeps
            # the backbone random so nothing is downloaded
            self.model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        if path is not None:
            _load_backbone(self.model.net, path)
        self.weights_path = str(path) if path is not None else None
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        # the heads contain Dropout: a parent's .train() must not turn it on
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # by default in fp32: under bf16 autocast the differences of normalised features lose their low bits
        # (with a random backbone at 26-36 dB PSNR: the distance off by 1-8%, its gradient by ~12%)
        fast = self.dtype is not None
        with torch.autocast(device_type=x.device.type, dtype=self.dtype, enabled=fast):
            d = self.model(x, y, normalize=False) if fast else self.model(x.float(), y.float(), normalize=False)
        return d.reshape(x.shape[0]).float()


class ChannelLPIPS(nn.Module):
    """LPIPS for images of any channel count, (B, C, H, W) in [-1, 1] -> (B,), each image as 3 channels LPIPS takes:

    - `bands` set (3k indices): those channels, k triplets, LPIPS averaged over them (explicit, for any C);
    - 3 channels as they are; 1 channel repeated to 3;
    - 4 (RGBA): the RGB composited over a solid background (`kl_ae.common.views.composite`), the SAME one for both
      images of a pair (x and its reconstruction): a random colour per image per call (`random_background`,
      training: what lies behind transparent pixels never matters, as LayerDiffuse and AlphaVAE train), else the
      metrics' fixed grey (`views.BACKGROUND`: validation scores the composite `kl-ae eval` scores);
    - any other count: ValueError (one line). It never averages bands into 3 channels of its own accord.
    """

    def __init__(self, lpips: nn.Module, bands: list[int] | None = None, random_background: bool = True):
        super().__init__()
        self.lpips = lpips  # frozen, in eval mode (LPIPS)
        self.bands = None if bands is None else list(bands)
        if self.bands is not None and (not self.bands or len(self.bands) % 3):
            raise ValueError(f"LPIPS bands come in triplets (3k channel indices), got {self.bands}")
        self.random_background = random_background

    def deterministic(self) -> ChannelLPIPS:
        """The same network with the fixed background of validation."""
        return ChannelLPIPS(self.lpips, self.bands, random_background=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, b = self.views(x, y)  # (k * B, 3, H, W): k triplets or backgrounds, each a block of B
        return self.lpips(a, b).view(-1, x.shape[0]).mean(0)

    def views(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The 3-channel pairs LPIPS sees for x and y, stacked along the batch (k blocks of B)."""
        C = x.shape[1]
        if self.bands is not None:
            if max(self.bands) >= C:
                raise ValueError(f"LPIPS bands {self.bands} name a channel the {C}-channel images do not have")
            index = torch.tensor(self.bands, device=x.device)
            return tuple(t.index_select(1, index).unflatten(1, (-1, 3)).transpose(0, 1).flatten(0, 1) for t in (x, y))
        if C == 3:
            return x, y
        if C == 1:
            return x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        if C == 4:
            background = self.background(x)  # in [0, 1], as views.composite takes images
            return tuple(composite(t * 0.5 + 0.5, background) * 2 - 1 for t in (x, y))
        raise ValueError(f"LPIPS takes 1, 3 or 4 (RGBA) channels or named band triplets, got {C} channels")

    def background(self, x: torch.Tensor) -> torch.Tensor | float:
        """The solid background of each image in [0, 1]: a random colour (B, 3, 1, 1), or the fixed grey."""
        if not self.random_background:
            return BACKGROUND
        return torch.rand(x.shape[0], 3, 1, 1, device=x.device, dtype=x.dtype)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast type of a resolved `train.mixed_precision` ("no", "bf16", "fp16"); None for fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def build_lpips(
    mode: str,
    net: str = "vgg",
    weights_path: str | None = None,
    dtype: torch.dtype | None = None,
    download: bool = True,
) -> tuple[LPIPS | None, str]:
    """Build LPIPS according to `loss.lpips` = required | auto | off; returns (module or None, why).

    A missing backbone is downloaded first (unless offline, or `download` is False: then only the cache counts).
    """
    if mode not in MODES:
        raise ValueError(f"loss.lpips: unknown mode {mode!r}; choose one of {list(MODES)}")
    _check_net(net)
    if mode == "off":
        return None, "disabled by config"
    try:
        path, why = find_backbone(net, weights_path, download)
    except FileNotFoundError:
        # an explicit path that does not exist is a typo, even under "auto"
        raise FileNotFoundError(missing_weights_message(net, weights_path)) from None
    if path is None:
        if mode == "required":
            raise FileNotFoundError(missing_weights_message(net, weights_path, why))
        return None, (
            f"{BACKBONE_FILES[net]} not found in {_hub_checkpoints()} ({why}; loss.lpips=auto): "
            f"training without the perceptual loss"
        )
    return LPIPS(net, weights_path=str(path), dtype=dtype), f"{net}: {path}"
