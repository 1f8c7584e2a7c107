"""Shared test setup: offline, few threads, and tiny autoencoder configs that run in well under a second."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

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


def free_port() -> int:
    """A TCP port no process listens on now: every launch gets its own, so no two tests share one (a fixed port
    can still be in TIME_WAIT from the test before, or taken by a run beside this one)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(args: list[str], module: str = "training.train", env: dict | None = None):
    """`accelerate launch` of `python -m MODULE ARGS` as two real CPU processes, on a free port.

    `--cpu --num_processes 2` (or a MULTI_CPU config file) silently starts one process; this form starts two.
    """
    import subprocess
    import sys

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", module, *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# the training operations' run: TINY_RUN, every piece of the loop at least once in a few steps, fp32, no LPIPS;
# no diffusers export at the end (a test of the export adds train.export=true)
TINY = [
    *TINY_RUN,
    "train.log_every=1",
    "train.eval_every=3",
    "train.sample_every=100",
    "train.checkpoint_every=3",
    "train.tracker=none",
    "train.mixed_precision=no",
    "loss.disc_start=2",
    "loss.disc_channels=8",
    "loss.disc_norm=batch",
    "loss.lpips=off",
    "loss.learn_logvar=true",
    "train.export=false",
]


def run(out, steps: int, *extra: str) -> dict:
    """Train the TINY run in this process into `out` for `steps` steps (resuming what is there); its summary."""
    from training.config import load_config
    from training.train import main as train_main

    return train_main(load_config(None, [*TINY, f"out_dir={out}", f"train.max_steps={steps}", *extra]))


def checkpoint_tensors(folder) -> dict[str, torch.Tensor]:
    """Everything a checkpoint holds as tensors: both models, both optimizers, EMA, schedulers."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out |= {f"{f.stem}/{k}": v for k, v in load_file(f).items()}
    for f in sorted(folder.glob("optimizer*.bin")):
        state = torch.load(f, weights_only=True)["state"]
        out |= {f"{f.stem}/{i}/{k}": v for i, s in state.items() for k, v in s.items() if torch.is_tensor(v)}
    ema = torch.load(folder / "custom_checkpoint_0.pkl", weights_only=False)
    out |= {f"ema/{i}": v for i, v in enumerate(ema["shadow_params"])}
    out["ema/step"] = torch.tensor(ema["optimization_step"])
    for f in sorted(folder.glob("scheduler*.bin")):
        out[f.stem] = torch.tensor(torch.load(f, weights_only=False)["last_epoch"])
    return out


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


# Tiny random models of every autoencoder family diffusers ships, for the family tests and the commands' tests.
_SD = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
           block_out_channels=(8, 16), norm_num_groups=4, sample_size=32)  # fmt: skip
_DC_BLOCKS = ("ResBlock", "EfficientViTBlock")
_VIDEO = dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
              latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])  # fmt: skip
# test name -> (diffusers class, tiny config): 32 px images, f2 (RAE: 4 px patches), a few channels
FAMILY_CONFIGS = {
    "flux2": ("AutoencoderKLFlux2", dict(_SD, decoder_block_out_channels=(8, 8), latent_channels=4)),
    "dc-ae": ("AutoencoderDC", dict(latent_channels=4, attention_head_dim=4, encoder_block_types=_DC_BLOCKS,
              decoder_block_types=_DC_BLOCKS, encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
              encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), (5,)),
              decoder_qkv_multiscales=((), (5,)), scaling_factor=0.41)),
    "qwen-image": ("AutoencoderKLQwenImage", _VIDEO),
    "wan": ("AutoencoderKLWan", dict(_VIDEO, scale_factor_spatial=2)),
    "hunyuan-image": ("AutoencoderKLHunyuanImage", dict(in_channels=3, out_channels=3, latent_channels=8,
                      block_out_channels=(32, 32), layers_per_block=1, spatial_compression_ratio=2, sample_size=32,
                      scaling_factor=0.75)),  # GroupNorm(32) is fixed in this class: width 32
    "rae": ("AutoencoderRAE", dict(encoder_hidden_size=64, encoder_patch_size=8, encoder_num_hidden_layers=1,
            decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
            decoder_intermediate_size=64, patch_size=4, encoder_input_size=64)),  # a random 1-layer DINOv2, 8x8 tokens
    "sd": ("AutoencoderKL", dict(_SD, latent_channels=4, scaling_factor=0.18215)),  # SD 1.x / SDXL: quant convs
    # SD3 / FLUX.1: 16 channels, no quant convs, a shift
    "sd3": ("AutoencoderKL", dict(_SD, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.1, scaling_factor=0.5)),
}  # fmt: skip


@pytest.fixture(scope="session")
def family_folders(tmp_path_factory) -> dict[str, Path]:
    """Each tiny model, saved by diffusers itself; FLUX.2's BatchNorm statistics set to something not trivial."""
    import diffusers

    out = {}
    for name, (class_name, config) in FAMILY_CONFIGS.items():
        torch.manual_seed(0)
        module = getattr(diffusers, class_name)(**config)
        if name == "flux2":
            module.bn.running_mean.uniform_(-0.5, 0.5)
            module.bn.running_var.uniform_(0.5, 2.0)
        out[name] = tmp_path_factory.mktemp(name)
        module.save_pretrained(out[name])
    return out


