"""Metrics against hand-made cases, and `kl-ae eval` end to end on tiny random models."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kl_ae.commands.cli import main as kl_ae
from kl_ae.common.data import EvalImages, load_images
from kl_ae.common.metrics import INCEPTION_FILE, build_inception, frechet_distance, ms_ssim, psnr, ssim
from kl_autoencoder import Autoencoder

from .conftest import launch_two_processes, tiny

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(32, 48), (64, 64), (37, 50)]  # (H, W); 37x50 is not a multiple of 4 or 8 and is centre-cropped


# ----------------------------------------------------------------------------- metrics


def test_psnr_and_ssim_of_identical_images():
    x = torch.rand(2, 3, 32, 32)
    assert torch.isinf(psnr(x, x)).all()
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    assert (ssim(x, 1 - x) < 0.1).all()


def test_psnr_of_gaussian_noise_is_analytic():
    gen = torch.Generator().manual_seed(0)
    sigma = 0.02  # small enough around 0.5 that clamping to [0, 1] never happens
    x = torch.full((4, 3, 64, 64), 0.5)
    y = x + sigma * torch.randn(x.shape, generator=gen)
    measured = psnr(x, y)
    exact = 10 * torch.log10(1 / (x - y).double().square().mean(dim=(1, 2, 3)))
    assert torch.allclose(measured.double(), exact, atol=1e-4)
    assert torch.allclose(measured, torch.full((4,), 10 * math.log10(1 / sigma**2)), atol=0.05)  # 33.98 dB


def test_ms_ssim_needs_large_images():
    x = torch.rand(1, 3, 64, 64)
    value, reason = ms_ssim(x, x)
    assert value is None and "64x64" in reason
    x = torch.rand(1, 3, 192, 192)
    value, reason = ms_ssim(x, (x + 0.05).clamp(0, 1))
    assert value is not None and reason == "" and 0.5 < float(value) < 1.0


def test_frechet_distance_against_scipy():
    from scipy import linalg

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(500, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(500, 3, generator=gen, dtype=torch.float64) * 1.5 + 0.7
    s_a, s_b = np.cov(a.numpy().T), np.cov(b.numpy().T)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum().item() + np.trace(s_a + s_b - 2 * linalg.sqrtm(s_a @ s_b).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-8


def test_rfid_unavailable_names_the_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    net, reason = build_inception()
    assert net is None
    assert f"{INCEPTION_FILE} is not in {tmp_path / 'hub' / 'checkpoints'}" in reason


# ----------------------------------------------------------------------------- kl-ae eval


@pytest.fixture
def models(tmp_path):
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(Autoencoder(tiny("tiny")).save_pretrained(tmp_path / f"model{seed}"))
    return paths


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        # smooth images (a random low-resolution field, upsampled) so the metrics are not all noise
        low = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        Image.fromarray(low).resize((w, h), Image.BICUBIC).save(folder / f"{i}.png")
    return folder


def factor_of(model_dir: Path) -> int:
    return Autoencoder.from_pretrained(model_dir).config.downsample_factor


def reference_psnr(model_dir: Path, folder: Path) -> float:
    """Mean per-image PSNR through diffusers' AutoencoderKL, with numpy, independent of eval/."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_dir).eval()
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    values = []
    for path in sorted(folder.glob("*.png")):
        img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0  # (H, W, 3)
        h, w = img.shape[0] // f * f, img.shape[1] // f * f
        top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
        img = img[top : top + h, left : left + w]
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() * 2 - 1
        with torch.no_grad():
            out = vae(x, sample_posterior=False).sample
        rec = ((out[0].permute(1, 2, 0).double().numpy() + 1) / 2).clip(0, 1)
        values.append(10 * np.log10(1.0 / np.mean((img - rec) ** 2)))
    return float(np.mean(values))


