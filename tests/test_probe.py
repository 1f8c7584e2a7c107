"""`kl-ae probe`: the crop grid, the Gaussian optimum, the probe's training mechanics, reproducibility, the CLI."""

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from eval import denoiser as dn
from eval.latents import read_latents
from kl_ae.commands.cli import main as kl_ae
from kl_ae.common.config import DataConfig
from kl_ae.common.crops import CropGrid, GridCrops
from kl_ae.common.data import build_datasets, load_images
from kl_autoencoder import Autoencoder

from .conftest import launch_two_processes, tiny

# 4 steps of 8 latents of 4 x 8 x 8 (32 px crops of a tiny f4 model), 2 x 2 crops + mirrors of the sample photos
FAST = ["--data", "sample", "--steps", "4", "--eval-every", "2", "--batch-size", "8", "--crops", "2",
        "--resolution", "32", "--resize", "48"]  # fmt: skip


@pytest.fixture
def few_sampling_steps(monkeypatch):
    """5 DDIM steps instead of 50: the tests check the mechanics, and sampling is most of a tiny probe's time."""
    monkeypatch.setattr(dn, "SAMPLE_STEPS", 5)


@pytest.fixture
def models(tmp_path):
    """Two tiny random models: the first with latent factors in its config, the second without (a bare checkpoint)."""
    paths = []
    for seed, extra in ((0, {"scaling_factor": 2.0, "shift_factor": 0.1}), (1, None)):
        torch.manual_seed(seed)
        model = Autoencoder(tiny("tiny", sample_size=32))
        paths.append(model.save_pretrained(tmp_path / f"model{seed}", extra_config=extra))
    return paths


def test_grid_crops_cut_a_fixed_grid_and_mirror_it(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)  # (H, W, 3)
    Image.fromarray(pixels).save(folder / "a.png")
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
    crops = GridCrops(load_images(str(folder), 4, resolution=16), CropGrid(k=3, resize=40, hflip=True))
    assert len(crops) == 18 and crops.row(17) == 0 and crops.sizes() == {(16, 16)}
    for i, (top, left) in enumerate([(0, 0), (0, 22), (0, 44), (12, 0), (12, 22), (12, 44), (24, 0), (24, 22)]):
        torch.testing.assert_close(crops[i], expected[:, top : top + 16, left : left + 16])
    torch.testing.assert_close(crops[9 + 5], crops[5].flip(-1))  # the mirrored copy of crop 5
    # no room along the height (resize == resolution): k * k distinct crops along the width
    crops = GridCrops(load_images(str(folder), 4, resolution=40), CropGrid(k=2, resize=40, hflip=False))
    lefts = [next(j for j in range(21) if torch.equal(crops[i], expected[:, :, j : j + 40])) for i in range(4)]
    assert lefts == [0, 7, 13, 20]


def test_gaussian_baseline_is_the_best_linear_denoiser():
    """For x0 ~ N(0, I), E[eps | x_t] = sqrt(1 - abar) x_t and its MSE is abar: checked by least squares."""
    scheduler = dn.noise_scheduler()
    gen = torch.Generator().manual_seed(0)
    for t, baseline in zip(dn.TIMESTEPS, dn.gaussian_baseline(scheduler)):
        a = scheduler.alphas_cumprod[t].double()
        x0, eps = torch.randn(200_000, generator=gen, dtype=torch.float64), torch.randn(200_000, generator=gen).double()
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        slope = (x_t * eps).sum() / (x_t * x_t).sum()  # the least-squares linear predictor of eps from x_t
        assert float(slope) == pytest.approx(math.sqrt(1 - baseline), abs=5e-3)
        assert float((eps - slope * x_t).square().mean()) == pytest.approx(baseline, rel=0.02, abs=2e-4)


def test_denoiser_size_follows_the_latent_shape():
    assert dn.denoiser_size((4, 16, 16)) == {"patch_size": 2, "width": 128, "depth": 4, "heads": 4, "tokens": 64}
    assert dn.denoiser_size((16, 64, 64))["patch_size"] == 4  # 256 tokens at most
    assert dn.denoiser_size((64, 32, 32))["width"] == 512  # at least twice a patch's values


