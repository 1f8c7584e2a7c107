"""The codec section of `kl-ae bench` (`--what codec`): encode and decode img/s of our autoencoder (fp32, and bf16
autocast) against diffusers' `AutoencoderKL` holding the same weights, their largest output difference, the PSNR
each reaches, and the peak-memory rise of each call, measured in fresh processes.
"""

from __future__ import annotations

import math
import subprocess
import sys

import torch

from kl_ae.bench.common import BenchConfig, diffusers_twin, images, interleaved, model_pair, photos
from kl_ae.bench.device import autocast, peak_memory_mib, reset_peak_memory


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float().clamp(-1, 1) - b.float().clamp(-1, 1)).square().mean().item()
    return 10 * math.log10(4.0 / max(mse, 1e-20))  # images in [-1, 1]: peak-to-peak 2


def peak_rss_child(
    preset: str, resolution: int, batch: int, model: str, op: str, seed: int, device: str = "cpu"
) -> float:
    """The rise of this process's peak memory (MiB; CPU: RSS, CUDA: torch's allocation) over one fp32 encode or
    decode under no_grad."""
    from kl_autoencoder import PRESETS, Autoencoder

    torch.set_num_threads(1)  # the four children run side by side
    torch.manual_seed(seed)
    cfg = PRESETS[preset]
    if model == "ours":
        ae = Autoencoder(cfg).eval().to(device)
        encode, decode = (lambda x: ae.encode(x).mode()), ae.decode
    else:
        from diffusers import AutoencoderKL

        from kl_autoencoder import to_diffusers_config

        vae = AutoencoderKL(**to_diffusers_config(cfg)).eval().to(device)
        encode, decode = (lambda x: vae.encode(x).latent_dist.mode()), (lambda z: vae.decode(z).sample)
    f = cfg.downsample_factor
    x = images(resolution, batch, seed, device)
    z = torch.randn(batch, cfg.latent_channels, resolution // f, resolution // f, device=device)
    with torch.no_grad():
        reset_peak_memory(device)
        before = peak_memory_mib(device) if device == "cpu" else torch.cuda.memory_allocated() / 2**20
        encode(x) if op == "encode" else decode(z)
        return peak_memory_mib(device) - before


def peak_memory(cfg: BenchConfig) -> dict[str, float]:
    """Peak-memory rise (MiB) of each (model, op), each in a fresh Python process: a clean heap, so the rise is
    what the call itself needed (activations and workspace), not memory freed earlier and reused."""
    running = {}
    for m in ("ours", "diffusers"):
        for op in ("encode", "decode"):
            args = (cfg.preset, cfg.resolution, cfg.batch_size, m, op, cfg.seed, cfg.device)
            code = f"from kl_ae.bench.codec import peak_rss_child; print(peak_rss_child(*{args!r}))"
            running[f"{m}_{op}_peak_mib"] = subprocess.Popen(
                [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
    return {k: float(p.communicate(timeout=600)[0].split()[-1]) for k, p in running.items()}


def codec_models(cfg: BenchConfig):
    """(ours, diffusers' AutoencoderKL with the same weights, input images): the preset's random init on smooth
    random images, or `cfg.model`'s trained weights on the bundled photographs."""
    if cfg.model is None:
        ours, theirs = model_pair(cfg.preset, cfg.seed, cfg.device)
        return ours, theirs, images(cfg.resolution, cfg.batch_size, cfg.seed + 1, cfg.device)
    from kl_ae.common.runs import latest_weights
    from kl_autoencoder import Autoencoder

    ours = Autoencoder.from_pretrained(latest_weights(cfg.model))
    if ours.config.bottleneck != "kl":
        raise ValueError(f"--model: {cfg.model} is a VQ model; the codec section compares KL models")
    return (
        ours.to(cfg.device),
        diffusers_twin(ours).to(cfg.device),
        photos(cfg.resolution, cfg.batch_size).to(cfg.device),
    )


def bench_codec(cfg: BenchConfig, memory: dict[str, float]) -> dict:
    """Encode/decode img/s of our model (fp32, and bf16 autocast) against diffusers fp32 on identical weights."""
    ours, theirs, x = codec_models(cfg)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        z = theirs.encode(x).latent_dist.mode()
        ref = theirs.decode(z).sample
        max_diff = max((ours.encode(x).mode() - z).abs().max().item(), (ours.decode(z) - ref).abs().max().item())
        with autocast(torch.bfloat16, cfg.device):
            fast = ours.decode(ours.encode(x).mode()).float()

        def bf16(fn):
            def run():
                with autocast(torch.bfloat16, cfg.device):
                    fn()

            return run

        s = interleaved(
            {
                "ours_encode": lambda: ours.encode(x).mode(),
                "diffusers_encode": lambda: theirs.encode(x).latent_dist.mode(),
                "ours_bf16_encode": bf16(lambda: ours.encode(x).mode()),
                "ours_decode": lambda: ours.decode(z),
                "diffusers_decode": lambda: theirs.decode(z).sample,
                "ours_bf16_decode": bf16(lambda: ours.decode(z)),
            },
            cfg.steps,
            cfg.repeats,
        )
    out = {f"{k}_img_s": cfg.batch_size / v for k, v in s.items()}
    for op in ("encode", "decode"):
        out[f"{op}_fp32_over_diffusers"] = s[f"diffusers_{op}"] / s[f"ours_{op}"]
        out[f"{op}_bf16_over_diffusers_fp32"] = s[f"diffusers_{op}"] / s[f"ours_bf16_{op}"]
    out["max_abs_diff_fp32"] = max_diff
    out["psnr_diffusers_fp32_db"] = _psnr(ref, x)
    out["psnr_ours_bf16_db"] = _psnr(fast, x)
    out["psnr_diff_db"] = abs(out["psnr_ours_bf16_db"] - out["psnr_diffusers_fp32_db"])
    out |= memory
    out["weights"] = (
        f"{cfg.model} on the bundled photographs" if cfg.model else "random init (same weights in both models)"
    )
    if cfg.model:
        out["memory_measured_for"] = f"preset {cfg.preset}, random init"
    return out
