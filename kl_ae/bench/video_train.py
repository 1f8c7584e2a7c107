"""The video training section of `kl-ae bench` (`video-train`), on the bench's Wan VAE (Wan 2.1's architecture at
width `family_width`):

- step time: our training step (`training.step.TrainStep`, the trainer's own; L1 + LPIPS on every frame + KL, no
  GAN yet, AdamW, the EMA) against a plain loop over diffusers' `AutoencoderKLWan` with the same losses and
  precision (`vae.encode(x).latent_dist`, `vae.decode(z).sample` under the autocast, `lpips.LPIPS` over the frames in
  fp32 as ours runs it, `torch.optim.AdamW`, diffusers' `EMAModel`), timed in turns;
- peak memory of one forward + backward of the autoencoder (L1 + KL) on 17 and 33 frames, gradient checkpointing
  off and on (per causal chunk: Wan's class refuses checkpointing, see `kl_autoencoder.families.qwen_wan`); each in
  a fresh process. On CUDA: torch's peak allocation. On a CPU two figures: the peak of live tensor memory (summed
  from the profiler's allocation and free events: what CUDA's allocator statistics would report) and the rise of
  peak RSS once the model and the clip exist (which adds what the C allocator keeps of freed memory: the many
  short-lived buffers of recomputed chunks leave more of it behind). LPIPS's memory is not in it:
  `loss.lpips_frames` bounds that part.
"""

from __future__ import annotations

import copy
import tempfile

import torch

from kl_ae.bench.common import BenchConfig, in_child, interleaved, lpips_random
from kl_ae.bench.device import autocast, peak_memory_mib, reset_peak_memory, sync
from kl_ae.bench.video import build_video_family

STEP_FRAMES = 9
MEMORY_FRAMES = (17, 33)


def clip(frames: int, size: int, seed: int = 0) -> torch.Tensor:
    """A smooth random clip in [-1, 1], (1, 3, T, H, W)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, frames, max(size // 8, 1), max(size // 8, 1), generator=g)
    x = torch.nn.functional.interpolate(low, size=(frames, size, size), mode="trilinear", align_corners=False)
    return x * 2 - 1


def plain_step_fn(vae, x: torch.Tensor, bf16: bool, lpips: torch.nn.Module | None = None):
    """One step of the loop a user writes over diffusers' class: forward, the same losses, backward, clip, AdamW,
    the EMA; a call returns (loss, gradient norm). lpips: the `lpips` package's VGG (random backbone) unless given."""
    import lpips as lpips_pkg
    from diffusers.training_utils import EMAModel

    from kl_ae.common.frames import fold_frames

    lp = lpips or lpips_pkg.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    lp = lp.eval().requires_grad_(False)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4, betas=(0.5, 0.9))
    average = EMAModel(vae.parameters(), decay=0.999, use_ema_warmup=True)
    dtype, B = (torch.bfloat16 if bf16 else None), x.shape[0]

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(dtype, x.device.type):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample.float()
        p = lp(fold_frames(x), fold_frames(recon)).view(B, -1).mean(1)  # fp32, as ours: each clip's mean of frames
        rec = (x - recon).abs() + p.view(B, 1, 1, 1, 1)
        loss = rec.sum() / B + 1e-6 * posterior.kl().float().sum() / B
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        average.step(vae.parameters())
        return loss.detach(), norm

    return step


def bench_step(cfg: BenchConfig, precisions: list[str]) -> dict:
    """Seconds per step of ours and of the plain loop, the same weights and clip, per precision."""
    from kl_ae.bench.step import our_step_fn

    x = clip(STEP_FRAMES, cfg.resolution, cfg.seed).to(cfg.device)
    out: dict = {"clip": f"{STEP_FRAMES} frames at {cfg.resolution} px", "width": cfg.family_width}
    for precision in precisions:
        with tempfile.TemporaryDirectory() as folder:
            ours = build_video_family("wan-video", cfg.family_width, folder).to(cfg.device)
        plain = copy.deepcopy(ours.module)  # the same weights
        lpips = lpips_random(device=cfg.device)
        fns = {"ours": our_step_fn(ours, x, precision, gan=False, lpips=lpips),
               "plain": plain_step_fn(plain, x, bf16=precision == "bf16")}  # fmt: skip
        seconds = interleaved(fns, cfg.steps, cfg.repeats)
        out[precision] = {**{f"{k}_s": v for k, v in seconds.items()}, "speedup": seconds["plain"] / seconds["ours"]}
    return out


def tensor_peak_mib(fn) -> float:
    """The most memory live tensors held while `fn()` ran (CPU: from the profiler's allocation / free events)."""
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())  # fmt: skip
    live = peak = 0
    for e in events:
        live += e.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak / 2**20


def _memory_child(width: int, frames: int, size: int, on: bool, precision: str, device: str, tensors: bool,
                  queue) -> None:  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        ae = build_video_family("wan-video", width, folder).to(device)
    ae.module.train()
    ae.gradient_checkpointing(on)
    x = clip(frames, size).to(device)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def forward_backward() -> None:
        with autocast(dtype, x.device.type):
            posterior = ae.encode(x)
            loss = (ae.decode(posterior.sample()).float() - x).abs().mean() + 1e-6 * posterior.kl().mean()
        loss.backward()
        sync()

    reset_peak_memory(device)
    before = peak_memory_mib(device)
    if device == "cuda":
        forward_backward()
        queue.put({"peak_mib": peak_memory_mib(device) - before})
        return
    if tensors:  # the profiler's own records would count in the RSS: a process of its own
        queue.put({"tensor_peak_mib": tensor_peak_mib(forward_backward)})
    else:
        forward_backward()
        queue.put({"peak_rss_rise_mib": peak_memory_mib(device) - before})


def bench_memory(cfg: BenchConfig, precision: str) -> dict:
    """{frames: {off|on: peak MiB}, and on / off of each}, each figure from a process of its own."""
    out: dict = {"resolution": cfg.resolution, "width": cfg.family_width, "precision": precision}
    for frames in MEMORY_FRAMES:
        out[frames] = {}
        for on in (False, True):
            figures: dict = {}
            for tensors in (False, True) if cfg.device == "cpu" else (False,):
                args = (cfg.family_width, frames, cfg.resolution, on, precision, cfg.device, tensors)
                figures |= in_child(_memory_child, *args)
            out[frames]["on" if on else "off"] = figures
        off, on = out[frames]["off"], out[frames]["on"]
        for key in set(off) & set(on) - {"error"}:
            out[frames][f"on_over_off_{key.removesuffix('_mib')}"] = on[key] / off[key]
    return out


def bench_video_train(cfg: BenchConfig, precisions: list[str]) -> dict:
    return {"memory": bench_memory(cfg, precisions[-1]), "step": bench_step(cfg, precisions)}
