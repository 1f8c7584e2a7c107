"""Video data: exact clips from seeks, one crop per clip, image batches mixed in per block, bad videos skipped and
listed, 'sample-video' offline, the fixed clip sets, and exact resume of a video stream.

Clips are made here with PyAV, losslessly (qp 0), a few frames of 48x64: a frame's grey level says which frame it is
(`gray_ids`), a still random texture says whether every frame got the same crop and flip."""

from __future__ import annotations

import dataclasses
import io
import re
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from kl_ae.common import video_io
from kl_ae.common.config import ConfigError, DataConfig
from kl_ae.common.data import build_datasets
from kl_ae.common.images import read_skipped
from kl_ae.common.video import (
    load_clips,
    probe_video,
    read_clip,
    read_frames,
    read_video,
    sample_video_dir,
    write_video,
)

LEVELS = 20 + 8 * np.arange(28)  # frame i of a grey clip is uniformly LEVELS[i]


def encode(path: Path, frames: np.ndarray, fps: int = 10, gop: int = 4, **options) -> Path:
    """(T, H, W, 3) uint8 -> a lossless H.264 file (keyframes every `gop`, B-frames: presentation order != decode)."""
    with av.open(str(path), "w", options=options) as c:
        s = c.add_stream("libx264", rate=fps, options={"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0",
                                                        "qp": "0", "bf": "2"})  # fmt: skip
        s.height, s.width, s.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        c.mux(s.encode())
    return path


def gray(t: int, offset: int = 0) -> np.ndarray:
    return np.repeat(LEVELS[offset : offset + t, None, None, None], 48 * 64 * 3).reshape(t, 48, 64, 3).astype(np.uint8)


def texture(t: int, seed: int = 0) -> np.ndarray:
    """A still texture of random 4x4 blocks: any two different crops or flips of it differ."""
    blocks = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    return np.repeat(blocks.repeat(4, 0).repeat(4, 1)[None], t, 0)


def gray_ids(x: torch.Tensor) -> list[int]:
    """Which frame of a `gray` clip each frame of x (3, T, H, W) in [-1, 1] is."""
    means = ((x + 1) * 127.5).mean(dim=(0, 2, 3)).numpy()
    return [int(np.abs(LEVELS - 1 - m).argmin()) for m in means]  # yuv420p's levels decode about 1 lower


@pytest.fixture(scope="module")
def moving(tmp_path_factory) -> Path:
    """40 frames in which a bar moves over a gradient and the brightness steps, keyframes every 8."""
    frames = np.zeros((40, 48, 64, 3), np.uint8)
    frames[..., 0] = np.linspace(0, 255, 64, dtype=np.uint8)
    for i in range(40):
        frames[i, :, i + 10 : i + 14, 1] = 255
        frames[i, ..., 2] = 6 * i
    return encode(tmp_path_factory.mktemp("moving") / "moving.mp4", frames, gop=8)


def test_read_clip_is_read_video_and_decodes_only_its_frames(moving, monkeypatch):
    whole, fps = read_video(moving)
    assert whole.shape == (3, 40, 48, 64) and whole.dtype == torch.uint8 and fps == 10
    decode, decoded = video_io._decode, []

    def counting(container, stream):
        for frame in decode(container, stream):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(video_io, "_decode", counting)
    for start, n, stride in [(0, 5, 1), (21, 5, 1), (13, 6, 2), (35, 5, 1), (3, 1, 1)]:
        decoded.clear()
        clip = read_clip(moving, start, n, stride)
        assert torch.equal(clip, whole[:, start : start + (n - 1) * stride + 1 : stride])
        last, keyframe = start + (n - 1) * stride, start // 8 * 8
        assert n <= len(decoded) <= last - keyframe + 1 + 2  # from the keyframe before, 2 B-frames of reordering
    assert torch.equal(read_clip(moving.read_bytes(), 21, 3, 2), whole[:, 21:26:2])  # bytes, as in shards
    assert torch.equal(read_frames(moving, [4, 4, 30]), whole[:, [4, 4, 30]])  # fps resampling repeats frames
    decoded.clear()
    info = probe_video(moving)
    assert (info.frames, info.fps, info.width, info.height) == (40, 10.0, 64, 48) and not decoded


