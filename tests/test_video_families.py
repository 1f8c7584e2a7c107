"""The interface takes video: causal video autoencoders (Wan, HunyuanVideo and 1.5, LTX-Video and LTX-2, CogVideoX)
behind the same adapters as the image families, offline, each a tiny random model of its diffusers class saved to a
folder and loaded through `load_autoencoder`.

Per family: encode / decode of a clip are the class's own calls; `normalize` is the pipeline's arithmetic; a
one-frame clip is the image path; a length the class cannot take is refused in one line; `tiling()` engages the
class's own tiles and windows (Wan's time chunks are exact); the measured normalization survives export and the
folder loads strictly. An image family takes a clip frame by frame.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch

from kl_ae.commands.info import info
from kl_autoencoder import Autoencoder
from kl_autoencoder.families.base import PointPosterior
from kl_autoencoder.interface import BUILDABLE, SUPPORTED, LatentAutoencoder, load_autoencoder, new_autoencoder

from .conftest import FAMILY_CONFIGS, VIDEO, tiny

PER_CHANNEL = {"wan", "ltx-video", "ltx2-video"}  # per-channel statistics; the others a scaling_factor alone
LTX = {"ltx-video", "ltx2-video"}
# the module attributes that make each class's tiling engage on 32 px frames and 17-frame clips: 24 px tiles every
# 16 px (2 x 2 tiles); HunyuanVideo's time windows 8 frames every 4
_TILES = dict(tile_sample_min_height=24, tile_sample_min_width=24, tile_sample_stride_height=16,
              tile_sample_stride_width=16)  # fmt: skip
SMALL_TILES = {
    "wan": _TILES,
    "hunyuan-video": dict(_TILES, tile_sample_min_num_frames=8, tile_sample_stride_num_frames=4),
    # the class's 16-frame windows (stride 8) already engage at 17 frames; smaller ones give a latent stride of 0
    "ltx-video": _TILES,
    "cogvideox": dict(tile_sample_min_height=24, tile_sample_min_width=24, tile_latent_min_height=3,
                      tile_latent_min_width=3, tile_overlap_factor_height=1 / 3, tile_overlap_factor_width=1 / 3),
    "hunyuan-video-1.5": dict(tile_sample_min_height=24, tile_sample_min_width=24, tile_latent_min_height=3,
                              tile_latent_min_width=3, tile_overlap_factor=1 / 3),
    "ltx2-video": _TILES,
}  # fmt: skip
SWITCHES = ("use_tiling", "use_framewise_encoding", "use_framewise_decoding")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on one torch thread (conftest)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Each tiny model saved by diffusers itself; LTX's statistics buffers set to something not trivial."""
    out = {}
    for name, (class_name, config, _, _) in VIDEO.items():
        torch.manual_seed(0)
        module = getattr(diffusers, class_name)(**config)
        if name in LTX:
            module.latents_mean.uniform_(-0.5, 0.5)
            module.latents_std.uniform_(0.5, 2.0)
        out[name] = tmp_path_factory.mktemp(name)
        module.save_pretrained(out[name])
    return out


def reference(name: str, folder: Path) -> torch.nn.Module:
    module = getattr(diffusers, VIDEO[name][0]).from_pretrained(folder).eval()
    # HunyuanVideo 1.5's causal attention mask does not broadcast over a batch of 2 (diffusers 0.42): its own
    # slicing calls it one clip at a time, as the adapter does
    module.use_slicing = name == "hunyuan-video-1.5"
    return module


