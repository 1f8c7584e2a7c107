"""The phases of the video recipes and what several processes share: each phase trains exactly its parameter groups,
a killed video run resumes bit-exact, and BatchNorm statistics are those of every process's batch together.

- `CPUSyncBatchNorm` (training/sync_batchnorm.py) on one process is BatchNorm; on a 2-process gloo group started
  here, each process's output, input gradient and running statistics are those of one BatchNorm over both batches.
- A real 2-process `kl-ae train` of a tiny DC-AE with BatchNorm in its decoder and a batch-norm PatchGAN ends with
  the same BatchNorm statistics on both processes, the checkpoint's, and a release its diffusers class loads strictly.
  It runs this file as its module (`accelerate launch -m tests.test_video_phases`, see the bottom) so that each
  process writes down what it holds.
- tiny-video, tiny-video-phase2 and tiny-video-phase3 at test size on clips made here, chained as the recipes chain
  them: the parameters that move, and those the optimizers hold, are exactly the phase's groups.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import pytest
import torch
from torch import nn

from training.sync_batchnorm import CPUSyncBatchNorm, synchronize_batchnorm

from .conftest import checkpoint_tensors, clip_folder, launch_two_processes

# --- CPUSyncBatchNorm against BatchNorm


def _batchnorm(dims: int, channels: int, momentum: float | None) -> nn.Module:
    bn = (nn.BatchNorm2d if dims == 4 else nn.BatchNorm3d)(channels, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (3, 3, 2, 4, 5)], ids=["images", "clips"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_sync_batchnorm_on_one_process_is_batchnorm(shape, momentum):
    torch.manual_seed(0)
    bn = _batchnorm(len(shape), shape[1], momentum)
    holder = nn.Sequential(copy.deepcopy(bn))
    assert synchronize_batchnorm(holder, torch.device("cpu")) == 1
    sync = holder[0]
    assert isinstance(sync, CPUSyncBatchNorm) and sync.state_dict().keys() == bn.state_dict().keys()
    for _ in range(3):  # the running statistics over several updates
        x = torch.randn(shape) * 3 + 2  # far from zero mean, unit variance
        w = torch.randn(shape)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = bn(a), sync(b)
        (ya * w).sum().backward()
        (yb * w).sum().backward()
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sync.weight.grad, bn.weight.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sync.bias.grad, bn.bias.grad, rtol=1e-5, atol=1e-4)
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(sync.state_dict()[key], value, rtol=1e-6, atol=1e-6, msg=key)
    plain = copy.deepcopy(bn).eval()
    plain.load_state_dict(sync.state_dict(), strict=True)  # what export writes: a plain BatchNorm's state dict
    x = torch.randn(shape)
    assert torch.equal(sync.eval()(x), plain(x))  # eval mode: its running statistics, BatchNorm's own code


@pytest.mark.parametrize("device, cls", [("cpu", CPUSyncBatchNorm), ("cuda", nn.SyncBatchNorm)])
def test_batchnorm_layers_are_converted_in_place_for_each_device(device, cls):
    """The PatchGAN's BatchNorm layers replaced by `cls` (no GPU needed to convert), holding the very parameters and
    buffers they held (what an optimizer or the EMA built on them refers to), their mode and momentum."""
    from training.discriminator import PatchDiscriminator

    disc = PatchDiscriminator(3, base_channels=8, n_layers=3, norm="batch")
    disc.main[3].eval()
    disc.main[3].momentum = None
    held = [(n, id(t)) for n, t in chain(disc.named_parameters(), disc.named_buffers())]
    assert synchronize_batchnorm(disc, torch.device(device)) == 3
    assert synchronize_batchnorm(disc, torch.device(device)) == 0  # converted once
    layers = [m for m in disc.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(layers) == 3 and all(type(m) is cls for m in layers)
    assert held == [(n, id(t)) for n, t in chain(disc.named_parameters(), disc.named_buffers())]
    assert [(m.training, m.momentum) for m in layers] == [(False, None), (True, 0.1), (True, 0.1)]


# each process's share of the batch, uneven (4 and 2 items): the count must be summed too
SHARES, STEPS, C = (4, 2), 2, 3


def _two_process_batches() -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated batches of every step, (STEPS, N, C, H, W), and the weights of each step's loss."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, sum(SHARES), C, 3, 4, generator=g) * 2 + 1
    return x, torch.randn(x.shape, generator=g)


def _sync_worker(rank: int, store: str, out: str) -> None:
    """One process of the gloo group: CPUSyncBatchNorm on its share of each step's batch; what it saw, saved."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        holder = nn.Sequential(_batchnorm(4, C, 0.1))
        assert synchronize_batchnorm(holder, torch.device("cpu")) == 1
        sync = holder[0]
        xs, ws = _two_process_batches()
        start, stop = sum(SHARES[:rank]), sum(SHARES[: rank + 1])
        seen = {"y": [], "grad": []}
        for x, w in zip(xs[:, start:stop], ws[:, start:stop]):
            x = x.clone().requires_grad_()
            y = sync(x)
            (y * w).sum().backward()
            seen["y"].append(y.detach())
            seen["grad"].append(x.grad)
        seen |= {"weight_grad": sync.weight.grad, "bias_grad": sync.bias.grad, **sync.state_dict()}
        torch.save(seen, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_on_two_processes_is_one_batchnorm_over_both_batches(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sync_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    bn = _batchnorm(4, C, 0.1)
    xs, ws = _two_process_batches()
    for step, (x, w) in enumerate(zip(xs, ws)):
        x = x.clone().requires_grad_()
        y = bn(x)
        (y * w).sum().backward()
        for rank, part in enumerate(zip(y.split(SHARES), x.grad.split(SHARES))):
            torch.testing.assert_close(ranks[rank]["y"][step], part[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ranks[rank]["grad"][step], part[1], rtol=1e-5, atol=1e-5)
    for name in ("weight", "bias"):  # each process's share; DDP adds them up
        total = ranks[0][f"{name}_grad"] + ranks[1][f"{name}_grad"]
        torch.testing.assert_close(total, getattr(bn, name).grad, rtol=1e-5, atol=1e-4)
    for key, value in bn.state_dict().items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-6, atol=1e-6, msg=key)


# --- a 2-process run of a DC-AE with BatchNorm in its decoder, and the batch-norm PatchGAN

DC_ARCH = dict(latent_channels=4, attention_head_dim=4, encoder_block_types=["ResBlock", "EfficientViTBlock"],
               decoder_block_types=["ResBlock", "EfficientViTBlock"], encoder_block_out_channels=[8, 16],
               decoder_block_out_channels=[8, 16], encoder_layers_per_block=[1, 1], decoder_layers_per_block=[1, 1],
               encoder_qkv_multiscales=[[], [5]], decoder_qkv_multiscales=[[], [5]],
               decoder_norm_types=["batch_norm", "rms_norm"], decoder_act_fns=["relu", "silu"])  # fmt: skip
DC_RUN = ["model.family=dc-ae", *(f"model.arch.{k}={json.dumps(v)}" for k, v in DC_ARCH.items()),
          "data.resolution=32", "data.resize=48", "data.batch_size=2", "data.repeats=2", "train.log_every=1",
          "train.eval_every=100", "train.sample_every=100", "train.tracker=none", "train.mixed_precision=no",
          "loss.lpips=off", "loss.disc_start=0", "loss.disc_norm=batch", "loss.disc_channels=8", "loss.disc_layers=2",
          "train.export=true"]  # fmt: skip
RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def test_two_processes_keep_batchnorm_statistics_equal(tmp_path):
    """Each process's BatchNorm buffers at the end (written by `_train_and_save_batchnorm` below) are equal, moved,
    the checkpoint's, and the release loads strictly into AutoencoderDC with them."""
    from diffusers import AutoencoderDC
    from safetensors.torch import load_file

    out = tmp_path / "ddp"
    proc = launch_two_processes(["--out", str(out), "--max-steps", "3", *DC_RUN], module="tests.test_video_phases")
    decoder_bns = sum(isinstance(m, nn.BatchNorm2d) for m in AutoencoderDC(**DC_ARCH).decoder.modules())
    assert decoder_bns > 0
    assert f"BatchNorm: {decoder_bns + 2} layer(s) synchronized across 2 processes" in proc.stdout  # + the PatchGAN's
    ranks = [torch.load(out / f"batchnorm_{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) == 3 * (decoder_bns + 2)
    assert not [k for k in ranks[0] if not torch.equal(ranks[0][k], ranks[1][k])]
    assert all(v.item() >= 3 for k, v in ranks[1].items() if k.endswith("num_batches_tracked"))  # every step
    assert all(not torch.equal(v, torch.ones_like(v)) for k, v in ranks[1].items() if k.endswith("running_var"))
    ckpt = out / "checkpoints" / "step_0000003"
    saved = {f"model/{k}": v for k, v in load_file(ckpt / "model.safetensors").items()}
    saved |= {f"disc/{k}": v for k, v in load_file(ckpt / "model_1.safetensors").items()}
    assert not [k for k in ranks[1] if not torch.equal(saved[k], ranks[1][k])]
    release, info = AutoencoderDC.from_pretrained(out / "diffusers", output_loading_info=True)
    assert not any(info.values()), info
    for name, buffer in release.named_buffers():
        if name.endswith(RUNNING):  # EMA weights, the live BatchNorm statistics
            assert torch.equal(buffer, ranks[1][f"model/autoencoder.{name}"]), name


def _train_and_save_batchnorm() -> int:
    """`kl-ae train`'s entry point, each process then saving the BatchNorm buffers it holds: `batchnorm_<rank>.pt`."""
    import training.train

    summarize = training.train.run_summary

    def run_summary(cfg, accelerator, trained, *args):
        model, disc = trained
        held = {f"model/{n}": b for n, b in model.named_buffers() if n.endswith(RUNNING)}
        held |= {f"disc/{n}": b for n, b in disc.named_buffers() if n.endswith(RUNNING)}
        torch.save(held, Path(cfg.out_dir) / f"batchnorm_{accelerator.process_index}.pt")
        return summarize(cfg, accelerator, trained, *args)

    training.train.run_summary = run_summary
    return training.train.cli()


# --- the video recipes' phases, chained: tiny-video -> tiny-video-phase2 -> tiny-video-phase3

ARCH = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True])
SMALL = ["data.num_frames=5", "data.batch_size=1", "data.repeats=2", "data.val_fraction=0.34", "loss.lpips=off",
         "loss.disc_channels=8", "train.tracker=none", "train.mixed_precision=no", "train.log_every=1",
         "train.export=true"]  # fmt: skip


@dataclass
class Watched:
    """A run, with its models as built (on one CPU process the prepared modules are these very objects), their
    parameters and buffers when built (`model.*`, `disc.*`), and the tensors each optimizer holds."""

    out: Path
    overrides: list[str]
    model: nn.Module
    disc: nn.Module
    before: dict[str, torch.Tensor]
    opt_g: list[torch.Tensor]
    opt_d: list[torch.Tensor]

    def now(self) -> dict[str, torch.Tensor]:
        return tensors(self.model, self.disc)

    def moved(self) -> set[str]:
        now = self.now()
        return {k for k in now if not torch.equal(now[k], self.before[k])}

    def group(self, *names: str) -> set[str]:
        """The `model.*` names of the autoencoder's parameter groups `names`."""
        ids = {id(p) for n in names for p in self.model.adapter.param_groups()[n]}
        return {f"model.{n}" for n, p in self.model.named_parameters() if id(p) in ids}


def tensors(model: nn.Module, disc: nn.Module) -> dict[str, torch.Tensor]:
    named = chain(((f"model.{n}", t) for n, t in chain(model.named_parameters(), model.named_buffers())),
                  ((f"disc.{n}", t) for n, t in chain(disc.named_parameters(), disc.named_buffers())))  # fmt: skip
    return {n: t.detach().clone() for n, t in named}


def train_watched(out: Path, config: str, *overrides: str) -> Watched:
    """`training.train.main` of the recipe `config` with `overrides`, watched: what it built, what it optimizes."""
    import training.train
    from training.config import load_config

    seen = {}
    build, prepare = training.train.build_models, training.train.prepare_step

    def build_models(*args):
        models = seen["models"] = build(*args)
        seen["before"] = tensors(models.model, models.discriminator)
        return models

    def prepare_step(*args):
        step, *rest = prepare(*args)
        seen["opt"] = [[p for g in opt.param_groups for p in g["params"]] for opt in (step.modules.opt_g,
                                                                                    step.modules.opt_d)]  # fmt: skip
        return step, *rest

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training.train, "build_models", build_models)
        patch.setattr(training.train, "prepare_step", prepare_step)
        training.train.main(load_config(config, [*overrides, f"out_dir={out}"]))
    models = seen["models"]
    return Watched(out, list(overrides), models.model, models.discriminator, seen["before"], *seen["opt"])


@pytest.fixture(scope="module")
def phases(tmp_path_factory) -> dict[str, Watched]:
    """Phase 1 from scratch (1 step), phase 2 from its release with the GAN from step 1 (3 steps, a checkpoint at
    each), phase 3 from phase 2's at twice the resolution (1 step)."""
    root = tmp_path_factory.mktemp("phases")
    (root / "clips").mkdir()
    clips = clip_folder(root / "clips", 9, 64, 64)
    low = [*SMALL, f"data.source={clips}", "data.resolution=32", "data.resize=40"]
    runs = {"phase1": train_watched(root / "phase1", "tiny-video", *low, "train.max_steps=1",
                                    *(f"model.arch.{k}={json.dumps(v)}" for k, v in ARCH.items()))}  # fmt: skip
    runs["phase2"] = train_watched(root / "phase2", "tiny-video-phase2", *low, f"model.init_from={root / 'phase1'}",
                                   "train.max_steps=3", "loss.disc_start=1", "train.checkpoint_every=1",
                                   "train.keep_checkpoints=3")  # fmt: skip
    runs["phase3"] = train_watched(root / "phase3", "tiny-video-phase3", *SMALL, f"data.source={clips}",
                                   "data.resolution=64", "data.resize=64", f"model.init_from={root / 'phase2'}",
                                   "train.max_steps=1")  # fmt: skip
    return runs


def optimizes_exactly(run: Watched, trainable: set[str]) -> None:
    """The autoencoder's optimizer holds exactly the `trainable` parameters, which alone take gradients; the
    discriminator's holds all of its own."""
    names = {id(p): f"model.{n}" for n, p in run.model.named_parameters()}
    assert {names[id(p)] for p in run.opt_g} == trainable and len(run.opt_g) == len(trainable)
    assert {n for n, p in run.model.named_parameters() if p.requires_grad} == {n[6:] for n in trainable}
    assert {id(p) for p in run.opt_d} == {id(p) for p in run.disc.parameters()}


def kernels(run: Watched, names: set[str]) -> set[str]:
    """The conv kernels among `names`: tensors every adversarial step moves (a logit bias may take a zero gradient:
    the hinge loss's real and fake terms cancel while every logit is within the margin)."""
    return {n for n in names if run.before[n].dim() > 1}


def test_phase1_trains_the_autoencoder_alone(phases):
    run = phases["phase1"]
    trainable = run.group("encoder", "decoder")
    assert trainable == {n for n in run.before if n.startswith("model.") and n != "model.logvar"}
    optimizes_exactly(run, trainable)
    assert run.moved() == trainable  # every encoder and decoder tensor, no discriminator one (no GAN in phase 1)


def test_phase2_moves_the_discriminator_once_the_gan_starts(phases):
    from safetensors.torch import load_file

    run = phases["phase2"]
    trainable = run.group("encoder", "decoder")
    optimizes_exactly(run, trainable)
    disc = {n for n in run.before if n.startswith("disc.")}
    assert run.moved() - disc == trainable and kernels(run, disc) <= run.moved()
    first = load_file(run.out / "checkpoints" / "step_0000001" / "model_1.safetensors")  # loss.disc_start=1
    assert first.keys() == {n[5:] for n in disc}
    assert all(torch.equal(first[n[5:]], run.before[n]) for n in disc)
    second = load_file(run.out / "checkpoints" / "step_0000002" / "model_1.safetensors")
    assert all(not torch.equal(second[n[5:]], run.before[n]) for n in kernels(run, disc))


def test_phase3_trains_the_decoder_alone_and_keeps_the_normalization(phases):
    run = phases["phase3"]
    trainable = run.group("decoder")
    assert trainable and run.group("encoder") and not trainable & run.group("encoder")
    optimizes_exactly(run, trainable)
    disc = {n for n in run.before if n.startswith("disc.")}
    assert run.moved() - disc == trainable  # the encoder bit-identical, every decoder tensor moved
    assert kernels(run, disc) <= run.moved()  # the GAN from step 0
    configs = [json.loads((phases[p].out / "diffusers" / "config.json").read_text()) for p in ("phase2", "phase3")]
    assert configs[1]["scale_factor_spatial"] == 4
    for key in ("latents_mean", "latents_std"):  # the latent space and its normalization stay phase 2's
        assert configs[1][key] == configs[0][key] and len(configs[0][key]) == ARCH["z_dim"]


def test_a_killed_video_run_resumes_bit_exact(phases, tmp_path):
    """Phase 2 killed right after its step-1 checkpoint, run again with the same command: its step-3 checkpoint is the
    uninterrupted run's, bit for bit (both models, both optimizers, the EMA, the schedules)."""
    from training.config import load_config
    from training.train import main as train_main

    from .conftest import resume_from

    straight = phases["phase2"]
    killed = tmp_path / "killed"
    resume_from(straight.out, killed, 1)
    summary = train_main(load_config("tiny-video-phase2", [*straight.overrides, f"out_dir={killed}"]))
    assert summary["steps"] == 3
    a = checkpoint_tensors(straight.out / "checkpoints" / "step_0000003")
    b = checkpoint_tensors(killed / "checkpoints" / "step_0000003")
    assert a.keys() == b.keys() and any(k.startswith("model_1/") for k in a)  # the discriminator too
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:10]
    c = checkpoint_tensors(killed / "checkpoints" / "step_0000001")  # and the resumed run did train, the GAN too
    assert not torch.equal(c["ema/0"], b["ema/0"])
    assert not torch.equal(c["model_1/main.0.weight"], b["model_1/main.0.weight"])
    state = json.loads((killed / "checkpoints" / "step_0000003" / "trainer_state.json").read_text())
    assert state["batches_seen"] == 3 and (killed / "checkpoints" / "latest").read_text() == "step_0000003"


if __name__ == "__main__":  # `accelerate launch -m tests.test_video_phases ARGS`: see _train_and_save_batchnorm
    sys.exit(_train_and_save_batchnorm())