def test_probe_counts_packets_when_the_header_does_not(tmp_path):
    mkv = encode(tmp_path / "a.mkv", gray(7))
    with av.open(str(mkv)) as c:
        assert c.streams.video[0].frames == 0  # Matroska headers carry no frame count
    assert probe_video(mkv).frames == 7 and probe_video(mkv.read_bytes()).frames == 7


def test_write_video_mp4_and_gif(tmp_path):
    ramp = torch.linspace(0, 1, 63)
    x = torch.stack([ramp.expand(47, 63), ramp.flip(0).expand(47, 63), torch.full((47, 63), 0.5)])  # odd sides
    x = torch.stack([x.roll(t, -1) for t in range(6)], 1).mul(255).byte()  # (3, 6, 47, 63)
    write_video(tmp_path / "a.mp4", x.float() / 127.5 - 1, fps=12)  # floats in [-1, 1]
    y, fps = read_video(tmp_path / "a.mp4")
    assert y.shape == (3, 6, 46, 62) and fps == 12  # yuv420p needs even sides: the last row and column go
    assert (y.float() - x[:, :, :46, :62].float()).abs().mean() < 5  # crf 18, chroma at half resolution
    write_video(tmp_path / "a.gif", x, fps=10)
    g, fps = read_video(tmp_path / "a.gif")
    assert g.shape == (3, 6, 47, 63) and fps == 10
    assert torch.equal(read_clip(tmp_path / "a.gif", 2, 3), g[:, 2:5])


def folder_of(root: Path, **clips: np.ndarray) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, frames in clips.items():
        encode(root / f"{name}.mp4", frames)
    return root


def config(source, **kw) -> DataConfig:
    return DataConfig(**{"source": str(source), "resolution": 32, "resize": 40, "num_frames": 5, "batch_size": 2} | kw)


def test_one_crop_and_flip_for_all_frames_of_a_clip(tmp_path):
    folder = folder_of(tmp_path / "v", a=texture(9, 0), b=texture(9, 1), c=texture(9, 2))
    train, val = build_datasets(config(folder, repeats=8, val_fraction=0.3), seed=0)
    assert len(train) == 16 and len(val) == 1
    items = [train[i] for i in range(len(train))]
    for x in items:
        assert x.shape == (3, 5, 32, 32) and -1 <= x.min() and x.max() <= 1
        assert all(torch.equal(x[:, 0], x[:, k]) for k in range(5))  # a still scene stays still: one crop, one flip
    assert len({x[:, 0].sum().item() for x in items}) > 8  # and crops differ from clip to clip
    assert val[0].shape == (3, 5, 32, 32)
    centred, plain = build_datasets(config(folder, random_crop=False, repeats=4, val_source=str(folder)), seed=0)
    firsts = [plain[v][:, 0] for v in range(3)]  # the centre crops, unflipped
    flips = []
    for x in (centred[i] for i in range(len(centred))):
        assert all(torch.equal(x[:, 0], x[:, k]) for k in range(5))
        flips += [f for f in (False, True) for y in firsts if torch.equal(x[:, 0], y.flip(-1) if f else y)]
    assert len(flips) == len(centred) and set(flips) == {False, True}  # each clip flipped whole, or not at all
    frames, _ = build_datasets(config(folder, num_frames=1, val_fraction=0.3), seed=0)
    assert frames[0].shape == (3, 32, 32)  # num_frames 1: a video's frames are images