def reference_decode(ref: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    # LTX with timestep_conditioning: LTXPipeline's default decode_timestep 0.0, one per clip
    temb = {"temb": torch.zeros(z.shape[0])} if ref.config.get("timestep_conditioning") else {}
    return ref.decode(z, **temb).sample


def clip(n: int, frames: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", VIDEO)
@torch.no_grad()
def test_encode_decode_are_the_class_calls(name, folders):
    ae, ref = load_autoencoder(folders[name]), reference(name, folders[name])
    class_name, _, frames, tf = VIDEO[name]
    assert isinstance(ae, LatentAutoencoder) and SUPPORTED[class_name] == ae.family == name
    assert ae.is_video and ae.temporal_factor == tf
    x = clip(2, frames)
    posterior = ae.encode(x)
    z = posterior.mode()
    f = ae.spatial_factor
    assert z.shape == (2, ae.latent_channels, 1 + (frames - 1) // tf, 32 // f, 32 // f)
    dist = ref.encode(x).latent_dist
    assert max_diff(z, dist.mode()) <= 1e-5 and max_diff(posterior.logvar, dist.logvar) <= 1e-5
    # diffusers' kl() sums dims 1-3 only, which for a 5-D posterior leaves w out: sum it all here
    kl = 0.5 * (dist.mean**2 + dist.var - 1 - dist.logvar).sum((1, 2, 3, 4))
    assert posterior.kl().shape == (2,) and torch.allclose(posterior.kl(), kl, rtol=1e-5)
    a, b = posterior.sample(torch.Generator().manual_seed(1)), dist.sample(torch.Generator().manual_seed(1))
    assert max_diff(a, b) <= 1e-5
    y = ae.decode(z)
    assert y.shape == x.shape and max_diff(y, reference_decode(ref, z)) <= 1e-5


def pipeline_normalize(name: str, vae: torch.nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalized z, and z back from it) as each family's diffusers pipeline computes them."""
    c = vae.config
    if name == "wan":  # WanImageToVideoPipeline.prepare_latents; WanPipeline.__call__ (decoding)
        latents_mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1)
        latents_std = 1.0 / torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1)
        latents = (z - latents_mean) * latents_std
        return latents, latents / latents_std + latents_mean
    if name in LTX:
        if name == "ltx-video":
            from diffusers.pipelines.ltx.pipeline_ltx import LTXPipeline as Pipeline
        else:
            from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline as Pipeline
        latents = Pipeline._normalize_latents(z, vae.latents_mean, vae.latents_std, c.scaling_factor)
        return latents, Pipeline._denormalize_latents(latents, vae.latents_mean, vae.latents_std, c.scaling_factor)
    # HunyuanVideoImageToVideoPipeline: image_latents * vae_scaling_factor; HunyuanVideoPipeline: latents /
    # vae.config.scaling_factor (HunyuanVideo15Pipeline and its image-to-video alike). CogVideoXVideoToVideoPipeline:
    # vae_scaling_factor_image * init_latents; decode_latents: 1 / vae_scaling_factor_image * latents
    latents = z * c.scaling_factor
    return latents, (1 / c.scaling_factor * latents if name == "cogvideox" else latents / c.scaling_factor)


@pytest.mark.parametrize("name", VIDEO)
@torch.no_grad()
def test_normalize_is_the_pipelines(name, folders):
    ae = load_autoencoder(folders[name])
    z = ae.encode(clip(2, VIDEO[name][2])).mode()
    latents, back = pipeline_normalize(name, ae.module, z)
    assert torch.equal(ae.normalize(z), latents)
    assert max_diff(ae.denormalize(latents), back) <= 1e-6 and max_diff(back, z) <= 1e-5
    # an image's latents (B, C, h, w) are one frame's: the same arithmetic
    assert torch.equal(ae.normalize(z[:, :, 0]), latents[:, :, 0])
    assert torch.equal(ae.denormalize(latents[:, :, 0]), ae.denormalize(latents)[:, :, 0])


@pytest.mark.parametrize("name", VIDEO)
@torch.no_grad()
def test_a_one_frame_clip_is_the_image_path(name, folders):
    ae = load_autoencoder(folders[name])
    x = clip(2, 1)  # (2, 3, 1, 32, 32)
    clip_posterior, image_posterior = ae.encode(x), ae.encode(x[:, :, 0])
    z = image_posterior.mode()
    assert z.dim() == 4 and torch.equal(clip_posterior.mode()[:, :, 0], z)
    assert torch.equal(clip_posterior.logvar[:, :, 0], image_posterior.logvar)
    assert torch.equal(clip_posterior.kl(), image_posterior.kl())
    y = ae.decode(z)
    assert y.shape == (2, 3, 32, 32) and torch.equal(ae.decode(z[:, :, None])[:, :, 0], y)


@pytest.mark.parametrize("name", VIDEO)
def test_a_length_the_class_cannot_take_is_refused(name, folders):
    ae = load_autoencoder(folders[name])
    step = 8 if name in ("ltx-video", "ltx2-video", "cogvideox") else 4
    lengths = ", ".join(str(1 + step * k) for k in range(5))
    message = rf"^{VIDEO[name][0]} takes clips of 1 \+ {step}k frames \({lengths}, \.\.\.\), got 8$"
    with pytest.raises(ValueError, match=message):
        ae.encode(torch.zeros(1, 3, 8, 32, 32))
    with pytest.raises(ValueError, match=message):
        ae.check_frames(8)
    with pytest.raises(ValueError, match="got 0"):
        ae.check_frames(0)
    ae.check_frames(1)
    ae.check_frames(1 + 2 * step)
    assert [ae.longest_frames(n) for n in (1, 8, 9, 20)] == {4: [1, 5, 9, 17], 8: [1, 1, 9, 17]}[step]
    if name == "cogvideox":  # an even number of latent frames would decode to 4t frames
        with pytest.raises(ValueError, match="odd number of latent frames"):
            ae.decode(torch.zeros(1, 4, 2, 4, 4))


@pytest.mark.parametrize("name", VIDEO)
def test_a_decoder_only_step_keeps_the_latent_space(name, folders):
    ae = load_autoencoder(folders[name])
    groups = ae.param_groups()
    ids = {k: {id(p) for p in v} for k, v in groups.items()}
    assert ids["encoder"] | ids["decoder"] == {id(p) for p in ae.module.parameters()}  # no parameter in neither
    assert not ids["encoder"] & ids["decoder"] and groups["decoder_head"] and ids["decoder_head"] <= ids["decoder"]
    assert len(groups["normalization"]) == (2 if name in LTX else 0)  # LTX's statistics buffers
    encoder, stats = [[t.detach().clone() for t in groups[k]] for k in ("encoder", "normalization")]
    ae.freeze(["decoder"])
    ae.module.train()
    x = clip(1, VIDEO[name][2])
    posterior = ae.encode(x)
    z = ae.denormalize(ae.normalize(posterior.sample(torch.Generator().manual_seed(0))))
    loss = (ae.decode(z) - x).square().mean() + 1e-6 * posterior.kl().mean()
    loss.backward()
    assert all(p.grad is None for p in groups["encoder"])
    assert all(p.grad is not None for p in groups["decoder_head"] if p.requires_grad)
    torch.optim.SGD([p for p in ae.module.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(a, b) for a, b in zip(encoder + stats, groups["encoder"] + groups["normalization"]))


def counting(module: torch.nn.Module) -> list[int]:
    """A counter of the calls of the module's encoder and decoder."""
    calls = [0]
    for part in (module.encoder, module.decoder):
        part.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("name", VIDEO)
@torch.no_grad()
def test_tiling_runs_the_class_tiles(name, folders):
    """tiling() engages the class's own tiles and time windows, and tiling(False) gives the whole pass back.

    Blended tiles of a random model are far from its whole pass (a relative L2 error of 0.17-1.2 measured: its
    receptive field and GroupNorms span the whole 32 px frame), so the only tolerance stated here is a sanity bound;
    what tiling must match exactly is the class's own tiled call."""
    ae, ref = load_autoencoder(folders[name]), reference(name, folders[name])
    x, calls = clip(1, 17), counting(ae.module)
    for switch in SWITCHES:  # the whole pass: as loaded (HunyuanVideo's class starts framewise; the adapter not)
        if hasattr(ref, switch):
            setattr(ref, switch, False)
    z0 = ae.encode(x).mode()
    y0 = ae.decode(z0)
    assert max_diff(z0, ref.encode(x).latent_dist.mode()) <= 1e-5
    assert max_diff(y0, reference_decode(ref, z0)) <= 1e-5
    whole_calls = calls[0]

    for module in (ae.module, ref):
        for key, value in SMALL_TILES[name].items():
            setattr(module, key, value)
    ae.tiling(True)
    switches = [switch for switch in SWITCHES if hasattr(ref, switch)]
    assert all(getattr(ae.module, switch) for switch in switches)  # spatial tiles, and time windows where it has them
    for switch in switches:
        setattr(ref, switch, True)
    calls[0] = 0
    z, y = ae.encode(x).mode(), ae.decode(z0)
    assert calls[0] > whole_calls  # tiles, windows: more encoder / decoder calls than the whole pass
    assert max_diff(z, ref.encode(x).latent_dist.mode()) <= 1e-5
    assert max_diff(y, reference_decode(ref, z0)) <= 1e-5
    for tiled, whole in ((z, z0), (y, y0)):  # blended: a sanity bound only (see the docstring)
        assert torch.isfinite(tiled).all() and (tiled - whole).norm() / whole.norm() < 2

    ae.tiling(False)
    assert torch.equal(ae.encode(x).mode(), z0) and torch.equal(ae.decode(z0), y0)


@torch.no_grad()
def test_wan_time_chunks_are_exact(folders):
    """Wan encodes 4 frames at a time and decodes one latent frame at a time through its causal cache: a clip's
    first frames come out exactly as that shorter clip's, so chunked is what a whole causal pass would give."""
    ae = load_autoencoder(folders["wan"])
    x = clip(1, 17)
    z = ae.encode(x).mode()
    assert z.shape[2] == 5
    assert max_diff(ae.encode(x[:, :, :5]).mode(), z[:, :, :2]) <= 1e-5
    assert max_diff(ae.decode(z[:, :, :2]), ae.decode(z)[:, :, :5]) <= 1e-5


def image_family(kind: str, folder: Path) -> LatentAutoencoder:
    """Our tiny KL or VQ model, or a tiny FLUX.2 (normalization patchifies), saved and loaded."""
    torch.manual_seed(0)
    if kind == "flux2":
        class_name, config = FAMILY_CONFIGS["flux2"]
        module = getattr(diffusers, class_name)(**config)
        module.bn.running_mean.uniform_(-0.5, 0.5)
        module.bn.running_var.uniform_(0.5, 2.0)
        module.save_pretrained(folder)
    else:
        Autoencoder(tiny("tiny-vq", num_codes=16) if kind == "vq" else tiny("tiny")).save_pretrained(folder)
    return load_autoencoder(folder)


@pytest.mark.parametrize("kind", ["kl", "vq", "flux2"])
@torch.no_grad()
def test_an_image_family_takes_a_clip_frame_by_frame(kind, tmp_path):
    ae = image_family(kind, tmp_path)
    assert not ae.is_video and ae.temporal_factor == 1
    ae.check_frames(6)
    assert ae.longest_frames(6) == 6
    with pytest.raises(ValueError, match=r"takes clips of any number of frames >= 1 \(frame by frame\), got 0$"):
        ae.check_frames(0)
    x = clip(2, 3)  # (2, 3, 3, 32, 32)
    posterior = ae.encode(x)
    frames = [ae.encode(x[:, :, t]) for t in range(3)]
    z = posterior.mode()
    assert z.shape[:3] == (2, ae.latent_channels, 3)
    for t, frame in enumerate(frames):
        assert max_diff(z[:, :, t], frame.mode()) <= 1e-6
        if kind != "vq":
            assert max_diff(posterior.logvar[:, :, t], frame.logvar) <= 1e-6
    assert isinstance(posterior, PointPosterior) == (kind == "vq")
    assert torch.allclose(posterior.kl(), sum(frame.kl() for frame in frames), rtol=1e-5)
    y = ae.decode(z)
    assert y.shape == x.shape and max_diff(y[:, :, 1], ae.decode(z[:, :, 1])) <= 1e-6
    latents = ae.normalize(z)  # FLUX.2: each frame patchified, (2, 4C, 3, h/2, w/2)
    assert max_diff(latents[:, :, 2], ae.normalize(z[:, :, 2])) <= 1e-6
    assert max_diff(ae.denormalize(latents), z) <= 1e-5


@pytest.mark.parametrize("name", VIDEO)
@torch.no_grad()
def test_measured_normalization_survives_export(name, folders, tmp_path):
    ae = load_autoencoder(folders[name])
    frames = VIDEO[name][2]
    updates = ae.measure_normalization(ae.encode(clip(2, frames, seed)).mode() for seed in (1, 2))
    ae.set_normalization(updates)
    out = ae.save_pretrained(tmp_path / "out", extra_config={"_kl_ae_export": {"data": "test"}})
    assert json.loads((out / "config.json").read_text())["_kl_ae_export"] == {"data": "test"}
    exported = load_autoencoder(out)
    values = exported.normalization()
    for key, value in updates.items():
        assert torch.allclose(torch.tensor(values[key], dtype=torch.float64), torch.tensor(value, dtype=torch.float64))
    held_in = torch.cat([exported.normalize(exported.encode(clip(2, frames, s)).mode()) for s in (1, 2)]).double()
    if name in PER_CHANNEL:  # every channel of the measured latents is unit
        per_channel = held_in.transpose(0, 1).flatten(1)
        assert per_channel.mean(1).abs().max() < 1e-4 and (per_channel.std(1, correction=0) - 1).abs().max() < 1e-4
    else:  # a scaling_factor alone: the mean square of all values is 1
        assert abs(held_in.square().mean().sqrt() - 1) < 1e-4
    module, loading = getattr(diffusers, VIDEO[name][0]).from_pretrained(out, output_loading_info=True)
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched keys
    if name in LTX:  # the statistics are what the pipeline reads: the module's buffers
        assert torch.allclose(module.latents_mean.double(), torch.tensor(updates["latents_mean"]).double())


@pytest.mark.parametrize("family", ["wan", "ltx-video"])
def test_build_a_new_video_model(family):
    arch = {"wan": VIDEO["wan"][1], "ltx-video": VIDEO["ltx-video"][1]}[family]
    ae = new_autoencoder(family, arch)
    assert (ae.family, ae.class_name, ae.is_video) == (family, BUILDABLE[family], True)
    assert ae.module.training and ae.temporal_factor == VIDEO[family][3]
    with pytest.raises(ValueError, match="takes no argument"):
        new_autoencoder(family, {"not_an_argument": 1})


@pytest.mark.parametrize("name, line", [
    ("wan", "temporal factor:  4 (clips: 1 + 4k frames (1, 5, 9, 13, ...))"),
    ("ltx-video", "temporal factor:  8 (clips: 1 + 8k frames (1, 9, 17, 25, ...))"),
    ("cogvideox", "temporal factor:  4 (clips: 1 + 8k frames (1, 9, 17, 25, ...))"),
])  # fmt: skip
def test_info_names_the_clip_lengths(name, line, folders):
    text = info(str(folders[name]))
    assert f"family:           {name} ({VIDEO[name][0]})" in text and line in text


@torch.no_grad()
def test_our_model_tiles_through_its_own_tiling(tmp_path):
    """tiling() on our model: images (each frame of a clip) larger than the tile go through kl_autoencoder.tiling."""
    from kl_autoencoder.tiling import decode_tiled, encode_tiled

    ae = image_family("kl", tmp_path)
    x = clip(1, 2, size=64)
    whole = ae.encode(x).mode()
    ae.tile = 32  # 256 px by default: engage it at 64 px
    ae.tiling(True)
    z = ae.encode(x).mode()
    for t in range(2):
        assert max_diff(z[:, :, t], encode_tiled(ae.module, x[:, :, t], 32).mode()) <= 1e-5
        assert max_diff(ae.decode(z)[:, :, t], decode_tiled(ae.module, z[:, :, t], 32)) <= 1e-5
    assert max_diff(z, whole) > 1e-3  # it engaged
    ae.tiling(False)
    assert torch.equal(ae.encode(x).mode(), whole)
