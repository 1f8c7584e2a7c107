"""`kl-ae export` on a tiny trained run: measured latent factors, force_upcast, model card, fp16 variant."""

import json

import pytest
import torch
from torch.utils.data import DataLoader

from kl_ae.commands.cli import main
from kl_ae.common.data import build_datasets
from kl_autoencoder import Autoencoder
from training.config import load_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    args = ["train", "--out", str(out), "--max-steps", "2", "model.base_channels=16", "model.norm_num_groups=8",
            "data.resolution=32", "data.resize=48", "data.batch_size=2", "loss.lpips=off",
            "train.tracker=none"]  # fmt: skip
    assert main(args) == 0
    return out


@pytest.mark.slow
def test_export_run_measures_factors_and_loads_in_diffusers(run, tmp_path):
    from diffusers import AutoencoderKL

    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--fp16-variant"]) == 0
    config = json.loads((out / "config.json").read_text())

    # independent computation: the run's held-out images, posterior samples with the same seeded generator
    cfg = load_config(str(run / "config.yaml"))
    val = build_datasets(cfg.data, cfg.train.seed)[1]
    model = Autoencoder.from_pretrained(run)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = torch.cat([model.encode(x).sample(gen) for x in DataLoader(val, batch_size=8)]).double()
    assert config["scaling_factor"] == pytest.approx(1 / float(z.std(unbiased=False)), rel=1e-5)
    assert config["shift_factor"] == pytest.approx(float(z.mean()), rel=1e-5, abs=1e-7)
    assert config["latents_mean"] == pytest.approx(z.mean(dim=(0, 2, 3)).tolist(), rel=1e-5, abs=1e-7)
    assert config["latents_std"] == pytest.approx(z.std(dim=(0, 2, 3), unbiased=False).tolist(), rel=1e-5)
    assert config["scaling_factor"] != 1.0  # not the untouched default
    assert isinstance(config["force_upcast"], bool)

    vae = AutoencoderKL.from_pretrained(out)
    assert vae.config.scaling_factor == pytest.approx(config["scaling_factor"])
    x = val[0][None]
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(model.encode(x).mode()).sample, model.decode(model.encode(x).mode()))
    card = (out / "README.md").read_text()
    assert "scaling_factor" in card and f"{config['scaling_factor']:.6g}" in card and "data:" in card
    assert "Trained WITHOUT the LPIPS perceptual loss" in card  # the run had loss.lpips=off
    assert not list(out.glob("*.bin"))  # safetensors only

    fp16 = AutoencoderKL.from_pretrained(out, variant="fp16", torch_dtype=torch.float16)
    assert fp16.dtype == torch.float16
    for name, p in fp16.state_dict().items():
        torch.testing.assert_close(p.float(), vae.state_dict()[name].half().float())


def test_export_without_run_needs_data(tmp_path, tiny_config):
    Autoencoder(tiny_config).save_pretrained(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "out")]) == 2
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--data", "sample"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["scaling_factor"] > 0 and (tmp_path / "out" / "README.md").is_file()


def test_export_vq(tmp_path, tiny_config):
    import dataclasses

    from diffusers import VQModel

    cfg = dataclasses.replace(tiny_config, bottleneck="vq", num_codes=16, code_dim=4)
    Autoencoder(cfg).save_pretrained(tmp_path / "model")
    args = ["export", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--data", "sample", "--max-images", "2"]
    assert main(args) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["_class_name"] == "VQModel" and "shift_factor" not in config
    assert VQModel.from_pretrained(tmp_path / "out").config.scaling_factor == pytest.approx(config["scaling_factor"])
