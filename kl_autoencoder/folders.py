"""Which diffusers folder a path means: a diffusers folder, a training run's folder, a checkpoint folder, a hub name.

`find_diffusers_folder` is the one resolver every command uses (through `Autoencoder.from_pretrained`, or
directly), so that a run folder means the same, newest weights to all of them (`run_weights`). The run folder's
layout is described here because the model package must read it and imports nothing of ours; the trainer writes
it (`training/checkpoint.py`) and the release is written by `kl_ae.common.release`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .diffusers_format import CONFIG_NAME, WEIGHTS_NAME, download_from_hub, is_diffusers_folder, is_hub_name

# A training run's folder as the trainer writes it and every command reads it: `checkpoints/latest` names the
# newest complete checkpoint `step_NNNNNNN/` (its `trainer_state.json`, written last, marks it complete), whose
# `autoencoder/` holds the weights to use (the EMA ones when the run keeps them); `diffusers/` is the release
# written when a run finishes: the same weights plus the latent factors measured on held-out images, its config
# recording the step it was exported from.
CHECKPOINTS, POINTER, STATE_FILE = "checkpoints", "latest", "trainer_state.json"
CHECKPOINT_WEIGHTS, RELEASE = "autoencoder", "diffusers"
EXPORT_KEY = "_kl_ae_export"  # an exported config's record (data, seed, step, ...); diffusers ignores "_" keys
_STEP = re.compile(r"step_(\d+)")


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint named by `checkpoints/latest`, if it is complete (the pointer only ever names one that is)."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / POINTER
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def weights_step(folder: str | Path) -> int | None:
    """The training step of a diffusers folder's weights: a checkpoint's `autoencoder/`, that checkpoint's step; an
    exported folder, the step recorded at export (older exports name their checkpoint folder); otherwise None."""
    folder = Path(folder)
    if folder.name == CHECKPOINT_WEIGHTS and (m := _STEP.fullmatch(folder.parent.name)):
        return int(m[1])
    try:
        record = json.loads((folder / CONFIG_NAME).read_text()).get(EXPORT_KEY)
    except (OSError, ValueError, AttributeError):  # no config, not JSON, not a mapping
        return None
    if not isinstance(record, dict):
        return None
    if isinstance(step := record.get("step"), int):
        return step
    m = re.search(r"step_(\d+)[/\\]" + CHECKPOINT_WEIGHTS + r"$", str(record.get("weights", "")))
    return int(m[1]) if m else None


def run_weights(run: str | Path) -> Path | None:
    """A run folder's newest weights as a diffusers folder; None when `run` holds no complete checkpoint or release.

    The one rule every command follows (`from_pretrained`, eval, probe, encode, init_from, export, bench): the
    release `diffusers/` when it was exported from the latest complete checkpoint or a later step, so that its
    measured latent factors are used; else that checkpoint's `autoencoder/`. A release goes stale when a finished
    run is continued (more steps) and stops early, by `train.max_time` or a signal, without exporting: its newest
    weights then carry no measured factors (scaling_factor 1, no shift) until `kl-ae export` measures them. A
    release whose step is unknown counts as older than any checkpoint.
    """
    run = Path(run)
    latest = find_latest_checkpoint(run)
    newest = latest / CHECKPOINT_WEIGHTS if latest is not None else None
    newest = newest if newest is not None and is_diffusers_folder(newest) else None
    release = run / RELEASE
    if is_diffusers_folder(release):
        step = weights_step(release)
        if newest is None or (step is not None and step >= (weights_step(newest) or 0)):
            return release
    return newest


def find_diffusers_folder(path: str | Path, subfolder: str | None = None) -> Path:
    """Resolve a diffusers folder, a run folder, a checkpoint folder or a hub name to the diffusers folder.

    Run folder: its newest weights (`run_weights`), of whatever family the run trained. Checkpoint folder: its
    `autoencoder/` subfolder (the weights in their own diffusers class). Hub name `org/name[/subfolder]`: downloaded
    (`download_from_hub`).
    `subfolder` is appended to either.
    """
    if subfolder:
        path = f"{str(path).rstrip('/')}/{subfolder.strip('/')}"
    if is_hub_name(path):
        return download_from_hub(str(path))
    path = Path(path)
    if is_diffusers_folder(path):
        return path
    if (weights := run_weights(path)) is not None:
        return weights
    if is_diffusers_folder(path / CHECKPOINT_WEIGHTS):
        return path / CHECKPOINT_WEIGHTS
    looked = [path, path / RELEASE, path / CHECKPOINTS / f"<{POINTER}>" / CHECKPOINT_WEIGHTS, path / CHECKPOINT_WEIGHTS]
    hint = " (a pipeline folder: add --subfolder vae)" if is_diffusers_folder(path / "vae") else ""
    raise FileNotFoundError(
        f"no autoencoder weights found at {path}: looked for {CONFIG_NAME} + {WEIGHTS_NAME} in "
        + ", ".join(map(str, looked))
        + hint
    )
