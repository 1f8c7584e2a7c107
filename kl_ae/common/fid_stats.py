"""rFID reference statistics, cached per image set and protocol: the real side of a 50k-image rFID is computed once.

The real images' Inception features depend only on the images, how they are resized and cropped (protocol,
resolution, the evaluated sizes), and the feature network. Their mean and covariance are stored under a key
of exactly those in `$KL_AE_CACHE/fid-stats/` (default `$XDG_CACHE_HOME/kl-ae/fid-stats`, i.e.
`~/.cache/kl-ae/fid-stats`), one safetensors file per key with the key in its metadata. An image set is
identified by its rows: files by path, size and modification time (an edited file makes a new set), rows
stored in a hub dataset by the `datasets` fingerprint of the selected table.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kl_ae.common.data import EvalImages


def cache_root() -> Path:
    base = os.environ.get("KL_AE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kl-ae"
    return Path(base) / "fid-stats"


def image_set_digest(images: EvalImages) -> str:
    """A digest of which images, as stored, make up the set (see the module docstring)."""
    table, column = images.table, images.column
    first = table[0][column] if len(table) else None
    if isinstance(first, dict) and first.get("bytes") is not None:  # image bytes in the table: do not read them all
        return f"datasets:{table._fingerprint}"
    digest = hashlib.sha256()
    for value in table.select_columns([column])[column]:
        path = value if isinstance(value, str) else value["path"]
        st = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return f"files:{digest.hexdigest()}"


def reference_key(images: EvalImages, sizes: set[tuple[int, int]], implementation: dict) -> dict:
    """Everything the real images' features depend on."""
    return {
        "images": image_set_digest(images),
        "num_images": len(images),
        "protocol": images.protocol if images.resolution is not None else "own size",
        "resolution": images.resolution,
        "sizes": sorted(f"{h}x{w}" for h, w in sizes),
        "features": implementation,
    }


def reference_file(key: dict) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_root() / f"{name}.safetensors"


def load_reference(key: dict) -> tuple[torch.Tensor, torch.Tensor, Path] | None:
    """(mean, covariance, file) cached under `key`, or None."""
    path = reference_file(key)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if json.loads(f.metadata()["key"]) != key:  # a hash collision on the name: treat as absent
            return None
        return f.get_tensor("mu"), f.get_tensor("sigma"), path


def save_reference(key: dict, mu: torch.Tensor, sigma: torch.Tensor) -> Path:
    """Store the statistics under `key` (written aside, then renamed: a reader never sees half a file)."""
    path = reference_file(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tensors = {"mu": mu.double().contiguous().cpu(), "sigma": sigma.double().contiguous().cpu()}
    save_file(tensors, str(tmp), metadata={"key": json.dumps(key, sort_keys=True)})
    os.replace(tmp, path)
    return path
