"""The modern formats: deep compression (DC-AE, diffusers `AutoencoderDC`) and FLUX.2 (`AutoencoderKLFlux2`) trained
from scratch and phase by phase.

- With its learned branches zeroed, the DC encoder is channel-averaged pixel-unshuffle and its decoder the
  channel-duplicating pixel-shuffle mirror: the residual shortcuts are what they claim to be.
- A `tiny-dc` and a `tiny-flux2` run export folders that their diffusers classes load strictly and that reconstruct
  as our model does through the interface.
- Each phase of DC-AE's recipe trains exactly its parameter groups (everything else bit-identical, no optimizer
  state), continues from the previous phase's run (its frozen weights are that run's final ones) and resumes exactly.
- The deterministic bottleneck: no KL term in the loss or its gradient, sample() == mode(); the channel mask of
  DC-AE 1.5 reaches the decoder.
- `model.family` / `model.arch`: the recipes build, and a mistake is a one-line error before any compute.
"""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kl_autoencoder.interface import load_autoencoder, new_autoencoder
from training.config import ConfigError, LossConfig, load_config
from training.shaping import Shaping
from training.step import AutoencoderWithLoss, Forward, LossInputs, StepSchedule, generator_objective

from .conftest import FAMILY_CONFIGS, checkpoint_tensors

# a few steps of a recipe through the trainer, as small as the recipe allows: 64 px (tiny-flux2: 32 px) crops
FAST = ["data.resize=80", "data.batch_size=2", "data.repeats=2", "train.log_every=1", "train.eval_every=100",
        "train.sample_every=100", "train.checkpoint_every=100", "train.tracker=none", "train.mixed_precision=no",
        "loss.lpips=off", "train.export=false"]  # fmt: skip
RESOLUTION = {"tiny-dc": 64, "tiny-flux2": 32}

# a 3-level (f4) DC-AE: ResBlocks, then an EfficientViT (linear attention) level; pixel (un)shuffle up and down
_BLOCKS = ("ResBlock", "ResBlock", "EfficientViTBlock")
SHORTCUT_DC = dict(latent_channels=8, attention_head_dim=4, encoder_block_types=_BLOCKS, decoder_block_types=_BLOCKS,
                   encoder_block_out_channels=(8, 16, 32), decoder_block_out_channels=(8, 16, 32),
                   encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                   encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)))  # fmt: skip


def zero_(*modules: torch.nn.Module) -> None:
    """Every weight and bias of the modules set to 0: convolutions, linear maps and the norms' affine terms."""
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.zero_()


