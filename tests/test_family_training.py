"""Training and export of every autoencoder family through the real entry points (`training.train.main`, `kl-ae`),
on the tiny random models of `family_folders`.

A decoder-only fine-tune keeps the latent space bit-identical (the encoder, FLUX.2's BatchNorm statistics, RAE's
encoder) and moves the decoder; a full fine-tune moves the encoder; `train.trainable=[decoder_head]` moves only the
head and gives the rest no optimizer state; a family run's release loads strictly into the same diffusers class,
with the family's normalization measured so that held-out latents, normalized as its pipeline does, are unit;
a family run resumes exactly; what a family cannot do is a one-line error before any compute.
"""

from __future__ import annotations

import json
from itertools import chain

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kl_ae.commands.cli import main as kl_ae
from kl_autoencoder.folders import EXPORT_KEY, find_diffusers_folder
from kl_autoencoder.interface import load_autoencoder

from .conftest import FAMILY_CONFIGS, TINY, checkpoint_tensors, run


def group_names(ae) -> dict[str, set[str]]:
    """The state-dict names of each parameter group, and "buffers": every buffer the state dict holds."""
    names = {id(t): n for n, t in chain(ae.module.named_parameters(), ae.module.named_buffers())}
    groups = {g: {names[id(t)] for t in ts} for g, ts in ae.param_groups().items()}
    state = ae.module.state_dict()
    groups["buffers"] = {n for n, _ in ae.module.named_buffers() if n in state}
    return groups


def live_weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    """The trained (not the EMA) autoencoder weights of a checkpoint, by the family's own state-dict names."""
    saved = load_file(run_dir / "checkpoints" / f"step_{step:07d}" / "model.safetensors")
    return {k.removeprefix("autoencoder."): v for k, v in saved.items() if k.startswith("autoencoder.")}


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names) -> set[str]:
    return {n for n in names if not torch.equal(a[n], b[n])}


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_decoder_only_fine_tune_keeps_the_latent_space(name, family_folders, tmp_path):
    init = family_folders[name]
    run(tmp_path / "ft", 3, f"model.init_from={init}", "train.trainable=decoder")
    start = load_autoencoder(init)
    groups, before = group_names(start), start.module.state_dict()
    kept = groups["encoder"] | groups["normalization"] | groups["buffers"]
    assert groups["encoder"] and (name != "flux2" or {"bn.running_mean", "bn.running_var"} <= kept)
    trained = live_weights(tmp_path / "ft", 3)
    assert trained.keys() == before.keys()
    assert not changed(before, trained, kept)
    assert changed(before, trained, groups["decoder"])
    released = load_autoencoder(tmp_path / "ft")  # the run folder resolves to its newest (EMA) weights
    assert released.class_name == FAMILY_CONFIGS[name][0]
    assert not changed(before, released.module.state_dict(), kept)


@pytest.fixture(scope="module")
def flux2_run(family_folders, tmp_path_factory):
    """A full fine-tune of the FLUX.2 model, 4 steps: the adversarial loss from step 2 and every latent-shaping
    option on, so the family's forward takes each path."""
    out = tmp_path_factory.mktemp("flux2") / "straight"
    args = [f"model.init_from={family_folders['flux2']}", "loss.eq_weight=0.5", "loss.eq_prob=1.0",
            "loss.channel_mask=0.5", "loss.latent_noise=0.1"]  # fmt: skip
    run(out, 4, *args)
    return out, args


def test_full_fine_tune_moves_the_encoder_not_the_statistics(flux2_run, family_folders):
    start = load_autoencoder(family_folders["flux2"])
    groups, before = group_names(start), start.module.state_dict()
    trained = live_weights(flux2_run[0], 4)
    assert changed(before, trained, groups["encoder"]) and changed(before, trained, groups["decoder"])
    assert not changed(before, trained, groups["normalization"] | groups["buffers"])


