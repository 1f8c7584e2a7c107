"""The run folder's layout, as every command reads it: the checkpoint pointer and where the weights are.

A run folder holds `config.yaml` and `checkpoints/`; `checkpoints/latest` names the newest complete
checkpoint `step_NNNNNNN/`, whose `autoencoder/` subfolder holds the weights to use (the EMA weights when
the run keeps one) as a diffusers folder. Writing checkpoints is training's job (`training/checkpoint.py`).
"""

from __future__ import annotations

from pathlib import Path

POINTER = "latest"
STATE_FILE = "trainer_state.json"


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint named by `checkpoints/latest`, which only ever names a complete checkpoint."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / POINTER
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def find_run(path: str | Path) -> Path | None:
    """The run folder (with config.yaml) that a run, checkpoint, `autoencoder/` or `diffusers/` folder is in."""
    path = Path(path).resolve()
    for candidate in [path, *list(path.parents)[:3]]:
        if (candidate / "config.yaml").is_file() and (candidate / "checkpoints").is_dir():
            return candidate
    return None


def latest_weights(path: str | Path) -> Path:
    """A run folder -> its latest complete checkpoint's `autoencoder/` (the EMA weights); anything else as is."""
    latest = find_latest_checkpoint(path) if (Path(path) / "checkpoints").is_dir() else None
    return latest / "autoencoder" if latest is not None else Path(path)