class Zero(torch.nn.Module):
    """A denoiser that predicts eps = 0: its loss is the mean square of the held-out noise itself."""

    def forward(self, x, timestep, class_labels):
        return SimpleNamespace(sample=torch.zeros_like(x))


@pytest.mark.parametrize("batch_size", [3, 10])
def test_heldout_noise_is_fixed_per_latent_whatever_the_batching(batch_size):
    heldout = torch.randn(10, 2, 4, 4)
    expected = torch.stack([dn.heldout_noise(i, 7, (2, 4, 4)) for i in range(10)]).square().mean((0, 2, 3, 4))
    accelerator = dn.probe_accelerator(0)
    loader = accelerator.prepare(DataLoader(TensorDataset(torch.arange(10), heldout), batch_size=batch_size))
    values = dn.heldout_loss(Zero(), loader, dn.noise_scheduler(), 7, accelerator)
    torch.testing.assert_close(torch.tensor(values, dtype=torch.float32), expected)


@pytest.mark.slow
def test_probe_learns_the_optimal_denoiser_of_gaussian_latents():
    """Latents drawn from N(0, I): the trained denoiser's held-out loss approaches abar_t at every grid timestep."""
    gen = torch.Generator().manual_seed(1)
    train, heldout = torch.randn((512, 2, 8, 8), generator=gen), torch.randn((512, 2, 8, 8), generator=gen)
    _, curve = dn.train_denoiser(train, heldout, 250, 32, 0, dn.probe_accelerator(0), 250, log=lambda _: None)
    loss, baseline = curve[-1]["loss"], dn.gaussian_baseline(dn.noise_scheduler())
    assert [c["step"] for c in curve] == [250]
    for t, value, best in zip(dn.TIMESTEPS, loss, baseline):
        # below the optimum by sampling noise only (the MSE of 65536 values: 0.55 % std); above it by what 250 steps
        # leave untrained
        assert best * 0.975 < value < best + 0.035, (t, value, best)


def metrics_without_timing(path) -> dict:
    metrics = json.loads(path.read_text())
    for r in (metrics, metrics.get("compare", {})):
        r.pop("timing_s", None)
        r.pop("wall_s", None)
    return metrics


