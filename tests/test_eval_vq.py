"""`kl-ae eval` on VQ models: reconstruction metrics as for KL, codebook statistics over the whole set."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.diagnostics import code_histogram, codebook_statistics, codebook_warning
from kl_ae.commands.cli import main as kl_ae
from kl_autoencoder import Autoencoder

from .conftest import launch_two_processes, tiny

ROOT = Path(__file__).resolve().parents[1]
NUM_CODES = 16


# ----------------------------------------------------------------------------- pure functions


def test_codebook_statistics_by_hand():
    counts = torch.tensor([2, 2, 0, 4, 0])  # 8 positions, 3 of 5 codes used
    stats = codebook_statistics(counts, pixels=128.0)
    p = np.array([0.25, 0.25, 0.5])
    entropy = -(p * np.log(p)).sum()
    assert stats["num_codes"] == 5 and stats["num_positions"] == 8 and stats["used_codes"] == 3
    assert stats["usage"] == pytest.approx(0.6) and stats["dead_codes"] == 2
    assert stats["perplexity"] == pytest.approx(math.exp(entropy)) and stats["entropy_bits"] == pytest.approx(1.5)
    assert stats["bits_per_pixel"] == pytest.approx(8 * math.log2(5) / 128)
    assert stats["entropy_bits_per_pixel"] == pytest.approx(8 * 1.5 / 128)
    assert stats["histogram"] == [2, 2, 0, 4, 0]
    # one code: perplexity 1; uniform over all: perplexity K
    assert codebook_statistics(torch.tensor([0, 7, 0]))["perplexity"] == pytest.approx(1.0)
    assert codebook_statistics(torch.tensor([3, 3, 3, 3]))["perplexity"] == pytest.approx(4.0)
    assert codebook_warning(codebook_statistics(torch.tensor([3, 3, 3, 3]))) is None
    assert "1 of 64 codes" in codebook_warning(codebook_statistics(torch.tensor([100] + [0] * 63)))


def test_code_histogram_counts_each_image():
    indices = torch.tensor([[[0, 1], [1, 3]], [[2, 2], [2, 2]]])  # (2, 2, 2)
    assert code_histogram(indices, 4).tolist() == [[1, 2, 0, 1], [0, 0, 4, 0]]


# ----------------------------------------------------------------------------- kl-ae eval


@pytest.fixture
def vq_model(tmp_path):
    torch.manual_seed(0)
    model = Autoencoder(tiny("tiny-vq", num_codes=NUM_CODES))
    with torch.no_grad():  # codes spread like the untrained encoder's outputs, so that several get used
        model.quantize.embedding.weight.normal_(0, 0.3)
    return model.save_pretrained(tmp_path / "vq")


@pytest.fixture
def kl_model(tmp_path):
    torch.manual_seed(1)
    return Autoencoder(tiny("tiny")).save_pretrained(tmp_path / "kl")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        low = rng.integers(0, 255, (5, 5, 3), dtype=np.uint8)
        Image.fromarray(low).resize((32, 32), Image.BICUBIC).save(folder / f"{i}.png")
    return folder


def reference(model_dir: Path, folder: Path) -> tuple[np.ndarray, float, float]:
    """(code histogram, mean PSNR through diffusers' VQModel, the pre-quantization latents' std), without eval/."""
    from diffusers import VQModel

    ours = Autoencoder.from_pretrained(model_dir)
    theirs = VQModel.from_pretrained(model_dir).eval()
    counts, psnrs, latents = np.zeros(NUM_CODES, dtype=np.int64), [], []
    for path in sorted(folder.glob("*.png")):
        img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0  # (32, 32, 3)
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() * 2 - 1
        with torch.no_grad():
            h = ours.encode(x).mode()
            indices = ours.quantize(h).indices
            rec = theirs(x).sample
        counts += np.bincount(indices.flatten().numpy(), minlength=NUM_CODES)
        rec = ((rec[0].permute(1, 2, 0).double().numpy() + 1) / 2).clip(0, 1)
        psnrs.append(10 * np.log10(1.0 / np.mean((img - rec) ** 2)))
        latents.append(h.double().flatten())
    return counts, float(np.mean(psnrs)), float(torch.cat(latents).std(correction=0))


def check_codebook(codebook: dict, counts: np.ndarray) -> None:
    p = counts[counts > 0] / counts.sum()
    assert codebook["histogram"] == counts.tolist()
    assert codebook["num_positions"] == 3 * 8 * 8  # 32 px at f4, every image once
    assert codebook["usage"] == pytest.approx((counts > 0).mean())
    assert codebook["dead_codes"] == int((counts == 0).sum())
    assert codebook["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert 1 < codebook["used_codes"] <= NUM_CODES  # the test means something: several codes used


@pytest.mark.slow
def test_eval_vq_model_with_a_kl_compare(tmp_path, vq_model, kl_model, images, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no LPIPS or Inception weights there
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(vq_model), "--data", str(images), "--out", str(out), "--compare", str(kl_model)]
    assert kl_ae(argv) == 0
    printed = capsys.readouterr().out
    assert "codebook usage" in printed and "active channels" in printed  # one line per model

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 3 and metrics["batch_size"] == 8 and metrics["bottleneck"] == "vq"
    assert {"reconstruction", "latents", "codebook", "warnings"} <= metrics.keys()
    assert not {"rate", "active_units", "prior_distance"} & metrics.keys()  # they need a Gaussian posterior
    rec = metrics["reconstruction"]
    assert {"psnr", "ssim", "mse", "ms_ssim", "lpips", "rfid"} <= rec.keys()
    assert rec["lpips"]["available"] is False and rec["rfid"]["available"] is False

    counts, psnr, std = reference(vq_model, images)
    check_codebook(metrics["codebook"], counts)
    assert rec["psnr"] == pytest.approx(psnr, abs=1e-3)  # through the codebook, as diffusers' VQModel
    # scaling_factor of the latents before quantization (code_dim channels), what LDM diffuses
    assert len(metrics["latents"]["latents_mean"]) == 4
    assert metrics["latents"]["num_values"] == 3 * 4 * 8 * 8
    assert metrics["latents"]["scaling_factor"] == pytest.approx(1 / std, rel=1e-6)

    kl = metrics["compare"]  # the KL model keeps its own diagnostics
    assert {"rate", "active_units", "prior_distance"} <= kl.keys() and "codebook" not in kl

    page = (out / "report.html").read_text()
    for name in ("recon_model.png", "codes_model.png", "code_usage.png", "recon_compare.png", "prior_compare.png"):
        assert name in page and (out / name).stat().st_size > 500, name
    assert "perplexity" in page and "dead codes" in page and "KL (nats / image)" in page


@pytest.mark.slow
def test_eval_vq_two_processes_counts_every_position_once(tmp_path, vq_model, images):
    """Three images on two processes: the padded copy is dropped from the code histogram too."""
    args = [
        "eval",
        "--model",
        str(vq_model),
        "--data",
        str(images),
        "--out",
        str(tmp_path / "two"),
        "--batch-size",
        "1",
    ]
    launch_two_processes(args, module="kl_ae.commands.cli", env={"TORCH_HOME": str(tmp_path / "t")})
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["num_images"] == 3
    counts, psnr, _ = reference(vq_model, images)
    check_codebook(metrics["codebook"], counts)
    assert metrics["reconstruction"]["psnr"] == pytest.approx(psnr, abs=1e-3)
    assert (tmp_path / "two" / "report.html").is_file()
