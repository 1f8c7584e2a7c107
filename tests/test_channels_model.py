"""Models and losses beyond RGB (issue 32): an RGB model widened to RGBA reconstructs its RGB exactly at step 0 and
narrowed to gray keeps a gray image's reconstruction; 1-, 4- and 6-channel models export into their diffusers
classes, which load them strictly and reconstruct equal; LPIPS sees only 3-channel views (RGBA composites over one
background shared by x and its reconstruction, named band triplets) and a 6-channel run without them trains
without LPIPS, saying so once. Each test was seen failing with its bug put in by hand."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import training.train
from kl_ae.common.config import ConfigError
from kl_ae.common.lpips import LPIPS, ChannelLPIPS
from kl_ae.common.release import write_release
from kl_ae.common.stored import write_stored
from kl_autoencoder import Autoencoder
from kl_autoencoder.channels import adapt_channels
from kl_autoencoder.families.ltx_video import LTXVideo
from kl_autoencoder.families.ours import wrap
from kl_autoencoder.interface import LatentAutoencoder, load_autoencoder, new_autoencoder
from training.config import LossConfig, TrainConfig, load_config
from training.discriminator import PatchDiscriminator
from training.step import AutoencoderWithLoss, Forward, StepSchedule, generator_objective

from .conftest import FAMILY_CONFIGS, run, tiny

# a DC-AE whose head is a pixel-shuffle up block (no resnets at the first level): 4 conv channels per image channel
DC_SHUFFLE = dict(FAMILY_CONFIGS["dc-ae"][1], decoder_layers_per_block=(0, 1))
# Wan 2.2's layout: 2x2 pixels patchified into the channels before the first conv
WAN_PATCH = dict(FAMILY_CONFIGS["wan"][1], patch_size=2, scale_factor_spatial=4)


def rgb_model(name: str, channels: int = 3) -> LatentAutoencoder:
    """A tiny random model of `channels`, in eval mode, from seed 0: ours, or a diffusers family."""
    torch.manual_seed(0)
    if name == "ours":
        ae = wrap(Autoencoder(tiny("tiny", sample_size=32, in_channels=channels, out_channels=channels)))
    else:
        family, arch = {"flux2": ("flux2", FAMILY_CONFIGS["flux2"][1]), "dc-shuffle": ("dc-ae", DC_SHUFFLE),
                        "wan-patch": ("wan", WAN_PATCH)}[name]  # fmt: skip
        ae = new_autoencoder(family, arch, channels)
    ae.module.eval()
    return ae


def images(channels: int, seed: int = 1, n: int = 2) -> torch.Tensor:
    return torch.rand((n, channels, 32, 32), generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def reconstruct(ae: LatentAutoencoder, x: torch.Tensor) -> torch.Tensor:
    return ae.decode(ae.encode(x).mode())


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- widening and narrowing


@pytest.mark.parametrize("name", ["ours", "flux2", "dc-shuffle", "wan-patch"])
def test_widening_to_rgba_keeps_the_rgb_reconstruction_at_step_0(name):
    """The widened model's RGB output on RGBA images equals the RGB model's on their RGB, whatever the alpha; alpha
    decodes opaque; the latents are the RGB model's (the alpha kernel is zero, not merely small)."""
    rgb = rgb_model(name)
    rgba = copy.deepcopy(rgb)
    assert "widened 3 -> 4" in adapt_channels(rgba, 4)
    x = images(4)
    out, ref = reconstruct(rgba, x), reconstruct(rgb, x[:, :3])
    assert out.shape == (2, 4, 32, 32) and rgba.image_channels == 4
    assert max_diff(out[:, :3], ref) <= 1e-5, "the RGB channels must reconstruct as the RGB model's at step 0"
    assert torch.equal(out[:, 3], torch.ones_like(out[:, 3])), "alpha must decode opaque (+1) at step 0"
    with torch.no_grad():
        assert max_diff(rgba.encode(x).mode(), rgb.encode(x[:, :3]).mode()) <= 1e-5


