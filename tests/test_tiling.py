"""Tiled encode/decode agree with the untiled pass (>= 40 dB) on random and slightly trained tiny models."""

import dataclasses

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from commands.cli import main
from kl_autoencoder import PRESETS, Autoencoder
from kl_autoencoder.tiling import decode_tiled, encode_tiled


def _psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR against the reference's own peak-to-peak range (stricter than a fixed [-1, 1] range)."""
    peak = float(ref.max() - ref.min())
    return float(10 * torch.log10(peak**2 / (a - ref).square().mean()))


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    x = torch.from_numpy(skimage.data.astronaut()[::4, ::4].copy()).permute(2, 0, 1)  # (3, 128, 128)
    return x[None].float() / 127.5 - 1.0


def _model(trained: bool, image: torch.Tensor) -> Autoencoder:
    torch.manual_seed(0)
    model = Autoencoder(dataclasses.replace(PRESETS["tiny"], base_channels=8, norm_num_groups=4))
    if trained:  # a few steps on crops, so the activations are no longer those of a random net
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        for i in range(10):
            x = image[:, :, :64, :64] if i % 2 else image[:, :, 64:, 64:]
            loss = (model(x) - x).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.slow
def test_tiled_matches_untiled(image, trained):
    model = _model(trained, image)
    with torch.no_grad():
        posterior = model.encode(image)
        ref = model.decode(posterior.mode())
    tiled = encode_tiled(model, image, tile=64, overlap=32)
    assert _psnr(tiled.mode(), posterior.mode()) >= 40
    assert _psnr(tiled.logvar, posterior.logvar) >= 35
    out = decode_tiled(model, posterior.mode(), tile=64, overlap=32)
    assert out.shape == ref.shape
    assert _psnr(out, ref) >= 40
    # per-tile GroupNorm statistics are what global_norm fixes: without it the tiles visibly disagree
    assert _psnr(decode_tiled(model, posterior.mode(), tile=64, overlap=32, global_norm=False), ref) < 35


def test_tile_checks(image):
    model = _model(False, image)
    with pytest.raises(ValueError, match="multiple"):
        encode_tiled(model, image, tile=62)
    with pytest.raises(ValueError, match="overlap"):
        decode_tiled(model, torch.zeros(1, 4, 8, 8), tile=32, overlap=32)


@pytest.mark.slow
def test_reconstruct_cli(tmp_path, image):
    model = _model(False, image)
    model.save_pretrained(tmp_path / "model")
    src = tmp_path / "in.png"
    Image.fromarray(skimage.data.astronaut()[::8, ::8][:, :50]).save(src)  # 64 x 50: cropped to 64 x 48
    for tile in (None, 32):
        out = tmp_path / f"out_{tile}.png"
        args = ["reconstruct", str(src), "--model", str(tmp_path / "model"), "--out", str(out)]
        assert main(args + (["--tile", str(tile)] if tile else [])) == 0
        assert np.array(Image.open(out)).shape == (64, 48, 3)
