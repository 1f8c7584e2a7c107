"""Checkpoints that survive faults, and a clean stop on SIGTERM / SIGINT.

A checkpoint is written into `checkpoints/.tmp_step_N/`, renamed to `checkpoints/step_N/` once
complete, and only then does `checkpoints/latest` (a one-line file, replaced atomically) name it.
A run killed at any moment therefore leaves `latest` pointing at a complete checkpoint; re-running
the same command resumes from it. (k-diffusion's `_state.json` pointer, made crash-safe.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

POINTER = "latest"
STATE_FILE = "trainer_state.json"


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row: the run stops, its last good checkpoint intact."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, permissions): the previous one and `latest` are intact."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def trim_log(path: Path, last_step: int) -> None:
    """Keep the rows of a JSON-lines log up to `last_step`: a killed run's later rows are written again by the
    resumed run, which repeats those steps (a line cut by the kill is dropped too)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint named by `checkpoints/latest`, which only ever names a complete checkpoint."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / POINTER
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def write_atomic(path: Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def temporary_folder(root: Path, step: int, clear: bool = True) -> Path:
    """The `.tmp_step_N` folder a checkpoint is written into (`clear`: discard a killed write's leftover)."""
    tmp = root / f".tmp_{checkpoint_name(step)}"
    if clear and tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def commit(root: Path, tmp: Path, step: int, keep: int) -> Path:
    """Rename a fully written checkpoint into place, move the pointer, then drop all but the last `keep`."""
    final = root / checkpoint_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_atomic(root / POINTER, final.name)
    complete = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp_step_*"):  # left by a killed write
        shutil.rmtree(stale, ignore_errors=True)
    return final


class StopSignal:
    """Turns the first SIGTERM / SIGINT into a request to checkpoint and stop; a second one is immediate."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler, no clean stop
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint and stopping", flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
