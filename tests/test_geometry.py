"""Latent-geometry metrics: perfect for a model equivariant by construction, not for one that is not; the spectrum,
correlation and robustness measures on signals whose answer is known; and all of it in `kl-ae eval`."""

import json

import pytest
import torch
import torch.nn.functional as F

from eval.geometry import (
    NOISE_LEVELS,
    channel_products,
    correlation_matrix,
    equivariance_errors,
    geometry_row,
    high_frequency_share,
    radial_power,
    summarize,
)


def smooth_images(n: int = 3, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    low = torch.rand(n, 3, size // 8, size // 8, generator=g)
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1) * 2 - 1


def pointwise(weight: torch.Tensor):
    """A per-position linear map: it commutes with rotations and with area averaging, exactly."""
    return lambda t: torch.einsum("oc,bchw->bohw", weight, t)


def summary_of(decode, x, z, factor):
    recon = decode(z)
    row = geometry_row(decode, x, z, z, recon, factor, torch.Generator().manual_seed(0))
    psnr = float((-10 * torch.log10(((recon - x) / 2).square().mean(dim=(1, 2, 3)))).mean())
    return summarize(row, psnr)


def test_an_identity_autoencoder_is_perfectly_equivariant():
    x = smooth_images()
    result = summary_of(lambda z: z, x, x.clone(), factor=1)
    for name, e in result["equivariance"].items():
        assert e["gap_db"] == 0, name
        assert e["psnr_decode_transformed"] is None and e["psnr_consistency"] is None  # exact: infinite PSNR
    assert result["gap_scale_db"] == 0 and result["gap_rotation_db"] == 0


def test_a_pointwise_autoencoder_is_as_equivariant_as_its_reconstruction_allows():
    x = smooth_images()
    w = torch.eye(3) + 0.3 * torch.randn(3, 3, generator=torch.Generator().manual_seed(1))  # imperfect, equivariant
    errors = equivariance_errors(pointwise(w), x, x.clone(), pointwise(w)(x), 1)
    for name in ("scale", "rot90", "rot180", "rot270"):
        assert errors[f"{name}/consistency"].max() < 1e-12, name
        torch.testing.assert_close(errors[f"{name}/latent"], errors[f"{name}/image"])
    assert summary_of(pointwise(w), x, x.clone(), 1)["gap_rotation_db"] == pytest.approx(0, abs=1e-6)


def ramp(t: torch.Tensor) -> torch.Tensor:
    """A left-to-right ramp of t's width: changes under rotation."""
    return torch.linspace(-0.5, 0.5, t.shape[3]).expand_as(t)


def test_a_decoder_that_is_not_equivariant_has_a_gap():
    # the encoder subtracts a ramp and the decoder adds it back: good reconstructions, but a rotated latent comes
    # out with the ramp the wrong way round
    x = smooth_images()
    decode = lambda z: 0.9 * z + ramp(z)  # noqa: E731
    result = summary_of(decode, x, x - ramp(x), 1)
    assert result["gap_rotation_db"] > 3 and result["equivariance"]["rot90"]["psnr_consistency"] < 30
    # an f2 decoder that adds a checkerboard: downscaling the image averages it away, decoding a downscaled
    # latent draws it again
    checkers = lambda t: 0.3 - 0.6 * ((torch.arange(t.shape[2])[:, None] + torch.arange(t.shape[3])) % 2)  # noqa: E731
    up = lambda z: 0.9 * F.interpolate(z, scale_factor=2, mode="nearest")  # noqa: E731
    decode2 = lambda z: up(z) + checkers(up(z))  # noqa: E731
    assert summary_of(decode2, 0.95 * decode2(x), x.clone(), 2)["gap_scale_db"] > 3


def test_high_frequency_share_of_white_noise_and_of_smooth_images():
    noise = torch.randn(8, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    assert high_frequency_share(radial_power(noise).sum(0)) == pytest.approx(1 - torch.pi / 16, abs=0.02)
    assert high_frequency_share(radial_power(smooth_images()).sum(0)) < 0.05  # the edges wrap around in the FFT


def test_channel_correlation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 1, 16, 16, generator=g), torch.randn(4, 1, 16, 16, generator=g)
    z = torch.cat([a, 2 * a + 1, -a, b], dim=1)
    corr = torch.tensor(correlation_matrix(*channel_products(z)))
    assert corr[0, 1] == pytest.approx(1, abs=1e-9) and corr[0, 2] == pytest.approx(-1, abs=1e-9)
    assert abs(corr[0, 3]) < 0.1 and torch.allclose(corr.diagonal(), torch.ones(4, dtype=corr.dtype))


def test_robustness_gets_worse_with_more_latent_noise():
    x = smooth_images()
    result = summary_of(lambda z: z, x, x.clone(), 1)["robustness"]
    psnrs = [result[f"{s:g}"]["psnr"] for s in NOISE_LEVELS]
    assert psnrs == sorted(psnrs, reverse=True) and psnrs[-1] < 40


@pytest.mark.slow
def test_eval_reports_the_latent_geometry(tmp_path):
    from kl_ae.commands.cli import main as kl_ae
    from kl_autoencoder import PRESETS, Autoencoder

    torch.manual_seed(0)
    Autoencoder(PRESETS["tiny"]).save_pretrained(tmp_path / "vae")
    assert kl_ae(["eval", "--model", str(tmp_path / "vae"), "--data", "sample", "--resolution", "64",
                  "--lpips", "off", "--out", str(tmp_path / "eval")]) == 0  # fmt: skip
    geometry = json.loads((tmp_path / "eval" / "metrics.json").read_text())["geometry"]
    assert set(geometry["equivariance"]) == {"scale", "rot90", "rot180", "rot270"}
    assert isinstance(geometry["gap_scale_db"], float) and isinstance(geometry["gap_rotation_db"], float)
    assert 0 < geometry["spectrum"]["latent_high_frequency_share"] < 1
    assert len(geometry["channel_correlation"]) == 4 and set(geometry["robustness"]) == {"0.1", "0.25", "0.5"}
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "equivariance gap" in page and "spectrum.png" in page and (tmp_path / "eval" / "correlation.png").is_file()
