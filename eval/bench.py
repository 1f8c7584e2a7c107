"""Throughput and memory measurements: our training step against the reference-style loop, bf16 against fp32,
achieved FLOP/s against a measured GEMM peak, our codec against diffusers' `AutoencoderKL`, and the data pipeline
against the trainer's consumption.

Every comparison is measured in one process, interleaved (ours, baseline, ours, ...), and reported as a median;
on a shared machine only the ratios are meaningful. LPIPS runs with a RANDOM VGG backbone (no weights offline):
the cost is right, the values are not.
"""

from __future__ import annotations

import contextlib
import math
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import torch

SECTIONS = ("train", "codec", "data", "peak")


@dataclass
class BenchConfig:
    preset: str = "kl-f8"
    resolution: int = 128
    batch_size: int = 2
    steps: int = 2  # timed steps (or calls) per measurement; each measurement is repeated `repeats` times
    repeats: int = 3
    precision: str = "both"  # fp32 | bf16 | both
    what: tuple[str, ...] = SECTIONS
    seed: int = 0


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _interleaved(fns: dict, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in turns after one untimed warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            times[k].append((time.perf_counter() - t) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


class _Single:
    """What `guarded_step` needs of an Accelerator, for one process without one."""

    clip_grad_norm_ = staticmethod(torch.nn.utils.clip_grad_norm_)


def _images(resolution: int, batch: int, seed: int) -> torch.Tensor:
    """Smooth random images in [-1, 1] (B, 3, H, W): cheaper than decoding files, not constant."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, max(resolution // 8, 1), max(resolution // 8, 1), generator=g)
    x = torch.nn.functional.interpolate(low, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1)


def _pair(preset: str, seed: int):
    """Our autoencoder and diffusers' AutoencoderKL holding identical weights, both fp32."""
    from diffusers import AutoencoderKL

    from kl_autoencoder import PRESETS, Autoencoder
    from kl_autoencoder.export import to_diffusers_config, to_diffusers_state_dict

    torch.manual_seed(seed)
    ours = Autoencoder(PRESETS[preset])
    theirs = AutoencoderKL(**to_diffusers_config(ours.config))
    theirs.load_state_dict(to_diffusers_state_dict(ours.state_dict()), strict=True)
    return ours, theirs


def _lpips_random():
    from training.lpips import LPIPS

    return LPIPS(net="vgg", random_backbone=True)


def _disc(seed: int):
    from training.discriminator import PatchDiscriminator

    torch.manual_seed(seed + 1)
    return PatchDiscriminator(norm="group")  # the default recipe's discriminator


def our_step_fn(autoencoder, x: torch.Tensor, bf16: bool, gan: bool, lpips):
    """One step of OUR trainer (training/train.py): one forward, G update, then D update on the same forward."""
    from training.config import LossConfig
    from training.step import Generator, discriminator_objective, generator_objective, guarded_step

    loss_cfg = LossConfig(disc_start=0 if gan else 10**9, disc_norm="group")
    gen = Generator(autoencoder, learn_logvar=False, logvar_init=0.0).train()
    disc = _disc(0).train()
    params_g = [p for p in gen.parameters() if p.requires_grad]
    opt_g = torch.optim.AdamW(params_g, lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.5, 0.9))

    def step() -> None:
        with _autocast(bf16):
            recon, posterior = gen(x)
            loss, _, factor = generator_objective(
                x, recon, posterior, gen.logvar, lpips, disc, autoencoder.last_layer, loss_cfg, step=1
            )
        loss.backward()
        ok, _ = guarded_step(_Single, opt_g, params_g, 1.0, False)
        if factor > 0 and ok:
            with _autocast(bf16):
                d_loss, _ = discriminator_objective(x, recon, disc, loss_cfg, factor)
            d_loss.backward()
            guarded_step(_Single, opt_d, list(disc.parameters()), 1.0, False)

    return step


def baseline_step_fn(vae, x: torch.Tensor, bf16: bool, gan: bool):
    """The loop of diffusers' train_autoencoderkl.py, written as a user would (its bugs fixed where they would
    make it cheaper or wrong: LPIPS with gradients, fp32 master weights, D frozen in the G step, detached D input):
    every call runs the autoencoder forward; with the GAN, even calls update G and odd calls update D."""
    import lpips as lpips_pkg

    from training.losses import adaptive_weight

    lp = lpips_pkg.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval().requires_grad_(False)
    disc = _disc(0).train()
    vae.train()
    opt_g = torch.optim.AdamW(vae.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.5, 0.9))
    calls = [0]

    def step() -> None:
        d_turn = gan and calls[0] % 2 == 1
        calls[0] += 1
        if d_turn:
            with _autocast(bf16), torch.no_grad():
                recon = vae.decode(vae.encode(x).latent_dist.sample()).sample
            with _autocast(bf16):
                real, fake = disc(x).float(), disc(recon.detach()).float()
                d_loss = 0.5 * (torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())
            d_loss.backward()
            torch.nn.utils.clip_grad_norm_(disc.parameters(), 1.0)
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
            return
        with _autocast(bf16):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
            rec = (x.float() - recon.float()).abs() + lp(x, recon).float()
            nll = rec.sum() / x.shape[0]
            loss = nll + 1e-6 * posterior.kl().mean()
            if gan:
                disc.requires_grad_(False)
                g_loss = -disc(recon).float().mean()
                disc.requires_grad_(True)
                loss = loss + 0.5 * adaptive_weight(nll, g_loss, vae.decoder.conv_out.weight) * g_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)

    return step


