"""Pretrained files of the frozen feature networks (LPIPS backbones, the FID Inception), fetched on first use.

One registry of the files we know: where each comes from and the sha256 prefix `torch.hub` checks (the hex
part of the file name, as torchvision names its files). They are kept in `torch.hub.get_dir()/checkpoints`,
the cache `torch.hub.load_state_dict_from_url` uses, so a file fetched by torchvision, `lpips` or
torch-fidelity is found here and the reverse. A download goes through `torch.hub.download_url_to_file`: a
temporary file, the hash check, then a rename, so the cache never holds a truncated or wrong file.

Switches, read at every call:
- `KL_AE_OFFLINE=1` or `HF_HUB_OFFLINE=1`: never try the network; only files already in the cache count.
- `KL_AE_WEIGHTS_MIRROR=URL`: fetch `URL/<file name>` instead of the upstream address (an internal server,
  or `file:///shared/weights` on a cluster whose compute nodes are offline); the hash check is the same.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

OFFLINE_SWITCHES = ("KL_AE_OFFLINE", "HF_HUB_OFFLINE")
MIRROR = "KL_AE_WEIGHTS_MIRROR"
_TRUE = {"1", "on", "yes", "true"}  # what huggingface_hub reads as true


@dataclass(frozen=True)
class Weights:
    file: str  # the name in the cache (what torchvision / torch-fidelity look for)
    url: str  # upstream address
    sha256: str  # a prefix of the file's sha256, checked after every download
    what: str  # for messages

    def source(self) -> str:
        """The address a download uses: the mirror's when `KL_AE_WEIGHTS_MIRROR` is set."""
        mirror = os.environ.get(MIRROR, "").strip()
        return f"{mirror.rstrip('/')}/{self.file}" if mirror else self.url


INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
KNOWN: dict[str, Weights] = {
    "lpips-vgg": Weights(
        "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth", "397923af",
        "torchvision VGG16, the LPIPS backbone",
    ),
    "lpips-alex": Weights(
        "alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "7be5be79",
        "torchvision AlexNet, the LPIPS alex backbone",
    ),
    # torch-fidelity's port of TensorFlow's FID Inception (inception-2015-12-05), which torchmetrics' FID uses
    "fid-inception": Weights(
        INCEPTION_FILE, f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}",
        "6726825d", "the FID Inception (torch-fidelity's port of TF inception-2015-12-05)",
    ),
    # the FVD papers' I3D (Kinetics-400), as TATS and content-debiased FVD (the cd-fvd package) load it;
    # no published hash: the file is checked by loading it into the network
    "fvd-i3d": Weights(
        "i3d_pretrained_400.pt", "https://github.com/songweige/TATS/raw/main/tats/fvd/i3d_pretrained_400.pt", "",
        "the FVD I3D network (Kinetics-400)",
    ),
}  # fmt: skip


def cache_dir() -> Path:
    # torch.hub.get_dir() honours torch.hub.set_dir(), then $TORCH_HOME/hub, then ~/.cache/torch/hub
    return Path(torch.hub.get_dir()) / "checkpoints"


def offline_switch() -> str | None:
    """The switch that forbids downloads ("HF_HUB_OFFLINE=1"), or None when downloads may be tried."""
    for name in OFFLINE_SWITCHES:
        value = os.environ.get(name, "")
        if value.strip().lower() in _TRUE:
            return f"{name}={value}"
    return None


def _entry(name: str) -> Weights:
    if name not in KNOWN:
        raise ValueError(f"unknown weights {name!r}; known: {sorted(KNOWN)}")
    return KNOWN[name]


def fetch(name: str, download: bool = True, progress: bool = True) -> tuple[Path | None, str]:
    """(the cached file of `name`, "") or (None, why it is not there): downloaded and hash-checked when missing.

    download=False (e.g. every process but the first on a machine) only looks in the cache.
    """
    w = _entry(name)
    path = cache_dir() / w.file
    if path.is_file():
        return path, ""
    if not download:
        return None, "not downloaded by this process"
    switch = offline_switch()
    if switch:
        return None, f"not downloaded: offline ({switch})"
    url = w.source()
    print(f"downloading {w.what}: {url} -> {path}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=w.sha256 or None, progress=progress)
    except RuntimeError as e:  # torch.hub's hash check; the temporary file is already removed
        return None, f"refused the download from {url}: {e}"
    except (OSError, ValueError) as e:  # URLError, HTTPError, a bad mirror address, a full disk: nothing cached
        return None, f"download from {url} failed: {type(e).__name__}: {e}"
    return path, ""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(name: str) -> tuple[bool, str]:
    """(whether the cached file of `name` has the expected hash, a line saying so)."""
    w = _entry(name)
    path = cache_dir() / w.file
    if not path.is_file():
        return False, f"{w.file}: not in {path.parent}"
    actual = sha256_of(path)
    if not w.sha256:  # no published hash: the network that loads it checks its shapes
        return True, f"{path}: sha256 {actual[:16]}... (no published hash to compare)"
    if not actual.startswith(w.sha256):
        return False, f"{path}: sha256 {actual[:16]}... does not start with {w.sha256}; delete it and fetch again"
    return True, f"{path}: sha256 {w.sha256}... ok"
