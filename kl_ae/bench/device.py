"""Where `kl-ae bench` runs: the device, autocast on it, timing that waits for the device, peak memory, the largest
batch that fits, and the GPU's bf16 peak that model FLOP utilisation (MFU) is held to."""

from __future__ import annotations

import contextlib
import resource
import time

import torch

# dense (no 2:4 sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s, by a substring of
# torch.cuda.get_device_name(); the first match wins, so the more specific names come first
BF16_DENSE_TFLOPS = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
)


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' where a CUDA device is visible, else 'cpu'; 'cuda' without one is an error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device: choose auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch")
    return name


def bf16_peak_tflops(name: str) -> float | None:
    """The datasheet's dense bf16 peak of a GPU named `name`, or None for one not in the table."""
    return next((peak for key, peak in BF16_DENSE_TFLOPS if key in name), None)


def device_info(device: str) -> dict:
    if device != "cuda":
        return {"device": "cpu", "cpu_bf16": bool(torch.cpu._is_avx512_bf16_supported())}
    props = torch.cuda.get_device_properties(0)
    return {
        "device": "cuda",
        "gpu": props.name,
        "gpu_memory_gib": props.total_memory / 2**30,
        "gpu_bf16": torch.cuda.is_bf16_supported(),
        "bf16_datasheet_tflops": bf16_peak_tflops(props.name),
        "cuda": torch.version.cuda,
    }


def autocast(dtype: torch.dtype | None, device: str = "cpu"):
    """Autocast to `dtype` on `device` ('cpu' or 'cuda'); None: fp32, no autocast."""
    return torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()


DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync() -> None:
    """Wait for queued GPU work (a no-op without CUDA), so that a clock read after it covers that work."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn) -> float:
    """Seconds one call of fn takes, the device's queued work included."""
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def gemm_peak(sizes: tuple[int, ...], tries: int = 5, device: str = "cpu") -> dict[str, float]:
    """Best-of-`tries` FLOP/s of an n x n x n torch.mm in fp32 and bf16, the highest over `sizes`."""
    peak = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for n in sizes:
            a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
            torch.mm(a, b)
            best = min(timed(lambda: torch.mm(a, b)) for _ in range(tries))
            peak[name] = max(peak.get(name, 0.0), 2 * n**3 / best)
    return peak


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mib(device: str) -> float:
    """CUDA: the most memory torch's allocator has held since the last reset; CPU: this process's peak RSS."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def largest_batch(run, start: int, limit: int) -> dict:
    """Doubles the batch from `start` while `run(batch)` fits; stops at the first out-of-memory or at `limit`."""
    fits, batch, failed = 0, start, None
    while batch <= limit:
        try:
            run(batch)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if not is_out_of_memory(e):
                raise
            failed = batch
            break
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        fits, batch = batch, batch * 2
    return {"largest_batch": fits, "out_of_memory_at": failed, "limit": limit}
