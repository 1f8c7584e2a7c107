"""Our exported autoencoders inside diffusers pipelines, built offline from tiny random components."""

import dataclasses

import numpy as np
import pytest
import torch

from kl_autoencoder import Autoencoder

SCALE = 0.37


def _export(tmp_path, tiny_config, bottleneck):
    cfg = dataclasses.replace(tiny_config, bottleneck=bottleneck, num_codes=16, code_dim=4)
    torch.manual_seed(0)
    Autoencoder(cfg).save_pretrained(tmp_path / "vae", extra_config={"scaling_factor": SCALE})
    return cfg


@pytest.mark.parametrize("bottleneck", ["kl", "vq"])
def test_ldm_pipeline(tmp_path, tiny_config, bottleneck):
    from diffusers import AutoencoderKL, DDIMScheduler, LDMPipeline, UNet2DModel, VQModel

    cfg = _export(tmp_path, tiny_config, bottleneck)
    vae = (AutoencoderKL if bottleneck == "kl" else VQModel).from_pretrained(tmp_path / "vae")
    latent_size = cfg.sample_size // cfg.downsample_factor
    channels = cfg.latent_channels if bottleneck == "kl" else cfg.code_dim
    unet = UNet2DModel(
        sample_size=latent_size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    pipe = LDMPipeline(vqvae=vae, unet=unet, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    # LDMPipeline decodes `latents / scaling_factor`: check it against the scheduler's last output
    seen = {}
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda *a, **k: seen.__setitem__("latents", step(*a, **k).prev_sample) or step(*a, **k)
    target = vae.post_quant_conv
    hook = target.register_forward_pre_hook(lambda m, args: seen.__setitem__("decoded", args[0]))
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    hook.remove()
    assert images.images.shape == (2, cfg.sample_size, cfg.sample_size, 3)
    assert np.isfinite(images.images).all() and images.images.min() >= 0 and images.images.max() <= 1
    if bottleneck == "kl":
        torch.testing.assert_close(seen["decoded"], seen["latents"] / SCALE)
    else:  # VQModel.decode quantizes first: the codes of latents / scaling_factor
        z = seen["latents"] / SCALE
        torch.testing.assert_close(seen["decoded"], vae.quantize(z)[0])


def _tiny_clip(folder):
    """A CLIP tokenizer over single letters (vocab.json and an empty merges.txt) and a 1-layer text encoder."""
    import json
    import string

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):  # a letter inside a word, and a word's last letter
        vocab |= {c + suffix: len(vocab) for c in string.ascii_lowercase}
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=16)
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    text_encoder = CLIPTextModel(config)
    return tokenizer, text_encoder


@pytest.mark.slow
def test_stable_diffusion_pipeline(tmp_path, tiny_config):
    """Our exported VAE in diffusers' StableDiffusionPipeline (text prompt, classifier-free guidance): the images
    are our decoder's output for the final latents / scaling_factor."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    cfg = _export(tmp_path, tiny_config, "kl")
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    tokenizer, text_encoder = _tiny_clip(tmp_path / "clip")
    unet = UNet2DConditionModel(
        sample_size=cfg.sample_size // cfg.downsample_factor, in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=16, attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == cfg.downsample_factor

    seen, step = {}, pipe.scheduler.step

    def watched_step(*args, **kwargs):  # the pipeline asks for a tuple (return_dict=False)
        result = step(*args, **kwargs)
        seen["latents"] = result[0]
        return result

    pipe.scheduler.step = watched_step
    hook = vae.post_quant_conv.register_forward_pre_hook(lambda m, args: seen.__setitem__("decoded", args[0]))
    out = pipe(["a red cat", "a dog"], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np")  # fmt: skip
    hook.remove()
    images = out.images
    assert images.shape == (2, cfg.sample_size, cfg.sample_size, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(seen["decoded"], seen["latents"] / SCALE)
    ours = Autoencoder.from_pretrained(tmp_path / "vae").eval()
    with torch.no_grad():
        expected = (ours.decode(seen["latents"] / SCALE) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images, expected, atol=1e-5)


def test_vae_image_processor_round_trip(tmp_path, tiny_config):
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    _export(tmp_path, tiny_config, "kl")
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    ours = Autoencoder.from_pretrained(tmp_path / "vae")
    processor = VaeImageProcessor(vae_scale_factor=tiny_config.downsample_factor)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    x = processor.preprocess(image)  # (1, 3, 32, 32) in [-1, 1]
    assert x.shape == (1, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    with torch.no_grad():
        latents = ours.encode(x).mode() * vae.config.scaling_factor
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
        torch.testing.assert_close(decoded, ours.decode(ours.encode(x).mode()))
    out = processor.postprocess(decoded, output_type="pil")[0]
    assert out.size == (32, 32)
    back = processor.postprocess(decoded, output_type="np")
    assert back.shape == (1, 32, 32, 3) and back.min() >= 0 and back.max() <= 1
