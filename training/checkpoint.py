"""Checkpoints that survive faults, exact resume, and a clean stop on SIGTERM / SIGINT.

A checkpoint is written into `checkpoints/.tmp_step_N/`, renamed to `checkpoints/step_N/` once
complete, and only then does `checkpoints/latest` (a one-line file, replaced atomically) name it.
A run killed at any moment therefore leaves `latest` pointing at a complete checkpoint; re-running
the same command resumes from it. (k-diffusion's `_state.json` pointer, made crash-safe.)

A checkpoint holds accelerate's state (models, optimizers, schedulers, scaler, RNG states, the EMA
registered for checkpointing), `trainer_state.json` (step, batches seen, history), a VQ model's codebook
statistics (`quantizer.pt`), for a streamed source each process's stream position (`data_state_<process>.pt`)
and the weights to use as a diffusers folder (`autoencoder/`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch
from accelerate import Accelerator

from kl_ae.common.config import ConfigError
from kl_ae.common.runs import POINTER, STATE_FILE, checkpoint_name, find_latest_checkpoint
from kl_autoencoder.diffusers_format import save_diffusers
from kl_autoencoder.interface import LatentAutoencoder

QUANTIZER_FILE = "quantizer.pt"  # a VQ model's codebook statistics, which its state dict leaves out
DATA_STATE = "data_state_{}.pt"  # a streamed source's position, one per process


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row: the run stops, its last good checkpoint intact."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, permissions): the previous one and `latest` are intact."""


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


def save_weights(ae: LatentAutoencoder, folder: Path) -> None:
    """The weights as a diffusers folder of the autoencoder's own class (our model: `save_diffusers`)."""
    if ae.family in ("kl", "vq"):
        save_diffusers(ae.module, folder)
    else:
        ae.save_pretrained(folder)


def save(
    accelerator: Accelerator,
    out: Path,
    step: int,
    state: dict,
    weights: LatentAutoencoder,
    live: LatentAutoencoder,
    keep: int,
    data_state: dict | None = None,
) -> None:
    """Write the checkpoint of `step` crash-safely (all processes call this). `state` goes to trainer_state.json,
    `weights` (the EMA ones, or the live model) to `autoencoder/`; `live` gives a VQ model's codebook statistics;
    `data_state` (a stream's position, which differs per process) to `data_state_<process>.pt`.

    A full disk or a permission error removes the half-written checkpoint and raises CheckpointWriteError: the
    previous checkpoint and `latest` stay intact.
    """
    root = out / "checkpoints"
    tmp = temporary_folder(root, step, clear=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if data_state is not None:
            torch.save(data_state, tmp / DATA_STATE.format(accelerator.process_index))
        accelerator.wait_for_everyone()  # every process's files are written before the folder is renamed
        if accelerator.is_main_process:
            save_weights(weights, tmp / "autoencoder")
            if live.family == "vq":
                torch.save(live.module.quantizer_state(), tmp / QUANTIZER_FILE)
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
            commit(root, tmp, step, keep)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        last = find_latest_checkpoint(out)
        raise CheckpointWriteError(
            f"could not write the checkpoint of step {step} ({e}); the previous checkpoint "
            f"({last.name if last else 'none'}) and checkpoints/latest are intact. Free space or fix "
            "permissions, then re-run the same command to resume"
        ) from None
    accelerator.wait_for_everyone()


def resume(accelerator: Accelerator, out: Path, ema, live: LatentAutoencoder) -> dict | None:
    """Load the latest complete checkpoint of `out` into the prepared objects; returns its trainer state
    (step, batches_seen, history, and this process's `data_state` or None), or None when there is none. A
    checkpoint that cannot be loaded is a ConfigError naming it."""
    latest = find_latest_checkpoint(out)
    if latest is None:
        return None
    try:
        accelerator.load_state(str(latest))
    except Exception as e:  # truncated or corrupt files, or a checkpoint of another architecture
        details = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # names the tensors
        raise ConfigError(
            f"resume: {latest} cannot be loaded ({type(e).__name__}: {details[:600]}); "
            "use another --out, or delete this checkpoint to resume from an older one"
        ) from None
    if ema is not None:  # accelerate restores custom objects on the CPU
        ema.to(accelerator.device)
    if (latest / QUANTIZER_FILE).is_file():  # after load_state: loading weights resets these statistics
        stats = torch.load(latest / QUANTIZER_FILE, map_location=accelerator.device, weights_only=True)
        live.module.load_quantizer_state(stats)
    state = json.loads((latest / STATE_FILE).read_text())
    data_state = latest / DATA_STATE.format(accelerator.process_index)
    state["data_state"] = torch.load(data_state, weights_only=True) if data_state.is_file() else None
    accelerator.print(f"resumed from {latest} at step {state['step']}")
    return state


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
