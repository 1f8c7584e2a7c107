"""What only a CUDA GPU can show: fp16 with the loss scaler skipping an overflow, bf16 autocast on the GPU, the
fp16 `force_upcast` decision made on the GPU, no host synchronisation inside a step, exact resume, and a kl-f8 step
measured against the GPU's peak. Marked `gpu`: skipped where torch sees no CUDA device (tests/conftest.py);
benchmarks/gpu.sh runs them."""

from __future__ import annotations

import collections
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from kl_ae.commands.cli import main as kl_ae
from kl_autoencoder import Autoencoder
from training.config import load_config
from training.train import main as train_main

from .conftest import TINY_RUN, Spoiled, tiny

pytestmark = pytest.mark.gpu

EVERY = ["train.log_every=1", "train.eval_every=100", "train.sample_every=100", "train.tracker=none"]
TINY = [*TINY_RUN, *EVERY, "loss.lpips=off", "loss.disc_channels=8"]


def test_fp16_loss_scaler_skips_an_overflow_step(tmp_path, monkeypatch):
    """train.mixed_precision=fp16: a batch that overflows fp16 is skipped by the GradScaler (weights and EMA
    untouched, the scale halved) and counted; the steps around it train."""
    import training.train as train_module

    real = train_module.build_datasets

    def overflowing(cfg, seed):
        train, val = real(cfg, seed)
        return Spoiled(train, 2, 4, lambda x: x * 1e6), val  # past fp16's 65504: the second batch of 2, step 2

    monkeypatch.setattr(train_module, "build_datasets", overflowing)
    out = tmp_path / "fp16"
    extra = ["train.mixed_precision=fp16", "train.checkpoint_every=1", "train.max_nonfinite=50", "data.num_workers=0"]
    summary = train_main(load_config(None, [*TINY, *extra, "train.max_steps=8", f"out_dir={out}"]))
    assert summary["mixed_precision"] == "fp16" and summary["nonfinite_steps"] >= 1
    ckpt = [out / "checkpoints" / f"step_{s:07d}" for s in range(9)]
    scale = {s: torch.load(ckpt[s] / "scaler.pt", weights_only=True)["scale"] for s in (1, 2)}
    assert scale[2] == scale[1] / 2  # the overflow halved the scale ...
    before, skipped = load_file(ckpt[1] / "model.safetensors"), load_file(ckpt[2] / "model.safetensors")
    assert all(torch.equal(before[k], skipped[k]) for k in before)  # ... and changed no weight
    last = load_file(ckpt[8] / "model.safetensors")
    assert any(not torch.equal(skipped[k], last[k]) for k in last)  # the later steps trained
    assert all(torch.isfinite(v).all() for v in last.values())


def test_bf16_autocast_on_the_gpu(tmp_path, capsys):
    """`auto` precision is bf16 on a GPU that runs it; the run is on the GPU and keeps fp32 master weights that
    take the small updates."""
    from accelerate.utils import set_seed

    from training.train import resolve_mixed_precision

    assert torch.cuda.is_bf16_supported() and resolve_mixed_precision("auto") == "bf16"
    out = tmp_path / "bf16"
    cfg = load_config(None, [*TINY, f"out_dir={out}", "train.max_steps=3"])
    set_seed(cfg.train.seed)
    init = Autoencoder(cfg.model.autoencoder_config()).state_dict()
    summary = train_main(cfg)
    assert summary["mixed_precision"] == "bf16" and "device cuda" in capsys.readouterr().out
    trained = Autoencoder.from_pretrained(out).state_dict()
    assert all(v.dtype == torch.float32 for v in trained.values())
    changed = sum((init[k] != trained[k]).sum().item() for k in init) / sum(v.numel() for v in init.values())
    assert changed > 0.9


