"""Export to and import from diffusers' AutoencoderKL and VQModel: strict loads, equal outputs, pinned keys, folders."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, VQModel
from safetensors.torch import load_file, save_file

from kl_autoencoder import (
    PRESETS,
    Autoencoder,
    QuantizerConfig,
    find_diffusers_folder,
    from_diffusers_config,
    load_diffusers,
    save_diffusers,
    to_diffusers_config,
)

from .conftest import tiny

ATOL = 1e-5
KL_PRESETS = sorted(name for name, cfg in PRESETS.items() if cfg.bottleneck == "kl")
VQ_PRESETS = sorted(name for name, cfg in PRESETS.items() if cfg.bottleneck == "vq")


def perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, so that swapped names (e.g. norm1/norm2, both 1 and 0 at init) show up."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return module.eval()


def assert_same_outputs(ours: Autoencoder, theirs: AutoencoderKL, size: int = 32) -> None:
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        posterior = ours.encode(x)
        latent_dist = theirs.encode(x).latent_dist
        torch.testing.assert_close(posterior.mean, latent_dist.mean, rtol=0, atol=ATOL)
        torch.testing.assert_close(posterior.logvar, latent_dist.logvar, rtol=0, atol=ATOL)
        torch.testing.assert_close(ours(x), theirs(x, sample_posterior=False).sample, rtol=0, atol=ATOL)
        # same generator, same draw: the two posteriors sample identically
        sampled = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(1))
        expected = theirs(x, sample_posterior=True, generator=torch.Generator().manual_seed(1)).sample
        torch.testing.assert_close(sampled, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", KL_PRESETS)
def test_state_dict_loads_strictly_into_diffusers(name):
    ours = perturbed(Autoencoder(tiny(name)))
    theirs = AutoencoderKL(**to_diffusers_config(ours.config))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert_same_outputs(ours, theirs.eval())


@pytest.mark.parametrize("name", KL_PRESETS)
def test_saved_folder_loads_in_diffusers(name, tmp_path):
    ours = perturbed(Autoencoder(tiny(name)))
    save_diffusers(ours, tmp_path, extra_config={"scaling_factor": 0.5, "shift_factor": 0.1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    theirs = AutoencoderKL.from_pretrained(tmp_path)
    assert theirs.config.scaling_factor == 0.5 and theirs.config.shift_factor == 0.1
    assert_same_outputs(ours, theirs)
    # and back: the config round-trips, the extra values included
    again = Autoencoder.from_pretrained(tmp_path)
    assert again.config.scaling_factor == 0.5 and again.config.shift_factor == 0.1
    assert_same_outputs(again, theirs)


def test_training_mode_gradients_match_diffusers():
    ours = perturbed(Autoencoder(tiny("kl-f16"))).train()
    theirs = AutoencoderKL(**to_diffusers_config(ours.config)).train()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    (ours(x) - x).abs().mean().backward()
    (theirs(x).sample - x).abs().mean().backward()
    grads = dict(theirs.named_parameters())
    for k, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[k].grad, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_full_size_keys_and_shapes_equal_diffusers(name):
    diffusers_class = VQModel if name in VQ_PRESETS else AutoencoderKL
    with torch.device("meta"):
        ours = Autoencoder(PRESETS[name]).state_dict()
        theirs = diffusers_class(**to_diffusers_config(PRESETS[name])).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_pinned_kl_f8_keys():
    with torch.device("meta"):
        sd = Autoencoder(PRESETS["kl-f8"]).state_dict()
    assert len(sd) == 248
    pinned = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down_blocks.0.resnets.0.norm1.weight": (128,),
        "encoder.down_blocks.0.downsamplers.0.conv.weight": (128, 128, 3, 3),
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": (256, 128, 1, 1),
        "encoder.mid_block.attentions.0.group_norm.weight": (512,),
        "encoder.mid_block.attentions.0.to_q.weight": (512, 512),
        "encoder.mid_block.attentions.0.to_out.0.bias": (512,),
        "encoder.mid_block.resnets.1.conv2.weight": (512, 512, 3, 3),
        "encoder.conv_norm_out.bias": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.bias": (4,),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.up_blocks.0.resnets.2.conv2.weight": (512, 512, 3, 3),
        "decoder.up_blocks.0.upsamplers.0.conv.weight": (512, 512, 3, 3),
        "decoder.up_blocks.2.resnets.0.conv_shortcut.weight": (256, 512, 1, 1),
        "decoder.up_blocks.3.resnets.0.conv_shortcut.weight": (128, 256, 1, 1),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in pinned.items():
        assert tuple(sd[key].shape) == shape, key
    for absent in (
        "encoder.down_blocks.3.downsamplers.0.conv.weight",
        "decoder.up_blocks.3.upsamplers.0.conv.weight",
        "encoder.down_blocks.0.attentions.0.to_q.weight",
    ):
        assert absent not in sd


def test_kl_f16_attention_blocks():
    config = to_diffusers_config(PRESETS["kl-f16"])
    assert config["down_block_types"] == ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"]
    assert config["up_block_types"] == ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 4
    with torch.device("meta"):
        sd = Autoencoder(PRESETS["kl-f16"]).state_dict()
    assert "encoder.down_blocks.4.attentions.1.to_k.weight" in sd
    assert "decoder.up_blocks.0.attentions.2.to_v.weight" in sd
    assert not any(".attentions." in k for k in sd if "down_blocks.3" in k or "up_blocks.1" in k)


def test_import_from_diffusers(tmp_path):
    # written independently of to_diffusers_config, with diffusers' own defaults for everything else
    theirs = AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=2,
        latent_channels=6,
        norm_num_groups=4,
    )
    perturbed(theirs, seed=1).save_pretrained(tmp_path, safe_serialization=True)
    ours = Autoencoder.from_pretrained(tmp_path)
    cfg = ours.config
    assert (cfg.base_channels, cfg.channel_mult, cfg.attn_levels) == (8, (1, 2, 2), (1,))
    assert cfg.scaling_factor == 0.18215 and cfg.latent_channels == 6
    assert_same_outputs(ours, theirs)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trip(name):
    cfg = PRESETS[name]
    assert from_diffusers_config(to_diffusers_config(cfg)) == cfg
    assert from_diffusers_config(json.loads(json.dumps(to_diffusers_config(cfg)))) == cfg


@pytest.mark.parametrize(
    "change, message",
    [
        ({"act_fn": "relu"}, "act_fn"),
        ({"down_block_types": ["CrossAttnDownBlock2D"] * 4}, "unsupported block types"),
        ({"up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3}, "must match"),
        ({"num_vq_embeddings": 256}, "unknown keys"),
        ({"_class_name": "VQModel"}, "AutoencoderKL"),
        ({"block_out_channels": [128, 256, 512]}, "block types"),
        ({"sample_size": [256, 512]}, "square"),
    ],
)
def test_unrepresentable_configs_raise(change, message):
    config = {**to_diffusers_config(PRESETS["kl-f8"]), **change}
    with pytest.raises(ValueError, match=message):
        from_diffusers_config(config)


def test_strict_load_names_bad_keys(tmp_path):
    model = Autoencoder(tiny("tiny"))
    save_diffusers(model, tmp_path)
    sd = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    sd.pop("decoder.conv_out.bias")
    sd["decoder.extra.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys: decoder\.conv_out\.bias.*unexpected keys: decoder\.extra"):
        load_diffusers(tmp_path)
    sd = {k: v for k, v in model.state_dict().items()}
    sd["quant_conv.bias"] = torch.zeros(3)
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"shape mismatches: quant_conv\.bias"):
        load_diffusers(tmp_path)


def test_legacy_attention_names_load(tmp_path):
    model = perturbed(Autoencoder(tiny("tiny")))
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in model.state_dict().items():
        for new, old in legacy.items():
            k = k.replace(f".{new}.", f".{old}.")
        sd[k] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in sd
    save_diffusers(model, tmp_path)
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    loaded = Autoencoder.from_pretrained(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_pair_and_dtype(tmp_path):
    model = perturbed(Autoencoder(tiny("tiny")))
    save_diffusers((model.config, model.state_dict()), tmp_path, dtype=torch.float16)
    stored = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float16 for v in stored.values())
    loaded = Autoencoder.from_pretrained(tmp_path)  # upcast into an fp32 model
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v.half().float(), rtol=0, atol=0)


def test_extra_config_keys_are_checked(tmp_path):
    model = Autoencoder(tiny("tiny"))
    with pytest.raises(ValueError, match="not AutoencoderKL arguments"):
        save_diffusers(model, tmp_path, extra_config={"step": 10})
    save_diffusers(model, tmp_path, extra_config={"_kl_autoencoder_step": 10})
    assert json.loads((tmp_path / "config.json").read_text())["_kl_autoencoder_step"] == 10
    Autoencoder.from_pretrained(tmp_path)


def test_from_pretrained_resolves_run_and_checkpoint_folders(tmp_path):
    model = perturbed(Autoencoder(tiny("tiny")))
    run = tmp_path / "run"
    # a checkpoint folder: <ckpt>/autoencoder/, found through <run>/checkpoints/latest; trainer_state.json marks
    # it complete
    for step in ("step_0000050", "step_0000100"):
        model.save_pretrained(run / "checkpoints" / step / "autoencoder")
        (run / "checkpoints" / step / "trainer_state.json").write_text("{}")
    (run / "checkpoints" / "step_0000050" / "autoencoder" / "config.json").unlink()  # only the latest is valid
    (run / "checkpoints" / "latest").write_text("step_0000100\n")
    latest = run / "checkpoints" / "step_0000100" / "autoencoder"
    assert find_diffusers_folder(run) == latest
    assert find_diffusers_folder(run / "checkpoints" / "step_0000100") == latest
    loaded = Autoencoder.from_pretrained(run)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    # an exported run: <run>/diffusers wins when it was exported from the latest checkpoint's step (or later) ...
    save_diffusers(model, run / "diffusers", extra_config={"_kl_ae_export": {"step": 100}})
    assert find_diffusers_folder(run) == run / "diffusers"
    assert find_diffusers_folder(run / "diffusers") == run / "diffusers"
    # ... and not when the checkpoint is newer, nor when its step is unknown
    save_diffusers(model, run / "diffusers", extra_config={"_kl_ae_export": {"step": 99}})
    assert find_diffusers_folder(run) == latest
    save_diffusers(model, run / "diffusers")
    assert find_diffusers_folder(run) == latest
    (run / "checkpoints" / "step_0000100" / "trainer_state.json").unlink()  # an incomplete checkpoint is no weights
    assert find_diffusers_folder(run) == run / "diffusers"
    with pytest.raises(FileNotFoundError, match="config.json.*empty"):
        Autoencoder.from_pretrained(tmp_path / "empty")


# --- VQ: diffusers' VQModel


def assert_same_vq_outputs(ours: Autoencoder, theirs: VQModel, size: int = 32) -> None:
    """Same pre-quantization latents, the same code indices, the same reconstructions (both in eval mode)."""
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        h = ours.encode(x).latents
        torch.testing.assert_close(h, theirs.encode(x).latents, rtol=0, atol=ATOL)
        ours_quantized = ours.quantize(h)
        their_indices = theirs.quantize(h)[2][2]  # (z_q, loss, (perplexity, encodings, indices))
        assert torch.equal(ours_quantized.indices.flatten(), their_indices)
        assert len(their_indices.unique()) > 1  # a real test of the lookup, not one code for everything
        torch.testing.assert_close(ours(x), theirs(x).sample, rtol=0, atol=ATOL)
        torch.testing.assert_close(ours.decode(ours_quantized.z_q), theirs.decode(h).sample, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", VQ_PRESETS)
def test_vq_state_dict_loads_strictly_into_diffusers(name):
    ours = perturbed(Autoencoder(tiny(name)))
    theirs = VQModel(**to_diffusers_config(ours.config))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert_same_vq_outputs(ours, theirs.eval())


@pytest.mark.parametrize("normalize_codes", [False, True])
def test_vq_saved_folder_loads_in_diffusers(normalize_codes, tmp_path):
    torch.manual_seed(0)
    cfg = tiny("tiny-vq", num_codes=64, code_dim=3, normalize_codes=normalize_codes)
    ours = Autoencoder(cfg, vq=QuantizerConfig(dead_after=2, window=4)).train()
    for _ in range(3):  # EMA steps and restarts fill the training statistics, which must not be exported
        ours(torch.rand(2, 3, 32, 32) * 2 - 1)
    ours = perturbed(ours)  # codes off the unit sphere: the export must normalise them
    save_diffusers(ours, tmp_path, extra_config={"scaling_factor": 0.5})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "VQModel" and config["num_vq_embeddings"] == 64 and config["vq_embed_dim"] == 3
    assert config.get("_normalize_codes", False) == normalize_codes
    stored = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    if normalize_codes:
        torch.testing.assert_close(stored["quantize.embedding.weight"].norm(dim=1), torch.ones(64))

    theirs, info = VQModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    VQModel(**to_diffusers_config(cfg)).load_state_dict(stored, strict=True)  # exactly their key set
    assert theirs.config.scaling_factor == 0.5
    assert_same_vq_outputs(ours, theirs)
    again = Autoencoder.from_pretrained(tmp_path)
    assert again.config.normalize_codes == normalize_codes and again.config.scaling_factor == 0.5
    assert_same_vq_outputs(again, theirs)


def test_vq_import_from_diffusers(tmp_path):
    # written independently of to_diffusers_config, with diffusers' own defaults for everything else
    theirs = VQModel(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=5,
        num_vq_embeddings=32,
        vq_embed_dim=2,
        norm_num_groups=4,
    )
    perturbed(theirs, seed=1).save_pretrained(tmp_path, safe_serialization=True)
    ours = Autoencoder.from_pretrained(tmp_path)
    cfg = ours.config
    assert (cfg.bottleneck, cfg.num_codes, cfg.code_dim, cfg.latent_channels, cfg.attn_levels) == ("vq", 32, 2, 5, (1,))
    assert cfg.scaling_factor == 0.18215 and not cfg.force_upcast and not cfg.normalize_codes
    assert_same_vq_outputs(ours, theirs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"use_quant_conv": False}, "quant_conv"),
        ({"use_post_quant_conv": False}, "quant_conv"),
        ({"shift_factor": 0.1}, "shift_factor"),
        ({"latents_mean": [0.0] * 4}, "latents_mean"),
    ],
)
def test_unexportable_vq_configs_refuse(overrides, message, tmp_path):
    model = Autoencoder(tiny("tiny-vq", **overrides))  # a valid model ...
    with pytest.raises(ValueError, match=message):  # ... that diffusers' VQModel cannot reproduce
        save_diffusers(model, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"norm_type": "spatial"}, "norm_type"),
        ({"use_quant_conv": True}, "unknown keys"),
        ({"_class_name": "VQGAN"}, "_class_name"),
    ],
)
def test_unrepresentable_vq_configs_raise(change, message):
    config = {**to_diffusers_config(PRESETS["vq-f8"]), **change}
    with pytest.raises(ValueError, match=message):
        from_diffusers_config(config)


def test_vq_extra_config_keys_are_checked(tmp_path):
    with pytest.raises(ValueError, match="not VQModel arguments"):
        save_diffusers(Autoencoder(tiny("tiny-vq")), tmp_path, extra_config={"shift_factor": 0.1})
