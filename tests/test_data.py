"""Data sources: the bundled sample set, local folders, transforms and config validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kl_ae.common.config import DataConfig
from kl_ae.common.data import build_datasets, load_images
from kl_ae.common.images import SAMPLE_TRAIN, SAMPLE_VAL, list_sample_images, to_rgb


@pytest.fixture
def folder(tmp_path) -> Path:
    """Seven small images in nested folders, in the modes real folders contain."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    (root / "a" / "b").mkdir(parents=True)
    (root / "c").mkdir()

    def noise(h: int, w: int, c: int) -> np.ndarray:
        return rng.integers(0, 256, (h, w, c), dtype=np.uint8).squeeze()

    Image.fromarray(noise(40, 60, 3)).save(root / "rgb.png")
    Image.fromarray(noise(48, 48, 3)).save(root / "a" / "photo.JPG")
    Image.fromarray(noise(50, 40, 4), "RGBA").save(root / "a" / "b" / "alpha.png")
    Image.fromarray(noise(36, 36, 1)).save(root / "c" / "gray.png")
    Image.fromarray(noise(64, 32, 3)).convert("P").save(root / "c" / "palette.png")
    Image.fromarray(noise(40, 40, 3)).save(root / "c" / "pic.webp")
    Image.fromarray(noise(40, 40, 3)).save(root / "c" / "pic.tiff")
    (root / "c" / "notes.txt").write_text("not an image")
    return root


def test_sample_split_is_fixed_and_disjoint():
    train, val = build_datasets(DataConfig(resolution=64), seed=0)
    assert len(train) == len(SAMPLE_TRAIN) == 12 and len(val) == len(SAMPLE_VAL) == 2
    train_names = {Path(p).name for p in train.paths()}
    val_names = {Path(p).name for p in val.paths()}
    assert val_names == {"coffee.png", "rocket.jpg"} and not train_names & val_names
    assert "motorcycle_right.png" not in train_names
    # the split does not depend on the seed, and every listed file exists
    assert {Path(p).name for p in build_datasets(DataConfig(), seed=7)[1].paths()} == val_names
    assert len(list_sample_images()) == 14 and all(p.is_file() for p in list_sample_images())


def test_sample_tensors_and_repeats():
    train, val = build_datasets(DataConfig(resolution=64, repeats=3), seed=0)
    assert len(train) == 36 and len(val) == 2
    for ds in (train, val):
        for i in range(len(ds.table)):
            x = ds[i]
            assert x.shape == (3, 64, 64) and x.dtype == torch.float32
            assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.01
    # grayscale photos become three equal channels
    cam = train[SAMPLE_TRAIN.index("camera.png")]
    assert torch.equal(cam[0], cam[1]) and torch.equal(cam[1], cam[2])


def test_augmentation_depends_on_seed_epoch_and_index_only():
    cfg = DataConfig(resolution=64, resize=128, repeats=8)
    train, val = build_datasets(cfg, seed=0)
    n = len(train) // 8  # the 8 visits of image 0 are indices 0, n, 2n, ...

    def draw(dataset, epoch: int) -> torch.Tensor:
        dataset.set_epoch(epoch)
        return torch.stack([dataset[k * n] for k in range(8)])

    a = draw(train, 0)
    torch.manual_seed(123)  # the global RNG plays no part: resume and prefetching cannot shift crops
    assert torch.equal(a, draw(train, 0))
    assert torch.equal(a, draw(build_datasets(cfg, seed=0)[0], 0))
    assert not torch.equal(a, draw(train, 1))  # a new epoch, new crops
    assert not torch.equal(a, draw(build_datasets(cfg, seed=1)[0], 0))  # a new seed, new crops
    assert not torch.equal(a[0], a[1])  # each visit of an image gets its own crop/flip
    # validation is deterministic: center crop, no flip
    v1 = val[0]
    val.set_epoch(5)
    assert torch.equal(v1, val[0])


def test_center_crop_without_flip_is_deterministic():
    train, _ = build_datasets(DataConfig(resolution=32, random_crop=False, hflip=False, repeats=2), seed=0)
    n = len(train) // 2
    assert torch.equal(train[1], train[1 + n])
    train.set_epoch(1)
    assert torch.equal(train[1], train[1 + n])


def test_hflip_happens():
    train, _ = build_datasets(DataConfig(resolution=32, random_crop=False, hflip=True, repeats=16), seed=0)
    n = len(train) // 16
    draws = [train[k * n] for k in range(16)]
    flipped = [torch.equal(d, draws[0].flip(-1)) for d in draws]
    assert any(flipped) and not all(flipped)


