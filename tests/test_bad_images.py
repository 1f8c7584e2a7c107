"""Dirty folders: broken, odd-mode, too small and giant images never crash a run and are listed once."""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from kl_ae.common.config import DataConfig
from kl_ae.common.data import build_datasets
from kl_ae.common.images import read_skipped, to_rgb

# file -> the start of the reason it is skipped for ("" = any decoding error)
BAD = {
    "trunc.png": "OSError",
    "trunc.jpg": "OSError",
    "empty.png": "empty file",
    "text.jpg": "UnidentifiedImageError",
    "giant.png": "too large",
    "small.png": "too small",
}


def noise(h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8).squeeze()


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_claiming(w: int, h: int) -> bytes:
    """A valid 8x8 PNG whose header (IHDR) claims w x h pixels: a decompression bomb by its header."""
    data = bytearray(encoded(Image.new("RGB", (8, 8)), "PNG"))
    # after the 8-byte signature: length (8:12), "IHDR" (12:16), width and height (16:24), ..., CRC (29:33)
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def rotated_jpeg(w: int, h: int, colors=((255, 0, 0), (0, 0, 255))) -> bytes:
    """Left half colors[0], right half colors[1], stored with EXIF Orientation=6 (show rotated 90° cw)."""
    img = Image.new("RGB", (w, h), colors[1])
    img.paste(colors[0], (0, 0, w // 2, h))
    exif = img.getexif()
    exif[0x0112] = 6
    return encoded(img, "JPEG", exif=exif.tobytes(), quality=95)


def write_good(root: Path) -> None:
    """Usable photographs in every odd mode (shorter side >= 32)."""
    (root / "sub").mkdir(parents=True, exist_ok=True)
    Image.fromarray(noise(40, 56, 3, 1)).save(root / "rgb.png")
    Image.fromarray(noise(40, 48, 4, 2), "CMYK").save(root / "cmyk.jpg")
    Image.fromarray(noise(48, 40, 1, 3).astype(np.uint16) * 257).save(root / "gray16.png")  # I;16
    pal = Image.fromarray(noise(40, 40, 3, 4)).convert("P")
    pal.save(root / "palette_t.png", transparency=0)
    Image.fromarray(noise(40, 40, 2, 5), "LA").save(root / "la.png")
    Image.fromarray(noise(48, 40, 4, 6), "RGBA").save(root / "rgba.png")
    (root / "rotated.jpg").write_bytes(rotated_jpeg(64, 40))
    Image.fromarray(noise(40, 40, 1, 7)).save(root / "gray.jpg")
    Image.fromarray(noise(36, 44, 3, 8)).save(root / "sub" / "photo.JPEG")


def write_bad(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    png = encoded(Image.fromarray(noise(40, 40, 3, 9)), "PNG")
    jpg = encoded(Image.fromarray(noise(40, 40, 3, 10)), "JPEG")
    (root / "trunc.png").write_bytes(png[: len(png) // 2])
    (root / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("this is not a photograph\n")
    (root / "giant.png").write_bytes(png_claiming(100_000, 100_000))  # 1e10 pixels > max_pixels
    Image.fromarray(noise(20, 24, 3, 11)).save(root / "small.png")  # < resolution 32


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "dirty"
    write_good(root)
    write_bad(root)
    (root / "notes.txt").write_text("ignored: not an image suffix")
    (root / "sub" / "Thumbs.db").write_bytes(b"\0" * 16)
    return root


def dirty_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(source=str(root), resolution=32, small_images="skip", val_fraction=0.2, batch_size=4, **kw)


def build_with_usable_val(cfg: DataConfig):
    """`build_datasets` with the first seed whose single held-out file is usable: tests of skipping
    in the training split must not depend on where the split puts a bad file."""
    for seed in range(20):
        try:
            return build_datasets(cfg, seed)
        except ValueError as e:
            if "no usable image in val" not in str(e):
                raise
    raise AssertionError("no seed holds out a usable file")


def check_batch(x: torch.Tensor) -> None:
    assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dirty_folder_two_epochs(corpus, tmp_path, num_workers):
    train, val = build_datasets(dirty_cfg(corpus), seed=0)
    bad = {str(corpus / name) for name in BAD}
    listed = set(train.paths()) | set(val.paths())
    assert len(listed) == 15 and bad <= listed and not any(p.endswith((".txt", ".db")) for p in listed)
    bad_train = bad & set(train.paths())
    assert bad_train and bad - bad_train  # this seed puts bad files in both splits
    log = tmp_path / "skipped.txt"
    train.skip_log = val.skip_log = log
    lines = []
    for epoch in range(2):
        train.set_epoch(epoch)
        dl = DataLoader(train, batch_size=4, shuffle=True, num_workers=num_workers, generator=torch.Generator())
        seen = 0
        for x in dl:
            check_batch(x)
            seen += len(x)
        assert seen == len(train)
        lines.append(log.read_text().splitlines())
        assert set(read_skipped(log)) == bad_train
    assert lines[1] == lines[0]  # the second epoch tried (and listed) nothing again
    if num_workers == 0:
        assert len(lines[0]) == len(bad_train)  # each bad file listed exactly once
    for x in DataLoader(val, batch_size=4, num_workers=num_workers):
        check_batch(x)
    skipped = read_skipped(log)
    assert set(skipped) == bad  # exactly the bad files, whichever split they fell in
    for name, reason in BAD.items():
        assert skipped[str(corpus / name)].startswith(reason), (name, skipped[str(corpus / name)])


def test_substitutes_are_deterministic(corpus, tmp_path):
    cfg = dirty_cfg(corpus, repeats=2)
    train, _ = build_datasets(cfg, seed=0)
    first = torch.stack([train[i] for i in range(len(train))])  # finds the bad files
    assert torch.equal(first, torch.stack([train[i] for i in range(len(train))]))  # knows them now
    # skips found before skip_log is set are written when it is set
    train.skip_log = tmp_path / "skipped.txt"
    assert set(read_skipped(train.skip_log)) == {p for p in train.paths() if Path(p).name in BAD}
    # a fresh dataset that reads them from the log goes straight to the substitutes: same tensors
    fresh, _ = build_datasets(cfg, seed=0)
    fresh.skip_log = train.skip_log
    workers = DataLoader(fresh, batch_size=5, num_workers=2)
    assert torch.equal(first, torch.cat(list(workers)))
    assert len(train.skip_log.read_text().splitlines()) == len(train.bad)  # nothing listed twice
    # the substitute for a bad row is the next usable row
    flat, _ = build_datasets(DataConfig(**{**vars(cfg), "random_crop": False, "hflip": False}), seed=0)
    paths = flat.paths()
    for i, p in enumerate(paths):
        if Path(p).name in BAD:
            j = next(k % len(paths) for k in range(i, i + len(paths)) if Path(paths[k % len(paths)]).name not in BAD)
            assert torch.equal(flat[i], flat[j])


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda: encoded(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG"), (255, 255, 255)),
        (lambda: encoded(Image.new("CMYK", (4, 4), (0, 0, 0, 255)), "JPEG"), (0, 0, 0)),
        (lambda: encoded(Image.fromarray(np.full((4, 4), 65535, np.uint16)), "PNG"), (255, 255, 255)),
        (lambda: encoded(Image.fromarray(np.full((4, 4), 100 * 257, np.uint16)), "PNG"), (100, 100, 100)),
        (lambda: encoded(Image.fromarray(np.full((4, 4), 200, np.uint16)), "PNG"), (1, 1, 1)),  # dark stays dark
        (lambda: encoded(Image.new("P", (4, 4), 0), "PNG", transparency=0), (255, 255, 255)),
        (lambda: encoded(Image.new("LA", (4, 4), (0, 0)), "PNG"), (255, 255, 255)),
        (lambda: encoded(Image.new("LA", (4, 4), (100, 255)), "PNG"), (100, 100, 100)),
        (lambda: encoded(Image.new("RGBA", (4, 4), (10, 20, 30, 0)), "PNG"), (255, 255, 255)),
        (lambda: encoded(Image.new("RGBA", (4, 4), (10, 20, 30, 255)), "PNG"), (10, 20, 30)),
        (lambda: encoded(Image.new("L", (4, 4), 77), "PNG"), (77, 77, 77)),
    ],
    ids=["cmyk-white", "cmyk-black", "i16-max", "i16-mid", "i16-dark", "p-transparent", "la-clear", "la-opaque",
         "rgba-clear", "rgba-opaque", "gray"],
)  # fmt: skip
def test_odd_modes_become_rgb(make, expected):
    with Image.open(io.BytesIO(make())) as img:
        out = to_rgb(img)
    assert out.mode == "RGB" and out.getpixel((1, 1)) == expected


def test_transparent_images_are_white(tmp_path):
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("LA", (40, 40), (0, 0)).save(tmp_path / "clear_la.png")
    for ds in build_datasets(DataConfig(source=str(tmp_path), resolution=32), seed=0):
        assert torch.equal(ds[0], torch.ones(3, 32, 32))


def test_exif_orientation_is_applied(tmp_path):
    # stored 64x32, left red and right blue; shown rotated 90° clockwise: 32x64, top red, bottom blue
    (tmp_path / "rotated.jpg").write_bytes(rotated_jpeg(64, 32))
    Image.new("RGB", (32, 32)).save(tmp_path / "plain.png")
    cfg = DataConfig(source=str(tmp_path), resolution=32, random_crop=False, hflip=False)
    ds = next(d for d in build_datasets(cfg, seed=0) if d.paths()[0].endswith("rotated.jpg"))
    x = ds.load(0)  # (3, H, W) uint8 before cropping
    assert x.shape == (3, 64, 32)
    top, bottom = x[:, :24].float().mean((1, 2)), x[:, -24:].float().mean((1, 2))
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50


def test_small_images(tmp_path):
    # "smaller than the crop" is about the original shorter side against resolution, not resize
    Image.fromarray(noise(20, 24, 3)).save(tmp_path / "tiny.png")  # < resolution: upscaled or skipped
    Image.fromarray(noise(40, 40, 3)).save(tmp_path / "mid.png")  # >= resolution, < resize: always kept
    Image.fromarray(noise(80, 80, 3)).save(tmp_path / "big.png")
    base = dict(source=str(tmp_path), resolution=32, resize=64, val_fraction=0.0)
    for policy, skipped in (("upscale", set()), ("skip", {"tiny.png"})):
        train, val = build_with_usable_val(DataConfig(**base, small_images=policy))
        for ds in (train, val):
            ds.skip_log = tmp_path / f"{policy}.txt"
            for i in range(len(ds)):
                assert ds[i].shape == (3, 32, 32)
        assert {Path(p).name for p in read_skipped(tmp_path / f"{policy}.txt")} == skipped


def test_pixel_cap_is_ours_not_pils(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL would refuse 40x40 (> 2x100) by itself
    Image.fromarray(noise(40, 40, 3)).save(tmp_path / "a.png")
    Image.fromarray(noise(40, 40, 3)).save(tmp_path / "b.png")
    (tmp_path / "giant.png").write_bytes(png_claiming(20_000, 20_000))  # 4e8 > max_pixels, never decoded
    train, val = build_with_usable_val(DataConfig(source=str(tmp_path), resolution=32, val_fraction=0.0))
    for ds in (train, val):
        ds.skip_log = tmp_path / "skipped.txt"
        for i in range(len(ds)):
            check_batch(ds[i][None])
    assert read_skipped(tmp_path / "skipped.txt") == {
        str(tmp_path / "giant.png"): "too large: 20000x20000 = 400000000 pixels > data.max_pixels=178956970"
    }
    assert Image.MAX_IMAGE_PIXELS == 100  # lifted only while we decode
    with pytest.raises(ValueError, match=r"no usable image in train .*too large"):
        build_datasets(DataConfig(source=str(tmp_path), resolution=32, max_pixels=1000), seed=0)


def test_no_usable_image_is_a_clear_error_before_training(tmp_path):
    write_bad(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"^data\.source: no usable image in train of .*bad \(5 files tried: "):
        build_datasets(dirty_cfg(tmp_path / "bad"), seed=0)
    # one good and one bad file: whichever split gets the bad one has no usable image
    (tmp_path / "pair").mkdir()
    Image.fromarray(noise(40, 40, 3)).save(tmp_path / "pair" / "good.png")
    (tmp_path / "pair" / "text.jpg").write_text("not a photograph")
    splits = set()
    for seed in range(8):
        with pytest.raises(ValueError, match=r"no usable image in (train|val) of .*text\.jpg: Unidentified") as e:
            build_datasets(DataConfig(source=str(tmp_path / "pair"), resolution=32), seed=seed)
        splits.add(re.search(r"in (\w+) of", str(e.value))[1])
    assert splits == {"train", "val"}


def test_every_image_going_bad_mid_run_raises_clearly(tmp_path):
    Image.fromarray(noise(40, 40, 3)).save(tmp_path / "a.png")
    Image.fromarray(noise(40, 40, 3)).save(tmp_path / "b.png")
    train, _ = build_datasets(DataConfig(source=str(tmp_path), resolution=32), seed=0)
    for p in tmp_path.glob("*.png"):
        p.write_bytes(b"gone bad")
    train.cache.clear()  # the check in build_datasets cached the first image
    with pytest.raises(RuntimeError, match=re.escape("every image of the training split (1) is unusable")):
        train[0]


def test_read_skipped_without_a_log(tmp_path):
    assert read_skipped(tmp_path / "missing.txt") == {}
    (tmp_path / "log.txt").write_text("a.png\tOSError: x\nb.png\ttoo small\na.png\tother\n")
    assert read_skipped(tmp_path / "log.txt") == {"a.png": "OSError: x", "b.png": "too small"}
