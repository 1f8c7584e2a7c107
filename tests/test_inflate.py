"""Inflating an image autoencoder into a causal video VAE (`kl_autoencoder/inflate.py`, `kl-ae inflate`): a one-frame
clip goes through the video model as the image went through the image model; at step 0 no kernel looks back at an
earlier frame; later frames never reach earlier chunks; the folder loads strictly, and through `load_autoencoder`."""

import pytest
import torch
from safetensors.torch import load_file

from kl_autoencoder import Autoencoder
from kl_autoencoder.inflate import CLASS_NAME, inflate, one_frame_gap
from kl_autoencoder.interface import load_autoencoder

from .conftest import FAMILY_CONFIGS, tiny

EXACT = 1e-5
_SD = dict(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1,
           block_out_channels=(8, 16, 16), norm_num_groups=4, sample_size=32,
           mid_block_add_attention=False)  # fmt: skip
# image models CogVideoX's class holds exactly: no attention, no post_quant_conv bias (see `kl_autoencoder/inflate.py`)
IMAGE_MODELS = {
    "sd": dict(_SD, latent_channels=4, scaling_factor=0.18215),  # quant convs: folded into the convs beside them
    "flux": dict(_SD, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1,
                 scaling_factor=0.5),  # SD3 / FLUX.1's layout
}  # fmt: skip


def image_model(tmp_path, name: str) -> Autoencoder:
    """A tiny random image model, saved as a diffusers `AutoencoderKL` folder by diffusers itself ("sd", "flux") or
    by us ("ours", the `tiny` preset at test width: f4), and loaded back as our model."""
    torch.manual_seed(0)
    folder = tmp_path / name
    if name == "ours":
        config = tiny("tiny", mid_attention=False, use_post_quant_conv=False, sample_size=32)  # quant_conv: folded
        Autoencoder(config).save_pretrained(folder)
    else:
        from diffusers import AutoencoderKL

        module = AutoencoderKL(**IMAGE_MODELS[name])
        if module.post_quant_conv is not None:
            torch.nn.init.zeros_(module.post_quant_conv.bias)
        module.save_pretrained(folder)
    return Autoencoder.from_pretrained(folder)