def test_clip_start_stride_and_fps(tmp_path):
    folder = folder_of(tmp_path / "v", a=gray(28), b=gray(28))
    train, val = build_datasets(config(folder, frame_stride=3, repeats=6, hflip=False), seed=0)
    assert gray_ids(val[0]) == [0, 3, 6, 9, 12]  # validation: the first frames
    starts = set()
    for i in range(len(train)):
        ids = gray_ids(train[i])
        assert ids == list(range(ids[0], ids[0] + 13, 3)) and ids[-1] < 28
        starts.add(ids[0])
    assert len(starts) > 3  # training draws the start
    train.set_epoch(1)
    assert {gray_ids(train[i])[0] for i in range(len(train))} != starts or len(starts) == 1
    _, val = build_datasets(config(folder, fps=5.0), seed=0)
    assert gray_ids(val[0]) == [0, 2, 4, 6, 8]  # 10 fps resampled to 5: every other frame
    _, val = build_datasets(config(folder, fps=20.0), seed=0)
    assert gray_ids(val[0]) == [0, 0, 1, 1, 2]  # to 20: the nearest frame (the earlier one at a tie)


def test_image_batches_are_whole_blocks_at_the_ratio(tmp_path):
    folder = folder_of(tmp_path / "v", a=texture(6), b=gray(6))
    Image.fromarray(texture(1, 5)[0]).save(folder / "photo.png")
    cfg = config(folder, image_ratio=0.3, batch_size=4, repeats=16, val_fraction=0.5)
    train, _ = build_datasets(cfg, seed=0)
    shapes = [tuple(b.shape) for b in DataLoader(train, batch_size=4, drop_last=True)]
    assert set(shapes) == {(4, 3, 5, 32, 32), (4, 3, 1, 32, 32)}  # every batch one kind, both kinds seen
    ratio = np.mean([train.is_still(4 * k) for k in range(4000)])
    assert 0.27 < ratio < 0.33
    train.processes = 2  # accelerate's BatchSamplerShard: each process takes whole batches of the sequential sampler
    from accelerate.data_loader import BatchSamplerShard

    batches = BatchSampler(SequentialSampler(range(800)), 4, drop_last=True)
    per_process = [list(BatchSamplerShard(batches, 2, p)) for p in (0, 1)]
    kinds = [[{train.is_still(i) for i in b} for b in shard] for shard in per_process]
    assert all(len(k) == 1 for shard in kinds for k in shard)  # homogeneous batches
    assert kinds[0] == kinds[1]  # both processes hold the same kind at every step


def test_the_trainer_leaves_the_order_of_clips_to_the_dataset():
    from accelerate import Accelerator

    from training.config import load_config
    from training.train import build_data

    cfg = load_config(None, ["data.source=sample-video", "data.num_frames=3", "data.resolution=32", "data.resize=40",
                             "data.batch_size=2", "data.image_ratio=0.5"])  # fmt: skip
    data = build_data(cfg, Accelerator(cpu=True), print)
    assert type(data.train_dl.sampler) is SequentialSampler and data.train.processes == 1  # it shuffles itself


def test_clips_are_deterministic_for_seed_and_epoch(tmp_path):
    folder = folder_of(tmp_path / "v", a=gray(10), b=gray(10, 14))  # a's frames are ids 0-9, b's 14-23
    cfg = config(folder, val_source=str(folder), repeats=8)

    def epoch(seed: int, number: int, **kw) -> list[torch.Tensor]:
        train = build_datasets(dataclasses.replace(cfg, **kw), seed)[0]
        train.set_epoch(number)
        return [train[i] for i in range(len(train))]

    first = epoch(0, 0, image_ratio=0.5)
    assert {x.shape[1] for x in first} == {1, 5}
    assert all(torch.equal(a, b) for a, b in zip(first, epoch(0, 0, image_ratio=0.5)))
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, epoch(0, 1, image_ratio=0.5)))
    orders = [[gray_ids(x)[0] > 9 for x in epoch(0, e)] for e in (0, 1, 2)]
    assert all(sorted(order) == [False] * 8 + [True] * 8 for order in orders)  # each video `repeats` times an epoch
    assert orders[0] != orders[1] or orders[1] != orders[2]  # in a new order each epoch


