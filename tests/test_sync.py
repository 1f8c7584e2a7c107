"""The training step never waits for the device: no `.item()`, `.tolist()`, `bool()`, `float()` or `int()` of a
tensor per step. Reads happen at logging, evaluation and checkpoint steps only, so their number must not grow
with the number of steps between those points."""

from __future__ import annotations

import collections
import os
import traceback

import pytest
import torch

from training.config import load_config
from training.train import main

from .conftest import TINY_RUN

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def count_reads(monkeypatch, out, steps: int, extra: list[str]) -> collections.Counter:
    """Python-level reads of tensor values during a run, by (method, file, line) of the caller."""
    calls: collections.Counter = collections.Counter()

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            calls[(name, os.path.basename(caller.filename), caller.lineno)] += 1
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    every = [f"train.{k}={steps}" for k in ("log_every", "eval_every", "sample_every", "checkpoint_every")]
    # one data worker: the dataset's own indexing (CPU tensors, not the device) runs in another process
    cfg = load_config(None, [*TINY_RUN, "data.num_workers=1", "train.tracker=none", f"train.max_steps={steps}",
                             *every, *extra, f"out_dir={out}"])  # fmt: skip
    main(cfg)
    monkeypatch.undo()
    return calls


@pytest.mark.parametrize(
    "extra",
    [[], ["loss.disc_start=0", "loss.disc_ramp=0"], ["model.preset=tiny-vq", "vq.dead_after=1", "loss.disc_start=0"]],
    ids=["no-gan", "gan", "vq-restarts"],
)
def test_training_steps_make_no_host_sync(tmp_path, monkeypatch, extra):
    short = count_reads(monkeypatch, tmp_path / "short", 2, extra)
    long = count_reads(monkeypatch, tmp_path / "long", 6, extra)
    grew = {k: (short[k], long[k]) for k in short | long if long[k] > short[k]}
    assert not grew, f"tensor reads that grow with the number of steps (2 steps, 6 steps): {grew}"
    assert any(k[:2] == ("tolist", "progress.py") for k in short)  # the counter sees the trainer's read at logging
