"""Data, evaluation and pictures beyond 8-bit RGB: 16-bit files kept whole, channel mismatches, per-channel and RGBA
metrics against hand computations, the measured value range, and `kl-ae eval` of a run without `--data`."""

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from PIL import Image

from kl_ae.commands.cli import main as kl_ae
from kl_ae.common.channels import to_model, to_stored, value_mapping
from kl_ae.common.config import ConfigError, DataConfig
from kl_ae.common.data import build_datasets, load_images, read_skipped
from kl_ae.common.images import path_of, to_rgb
from kl_ae.common.metrics import reconstruction_metrics
from kl_ae.common.stored import read_stored, write_stored
from kl_ae.common.views import display
from kl_autoencoder import Autoencoder

from .conftest import tiny

SIDE = 32


def gray16(seed: int, lo: int = 0, hi: int = 65535, pair: bool = True) -> np.ndarray:
    """A smooth 16-bit image (SIDE, SIDE) in [lo, hi]; with `pair`, pixels (0, 0) and (0, 1) are 1000 and 1001,
    which an 8-bit reader merges (both 4 of 255)."""
    rng = np.random.default_rng(seed)
    low = rng.integers(lo, hi, (5, 5)).astype(np.float32)
    arr = np.asarray(Image.fromarray(low).resize((SIDE, SIDE), Image.BICUBIC)).clip(lo, hi).astype(np.uint16)
    if pair:
        arr[0, :2] = (1000, 1001)
    return arr


def save_png16(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)  # uint16 (H, W): mode I;16
    return path


def run_folder(tmp: Path, data: dict, channels: int, seed: int = 3) -> Path:
    """A run folder (config.yaml, one checkpoint of a tiny random model of `channels`) without training it."""
    run = tmp / "run"
    checkpoint = run / "checkpoints" / "step_0000001"
    torch.manual_seed(0)
    model = Autoencoder(tiny("tiny", sample_size=SIDE, in_channels=channels, out_channels=channels))
    model.save_pretrained(checkpoint / "autoencoder")
    (checkpoint / "trainer_state.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text(checkpoint.name)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": data, "train": {"seed": seed}}))
    return run


def identity_codec(monkeypatch):
    """`kl-ae reconstruct` with a perfect autoencoder: what comes out is the reader, the mapping and the writer."""
    monkeypatch.setattr("eval.reconstruct.codec", lambda ae, x, tile: x)


# ----------------------------------------------------------------------------- 16-bit kept whole


