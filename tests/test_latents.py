"""`kl-ae encode` -> datasets.load_from_disk -> `kl-ae decode`: scaled latents round trip to reconstructions."""

import json

import datasets
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from eval.latent_shards import pixels
from eval.latents import decode_latents, read_latents
from kl_ae.commands.cli import main
from kl_ae.common.data import load_images
from kl_ae.common.images import list_images
from kl_ae.common.shards import write_shards
from kl_autoencoder import Autoencoder

SCALE, SHIFT = 0.5, 0.1


@pytest.fixture
def setup(tmp_path, tiny_config):
    torch.manual_seed(0)
    model = Autoencoder(tiny_config).eval()
    model.save_pretrained(tmp_path / "model", extra_config={"scaling_factor": SCALE, "shift_factor": SHIFT})
    images = tmp_path / "images"
    images.mkdir()
    for i, name in enumerate(["astronaut", "coffee", "chelsea"]):
        Image.fromarray(getattr(skimage.data, name)()[::8, ::8]).save(images / f"{i}_{name}.png")
    return tmp_path, Autoencoder.from_pretrained(tmp_path / "model")


def _load(path) -> torch.Tensor:
    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    return x[None].float() / 127.5 - 1


def test_encode_decode_round_trip(setup):
    tmp, model = setup
    out = tmp / "latents"
    args = ["encode", "--model", str(tmp / "model"), "--data", str(tmp / "images"), "--out", str(out)]
    assert main([*args, "--resolution", "32", "--batch-size", "2"]) == 0
    table = datasets.load_from_disk(str(out))
    assert len(table) == 3 and {"latent", "index", "path"} <= set(table.column_names)
    assert table.features["latent"].dtype == "float32"
    settings = json.loads((out / "latents_config.json").read_text())
    assert settings["scaling_factor"] == SCALE and settings["shift_factor"] == SHIFT
    assert settings["latent"] == "posterior mean" and json.loads(table.info.description) == settings

    _, read = read_latents(out)
    for index, path, image in decode_latents(model, table, read):
        x = load_images(str(tmp / "images"), 4, resolution=32)[index][None]
        with torch.no_grad():
            z = model.encode(x).mode()
            stored = torch.from_numpy(table.with_format("numpy")[index]["latent"])[None]
            torch.testing.assert_close(stored, (z - SHIFT) * SCALE)
            torch.testing.assert_close(image[None], model.decode(z), atol=1e-5, rtol=1e-5)

    folder = tmp / "decoded"
    assert main(["decode", "--model", str(tmp / "model"), "--latents", str(out), "--out", str(folder)]) == 0
    pngs = sorted(folder.glob("*.png"))
    assert [p.name for p in pngs] == ["000000_0_astronaut.png", "000001_1_coffee.png", "000002_2_chelsea.png"]
    assert _load(pngs[0]).shape == (1, 3, 32, 32)

    # re-running a complete encode does nothing (resumable); shards are cleaned up
    mtime = (out / "latents_config.json").stat().st_mtime_ns
    assert main([*args, "--resolution", "32"]) == 0
    assert (out / "latents_config.json").stat().st_mtime_ns == mtime
    assert not (tmp / ".latents.shards").exists()


def test_encode_skips_written_shards(setup):
    tmp, _ = setup
    out = tmp / "latents"
    shard = tmp / ".latents.shards" / "shard_00000"
    datasets.Dataset.from_dict({"latent": [np.zeros((4, 8, 8), np.float32)], "index": [7], "path": ["x"]}).save_to_disk(
        str(shard)
    )
    args = ["encode", "--model", str(tmp / "model"), "--data", str(tmp / "images"), "--out", str(out)]
    assert main([*args, "--resolution", "32"]) == 0
    assert datasets.load_from_disk(str(out))["index"] == [7]  # the complete shard was reused, not recomputed


def test_encode_sample_records_it(setup):
    tmp, _ = setup
    out = tmp / "latents"
    args = ["encode", "--model", str(tmp / "model"), "--data", str(tmp / "images"), "--out", str(out), "--sample"]
    assert main([*args, "--resolution", "32"]) == 0
    assert json.loads((out / "latents_config.json").read_text())["latent"] == "posterior sample"


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_encode_from_shards_writes_the_scaled_latents_it_records(setup, fmt):
    """A stream's latent shards hold latent = (z - shift_factor) * scaling_factor of the model's encode, as their
    latents_config.json says, not merely a latent per index."""
    tmp, model = setup
    pattern = write_shards(tmp / "images", tmp / "shards", per_shard=2, progress=False)
    out = tmp / "latents"
    args = ["encode", "--model", str(tmp / "model"), "--data", pattern, "--out", str(out), "--resolution", "32"]
    assert main([*args, "--per-shard", "2", "--format", fmt]) == 0
    table, settings = read_latents(out)
    assert settings["scaling_factor"] == SCALE and settings["shift_factor"] == SHIFT
    files = list_images(tmp / "images")  # the shards' order: stream index i is files[i]
    assert sorted(table["index"]) == list(range(len(files)))
    for row in table.with_format("numpy"):
        with torch.no_grad():
            z = model.encode(pixels(str(files[row["index"]]), 32, 4)[None]).mode()
        torch.testing.assert_close(torch.from_numpy(np.asarray(row["latent"], np.float32))[None], (z - SHIFT) * SCALE)