def average_groups(h: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, channels, H, W): the mean of each run of C / channels consecutive channels."""
    return h.unflatten(1, (channels, h.shape[1] // channels)).mean(2)


@pytest.fixture(scope="module")
def dc_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dc-shortcut")
    diffusers.AutoencoderDC(**SHORTCUT_DC).save_pretrained(folder)
    return folder


@torch.no_grad()
def test_dc_shortcuts_are_space_to_channel(dc_folder):
    ae = load_autoencoder(dc_folder)
    encoder, decoder = ae.module.encoder, ae.module.decoder
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    trained_z, trained_x = ae.encode(x).mode(), ae.decode(z)

    zero_(encoder.down_blocks, encoder.conv_out)  # the stem (conv_in) is no branch: the shortcuts start after it
    zero_(decoder.conv_in, decoder.up_blocks)  # the head (norm_out, conv_out) is none either: they end before it
    widths = SHORTCUT_DC["encoder_block_out_channels"]
    h = encoder.conv_in(x)  # (2, 8, 32, 32)
    for width in widths[1:]:  # each level: space to channel, then channel groups averaged to the next width
        h = average_groups(F.pixel_unshuffle(h, 2), width)
    expected_z = average_groups(h, 8)  # the encoder's output shortcut: (2, 32, 8, 8) -> (2, 8, 8, 8)
    assert expected_z.shape == (2, 8, 8, 8)
    assert torch.allclose(ae.encode(x).mode(), expected_z, atol=1e-6)
    assert not torch.allclose(trained_z, expected_z, atol=1e-3)  # the learned branches did contribute

    h = z.repeat_interleave(widths[-1] // 8, dim=1)  # the decoder's input shortcut: channels duplicated
    for width, wider in zip(widths[-2::-1], widths[:0:-1]):  # each level: channels duplicated, channel to space
        h = F.pixel_shuffle(h.repeat_interleave(width * 4 // wider, dim=1), 2)
    assert h.shape == (2, widths[0], 32, 32)
    head = decoder.conv_out(decoder.conv_act(decoder.norm_out(h.movedim(1, -1)).movedim(-1, 1)))
    assert torch.allclose(ae.decode(z), head, atol=1e-6)
    assert not torch.allclose(trained_x, head, atol=1e-3)


def train(recipe: str, out, steps: int, *overrides: str) -> dict:
    """`recipe` for `steps` steps in this process (resuming what `out` holds): its summary."""
    from training.train import main

    size = RESOLUTION.get(recipe.split("-phase")[0], 64)
    args = [*FAST, f"data.resolution={size}", f"out_dir={out}", f"train.max_steps={steps}", *overrides]
    return main(load_config(recipe, args))


def load_strictly(folder) -> torch.nn.Module:
    cls = getattr(diffusers, json.loads((folder / "config.json").read_text())["_class_name"])
    module = cls.from_config(cls.load_config(folder))
    module.load_state_dict(load_file(str(folder / "diffusion_pytorch_model.safetensors")), strict=True)
    return module.eval()


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tiny-dc", "tiny-flux2"])
def test_a_new_family_run_exports_its_diffusers_class(recipe, tmp_path):
    out = tmp_path / "run"
    train(recipe, out, 2, "train.export=true")
    release = out / "diffusers"
    arch = load_config(recipe).model.arch
    config = json.loads((release / "config.json").read_text())
    assert all(config[k] == (list(v) if isinstance(v, tuple) else v) for k, v in arch.items())  # the recipe's class
    vae, ours = load_strictly(release), load_autoencoder(out)  # the run folder: its release
    x = images(2, RESOLUTION[recipe])
    with torch.no_grad():
        z = ours.encode(x).mode()
        if recipe == "tiny-dc":  # deterministic: one point, a measured scaling factor
            theirs = vae.encode(x).latent
            measured = config["scaling_factor"]
            assert measured != 1.0 and ours.normalization()["scaling_factor"] == measured
        else:  # the BatchNorm statistics measured at export (its fresh state is mean 0, variance 1)
            theirs = vae.encode(x).latent_dist.mode()
            assert not torch.equal(vae.bn.running_mean, torch.zeros_like(vae.bn.running_mean))
            assert not torch.equal(vae.bn.running_var, torch.ones_like(vae.bn.running_var))
        assert (z - theirs).abs().max() <= 1e-5
        assert (ours.decode(z) - vae.decode(theirs).sample).abs().max() <= 1e-5
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if recipe == "tiny-dc":  # the deterministic bottleneck: no KL term was logged
        assert rows and not any(k.startswith("train/kl") for row in rows for k in row)
    else:
        assert all("train/kl" in row for row in rows)


def state_names(ae) -> dict[str, set[str]]:
    """The state-dict names of each parameter group of `ae`."""
    names = {id(p): n for n, p in ae.module.named_parameters()}
    return {group: {names[id(p)] for p in params} for group, params in ae.param_groups().items()}


def live_weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    """The trained (not the EMA) weights of a checkpoint, by the family's own state-dict names."""
    saved = load_file(run_dir / "checkpoints" / f"step_{step:07d}" / "model.safetensors")
    return {k.removeprefix("autoencoder."): v for k, v in saved.items() if k.startswith("autoencoder.")}


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {n for n in a if not torch.equal(a[n], b[n])}


@pytest.fixture(scope="module")
def phase1(tmp_path_factory):
    """Phase 1 of tiny-dc: full training, 2 steps; its newest weights are the checkpoint's (no release)."""
    out = tmp_path_factory.mktemp("phases") / "phase1"
    train("tiny-dc", out, 2, "loss.channel_mask=0.5")  # DC-AE 1.5's structured latent, as a recipe option
    return out