@pytest.mark.parametrize("kind", ["png", "tiff"])
def test_16bit_round_trip_loses_nothing(tmp_path, monkeypatch, kind):
    folder = tmp_path / "data"
    folder.mkdir()
    arrays = [gray16(i) for i in range(3)]
    for i, arr in enumerate(arrays):
        if kind == "png":
            save_png16(folder / f"{i}.png", arr)
        else:
            tifffile.imwrite(folder / f"{i}.tif", arr)
    first = sorted(folder.iterdir())[0]
    # our reader, the mapping to [-1, 1] and its inverse, and the writer: every value comes back
    stored = read_stored(str(first), 10**9)
    assert stored.dtype == np.uint16 and np.array_equal(stored[..., 0], arrays[0])
    mapping = value_mapping(DataConfig(source=str(folder), channels=1), seed=0)
    assert (mapping["dtype"], mapping["bit_depth"], mapping["high"]) == ("uint16", 16, [65535.0])
    x = torch.from_numpy(to_model(stored, mapping)).permute(2, 0, 1)  # (1, H, W) in [-1, 1]
    assert np.array_equal(to_stored(x, mapping), stored)
    written = write_stored(tmp_path / "out.png", to_stored(x, mapping))
    assert np.array_equal(read_stored(str(written), 10**9), stored)
    # `kl-ae reconstruct` with a perfect autoencoder writes a 16-bit PNG of the same values
    model = tiny("tiny", sample_size=SIDE, in_channels=1, out_channels=1)
    Autoencoder(model).save_pretrained(tmp_path / "gray_model")
    identity_codec(monkeypatch)
    out = tmp_path / "recon.png"
    assert kl_ae(["reconstruct", str(first), "--model", str(tmp_path / "gray_model"), "--out", str(out)]) == 0
    with Image.open(out) as img:
        assert img.mode == "I;16" and np.array_equal(np.asarray(img), arrays[0])
    # the training data keeps values an 8-bit reader merges: pixels (0, 0) and (0, 1), 1000 and 1001
    cfg = DataConfig(source=str(folder), channels=1, resolution=SIDE, random_crop=False, hflip=False, val_fraction=0.3)
    train, val = build_datasets(cfg, seed=0)
    item = train[train.paths().index(str(first))] if str(first) in train.paths() else val[0]
    expected = torch.tensor([1000, 1001]) / 65535 * 2 - 1
    assert item.shape == (1, SIDE, SIDE) and torch.allclose(item[0, 0, :2], expected, atol=1e-7)
    assert item[0, 0, 0] != item[0, 0, 1]
    with Image.open(first) as img:
        eight = np.asarray(to_rgb(img))
    assert eight[0, 0, 0] == eight[0, 1, 0]  # what the 8-bit RGB path makes of the same two pixels
    images = load_images(str(folder), 1, channels=1)  # eval's fixed set: no 8-bit step on the way to the metrics
    assert torch.equal(images[0][0], torch.from_numpy(to_model(stored, mapping)[..., 0]))


def test_16bit_colour_png_and_reconstruct_formats(tmp_path, monkeypatch):
    """16-bit RGB PNGs (which PIL cuts to 8 bits) read whole through pypng; `kl-ae reconstruct` writes RGBA PNGs for
    RGBA and a multi-band TIFF plus a false-colour PNG for 6 bands, values equal through a perfect autoencoder."""
    png = pytest.importorskip("png")
    rgb16 = np.stack([gray16(i) for i in range(3)], -1)  # (H, W, 3) uint16
    with open(tmp_path / "rgb16.png", "wb") as f:
        png.Writer(SIDE, SIDE, greyscale=False, bitdepth=16).write(f, rgb16.reshape(SIDE, -1))
    assert np.array_equal(read_stored(str(tmp_path / "rgb16.png"), 10**9), rgb16)
    rgba = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    bands = np.stack([gray16(i) for i in range(6)])  # (6, H, W): bands first, as many GeoTIFFs store them
    tifffile.imwrite(tmp_path / "bands.tif", bands, photometric="minisblack", planarconfig="separate")
    identity_codec(monkeypatch)
    for name, channels, expected in (("rgba.png", 4, rgba), ("bands.tif", 6, np.moveaxis(bands, 0, -1))):
        model = tmp_path / f"model{channels}"
        Autoencoder(tiny("tiny", sample_size=SIDE, in_channels=channels, out_channels=channels)).save_pretrained(model)
        out = tmp_path / f"recon{channels}.png"
        assert kl_ae(["reconstruct", str(tmp_path / name), "--model", str(model), "--out", str(out)]) == 0
        if channels == 4:
            with Image.open(out) as img:
                assert img.mode == "RGBA" and np.array_equal(np.asarray(img), expected)
        else:
            assert np.array_equal(tifffile.imread(out.with_suffix(".tif")), expected)
            with Image.open(out) as img:  # the preview: bands 0, 1, 2 in 8 bits
                preview = np.asarray(img)
            assert img.mode == "RGB" and np.abs(preview.astype(int) - expected[..., :3] / 257).max() <= 1


# ----------------------------------------------------------------------------- mismatches


