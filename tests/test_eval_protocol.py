"""Evaluation comparable with published tables: the resize protocols against their reference code, the
posterior used for reconstructions, what metrics.json records, and the cached rFID reference statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from kl_ae.commands.cli import main as kl_ae
from kl_ae.common.data import load_images
from kl_autoencoder import Autoencoder

from .conftest import tiny


@pytest.fixture
def photo_folder(tmp_path):
    """Three smooth images of different sizes and aspect ratios, larger than 2x the evaluated size."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(150, 211), (301, 160), (97, 97)]):
        low = rng.integers(0, 255, (h // 9 + 2, w // 9 + 2, 3), dtype=np.uint8)
        Image.fromarray(low).resize((w, h), Image.BICUBIC).save(folder / f"{i}.png")
    return folder


@pytest.fixture
def model(tmp_path):
    torch.manual_seed(0)
    return Autoencoder(tiny("tiny")).save_pretrained(tmp_path / "model")


def adm_center_crop_arr(pil_image, image_size):
    """guided-diffusion/improved_diffusion image_datasets.center_crop_arr, verbatim in substance."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def as_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_protocols_match_their_reference_code(photo_folder):
    adm = load_images(str(photo_folder), 8, resolution=32, protocol="adm")
    tv = load_images(str(photo_folder), 8, resolution=32, protocol="torchvision")
    reference_tv = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.PILToTensor()])
    for i, path in enumerate(sorted(photo_folder.glob("*.png"))):
        img = Image.open(path).convert("RGB")
        np.testing.assert_array_equal(as_uint8(adm[i]), adm_center_crop_arr(img, 32))
        np.testing.assert_array_equal(as_uint8(tv[i]), reference_tv(img).permute(1, 2, 0).numpy())
        assert not np.array_equal(as_uint8(adm[i]), as_uint8(tv[i]))  # the protocol matters


@pytest.mark.slow
def test_eval_records_protocol_and_posterior(tmp_path, model, photo_folder, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    base = ["eval", "--model", str(model), "--data", str(photo_folder), "--resolution", "32"]
    assert kl_ae([*base, "--protocol", "adm", "--posterior", "sample", "--out", str(tmp_path / "s")]) == 0
    sample = json.loads((tmp_path / "s" / "metrics.json").read_text())
    protocol = sample["protocol"]
    assert protocol["name"] == "adm" and protocol["resolution"] == 32 and protocol["posterior"] == "sample"
    assert "BOX" in protocol["resize"] and "BICUBIC" in protocol["resize"]
    assert protocol["rfid"]["torchmetrics"] and "inception" in protocol["rfid"]["features"].lower()
    assert kl_ae([*base, "--protocol", "adm", "--out", str(tmp_path / "m")]) == 0
    mode = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert mode["protocol"]["posterior"] == "mode"
    # independently: one batch of the three images, posterior noise from a generator seeded with --seed 0
    x = torch.stack(list(load_images(str(photo_folder), 8, resolution=32, protocol="adm")))
    net = Autoencoder.from_pretrained(model)
    with torch.no_grad():
        posterior = net.encode(x)
        for z, result in ((posterior.sample(torch.Generator().manual_seed(0)), sample), (posterior.mode(), mode)):
            err = ((x + 1) / 2 - ((net.decode(z) + 1) / 2).clamp(0, 1)).square().mean(dim=(1, 2, 3))
            assert result["reconstruction"]["psnr"] == pytest.approx((-10 * err.log10()).mean().item(), abs=1e-4)
    assert sample["reconstruction"]["psnr"] != mode["reconstruction"]["psnr"]
    assert mode["latents"] == sample["latents"]  # statistics use posterior samples either way
    own = ["eval", "--model", str(model), "--data", str(photo_folder), "--out", str(tmp_path / "o")]
    assert kl_ae([*own, "--protocol", "adm"]) == 2  # adm makes N x N images: it needs --resolution


class CountingInception(torch.nn.Module):
    """Stands in for the FID network: uint8 images -> 16 features; counts the images it saw."""

    def __init__(self):
        super().__init__()
        self.proj = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return torch.cat([x.float().mean(dim=(2, 3)), x.float().std(dim=(2, 3))], 1) @ torch.cat([self.proj] * 2)


@pytest.mark.slow
def test_rfid_reference_statistics_are_cached_per_protocol(tmp_path, model, photo_folder, monkeypatch):
    import eval.evaluate as evaluate

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("KL_AE_CACHE", str(tmp_path / "cache"))
    nets = []
    monkeypatch.setattr(evaluate, "build_inception", lambda download: (nets.append(CountingInception()) or nets[-1],
                                                                       "stub"))  # fmt: skip
    base = ["eval", "--model", str(model), "--data", str(photo_folder), "--resolution", "32", "--lpips", "off"]

    def rfid(out, *extra):
        assert kl_ae([*base, *extra, "--out", str(tmp_path / out)]) == 0
        return json.loads((tmp_path / out / "metrics.json").read_text())["reconstruction"]["rfid"]

    first, second = rfid("a"), rfid("b")
    assert first["real"].startswith("computed here") and second["real"].startswith("cached statistics")
    assert second["value"] == pytest.approx(first["value"], rel=1e-9)
    assert [n.seen for n in nets] == [6, 3]  # 3 images: real and reconstructed, then reconstructed only
    assert len(list((tmp_path / "cache" / "fid-stats").glob("*.safetensors"))) == 1
    # another protocol is another real side
    assert rfid("c", "--protocol", "adm")["real"].startswith("computed here")
    assert len(list((tmp_path / "cache" / "fid-stats").glob("*.safetensors"))) == 2


def test_an_edited_image_makes_a_new_image_set(photo_folder):
    from kl_ae.common.fid_stats import image_set_digest

    before = image_set_digest(load_images(str(photo_folder), 8, resolution=32))
    assert image_set_digest(load_images(str(photo_folder), 8, resolution=32)) == before
    Image.open(photo_folder / "0.png").transpose(Image.FLIP_LEFT_RIGHT).resize((211, 151)).save(photo_folder / "0.png")
    assert image_set_digest(load_images(str(photo_folder), 8, resolution=32)) != before
    assert image_set_digest(load_images(str(photo_folder), 8, resolution=32, max_images=2)) != before
