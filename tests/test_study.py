"""`kl-ae study`: every (variant, seed) is trained and evaluated, and the summary is the mean and standard error."""

import json
import math

import pytest

from kl_ae.commands.study import MEASURES, format_table, mean_se, paired

from .conftest import TINY_RUN


def test_mean_and_standard_error():
    s = mean_se([1.0, 2.0, 3.0, None])
    assert s["mean"] == 2.0 and s["n"] == 3 and s["se"] == pytest.approx(1 / math.sqrt(3))
    assert mean_se([5.0]) == {"mean": 5.0, "se": None, "n": 1}
    assert mean_se([None, float("nan")])["mean"] is None
    table = format_table({"plain": {"psnr": {"mean": 20.0, "se": 0.5, "n": 3}}} | {})
    assert "| plain | 20 ± 0.5 |" in table.splitlines()[-1]


def test_differences_from_plain_are_paired_by_seed():
    """A variant's difference from plain is taken seed by seed: a seed that moves both runs alike cancels."""
    runs = [{"variant": v, "seed": s, **{m: None for m in MEASURES}} for v in ("plain", "eq") for s in (0, 1, 2)]
    for r in runs:  # the seed moves psnr by 5 dB per seed; eq costs 0.5, 0.7, 0.9 dB
        r["psnr"] = 20.0 + 5 * r["seed"] - (0.5 + 0.2 * r["seed"] if r["variant"] == "eq" else 0.0)
    runs.append({"variant": "eq", "seed": 3, **{m: 1.0 for m in MEASURES}})  # no plain run to pair with
    d = paired(runs, ["plain", "eq"])["eq"]["psnr"]
    assert d["n"] == 3 and d["mean"] == pytest.approx(-0.7) and d["se"] == pytest.approx(0.2 / math.sqrt(3))
    assert set(paired(runs, ["plain", "eq"])) == {"eq"}


@pytest.mark.slow
def test_study_trains_and_evaluates_each_variant_and_seed(tmp_path):
    from kl_ae.commands.cli import main as kl_ae

    extra = [*TINY_RUN, "train.tracker=none", "train.eval_every=2", "train.checkpoint_every=2", "loss.lpips=off"]
    code = kl_ae(["study", "--out", str(tmp_path), "--variants", "plain,eq", "--seeds", "0,1", "--max-steps", "2",
                  "--probe-steps", "2", "--eval-resolution", "64", *extra])  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "study.json").read_text())
    assert [(r["variant"], r["seed"]) for r in report["runs"]] == [("plain", 0), ("plain", 1), ("eq", 0), ("eq", 1)]
    for r in report["runs"]:
        assert isinstance(r["psnr"], float) and isinstance(r["gap_scale"], float)
        assert r["probe_loss"] > 0 and r["probe_ratio"] > 0  # the probe's held-out loss, read from its metrics.json
        probe = json.loads((tmp_path / f"{r['variant']}_s{r['seed']}" / "probe" / "metrics.json").read_text())
        assert probe["heldout_loss"]["mean"] == r["probe_loss"]
    plain = [r["psnr"] for r in report["runs"] if r["variant"] == "plain"]
    assert report["summary"]["plain"]["psnr"]["mean"] == pytest.approx(sum(plain) / 2)
    assert report["summary"]["plain"]["psnr"]["n"] == 2 and report["summary"]["eq"]["psnr"]["se"] is not None
    eq = {r["seed"]: r["psnr"] - plain[r["seed"]] for r in report["runs"] if r["variant"] == "eq"}
    assert report["minus_plain"]["eq"]["psnr"]["mean"] == pytest.approx(sum(eq.values()) / 2)
    cfg = (tmp_path / "eq_s1" / "config.yaml").read_text()
    assert "eq_weight: 1.0" in cfg and "seed: 1" in cfg