def bench_train(cfg: BenchConfig, precisions: list[str]) -> dict:
    """img/s with G and D both updated for every image: ours = B / step, baseline = B / (G call + D call)."""
    ours_ae, vae = _pair(cfg.preset, cfg.seed)
    x = _images(cfg.resolution, cfg.batch_size, cfg.seed)
    lpips = _lpips_random()
    out = {}
    for prec in precisions:
        bf16 = prec == "bf16"
        fns = {
            "ours_gan": our_step_fn(ours_ae, x, bf16, True, lpips),
            "ours_nogan": our_step_fn(ours_ae, x, bf16, False, lpips),
            "baseline_gan": baseline_step_fn(vae, x, bf16, True),
            "baseline_nogan": baseline_step_fn(vae, x, bf16, False),
        }
        # the baseline's G and D calls alternate, so time them in pairs: 2 calls = one G and one D update per image
        pair = fns["baseline_gan"]
        fns["baseline_gan"] = lambda pair=pair: (pair(), pair())
        s = _interleaved(fns, cfg.steps, cfg.repeats)
        B = cfg.batch_size
        out[prec] = {
            "ours_gan_ms_per_step": 1e3 * s["ours_gan"],
            "ours_gan_img_s": B / s["ours_gan"],
            "baseline_gan_ms_per_image_batch": 1e3 * s["baseline_gan"],  # a G call plus a D call
            "baseline_gan_img_s": B / s["baseline_gan"],
            "ours_nogan_img_s": B / s["ours_nogan"],
            "baseline_nogan_img_s": B / s["baseline_nogan"],
        }
        out[prec]["speedup_gan"] = out[prec]["ours_gan_img_s"] / out[prec]["baseline_gan_img_s"]
        out[prec]["speedup_nogan"] = out[prec]["ours_nogan_img_s"] / out[prec]["baseline_nogan_img_s"]
    if "fp32" in out and "bf16" in out:
        out["bf16_over_fp32"] = out["bf16"]["ours_gan_img_s"] / out["fp32"]["ours_gan_img_s"]
        out["bf16_over_fp32_nogan"] = out["bf16"]["ours_nogan_img_s"] / out["fp32"]["ours_nogan_img_s"]
    out["lpips"] = "random VGG backbone (timing only)"
    return out


