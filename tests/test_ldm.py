"""The original LDM / SD VAE layout: diffusers' own converter agrees with ours, and pickles are refused."""

import dataclasses
import pickle

import pytest
import torch
from safetensors.torch import save_file

from kl_autoencoder import PRESETS, Autoencoder
from kl_autoencoder.diffusers_format import to_diffusers_config
from kl_autoencoder.ldm import from_ldm_state_dict, load_checkpoint_file, to_ldm_state_dict


def tiny(name):
    return dataclasses.replace(PRESETS[name], base_channels=8, norm_num_groups=4)


@pytest.mark.parametrize("name", ["kl-f8", "kl-f4", "kl-f16"])
def test_ldm_layout_matches_diffusers_conversion(name):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = tiny(name)
    torch.manual_seed(0)
    ours = Autoencoder(cfg).state_dict()
    ldm = to_ldm_state_dict(ours, cfg)
    assert "encoder.mid.attn_1.q.weight" in ldm and ldm["encoder.mid.attn_1.q.weight"].ndim == 4
    assert "decoder.up.0.block.0.conv1.weight" in ldm and "encoder.down.0.block.0.norm1.weight" in ldm
    # diffusers' converter (the independent reference) reads our LDM layout back to the same weights
    full_sd = {f"first_stage_model.{k}": v for k, v in ldm.items()} | {"model.diffusion_model.x": torch.zeros(1)}
    if not cfg.attn_levels:  # diffusers' converter knows no attention inside levels (no SD VAE has it)
        theirs = convert_ldm_vae_checkpoint(full_sd, to_diffusers_config(cfg))
        assert theirs.keys() == ours.keys()
        assert all(torch.equal(theirs[k].reshape(ours[k].shape), ours[k]) for k in ours)
    back = from_ldm_state_dict(full_sd | {"first_stage_model.loss.logvar": torch.zeros(())}, cfg)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_ldm_checkpoint_gives_equal_outputs(tmp_path):
    cfg = tiny("kl-f8")
    torch.manual_seed(1)
    model = Autoencoder(cfg).eval()
    save_file(to_ldm_state_dict(model.state_dict(), cfg), str(tmp_path / "vae.safetensors"))
    loaded = Autoencoder(cfg).eval()
    loaded.load_state_dict(from_ldm_state_dict(load_checkpoint_file(tmp_path / "vae.safetensors"), cfg), strict=True)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused_by_default(tmp_path):
    path = tmp_path / "vae.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "x": Evil()}, f)
    with pytest.raises(ValueError, match="refused to unpickle"):
        load_checkpoint_file(path)
    # a plain tensor pickle loads with weights_only=True
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.ones(2)}}, tmp_path / "ok.ckpt")
    assert torch.equal(load_checkpoint_file(tmp_path / "ok.ckpt")["encoder.conv_in.weight"], torch.ones(2))


def test_init_from_an_ldm_file_and_a_mismatched_one(tmp_path, capsys):
    from kl_ae.commands.cli import main as kl_ae

    cfg = dataclasses.replace(PRESETS["tiny"], base_channels=16, norm_num_groups=8)
    torch.manual_seed(2)
    source = Autoencoder(cfg)
    save_file(to_ldm_state_dict(source.state_dict(), cfg), str(tmp_path / "sd-vae.safetensors"))
    common = ["--max-steps", "1", "model.base_channels=16", "model.norm_num_groups=8", "data.resolution=32",
              "data.resize=48", "data.batch_size=2", "loss.lpips=off", "train.tracker=none", "train.ema=false",
              "optim.lr=1e-12", f"model.init_from={tmp_path / 'sd-vae.safetensors'}"]  # fmt: skip
    assert kl_ae(["train", "--out", str(tmp_path / "ft"), *common]) == 0
    tuned = Autoencoder.from_pretrained(tmp_path / "ft")
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(source.parameters(), tuned.parameters()))
    # the same file into another architecture: a one-line error naming the parameters, nothing written
    assert kl_ae(["train", "--out", str(tmp_path / "bad"), *common, "model.base_channels=32"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: model.init_from:") and "shape mismatch: decoder." in err and ") != (" in err
    assert not (tmp_path / "bad").exists()
