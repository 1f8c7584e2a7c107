"""`kl-ae bench` on a tiny configuration: every section present, every figure positive and finite, the codec
equal to diffusers'. Timings are not asserted (shared CI machines)."""

import json
import math

from training.cli import main


def _numbers(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _numbers(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield f"{prefix}{k}", v


def test_bench_tiny(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "--preset", "tiny", "--resolution", "32", "--batch-size", "2", "--steps", "1", "--repeats", "1"]
    assert main([*argv, "--precision", "bf16", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for section in ("train", "peak", "codec", "data"):
        assert section in result, section
    assert {"speedup_gan", "speedup_nogan", "ours_gan_img_s", "baseline_gan_img_s"} <= set(result["train"]["bf16"])
    assert 0 < result["peak"]["bf16"]["fraction_of_gemm_peak"]
    assert result["codec"]["max_abs_diff_fp32"] <= 1e-4
    for name, value in _numbers({k: v for k, v in result.items() if k != "config"}):
        assert math.isfinite(value), name
        if name.endswith("_peak_mib") or name in ("codec.max_abs_diff_fp32", "codec.psnr_diff_db"):
            assert value >= 0, name  # a call that fits in already-touched pages raises the peak by 0
        elif "top_ops" not in name and name != "machine.threads":
            assert value > 0, name
