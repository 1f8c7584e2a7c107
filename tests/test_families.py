"""Every autoencoder family behind one interface, offline: a tiny random model of each diffusers class is saved
to a folder and loaded through `load_autoencoder`.

Per family: encode / decode equal the diffusers class's own calls; `normalize` is the family pipeline's
arithmetic; the export round trip loads strictly into the same class; a hub name resolves through the same
code; a decoder-only fine-tune leaves the encoder (and FLUX.2's BatchNorm statistics) bit-identical; measured
normalization makes held-out latents unit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file

from kl_ae.commands.info import describe, info
from kl_ae.common.config import ConfigError
from kl_autoencoder.interface import SUPPORTED, LatentAutoencoder, load_autoencoder

from .conftest import FAMILY_CONFIGS as TINY

FAMILY = {"sd": "kl", "sd3": "kl"}  # the adapter's family name where it differs from the test name
FRAMES = {"qwen-image", "wan"}  # video VAEs: an image is one frame (B, C, 1, H, W)
DETERMINISTIC = {"dc-ae", "rae"}
PER_CHANNEL = {"flux2", "qwen-image", "wan", "rae"}  # normalization conventions with per-channel statistics
SCALE_ONLY = {"dc-ae", "hunyuan-image"}  # a scaling_factor without a shift
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def reference(name: str, folder: Path) -> torch.nn.Module:
    return getattr(diffusers, TINY[name][0]).from_pretrained(folder).eval()


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # (n, 3, 32, 32)


def reference_encode(name: str, ref, x: torch.Tensor):
    """The diffusers class's own encode of our images, as its pipeline calls it: (posterior or None, latents)."""
    if name in FRAMES:
        dist = ref.encode(x[:, :, None]).latent_dist
        return dist, dist.mode()[:, :, 0]
    if name == "rae":  # RAE takes [0, 1] images and returns normalized latents
        return None, ref.encode((x + 1) / 2).latent
    if name == "dc-ae":
        return None, ref.encode(x).latent
    dist = ref.encode(x).latent_dist
    return dist, dist.mode()


def reference_decode(name: str, ref, z: torch.Tensor) -> torch.Tensor:
    if name in FRAMES:
        return ref.decode(z[:, :, None]).sample[:, :, 0]
    if name == "rae":
        return ref.decode(z).sample * 2 - 1
    return ref.decode(z).sample