@pytest.mark.parametrize("name", ["ours", "flux2", "dc-shuffle"])
def test_narrowing_to_gray_keeps_a_gray_images_reconstruction(name):
    """A gray image g as one channel reconstructs as the channel mean of the RGB model's reconstruction of g
    repeated to RGB (values kept inside [-1, 1], where no class clamps)."""
    rgb = rgb_model(name)
    gray = copy.deepcopy(rgb)
    assert "narrowed 3 -> 1" in adapt_channels(gray, 1)
    g = images(1) * 0.8
    ref = reconstruct(rgb, g.expand(-1, 3, -1, -1)).mean(1, keepdim=True)
    out = reconstruct(gray, g)
    assert out.shape == (2, 1, 32, 32) and gray.image_channels == 1
    assert max_diff(out, ref) <= 1e-5


def test_other_channel_changes_are_one_line_errors(tmp_path):
    """3 -> 6 and 4 -> 1 name both counts; a class without adapted convs (LTX-Video) says which classes have them;
    the trainer turns them into a ConfigError of model.init_from; a frozen encoder cannot widen."""
    with pytest.raises(ValueError, match=r"takes 3-channel images and the data has 6"):
        adapt_channels(rgb_model("ours"), 6)
    with pytest.raises(ValueError, match=r"takes 4-channel images and the data has 1"):
        adapt_channels(rgb_model("ours", channels=4), 1)
    ltx = torch.nn.Module()
    ltx.config = {"in_channels": 3, "out_channels": 3}  # the refusal comes before any layer is touched
    with pytest.raises(ValueError, match=r"AutoencoderKLLTXVideo's image channels cannot be widened"):
        adapt_channels(LTXVideo(ltx, "AutoencoderKLLTXVideo"), 4)
    with pytest.raises(ValueError, match=r"in_channels=4 contradicts data.channels"):
        new_autoencoder("flux2", {**FAMILY_CONFIGS["flux2"][1], "in_channels": 4}, 3)
    cfg = TrainConfig()
    cfg.data.channels = 6
    with pytest.raises(ConfigError, match=r"^model.init_from: AutoencoderKL takes 3-channel images and the data has 6"):
        training.train.adapt(cfg, rgb_model("ours"), print)
    folder = rgb_model("ours").save_pretrained(tmp_path / "rgb")
    with pytest.raises(ConfigError, match=r"^train.trainable: decoder freezes the encoder's first conv"):
        run(tmp_path / "run", 1, f"model.init_from={folder}", "data.channels=4", f"data.source={rgba_folder(tmp_path)}",
            "train.trainable=decoder", "loss.disc_start=100")  # fmt: skip


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.lpips_channels=[0, 1]", r"^loss\.lpips_channels: band triplets, 3k channel indices"),
        ("loss.lpips_channels=[0, 1, 6]", r"^loss\.lpips_channels: index 6 is not a channel of data\.channels=6"),
        ("loss.align_weight=0.1", r"^loss\.align_weight: the VF loss's vision model reads RGB; data\.channels is 6"),
    ],
)
def test_channel_keys_are_checked_before_any_work(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, [f"data.source={tmp_path}", "data.channels=6", override, f"out_dir={tmp_path / 'run'}"])
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- exports