def test_force_upcast_is_decided_in_fp16_on_the_gpu():
    """check_fp16 runs the model in fp16 on the GPU: a model within fp16's range keeps force_upcast off, one
    whose output overflows fp16 turns it on."""
    from kl_ae.common.release import check_fp16

    torch.manual_seed(0)
    model = Autoencoder(tiny("tiny")).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = model.encode(x).mode()
    upcast, why = check_fp16(model, x, z)
    assert not upcast and "on cuda" in why, why
    with torch.no_grad():
        model.decoder.conv_out.weight.mul_(1e6)  # after the last GroupNorm: the images leave fp16's range
    upcast, why = check_fp16(model, x, z)
    assert upcast and "overflows" in why and "cuda" in why, why


def count_syncs(out, steps: int, extra: list[str]) -> collections.Counter:
    """Synchronising CUDA calls during a run (torch.cuda.set_sync_debug_mode), by the Python line that made them."""
    every = [f"train.{k}={steps}" for k in ("log_every", "eval_every", "sample_every", "checkpoint_every")]
    cfg = load_config(None, [*TINY_RUN, "loss.lpips=off", "data.num_workers=1", "train.tracker=none",
                             f"train.max_steps={steps}", *every, *extra, f"out_dir={out}"])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_main(cfg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return collections.Counter((w.filename, w.lineno) for w in caught if "synchroniz" in str(w.message))


@pytest.mark.parametrize("extra", [[], ["loss.disc_start=0", "loss.disc_ramp=0"]], ids=["no-gan", "gan"])
def test_training_steps_make_no_host_sync_on_the_gpu(tmp_path, extra):
    """The steps between logging points wait for nothing on the GPU: the synchronising calls of a 6-step run are
    those of a 2-step run (the batches' host-to-device copies included)."""
    short = count_syncs(tmp_path / "short", 2, extra)
    long = count_syncs(tmp_path / "long", 6, extra)
    grew = {k: (short[k], long[k]) for k in short | long if long[k] > short[k]}
    assert not grew, f"synchronising calls that grow with the number of steps (2 steps, 6 steps): {grew}"


def test_resume_is_exact_on_the_gpu(tmp_path, monkeypatch, capsys):
    """6 steps straight equal 3 steps, stop, 3 more, bit for bit, in bf16 on the GPU (deterministic kernels:
    cuDNN's and the math attention; the default ones may sum in a different order on every run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .conftest import checkpoint_tensors, run

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            run(tmp_path / "straight", 6, "train.mixed_precision=bf16")
            run(tmp_path / "split", 3, "train.mixed_precision=bf16")
            run(tmp_path / "split", 6, "train.mixed_precision=bf16")
    finally:
        torch.use_deterministic_algorithms(False)
    assert "device cuda" in capsys.readouterr().out
    a = checkpoint_tensors(tmp_path / "straight" / "checkpoints" / "step_0000006")
    b = checkpoint_tensors(tmp_path / "split" / "checkpoints" / "step_0000006")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:10]


def test_kl_f8_step_throughput_and_flops_on_the_gpu(tmp_path, capsys):
    """A kl-f8 256 px bf16 step with the GAN: img/s and achieved TFLOP/s are reported, and the achieved rate stays
    below the GEMM peak measured in the same run (a timing that did not wait for the GPU would exceed it)."""
    out = tmp_path / "bench.json"
    argv = ["bench", "--device", "cuda", "--preset", "kl-f8", "--resolution", "256", "--batch-size", "4"]
    assert (
        kl_ae([*argv, "--precision", "bf16", "--steps", "2", "--repeats", "2", "--what", "peak", "--json", str(out)])
        == 0
    )
    result = json.loads(out.read_text())
    row = result["peak"]["bf16"]
    assert result["machine"]["device"] == "cuda" and row["gflop_per_step"] > 1000
    assert 0 < row["fraction_of_gemm_peak"] < 1.2, row
    if result["machine"]["bf16_datasheet_tflops"]:
        assert 0 < row["mfu_bf16_datasheet"] < 1, row
    mfu = row.get("mfu_bf16_datasheet", float("nan"))
    with capsys.disabled():
        print(f"\nkl-f8 256 px bf16 step, batch 4: {4 / row['step_s_best']:.1f} img/s, ", end="")
        print(f"{row['achieved_gflop_s'] / 1e3:.1f} TFLOP/s, {mfu:.1%} MFU")
