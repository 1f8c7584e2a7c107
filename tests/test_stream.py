"""Streamed sources: shards written from the bundled photos (plus a corrupt and a non-image member), split over
processes and workers, skipped members listed, hub-style parquet offline, exact resume after kill -9, and
`kl-ae encode` into latent shards under two processes."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image
from torchdata.stateful_dataloader import StatefulDataLoader

from kl_ae.commands.cli import main as kl_ae
from kl_ae.common.config import ConfigError, DataConfig
from kl_ae.common.images import list_sample_images, read_skipped, resize_shorter, to_rgb
from kl_ae.common.shards import TarWriter, expand_braces
from kl_ae.common.stream import build_stream, shard_plan
from training.config import load_config
from training.train import main as train_main

from .conftest import TINY_RUN, checkpoint_tensors, launch_two_processes, resume_from

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [*TINY_RUN, "data.repeats=1", "data.val_source=sample", "data.shuffle_buffer=3", "train.log_every=1",
         "train.eval_every=1000", "train.sample_every=1000", "train.tracker=none", "train.mixed_precision=no",
         "loss.disc_start=2", "loss.disc_channels=8", "loss.disc_norm=batch", "loss.lpips=off"]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    """`kl-ae shards` over the 14 bundled photos (64 px JPEGs) and a corrupt JPEG, 2 per shard: 8 shards; the last
    holds the corrupt one, and a text member that is a sample without an image is appended to it."""
    root = tmp_path_factory.mktemp("stream")
    photos = root / "photos"
    photos.mkdir()
    for path in list_sample_images():
        resize_shorter(to_rgb(Image.open(path)), 64).save(photos / f"{path.stem}.jpg", quality=90)
    (photos / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    assert kl_ae(["shards", str(photos), "--out", str(root / "shards"), "--per-shard", "2"]) == 0
    last = root / "shards" / "00007.tar"
    with tarfile.open(last, "a") as tar:
        data = b"a caption without an image"
        info = tarfile.TarInfo("000000099.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    good = {f"{root / 'shards' / f'{i // 2:05d}.tar'}:{i:09d}" for i in range(14)}
    bad = {f"{last}:000000014": "OSError: Truncated", f"{last}:000000099": "no image member"}
    return {"pattern": str(root / "shards" / "{00000..00007}.tar"), "root": root, "good": good, "bad": bad}


def config(pattern: str, **kw) -> DataConfig:
    return DataConfig(**{"source": pattern, "resolution": 32, "resize": 48, "val_source": "sample"} | kw)


def labels_seen(cfg: DataConfig, rank: int, world: int, workers: int, skip_log=None) -> list[str]:
    ds, _, _ = build_stream(cfg, 0, rank, world)
    ds.skip_log = skip_log
    loader = StatefulDataLoader(ds, batch_size=1, num_workers=workers)
    return [label for labels, _ in loader for label in labels]


def test_brace_patterns_and_the_shard_plan():
    assert expand_braces("s/{00008..00010}.tar") == ["s/00008.tar", "s/00009.tar", "s/00010.tar"]
    assert expand_braces("{a,b}/{1..2}.parquet") == ["a/1.parquet", "a/2.parquet", "b/1.parquet", "b/2.parquet"]
    assert expand_braces("plain/{x}.tar") == ["plain/{x}.tar"]
    assert "2 per DataLoader worker" in shard_plan(8, 2, 2)
    assert "do not divide over 3 processes" in shard_plan(8, 3, 1)
    assert "uneven over 3 DataLoader workers (1 or 2 each)" in shard_plan(8, 2, 3)
    assert "only 2 of the 4 DataLoader workers" in shard_plan(4, 2, 4)


def test_shards_command_prints_its_pattern(shards, tmp_path, capsys):
    assert kl_ae(["shards", str(shards["root"] / "photos"), "--out", str(tmp_path), "--per-shard", "7"]) == 0
    assert f"--data '{tmp_path}/{{00000..00002}}.tar'" in capsys.readouterr().out
    names = [tarfile.open(tmp_path / "00002.tar").getnames(), tarfile.open(tmp_path / "00000.tar").getnames()]
    assert names[0] == ["000000014.jpg", "000000014.json"] and len(names[1]) == 14
    assert kl_ae(["shards", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2


def test_bad_members_are_skipped_and_listed(shards, tmp_path):
    skip_log = tmp_path / "skipped.txt"
    seen = labels_seen(config(shards["pattern"]), 0, 1, 0, skip_log)
    assert sorted(seen) == sorted(shards["good"])  # every good image once, the bad ones dropped
    listed = read_skipped(skip_log)
    assert listed.keys() == shards["bad"].keys()
    for label, why in shards["bad"].items():
        assert why in listed[label]
    labels_seen(config(shards["pattern"]), 0, 1, 0, skip_log)  # a second pass lists nothing again
    assert len(skip_log.read_text().splitlines()) == 2


@pytest.mark.parametrize("world", [2, 3])
def test_processes_and_workers_see_disjoint_samples_covering_an_epoch(shards, world):
    """2 processes x 2 workers: whole shards each; 3 processes: 8 shards do not divide, samples are split."""
    cfg = config(shards["pattern"], num_workers=2)
    seen = [labels_seen(cfg, rank, world, 2) for rank in range(world)]
    together = [label for part in seen for label in part]
    assert sorted(together) == sorted(shards["good"])  # disjoint, and nothing missing
    assert all(part for part in seen)


def test_shards_as_a_fixed_set(shards, tmp_path):
    """data.val_source / --data of eval and export: the first images of the shards, bad members included (the fixed
    set then skips them as a folder's)."""
    from kl_ae.common.data import load_images

    images = load_images(shards["pattern"], 8, resolution=32, max_images=3)
    assert len(images) == 3 and images[2].shape == (3, 32, 32)
    assert len(build_stream(config(shards["pattern"], val_source=shards["pattern"], val_max=5), 0, 0, 1)[1]) == 5
    _, val, _ = build_stream(config(shards["pattern"], val_source=shards["pattern"], val_max=20), 0, 0, 1)
    assert len(val) == 15  # 14 photos and the corrupt member; the text-only key is no image
    val.skip_log = tmp_path / "skipped.txt"
    assert all(val[i].shape == (3, 32, 32) for i in range(len(val)))
    assert len(read_skipped(tmp_path / "skipped.txt")) == 1


def test_config_mistakes_of_a_stream(shards):
    with pytest.raises(ConfigError, match="data.val_source: a streamed source holds nothing out"):
        build_stream(config(shards["pattern"], val_source=None), 0, 0, 1)
    with pytest.raises(ConfigError, match="data.streaming: 'sample' is not a hub dataset"):
        build_stream(DataConfig(streaming=True, val_source="sample"), 0, 0, 1)
    with pytest.raises(ConfigError, match="data.source: no shard file matches .*00008.tar"):
        build_stream(config(shards["pattern"].replace("00007", "00009")), 0, 0, 1)
    with pytest.raises(ConfigError, match="mixes shard kinds"):
        build_stream(config("{a.tar,b.parquet}"), 0, 0, 1)
    with pytest.raises(ConfigError, match="data.shuffle_buffer: must be >= 0"):
        build_stream(config(shards["pattern"], shuffle_buffer=-1), 0, 0, 1)


def test_hub_style_parquet_streams_offline(tmp_path):
    """A hub dataset laid out as the hub stores it (data/train-*.parquet with image bytes), from local files."""
    files = list_sample_images()[:6]
    rows = [{"image": {"bytes": p.read_bytes(), "path": p.name}} for p in files]
    rows.append({"image": {"bytes": b"broken", "path": "broken.png"}})
    features = datasets.Features({"image": datasets.Image()})
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for k in range(2):
        part = datasets.Dataset.from_list(rows[k::2], features=features)
        part.to_parquet(str(tmp_path / "hub" / "data" / f"train-{k:05d}-of-00002.parquet"))
    hub = str(tmp_path / "hub")
    for cfg in (config(hub, streaming=True), config(f"{hub}/data/*.parquet")):
        skip_log = tmp_path / f"skipped_{cfg.streaming}.txt"
        seen = labels_seen(cfg, 0, 1, 0, skip_log)
        assert sorted(seen) == sorted(f"{cfg.source}:{p.name}" for p in files)
        assert list(read_skipped(skip_log)) == [f"{cfg.source}:broken.png"]


@pytest.mark.slow
def test_kill_and_resume_on_a_stream_is_exact(shards, tmp_path):
    """SIGKILL a run on shards (2 DataLoader workers, shuffle buffer) mid-epoch; the re-run reaches the same weights
    as an uninterrupted run, bit for bit, across an epoch boundary."""
    steps, args = 10, [*TRAIN, "data.num_workers=2", f"data.source={shards['pattern']}"]
    train_main(load_config(None, [*args, f"out_dir={tmp_path / 'straight'}", f"train.max_steps={steps}"]))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "training.train", "--out", str(out), "--max-steps", str(steps), *args,
           "train.checkpoint_every=1"]  # fmt: skip
    threads = str(torch.get_num_threads())  # as in this process: float sums must add up in the same order
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": threads}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer, deadline = out / "checkpoints" / "latest", time.time() + 300
    while time.time() < deadline and not (pointer.exists() and pointer.read_text() >= "step_0000003"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(pointer.read_text().split("_")[1])
    assert 3 <= killed_at < steps - 1
    summary = train_main(load_config(None, [*args, f"out_dir={out}", f"train.max_steps={steps}"]))
    assert summary["steps"] == steps
    a = checkpoint_tensors(tmp_path / "straight" / "checkpoints" / f"step_{steps:07d}")
    b = checkpoint_tensors(out / "checkpoints" / f"step_{steps:07d}")
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]
    assert read_skipped(out / "skipped.txt").keys() == shards["bad"].keys()
    state = torch.load(out / "checkpoints" / f"step_{steps:07d}" / "data_state_0.pt", weights_only=True)
    assert state["epoch"] >= 1  # the run went past the end of the stream


