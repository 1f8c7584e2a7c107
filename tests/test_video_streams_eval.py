"""Streams of videos through `kl-ae eval` and `kl-ae probe` (webdataset shards, a hub-style dataset streamed), and
`kl-ae reconstruct --tile N` on a video: N reaches each video class's spatial tiles, and Wan's blended tiles stay
within the bound its `tiling()` states.

The clips are `clip_folder`'s moving textures (40x48, 13 frames); the shards hold them beside bad members. The model
is a tiny random causal Wan VAE (f4, t4, 4 channels)."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import datasets
import diffusers
import pytest
import torch
from PIL import Image

from eval.reconstruct import reconstruct
from kl_ae.commands.cli import main as kl_ae
from kl_ae.common.config import ConfigError
from kl_ae.common.video import is_video_source, load_clips, read_video
from kl_autoencoder.interface import load_autoencoder

from .conftest import VIDEO, clip_folder, moving_clip

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on one torch thread (conftest)

WAN = dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True],
           latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0], scale_factor_spatial=4)  # fmt: skip
# members of the shards that are no clip of 9 frames, by key: what each is skipped for
BAD = {"0100": "InvalidDataError", "0101": "too short", "0102": "no video member"}


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wan-t4")
    diffusers.AutoencoderKLWan(**WAN).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return clip_folder(tmp_path_factory.mktemp("clips"), 13)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(clips, tmp_path_factory) -> str:
    """Two webdataset shards: the 3 clips as `<key>.mp4` members, between an undecodable one, a clip of 3 frames
    and a sample with no video member (a caption alone)."""
    root = tmp_path_factory.mktemp("video-shards")
    (root / "short").mkdir()
    short = clip_folder(root / "short", 3, count=1) / "clip0.mp4"
    good = [(f"{i:04d}.mp4", (clips / f"clip{i}.mp4").read_bytes()) for i in range(3)]
    write_tar(root / "00000.tar", [good[0], ("0100.mp4", b"not a video"), good[1]])
    write_tar(root / "00001.tar", [("0101.mp4", short.read_bytes()), ("0102.json", b"{}"), good[2]])
    return str(root / "{00000..00001}.tar")


def test_a_stream_of_videos_gives_the_folder_s_clips_and_lists_bad_members(clips, shards, tmp_path):
    """The stream's clips are the folder's, bit for bit; each bad member is skipped with its reason; --max-images
    reads the first samples only. Image shards are not taken for videos."""
    assert is_video_source(shards)
    streamed, folder = load_clips(shards, 4, frames=9), load_clips(str(clips), 4, frames=9)
    assert len(streamed) == len(folder) == 3 and streamed.frames == 9
    for i in range(3):
        assert torch.equal(streamed[i], folder[i])
    assert [label.rsplit(":", 1)[1] for label in streamed.paths()] == ["0000", "0001", "0002"]
    assert {label.rsplit(":", 1)[1]: why for label, why in streamed.skipped.items()}.keys() == BAD.keys()
    for label, why in streamed.skipped.items():
        assert BAD[label.rsplit(":", 1)[1]] in why, why
    first = load_clips(shards, 4, frames=9, max_videos=2)  # 0000 and the undecodable 0100
    assert first.paths() == streamed.paths()[:1] and len(first.skipped) == 1

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.fromarray(moving_clip(1, seed=i)[:, 0].permute(1, 2, 0).numpy()).save(photos / f"{i}.png")
    write_tar(tmp_path / "images.tar", [(p.name, p.read_bytes()) for p in sorted(photos.iterdir())])
    assert not is_video_source(str(tmp_path / "images.tar"))


def test_eval_on_video_shards_reports_clips_and_lists_bad_members(wan, shards, tmp_path):
    from eval.evaluate import EvalConfig, evaluate

    m = evaluate(EvalConfig(model=str(wan), data=shards, frames=9, out=str(tmp_path / "eval"), lpips="off",
                            batch_size=3))  # fmt: skip
    assert m["num_images"] == 3 and m["frames"] == 9
    for key in ("psnr", "psnr_first_frame", "psnr_rest", "temporal_psnr"):
        assert math.isfinite(m["reconstruction"][key]), key
    assert sorted(label.rsplit(":", 1)[1] for label in m["skipped"]) == sorted(BAD)


def hub_folder(clips: Path, root: Path) -> Path:
    """The clips as a hub dataset stores a video dataset: data/train-*.parquet, a `video` column of file bytes."""
    rows = [{"video": {"bytes": p.read_bytes(), "path": p.name}} for p in sorted(clips.glob("*.mp4"))]
    (root / "data").mkdir(parents=True)
    table = datasets.Dataset.from_list(rows, features=datasets.Features({"video": datasets.Video(decode=False)}))
    table.to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root


def test_eval_and_probe_stream_a_hub_video_dataset(wan, clips, tmp_path):
    """`--streaming`: a hub dataset of videos (here a local hub-style folder) is streamed: its first clips are the
    folder's; eval reports them, probe trains its denoiser on latents of their windows."""
    hub = str(hub_folder(clips, tmp_path / "hub"))
    assert not is_video_source(hub) and is_video_source(hub, streaming=True)
    streamed = load_clips(hub, 4, frames=9, streaming=True)
    assert streamed.paths() == [f"{hub}:clip{i}.mp4" for i in range(3)]
    assert torch.equal(streamed[2], load_clips(str(clips), 4, frames=9)[2])

    args = ["--model", str(wan), "--data", hub, "--streaming", "--frames", "5"]
    probe = ["probe", *args, "--resolution", "16", "--crops", "1", "--steps", "2", "--batch-size", "2"]
    assert kl_ae([*probe, "--out", str(tmp_path / "probe")]) == 0
    m = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    # 3 videos, 2 windows of 5 of their 13 frames, 1 crop and its mirror: 12 latents of (C * t, h, w)
    assert m["num_train_latents"] == 12 and m["latent_shape"] == [4 * 2, 4, 4]
    assert math.isfinite(m["heldout_loss"]["mean"])
    assert kl_ae(["eval", *args, "--lpips", "off", "--out", str(tmp_path / "eval")]) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["num_images"] == 3 and m["frames"] == 5 and m["skipped"] == {}


