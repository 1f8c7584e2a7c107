"""The hub in and out, offline: hub names and pipeline subfolders as `--model` (a hub cache made on disk,
and the download call recorded), `model.init_from` by hub name, and a mocked `--push-to-hub`."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml

from kl_ae.commands.cli import main as kl_ae
from kl_ae.common.release import hub_metadata
from kl_autoencoder import Autoencoder
from kl_autoencoder.diffusers_format import is_hub_name
from training.config import ConfigError, load_config
from training.train import build_autoencoder

from .conftest import tiny

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def vae() -> Autoencoder:
    torch.manual_seed(0)
    return Autoencoder(tiny("tiny", sample_size=32))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, vae) -> Path:
    """A hub cache holding the pipeline repo `org/pipe` with our VAE in `vae/`, as snapshot_download lays it out."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--pipe"
    vae.save_pretrained(repo / "snapshots" / COMMIT / "vae")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def same_weights(a: Autoencoder, b: Autoencoder) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_hub_name_with_subfolder_loads_from_the_hub_cache(hub_cache, vae):
    assert same_weights(Autoencoder.from_pretrained("org/pipe", subfolder="vae"), vae)
    assert same_weights(Autoencoder.from_pretrained("org/pipe/vae"), vae)
    with pytest.raises(FileNotFoundError, match=r"no config.json .* add its subfolder, e.g. --subfolder vae"):
        Autoencoder.from_pretrained("org/pipe")
    with pytest.raises(FileNotFoundError, match="org/other is not a local folder.*could not be fetched"):
        Autoencoder.from_pretrained("org/other")  # offline (HF_HUB_OFFLINE=1) and not cached


def test_only_the_vae_files_are_requested(tmp_path, monkeypatch, vae):
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        vae.save_pretrained(tmp_path / "snap" / "vae")
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = Autoencoder.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", subfolder="vae")
    assert same_weights(model, vae)
    assert calls == [
        ("stabilityai/stable-diffusion-xl-base-1.0", ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"])
    ]


def test_local_path_wins_and_pipeline_folders_take_subfolder(tmp_path, monkeypatch, vae, capsys):
    monkeypatch.chdir(tmp_path)
    vae.save_pretrained(tmp_path / "org" / "pipe" / "vae")  # a relative path that reads like a hub name
    assert not is_hub_name("org/pipe") and is_hub_name("org/elsewhere") and not is_hub_name("./x/y")
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (120, 30, 200)).save(image)
    args = ["reconstruct", str(image), "--model", "org/pipe", "--out", str(tmp_path / "r.png")]
    assert kl_ae(args) == 2
    assert "add --subfolder vae" in capsys.readouterr().err
    assert kl_ae([*args, "--subfolder", "vae"]) == 0 and (tmp_path / "r.png").is_file()


@pytest.mark.slow
def test_eval_a_hub_model(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert kl_ae(["eval", "--model", "org/pipe", "--subfolder", "vae", "--data", "sample", "--resolution", "32"]) == 0
    metrics = json.loads((tmp_path / "eval" / "org--pipe--vae" / "metrics.json").read_text())
    assert metrics["path"] == "org/pipe/vae" and metrics["num_images"] == 2


def test_init_from_a_hub_name(hub_cache, vae, tmp_path):
    cfg = load_config(None, ["model.init_from=org/pipe/vae", f"out_dir={tmp_path / 'run'}"])
    assert same_weights(build_autoencoder(cfg), vae)
    with pytest.raises(ConfigError, match="model.init_from: ./nowhere does not exist"):
        load_config(None, ["model.init_from=./nowhere"])


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records the calls and what the uploaded folder holds."""

    calls: list = []

    def create_repo(self, repo_id, repo_type=None, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, repo_type, private, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        self.calls.append(("upload_folder", repo_id, repo_type, files))


def test_export_push_to_hub_sends_a_hub_ready_folder(tmp_path, monkeypatch, vae, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    RecordingApi.calls = []
    vae.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["export", str(tmp_path / "model"), "--out", str(out), "--data", "sample", "--max-images", "2"]
    assert kl_ae([*args, "--push-to-hub", "me/my-vae", "--private", "--license", "mit"]) == 0
    assert "uploaded: https://huggingface.co/me/my-vae" in capsys.readouterr().out
    assert RecordingApi.calls == [
        ("create_repo", "me/my-vae", "model", True, True),
        ("upload_folder", "me/my-vae", "model", ["README.md", "config.json", "diffusion_pytorch_model.safetensors"]),
    ]
    card = huggingface_hub.ModelCard.load(out / "README.md")  # parses the YAML header as the hub does
    assert card.data.library_name == "diffusers" and card.data.license == "mit"
    assert {"diffusers", "AutoencoderKL", "vae"} <= set(card.data.tags)
    assert "# AutoencoderKL trained with kl-autoencoder" in card.text
    assert same_weights(Autoencoder.from_pretrained(out), vae)


def test_push_offline_or_failing_keeps_the_folder(tmp_path, monkeypatch, vae, capsys):
    vae.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["export", str(tmp_path / "model"), "--out", str(out), "--data", "sample", "--push-to-hub", "me/v"]
    assert kl_ae(args) == 1  # HF_HUB_OFFLINE=1
    assert "offline (HF_HUB_OFFLINE=1)" in capsys.readouterr().err and (out / "config.json").is_file()

    class Failing(RecordingApi):
        def create_repo(self, *a, **k):
            raise RuntimeError("401 Unauthorized\nmore detail")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "HfApi", Failing)
    assert kl_ae(args) == 1
    assert capsys.readouterr().err == "error: --push-to-hub me/v: RuntimeError: 401 Unauthorized\n"
    assert kl_ae(args[:-2] + ["--private"]) == 2  # --private without --push-to-hub


def test_model_card_metadata_names_base_model_and_dataset(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    config = {"model": {"init_from": "stabilityai/stable-diffusion-xl-base-1.0/vae"}, "data": {"source": "me/photos"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    header = hub_metadata("AutoencoderKL", run, None, "apache-2.0")
    meta = yaml.safe_load(header.split("---")[1])
    assert meta["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0" and meta["datasets"] == ["me/photos"]
    assert meta["library_name"] == "diffusers" and meta["license"] == "apache-2.0"
    # a local folder is neither a hub base model nor a hub dataset
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"init_from": str(run)}, "data": {"source": "sample"}}))
    meta = yaml.safe_load(hub_metadata("VQModel", run, None, "mit").split("---")[1])
    assert "base_model" not in meta and "datasets" not in meta and "vq" in meta["tags"]