@pytest.mark.slow
def test_two_process_run_on_shards_resumes_exactly(shards, tmp_path):
    """The 2-process CPU launch on `shards/{00000..00007}.tar`: trains, lists the bad members, and a run resumed from
    its step-4 checkpoint (where the two processes' stream positions differ) ends with the uninterrupted run's
    weights."""
    out = tmp_path / "ddp"
    args = ["--data", shards["pattern"], "--max-steps", "6", *TRAIN, "train.checkpoint_every=2"]
    proc = launch_two_processes(["--out", str(out), *args])
    assert "8 shards, 4 per process" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["replicas_identical"] and summary["steps"] == 6
    assert read_skipped(out / "skipped.txt").keys() == shards["bad"].keys()
    positions = [torch.load(out / "checkpoints" / "step_0000004" / f"data_state_{r}.pt") for r in (0, 1)]
    assert positions[0] != positions[1]  # each process resumes its own stream
    resume_from(out, tmp_path / "resumed", 4)
    launch_two_processes(["--out", str(tmp_path / "resumed"), *args])
    a = checkpoint_tensors(out / "checkpoints" / "step_0000006")
    b = checkpoint_tensors(tmp_path / "resumed" / "checkpoints" / "step_0000006")
    assert not [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture
def model(tmp_path, tiny_config) -> str:
    from kl_autoencoder import Autoencoder

    torch.manual_seed(0)
    Autoencoder(tiny_config).eval().save_pretrained(tmp_path / "model", extra_config={"scaling_factor": 0.5})
    return str(tmp_path / "model")


def _encoded(out: Path) -> datasets.Dataset:
    from eval.latents import read_latents

    table, settings = read_latents(out)
    assert settings["num_images"] == len(table)
    return table


@pytest.mark.slow
def test_encode_from_shards_under_two_processes_writes_each_latent_once(shards, model, tmp_path):
    out = tmp_path / "latents"
    args = ["encode", "--model", model, "--data", shards["pattern"], "--out", str(out), "--resolution", "32"]
    launch_two_processes([*args, "--per-shard", "3"], module="kl_ae.commands.cli")
    index = json.loads((out / "index.json").read_text())
    assert index["processes"] == 2 and {f["file"][:5] for f in index["files"]} == {"00000", "00001"}
    table = _encoded(out)
    assert sorted(table["path"]) == sorted(shards["good"])  # each exactly once
    assert len(set(table["index"])) == len(table)
    assert read_skipped(out / "skipped.txt").keys() == shards["bad"].keys()


@pytest.mark.slow
def test_encode_resumes_and_writes_webdataset(shards, model, tmp_path, monkeypatch):
    """A run that dies after two latent shards is continued by the same command; --format webdataset."""
    import eval.latent_shards as latent_shards

    out = tmp_path / "latents"
    args = ["encode", "--model", model, "--data", shards["pattern"], "--out", str(out), "--resolution", "32",
            "--per-shard", "4", "--format", "webdataset"]  # fmt: skip
    write, written = latent_shards._write_shard, []

    def dies_after_two(path, *a):
        if len(written) == 2:
            raise OSError("disk full")
        written.append(path)
        write(path, *a)

    monkeypatch.setattr(latent_shards, "_write_shard", dies_after_two)
    with pytest.raises(OSError):
        kl_ae(args)
    stamps = {p: p.stat().st_mtime_ns for p in written}
    monkeypatch.setattr(latent_shards, "_write_shard", write)
    assert kl_ae(args) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # the first shards were kept, not redone
    table = _encoded(out)
    assert sorted(table["path"]) == sorted(shards["good"])
    assert {f.suffix for f in out.iterdir() if f.is_file()} == {".tar", ".json", ".txt"}
    assert kl_ae([*args[:-2], "--format", "parquet"]) == 0  # complete: nothing to do
    folder = ["encode", "--model", model, "--data", str(shards["root"] / "photos"), "--out", str(tmp_path / "x")]
    assert kl_ae([*folder, "--format", "parquet"]) == 2  # latent shards come from a stream


def test_tar_writer_leaves_no_partial_shard(tmp_path):
    writer = TarWriter(tmp_path / "00000.tar")
    writer.add("k.txt", b"x")
    assert not (tmp_path / "00000.tar").exists()  # only once closed
    writer.close()
    assert tarfile.open(tmp_path / "00000.tar").getnames() == ["k.txt"]