def test_probe_on_video_shards_encodes_windows_of_the_good_clips(wan, shards, tmp_path):
    from eval.latents import read_latents
    from eval.probe import ProbeConfig, probe

    out = tmp_path / "probe"
    m = probe(ProbeConfig(model=str(wan), data=shards, frames=5, resolution=16, crops=1, steps=2, batch_size=2,
                          out=str(out)))  # fmt: skip
    assert m["num_train_latents"] == 12 and m["latent_shape"] == [4 * 2, 4, 4]
    table, settings = read_latents(out / "latents" / "model_train")
    assert settings["frames"] == 5 and sorted({p.rsplit(":", 1)[1] for p in table["path"]}) == ["0000", "0001", "0002"]


# ----------------------------------------------------------------------------- spatial tiles of a video class


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@torch.no_grad()
def test_wan_tiles_of_n_pixels_blend_within_the_stated_bound(wan):
    """tiling(True, 32) gives the class 32 px tiles every 24 px, and equals the class's own tiled call with them. On
    64 px frames (3 x 3 tiles) the blended result differs from the whole pass by at most 0.5 in the latents (std
    about 0.2) and 0.45 in the frames (measured 0.36 and 0.24 here; three random inits: up to 0.45 and 0.42): the
    bound `QwenWan.tiling` and docs/video.md state."""
    ae = load_autoencoder(wan)
    x = moving_clip(5, 64, 64)[None].float() / 127.5 - 1
    z0 = ae.encode(x).mode()
    y0 = ae.decode(z0)
    ae.tiling(True, 32)
    z = ae.encode(x).mode()
    y = ae.decode(z0)
    assert max_diff(z, z0) > 1e-2 and max_diff(y, y0) > 1e-2  # the tiles engaged
    assert 0.15 < z0.std() < 0.25
    assert max_diff(z, z0) <= 0.5 and max_diff(y, y0) <= 0.45  # without the overlap's blend: 0.42 and 0.72
    m = ae.module
    assert (m.tile_sample_min_height, m.tile_sample_min_width, m.tile_sample_stride_height) == (32, 32, 24)
    ref = diffusers.AutoencoderKLWan.from_pretrained(wan).eval()
    ref.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                      tile_sample_stride_width=24)  # fmt: skip
    assert max_diff(z, ref.encode(x).latent_dist.mode()) <= 1e-5 and max_diff(y, ref.decode(z0).sample) <= 1e-5
    ae.tiling(False)
    assert torch.equal(ae.encode(x).mode(), z0)


