"""`train.max_time` (a wall-clock budget that checkpoints and exits 0, then resumes) and `train.tracker`
(any Accelerate tracker; the sample grids reach TensorBoard as images). The clock is a stub: no timed tests."""

from __future__ import annotations

import itertools
import json

import pytest

from kl_ae.commands.cli import main as kl_ae
from training.config import ConfigError, load_config
from training.progress import TimeBudget
from training.trackers import check_tracker

from .conftest import TINY_RUN


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("3:50:00", 13800),
        ("0:00:30", 30),
        ("1-00:00:30", 86430),
        ("2-03:04:05", 183845),
        ("90", 90),
        ("'1:00:00'", 3600),
    ],  # fmt: skip
)
def test_max_time_formats(text, seconds):
    # YAML reads an unquoted 3:50:00 as the base-60 integer 13800: the same number of seconds
    assert load_config(None, [f"train.max_time={text}"]).train.max_time_seconds() == seconds


@pytest.mark.parametrize("text", ["3:75:00", "abc", "0:00:00", "-5", "1-2", "true", "1.5"])
def test_bad_max_time_is_a_config_error(text):
    with pytest.raises(ConfigError, match="train.max_time"):
        load_config(None, [f"train.max_time={text}"])


def fake_clock(monkeypatch, step: float) -> None:
    """Every reading of the budget's clock is `step` seconds after the previous one."""
    ticks = itertools.count(0.0, step)
    monkeypatch.setattr(TimeBudget, "clock", staticmethod(lambda: next(ticks)))


def test_time_budget_keeps_room_for_two_logging_intervals_and_two_saves(monkeypatch):
    fake_clock(monkeypatch, 5.0)
    budget = TimeBudget(65)  # t=0
    assert not budget.due()  # t=5: 5 + 2 * 0 (no logging interval yet) + 2 * 5 (the start-up for a save) < 65
    budget.timed(lambda: None)  # t=10 -> 15: a save of 5 s
    assert not budget.due()  # t=20: 20 + 2 * 15 (this interval held the save) + 2 * 5 = 60 < 65
    assert budget.due()  # t=25: 25 + 2 * 15 + 2 * 5 = 65: stop now
    assert TimeBudget(None).due() is False


TINY = [*TINY_RUN, "train.log_every=1", "train.eval_every=100", "train.sample_every=1", "train.checkpoint_every=100",
        "loss.lpips=off", "loss.disc_start=100"]  # fmt: skip


@pytest.mark.slow
def test_max_time_stops_cleanly_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    fake_clock(monkeypatch, 5.0)  # start 0; logging steps at 5, 10: 10 + 2 * 5 + 2 * 5 >= 30 stops at step 2
    assert kl_ae(["train", "--out", str(out), "--max-steps", "6", *TINY, "train.max_time=0:00:30"]) == 0
    assert "stopped at step 2 (train.max_time 0:00:30); checkpoint saved" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["interrupted"] and summary["stopped_by"] == "max_time"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert not (out / "diffusers").exists()  # an interrupted run is not exported

    assert kl_ae(["train", "--out", str(out), "--max-steps", "6", *TINY, "train.max_time=1:00:00"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and not summary["interrupted"] and summary["stopped_by"] is None
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed at step 3

    # the sample grids went to TensorBoard as images, read back with its own event reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = sorted({p.parent for p in (out / "kl-ae").rglob("events.out.tfevents.*")})
    images = {}
    for folder in logs:
        events = EventAccumulator(str(folder), size_guidance={"images": 0}).Reload()
        for tag in events.Tags()["images"]:
            images.setdefault(tag, []).extend(e.step for e in events.Images(tag))
    assert sorted(images["val/samples"]) == [0, 1, 2, 3, 4, 5, 6]


def test_trackers_must_be_installed():
    check_tracker("tensorboard")
    check_tracker("none")
    with pytest.raises(ConfigError, match=r"train.tracker: mlflow is not installed \(pip install mlflow\)"):
        check_tracker("mlflow")
    with pytest.raises(ConfigError, match="train.tracker: must be one of"):
        load_config(None, ["train.tracker=neptune"])
    assert load_config(None, ["train.tracker=comet_ml"]).train.tracker == "comet_ml"
