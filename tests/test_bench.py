"""`kl-ae bench` on a tiny configuration: every section present, every figure positive and finite, the codec
equal to diffusers'. Timings are not asserted (shared CI machines)."""

import json
import math

from commands.cli import main


def _numbers(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _numbers(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield f"{prefix}{k}", v


def test_bench_tiny(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "--preset", "tiny", "--resolution", "32", "--batch-size", "2", "--steps", "1", "--repeats", "1"]
    tiled = ["--tiled-sizes", "64,96", "--tile", "32", "--overlap", "8"]
    what = ["--what", "train,peak,codec,data,optim,tiled"]
    assert main([*argv, *what, *tiled, "--precision", "bf16", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for section in ("train", "peak", "codec", "data", "optim", "tiled"):
        assert section in result, section
    keys = {"ours_gan_img_s", "reference_gan_img_s", "fixed_gan_img_s", "speedup_gan_vs_reference",
            "speedup_gan_vs_fixed", "speedup_nogan_vs_fixed"}  # fmt: skip
    assert keys <= set(result["train"]["bf16"])
    assert set(result["tiled"]) == {"tiled_64", "tiled_96", "untiled_64", "settings"}
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
        if name.endswith("_peak_mib") or name in ("codec.max_abs_diff_fp32", "codec.psnr_diff_db"):
            assert value >= 0, name  # a call that fits in already-touched pages raises the peak by 0
        elif "top_ops" not in name and name != "machine.threads":
            assert value > 0, name


def test_bench_codec_on_a_trained_model_uses_its_weights_and_the_photos(tmp_path):
    import torch

    from commands.bench import photos
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
