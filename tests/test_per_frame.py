"""A video family taken frame by frame (`model.per_frame`): each frame a one-frame clip of its own, so its latents are
the frames' own, one latent frame per frame, and the record survives export and reload.

Tiny random Wan-format models with temporal downsampling off: their causal 3-D convolutions still mix frames when a
clip goes through whole, which is what per frame must prevent."""

from __future__ import annotations

import json

import pytest
import torch

from training.config import ConfigError, load_config

from .conftest import clip_folder, moving_clip

ARCH = dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False])


def per_frame_wan():
    from kl_autoencoder.families.base import PerFrame
    from kl_autoencoder.interface import new_autoencoder

    torch.manual_seed(0)
    return PerFrame(new_autoencoder("wan", ARCH))


def clip(frames: int = 5) -> torch.Tensor:
    return moving_clip(frames, 16, 16)[None].float() / 127.5 - 1  # (1, 3, T, 16, 16)


@torch.no_grad()
def test_latents_of_a_clip_are_those_of_its_frames_encoded_alone():
    ae = per_frame_wan()
    x = clip(5)
    z = ae.encode(x).mode()
    assert z.shape == (1, 4, 5, 8, 8)  # one latent frame per frame: t = T, any length (5 is not 1 + 4k here)
    assert ae.temporal_factor == 1 and not ae.is_video
    for t in range(5):
        alone = ae.video.encode(x[:, :, t : t + 1]).mode()[:, :, 0]  # the video model on the one-frame clip
        assert torch.allclose(z[:, :, t], alone, atol=1e-6)
    # the same model with a whole clip does mix frames: what per frame takes away
    whole = ae.video.encode(x).mode()
    assert not torch.allclose(whole[:, :, 1:], z[:, :, 1:], atol=1e-4)


@torch.no_grad()
def test_changing_frame_t_changes_only_latent_and_decoded_frame_t():
    ae = per_frame_wan()
    x = clip(5)
    y = x.clone()
    y[:, :, 2] = -y[:, :, 2]
    zx, zy = ae.encode(x).mode(), ae.encode(y).mode()
    changed = [t for t in range(5) if not torch.equal(zx[:, :, t], zy[:, :, t])]
    assert changed == [2]
    w = zx.clone()
    w[:, :, 3] += 1.0
    dx, dw = ae.decode(zx), ae.decode(w)
    assert dx.shape == x.shape
    assert [t for t in range(5) if not torch.equal(dx[:, :, t], dw[:, :, t])] == [3]


@torch.no_grad()
def test_per_frame_survives_export_and_reload(tmp_path):
    from diffusers import AutoencoderKLWan

    from kl_autoencoder.interface import load_autoencoder, new_autoencoder

    ae = per_frame_wan()
    ae.set_normalization(ae.measure_normalization([ae.encode(clip(5)).mode()]))
    ae.save_pretrained(tmp_path / "vae", extra_config={"_note": "kept"})
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["_per_frame"] is True and config["_note"] == "kept"
    loaded = load_autoencoder(tmp_path / "vae")
    assert not loaded.is_video and loaded.temporal_factor == 1 and loaded.family == "wan"
    x = clip(5)
    z = ae.encode(x).mode()
    assert torch.allclose(loaded.encode(x).mode(), z, atol=1e-6)
    assert torch.allclose(loaded.normalize(z), ae.normalize(z), atol=1e-6)
    AutoencoderKLWan.from_pretrained(tmp_path / "vae")  # diffusers ignores the "_" key
    new_autoencoder("wan", ARCH).save_pretrained(tmp_path / "video")
    assert load_autoencoder(tmp_path / "video").is_video  # a folder without the record stays a video model


@pytest.mark.parametrize("family", ["ours", "dc-ae"])
def test_per_frame_takes_a_video_family_only(family, tmp_path):
    with pytest.raises(ConfigError, match="model.per_frame"):
        load_config(None, [f"model.family={family}", "model.per_frame=true", f"out_dir={tmp_path}"])


def test_a_per_frame_run_trains_and_exports_a_per_frame_model(tmp_path):
    from kl_autoencoder.interface import load_autoencoder
    from training.train import main as train

    (tmp_path / "clips").mkdir()
    clips = clip_folder(tmp_path / "clips", 7, 16, 16)
    overrides = ["model.family=wan", "model.per_frame=true", f"data.source={clips}", "data.num_frames=3",
                 "data.resolution=16", "data.resize=16", "data.batch_size=1", "data.val_fraction=0.34",
                 "train.max_steps=2", "train.eval_every=2", "train.ema=false", "loss.lpips=off",
                 f"out_dir={tmp_path / 'run'}"]  # fmt: skip
    overrides += [f"model.arch.{k}={json.dumps(v)}" for k, v in ARCH.items()]
    assert train(load_config(None, overrides))["steps"] == 2  # 3 frames: a length only per frame takes here
    for folder in (tmp_path / "run", tmp_path / "run" / "diffusers"):
        ae = load_autoencoder(folder)
        assert not ae.is_video and ae.encode(clip(3)).mode().shape == (1, 4, 3, 8, 8)