@pytest.fixture
def mixed(tmp_path) -> Path:
    """A 1-channel 16-bit set with an 8-bit RGB file and an 8-bit grayscale file among its files."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(4):
        save_png16(folder / f"{i}.png", gray16(i))
    Image.fromarray(np.zeros((SIDE, SIDE, 3), np.uint8)).save(folder / "1_rgb.png")
    Image.fromarray(np.zeros((SIDE, SIDE), np.uint8)).save(folder / "2_gray8.png")
    return folder


def test_channel_mismatches_are_skipped_and_listed_or_one_error(tmp_path, mixed):
    (tmp_path / "val").mkdir()
    save_png16(tmp_path / "val" / "v.png", gray16(7))  # a validation set of its own: every mixed file trains
    cfg = DataConfig(source=str(mixed), channels=1, resolution=SIDE, val_source=str(tmp_path / "val"))
    train, _ = build_datasets(cfg, seed=0)
    train.skip_log = log = tmp_path / "skipped.txt"
    assert all(train[i].shape == (1, SIDE, SIDE) for i in range(len(train)))
    skipped = read_skipped(log)
    assert {Path(p).name for p in skipped} == {"1_rgb.png", "2_gray8.png"}
    assert "3 channels of uint8" in skipped[str(mixed / "1_rgb.png")]
    assert "1 channel of uint8" in skipped[str(mixed / "2_gray8.png")]  # the bit depth, not the channels
    with pytest.raises(ConfigError) as e:
        build_datasets(DataConfig(**{**vars(cfg), "channel_mismatch": "error"}), seed=0)
    message = str(e.value)
    assert "\n" not in message and message.startswith("data.channel_mismatch=error: ")
    assert str(mixed / "1_rgb.png") in message and "1 of uint16" in message


# ----------------------------------------------------------------------------- metrics by hand


def hand_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


def test_per_channel_and_rgba_psnr_against_a_hand_computation():
    from eval.channels import channel_row, channel_summary

    rng = np.random.default_rng(0)
    a = rng.random((2, 4, 8, 8))
    b = (a + rng.normal(0, [0.01, 0.02, 0.05, 0.1], (2, 8, 8, 4)).transpose(0, 3, 1, 2)).clip(0, 1)
    row = channel_row(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    per_channel = [[hand_psnr(a[i, c], b[i, c]) for c in range(4)] for i in range(2)]
    assert np.allclose(row["psnr_channels"].numpy(), per_channel, atol=1e-3)
    assert np.allclose(channel_summary(row)["psnr_per_channel"], np.mean(per_channel, 0), atol=1e-3)
    composite = lambda t: t[:, :3] * t[:, 3:] + 0.5 * (1 - t[:, 3:])  # noqa: E731 (over mid-grey)
    assert np.allclose(row["psnr_alpha"].numpy(), [hand_psnr(a[i, 3], b[i, 3]) for i in range(2)], atol=1e-3)
    expected = [hand_psnr(composite(a)[i], composite(b)[i]) for i in range(2)]
    assert np.allclose(row["psnr_composite"].numpy(), expected, atol=1e-3)
    metrics = reconstruction_metrics(torch.from_numpy(a * 2 - 1).float(), torch.from_numpy(b * 2 - 1).float())
    assert np.allclose(metrics["psnr_alpha"].numpy(), row["psnr_alpha"].numpy(), atol=1e-4)
    # pictures: alpha over a checkerboard, one channel in gray, N bands as the first three
    clear = torch.tensor([1.0, 0, 0, 0]).view(1, 4, 1, 1).expand(1, 4, 16, 16)  # red, fully transparent
    assert display(clear).unique().tolist() == pytest.approx([0.6, 0.8])  # the checkerboard alone
    gray = torch.rand(1, 1, 4, 4)
    assert torch.equal(display(gray), gray.expand(-1, 3, -1, -1))
    six = torch.rand(1, 6, 4, 4)
    assert torch.equal(display(six), six[:, :3]) and torch.equal(display(six, [5, 4, 3]), six[:, [5, 4, 3]])


# ----------------------------------------------------------------------------- the measured range


def test_measured_range_comes_from_the_training_split_and_inverts_exactly(tmp_path):
    folder = tmp_path / "ct"
    folder.mkdir()
    for i in range(8):
        save_png16(folder / f"{i}.png", gray16(i, lo=2000, hi=3000, pair=False))
    cfg = DataConfig(source=str(folder), channels=1, value_range="measured", resolution=SIDE, val_fraction=0.25)
    train, val = build_datasets(cfg, seed=0)
    for path in val.paths():  # held-out files far outside the training range: they must not move it
        save_png16(Path(path), gray16(9, lo=40000, hi=60000, pair=False))
    mapping = value_mapping(cfg, seed=0)
    pixels = np.concatenate([read_stored(p, 10**9).ravel() for p in train.paths()]).astype(np.float64)
    assert np.allclose([mapping["low"][0], mapping["high"][0]], np.percentile(pixels, [0.1, 99.9]))
    assert mapping["value_range"] == "measured" and mapping["measured_on"]["split"] == "train"
    assert build_datasets(cfg, seed=0)[0].mapping == mapping  # what the trainer records is what it trains on
    inside = pixels[(pixels >= mapping["low"][0]) & (pixels <= mapping["high"][0])].astype(np.uint16)
    stored = inside.reshape(1, -1, 1)
    x = torch.from_numpy(to_model(stored, mapping)).permute(2, 0, 1)
    assert np.array_equal(to_stored(x, mapping), stored)  # every value in the range comes back exactly


@pytest.mark.slow
def test_measured_range_is_recorded_in_the_run_and_the_export(tmp_path):
    from .conftest import run

    folder = tmp_path / "ct"
    folder.mkdir()
    for i in range(6):
        save_png16(folder / f"{i}.png", gray16(i, lo=2000, hi=3000, pair=False))
    out = tmp_path / "run"
    run(out, 1, f"data.source={folder}", "data.channels=1", "data.value_range=measured", "data.repeats=1")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    recorded = json.loads((out / "value_mapping.json").read_text())
    assert recorded == value_mapping(DataConfig(**saved["data"]), seed=saved["train"]["seed"])
    assert 2000 <= recorded["low"][0] < recorded["high"][0] <= 3000
    assert kl_ae(["export", str(out), "--out", str(tmp_path / "export")]) == 0
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["_kl_ae_export"]["value_mapping"] == recorded
    assert "## Data values" in (tmp_path / "export" / "README.md").read_text()


# ----------------------------------------------------------------------------- eval of a run without --data


def test_eval_of_a_run_without_data_uses_its_held_out_split(tmp_path):
    from eval.evaluate import EvalConfig, eval_images, load_models

    folder = tmp_path / "layers"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 4), dtype=np.uint8), "RGBA").save(folder / f"{i}.png")
    data = {"source": str(folder), "resolution": SIDE, "val_fraction": 0.2, "channels": 4}
    run = run_folder(tmp_path, data, channels=4)
    held_out = build_datasets(DataConfig(**data), seed=3)[1].paths()
    assert len(held_out) == 2 and held_out != build_datasets(DataConfig(**data), seed=0)[1].paths()
    cfg = EvalConfig(model=str(run), data=None, lpips="off")
    images, split = eval_images(cfg, load_models(cfg))
    assert [path_of(v) for v in images.table[images.column]] == held_out and split["split_seed"] == 3
    out = tmp_path / "eval"
    assert kl_ae(["eval", "--model", str(run), "--out", str(out), "--lpips", "off"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rec = metrics["reconstruction"]
    assert metrics["num_images"] == 2 and metrics["data"] == str(folder)
    assert len(rec["psnr_per_channel"]) == 4 and {"psnr_alpha", "psnr_composite"} <= rec.keys()
    assert metrics["value_mapping"]["channels"] == 4 and "255" in metrics["psnr_peak"]
