"""One rule for a run folder's weights: every command (from_pretrained, so eval, probe, encode and init_from; export;
bench) resolves a run to the same, newest weights, the release `diffusers/` only while it is current."""

import json

import pytest
import skimage.data
import torch
from PIL import Image

from eval.latents import read_latents
from kl_ae.commands.cli import main as kl_ae
from kl_ae.common.data import load_images
from kl_ae.common.release import export_run
from kl_ae.common.runs import checkpoint_name, latest_weights
from kl_autoencoder import Autoencoder, find_diffusers_folder
from kl_autoencoder.folders import EXPORT_KEY, weights_step

from .conftest import TINY_RUN, tiny


def same_weights(a: Autoencoder, b: Autoencoder) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def save_checkpoint(run, step: int, model: Autoencoder):
    """What the trainer leaves: step_N/autoencoder, trainer_state.json (written last), then the pointer."""
    checkpoint = run / "checkpoints" / checkpoint_name(step)
    model.save_pretrained(checkpoint / "autoencoder")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": step}))
    (run / "checkpoints" / "latest").write_text(checkpoint.name + "\n")
    return checkpoint / "autoencoder"


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(skimage.data, name)()[::8, ::8]).save(folder / f"{name}.png")
    return folder


def test_a_stale_release_loses_to_a_newer_checkpoint_in_every_command(tmp_path, images, tiny_config):
    run = tmp_path / "run"
    torch.manual_seed(0)
    old, new = Autoencoder(tiny_config).eval(), Autoencoder(tiny_config).eval()
    save_checkpoint(run, 40, old)
    export_run(run, run / "diffusers", data=str(images))  # what a finished run writes: the step is recorded
    release = json.loads((run / "diffusers" / "config.json").read_text())
    assert release[EXPORT_KEY]["step"] == 40 and release["scaling_factor"] != 1.0
    assert find_diffusers_folder(run) == run / "diffusers"  # current: its measured factors are used
    assert Autoencoder.from_pretrained(run).config.scaling_factor == release["scaling_factor"]

    newest = save_checkpoint(run, 60, new)  # the run continued and stopped early: no new release
    assert find_diffusers_folder(run) == latest_weights(run) == newest and weights_step(newest) == 60
    assert same_weights(Autoencoder.from_pretrained(run), new)  # eval, probe, encode, init_from
    assert same_weights(Autoencoder.from_pretrained(latest_weights(run)), new)  # bench
    out = tmp_path / "latents"
    assert kl_ae(["encode", "--model", str(run), "--data", str(images), "--out", str(out), "--resolution", "32"]) == 0
    table, settings = read_latents(out)
    with torch.no_grad():
        z = new.encode(load_images(str(images), 4, resolution=32)[0][None]).mode()
    assert settings["scaling_factor"] == 1.0  # the newest weights have no measured factors yet
    torch.testing.assert_close(torch.tensor(table.with_format("numpy")[0]["latent"])[None], z)
    assert kl_ae(["export", str(run), "--out", str(tmp_path / "export"), "--data", str(images)]) == 0
    assert same_weights(Autoencoder.from_pretrained(tmp_path / "export"), new)
    assert json.loads((tmp_path / "export" / "config.json").read_text())[EXPORT_KEY]["step"] == 60

    export_run(run, run / "diffusers", data=str(images))  # exported again: current again
    assert find_diffusers_folder(run) == run / "diffusers" and weights_step(run / "diffusers") == 60
    assert same_weights(Autoencoder.from_pretrained(run), new)


def test_older_releases_name_their_checkpoint(tmp_path):
    """Releases written before the step was recorded: their `weights` entry names the checkpoint folder."""
    model = Autoencoder(tiny("tiny"))
    record = {EXPORT_KEY: {"weights": "/runs/a/checkpoints/step_0000040/autoencoder"}}
    model.save_pretrained(tmp_path / "old", extra_config=record)
    model.save_pretrained(tmp_path / "unknown")
    assert weights_step(tmp_path / "old") == 40 and weights_step(tmp_path / "unknown") is None


@pytest.mark.slow
def test_a_run_continued_and_stopped_early_is_loaded_at_its_newest_step(tmp_path, monkeypatch, capsys):
    """The reproduction: a finished run (exported at step 2) re-run for more steps stops at step 4 by
    train.max_time; from_pretrained(run) then loads step 4, as export and bench do, not the release of step 2."""
    import itertools

    from training.progress import TimeBudget

    out = tmp_path / "run"
    tiny_run = [*TINY_RUN, "loss.lpips=off", "train.tracker=none", "train.eval_every=100", "train.sample_every=100"]
    assert kl_ae(["train", "--out", str(out), "--max-steps", "2", *tiny_run]) == 0
    released = Autoencoder.from_pretrained(out / "diffusers")
    ticks = itertools.count(0.0, 5.0)  # every reading of the budget's clock 5 s after the one before
    monkeypatch.setattr(TimeBudget, "clock", staticmethod(lambda: next(ticks)))
    args = ["train", "--out", str(out), "--max-steps", "8", *tiny_run, "train.log_every=1", "train.max_time=0:00:30"]
    assert kl_ae(args) == 0
    assert "stopped at step 4" in capsys.readouterr().out
    newest = out / "checkpoints" / checkpoint_name(4) / "autoencoder"
    assert weights_step(out / "diffusers") == 2 and latest_weights(out) == newest
    loaded = Autoencoder.from_pretrained(out)
    assert same_weights(loaded, Autoencoder.from_pretrained(newest)) and not same_weights(loaded, released)