@pytest.mark.slow
@pytest.mark.parametrize("recipe, groups, modules", [
    # high-resolution latent adaptation: the encoder's output projection and the decoder's input projection
    ("tiny-dc-phase2", ["encoder_out", "decoder_in"], ("encoder.conv_out.", "decoder.conv_in.")),
    # local refinement, with the GAN from the first step: the decoder's head
    ("tiny-dc-phase3", ["decoder_head"], ("decoder.norm_out.", "decoder.conv_out.")),
])  # fmt: skip
def test_a_phase_trains_exactly_its_groups(recipe, groups, modules, phase1, tmp_path):
    out = tmp_path / "run"
    train(recipe, out, 3, f"model.init_from={phase1}")
    start = load_autoencoder(phase1 / "checkpoints" / "step_0000002")  # phase 1's final weights
    before = start.module.state_dict()
    trained = live_weights(out, 3)
    assert trained.keys() == before.keys()  # phase 1's architecture, its arguments from the run, not the recipe
    arch = {k: v for k, v in load_autoencoder(out).config.items() if not k.startswith("_")}
    assert arch == {k: v for k, v in start.config.items() if not k.startswith("_")}
    trains = {n for n in before if n.startswith(modules)}
    assert set().union(*(state_names(start)[g] for g in groups)) == trains  # the interface's groups are these
    assert changed(before, trained) == trains  # every parameter of the phase's modules moved, and nothing else
    optimizer = torch.load(out / "checkpoints" / "step_0000003" / "optimizer.bin", weights_only=True)
    assert len(optimizer["state"]) == len(trains)  # the frozen parameters have no optimizer state
    released = load_autoencoder(out).module.state_dict()  # the EMA weights the run gives
    assert changed(before, released) <= trains
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(("train/g_adv" in row) == (recipe == "tiny-dc-phase3") for row in rows)


@pytest.mark.slow
def test_a_phase_resumes_exactly(phase1, tmp_path):
    args = (f"model.init_from={phase1}", "train.checkpoint_every=2")
    train("tiny-dc-phase2", tmp_path / "straight", 3, *args)
    train("tiny-dc-phase2", tmp_path / "split", 2, *args)
    assert train("tiny-dc-phase2", tmp_path / "split", 3, *args)["steps"] == 3  # resumed at step 2
    a, b = (checkpoint_tensors(tmp_path / r / "checkpoints" / "step_0000003") for r in ("straight", "split"))
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]


def test_the_deterministic_bottleneck_has_no_kl_term():
    torch.manual_seed(0)
    ae = new_autoencoder("dc-ae", SHORTCUT_DC)
    model = AutoencoderWithLoss(ae, learn_logvar=False, logvar_init=0.0)
    x = images(2, 32)
    recon, posterior, extras = model(x)
    z = posterior.mode()
    assert posterior.logvar is None and torch.equal(posterior.sample(torch.Generator().manual_seed(1)), z)
    assert torch.equal(posterior.kl(), torch.zeros(2))
    inputs = LossInputs(model.logvar, model.last_layer, discriminator=None)
    losses, grads = [], []
    for kl_weight in (0.0, 1.0):  # no KL term: its weight changes neither the loss nor a gradient
        ae.module.zero_grad()
        loss, logs = generator_objective(Forward(x, recon, posterior, extras), inputs, LossConfig(kl_weight=kl_weight),
                                         StepSchedule())  # fmt: skip
        assert not [k for k in logs if "kl" in k]
        loss.backward(retain_graph=True)
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in ae.module.parameters()])
    assert torch.equal(*losses) and all(torch.equal(a, b) for a, b in zip(*grads))

    # DC-AE 1.5's channel mask reaches the decoder of a deterministic latent: the first k channels, the rest zero
    masked, _, _ = model(x, Shaping(keep_channels=3))
    with torch.no_grad():
        expected = ae.decode(torch.cat([z[:, :3], torch.zeros_like(z[:, 3:])], dim=1))
    assert torch.allclose(masked, expected, atol=1e-6) and not torch.allclose(masked, recon, atol=1e-4)


