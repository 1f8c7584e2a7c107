"""The run folder as every command reads it; its layout and the one rule for its weights are the model package's.

A run folder holds `config.yaml`, `checkpoints/` and, once a run has finished, the release `diffusers/`.
`checkpoints/latest` names the newest complete checkpoint `step_NNNNNNN/`, whose `autoencoder/` subfolder holds
the weights to use (the EMA weights when the run keeps one) as a diffusers folder. Which weights a run folder
means is decided once, by `kl_autoencoder.folders.run_weights` (the newest: see there), because
`Autoencoder.from_pretrained(run)` must decide it without importing this layer. Writing checkpoints is training's
job (`training/checkpoint.py`).
"""

from __future__ import annotations

from pathlib import Path

from kl_autoencoder.folders import POINTER, STATE_FILE, checkpoint_name, find_latest_checkpoint, run_weights

__all__ = ["POINTER", "STATE_FILE", "checkpoint_name", "find_latest_checkpoint", "find_run", "latest_weights"]


def find_run(path: str | Path) -> Path | None:
    """The run folder (with config.yaml) that a run, checkpoint, `autoencoder/` or `diffusers/` folder is in."""
    path = Path(path).resolve()
    for candidate in [path, *list(path.parents)[:3]]:
        if (candidate / "config.yaml").is_file() and (candidate / "checkpoints").is_dir():
            return candidate
    return None


def latest_weights(path: str | Path) -> Path:
    """A run folder -> its newest weights (`kl_autoencoder.folders.run_weights`); anything else as it is."""
    return run_weights(path) or Path(path)