@pytest.mark.slow
def test_probe_cli_with_compare_writes_metrics_and_report(tmp_path, models, monkeypatch, capsys, few_sampling_steps):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights there
    out = tmp_path / "probe"
    assert kl_ae(["probe", "--model", str(models[0]), "--compare", str(models[1]), "--out", str(out), *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["timesteps"] == dn.TIMESTEPS and len(metrics["gaussian_baseline"]) == 10
    for r, measured in ((metrics, True), (metrics["compare"], False)):
        assert r["latent_shape"] == [4, 8, 8] and r["num_train_latents"] == 12 * 8 and r["num_heldout_latents"] == 16
        assert [p["step"] for p in r["curve"]] == [2, 4]
        h = r["heldout_loss"]
        assert h["per_timestep"] == r["curve"][-1]["loss"] and len(h["ratio_to_gaussian"]) == 10
        assert h["mean"] == pytest.approx(sum(h["per_timestep"]) / 10)
        assert r["fid"]["available"] is False and "weights-inception" in r["fid"]["reason"]
        assert ("measured on the probe's training latents" in r["latents"]["source"]) is not measured
        # normalised training latents: unit std when measured here; the stored factors apply to the first model
        assert r["latents"]["train_std"] == pytest.approx(1.0, abs=1e-6) or measured
    assert metrics["latents"]["scaling_factor"] == 2.0 and metrics["latents"]["shift_factor"] == 0.1
    page = (out / "report.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert {"curve.png", "per_timestep.png", "samples_model.png", "samples_compare.png"} <= set(sources)
    assert all((out / src).is_file() for src in sources)
    assert "unavailable" in page and "compare" in capsys.readouterr().out


@pytest.mark.slow
def test_probe_is_reproducible(tmp_path, models, few_sampling_steps):
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert kl_ae(["probe", "--model", str(models[1]), "--out", str(out), *FAST]) == 0
    first, second = (metrics_without_timing(out / "metrics.json") for out in runs)
    for m in (first, second):  # the only difference: where each wrote its latents
        m["settings"].pop("out"), m["latents"].pop("encoded")
    assert first == second
    # re-running into the same folder reuses its latents and gives the same numbers again
    stamp = (runs[0] / "latents" / "model_train" / "latents_config.json").stat().st_mtime_ns
    assert kl_ae(["probe", "--model", str(models[1]), "--out", str(runs[0]), *FAST]) == 0
    assert (runs[0] / "latents" / "model_train" / "latents_config.json").stat().st_mtime_ns == stamp
    again = metrics_without_timing(runs[0] / "metrics.json")
    again["settings"].pop("out"), again["latents"].pop("encoded")
    assert again == first


@pytest.mark.slow
def test_probe_compare_with_itself_gives_identical_figures(tmp_path, models, monkeypatch, few_sampling_steps):
    """--compare is paired: the same crops, posterior noise, denoiser init, data order, training and held-out noise
    and sampling noise for both models, so a model compared with itself scores exactly the same."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights there
    out = tmp_path / "probe"
    assert kl_ae(["probe", "--model", str(models[0]), "--compare", str(models[0]), "--out", str(out), *FAST]) == 0
    metrics = metrics_without_timing(out / "metrics.json")
    compare = metrics.pop("compare")
    for r in (metrics, compare):  # where each wrote its latents and samples
        r["latents"].pop("encoded"), r.pop("samples")
    assert compare["heldout_loss"]["mean"] > 0 and {k: metrics[k] for k in compare} == compare
    assert (out / "samples_model.png").read_bytes() == (out / "samples_compare.png").read_bytes()


@pytest.mark.slow
def test_probe_without_data_probes_the_runs_own_data_and_held_out_split(tmp_path, monkeypatch, few_sampling_steps):
    """`kl-ae probe --model RUN`: the run's data.source, split as its trainer split it (a non-default val_fraction
    and the run's seed), so the held-out latents come from exactly the run's validation images."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    data = {"source": str(images), "resolution": 32, "resize": 32, "val_fraction": 0.05}
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "step_0000001"
    Autoencoder(tiny("tiny", sample_size=32)).save_pretrained(checkpoint / "autoencoder")
    (checkpoint / "trainer_state.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text(checkpoint.name)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": data, "train": {"seed": 3}}))
    out = tmp_path / "probe"
    args = ["probe", "--model", str(run), "--out", str(out), "--steps", "2", "--batch-size", "8", "--crops", "1"]
    assert kl_ae(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    validation = build_datasets(DataConfig(**data), seed=3)[1].paths()
    assert metrics["data"] == str(images) and len(validation) == 2  # 5 % of 40 (the default 10 % would hold out 4)
    held_out, _ = read_latents(out / "latents" / "model_val")
    assert sorted(set(held_out["path"])) == sorted(validation) and metrics["num_heldout_latents"] == 2 * 2
    assert metrics["num_train_latents"] == 38 * 2
    # a model outside a run folder has no data of its own
    Autoencoder(tiny("tiny", sample_size=32)).save_pretrained(tmp_path / "plain")
    assert kl_ae(["probe", "--model", str(tmp_path / "plain"), "--out", str(out)]) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps: must be >= 1"),
        (["--batch-size", "64"], "--batch-size: 64 is more than the 24 training latents"),
        (["--resolution", "30"], "--resolution: 30 is not a multiple"),
        (["--resize", "16", "--resolution", "32"], "--resize: must be >= the resolution 32"),
    ],
)
def test_probe_bad_values_are_one_line_errors(tmp_path, models, capsys, args, message):
    base = ["probe", "--model", str(models[0]), "--data", "sample", "--out", str(tmp_path / "p"), "--crops", "1"]
    if "--batch-size" in args:  # one crop and its mirror of each of the 12 training images
        base += ["--resolution", "32"]
    assert kl_ae([*base, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.slow
def test_probe_two_processes(tmp_path, models):
    out = tmp_path / "two"
    args = ["probe", "--model", str(models[0]), "--out", str(out), *FAST]
    launch_two_processes(args, module="kl_ae.commands.cli", env={"TORCH_HOME": str(tmp_path / "t")})
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["num_train_latents"] == 96 and metrics["num_heldout_latents"] == 16
    assert [p["step"] for p in metrics["curve"]] == [2, 4] and (out / "report.html").is_file()
