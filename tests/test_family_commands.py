"""The eval-side commands on every autoencoder family, through `kl_ae.commands.cli.main`, offline: tiny random
models of each diffusers class (the `family_folders` fixture).

Per family: `kl-ae eval` measures the latents the family's pipeline normalizes; `kl-ae encode` writes exactly
`ae.normalize(z)` and `kl-ae decode` gives back `ae.decode(z)`; `kl-ae reconstruct` tiles where the class can. Across
families: `kl-ae probe --compare` of two latent shapes is reproducible. An unsupported class and a model of one
size (RAE) fail in one line; `kl-ae info` prints its screen.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import diffusers
import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image

from eval import denoiser as dn
from eval.latents import decode_latents, read_latents
from kl_ae.commands.cli import main as kl_ae
from kl_ae.common.data import load_images
from kl_autoencoder.interface import SUPPORTED, load_autoencoder

from .conftest import FAMILY_CONFIGS

NORMALIZED_CHANNELS = {"flux2": 16}  # FLUX.2's pipeline patchifies 2x2: 4C channels; the others keep C


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two smooth 32 px images: one batch, the size every tiny family takes."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(2):
        low = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
        Image.fromarray(low).resize((32, 32), Image.BICUBIC).save(folder / f"{i}.png")
    return folder


@pytest.fixture
def offline_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no LPIPS or Inception weights there


def batch(images: Path, multiple: int) -> torch.Tensor:
    """The folder's images as eval and encode load them at 32 px. (2, 3, 32, 32) in [-1, 1]"""
    return torch.stack(list(load_images(str(images), multiple, resolution=32)))


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_eval_every_family(name, family_folders, images, tmp_path, offline_weights):
    out = tmp_path / "eval"
    args = ["eval", "--model", str(family_folders[name]), "--data", str(images), "--resolution", "32"]
    assert kl_ae([*args, "--lpips", "off", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    ae = load_autoencoder(family_folders[name])
    assert metrics["class_name"] == FAMILY_CONFIGS[name][0] and metrics["family"] == ae.family
    assert metrics["num_images"] == 2 and math.isfinite(metrics["reconstruction"]["psnr"])
    assert ("rate" in metrics) is (name not in ("dc-ae", "rae"))  # a point latent has no rate
    # the normalized statistics are of the latents the family's pipeline sees: ae.normalize of the posterior
    # samples eval draws (generator seeded with --seed 0, one batch)
    with torch.no_grad():
        z = ae.encode(batch(images, ae.image_multiple)).sample(torch.Generator().manual_seed(0))
        latents = ae.normalize(z).double()
    normalized = metrics["normalized_latents"]
    assert normalized["channels"] == NORMALIZED_CHANNELS.get(name, ae.latent_channels) == latents.shape[1]
    assert normalized["global_std"] == pytest.approx(latents.std(correction=0).item(), rel=1e-4, abs=1e-6)
    assert normalized["global_mean"] == pytest.approx(latents.mean().item(), rel=1e-4, abs=1e-6)
    geometry = metrics["geometry"]
    assert isinstance(geometry["gap_rotation_db"], float)
    # RAE decodes one latent size only: no downscaling equivariance, a reason instead
    assert (geometry["gap_scale_db"] is None) is (name == "rae")
    assert (out / "report.html").is_file() and (out / "recon_model.png").is_file()


def test_eval_compares_two_families_from_the_hub_and_a_folder(family_folders, images, tmp_path, monkeypatch):
    """`--model org/pipe --subfolder vae` (FLUX.2, from a local hub mirror) `--compare` a DC-AE folder: each model
    measured in its own shapes, on the same images."""
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(family_folders["flux2"], cache / "models--org--pipe" / "snapshots" / commit / "vae")
    (cache / "models--org--pipe" / "refs").mkdir(parents=True)
    (cache / "models--org--pipe" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out = tmp_path / "eval"
    args = ["eval", "--model", "org/pipe", "--subfolder", "vae", "--compare", str(family_folders["dc-ae"])]
    assert kl_ae([*args, "--data", str(images), "--resolution", "32", "--lpips", "off", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["path"] == "org/pipe/vae" and metrics["class_name"] == "AutoencoderKLFlux2"
    assert metrics["normalized_latents"]["channels"] == 16 and "rate" in metrics
    compare = metrics["compare"]
    assert compare["class_name"] == "AutoencoderDC" and compare["normalized_latents"]["channels"] == 4
    assert "rate" not in compare and compare["posterior"]["deterministic"]
    assert len(metrics["geometry"]["channel_correlation"]) == 4 == len(compare["geometry"]["channel_correlation"])


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_encode_then_decode_round_trips_through_the_normalization(name, family_folders, images, tmp_path):
    model, out = str(family_folders[name]), tmp_path / "latents"
    assert kl_ae(["encode", "--model", model, "--data", str(images), "--out", str(out), "--resolution", "32"]) == 0
    table, settings = read_latents(out)
    ae = load_autoencoder(family_folders[name])
    assert settings["normalization"] == ae.normalization()
    with torch.no_grad():
        z = ae.encode(batch(images, ae.image_multiple)).mode()
        stored = torch.from_numpy(np.stack(table.with_format("numpy")["latent"]))
        torch.testing.assert_close(stored, ae.normalize(z))  # what the family's diffusion model is trained on
        decoded = torch.stack([image for _, _, image in decode_latents(ae, table, settings)])
        expected = ae.decode(z)
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=1e-5)
    folder = tmp_path / "decoded"
    assert kl_ae(["decode", "--model", model, "--latents", str(out), "--out", str(folder)]) == 0
    pngs = sorted(folder.glob("*.png"))
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in pngs]).int()
    assert (pixels - ((expected.clamp(-1, 1) + 1) * 127.5).round().int()).abs().max() <= 1


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_decode_uses_the_normalization_the_latents_were_written_with(name, family_folders, images, tmp_path):
    """Latents of a model with measured (per-channel, where the family has them) statistics, decoded by the same
    weights after the normalization was measured again (as a re-export does)."""
    ae = load_autoencoder(family_folders[name])
    with torch.no_grad():
        z = ae.encode(batch(images, ae.image_multiple)).mode()
        expected = ae.decode(z)
        ae.set_normalization(ae.measure_normalization([z]))
    model, out = ae.save_pretrained(tmp_path / "measured"), tmp_path / "latents"
    assert kl_ae(["encode", "--model", str(model), "--data", str(images), "--resolution", "32", "--out", str(out)]) == 0
    table, settings = read_latents(out)
    with torch.no_grad():
        ae.set_normalization(ae.measure_normalization([z * 2 + 1]))  # other statistics than at encoding
        assert ae.normalization() != settings["normalization"]
        decoded = torch.stack([image for _, _, image in decode_latents(ae, table, settings)])
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_reconstruct_every_family_and_tile_where_the_class_can(name, family_folders, tmp_path, capsys):
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(source)
    args = ["reconstruct", str(source), "--model", str(family_folders[name]), "--out", str(tmp_path / "out.png")]
    assert kl_ae(args) == 0
    ae = load_autoencoder(family_folders[name])
    with torch.no_grad():
        x = torch.from_numpy(np.array(Image.open(source))).permute(2, 0, 1)[None].float() / 127.5 - 1
        expected = ((ae.decode(ae.encode(x).mode())[0].clamp(-1, 1) + 1) * 127.5).round().int()
    written = torch.from_numpy(np.array(Image.open(tmp_path / "out.png"))).permute(2, 0, 1).int()
    assert (written - expected).abs().max() <= 1
    code = kl_ae([*args, "--tile", "16"])  # 32 px in 16 px tiles
    if name == "rae":
        assert code == 2
        err = capsys.readouterr().err
        assert "AutoencoderRAE has no tiled encode / decode" in err and err.count("\n") == 1
    else:
        tiled = torch.from_numpy(np.array(Image.open(tmp_path / "out.png"))).permute(2, 0, 1).int()
        assert code == 0 and tiled.shape == (3, 32, 32)
        if name not in ("sd", "sd3"):  # diffusers' blended tiles are not the whole image's result: they ran
            assert not torch.equal(tiled, written)


@pytest.mark.slow
def test_probe_compare_across_families_is_reproducible(family_folders, tmp_path, monkeypatch):
    """FLUX.2 (normalized: 16 x 8 x 8) against DC-AE (4 x 16 x 16): each denoiser sized from its model's
    normalized latents; the same command twice gives the same numbers and the same sample grids."""
    monkeypatch.setattr(dn, "SAMPLE_STEPS", 3)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    fast = ["--data", "sample", "--steps", "2", "--batch-size", "8", "--crops", "1", "--resolution", "32"]
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        args = ["probe", "--model", str(family_folders["flux2"]), "--compare", str(family_folders["dc-ae"])]
        assert kl_ae([*args, "--out", str(out), *fast]) == 0
    first, second = (json.loads((out / "metrics.json").read_text()) for out in runs)
    assert first["latent_shape"] == [16, 8, 8] and first["compare"]["latent_shape"] == [4, 16, 16]
    assert first["denoiser"]["tokens"] == 16 and first["compare"]["denoiser"]["tokens"] == 64
    for m in (first, second):  # what differs: where each wrote, and how long it took
        m.pop("wall_s"), m["settings"].pop("out")
        for r in (m, m["compare"]):
            r.pop("timing_s"), r["latents"].pop("encoded")
    assert first == second
    for png in ("samples_model.png", "samples_compare.png"):
        assert (runs[0] / png).read_bytes() == (runs[1] / png).read_bytes()


@pytest.fixture
def unsupported(tmp_path) -> Path:
    torch.manual_seed(0)
    tiny = dict(encoder_block_out_channels=(8,), decoder_block_out_channels=(8,), num_encoder_blocks=(1,),
                num_decoder_blocks=(1,), latent_channels=4)  # fmt: skip
    diffusers.AutoencoderTiny(**tiny).save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.mark.parametrize("command", ["eval", "probe", "encode", "reconstruct", "info"])
def test_an_unsupported_class_is_one_line_through_the_cli(command, unsupported, images, tmp_path, capsys):
    model, out = str(unsupported), str(tmp_path / "out")
    argv = {
        "eval": ["eval", "--model", model, "--data", str(images), "--out", out],
        "probe": ["probe", "--model", model, "--data", "sample", "--out", out],
        "encode": ["encode", "--model", model, "--data", str(images), "--out", out],
        "reconstruct": ["reconstruct", str(images / "0.png"), "--model", model, "--out", out + ".png"],
        "info": ["info", model],
    }[command]
    assert kl_ae(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "'AutoencoderTiny' is not supported" in err and all(name in err for name in SUPPORTED)


def test_a_model_of_one_size_says_which(family_folders, images, tmp_path, capsys):
    """RAE decodes its own size only: any other resolution is one line naming it."""
    args = ["eval", "--model", str(family_folders["rae"]), "--data", str(images), "--out", str(tmp_path / "o")]
    assert kl_ae([*args, "--resolution", "64"]) == 2
    err = capsys.readouterr().err
    assert "AutoencoderRAE decodes to 32x32 only" in err and err.count("\n") == 1


def test_info_command(family_folders, capsys):
    assert kl_ae(["info", str(family_folders["flux2"])]) == 0
    text = capsys.readouterr().out
    assert "family:           flux2 (AutoencoderKLFlux2)" in text
    assert "latent channels:  4 (normalized: 16 channels at f4)" in text
    folder = family_folders["dc-ae"]
    assert kl_ae(["info", str(folder.parent), "--subfolder", folder.name]) == 0
    assert "family:           dc-ae (AutoencoderDC)" in capsys.readouterr().out
