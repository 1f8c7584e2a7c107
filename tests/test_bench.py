"""`kl-ae bench` on a tiny configuration: every section present, every figure positive and finite, the codec
equal to diffusers'. Timings are not asserted (shared CI machines)."""

import json
import math
from pathlib import Path

import pytest

from kl_ae.commands.cli import main

from .conftest import tiny


def _numbers(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _numbers(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield f"{prefix}{k}", v


def test_bench_tiny(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "--preset", "tiny", "--resolution", "32", "--batch-size", "2", "--steps", "1", "--repeats", "1"]
    tiled = ["--tiled-sizes", "64", "--tile", "32", "--overlap", "8", "--max-batch", "2", "--device", "cpu"]
    what = ["--what", "train,peak,codec,data,optim,tiled,maxbatch,fp16"]
    assert main([*argv, *what, *tiled, "--precision", "bf16", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for section in ("train", "peak", "codec", "data", "optim", "tiled", "maxbatch", "fp16"):
        assert section in result, section
    assert result["machine"]["device"] == "cpu"
    keys = {"ours_gan_img_s", "reference_gan_img_s", "fixed_gan_img_s", "speedup_gan_vs_reference",
            "speedup_gan_vs_fixed", "speedup_nogan_vs_fixed"}  # fmt: skip
    assert keys <= set(result["train"]["bf16"])
    tiled = result["tiled"]["size_64"]
    assert set(tiled) == {"untiled", "tile", "estimate", "exact"}, tiled
    # the FLOP-counted cost of each mode's statistics, the plain tiled pass the baseline
    assert 1 < tiled["estimate"]["flops_over_tile"] <= 1.5 < tiled["exact"]["flops_over_tile"]
    assert all(tiled[n]["psnr_vs_untiled_db"] > 10 for n in ("tile", "estimate", "exact"))
    assert result["maxbatch"]["largest_batch"] == 2 and result["maxbatch"]["out_of_memory_at"] is None
    assert result["fp16"]["loss_scale_final"] <= result["fp16"]["loss_scale_initial"]
    assert 0 < result["peak"]["bf16"]["fraction_of_gemm_peak"]
    # loss.lpips_autocast: the same step with nothing held to the fp32 peak
    autocast = result["peak"].pop("bf16_lpips_autocast")
    assert autocast["lpips_fp32_gflop_per_step"] == 0 < result["peak"]["bf16"]["lpips_fp32_gflop_per_step"]
    for row in (autocast, result["peak"]["bf16"]):  # best-of-N step time against its median
        assert row["step_s_best"] <= row["step_s_median"]
        assert row["fraction_of_gemm_peak"] >= row["fraction_of_gemm_peak_median_step"]
    assert result["codec"]["max_abs_diff_fp32"] <= 1e-4
    for name, value in _numbers({k: v for k, v in result.items() if k != "config"}):
        assert math.isfinite(value), name
        zero_ok = ("codec.max_abs_diff_fp32", "codec.psnr_diff_db", "fp16.skipped_overflow_steps")
        if name.endswith("_peak_mib") or name in zero_ok:
            assert value >= 0, name  # a call that fits in already-touched pages raises the peak by 0
        elif "top_ops" not in name and name != "machine.threads":
            assert value > 0, name


def test_bench_codec_on_a_trained_model_uses_its_weights_and_the_photos(tmp_path):
    import torch

    from kl_ae.bench.common import photos
    from kl_autoencoder import PRESETS, Autoencoder

    torch.manual_seed(3)
    Autoencoder(PRESETS["tiny"]).save_pretrained(tmp_path / "model")
    out = tmp_path / "bench.json"
    argv = ["bench", "--preset", "tiny", "--resolution", "32", "--batch-size", "2", "--steps", "1", "--repeats", "1"]
    assert main([*argv, "--what", "codec", "--model", str(tmp_path / "model"), "--json", str(out)]) == 0
    codec = json.loads(out.read_text())["codec"]
    assert str(tmp_path / "model") in codec["weights"] and codec["max_abs_diff_fp32"] <= 1e-4
    x = photos(32, 2)
    assert x.shape == (2, 3, 32, 32) and -1 <= x.min() < x.max() <= 1 and not torch.equal(x[0], x[1])


def test_gpu_bf16_peaks_by_name():
    from kl_ae.bench.device import bf16_peak_tflops

    names = {
        "NVIDIA H200": 989,
        "NVIDIA GH200 480GB": 989,
        "NVIDIA H100 80GB HBM3": 989,
        "NVIDIA H100 PCIe": 756,
        "NVIDIA A100-SXM4-80GB": 312,
        "NVIDIA L40S": 362,
        "NVIDIA L4": 121,
        "NVIDIA GeForce RTX 4090": 165,
        "Tesla T4": None,  # no bf16 tensor cores
    }
    assert {name: bf16_peak_tflops(name) for name in names} == names


def test_largest_batch_doubles_until_out_of_memory():
    import torch

    from kl_ae.bench.device import largest_batch

    tried = []

    def run(batch):
        tried.append(batch)
        if batch > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert largest_batch(run, 2, 1024) == {"largest_batch": 8, "out_of_memory_at": 16, "limit": 1024}
    assert tried == [2, 4, 8, 16]
    assert largest_batch(lambda b: None, 3, 20)["largest_batch"] == 12  # 3, 6, 12; 24 is over the limit


def test_bench_device_choice(monkeypatch):
    import torch

    from kl_ae.bench.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    assert main(["bench", "--device", "cuda", "--what", "optim"]) == 2


@pytest.mark.slow
def test_gpu_script_runs_its_steps_at_toy_sizes_on_a_cpu(tmp_path):
    """benchmarks/gpu.sh on a CPU at toy sizes: every step runs (the gpu tests are skipped) and the summary has
    the figures BENCHMARKS.md takes."""
    import os
    import subprocess
    import sys

    toy = "DEVICE=cpu PRESET=tiny RES=32 BIG=64 BATCH=2 MAX_BATCH=4 TILED_SIZES=64 TILE=32 OVERLAP=8 STEPS=1 REPEATS=1"
    toy += " TIME_SCALE=20"  # a CPU shared with other jobs
    env = {**os.environ, **dict(kv.split("=") for kv in toy.split()), "PYTHON": sys.executable}  # this interpreter
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu.sh"), str(tmp_path)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status = (tmp_path / "status.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in status] == ["tests", "train", "maxbatch_32", "maxbatch_64", "fp16", "tiled"]
    summary = (tmp_path / "summary.md").read_text()
    for figure in ("ours img/s", "largest batch at 32 px", "largest batch at 64 px", "fp16 + loss scaler",
                   "64 px, estimate"):  # fmt: skip
        assert figure in summary, figure
    assert "| n/a |" not in summary.split("| tiled decode")[0].replace("MFU vs the bf16 datasheet peak | n/a", "")


def test_bench_default_times_the_default_runs_step():
    """`--what default`: the recipe's own step (its preset, resolution, batch, discriminator width) without and
    with the GAN, and the run's step time: those two weighted by the steps the recipe spends in each."""
    from kl_ae.bench.common import BenchConfig
    from kl_ae.bench.run import run_bench
    from training.config import TrainConfig

    result = run_bench(BenchConfig(preset="tiny", what=("default",), precision="fp32", steps=1, repeats=1))["default"]
    recipe = TrainConfig()
    b, start, total = recipe.data.batch_size, recipe.loss.disc_start, recipe.train.max_steps
    nogan, gan = result["default_fp32_nogan_img_s"], result["default_fp32_gan_img_s"]
    assert result["default_fp32_run_step_seconds"] == pytest.approx(start * b / nogan + (total - start) * b / gan)
    assert result["default_lpips_vgg_fp32_nogan_img_s"] > 0 and result["default_lpips_alex_fp32_nogan_img_s"] > 0
    assert "64 px, batch 8" in result["config"]


def test_the_bench_times_the_trainers_step(monkeypatch):
    """`kl-ae bench` calls the trainer's own step (`training.step.TrainStep`)."""
    import torch

    import training.step
    from kl_ae.bench.common import images
    from kl_ae.bench.step import our_step_fn
    from kl_autoencoder import Autoencoder

    calls = []
    real = training.step.TrainStep.__call__
    monkeypatch.setattr(training.step.TrainStep, "__call__", lambda *a: calls.append(a[3]) or real(*a))
    torch.manual_seed(0)
    for gan in (False, True):
        our_step_fn(Autoencoder(tiny("tiny")), images(32, 2, 0), "fp32", gan, None, disc_channels=8)()
    assert [schedule.disc_factor for schedule in calls] == [0.0, 1.0]


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_the_benchs_stand_in_for_accelerate_trains_as_accelerate_does(precision):
    """The bench runs the step with `LocalAccelerator` (several precisions in one process); two steps with it, GAN
    and EMA on, leave the same weights as two with an `Accelerator`, bit for bit, in fp32 and under bf16 autocast."""
    import torch
    from accelerate import Accelerator

    from kl_ae.bench.common import images
    from kl_ae.bench.step import LocalAccelerator
    from kl_autoencoder import Autoencoder
    from training.config import LossConfig
    from training.discriminator import PatchDiscriminator
    from training.step import AutoencoderWithLoss, GuardedEMA, StepModules, StepSchedule, TrainStep, adamw

    x = images(32, 2, 0)

    def two_steps(accelerator, prepare):
        torch.manual_seed(0)
        ae = Autoencoder(tiny("tiny"))
        model, disc = AutoencoderWithLoss(ae, True, 0.0), PatchDiscriminator(base_channels=8, norm="group")
        opt_g, opt_d = adamw(model.parameters(), lr=1e-3), adamw(disc.parameters(), lr=1e-3)
        ema = GuardedEMA(ae.parameters(), decay=0.9)
        modules = StepModules(*prepare(model, disc, opt_g, opt_d), ema=ema)
        step = TrainStep(accelerator, modules, LossConfig(kl_weight=1e-2), grad_clip=1.0, fp16=False)
        torch.manual_seed(1)
        for _ in range(2):
            step(x, None, StepSchedule(disc_factor=0.5))
        return [*model.parameters(), *disc.parameters(), *ema.shadow_params]

    local = LocalAccelerator("fp32" if precision == "no" else precision, "cpu")
    ours = two_steps(
        local, lambda m, d, g, o: (*map(local.prepare_module, (m, d)), *map(local.prepare_optimizer, (g, o)))
    )
    accelerator = Accelerator(cpu=True, mixed_precision=precision)
    theirs = two_steps(accelerator, accelerator.prepare)
    assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_bench_families_times_kl_ae_against_each_diffusers_class():
    """`--what families`: one row per family asked for, kl-ae's encode and decode equal to the diffusers class's own
    (RAE: its [0, 1] images and normalized latents; Qwen-Image: its frame axis), finite img/s and ratios."""
    from kl_ae.bench.common import BenchConfig
    from kl_ae.bench.run import format_table, run_bench

    cfg = BenchConfig(what=("families",), families=("qwen-image", "rae"), family_width=8, resolution=32,
                      batch_size=2, steps=1, repeats=1)  # fmt: skip
    result = run_bench(cfg)["families"]
    assert set(result) == {"config", "qwen-image", "rae"}
    for name in ("qwen-image", "rae"):
        row = result[name]
        assert row["max_abs_diff"] <= 1e-5, name
        for key in ("encode", "decode"):
            assert 0 < row[f"kl_ae_{key}_img_s"] < math.inf and 0 < row[f"diffusers_{key}_img_s"] < math.inf
            assert 0 < row[f"{key}_kl_ae_over_diffusers"] < math.inf, (name, key)
    assert result["rae"]["latent"] == "64x2x2" and result["qwen-image"]["class"] == "AutoencoderKLQwenImage"
    assert "families.rae.decode_kl_ae_over_diffusers" in format_table({"families": result})


def test_the_video_train_bench_times_the_same_work_in_both_loops():
    """`--what video-train`: our step and the plain loop over diffusers' AutoencoderKLWan, from the same weights on
    the same clip with the same LPIPS network, compute the same loss and gradient norm (fp32), so the timing compares
    equal work; and the CPU's tensor peak counts what lives at once, not what was allocated in all."""
    import tempfile

    import torch

    from kl_ae.bench.common import in_child
    from kl_ae.bench.step import our_step_fn
    from kl_ae.bench.video import build_video_family
    from kl_ae.bench.video_train import clip, plain_step_fn
    from kl_ae.common.lpips import LPIPS

    x = clip(5, 32)
    torch.manual_seed(0)
    lpips = LPIPS("alex", random_backbone=True)
    with tempfile.TemporaryDirectory() as folder:
        ours = build_video_family("wan-video", 8, folder)
        plain = build_video_family("wan-video", 8, folder).module
    ours_step = our_step_fn(ours, x, "fp32", False, lpips, disc_channels=8)
    plain_step = plain_step_fn(plain, x, False, lpips)
    torch.manual_seed(1)  # the same posterior sample
    logs = ours_step().g_logs
    torch.manual_seed(1)
    loss, norm = plain_step()
    torch.testing.assert_close(logs["train/loss"], loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(logs["train/grad_norm"], norm, rtol=1e-4, atol=0)
    # the profiler leaves threads behind, which a later fork (DataLoader workers) could inherit mid-lock: a process
    # of its own, as the bench runs it
    assert 7.9 < in_child(_peak_of_two_in_turn)["mib"] < 9


def _two_in_turn() -> None:  # 8 MiB at most at once, 16 MiB allocated in all
    import torch

    for _ in range(2):
        torch.ones(2**21).sum()


def _peak_of_two_in_turn(queue) -> None:
    from kl_ae.bench.video_train import tensor_peak_mib

    queue.put({"mib": tensor_peak_mib(_two_in_turn)})
