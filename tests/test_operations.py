"""Training operations: exact resume, faults, preemption, the non-finite guard, EMA, fine-tuning, DDP."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from kl_ae.commands.cli import main as kl_ae
from kl_autoencoder import Autoencoder
from training.config import load_config
from training.step import guarded_step

from .conftest import TINY, Spoiled, checkpoint_tensors, launch_two_processes, run

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    run(tmp_path / "straight", 6)
    run(tmp_path / "split", 3)
    summary = run(tmp_path / "split", 6)  # the same command with more steps: resumes at 3
    assert summary["steps"] == 6 and summary["first_eval"]["step"] == 0
    a = checkpoint_tensors(tmp_path / "straight" / "checkpoints" / "step_0000006")
    b = checkpoint_tensors(tmp_path / "split" / "checkpoints" / "step_0000006")
    assert a.keys() == b.keys() and any(k.startswith("model_1/") for k in a)  # the discriminator too
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:10]
    # and training did happen between 3 and 6
    c = checkpoint_tensors(tmp_path / "split" / "checkpoints" / "step_0000003")
    assert not torch.equal(c["ema/0"], b["ema/0"])


@pytest.mark.slow
def test_ema_weights_are_what_is_exported(tmp_path):
    run(tmp_path / "r", 3, "train.export=true")
    ckpt = tmp_path / "r" / "checkpoints" / "step_0000003"
    ema = torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=False)["shadow_params"]
    exported = Autoencoder.from_pretrained(tmp_path / "r")
    live = load_file(ckpt / "model.safetensors")  # AutoencoderWithLoss: autoencoder.* + logvar
    names = [n for n, _ in exported.named_parameters()]
    assert all(torch.equal(e, p) for e, p in zip(ema, exported.parameters()))
    assert any(not torch.equal(live[f"autoencoder.{n}"], p) for n, p in zip(names, ema))


@pytest.mark.slow
def test_sigterm_saves_and_resumes(tmp_path):
    out = tmp_path / "pre"
    cmd = [sys.executable, "-m", "training.train", "--out", str(out), "--max-steps", "400", *TINY,
           "train.checkpoint_every=1000", "train.eval_every=1000"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and 2 <= summary["steps"] < 400
    latest = (out / "checkpoints" / "latest").read_text()
    assert latest == f"step_{summary['steps']:07d}"
    assert "Re-run the same command to resume" in output
    resumed = run(out, summary["steps"] + 2, "train.checkpoint_every=1000", "train.eval_every=1000")
    assert resumed["steps"] == summary["steps"] + 2 and not resumed["interrupted"]


@pytest.mark.slow
def test_sigkill_while_writing_then_resume(tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "training.train", "--out", str(out), "--max-steps", "400", *TINY,
           "train.checkpoint_every=1", "train.eval_every=1000"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = out / "checkpoints"
    deadline, killed_mid_write = time.time() + 120, False
    while time.time() < deadline:
        if (root / "latest").exists() and any(root.glob(".tmp_step_*")):
            proc.kill()  # SIGKILL while a checkpoint is being written
            killed_mid_write = True
            break
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert killed_mid_write
    pointer = (root / "latest").read_text()
    assert (root / pointer / "trainer_state.json").is_file()  # latest names a complete checkpoint
    done = json.loads((root / pointer / "trainer_state.json").read_text())["step"]
    summary = run(out, done + 2, "train.checkpoint_every=1000")
    assert summary["steps"] == done + 2
    assert not list(root.glob(".tmp_step_*"))


def nan_data(monkeypatch, start, stop):
    import training.train as train_module

    real = train_module.build_datasets

    def patched(cfg, seed):
        train, val = real(cfg, seed)
        return Spoiled(train, start, stop, lambda x: torch.full_like(x, float("nan"))), val

    monkeypatch.setattr(train_module, "build_datasets", patched)


@pytest.mark.parametrize("fused", [True, False])
def test_guarded_step_leaves_weights_and_optimizer_untouched(fused):
    accelerator = Accelerator(cpu=True)
    layer = torch.nn.Linear(4, 4)
    opt = accelerator.prepare(torch.optim.AdamW(layer.parameters(), lr=0.1, fused=fused))
    layer(torch.randn(2, 4)).sum().backward()
    assert guarded_step(accelerator, opt, list(layer.parameters()), 1.0, fp16=False)[0]
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    state = {k: {n: t.clone() for n, t in s.items()} for k, s in opt.optimizer.state.items()}
    layer(torch.full((2, 4), float("nan"))).sum().backward()
    stepped, norm = guarded_step(accelerator, opt, list(layer.parameters()), 1.0, fp16=False)
    assert not stepped and not torch.isfinite(norm)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    assert all(torch.equal(state[k][n], t) for k, s in opt.optimizer.state.items() for n, t in s.items())
    assert all(p.grad is None for p in layer.parameters())


@pytest.mark.slow
def test_nan_batch_is_skipped_and_the_run_goes_on(tmp_path, monkeypatch):
    nan_data(monkeypatch, start=2, stop=4)  # the second batch of 2
    summary = run(tmp_path / "nan", 4)
    assert summary["steps"] == 4 and summary["nonfinite_steps"] == 1
    model = Autoencoder.from_pretrained(tmp_path / "nan")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    rows = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["nonfinite_steps"] == 1
    # logged means leave skipped steps out: the skipped step's own line (log_every=1) has no losses, none is NaN
    assert [r["step"] for r in rows if "train/loss" not in r] == [2]
    assert all(r["train/loss"] == r["train/loss"] for r in rows if "train/loss" in r)


@pytest.mark.slow
def test_too_many_nonfinite_steps_stop_with_checkpoint_intact(tmp_path, monkeypatch, capsys):
    nan_data(monkeypatch, start=4, stop=10**9)  # everything after the second batch
    out = tmp_path / "bad"
    code = kl_ae(["train", "--out", str(out), "--max-steps", "50", *TINY, "train.checkpoint_every=1",
                  "train.max_nonfinite=3"])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    # steps 3, 4, 5 are skipped; the guard is read at each checkpoint, so the run stops at step 5 without saving it
    assert "3 non-finite steps in a row by step 5" in err and "step_0000004" in err
    assert (out / "checkpoints" / "latest").read_text() == "step_0000004"
    good = Autoencoder.from_pretrained(out / "checkpoints" / "step_0000002").state_dict()
    after = Autoencoder.from_pretrained(out / "checkpoints" / "step_0000004").state_dict()
    assert all(torch.equal(good[k], after[k]) for k in good)  # skipped steps changed nothing


@pytest.mark.slow
def test_decoder_only_training_keeps_the_encoder_bit_identical(tmp_path):
    run(tmp_path / "base", 2, "train.export=true")  # fine-tuned from its diffusers folder
    start = Autoencoder.from_pretrained(tmp_path / "base")
    run(tmp_path / "ft", 3, f"model.init_from={tmp_path / 'base' / 'diffusers'}", "train.trainable=decoder",
        "train.ema=false")  # fmt: skip
    tuned = Autoencoder.from_pretrained(tmp_path / "ft")
    for name in ("encoder", "quant_conv"):
        a, b = getattr(start, name).state_dict(), getattr(tuned, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert any(not torch.equal(a, b) for a, b in zip(start.decoder.parameters(), tuned.decoder.parameters()))


def test_decoder_only_needs_a_pretrained_encoder():
    from kl_ae.common.config import ConfigError

    with pytest.raises(ConfigError, match="^train.trainable: decoder-only training needs model.init_from"):
        load_config(None, ["train.trainable=decoder"])


@pytest.mark.slow
def test_two_processes_gather_validation_from_both(tmp_path):
    """Validation over 2 held-out images on 2 processes equals the 1-process figure: both halves gathered."""
    single = run(tmp_path / "one", 1)["first_eval"]
    out = tmp_path / "two"
    launch_two_processes(["--out", str(out), "--max-steps", "1", *TINY])
    double = json.loads((out / "summary.json").read_text())
    assert double["num_processes"] == 2 and double["first_eval"]["val/images"] == single["val/images"] == 2
    assert double["first_eval"]["val/psnr"] == pytest.approx(single["val/psnr"], rel=1e-5)


@pytest.mark.slow
def test_compiled_run_computes_the_same_losses_and_keeps_the_state_dict_names(tmp_path, capsys):
    fp32 = ["train.mixed_precision=no", "model.base_channels=8"]
    run(tmp_path / "eager", 2, *fp32)
    run(tmp_path / "compiled", 2, *fp32, "train.compile=true")
    assert "torch.compile: encoder and decoder" in capsys.readouterr().out
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("eager", "compiled")}  # fmt: skip
    for a, b in zip(rows["eager"], rows["compiled"], strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4)
    # the checkpoint loads strictly into an uncompiled model, and the run resumes without compiling
    Autoencoder.from_pretrained(tmp_path / "compiled" / "checkpoints" / "step_0000002")
    assert run(tmp_path / "compiled", 3, *fp32)["steps"] == 3