def moving_clip(t: int, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    """A texture sliding one pixel per frame, uint8 (3, T, H, W): real motion for a temporal model (the video tests)."""
    import numpy as np

    g = np.random.default_rng(seed)
    base = g.integers(0, 256, (3, h, w + t), dtype=np.uint8)
    base = np.repeat(np.repeat(base[:, ::4, ::4], 4, 1), 4, 2)[:, :h, : w + t]  # blocks: survives H.264
    return torch.from_numpy(np.stack([base[:, :, i : i + w] for i in range(t)], 1).copy())


def clip_folder(root: Path, frames: int, h: int = 40, w: int = 48, count: int = 3) -> Path:
    """`count` mp4 clips of `moving_clip`s (seeds 0, 1, ...) in `root`."""
    from kl_ae.common.video import write_video

    for i in range(count):
        write_video(root / f"clip{i}.mp4", moving_clip(frames, h, w, seed=i), fps=10)
    return root


def resume_from(run: Path, copy: Path, step: int) -> None:
    """`copy`: `run` as a run killed right after its checkpoint of `step` leaves it."""
    import shutil

    shutil.copytree(run, copy)
    for later in (copy / "checkpoints").glob("step_*"):
        if int(later.name.split("_")[1]) > step:
            shutil.rmtree(later)
    (copy / "checkpoints" / "latest").write_text(f"step_{step:07d}")


_MEAN, _STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
_LTX_LEVELS = (True, True, True, False)  # three levels halve space and time: f8 t8 with patch_size 1
# the video classes the tests share: family -> (diffusers class, tiny config, a clip length it takes, its temporal
# factor): 32 px frames, 8 channels
VIDEO = {
    "wan": ("AutoencoderKLWan", dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
            temperal_downsample=[True, True], scale_factor_spatial=4, latents_mean=_MEAN, latents_std=_STD), 5, 4),
    "hunyuan-video": ("AutoencoderKLHunyuanVideo", dict(latent_channels=4, block_out_channels=(8, 8, 8, 8),
                      layers_per_block=1, norm_num_groups=4), 5, 4),
    "ltx-video": ("AutoencoderKLLTXVideo", dict(latent_channels=8, block_out_channels=(8,) * 4,
                  decoder_block_out_channels=(8,) * 4, layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5,
                  spatio_temporal_scaling=_LTX_LEVELS, decoder_spatio_temporal_scaling=_LTX_LEVELS, patch_size=1,
                  decoder_inject_noise=(False,) * 5, timestep_conditioning=True, scaling_factor=0.8), 9, 8),
    # CogVideoX round-trips 1 + 8k frames only (an odd number of latent frames: see families/cogvideox.py)
    "cogvideox": ("AutoencoderKLCogVideoX", dict(block_out_channels=(8,) * 4, latent_channels=4, layers_per_block=1,
                  norm_num_groups=2), 9, 4),
    "hunyuan-video-1.5": ("AutoencoderKLHunyuanVideo15", dict(latent_channels=4, block_out_channels=(8,) * 4,
                          layers_per_block=1, spatial_compression_ratio=8, scaling_factor=0.9), 5, 4),
    # LTX-2's levels: one spatial, one temporal, two both (its ratios are not derived from them: given); its
    # residual upsamplers need widening decoder channels
    "ltx2-video": ("AutoencoderKLLTX2Video", dict(latent_channels=8, block_out_channels=(8,) * 4,
                   decoder_block_out_channels=(16, 32, 64), layers_per_block=(1,) * 5,
                   decoder_layers_per_block=(1,) * 4, spatio_temporal_scaling=(True,) * 4,
                   decoder_spatio_temporal_scaling=(True,) * 3, decoder_inject_noise=(False,) * 4,
                   downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"), patch_size=1,
                   spatial_compression_ratio=8, temporal_compression_ratio=8, scaling_factor=0.8), 9, 8),
}  # fmt: skip


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run hundreds of small ops: one thread does them as fast as two, and does not spin-wait for a
    second core that the machine's other work holds (which made a tiled pass 100x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