BAD = {"empty.mp4": "empty file", "trunc.mp4": "InvalidDataError|no video stream", "text.mp4": "InvalidDataError",
       "short.mp4": "too short", "zero.avi": "no frames", "notrack.mp4": "no video stream"}  # fmt: skip


def write_bad(root: Path) -> None:
    (root / "empty.mp4").write_bytes(b"")
    good = encode(root / "tmp.mp4", gray(6)).read_bytes()
    (root / "tmp.mp4").unlink()
    (root / "trunc.mp4").write_bytes(good[: len(good) // 2])  # its index (moov) comes last: cut off
    (root / "text.mp4").write_text("not a video\n")
    encode(root / "short.mp4", gray(2))
    for name, codec in (("zero.avi", "mpeg4"), ("notrack.mp4", "libx264")):  # no frame muxed
        with av.open(str(root / name), "w") as c:
            s = c.add_stream(codec, rate=10)
            s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
            c.start_encoding()


def test_bad_videos_are_skipped_and_listed(tmp_path):
    folder = folder_of(tmp_path / "dirty", a=gray(8, 0), m=gray(8, 10), z=gray(8, 20))  # told apart by grey level
    write_bad(folder)
    val = folder_of(tmp_path / "val", v=gray(6))
    train, _ = build_datasets(config(folder, val_source=str(val), repeats=3), seed=0)
    train.skip_log = tmp_path / "skipped.txt"
    seen = []
    for epoch in range(2):
        train.set_epoch(epoch)
        for batch in DataLoader(train, batch_size=2, drop_last=True):  # the run goes on
            assert batch.shape == (2, 3, 5, 32, 32)
            seen += [gray_ids(x)[0] // 10 for x in batch]
    assert set(seen) == {0, 1, 2}  # every good video used, nothing lost
    listed = read_skipped(tmp_path / "skipped.txt")
    assert {Path(p).name for p in listed} == set(BAD)  # each bad file listed once, with its reason
    assert len((tmp_path / "skipped.txt").read_text().splitlines()) == len(BAD)
    for path, why in listed.items():
        assert re.match(BAD[Path(path).name], why), why
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    write_bad(only_bad)
    with pytest.raises(ValueError, match=r"^data.source: no usable clip in train of .*6 files tried"):
        build_datasets(config(only_bad, val_source=str(val)), seed=0)


def test_sample_video_offline_and_fixed_clip_sets(tmp_path):
    train, val = build_datasets(config("sample-video", image_ratio=0.5), seed=0)
    assert [Path(p).name for p in train.paths()] == ["bigbuckbunny.mp4", "bikes.mp4"]
    assert [Path(p).name for p in val.paths()] == ["carphone_pristine.mp4"]
    assert val[0].shape == (3, 5, 32, 32)
    assert {Path(p).parent for p in train.stills} != {sample_video_dir()}  # image batches: the sample photographs
    clips = load_clips("sample-video", 8, resolution=32, frames=10, longest=lambda n: 1 + (n - 1) // 4 * 4)
    assert len(clips) == 1 and clips.frames == 9 and clips[0].shape == (3, 9, 32, 32)
    assert abs(clips.fps_list()[0] - 29.97) < 0.01 and clips.paths()[0].endswith("carphone_pristine.mp4")
    folder = folder_of(tmp_path / "eval", a=gray(7), b=gray(9))
    write_bad(folder)
    whole = load_clips(str(folder), 16)  # T: the shortest usable video (short.mp4, 2 frames)
    assert len(whole) == 3 and whole.frames == 2 and len(whole.skipped) == len(BAD) - 1
    own = load_clips(str(folder), 16, frames=7)  # own size, cropped to a multiple of 16; shorter videos left out
    assert len(own) == 2 and own.frames == 7 and own[1].shape == (3, 7, 48, 64) and own.sizes() == {(48, 64)}
    assert gray_ids(own[1]) == list(range(7)) and "too short" in own.skipped[str(folder / "short.mp4")]
    with pytest.raises(ConfigError, match="--data: no usable video"):
        load_clips(str(folder / "text.mp4"), 8)


def test_data_config_mistakes_are_one_line():
    for kw, message in [({"num_frames": 0}, "data.num_frames: must be >= 1"),
                        ({"fps": 8.0, "frame_stride": 2}, "data.fps: .*set only one"),
                        ({"image_ratio": 0.5}, "data.image_ratio: .*needs data.num_frames > 1"),
                        ({"image_ratio": 1.0, "num_frames": 5}, r"data.image_ratio: must be in \[0, 1\)")]:  # fmt: skip
        with pytest.raises(ConfigError, match=f"^{message}"):
            DataConfig(**kw).validate()
    with pytest.raises(ValueError, match="data.source: 'sample' holds no videos"):
        build_datasets(DataConfig(num_frames=5), seed=0)


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory) -> dict:
    """Webdataset shards of 10 grey clips (8 frames, told apart by level) and 2 bad members, 3 samples per shard."""
    root = tmp_path_factory.mktemp("video_shards")
    members = [(f"{i:04d}.mp4", encode(root / "c.mp4", gray(8, 2 * i)).read_bytes()) for i in range(10)]
    members.insert(4, ("0100.mp4", b"not a video"))
    members.insert(8, ("0101.mp4", encode(root / "c.mp4", gray(2)).read_bytes()))  # shorter than a clip
    for s in range(4):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for name, data in members[3 * s : 3 * s + 3]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return {"pattern": str(root / "{00000..00003}.tar"), "root": root}


def stream_config(pattern: str, val: Path, **kw) -> DataConfig:
    return config(pattern, val_source=str(val), shuffle_buffer=4, **kw)


def test_video_shards_give_clips_and_list_bad_members(video_shards, tmp_path):
    from torchdata.stateful_dataloader import StatefulDataLoader

    from kl_ae.common.stream import build_stream

    val = folder_of(tmp_path / "val", v=gray(6))
    train, val_ds, _ = build_stream(stream_config(video_shards["pattern"], val), 0, 0, 1)
    assert val_ds[0].shape == (3, 5, 32, 32)
    train.skip_log = tmp_path / "skipped.txt"
    batches = list(StatefulDataLoader(train, batch_size=2))
    assert {tuple(x.shape) for _, x in batches} == {(2, 3, 5, 32, 32)}
    assert len([label for labels, _ in batches for label in labels]) == 10  # every good clip once
    listed = read_skipped(tmp_path / "skipped.txt")
    assert sorted(k.rsplit(":", 1)[1] for k in listed) == ["0100", "0101"]
    assert any("too short" in why for why in listed.values())


def test_a_killed_video_stream_resumes_at_the_sample(video_shards, tmp_path):
    """Stopped after k batches, its loader's state saved; a new loader from that state yields exactly the rest of
    what the uninterrupted run yields: the same clips, the same image batches (data.image_ratio), 2 workers."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from kl_ae.common.stream import build_stream

    cfg = stream_config(video_shards["pattern"], folder_of(tmp_path / "val", v=gray(6)), image_ratio=0.4)

    def loader() -> StatefulDataLoader:
        return StatefulDataLoader(
            build_stream(cfg, 0, 0, 1)[0], batch_size=2, num_workers=2, multiprocessing_context="forkserver"
        )  # no fork of the suite's threads

    straight = list(loader())
    assert {x.shape[2] for _, x in straight} == {1, 5}  # image batches and clip batches
    for k in (1, 3):
        first = loader()
        batches = iter(first)
        done = [next(batches) for _ in range(k)]
        state = first.state_dict()
        del batches, first  # killed
        resumed = loader()
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert len(done) + len(rest) == len(straight)
        for (labels, x), (want_labels, want) in zip(done + rest, straight):
            assert list(labels) == list(want_labels) and torch.equal(x, want)