def gemm_peak(n: int = 2048, tries: int = 5) -> dict[str, float]:
    """Best-of-`tries` FLOP/s of an n x n x n torch.mm in fp32 and bf16."""
    peak = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        best = min(_timed(lambda: torch.mm(a, b)) for _ in range(tries))
        peak[name] = 2 * n**3 / best
    return peak


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_peak(cfg: BenchConfig, precisions: list[str], train: dict | None) -> dict:
    """FLOPs of one of our steps (GAN on), achieved FLOP/s against the GEMM peak, and the profiler's top ops."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    ours_ae, _ = _pair(cfg.preset, cfg.seed)
    x, lpips = _images(cfg.resolution, cfg.batch_size, cfg.seed), _lpips_random()
    peak = gemm_peak(2048 if cfg.resolution >= 64 else 512)
    out = {"gemm_peak_gflop_s": {k: v / 1e9 for k, v in peak.items()}}
    for prec in precisions:
        step = our_step_fn(ours_ae, x, prec == "bf16", True, lpips)
        step()
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops = counter.get_total_flops()
        seconds = (
            min(_timed(step) for _ in range(cfg.repeats))
            if train is None
            else 1 / (train[prec]["ours_gan_img_s"] / cfg.batch_size)
        )
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
        out[prec] = {
            "gflop_per_step": flops / 1e9,
            "achieved_gflop_s": flops / seconds / 1e9,
            "fraction_of_gemm_peak": flops / seconds / peak[prec],
            "top_ops_self_cpu_share": {e.key: e.self_cpu_time_total / total for e in top},
        }
    return out


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float().clamp(-1, 1) - b.float().clamp(-1, 1)).square().mean().item()
    return 10 * math.log10(4.0 / max(mse, 1e-20))  # images in [-1, 1]: peak-to-peak 2


def peak_rss_child(preset: str, resolution: int, batch: int, model: str, op: str, seed: int) -> float:
    """The rise of this process's peak RSS (MiB) over one fp32 encode or decode under no_grad."""
    from kl_autoencoder import PRESETS, Autoencoder

    torch.set_num_threads(1)  # the four children run side by side
    torch.manual_seed(seed)
    cfg = PRESETS[preset]
    if model == "ours":
        ae = Autoencoder(cfg).eval()
        encode, decode = (lambda x: ae.encode(x).mode()), ae.decode
    else:
        from diffusers import AutoencoderKL

        from kl_autoencoder.export import to_diffusers_config

        vae = AutoencoderKL(**to_diffusers_config(cfg)).eval()
        encode, decode = (lambda x: vae.encode(x).latent_dist.mode()), (lambda z: vae.decode(z).sample)
    f = cfg.downsample_factor
    x = _images(resolution, batch, seed)
    z = torch.randn(batch, cfg.latent_channels, resolution // f, resolution // f)
    with torch.no_grad():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        encode(x) if op == "encode" else decode(z)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def peak_memory(cfg: BenchConfig) -> dict[str, float]:
    """Peak-RSS rise (MiB) of each (model, op), each in a fresh Python process: a clean heap, so the rise is
    what the call itself needed (activations and workspace), not memory freed earlier and reused."""
    running = {}
    for m in ("ours", "diffusers"):
        for op in ("encode", "decode"):
            args = (cfg.preset, cfg.resolution, cfg.batch_size, m, op, cfg.seed)
            code = f"from eval.bench import peak_rss_child; print(peak_rss_child(*{args!r}))"
            running[f"{m}_{op}_peak_mib"] = subprocess.Popen(
                [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
    return {k: float(p.communicate(timeout=600)[0].split()[-1]) for k, p in running.items()}


def bench_codec(cfg: BenchConfig, memory: dict[str, float]) -> dict:
    """Encode/decode img/s of our model (fp32, and bf16 autocast) against diffusers fp32 on identical weights."""
    ours, theirs = _pair(cfg.preset, cfg.seed)
    ours.eval(), theirs.eval()
    x = _images(cfg.resolution, cfg.batch_size, cfg.seed + 1)
    with torch.no_grad():
        z = theirs.encode(x).latent_dist.mode()
        ref = theirs.decode(z).sample
        max_diff = max((ours.encode(x).mode() - z).abs().max().item(), (ours.decode(z) - ref).abs().max().item())
        with _autocast(True):
            fast = ours.decode(ours.encode(x).mode()).float()

        def bf16(fn):
            def run():
                with _autocast(True):
                    fn()

            return run

        s = _interleaved(
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
    out["weights"] = "random init (same weights in both models)"
    return out


def bench_data(cfg: BenchConfig) -> dict:
    """Images/s decoded and augmented by the default recipe's training set, against what the default step eats."""
    from kl_autoencoder import PRESETS, Autoencoder
    from training.config import TrainConfig
    from training.data import build_datasets

    data_cfg = TrainConfig().data  # the default recipe: 64 px crops from 128 px, the bundled sample photos
    train_ds, _ = build_datasets(data_cfg, cfg.seed)
    n = min(len(train_ds), 16 * cfg.steps)
    cache, train_ds.cache = train_ds.cache, None  # cold: every image decoded from its file and resized

    def per_image() -> float:
        t = time.perf_counter()
        for i in range(n):
            train_ds[i]
        return (time.perf_counter() - t) / n

    cold = statistics.median(per_image() for _ in range(cfg.repeats))
    train_ds.cache = cache  # warm: the trainer's steady state on this small set (decoded uint8 cached)
    per_image()
    warm = statistics.median(per_image() for _ in range(cfg.repeats))
    torch.manual_seed(cfg.seed)
    tiny = Autoencoder(PRESETS["tiny"])
    x, lpips = _images(data_cfg.resolution, data_cfg.batch_size, cfg.seed), _lpips_random()
    s = _interleaved(
        {gan: our_step_fn(tiny, x, True, gan == "gan", lpips) for gan in ("gan", "nogan")}, cfg.steps, cfg.repeats
    )
    consume = data_cfg.batch_size / min(s.values())  # the faster step (before disc_start) eats the most
    return {
        "data_img_s": 1 / cold,
        "data_cached_img_s": 1 / warm,
        "train_tiny_bf16_gan_img_s": data_cfg.batch_size / s["gan"],
        "train_tiny_bf16_nogan_img_s": data_cfg.batch_size / s["nogan"],
        "data_over_consumption": 1 / cold / consume,
        "data_cached_over_consumption": 1 / warm / consume,
        "config": f"sample source, {data_cfg.resolution} px crops from {data_cfg.resize} px, num_workers 0",
    }


def run_bench(cfg: BenchConfig) -> dict:
    unknown = set(cfg.what) - set(SECTIONS)
    if unknown:
        raise ValueError(f"--what: unknown section(s) {sorted(unknown)}; choose from {list(SECTIONS)}")
    if cfg.precision not in ("fp32", "bf16", "both"):
        raise ValueError(f"--precision: choose fp32, bf16 or both, got {cfg.precision!r}")
    precisions = ["fp32", "bf16"] if cfg.precision == "both" else [cfg.precision]
    result: dict = {
        "config": {k: v for k, v in vars(cfg).items()} | {"what": list(cfg.what)},
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        },
    }
    # first: children started after LPIPS/torchvision were imported here report 0 MiB rises (cause not found)
    memory = peak_memory(cfg) if "codec" in cfg.what else {}
    if "train" in cfg.what:
        result["train"] = bench_train(cfg, precisions)
    if "peak" in cfg.what:
        result["peak"] = bench_peak(cfg, precisions, result.get("train"))
    if "codec" in cfg.what:
        result["codec"] = bench_codec(cfg, memory)
    if "data" in cfg.what:
        result["data"] = bench_data(replace(cfg))
    return result


def format_table(result: dict) -> str:
    """The measurements as `section  name  value` lines."""
    lines = []

    def walk(prefix: str, d: dict) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            elif isinstance(v, float):
                lines.append(f"{prefix}{k:<40} {v:12.4g}")
            else:
                lines.append(f"{prefix}{k:<40} {v}")

    walk("", {k: v for k, v in result.items() if k != "config"})
    return "\n".join(lines)
