"""Data sets beyond 8-bit RGB made from the photographs bundled with scikit-image, and the 16-bit score of
BENCHMARKS.md sections 22 and 23.

    python benchmarks/channel_sets.py make OUT          # OUT/rgba/{train,val}, OUT/gray16/{train,val}, OUT/gray8/...
    python benchmarks/channel_sets.py score16 RUN16 RUN8 OUT   # held-out PSNR at the 16-bit peak of both runs

- rgba: the photos (shorter side 128 px) with a soft elliptical alpha matte each, seeded by the file name.
- gray16: the photos in gray, resized in floating point and stored in 12 bits (0..4095) of a 16-bit PNG, as CT and
  X-ray detectors write them; gray8: the same images as an 8-bit reader leaves them (rescaled by 255 / 65535 and
  rounded: 17 grey levels).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kl_ae.common.images import SAMPLE_TRAIN, SAMPLE_VAL, sample_dir, to_rgb

SIZE = 128


def photo(name: str) -> np.ndarray:
    """float32 (H, W, 3) in [0, 255], shorter side SIZE, resized in floating point."""
    img = to_rgb(Image.open(sample_dir() / name))
    scale = SIZE / min(img.size)
    size = (round(img.width * scale), round(img.height * scale))
    channels = [np.asarray(Image.fromarray(np.asarray(img)[..., c]).convert("F").resize(size, Image.BICUBIC))
                for c in range(3)]  # fmt: skip
    return np.clip(np.stack(channels, -1), 0, 255)


def matte(shape: tuple[int, int], name: str) -> np.ndarray:
    """A soft ellipse of random centre, radii and edge width, uint8 (H, W)."""
    g = np.random.default_rng(sum(map(ord, name)))
    h, w = shape
    cy, cx = g.uniform(0.3, 0.7) * h, g.uniform(0.3, 0.7) * w
    ry, rx = g.uniform(0.2, 0.45) * h, g.uniform(0.2, 0.45) * w
    y, x = np.mgrid[:h, :w]
    r = np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)
    return (np.clip((1.2 - r) / 0.4, 0, 1) * 255).round().astype(np.uint8)


def make(out: Path) -> None:
    for split, names in (("train", SAMPLE_TRAIN), ("val", SAMPLE_VAL)):
        for kind in ("rgba", "gray16", "gray8"):
            (out / kind / split).mkdir(parents=True, exist_ok=True)
        for name in names:
            rgb = photo(name)
            stem = Path(name).stem
            rgba = np.dstack([rgb.round().astype(np.uint8), matte(rgb.shape[:2], name)])
            Image.fromarray(rgba, "RGBA").save(out / "rgba" / split / f"{stem}.png")
            gray = rgb @ np.array([0.299, 0.587, 0.114])
            v16 = (gray / 255 * 4095).round().astype(np.uint16)  # 12 bits in a 16-bit file
            Image.fromarray(v16).save(out / "gray16" / split / f"{stem}.png")
            v8 = (v16.astype(np.float64) * 255 / 65535).round().astype(np.uint8)  # what an 8-bit reader keeps
            Image.fromarray(v8).save(out / "gray8" / split / f"{stem}.png")


def score16(run16: str, run8: str, out: Path) -> None:
    """Held-out PSNR at the 16-bit peak (65535) of each run's reconstructions of its own held-out files, the 8-bit
    run's mapped back to 16-bit units (x 65535 / 255), against the 16-bit originals."""
    from kl_ae.common.channels import run_mapping, to_model, to_stored
    from kl_ae.common.stored import read_stored
    from kl_autoencoder.interface import load_autoencoder
    from training.config import load_config

    for tag, run in (("16-bit", run16), ("8-bit", run8)):
        cfg = load_config(str(Path(run) / "config.yaml"), [])
        mapping, ae = run_mapping(Path(run)), load_autoencoder(run)
        errors = []
        for name in SAMPLE_VAL:
            stem = Path(name).stem
            stored = read_stored(str(Path(cfg.data.val_source) / f"{stem}.png"), 1 << 30)  # (H, W, 1)
            reference = read_stored(str(out / "gray16" / "val" / f"{stem}.png"), 1 << 30)[..., 0].astype(np.float64)
            x = torch.from_numpy(to_model(stored.reshape(*stored.shape[:2], -1), mapping)).permute(2, 0, 1)[None]
            h, w = (s // ae.image_multiple * ae.image_multiple for s in x.shape[-2:])
            with torch.no_grad():
                y = ae.decode(ae.encode(x[..., :h, :w]).mode())[0]
            decoded = to_stored(y, mapping)[..., 0].astype(np.float64)
            if tag == "8-bit":
                decoded = decoded * 65535 / 255
            errors.append(((decoded - reference[:h, :w]) ** 2).mean())
        psnr = 10 * np.log10(65535**2 / np.mean(errors))
        print(f"{tag} training data: held-out PSNR at the 16-bit peak {psnr:.2f} dB")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "make":
        make(Path(sys.argv[2]))
    elif len(sys.argv) == 5 and sys.argv[1] == "score16":
        score16(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
    else:
        sys.exit(__doc__)
