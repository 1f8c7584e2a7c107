"""Gradient checkpointing of the trained video families: Wan's per causal chunk (its class refuses checkpointing: its
cache is a list the layers overwrite), LTX's through its class. On gives the loss and gradients of off, and keeps
far less for backward.

What backward keeps is measured with an outer `saved_tensors_hooks` (the distinct storages saved outside
checkpointed regions, plus each region's boundaries): exact and the same on every machine, unlike a CPU's peak RSS
(BENCHMARKS.md measures that)."""

from __future__ import annotations

import pytest
import torch

WAN = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True])
WAN22 = dict(WAN, patch_size=2, in_channels=12, out_channels=12, is_residual=True)  # Wan 2.2: patchified, residual
LTX = dict(latent_channels=8, block_out_channels=[8, 8, 8, 8], decoder_block_out_channels=[8, 8, 8, 8],
           layers_per_block=[1, 1, 1, 1, 1], decoder_layers_per_block=[1, 1, 1, 1, 1],
           spatio_temporal_scaling=[True, True, True, False],
           decoder_spatio_temporal_scaling=[True, True, True, False], patch_size=1,
           decoder_inject_noise=[False] * 5)  # fmt: skip


def adapter(class_name: str, arch: dict):
    import diffusers

    from kl_autoencoder.families.ltx_video import LTXVideo
    from kl_autoencoder.families.qwen_wan import QwenWan

    torch.manual_seed(0)
    module = getattr(diffusers, class_name)(**arch).train()
    return (QwenWan if class_name == "AutoencoderKLWan" else LTXVideo)(module, class_name)


def loss_and_grads(ae, x: torch.Tensor, on: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """The loss, every parameter's gradient and the bytes kept for backward, of one forward + backward."""
    ae.gradient_checkpointing(on)
    ae.module.zero_grad(set_to_none=True)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        posterior = ae.encode(x)
        z = posterior.sample(torch.Generator().manual_seed(1))
        recon = ae.decode(z)
        loss = (recon - x).abs().mean() + 1e-3 * posterior.kl().mean() + z.square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in ae.module.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(storages.values())


@pytest.mark.parametrize(
    "class_name, arch, frames",
    [("AutoencoderKLWan", WAN, 9), ("AutoencoderKLWan", WAN22, 9), ("AutoencoderKLLTXVideo", LTX, 9)],
    ids=["wan2.1", "wan2.2", "ltx"],
)
def test_checkpointing_gives_the_same_loss_and_gradients_and_keeps_less(class_name, arch, frames):
    ae = adapter(class_name, arch)
    x = torch.rand(2, 3, frames, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss_off, grads_off, kept_off = loss_and_grads(ae, x, False)
    loss_on, grads_on, kept_on = loss_and_grads(ae, x, True)
    torch.testing.assert_close(loss_on, loss_off, atol=1e-5, rtol=0)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) == len(list(ae.module.parameters()))
    worst = max((grads_on[k] - grads_off[k]).abs().max().item() for k in grads_off)
    assert worst <= 1e-5, f"gradients differ by {worst:.2e} with checkpointing on"
    assert kept_on < 0.5 * kept_off, f"kept for backward: {kept_on} B with checkpointing, {kept_off} B without"


def test_wan_checkpointing_is_for_training_only():
    """Without gradients, or through the spatial tiles, the class's own pass runs (nothing to recompute)."""
    from kl_autoencoder.families import qwen_wan

    ae = adapter("AutoencoderKLWan", WAN)
    ae.gradient_checkpointing(True)
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    calls = []
    real = qwen_wan.checkpointed_encode
    qwen_wan.checkpointed_encode = lambda *a: calls.append(1) or real(*a)
    try:
        with torch.no_grad():
            whole = ae.encode(x).mode()
        assert not calls
        chunked = ae.encode(x).mode()
        assert calls
    finally:
        qwen_wan.checkpointed_encode = real
    torch.testing.assert_close(chunked.detach(), whole, atol=1e-6, rtol=0)


def test_a_wan_run_trains_with_model_gradient_checkpointing(tmp_path, monkeypatch):
    """The trainer switches it on through the adapter (Wan's class refuses `enable_gradient_checkpointing`), and the
    step's encode and decode then run chunk by chunk."""
    import json

    from kl_autoencoder.families import qwen_wan
    from training.config import load_config
    from training.train import main as train

    from .conftest import clip_folder

    calls = {"encode": 0, "decode": 0}
    for name in calls:
        real = getattr(qwen_wan, f"checkpointed_{name}")
        spy = lambda *a, name=name, real=real: calls.__setitem__(name, calls[name] + 1) or real(*a)  # noqa: E731
        monkeypatch.setattr(qwen_wan, f"checkpointed_{name}", spy)
    (tmp_path / "clips").mkdir()
    clips = clip_folder(tmp_path / "clips", 7, 32, 32)
    overrides = ["model.family=wan", "model.gradient_checkpointing=true", f"data.source={clips}", "data.num_frames=5",
                 "data.resolution=32", "data.resize=32", "data.batch_size=1", "data.val_fraction=0.34",
                 "train.max_steps=2", "train.eval_every=2", "train.ema=false", "train.export=false", "loss.lpips=off",
                 f"out_dir={tmp_path / 'run'}"]  # fmt: skip
    overrides += [f"model.arch.{k}={json.dumps(v)}" for k, v in WAN.items()]
    assert train(load_config(None, overrides))["steps"] == 2
    assert calls["encode"] >= 2 and calls["decode"] >= 2, calls  # the validation's passes, without grad, do not count


@pytest.mark.slow
def test_two_processes_train_a_video_vae_with_images_mixed_in(tmp_path):
    """Under DDP a one-frame clip leaves a causal class's temporal convolutions out of the graph (images mixed into
    clips, `data.image_ratio`): DDP looks for unused parameters with a diffusers class, so the run trains on, with
    checkpointing on, and both processes end with the same weights (it failed at its second step)."""
    import json

    from .conftest import clip_folder, launch_two_processes

    (tmp_path / "clips").mkdir()
    clips = clip_folder(tmp_path / "clips", 7, 32, 32)
    out = tmp_path / "ddp"
    args = ["--out", str(out), "--max-steps", "4", "model.family=wan", "model.gradient_checkpointing=true",
            f"data.source={clips}", "data.num_frames=5", "data.image_ratio=0.5", "data.resolution=32",
            "data.resize=32", "data.batch_size=1", "data.val_fraction=0.34", "train.eval_every=4",
            "train.checkpoint_every=4", "train.ema=false", "train.export=false", "train.mixed_precision=no",
            "loss.lpips=off", "train.tracker=none"]  # fmt: skip
    args += [f"model.arch.{k}={json.dumps(v)}" for k, v in WAN.items()]
    launch_two_processes(args)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["num_processes"] == 2 and summary["replicas_identical"] is True
