"""Bad configs, bad files and failing disks: a one-line message, the right exit status, nothing lost."""

import errno
import json

import pytest
import torch

from kl_ae.commands.cli import main as kl_ae
from kl_autoencoder import PRESETS, Autoencoder

from .conftest import TINY_RUN

TINY = [*TINY_RUN, "train.log_every=1", "train.eval_every=100", "train.sample_every=100",
        "train.checkpoint_every=2", "train.tracker=none", "loss.lpips=off", "loss.disc_start=100",
        "train.export=false"]  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (["optim.lr=0"], "optim.lr: must be > 0"),
        (["data.batch_size=-2"], "data.batch_size: must be > 0"),
        (["train.max_steps=0"], "train.max_steps: must be > 0"),
        (["data.resolution=64", "data.resize=32"], "data.resize: must be >= resolution"),
        (["--data", "/nonexistent/photos"], "data.source: folder /nonexistent/photos does not exist"),
        (["--config", "no-such-recipe"], "--config: unknown recipe 'no-such-recipe'"),
        (["model.num_codes=64"], "model.num_codes: a VQ option, but model.preset tiny is a KL model"),
        (["vq.beta=0.5"], "vq.beta: a VQ option, but model.preset tiny is a KL model"),
        (["train.mixed_precision=fp16"], "train.mixed_precision: fp16 needs a CUDA GPU"),
        (["loss.gan_loss=wgan"], "loss.gan_loss: must be one of"),
        (["trian.max_steps=3"], "trian: unknown key"),
        (["data.small_images=crop"], "data.small_images: must be one of ['upscale', 'skip']"),
        (["model.init_from=/nonexistent/vae"], "model.init_from: /nonexistent/vae does not exist"),
    ],
)
def test_config_mistakes(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    assert kl_ae(["train", "--out", str(out), *TINY, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}"), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()  # nothing written


def test_unwritable_output_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert kl_ae(["train", "--out", str(tmp_path / "file" / "run"), *TINY]) == 2
    assert (
        "out_dir:" in capsys.readouterr().err
        and "is not a folder" in (tmp_path / "file").read_text() + " is not a folder"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "where, error",
    [
        ("training.checkpoint.save_diffusers", OSError(errno.ENOSPC, "No space left on device")),
        ("training.checkpoint.commit", PermissionError(errno.EACCES, "Permission denied")),
    ],
)
def test_checkpoint_write_failure_keeps_the_previous_one(tmp_path, capsys, monkeypatch, where, error):
    import importlib

    module_name, attr = where.rsplit(".", 1)
    module = importlib.import_module(module_name)
    real, calls = getattr(module, attr), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint, at step 4
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(module, attr, failing)
    out = tmp_path / "run"
    code = kl_ae(["train", "--out", str(out), "--max-steps", "6", *TINY])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: could not write the checkpoint of step 4") and "step_0000002" in err
    root = out / "checkpoints"
    assert (root / "latest").read_text() == "step_0000002"
    assert not list(root.glob(".tmp_*")) and not (root / "step_0000004").exists()
    assert Autoencoder.from_pretrained(root / "step_0000002") is not None


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    model = Autoencoder(PRESETS["tiny"])
    model.save_pretrained(tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        Autoencoder.from_pretrained(tmp_path / "vae")


@pytest.mark.slow
def test_resume_from_a_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert kl_ae(["train", "--out", str(out), "--max-steps", "2", *TINY]) == 0
    weights = out / "checkpoints" / "step_0000002" / "model.safetensors"
    weights.write_bytes(b"garbage")
    assert kl_ae(["train", "--out", str(out), "--max-steps", "4", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: resume:") and "step_0000002 cannot be loaded" in err
    assert json.loads((out / "summary.json").read_text())["steps"] == 2  # the finished run is untouched


@pytest.mark.slow
def test_resume_with_another_architecture_names_the_parameters(tmp_path, capsys):
    out = tmp_path / "run"
    assert kl_ae(["train", "--out", str(out), "--max-steps", "2", *TINY]) == 0
    assert kl_ae(["train", "--out", str(out), "--max-steps", "4", *TINY, "model.base_channels=32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: resume:") and "size mismatch for autoencoder.encoder.conv_in.weight" in err
