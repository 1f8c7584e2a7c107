"""Video through the commands and the step: clip metrics (first frame apart, flicker), `kl-ae eval` / `encode` /
`decode` / `reconstruct` / `probe` on a folder of clips, the loss stack on clips (LPIPS per frame on a subset, the
2-D discriminator per frame, the KL of a (B, C, t, h, w) posterior), rFVD's plumbing, and a decoder-only fine-tune
of a tiny Wan VAE on clips that keeps its encoder and normalization bit for bit.

The model is a tiny random causal Wan VAE (f4, t4, 4 channels); the clips are made here (a moving texture)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kl_ae.common.frames import fold_frames, per_frame, pick_frames
from kl_ae.common.metrics import clip_metrics, reconstruction_metrics
from kl_ae.common.video import probe_video, read_video

from .conftest import clip_folder

WAN = dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True],
           latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0], scale_factor_spatial=4)  # fmt: skip


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wan-t4")
    AutoencoderKLWan(**WAN).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return clip_folder(tmp_path_factory.mktemp("clips"), 13)


# ----------------------------------------------------------------------------- metrics


def test_first_frame_is_reported_apart_and_flicker_shows_in_frame_differences():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    # the same per-frame error, once steady (a constant offset) and once flickering (its sign alternates)
    steady = x + 0.1
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0]).view(1, 1, 5, 1, 1)
    flicker = x + 0.1 * sign
    m_steady, m_flicker = reconstruction_metrics(x, steady), reconstruction_metrics(x, flicker)
    assert torch.allclose(m_steady["psnr"], m_flicker["psnr"], atol=0.05)  # per-frame scores cannot tell
    assert (m_flicker["temporal_psnr"] < m_steady["temporal_psnr"] - 10).all()  # the frame differences can
    bad_first = x.clone()
    bad_first[:, :, 0] += 0.2
    m = reconstruction_metrics(x, bad_first)
    assert (m["psnr_first"] < m["psnr_rest"] - 10).all()
    assert torch.allclose(m["psnr"], per_frame(lambda a, b: clip_metrics(a[:, :, None], b[:, :, None])["psnr"],
                                               (x + 1) / 2, (bad_first.clamp(-1, 1) + 1) / 2).mean(1))  # fmt: skip


def test_frames_fold_into_the_batch_in_order():
    x = torch.arange(2 * 3 * 4 * 2 * 2, dtype=torch.float32).view(2, 3, 4, 2, 2)
    folded = fold_frames(x)
    assert folded.shape == (8, 3, 2, 2)
    assert torch.equal(folded[5], x[1, :, 1])  # clip 1, frame 1
    assert torch.equal(per_frame(lambda y: y.flatten(1)[:, 0], x), x[:, 0, :, 0, 0])
    a, b = pick_frames((x, x + 1), 2, torch.Generator().manual_seed(0))
    assert a.shape[2] == 2 and torch.equal(b, a + 1)  # the same frames of both


def test_a_folder_of_videos_alone_mixes_in_frames_as_images(clips):
    from kl_ae.common.config import DataConfig
    from kl_ae.common.data import build_datasets

    cfg = DataConfig(source=str(clips), num_frames=5, resolution=32, resize=40, batch_size=1, image_ratio=0.5,
                     val_fraction=0.34, repeats=8)  # fmt: skip
    train, _ = build_datasets(cfg, 0)
    shapes = [tuple(train[i].shape) for i in range(len(train))]
    assert set(shapes) == {(3, 5, 32, 32), (3, 1, 32, 32)}  # clips, and single frames of the videos as images


# ----------------------------------------------------------------------------- the loss stack on clips


def test_the_step_takes_clips_lpips_per_frame_on_a_subset_and_a_2d_discriminator(monkeypatch):
    from training.config import LossConfig
    from training.discriminator import PatchDiscriminator
    from training.losses import kl_loss
    from training.step import Forward, LossInputs, StepSchedule, generator_objective

    seen = []

    class Perceptual(torch.nn.Module):  # a stand-in for LPIPS: takes images only, records their count
        def forward(self, a, b):
            assert a.dim() == 4, "LPIPS must see frames, never clips"
            seen.append(len(a))
            return (a - b).abs().flatten(1).mean(1)

    torch.manual_seed(0)
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    recon = (x + 0.1 * torch.randn_like(x)).requires_grad_()
    mean = torch.randn(2, 4, 2, 4, 4)
    logvar = torch.randn(2, 4, 2, 4, 4) * 0.1

    class Posterior:
        pass

    post = Posterior()
    post.mean, post.logvar = mean, logvar
    disc = PatchDiscriminator(3, 8, 2)
    cfg = LossConfig(lpips_frames=2, kl_weight=1.0, disc_weight=1.0)
    conv = torch.nn.Conv3d(3, 3, 1)  # the "decoder's last layer" the adaptive weight is taken at
    recon_graph = conv(recon)
    inputs = LossInputs(torch.zeros(()), conv.weight, disc, Perceptual())
    loss, logs = generator_objective(Forward(x, recon_graph, post, {}), inputs, cfg, StepSchedule(disc_factor=1.0))
    assert seen == [4]  # 2 of 5 frames of each of 2 clips
    assert torch.isfinite(loss) and "train/g_adv" in logs
    # the KL term of a (B, C, t, h, w) posterior: torch.distributions' KL summed per clip, batch mean
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1).mean()
    assert torch.allclose(logs["train/kl"], expected, rtol=1e-5)
    assert torch.allclose(kl_loss(mean, logvar, "sum")[0], expected, rtol=1e-5)  # the term the loss adds


# ----------------------------------------------------------------------------- commands on a folder of clips


def test_eval_on_a_folder_of_videos(wan, clips, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from eval.evaluate import EvalConfig, evaluate

    out = tmp_path / "eval"
    m = evaluate(EvalConfig(model=str(wan), data=str(clips), frames=9, out=str(out), lpips="off", batch_size=2))
    rec = m["reconstruction"]
    assert m["num_images"] == 3 and m["frames"] == 9
    for key in ("psnr", "psnr_first_frame", "psnr_rest", "temporal_psnr"):
        assert math.isfinite(rec[key]), key
    assert rec["rfvd"]["available"] is False and len(rec["rfvd"]["reason"].splitlines()) == 1
    assert (out / "recon_model.mp4").is_file() and probe_video(out / "recon_model.mp4").frames == 9
    assert "<video" in (out / "report.html").read_text()
    with pytest.raises(Exception, match="1 \\+ 4k"):
        evaluate(EvalConfig(model=str(wan), data=str(clips), frames=8, out=str(out), lpips="off"))


def test_encode_decode_and_reconstruct_videos(wan, clips, tmp_path):
    from eval.latents import decode_dataset, encode_dataset, read_latents
    from eval.reconstruct import reconstruct
    from kl_autoencoder.interface import load_autoencoder

    out = encode_dataset(str(wan), str(clips), tmp_path / "latents", frames=9)
    table, settings = read_latents(out)
    assert settings["frames"] == 9 and settings["temporal_factor"] == 4 and len(table) == 3
    latent = torch.tensor(np.array(table.with_format("numpy")["latent"][0]))
    assert latent.shape == (4, 3, 10, 12)  # (C, 1 + 8/4, 40/4, 48/4)
    # normalized as WanPipeline does: (z - latents_mean) / latents_std of the clip's posterior mean
    ae = load_autoencoder(wan)
    x = read_video(clips / "clip0.mp4", 9)[0][None].float() / 127.5 - 1
    with torch.no_grad():
        assert torch.allclose(latent, ae.normalize(ae.encode(x).mode())[0], atol=1e-5)
    decoded = decode_dataset(str(wan), out, tmp_path / "decoded")
    videos = sorted(decoded.glob("*.mp4"))
    assert len(videos) == 3 and probe_video(videos[0]).frames == 9
    side = reconstruct(str(clips / "clip1.mp4"), str(wan), str(tmp_path / "side.mp4"))
    info = probe_video(side)
    assert (info.frames, info.width, info.height) == (13, 96, 40)  # all 13 frames (1 + 4 * 3), input | output


def test_encode_a_stream_of_videos_lists_bad_members(wan, clips, tmp_path):
    import io
    import tarfile

    from eval.latents import encode_dataset, read_latents
    from kl_ae.common.images import read_skipped

    members = [(f"{i:04d}.mp4", (clips / f"clip{i}.mp4").read_bytes()) for i in range(3)]
    members.insert(1, ("0100.mp4", b"not a video"))
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = encode_dataset(str(wan), str(tmp_path / "00000.tar"), tmp_path / "latents", frames=9, resolution=32)
    table, settings = read_latents(out)
    assert len(table) == 3 and settings["frames"] == 9
    assert np.array(table.with_format("numpy")["latent"][0]).shape == (4, 3, 8, 8)
    assert [k for k in read_skipped(out / "skipped.txt") if k.endswith("0100")]  # the bad member, listed


def test_probe_trains_on_video_latents(wan, clips, tmp_path):
    import eval.denoiser as dn
    from eval.probe import ProbeConfig, probe

    m = probe(ProbeConfig(model=str(wan), data=str(clips), frames=5, resolution=16, crops=1, steps=2,
                          batch_size=2, out=str(tmp_path / "probe")))  # fmt: skip
    assert m["latent_shape"] == [4 * 2, 4, 4]  # (C * t, h, w): 5 frames -> 2 latent frames in the channels
    assert math.isfinite(m["heldout_loss"]["mean"])
    assert m["fid"]["available"] is False
    # the denoiser is sized by a compute budget, not by the channel count alone
    assert dn.denoiser_size((512, 16, 16))["width"] == 512
    assert dn.denoiser_size((4, 16, 16))["width"] == 128


def test_rfvd_plumbing_with_a_random_i3d():
    pytest.importorskip("cdfvd")
    from cdfvd.third_party.i3d.pytorch_i3d import InceptionI3d

    from eval.clips import fvd_status_for
    from kl_ae.common.fvd import MIN_FRAMES, build_i3d, i3d_features

    net, why = build_i3d(download=False)  # no weights here: one line saying where to put them
    assert net is None and "i3d_pretrained_400.pt" in why and len(why.splitlines()) == 1
    torch.manual_seed(0)
    i3d = InceptionI3d(400, in_channels=3).eval()
    assert i3d_features(i3d, torch.rand(2, 3, MIN_FRAMES, 32, 32)).shape == (2, 400)
    assert fvd_status_for(i3d, "ok", MIN_FRAMES - 1)[0] is None


# ----------------------------------------------------------------------------- fine-tuning on clips


@pytest.mark.slow
def test_decoder_only_fine_tune_on_clips_keeps_encoder_and_normalization(wan, clips, tmp_path):
    from safetensors.torch import load_file

    from training.config import load_config
    from training.train import main as train

    out = tmp_path / "ft"
    cfg = load_config(None, [f"model.init_from={wan}", f"data.source={clips}", "data.num_frames=5",
                             "data.resolution=32", "data.batch_size=2", "data.val_fraction=0.34",
                             "train.trainable=decoder", "train.max_steps=3", "train.eval_every=3",
                             "train.ema=false", "loss.lpips=off", "loss.disc_start=100", f"out_dir={out}"])  # fmt: skip
    summary = train(cfg)
    assert summary["steps"] == 3
    before = load_file(wan / "diffusion_pytorch_model.safetensors")
    after = load_file(out / "diffusers" / "diffusion_pytorch_model.safetensors")
    encoder = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in decoder)
    config = json.loads((out / "diffusers" / "config.json").read_text())
    assert config["latents_mean"] == WAN["latents_mean"] and config["latents_std"] == WAN["latents_std"]
    wan_pipeline_makes_frames(out / "diffusers")


def wan_pipeline_makes_frames(folder: Path) -> None:
    """The folder loads strictly into AutoencoderKLWan and serves as the vae of diffusers' WanPipeline (a tiny
    random transformer, prompt embeddings given directly): frames come out."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    vae, info = AutoencoderKLWan.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=16,
        num_layers=1,
        rope_max_seq_len=32,
    )
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler())  # fmt: skip
    frames = pipe(prompt_embeds=torch.randn(1, 4, 16), height=32, width=32, num_frames=5, num_inference_steps=2,
                  guidance_scale=1.0, output_type="pt").frames  # fmt: skip
    assert frames.shape == (1, 5, 3, 32, 32) and torch.isfinite(frames).all()
