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


@pytest.fixture
def tiny_config() -> AutoencoderConfig:
    return tiny("tiny", sample_size=32)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps a process-wide singleton; in-process runs with other precisions need it cleared."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