@pytest.mark.parametrize("recipe, family, factor, channels", [
    ("tiny-dc", "dc-ae", 32, 32), ("dc-f32c32", "dc-ae", 32, 32), ("dc-f64c128", "dc-ae", 64, 128),
    ("tiny-flux2", "flux2", 8, 32), ("flux2-f8c32", "flux2", 8, 32),
])  # fmt: skip
def test_the_recipes_build_their_formats(recipe, family, factor, channels):
    cfg = load_config(recipe)
    with torch.device("meta"):  # the full-size architectures, without allocating their weights
        ae = cfg.model.new_autoencoder()
        latents = ae.normalize(torch.empty(1, channels, 4, 4))
        posterior = ae.encode(torch.empty(1, 3, 64, 64))
    assert (ae.family, ae.spatial_factor, ae.latent_channels) == (family, factor, channels)
    if family == "flux2":  # FLUX.2's transformer sees 2x2-patchified latents; the decoder is narrower
        assert latents.shape == (1, 4 * channels, 2, 2)
        assert ae.config["decoder_block_out_channels"] < ae.config["block_out_channels"]
    else:
        assert latents.shape == (1, channels, 4, 4) and posterior.logvar is None  # deterministic


@pytest.mark.parametrize("recipe, overrides, message", [
    ("tiny-dc", ["model.arch.latent_chanels=8"], r"model\.arch: AutoencoderDC takes no argument \['latent_chanels'\]"),
    ("tiny-dc", ["model.arch.latent_channels=7"], "model.arch: AutoencoderDC cannot encode and decode 128 px images"),
    ("tiny-dc", ["model.base_channels=8"], "model.base_channels: a field of our model's preset"),
    ("tiny-dc", ["data.resolution=48", "data.resize=64"], "data.resolution: AutoencoderDC takes images whose sides"),
    ("tiny-flux2", ["model.arch.norm_num_groups=5"], "model.arch: AutoencoderKLFlux2 cannot be built"),
    (None, ["model.arch.latent_channels=8"], "model.arch: the constructor arguments of a diffusers family's class"),
    ("tiny-dc-phase2", [], r"train.trainable: \['encoder_out', 'decoder_in'\]-only training needs model.init_from"),
    ("tiny-dc", ["model.init_from=."], "model.arch: model.init_from brings its own architecture"),
])  # fmt: skip
def test_a_format_mistake_is_one_line_before_any_compute(recipe, overrides, message):
    with pytest.raises(ConfigError, match=f"^{message}") as e:
        load_config(recipe, overrides)
    assert "\n" not in str(e.value)


def test_an_override_sets_one_architecture_argument():
    base = load_config("tiny-dc").model.arch
    arch = load_config("tiny-dc", ["model.arch.latent_channels=16", "model.arch.attention_head_dim=null"]).model.arch
    assert arch == {k: v for k, v in base.items() if k != "attention_head_dim"} | {"latent_channels": 16}


