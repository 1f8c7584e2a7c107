"""What a run reports as it trains and when it stops: running means of the step's logs, kept on the device, one
row per logging step to the trackers, `metrics.jsonl` and the progress bar, the count of skipped (non-finite)
steps, the decision to stop before `train.max_time` runs out, agreed by every process, and the run's summary.

Nothing here makes a step wait for the device: each step adds its detached logs, masked by whether its update
was applied, to device tensors; a logging step reads them all back with a single `.tolist()`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from kl_ae.common.data import read_skipped
from kl_ae.common.runs import find_latest_checkpoint
from training.checkpoint import NonFiniteError
from training.config import TrainConfig
from training.step import NonFiniteGuard, replicas_identical


class RunningMeans:
    """Sums of per-step logs over the steps whose update was applied (`ok`), turned into means by `pop`."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, logs: dict[str, torch.Tensor], ok: torch.Tensor) -> None:
        """Add a step's logs (0-dim tensors) where the 0-dim bool `ok` is True; a skipped step adds nothing."""
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + torch.where(ok, v.detach().float(), 0.0)
            self.counts[k] = self.counts.get(k, 0) + ok.long()

    def pop(self) -> dict[str, float]:
        """{key: mean over its counted steps} (keys no step counted are left out), and start afresh: one sync."""
        keys = list(self.sums)
        if not keys:
            return {}
        values = torch.stack([self.sums[k] for k in keys] + [self.counts[k].float() for k in keys]).tolist()
        sums, counts = values[: len(keys)], values[len(keys) :]
        self.sums, self.counts = {}, {}
        return {k: s / n for k, s, n in zip(keys, sums, counts) if n}


class LogWriter:
    """One row per logging step: `accelerator.log` (the trackers), `metrics.jsonl` and the progress bar, with the
    images per second trained since the previous row (`img_per_s`)."""

    def __init__(self, accelerator: Accelerator, path: Path, bar, images_per_step: int, step: int) -> None:
        self.accelerator, self.bar, self.images_per_step = accelerator, bar, images_per_step
        self.file = open(path, "a") if accelerator.is_main_process else None
        self.clock, self.step = time.perf_counter(), step  # when and at which step the previous row was written

    def write(self, step: int, record: dict[str, float]) -> None:
        now = time.perf_counter()
        record = record | {"img_per_s": (step - self.step) * self.images_per_step / (now - self.clock)}
        self.clock, self.step = now, step
        self.accelerator.log(record, step=step)
        if self.file is not None:
            self.file.write(json.dumps({"step": step, **record}) + "\n")
            self.file.flush()
        rec = record.get("train/l1", record.get("train/l2", 0.0))
        self.bar.set_postfix(
            loss=f"{record.get('train/loss', float('nan')):.4g}", rec=f"{rec:.4f}", img_s=f"{record['img_per_s']:.1f}"
        )

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class TimeBudget:
    """`train.max_time`: whether a logging step is the last one that leaves time to checkpoint and exit.

    The clock starts when the run starts (start-up counts: a SLURM limit does too). A logging step says stop
    when the time left is less than twice the longest logging interval (validations included) plus twice the
    longest checkpoint save so far; before the first save, the start-up time stands in for a save.
    """

    clock = staticmethod(time.monotonic)

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.start = self.last = self.clock()
        self.first_interval: float | None = None  # includes the start-up: not a logging interval
        self.longest_interval = 0.0
        self.longest_save: float | None = None

    def due(self) -> bool:
        """Called at every logging step: True when the run should checkpoint and stop now."""
        now = self.clock()
        interval, self.last = now - self.last, now
        if self.first_interval is None:
            self.first_interval = interval
        else:
            self.longest_interval = max(self.longest_interval, interval)
        if self.seconds is None:
            return False
        save = self.longest_save if self.longest_save is not None else self.first_interval
        return now - self.start + 2 * self.longest_interval + 2 * save >= self.seconds

    def timed(self, save: Callable[[], None]) -> None:
        """Run `save()` and remember how long it took."""
        t = self.clock()
        save()
        self.longest_save = max(self.longest_save or 0.0, self.clock() - t)


def check_nonfinite(guards: dict[str, NonFiniteGuard], history: dict, step: int, limit: int, out: Path, log) -> None:
    """Count the skipped steps of each model (one host read); stop after `limit` in a row of either."""
    for name, guard in guards.items():
        new, longest = guard.check()
        key, what = ("nonfinite_steps", "") if name == "autoencoder" else (f"nonfinite_{name}_steps", f" {name}")
        if new:
            history[key] = history.get(key, 0) + new
            log(f"WARNING: {new}{what} step(s) with non-finite loss or gradients skipped by step {step}")
        if longest >= limit:
            last = find_latest_checkpoint(out)
            raise NonFiniteError(
                f"{longest} non-finite{what} steps in a row by step {step}; stopping. Last good checkpoint: "
                f"{last or 'none'} (skipped steps leave the weights untouched). Lower optim.lr or check the data"
            )


def agree_on_stop(accelerator: Accelerator, requested: bool) -> bool:
    """True on every process when any process was asked to stop, so that all save together."""
    if accelerator.num_processes == 1:
        return requested
    flag = torch.tensor(float(requested), device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() > 0


def run_summary(cfg: TrainConfig, accelerator: Accelerator, trained: tuple[nn.Module, ...], status: dict[str, str],
                history: dict, step: int, stopped_by: str | None, precision: str) -> dict:  # fmt: skip
    """The run's summary (summary.json), with a check that every process ends with the same `trained` weights;
    `status` says how LPIPS and the VF loss's model were loaded, or why not."""
    in_sync = replicas_identical(accelerator, *trained)
    if not in_sync:
        accelerator.print("WARNING: the processes hold different weights at the end of the run")
    images_per_step = cfg.data.batch_size * accelerator.num_processes * cfg.train.grad_accum
    return {
        "steps": step,
        "interrupted": stopped_by is not None,
        "stopped_by": stopped_by,
        "wall_s": round(history["wall_s"], 2),
        "img_per_s": round(step * images_per_step / max(history["wall_s"], 1e-9), 2),
        "num_processes": accelerator.num_processes,
        "mixed_precision": precision,
        "ema": cfg.train.ema,
        "nonfinite_steps": history["nonfinite_steps"],
        "nonfinite_discriminator_steps": history.get("nonfinite_discriminator_steps", 0),
        "skipped_images": len(read_skipped(Path(cfg.out_dir) / "skipped.txt")),
        "replicas_identical": in_sync,
        "lpips": status["lpips"],
        "align": status["align"],
        "first_eval": history["first_eval"],
        "last_eval": history["last_eval"],
    }
