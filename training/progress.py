"""What a run reports as it trains: running means of the step's logs, kept on the device, and one row per
logging step to the trackers, `metrics.jsonl` and the progress bar.

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
    """One row per logging step: `accelerator.log` (the trackers), `metrics.jsonl` and the progress bar."""

    def __init__(self, accelerator: Accelerator, path: Path, bar) -> None:
        self.accelerator, self.bar = accelerator, bar
        self.file = open(path, "a") if accelerator.is_main_process else None

    def write(self, step: int, record: dict[str, float]) -> None:
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