def pipeline_normalize(name: str, ref, z: torch.Tensor) -> torch.Tensor:
    """Raw latents normalized as each family's diffusers pipeline does it, written from the pipelines' code."""
    c = ref.config
    if name == "flux2":
        from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

        p = Flux2Pipeline._patchify_latents(z)
        mean = ref.bn.running_mean.view(1, -1, 1, 1)
        return (p - mean) / torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + c.batch_norm_eps)
    if name in FRAMES:  # QwenImagePipeline / WanPipeline, on (B, C, 1, h, w)
        mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1)
        return ((z[:, :, None] - mean) * inv_std)[:, :, 0]
    if name in SCALE_ONLY:
        return z * c.scaling_factor
    return (z - (c.shift_factor or 0.0)) * c.scaling_factor  # SD3 / FLUX.1 (SD: no shift)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_encode_decode_equal_diffusers(name, family_folders):
    ae, ref = load_autoencoder(family_folders[name]), reference(name, family_folders[name])
    assert isinstance(ae, LatentAutoencoder)
    assert (ae.family, ae.class_name) == (FAMILY.get(name, name), TINY[name][0])
    x = images()
    posterior = ae.encode(x)
    z = posterior.mode()
    assert z.shape == (2, ae.latent_channels, 32 // ae.spatial_factor, 32 // ae.spatial_factor)
    dist, latents = reference_encode(name, ref, x)
    if name == "rae":
        assert max_diff(ae.normalize(z), latents) <= 1e-5
        assert max_diff(ae.decode(z), reference_decode(name, ref, latents)) <= 1e-5
    else:
        assert max_diff(z, latents) <= 1e-5
        assert max_diff(ae.decode(z), reference_decode(name, ref, latents)) <= 1e-5
    if name in DETERMINISTIC:
        assert posterior.logvar is None and torch.equal(posterior.sample(), z)
        assert torch.equal(posterior.kl(), torch.zeros(2))
    else:
        logvar = dist.logvar[:, :, 0] if name in FRAMES else dist.logvar
        assert max_diff(posterior.logvar, logvar) <= 1e-5
        # diffusers' kl() sums dims 1-3 only, which for a 5-D posterior leaves w out: sum it all here
        kl = dist.kl() if name not in FRAMES else 0.5 * (dist.mean**2 + dist.var - 1 - dist.logvar).sum((1, 2, 3, 4))
        assert torch.allclose(posterior.kl(), kl, rtol=1e-5)
        a, b = posterior.sample(torch.Generator().manual_seed(1)), dist.sample(torch.Generator().manual_seed(1))
        assert max_diff(a, b[:, :, 0] if name in FRAMES else b) <= 1e-5


@pytest.mark.parametrize("name", [n for n in TINY if n != "rae"])  # RAE's is checked against its encode above
@torch.no_grad()
def test_normalize_is_the_pipelines(name, family_folders):
    ae, ref = load_autoencoder(family_folders[name]), reference(name, family_folders[name])
    z = ae.encode(images()).mode()
    latents = ae.normalize(z)
    assert torch.equal(latents, pipeline_normalize(name, ref, z))
    if name == "flux2":  # what the transformer sees: 2x2-patchified, 4x the channels
        assert latents.shape == (2, 4 * ae.latent_channels, z.shape[2] // 2, z.shape[3] // 2)
    assert max_diff(ae.denormalize(latents), z) <= 1e-5


def load_strictly(name: str, folder: Path) -> torch.nn.Module:
    cls = getattr(diffusers, TINY[name][0])
    module = cls.from_config(cls.load_config(folder))
    module.load_state_dict(load_file(str(folder / "diffusion_pytorch_model.safetensors")), strict=True)
    return module.eval()


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_export_round_trip(name, family_folders, tmp_path):
    ae = load_autoencoder(family_folders[name])
    out = ae.save_pretrained(tmp_path / "out", extra_config={"_kl_ae_export": {"data": "test"}})
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == TINY[name][0] and config["_kl_ae_export"] == {"data": "test"}
    module = load_strictly(name, out)
    x = images()
    _, latents = reference_encode(name, module, x)
    z = ae.encode(x).mode()
    assert max_diff(ae.normalize(z) if name == "rae" else z, latents) <= 1e-5
    assert max_diff(ae.decode(z), reference_decode(name, module, latents)) <= 1e-5
    with pytest.raises(ValueError, match=r"extra_config keys \['not_an_argument'\]"):
        ae.save_pretrained(tmp_path / "bad", extra_config={"not_an_argument": 1})


@pytest.mark.parametrize("name", TINY)
def test_hub_name_resolves(name, family_folders, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--org--pipe"
    shutil.copytree(family_folders[name], repo / "snapshots" / COMMIT / "vae")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    ae, local = load_autoencoder("org/pipe", subfolder="vae"), load_autoencoder(family_folders[name])
    assert ae.class_name == TINY[name][0]
    theirs = local.module.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in ae.module.state_dict().items())
    assert load_autoencoder("org/pipe/vae").class_name == TINY[name][0]


def snapshot(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


@pytest.mark.parametrize("name", TINY)
def test_decoder_only_fine_tune_keeps_the_latent_space(name, family_folders):
    ae = load_autoencoder(family_folders[name])
    groups = ae.param_groups()
    everything = {id(p) for p in ae.module.parameters()}
    assert {id(p) for p in groups["encoder"] + groups["decoder"]} == everything  # no parameter in neither
    assert not {id(p) for p in groups["encoder"]} & {id(p) for p in groups["decoder"]}
    assert {id(p) for p in groups["decoder_head"]} <= {id(p) for p in groups["decoder"]} and groups["decoder_head"]
    encoder, stats, decoder = (snapshot(groups[k]) for k in ("encoder", "normalization", "decoder"))

    ae.freeze(["decoder"])
    ae.module.train()  # as training runs it: dropout, BatchNorm and RAE's noise in training mode
    optimizer = torch.optim.Adam([p for p in ae.module.parameters() if p.requires_grad], lr=1e-3)
    for step in range(3):
        x = images(2, seed=step)
        posterior = ae.encode(x)
        z = ae.denormalize(ae.normalize(posterior.sample(torch.Generator().manual_seed(step))))
        loss = (ae.decode(z) - x).square().mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    assert all(torch.equal(a, b) for a, b in zip(encoder, groups["encoder"]))
    assert all(torch.equal(a, b) for a, b in zip(stats, groups["normalization"]))
    assert any(not torch.equal(a, b) for a, b in zip(decoder, groups["decoder"]))
    if name == "flux2":
        assert len(stats) == 2  # the BatchNorm's running mean and variance were checked
    with pytest.raises(ValueError, match="trainable groups are"):
        ae.freeze(["decoder", "bottleneck"])


def test_rae_keeps_its_encoder_frozen(family_folders):
    ae = load_autoencoder(family_folders["rae"])
    with pytest.raises(ValueError, match="frozen pretrained representation"):
        ae.freeze(["encoder", "decoder"])
    with pytest.raises(ValueError, match="decodes to 32x32 only"):
        ae.check_size(64, 64)


# per-channel conventions need many values per channel for held-out means within 0.05 of the measured ones
N_IMAGES = {"flux2": 256, "qwen-image": 128, "wan": 128, "rae": 512}


@torch.no_grad()
def latents(ae: LatentAutoencoder, n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [ae.encode(torch.rand(64, 3, 32, 32, generator=gen) * 2 - 1).mode() for _ in range(n // 64)]


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_measured_normalization_makes_held_out_latents_unit(name, family_folders, tmp_path):
    ae = load_autoencoder(family_folders[name])
    n = N_IMAGES.get(name, 64)
    updates = ae.measure_normalization(latents(ae, n, seed=1))
    ae.set_normalization(updates)
    exported = load_autoencoder(ae.save_pretrained(tmp_path / "out"))  # the statistics travel with the export
    held_out = torch.cat([exported.normalize(z) for z in latents(exported, n, seed=2)]).double()
    if name in PER_CHANNEL:
        per_channel = held_out.transpose(0, 1).flatten(1)  # (C, values)
        assert per_channel.mean(1).abs().max() < 0.05
        assert (per_channel.std(1) - 1).abs().max() < 0.05
    elif name in SCALE_ONLY:
        # a scalar cannot make every channel unit, and without a shift it cannot centre them either: the mean
        # square of all values is what the scaling_factor (1 / RMS) makes 1
        assert abs(held_out.square().mean().sqrt() - 1) < 0.05
    else:  # scaling and shift: the mean and std of all values (one scalar each, not every channel)
        assert abs(held_out.mean()) < 0.05 and abs(held_out.std() - 1) < 0.05


def test_an_unsupported_class_names_the_supported_ones(tmp_path):
    torch.manual_seed(0)
    tiny = dict(encoder_block_out_channels=(8,), decoder_block_out_channels=(8,), num_encoder_blocks=(1,),
                num_decoder_blocks=(1,), latent_channels=4)  # fmt: skip
    diffusers.AutoencoderTiny(**tiny).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as e:
        load_autoencoder(tmp_path)
    message = str(e.value)
    assert "\n" not in message and "'AutoencoderTiny' is not supported" in message
    assert all(name in message for name in SUPPORTED)
    with pytest.raises(ConfigError, match="is not supported"):
        info(str(tmp_path))


@pytest.mark.parametrize("name, family, factor, channels, normalized", [
    ("flux2", "flux2", 2, 4, "16 channels at f4"),
    ("dc-ae", "dc-ae", 2, 4, "4 channels at f2"),
])  # fmt: skip
def test_info(name, family, factor, channels, normalized, family_folders, capsys):
    text = info(str(family_folders[name]))
    assert f"family:           {family} ({TINY[name][0]})" in text
    assert f"spatial factor:   {factor} " in text
    assert f"latent channels:  {channels} (normalized: {normalized})" in text
    d = describe(load_autoencoder(family_folders[name]))
    assert d["parameters"]["total"] == sum(
        p.numel() for p in load_autoencoder(family_folders[name]).module.parameters()
    )
    assert len(text.splitlines()) < 25  # one screen