def strict_diffusers(folder: Path) -> torch.nn.Module:
    """The folder's own diffusers class built from its config.json, its weights loaded strictly."""
    config = json.loads((folder / "config.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    module = cls.from_config(cls.load_config(folder))
    module.load_state_dict(load_file(str(folder / "diffusion_pytorch_model.safetensors")), strict=True)
    return module.eval()


@torch.no_grad()
def diffusers_reconstruct(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    posterior = module.encode(x)
    z = posterior.latent_dist.mode() if hasattr(posterior, "latent_dist") else posterior.latent
    return module.decode(z).sample


@pytest.mark.parametrize("name", ["ours", "flux2", "dc-shuffle"])
@pytest.mark.parametrize("channels", [1, 4, 6])
def test_exports_of_1_4_and_6_channel_models_load_strictly_and_reconstruct_equal(name, channels, tmp_path):
    """1 and 4 channels: an RGB model narrowed / widened; 6: a new model built with 6 channels. The release writer
    (`kl-ae export`'s and the trainer's) writes a folder whose class loads it strictly, with the channel counts in
    its config, and reconstructs what our adapter reconstructs; it loads back through our loader too."""
    if channels == 6:
        ae = rgb_model(name, channels=6)
    else:
        ae = rgb_model(name)
        adapt_channels(ae, channels)
    out = write_release(ae, tmp_path / "release", {}, fp16_variant=False)
    config = json.loads((out / "config.json").read_text())
    keys = ["in_channels"] + (["out_channels"] if name != "dc-shuffle" else [])
    assert [config[k] for k in keys] == [channels] * len(keys)
    module = strict_diffusers(out)
    x = images(channels)
    ours = reconstruct(ae, x)
    assert ours.shape == x.shape
    assert max_diff(diffusers_reconstruct(module, x), ours) <= 1e-5
    again = load_autoencoder(out)
    assert again.image_channels == channels and max_diff(reconstruct(again, x), ours) <= 1e-5


# ----------------------------------------------------------------------------- what LPIPS sees


@pytest.fixture
def lpips_inputs(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    """Every (x, y, grad enabled) pair LPIPS's own forward receives, recorded."""
    seen = []
    real = LPIPS.forward

    def spy(self, x, y):
        seen.append((x.detach().clone(), y.detach().clone(), torch.is_grad_enabled()))
        return real(self, x, y)

    monkeypatch.setattr(LPIPS, "forward", spy)
    return seen


def generator_loss(ae: LatentAutoencoder, x: torch.Tensor, lpips: torch.nn.Module, cfg: LossConfig) -> dict:
    """The step's generator objective on one batch (the perceptual term as `TrainStep` computes it); its logs."""
    model = AutoencoderWithLoss(ae, learn_logvar=False, logvar_init=0.0)
    recon, posterior, extras = model(x)
    disc = PatchDiscriminator(ae.image_channels, base_channels=8, n_layers=1, norm="group")
    _, logs = generator_objective(Forward(x, recon, posterior, extras), model.loss_inputs(disc, lpips), cfg,
                                  StepSchedule())  # fmt: skip
    return logs


def test_rgba_perceptual_term_is_computed_on_composites_over_one_shared_background(lpips_inputs):
    """A widened model whose alpha decodes fully transparent (its alpha bias set to -1), and RGBA images transparent
    on the left half, opaque on the right: LPIPS gets 3 channels; the reconstruction's composite is its background
    alone, a solid colour per image, and the images' transparent halves show that same colour; their opaque halves
    are their RGB; each step draws new colours."""
    ae = rgb_model("ours")
    adapt_channels(ae, 4)
    with torch.no_grad():
        ae.channel_convs().last.bias[3] = -1.0
    x = images(4)
    x[:, 3, :, :16], x[:, 3, :, 16:] = -1.0, 1.0
    lpips = ChannelLPIPS(LPIPS(net="alex", random_backbone=True))
    for _ in range(2):
        generator_loss(ae, x, lpips, LossConfig())
    colours = []
    for a, b, _ in lpips_inputs:
        assert a.shape == b.shape == (2, 3, 32, 32), "LPIPS must see the 3-channel composites"
        background = b[:, :, :1, :1]  # (B, 3, 1, 1): the reconstruction is all background
        assert max_diff(b, background.expand_as(b)) <= 1e-6, "a solid background per image"
        assert max_diff(a[..., :16], background.expand_as(a[..., :16])) <= 1e-6, "x and recon share the background"
        assert max_diff(a[..., 16:], x[:, :3, :, 16:]) <= 1e-6, "opaque pixels composite as their RGB"
        colours.append(background.flatten(1))
    assert max_diff(colours[0][0], colours[0][1]) > 0.01, "one colour per image"
    assert max_diff(colours[0], colours[1]) > 0.01, "new colours each step"


def test_lpips_channels_show_lpips_exactly_those_bands(lpips_inputs):
    """loss.lpips_channels=[0, 1, 2]: LPIPS gets bands 0..2 of a 6-channel batch and nothing else; two triplets:
    both, each image's LPIPS the mean of its two. Without bands, 6 channels are refused, never averaged."""
    ae = rgb_model("ours", channels=6)
    x = images(6)
    net = LPIPS(net="alex", random_backbone=True)
    generator_loss(ae, x, ChannelLPIPS(net, [0, 1, 2]), LossConfig(lpips_channels=[0, 1, 2]))
    (a, b, _), *rest = lpips_inputs
    assert not rest and torch.equal(a, x[:, :3]) and b.shape == (2, 3, 32, 32)
    two = ChannelLPIPS(net, [0, 1, 2, 5, 4, 3])
    generator_loss(ae, x, two, LossConfig())
    assert torch.equal(lpips_inputs[-1][0], torch.cat([x[:, :3], x[:, [5, 4, 3]]])), "one block of the batch each"
    y = images(6, seed=2)
    with torch.no_grad():  # per image: each triplet's LPIPS on its own, then their mean
        per_triplet = (net(x[:, :3], y[:, :3]) + net(x[:, [5, 4, 3]], y[:, [5, 4, 3]])) / 2
        assert max_diff(two(x, y), per_triplet) <= 1e-6
    with pytest.raises(ValueError, match=r"LPIPS takes 1, 3 or 4 \(RGBA\) channels or named band triplets, got 6"):
        ChannelLPIPS(net)(x, x)


# ----------------------------------------------------------------------------- through the trainer


def band_folder(tmp_path: Path, channels: int, n: int = 8) -> Path:
    """n random 8-bit images of `channels` bands, 48 px, as the reconstruct writer stores them (RGBA: PNG; 6: TIFF)."""
    folder = tmp_path / f"bands{channels}"
    rng = np.random.default_rng(channels)
    for i in range(n):
        write_stored(folder / f"{i}.png", rng.integers(0, 256, (48, 48, channels), dtype=np.uint8))
    return folder


def rgba_folder(tmp_path: Path) -> Path:
    return band_folder(tmp_path, 4)


@pytest.fixture
def random_lpips(monkeypatch):
    """LPIPS available offline (a random backbone): the run would use it wherever the data allow."""
    monkeypatch.setattr(training.train, "build_lpips", lambda *a, **k: (LPIPS("alex", random_backbone=True), "test"))


def test_a_6_channel_run_trains_without_lpips_saying_so_once(tmp_path, capsys, random_lpips, lpips_inputs):
    """The real entry point on 6-band TIFFs, LPIPS available: a new 6-channel model and a 6-channel PatchGAN
    (which runs in the second step) train; one warning line says LPIPS is off and why; LPIPS is never called."""
    summary = run(tmp_path / "run", 2, f"data.source={band_folder(tmp_path, 6)}", "data.channels=6",
                  "loss.lpips=required", "loss.disc_start=1")  # fmt: skip
    assert summary["steps"] == 2
    printed = capsys.readouterr().out
    warnings = [line for line in printed.splitlines() if "WITHOUT the LPIPS" in line]
    assert len(warnings) == 1 and "data.channels=6" in warnings[0], printed[-2000:]
    assert not lpips_inputs, "LPIPS must not be fed 6-channel images (nor an average of their bands)"
    weights = load_autoencoder(tmp_path / "run")
    assert weights.image_channels == 6


def test_an_rgb_model_widens_to_rgba_in_a_run(tmp_path, capsys, random_lpips, lpips_inputs):
    """model.init_from an RGB folder with data.channels=4: one line says it was widened, the run trains with LPIPS
    on 3-channel composites and its weights are a 4-channel model."""
    folder = rgb_model("ours").save_pretrained(tmp_path / "rgb")
    summary = run(tmp_path / "run", 1, f"model.init_from={folder}", "data.channels=4",
                  f"data.source={rgba_folder(tmp_path)}", "loss.lpips=required")  # fmt: skip
    assert summary["steps"] == 1
    printed = capsys.readouterr().out
    assert sum("widened 3 -> 4 channels" in line for line in printed.splitlines()) == 1, printed[-2000:]
    trained = [a for a, _, grad in lpips_inputs if grad]
    assert len(trained) == 1 and trained[0].shape == (2, 3, 32, 32)
    assert load_autoencoder(tmp_path / "run").image_channels == 4