@pytest.mark.parametrize("name", ["hunyuan-video", "ltx-video", "cogvideox", "hunyuan-video-1.5"])
@torch.no_grad()
def test_every_video_class_takes_the_tile_size(name, tmp_path):
    """tiling(True, 32) on 64 px frames: the class holds 32 px tiles, and they make clips of the whole pass's
    shapes (CogVideoX and HunyuanVideo 1.5 overlap by a share of the tile: other sizes are one line)."""
    class_name, config, frames, _ = VIDEO[name]
    torch.manual_seed(0)
    getattr(diffusers, class_name)(**config).save_pretrained(tmp_path)
    ae = load_autoencoder(tmp_path)
    x = moving_clip(frames, 64, 64)[None].float() / 127.5 - 1
    z0 = ae.encode(x).mode()
    ae.tiling(True, 32)
    assert (ae.module.tile_sample_min_height, ae.module.tile_sample_min_width) == (32, 32)
    z = ae.encode(x).mode()
    y = ae.decode(z)
    assert z.shape == z0.shape and y.shape == x.shape and torch.isfinite(y).all()
    assert max_diff(z, z0) > 1e-3  # the tiles engaged
    if name in ("cogvideox", "hunyuan-video-1.5"):
        with pytest.raises(ValueError, match="overlaps its tiles by a quarter: a tile must be a multiple of 32"):
            ae.tiling(True, 40)


def test_reconstruct_tile_on_a_video_sets_the_tile(wan, clips, tmp_path):
    """--tile 16 on 40x48 frames tiles them (the class's default 256 px would not); a tile the model cannot take is
    one line."""
    video = str(clips / "clip0.mp4")
    whole = read_video(reconstruct(video, str(wan), str(tmp_path / "whole.mp4"), frames=9))[0]
    tiled = read_video(reconstruct(video, str(wan), str(tmp_path / "tiled.mp4"), tile=16, frames=9))[0]
    assert whole.shape == tiled.shape == (3, 9, 40, 96)  # input | reconstruction
    assert (whole[..., 48:].int() - tiled[..., 48:].int()).abs().max() > 8  # the reconstructions differ
    with pytest.raises(ConfigError, match="^--tile: 10 is not a positive multiple of 4"):
        reconstruct(video, str(wan), str(tmp_path / "bad.mp4"), tile=10, frames=9)


def test_encode_of_a_video_stream_without_frames_is_one_line(wan, shards, tmp_path):
    """A stream's video lengths are unknown ahead, so encode takes one clip of --frames N per video: without it, one
    line before anything is written (it once read every video member as a missing image)."""
    from eval.latents import encode_dataset
    from kl_ae.common.config import ConfigError

    with pytest.raises(ConfigError, match=r"^--frames: .* holds videos; a stream of them is encoded one clip"):
        encode_dataset(str(wan), shards, tmp_path / "latents", resolution=32)
    assert not (tmp_path / "latents").exists()


def test_a_stream_that_cannot_be_opened_says_why():
    """Only a dataset without a video column reads as images; a stream that cannot be opened at all keeps its own
    error (it once became "holds no videos")."""
    from kl_ae.common.config import ConfigError
    from kl_ae.common.video import is_video_source

    with pytest.raises(ConfigError, match=r"^--data: cannot stream 'nobody/no-such-videos'"):
        is_video_source("nobody/no-such-videos", streaming=True)