def test_family_resume_is_exact(flux2_run, tmp_path):
    straight, args = flux2_run
    split = tmp_path / "split"
    run(split, 2, *args)
    assert run(split, 4, *args)["steps"] == 4  # the same command with more steps: resumes at 2
    a = checkpoint_tensors(straight / "checkpoints" / "step_0000004")
    b = checkpoint_tensors(split / "checkpoints" / "step_0000004")
    assert a.keys() == b.keys() and any(k.startswith("model_1/") for k in a)  # the discriminator too
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:10]
    for name in ("metrics.jsonl", "val.jsonl"):
        a, b = ([{k: v for k, v in json.loads(line).items() if k != "img_per_s"} for line in open(r / name)]
                for r in (straight, split))  # fmt: skip
        steps = {row["step"] for row in a}  # the split run also validated at step 2, where it stopped
        assert a == [row for row in b if row["step"] in steps], name


def test_head_only_fine_tune_moves_only_the_head(family_folders, tmp_path):
    run(tmp_path / "head", 3, f"model.init_from={family_folders['dc-ae']}", "train.trainable=[decoder_head]")
    start = load_autoencoder(family_folders["dc-ae"])
    groups, before = group_names(start), start.module.state_dict()
    trained = live_weights(tmp_path / "head", 3)
    assert changed(before, trained, before) == changed(before, trained, groups["decoder_head"]) != set()
    optimizer = torch.load(tmp_path / "head" / "checkpoints" / "step_0000003" / "optimizer.bin", weights_only=True)
    assert len(optimizer["state"]) == len(groups["decoder_head"]) + 1  # the head and the learned logvar only


def noise_images(folder, n: int, seed: int) -> torch.Tensor:
    """n random 32 px images written as PNG files into `folder` (when given); as loaded, in [-1, 1]."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    if folder is not None:
        folder.mkdir()
        for i, p in enumerate(pixels):
            Image.fromarray(p).save(folder / f"{i:04d}.png")
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1  # (n, 3, 32, 32)


def posterior(name: str, vae, x: torch.Tensor, gen: torch.Generator | None):
    """diffusers' own posterior of images x as raw latents (B, C, h, w), of the kind the family's export measures
    on: FLUX.2 the mean (as `Flux2Pipeline` encodes), Qwen-Image a sample."""
    if name == "flux2":
        return vae.encode(x).latent_dist.mode()
    return vae.encode(x[:, :, None]).latent_dist.sample(gen)[:, :, 0]


def pipeline_normalize(name: str, vae, z: torch.Tensor) -> torch.Tensor:
    """Raw latents -> what the family's diffusion transformer sees, as its diffusers pipeline computes it."""
    if name == "flux2":
        from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

        p = Flux2Pipeline._patchify_latents(z)
        mean, var = vae.bn.running_mean.view(1, -1, 1, 1), vae.bn.running_var.view(1, -1, 1, 1)
        return (p - mean) / torch.sqrt(var + vae.config.batch_norm_eps)
    c = vae.config  # QwenImagePipeline, on (B, C, 1, h, w)
    mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1)
    return ((z[:, :, None] - mean) * (1.0 / torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1)))[:, :, 0]


def reference_decode(name: str, vae, z: torch.Tensor) -> torch.Tensor:
    return vae.decode(z).sample if name == "flux2" else vae.decode(z[:, :, None]).sample[:, :, 0]


def load_strictly(class_name: str, folder):
    cls = getattr(diffusers, class_name)
    module = cls.from_config(cls.load_config(folder))
    module.load_state_dict(load_file(str(folder / "diffusion_pytorch_model.safetensors")), strict=True)
    return module.eval()