def test_a_phase_refuses_another_family(tmp_path, capsys):
    from kl_ae.commands.cli import main as kl_ae

    new_autoencoder("flux2", FAMILY_CONFIGS["flux2"][1]).save_pretrained(tmp_path / "flux2")
    argv = ["train", "--config", "tiny-dc-phase2", "--out", str(tmp_path / "run"), "data.resolution=32"]
    assert kl_ae([*argv, "data.resize=32", f"model.init_from={tmp_path / 'flux2'}", "train.tracker=none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.init_from:") and "holds a AutoencoderKLFlux2, not model.family dc-ae" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_formats_bench_at_toy_size():
    from kl_ae.bench.common import BenchConfig
    from kl_ae.bench.formats import FormatsConfig, bench_dc_step, bench_dc_vs_sd, photo_batches, step_child
    from kl_ae.bench.run import run_bench

    with pytest.raises(ValueError, match="dc-vs-sd"):  # the sections are registered with `kl-ae bench --what`
        run_bench(BenchConfig(what=("no-such-section",)))
    a, b = (list(photo_batches(64, 2, 3, seed=1)) for _ in range(2))  # both architectures see the same batches
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    cfg = FormatsConfig(seeds=(0, 1), train_steps=2, train_batch_size=2, resolution=64, eval_resolution=64, steps=1,
                        repeats=1, compiled=False)  # fmt: skip
    r = bench_dc_vs_sd(cfg)
    assert 0.9 <= r["sd_over_dc_parameters"] <= 1.1 and set(r["per_seed"]) == {"0", "1"}
    diffs = [row["dc_psnr_db"] - row["sd_psnr_db"] for row in r["per_seed"].values()]
    assert r["dc_minus_sd"]["mean_diff_db"] == pytest.approx(sum(diffs) / 2)
    assert r["dc_minus_sd"]["stderr_db"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2)  # stdev / sqrt(n), n = 2
    step = bench_dc_step(cfg)
    variants = ("dc", "dc_attention_as_resblocks", "dc_conv_instead_of_shuffles", "dc_without_latent_shortcuts",
                "dc_batchnorm_decoder", "sd_same_parameters")  # fmt: skip
    assert all(step[v]["s_per_step"] > 0 and step[v]["parameters"] > 0 for v in variants)
    assert step["speedup_vs_diffusers_plain"] > 0 and step["dc"]["time_over_dc"] == 1.0
    # one formats-step measurement, in this process: its heap may already hold the memory, so the rise can be 0 here
    row = step_child("tiny-flux2", 64, 2, "fp32", "cpu", 1, 1)
    assert row["parameters"] > 0 and row["s_per_step"] > 0 and row["peak_mib"] >= row["rise_mib"] >= 0


def test_the_ema_weights_carry_the_live_batchnorm_statistics():
    """A DC decoder with BatchNorm (dc-f64c128's): the EMA averages parameters only, so validation and export must
    take the running statistics from the live model, not keep the fresh ones of the EMA copy."""
    import copy

    from training.step import GuardedEMA
    from training.validation import weights_for_use

    arch = dict(SHORTCUT_DC, decoder_norm_types="batch_norm")
    live = new_autoencoder("dc-ae", arch)
    ema_model = copy.deepcopy(live)
    ema = GuardedEMA(live.module.parameters(), decay=0.9)
    live.module.train()
    with torch.no_grad():
        live.decode(torch.randn(4, 8, 8, 8) * 3 + 1)  # the decoder's BatchNorms measure this batch
    stats = {n: b for n, b in live.module.named_buffers() if n.endswith("running_mean")}
    assert stats and all(b.abs().sum() > 0 for b in stats.values())
    used = weights_for_use(live, ema, ema_model)
    assert used is ema_model
    for name, buffer in used.module.named_buffers():
        assert torch.equal(buffer, dict(live.module.named_buffers())[name]), name


@pytest.mark.parametrize("trainable, init_from, kept", [
    ("decoder", True, True), (["decoder_head"], True, True), (["decoder_in", "decoder_head"], True, True),
    (["encoder_out", "decoder_in"], True, False),  # DC-AE's phase 2 moves the latents: its scale is measured anew
    (["encoder"], True, False), ("all", True, False), ("decoder", False, False),
])  # fmt: skip
def test_a_release_keeps_the_normalization_only_of_a_frozen_latent(trainable, init_from, kept, tmp_path):
    import yaml

    from kl_ae.common.release import keeps_latent_space

    saved = {"train": {"trainable": trainable}, "model": {"init_from": "runs/before" if init_from else None}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert keeps_latent_space(tmp_path) is kept


def test_our_model_has_the_projections_at_the_latent():
    from kl_autoencoder import Autoencoder, AutoencoderConfig
    from kl_autoencoder.families.ours import wrap

    ae = wrap(Autoencoder(AutoencoderConfig(base_channels=8, channel_mult=(1, 2), layers_per_block=1,
                                            latent_channels=4, norm_num_groups=4)))  # fmt: skip
    names = state_names(ae)
    assert names["encoder_out"] == {"encoder.conv_out.weight", "encoder.conv_out.bias", "quant_conv.weight",
                                    "quant_conv.bias"}  # fmt: skip
    assert names["decoder_in"] == {"post_quant_conv.weight", "post_quant_conv.bias", "decoder.conv_in.weight",
                                   "decoder.conv_in.bias"}  # fmt: skip
    ae.freeze(["encoder_out", "decoder_in"])
    assert {n for n, p in ae.module.named_parameters() if p.requires_grad} == names["encoder_out"] | names["decoder_in"]