def test_folder_source(folder):
    cfg = DataConfig(source=str(folder), resolution=32, val_fraction=0.3)
    train, val = build_datasets(cfg, seed=0)
    assert len(train) + len(val) == 7 and len(val) == 2
    names = {Path(p).name for p in train.paths() + val.paths()}
    assert names == {"rgb.png", "photo.JPG", "alpha.png", "gray.png", "palette.png", "pic.webp", "pic.tiff"}
    assert not set(train.paths()) & set(val.paths())
    for ds in (train, val):
        for i in range(len(ds)):
            x = ds[i]
            assert x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1
    # the split is a function of the seed
    assert val.paths() == build_datasets(cfg, seed=0)[1].paths()
    splits = {tuple(build_datasets(cfg, seed=s)[1].paths()) for s in range(6)}
    assert len(splits) > 1
    # val_max caps the held-out set; at least one image is always held out
    assert len(build_datasets(DataConfig(source=str(folder), val_fraction=0.9, val_max=1), 0)[1]) == 1
    assert len(build_datasets(DataConfig(source=str(folder), val_fraction=0.0), 0)[1]) == 1


def test_to_rgb(tmp_path):
    # EXIF orientation 6 (rotate 90): a 40x20 JPEG is shown as 20x40
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    with Image.open(tmp_path / "rotated.jpg") as f:
        assert to_rgb(f).size == (20, 40)
    # alpha, palette transparency and 16-bit grayscale
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (4, 4), 0)
    pal.info["transparency"] = 0
    assert to_rgb(pal).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("I;16", (2, 2), 65535)).getpixel((0, 0)) == (255, 255, 255)


def test_empty_missing_and_bad_sources(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.md").write_text("no images")
    with pytest.raises(ValueError, match="data.source: no images found in"):
        build_datasets(DataConfig(source=str(tmp_path / "empty")), seed=0)
    with pytest.raises(FileNotFoundError, match="data.source"):
        build_datasets(DataConfig(source=str(tmp_path / "missing")), seed=0)
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (8, 8)).save(one / "x.png")
    with pytest.raises(ValueError, match="at least 2 images"):
        build_datasets(DataConfig(source=str(one)), seed=0)


def test_unreadable_file_is_skipped(folder, caplog):
    (folder / "broken.png").write_bytes(b"not a png")
    train, val = build_datasets(DataConfig(source=str(folder), resolution=16, val_fraction=0.0), seed=0)
    ds = train if any(p.endswith("broken.png") for p in train.paths()) else val
    with caplog.at_level("WARNING", logger="kl_ae.common.data"):
        xs = [ds[i] for i in range(len(ds))]
    assert all(x.shape == (3, 16, 16) for x in xs)
    assert "broken.png" in caplog.text


@pytest.mark.parametrize(
    "key,value",
    [
        ("source", ""),
        ("resolution", 0),
        ("resize", 32),
        ("val_fraction", 1.0),
        ("val_fraction", -0.1),
        ("val_max", 0),
        ("batch_size", 0),
        ("num_workers", -1),
        ("repeats", 0),
        ("image_column", ""),
        ("hub_split", ""),
        ("small_images", "crop"),
        ("max_pixels", 0),
    ],
)
def test_validate_rejects(key, value):
    cfg = DataConfig(**{"resolution": 64, key: value})
    with pytest.raises(ValueError, match=f"data.{key}"):
        cfg.validate()


def test_defaults_validate():
    DataConfig().validate()
    DataConfig(resize=None, resolution=8).validate()


def test_hub_source_without_network(monkeypatch):
    """The hub path with `load_dataset` replaced by an in-memory dataset of encoded images."""
    import io

    import datasets

    def encoded(color: tuple[int, int, int]) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), color).save(buf, format="PNG")
        return buf.getvalue()

    rows = {"img": [{"bytes": encoded((i * 20, 0, 0)), "path": None} for i in range(10)], "label": list(range(10))}
    table = datasets.Dataset.from_dict(rows).cast_column("img", datasets.Image())
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: calls.append((name, split)) or table)
    cfg = DataConfig(source="someone/photos", image_column="img", hub_split="train", resolution=16)
    train, val = build_datasets(cfg, seed=0)
    assert calls == [("someone/photos", "train")] and (len(train), len(val)) == (9, 1)
    assert train[0].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="data.image_column"):
        build_datasets(DataConfig(source="someone/photos"), seed=0)

    def offline(name, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="could not be loaded from the Hugging Face hub"):
        build_datasets(cfg, seed=0)


@pytest.mark.parametrize("split", ["val", "train"])
def test_fixed_split_of_a_run_is_the_trainers_split(tmp_path, split):
    """`load_images(..., folder_split=True)` (probe, encode --split) with the run's data section: the run's
    non-default val_fraction holds out 2 of 40 images, exactly the trainer's validation images (default: 4)."""
    for i in range(40):
        Image.fromarray(np.full((16, 16, 3), i, np.uint8)).save(tmp_path / f"{i:02d}.png")
    run_data = DataConfig(source=str(tmp_path), resolution=8, val_fraction=0.05)
    trainer = build_datasets(run_data, seed=3)[0 if split == "train" else 1]
    images = load_images(str(tmp_path), 8, split, 8, seed=3, folder_split=True, run_data=run_data)
    assert len(trainer.paths()) == (2 if split == "val" else 38)
    assert [v["path"] for v in images.table[images.column]] == trainer.paths()
