"""Weights on demand: a file:// mirror stands in for the internet; the cache layout, the hash refusal, the
offline switches, `kl-ae fetch-weights`, and a kl-f8 run that fetches its LPIPS backbone on a fresh cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torchvision

from kl_ae.commands.cli import main as kl_ae
from kl_ae.common import weights
from kl_ae.common.lpips import build_lpips

from .conftest import TINY_RUN


@pytest.fixture
def mirror(tmp_path, monkeypatch) -> Path:
    """Online (no offline switch), an empty torch hub cache, and KL_AE_WEIGHTS_MIRROR at an empty file:// folder."""
    for name in weights.OFFLINE_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # undo any torch.hub.set_dir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "mirror"
    folder.mkdir()
    monkeypatch.setenv(weights.MIRROR, folder.as_uri())
    return folder


def vgg_features() -> dict[str, torch.Tensor]:
    """A random torchvision VGG16 `features.*` state dict (the part LPIPS loads), without the 500 MB classifier."""
    torch.manual_seed(0)
    layers = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    return {f"features.{k}": v for k, v in layers.state_dict().items()}


def publish(mirror: Path, monkeypatch, name: str, state: dict, expect_hash: bool = True) -> Path:
    """Put a file for registry entry `name` on the mirror; the registry expects its hash (or a wrong one)."""
    entry = weights.KNOWN[name]
    path = mirror / entry.file
    torch.save(state, path)
    digest = weights.sha256_of(path)[:8] if expect_hash else "00000000"
    monkeypatch.setitem(weights.KNOWN, name, dataclasses.replace(entry, sha256=digest))
    return path


def test_fetch_downloads_into_the_hub_cache_and_checks_the_hash(mirror, monkeypatch):
    published = publish(mirror, monkeypatch, "lpips-vgg", vgg_features())
    path, why = weights.fetch("lpips-vgg", progress=False)
    assert why == "" and path == Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
    assert path.read_bytes() == published.read_bytes()
    assert weights.verify("lpips-vgg")[0]
    published.unlink()  # from now on the cache answers
    assert weights.fetch("lpips-vgg")[0] == path


def test_a_file_with_another_hash_is_refused_and_not_cached(mirror, monkeypatch):
    publish(mirror, monkeypatch, "lpips-vgg", vgg_features(), expect_hash=False)
    path, why = weights.fetch("lpips-vgg", progress=False)
    assert path is None and "refused" in why and "invalid hash" in why
    assert not (weights.cache_dir() / "vgg16-397923af.pth").exists()
    with pytest.raises(FileNotFoundError, match="refused") as e:
        build_lpips("required", "vgg")
    assert str(weights.cache_dir()) in str(e.value)


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "KL_AE_OFFLINE"])
def test_offline_never_tries(mirror, monkeypatch, switch):
    publish(mirror, monkeypatch, "lpips-vgg", vgg_features())
    monkeypatch.setenv(switch, "1")
    path, why = weights.fetch("lpips-vgg")
    assert path is None and why == f"not downloaded: offline ({switch}=1)"
    module, status = build_lpips("auto", "vgg")
    assert module is None and "vgg16-397923af.pth" in status and f"{switch}=1" in status
    assert not weights.cache_dir().exists() or not any(weights.cache_dir().iterdir())


def test_a_process_told_not_to_download_reads_the_cache_only(mirror, monkeypatch):
    publish(mirror, monkeypatch, "lpips-alex", torchvision.models.alexnet(weights=None).state_dict())
    assert weights.fetch("lpips-alex", download=False) == (None, "not downloaded by this process")
    module, why = build_lpips("required", "alex")  # downloads, then loads the backbone strictly
    assert why == f"alex: {weights.cache_dir() / 'alexnet-owt-7be5be79.pth'}" and not module.random
    assert weights.fetch("lpips-alex", download=False)[0] is not None


def test_failed_download_under_auto_trains_without(mirror):
    module, status = build_lpips("auto", "vgg")  # the mirror is empty: the download fails
    assert module is None and "download from file://" in status and "training without" in status


def test_fetch_weights_command(mirror, monkeypatch, capsys):
    publish(mirror, monkeypatch, "lpips-vgg", vgg_features())
    publish(mirror, monkeypatch, "fid-inception", {"w": torch.ones(3)})
    assert kl_ae(["fetch-weights", "--config", "kl-f8"]) == 0
    out = capsys.readouterr().out
    assert "vgg16-397923af.pth: sha256" in out and "weights-inception-2015-12-05-6726825d.pth: sha256" in out
    assert sorted(p.name for p in weights.cache_dir().iterdir()) == [
        "vgg16-397923af.pth", "weights-inception-2015-12-05-6726825d.pth"
    ]  # fmt: skip
    # a damaged file already in the cache is found out, not trusted
    with open(weights.cache_dir() / "vgg16-397923af.pth", "ab") as f:
        f.write(b"x")
    assert kl_ae(["fetch-weights", "--what", "lpips"]) == 1
    assert "does not start with" in capsys.readouterr().out
    monkeypatch.setenv("KL_AE_OFFLINE", "1")
    assert kl_ae(["fetch-weights", "--what", "lpips-alex"]) == 1
    assert "offline (KL_AE_OFFLINE=1)" in capsys.readouterr().out
    assert kl_ae(["fetch-weights", "--what", "dino"]) == 2
    assert "--what: unknown item 'dino'" in capsys.readouterr().err


KL_F8_TINY = ["--config", "kl-f8", "--max-steps", "1", "--data", "sample", *TINY_RUN, "data.num_workers=0",
              "train.tracker=none", "train.export=false"]  # fmt: skip


@pytest.mark.slow
def test_kl_f8_on_a_fresh_cache_downloads_verifies_and_trains_with_lpips(mirror, monkeypatch, tmp_path, capsys):
    publish(mirror, monkeypatch, "lpips-vgg", vgg_features())
    out = tmp_path / "run"
    assert kl_ae(["train", *KL_F8_TINY, "--out", str(out)]) == 0
    assert "downloading torchvision VGG16" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lpips"] == f"vgg: {weights.cache_dir() / 'vgg16-397923af.pth'}" and summary["steps"] == 1


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "KL_AE_OFFLINE"])
def test_kl_f8_offline_stops_before_training(mirror, monkeypatch, tmp_path, capsys, switch):
    publish(mirror, monkeypatch, "lpips-vgg", vgg_features())
    monkeypatch.setenv(switch, "1")
    out = tmp_path / "run"
    assert kl_ae(["train", *KL_F8_TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: LPIPS (vgg) needs") and f"offline ({switch}=1)" in err
    assert "vgg16-397923af.pth" in err and str(weights.cache_dir()) in err
    assert not (out / "checkpoints").exists() and not weights.cache_dir().exists()
