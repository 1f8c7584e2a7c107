"""Training new video autoencoders: Wan- and LTX-format models built from `model.arch` train and are released in their
class (loaded strictly, reconstructing as kl-ae's model does), the trained families are causal, and the PatchGAN
judges clips frame by frame (2-D) or over (T, H, W) (3-D).

Tiny random models on tiny clips made here (a texture sliding one pixel per frame)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .conftest import clip_folder, moving_clip

ARCH = {  # family -> (model.arch, a clip length it takes)
    "wan": (dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True]), 5),
    "ltx-video": (dict(latent_channels=8, block_out_channels=[8, 8, 8, 8], decoder_block_out_channels=[8, 8, 8, 8],
                       layers_per_block=[1, 1, 1, 1, 1], decoder_layers_per_block=[1, 1, 1, 1, 1],
                       spatio_temporal_scaling=[True, True, True, False],
                       decoder_spatio_temporal_scaling=[True, True, True, False], patch_size=1,
                       decoder_inject_noise=[False] * 5), 9),
}  # fmt: skip


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return clip_folder(tmp_path_factory.mktemp("clips"), 11, 32, 32)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["wan", "ltx-video"])
def test_a_new_video_vae_trains_and_its_release_loads_in_its_class(family, clips, tmp_path):
    import diffusers

    from kl_autoencoder.interface import BUILDABLE, load_autoencoder
    from training.config import load_config
    from training.train import main as train

    arch, frames = ARCH[family]
    overrides = [
        f"model.family={family}",
        f"data.source={clips}",
        f"data.num_frames={frames}",
        "data.resolution=32",
        "data.resize=32",
        "data.batch_size=1",
        "data.val_fraction=0.34",
        "train.max_steps=2",
        "train.eval_every=2",
        "train.ema=false",
        "loss.lpips=off",
        "loss.disc_start=1",
        "loss.disc_dims=3",
        "loss.disc_channels=8",
        f"out_dir={tmp_path / 'run'}",
    ]
    overrides += [f"model.arch.{k}={json.dumps(v)}" for k, v in arch.items()]  # fmt: skip
    assert train(load_config(None, overrides))["steps"] == 2
    folder = tmp_path / "run" / "diffusers"
    cls = getattr(diffusers, BUILDABLE[family])
    module, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ae = load_autoencoder(folder)
    x = moving_clip(frames, 32, 32)[None].float() / 127.5 - 1
    with torch.no_grad():
        ours = ae.decode(ae.encode(x).mode())
        temb = {"temb": torch.zeros(1)} if getattr(module.config, "timestep_conditioning", False) else {}
        theirs = module.eval().decode(module.encode(x).latent_dist.mode(), **temb).sample
    assert torch.allclose(ours, theirs, atol=1e-5)
    if family == "wan":  # WanPipeline sizes latents from these keys: they must match the architecture
        config = json.loads((folder / "config.json").read_text())
        assert (config["scale_factor_spatial"], config["scale_factor_temporal"]) == (4, 4)


@pytest.mark.parametrize("family", ["wan", "ltx-video"])
def test_trained_families_are_causal(family):
    from kl_autoencoder.interface import new_autoencoder

    torch.manual_seed(0)
    arch, frames = ARCH[family]
    ae = new_autoencoder(family, dict(arch, **({"decoder_causal": True} if family == "ltx-video" else {})))
    ae.module.eval()
    frames = 1 + 2 * ae.temporal_factor  # three latent frames
    x = torch.rand(1, 3, frames, 32, 32) * 2 - 1
    y = x.clone()
    y[:, :, -1] += 0.5  # the last frame changes: it belongs to the last latent frame only
    with torch.no_grad():
        zx, zy = ae.encode(x).mode(), ae.encode(y).mode()
        assert torch.equal(zx[:, :, :2], zy[:, :, :2])  # no earlier latent frame moves
        assert not torch.equal(zx[:, :, 2], zy[:, :, 2])
        z2 = zx.clone()
        z2[:, :, -1] += 0.5
        dx, dy = ae.decode(zx), ae.decode(z2)
    decoded_before = 1 + ae.temporal_factor  # the frames of the first two latent frames
    assert torch.equal(dx[:, :, :decoded_before], dy[:, :, :decoded_before])
    assert not torch.equal(dx[:, :, decoded_before:], dy[:, :, decoded_before:])


def test_the_patchgan_judges_frames_in_2d_and_clips_in_3d():
    from training.discriminator import PatchDiscriminator

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 32, 32)
    d2 = PatchDiscriminator(3, 8, 2, "group", dims=2)
    # 2-D: each frame on its own, as an image: the logits of frame 3 are those of frame 3 alone
    assert torch.equal(d2(x).view(2, 5, -1)[:, 3], d2(x[:, :, 3]).flatten(1))
    d3 = PatchDiscriminator(3, 8, 2, "group", dims=3)
    logits = d3(x)
    assert logits.shape[:3] == (2, 1, 5)  # one logit map per frame position
    y = x.clone()
    y[:, :, 4] += 1.0  # the last frame changes
    moved_3d = (d3(y) - logits).abs().flatten(3).amax(-1)[0, 0]  # (T,)
    moved_2d = (d2(y) - d2(x)).view(2, 5, -1).abs().amax(-1)[0]
    assert moved_2d[3] == 0 and moved_3d[3] > 0  # only the 3-D one sees across frames (motion)
    assert torch.equal(d3(x[:, :, :1]), d3(x[:, :, 0]))  # an image is a one-frame clip