def check_report(out: Path) -> str:
    page = (out / "report.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert len(sources) >= 4
    for src in sources:
        assert (out / src).is_file() and src.endswith(".png"), src
    return page


def test_eval_images_crop_to_a_multiple_of_the_factor(image_folder):
    images = load_images(str(image_folder), factor=8)
    assert isinstance(images, EvalImages)
    assert [tuple(images[i].shape[1:]) for i in range(3)] == [(32, 48), (64, 64), (32, 48)]
    assert images.sizes() == {(32, 48), (64, 64)}
    assert images[0].min() >= -1 and images[0].max() <= 1


@pytest.mark.slow
def test_eval_cli_folder_with_compare(tmp_path, models, image_folder, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no LPIPS or Inception weights there
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(models[0]), "--data", str(image_folder), "--out", str(out)]
    assert kl_ae([*argv, "--compare", str(models[1])]) == 0
    assert "report:" in capsys.readouterr().out

    metrics = json.loads((out / "metrics.json").read_text())
    assert {"data", "num_images", "image_sizes", "batch_size", "reconstruction", "latents", "rate"} <= metrics.keys()
    assert {"active_units", "prior_distance", "warnings", "compare"} <= metrics.keys()
    assert metrics["num_images"] == 3 and metrics["batch_size"] == 1  # two sizes: one image per batch
    rec = metrics["reconstruction"]
    assert {"psnr", "ssim", "mse", "ms_ssim", "lpips", "rfid"} <= rec.keys()
    for key in ("lpips", "rfid", "ms_ssim"):
        assert rec[key]["available"] is False and rec[key]["reason"], key
    assert "vgg16-397923af.pth" in rec["lpips"]["reason"] and INCEPTION_FILE in rec["rfid"]["reason"]
    latents = metrics["latents"]
    assert {"scaling_factor", "shift_factor", "latents_mean", "latents_std"} <= latents.keys()
    assert len(latents["latents_mean"]) == 4 and latents["scaling_factor"] == pytest.approx(1 / latents["global_std"])
    rate = metrics["rate"]
    assert {"kl_nats_per_image", "bits_per_latent_element", "bits_per_pixel", "kl_per_channel"} <= rate.keys()
    assert {"mmd2", "gaussian_kl_per_vector", "estimator"} <= metrics["prior_distance"].keys()

    # the PSNR agrees with diffusers' AutoencoderKL on the same images, for both models
    assert rec["psnr"] == pytest.approx(reference_psnr(models[0], image_folder), abs=1e-3)
    assert metrics["compare"]["reconstruction"]["psnr"] == pytest.approx(
        reference_psnr(models[1], image_folder), abs=1e-3
    )
    assert metrics["compare"]["reconstruction"]["psnr"] != rec["psnr"]

    page = check_report(out)
    for name in ("recon_model.png", "recon_compare.png", "prior_model.png", "prior_compare.png"):
        assert name in page
    assert "unavailable" in page and str(models[1]) in page


@pytest.mark.slow
def test_eval_cli_on_the_sample_set(tmp_path, models, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(models[0]), "--data", "sample", "--resolution", "64", "--max-images", "4"]
    assert kl_ae([*argv, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # `sample` means its held-out photos: coffee.png and rocket.jpg
    assert metrics["num_images"] == 2 and metrics["image_sizes"] == ["64x64"] and metrics["batch_size"] == 8
    assert math.isfinite(metrics["reconstruction"]["psnr"]) and 0 < metrics["reconstruction"]["ssim"] < 1
    assert metrics["rate"]["bits_per_pixel"] > 0
    check_report(out)
    # --split train: the 12 photos the default recipe trains on
    assert kl_ae([*argv[:-2], "--split", "train", "--out", str(tmp_path / "eval-train")]) == 0
    metrics = json.loads((tmp_path / "eval-train" / "metrics.json").read_text())
    assert metrics["num_images"] == 12 and metrics["split"] == "train"


def test_eval_mistakes_exit_2(tmp_path, models, image_folder, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    base = ["eval", "--model", str(models[0]), "--data", str(image_folder), "--out", str(tmp_path / "o")]
    cases = [
        ([*base, "--resolution", str(4 * factor_of(models[0]) + 2)], "--resolution"),
        ([*base, "--lpips", "required"], "vgg16-397923af.pth"),
        (["eval", "--model", str(tmp_path / "missing"), "--data", str(image_folder)], "no autoencoder weights"),
        (["eval", "--model", str(models[0]), "--data", str(tmp_path / "nowhere")], "does not exist"),
        ([*base, "--split", "train"], "a folder is evaluated whole"),
    ]
    for argv, message in cases:
        assert kl_ae(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err


@pytest.mark.slow
def test_eval_two_processes_gathers_every_image_once(tmp_path, models, image_folder):
    """Three images on two processes: accelerate pads one process's shard; gather_for_metrics drops the copy."""
    args = ["eval", "--model", str(models[0]), "--data", str(image_folder), "--out", str(tmp_path / "two")]
    launch_two_processes(args, module="kl_ae.commands.cli", env={"TORCH_HOME": str(tmp_path / "t")})
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["num_images"] == 3
    assert metrics["reconstruction"]["psnr"] == pytest.approx(reference_psnr(models[0], image_folder), abs=1e-3)
    # 4 channels x h*w latent positions of each of the 3 images: no image counted twice
    f = factor_of(models[0])
    assert metrics["latents"]["num_values"] == 4 * sum((h // f) * (w // f) for h, w in SIZES)


@pytest.mark.slow
def test_rd_cli_trains_and_evaluates_each_kl_weight(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    tiny_run = [
        "model.base_channels=16", "model.norm_num_groups=8", "data.resolution=32", "data.resize=48",
        "data.batch_size=2", "data.repeats=1", "loss.lpips=off", "train.tracker=none",
    ]  # fmt: skip
    out = tmp_path / "rd"
    argv = ["rd", "--kl-weights", "1e-6,1e-2", "--max-steps", "2", "--out", str(out), "--data", "sample", *tiny_run]
    assert kl_ae(argv) == 0
    assert "rate-distortion curve" in capsys.readouterr().out
    rd = json.loads((out / "rd.json").read_text())
    assert [p["kl_weight"] for p in rd["points"]] == [1e-6, 1e-2]
    for p in rd["points"]:
        assert {"bits_per_pixel", "mse", "psnr", "kl_nats_per_image"} <= p.keys()
        assert (Path(p["run"]) / "diffusers").is_dir() and (Path(p["run"]) / "eval" / "metrics.json").is_file()
    assert (out / "kl_1e-06").is_dir() and (out / "kl_0.01").is_dir()
    assert (out / "rd.png").stat().st_size > 1000
    assert kl_ae(["rd", "--kl-weights", "-1", "--out", str(out)]) == 2


class StubInception(torch.nn.Module):
    """Stands in for the FID network (whose weights are not here): uint8 images -> 16 features."""

    def __init__(self):
        super().__init__()
        self.proj = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        assert x.dtype == torch.uint8
        return x.float().mean(dim=(2, 3)) @ self.proj


@pytest.mark.slow
def test_eval_reports_lpips_and_rfid_when_their_networks_exist(tmp_path, models, image_folder, monkeypatch):
    """The plumbing only: random-backbone LPIPS and a stub Inception stand in for the real weights."""
    import eval.evaluate as evaluate
    from kl_ae.common.lpips import LPIPS

    stub_lpips = (LPIPS("vgg", random_backbone=True), "vgg: stub")
    monkeypatch.setattr(evaluate, "lpips_for_eval", lambda mode, download: stub_lpips)
    monkeypatch.setattr(evaluate, "build_inception", lambda download: (StubInception(), "stub"))
    out = tmp_path / "eval"
    assert kl_ae(["eval", "--model", str(models[0]), "--data", str(image_folder), "--out", str(out)]) == 0
    rec = json.loads((out / "metrics.json").read_text())["reconstruction"]
    assert rec["lpips"]["available"] is True and rec["lpips"]["value"] > 0
    assert rec["rfid"]["available"] is True and rec["rfid"]["num_images"] == 3 and rec["rfid"]["value"] > 0


@pytest.mark.slow
def test_eval_of_a_run_uses_its_held_out_split(tmp_path, monkeypatch):
    """`kl-ae eval --model RUN --data SOURCE`: the run's own folder split as its trainer split it (a non-default
    val_fraction and the run's seed), so `val` is exactly the run's validation images and `train` the rest."""
    import shutil

    import yaml

    from kl_ae.common.config import DataConfig
    from kl_ae.common.data import build_datasets

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        low = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(low).resize((40, 40), Image.BICUBIC).save(images / f"{i:02d}.png")
    data = {"source": str(images), "resolution": 32, "resize": 32, "val_fraction": 0.1}
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "step_0000001"
    torch.manual_seed(0)
    Autoencoder(tiny("tiny", sample_size=32)).save_pretrained(checkpoint / "autoencoder")
    (checkpoint / "trainer_state.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text(checkpoint.name)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": data, "train": {"seed": 3}}))
    validation = build_datasets(DataConfig(**data), seed=3)[1].paths()
    assert len(validation) == 2 and validation != build_datasets(DataConfig(**data), seed=0)[1].paths()
    held_out = tmp_path / "held_out"  # the run's validation images alone, evaluated as a whole folder
    held_out.mkdir()
    for path in validation:
        shutil.copy(path, held_out / Path(path).name)

    def metrics(model, folder, out, *extra) -> dict:
        argv = ["eval", "--model", str(model), "--data", str(folder), "--resolution", "32", "--lpips", "off"]
        assert kl_ae([*argv, "--out", str(tmp_path / out), *extra]) == 0
        return json.loads((tmp_path / out / "metrics.json").read_text())

    val = metrics(run, images, "val")
    assert val["num_images"] == 2 and val["split_seed"] == 3 and val["run"] == str(run.resolve())
    alone = metrics(checkpoint / "autoencoder", held_out, "alone")
    assert val["reconstruction"]["psnr"] == pytest.approx(alone["reconstruction"]["psnr"], abs=1e-6)
    assert metrics(run, images, "train", "--split", "train", "--max-images", "3")["num_images"] == 3
    plain = shutil.copytree(checkpoint / "autoencoder", tmp_path / "plain")  # the same weights outside the run
    assert metrics(plain, images, "whole")["num_images"] == 20  # a folder is evaluated whole