def images(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("name", ["sd", "flux", "ours"])
def test_a_one_frame_clip_is_the_image_model(tmp_path, name):
    model = image_model(tmp_path, name)
    inflation = inflate(model)
    gap = one_frame_gap(model, inflation.module, images())
    assert gap["mean"] <= EXACT and gap["decode"] <= EXACT, gap
    assert all("attention" not in n and "post_quant_conv" not in n for n in inflation.notes), inflation.notes


def clip_pair(frame: int, frames: int = 17) -> tuple[torch.Tensor, torch.Tensor]:
    """A random clip (1, 3, frames, 16, 16) and a copy whose `frame` is another random frame."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, frames, 16, 16, generator=g) * 2 - 1
    y = x.clone()
    y[:, :, frame] = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    return x, y


@torch.no_grad()
def changed_frames(video, x: torch.Tensor, y: torch.Tensor) -> tuple[list[int], list[int]]:
    """The latent frames and the decoded frames that differ between clips x and y."""
    zx, zy = video.encode(x).latent_dist.mean, video.encode(y).latent_dist.mean
    dx, dy = video.decode(zx).sample, video.decode(zy).sample
    assert zx.shape == (1, 4, 5, 4, 4) and dx.shape == (1, 3, 17, 16, 16)  # f4 t4: 17 frames are 5 latent frames
    latent = [t for t in range(zx.shape[2]) if not torch.equal(zx[:, :, t], zy[:, :, t])]
    return latent, [t for t in range(dx.shape[2]) if not torch.equal(dx[:, :, t], dy[:, :, t])]


def test_clips_are_causal_and_at_step_0_no_kernel_looks_back(tmp_path):
    """17 frames go through the class in two chunks (frames 0-8 and 9-16, latent frames 0-2 and 3-4) with a cache of
    the frames before. Causal: the last frame changes neither the first chunk's latents nor its 9 decoded frames.
    Tail init: frame 8 reaches the second chunk only through kernel taps on earlier frames, zero at step 0.
    (Within a chunk, the class's GroupNorm statistics span its frames: docs/video.md.)"""
    video = inflate(image_model(tmp_path, "sd")).module
    latent, decoded = changed_frames(video, *clip_pair(16))
    assert latent == [3, 4] and decoded == list(range(9, 17)), (latent, decoded)
    latent, decoded = changed_frames(video, *clip_pair(8))
    assert latent == [0, 1, 2] and decoded == list(range(9)), (latent, decoded)


def test_the_folder_loads_strictly_and_through_load_autoencoder(tmp_path):
    from diffusers import AutoencoderKLCogVideoX

    model = image_model(tmp_path, "flux")
    inflation = inflate(model, temporal_factor=2)
    out = tmp_path / "video"
    inflation.module.save_pretrained(out)
    module = AutoencoderKLCogVideoX.from_config(AutoencoderKLCogVideoX.load_config(out))
    module.load_state_dict(load_file(out / "diffusion_pytorch_model.safetensors"), strict=True)
    video = load_autoencoder(out)
    assert (video.family, video.class_name, video.temporal_factor, video.spatial_factor) == ("cogvideox", CLASS_NAME,
                                                                                             2, 4)  # fmt: skip
    assert video.config["scaling_factor"] == 0.5 and video.latent_channels == 16
    x = images()
    with torch.no_grad():
        z = model.encode(x).mean
        assert (video.encode(x).mean - z).abs().max() <= EXACT  # an image is a one-frame clip to a video family
        assert (video.decode(z) - model.decode(z)).abs().max() <= EXACT
        assert torch.allclose(video.normalize(z), z * 0.5)  # no shift: CogVideoX's pipelines apply none
    assert any("shift_factor 0.1 dropped" in n for n in inflation.notes)


def test_what_the_class_cannot_hold_is_said(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**dict(IMAGE_MODELS["sd"], mid_block_add_attention=True)).save_pretrained(tmp_path / "sd")
    model = Autoencoder.from_pretrained(tmp_path / "sd")
    inflation = inflate(model)
    attention, bias = inflation.notes
    assert "2 dropped (decoder.mid_block.attentions.0, encoder.mid_block.attentions.0)" in attention
    assert "post_quant_conv folded into decoder.conv_in" in bias
    assert one_frame_gap(model, inflation.module, images())["decode"] > 1e-2
    with pytest.raises(ValueError, match=r"temporal factor 8 is not one of \[1, 2, 4\]"):
        inflate(model, temporal_factor=8)


def test_the_command(tmp_path, capsys):
    from kl_ae.commands.cli import main

    image_model(tmp_path, "ours")
    assert main(["inflate", str(tmp_path / "ours"), "--out", str(tmp_path / "video")]) == 0
    out = capsys.readouterr()
    assert "AutoencoderKLCogVideoX, f4 t4, 4 latent channels; clips of 1 + 8k frames" in out.out
    assert "(exact: <= 1e-05;" in out.out and "data.num_frames=17" in out.out and out.err == ""
    assert load_autoencoder(tmp_path / "video").config["_inflated_from"] == str(tmp_path / "ours")

    assert main(["inflate", str(tmp_path / "ours"), "--out", str(tmp_path / "v3"), "--temporal-factor", "3"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("family", ["wan", "dc-ae"])
def test_a_non_kl_model_is_one_line(tmp_path, capsys, family):
    import diffusers

    from kl_ae.commands.cli import main

    class_name, config = FAMILY_CONFIGS[family]
    getattr(diffusers, class_name)(**config).save_pretrained(tmp_path / family)
    assert main(["inflate", str(tmp_path / family), "--out", str(tmp_path / "video")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"not {class_name}" in err and not (tmp_path / "video").exists()


def test_why_not_hunyuan_video():
    """HunyuanVideo's class keeps SD's mid-block attention, but no SD weights inflate into it exactly: its causal
    convs pad space by replication (SD: zeros), and its stride-2 downsampler pads 1 on every side (SD: 0, 1), a grid
    one pixel off. If diffusers changes either, this fails, and HunyuanVideo may be the better target."""
    import torch.nn.functional as F
    from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import HunyuanVideoCausalConv3d

    from kl_autoencoder.inflate import tail

    torch.manual_seed(0)
    w, x = torch.randn(4, 4, 3, 3), torch.randn(1, 4, 8, 8)
    for stride, sd_pad, wrong in ((1, (1, 1, 1, 1), "border"), (2, (0, 1, 0, 1), "everywhere")):
        conv = HunyuanVideoCausalConv3d(4, 4, 3, stride=(1, stride, stride), bias=False)
        conv.conv.weight.data = tail(w, 3)
        with torch.no_grad():
            diff = (conv(x[:, :, None])[:, :, 0] - F.conv2d(F.pad(x, sd_pad), w, stride=stride)).abs()
        assert diff[..., 1:-1, 1:-1].max() <= EXACT if wrong == "border" else diff[..., 1:-1, 1:-1].min() > 0
        assert diff.max() > 0.1