@pytest.mark.parametrize("name, convention, n", [("flux2", "running_mean", 128), ("qwen-image", "latents_mean", 64)])
def test_export_of_a_family_run(name, convention, n, family_folders, tmp_path):
    out, class_name = tmp_path / "run", FAMILY_CONFIGS[name][0]
    run(out, 2, f"model.init_from={family_folders[name]}", "train.trainable=decoder", "train.export=true")
    release = out / "diffusers"  # written at the end of training (train.export)
    assert find_diffusers_folder(out) == release  # current: the run means its release
    config = json.loads((release / "config.json").read_text())
    assert config["_class_name"] == class_name and config[EXPORT_KEY]["step"] == 2
    card = (release / "README.md").read_text()
    assert class_name in card and convention in card and load_autoencoder(release).normalization()["convention"] in card

    # `kl-ae export` measuring on n held-out images of the distribution tested below (FLUX.2's 16 patchified
    # channels have 64 values per image: the per-channel means need more images to settle within 0.05)
    noise_images(tmp_path / "a", n, seed=1)
    assert kl_ae(["export", str(out), "--out", str(tmp_path / "measured"), "--data", str(tmp_path / "a")]) == 0
    with torch.no_grad():  # the weights and outputs of the export, and held-out latents
        vae, ae = load_strictly(class_name, tmp_path / "measured"), load_autoencoder(tmp_path / "measured")
        trained = load_autoencoder(out / "checkpoints" / "step_0000002")  # the weights the run ended with
        x = noise_images(None, n, seed=2)
        z = ae.encode(x[:4]).mode()
        reference = (
            vae.encode(x[:4]).latent_dist.mode() if name == "flux2" else vae.encode(x[:4, :, None]).latent_dist.mode()
        )
        assert torch.allclose(z, reference[:, :, 0] if name != "flux2" else reference, atol=1e-6)
        assert torch.allclose(z, trained.encode(x[:4]).mode(), atol=1e-6)
        assert torch.allclose(ae.decode(z), reference_decode(name, vae, z), atol=1e-6)
        assert torch.allclose(ae.decode(z), trained.decode(z), atol=1e-6)
        assert torch.allclose(ae.normalize(z), pipeline_normalize(name, vae, z), atol=1e-6)
        gen = torch.Generator().manual_seed(3)
        latents = torch.cat([pipeline_normalize(name, vae, posterior(name, vae, b, gen)) for b in x.split(64)])
    per_channel = latents.double().transpose(0, 1).flatten(1)  # (C, values); FLUX.2: the 4C patchified channels
    assert per_channel.mean(1).abs().max() < 0.05
    assert (per_channel.std(1) - 1).abs().max() < 0.05


@pytest.mark.parametrize("name, override, message", [
    ("rae", "train.trainable=all", "train.trainable: AutoencoderRAE's encoder is a frozen pretrained representation"),
    ("rae", "loss.eq_weight=0.5", "loss.eq_transforms: AutoencoderRAE decodes a fixed number of patches"),
    ("rae", "data.resolution=64 data.resize=64", "data.resolution: AutoencoderRAE decodes to 32x32 only"),
    ("flux2", "data.resolution=34", "data.resolution: AutoencoderKLFlux2 takes images whose sides are multiples of 4"),
    ("dc-ae", "model.gradient_checkpointing=true", "model.gradient_checkpointing: AutoencoderDC does not support it"),
    ("qwen-image", "model.gradient_checkpointing=true",
     "model.gradient_checkpointing: AutoencoderKLQwenImage does not support it"),
    ("qwen-image", "train.trainable=[encoder] loss.disc_start=0", "train.trainable: the adversarial loss's"),
])  # fmt: skip
def test_what_a_family_cannot_do_is_an_error_before_compute(name, override, message, family_folders, tmp_path, capsys):
    out = tmp_path / "run"
    trainable = [] if override.startswith("train.trainable") else ["train.trainable=decoder"]
    args = [
        "train",
        "--out",
        str(out),
        "--max-steps",
        "1",
        *TINY,
        f"model.init_from={family_folders[name]}",
        *trainable,
        *override.split(),
    ]
    assert kl_ae(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("name", ["flux2", "sd"])
def test_a_decoder_only_release_keeps_the_loaded_normalization(name, family_folders, tmp_path):
    """The latent space is the loaded model's, so is its normalization: a diffusion model trained on it stays valid
    with the fine-tuned decoder (FLUX.2's BatchNorm statistics, SD's scaling_factor are not re-measured)."""
    init = family_folders[name]
    run(tmp_path / "ft", 2, f"model.init_from={init}", "train.trainable=decoder", "train.export=true")
    release = find_diffusers_folder(tmp_path / "ft")
    assert release.name == "diffusers"
    kept, loaded = load_autoencoder(release).normalization(), load_autoencoder(init).normalization()
    assert kept == loaded
    assert "Kept from the fine-tuned model" in (release / "README.md").read_text()
