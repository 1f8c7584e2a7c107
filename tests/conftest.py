"""Shared test setup: offline, few threads, and tiny autoencoder configs that run in well under a second."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kl_autoencoder import PRESETS, AutoencoderConfig  # noqa: E402

torch.set_num_threads(2)


def tiny(preset: str, **overrides) -> AutoencoderConfig:
    """`preset`'s architecture (levels, attention, latent size, quant convs) at a test-sized width."""
    return dataclasses.replace(PRESETS[preset], base_channels=8, norm_num_groups=4, **overrides)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where torch sees a CUDA device; elsewhere they are reported as skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch sees none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_config() -> AutoencoderConfig:
    return tiny("tiny", sample_size=32)


@pytest.fixture(autouse=True)
def private_caches(tmp_path_factory, monkeypatch):
    """rFID reference statistics of stub networks must never land in a user's cache."""
    monkeypatch.setenv("KL_AE_CACHE", str(tmp_path_factory.getbasetemp() / "kl-ae-cache"))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps a process-wide singleton; in-process runs with other precisions need it cleared."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the model and data part of every end-to-end training test: a 16-channel f4 model on 32 px crops
TINY_RUN = ["model.base_channels=16", "model.norm_num_groups=8", "data.resolution=32", "data.resize=48",
            "data.batch_size=2", "data.repeats=2"]  # fmt: skip


def launch_two_processes(args: list[str], port: int, module: str = "training.train", env: dict | None = None):
    """`accelerate launch` of `python -m MODULE ARGS` as two real CPU processes.

    `--cpu --num_processes 2` (or a MULTI_CPU config file) silently starts one process; this form starts two.
    """
    import subprocess
    import sys

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        "-m", module, *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


class Spoiled(torch.utils.data.Dataset):
    """Wraps a training dataset; the items fetched as calls (start, stop] come back through `spoil` (NaN, an fp16
    overflow, ...), the others as they are."""

    def __init__(self, inner, start: int, stop: int, spoil):
        self.inner, self.start, self.stop, self.spoil, self.calls = inner, start, stop, spoil, 0

    def __len__(self):
        return len(self.inner)

    def set_epoch(self, epoch):
        self.inner.set_epoch(epoch)

    def __getitem__(self, i):
        x = self.inner[i]
        self.calls += 1
        return self.spoil(x) if self.start < self.calls <= self.stop else x
