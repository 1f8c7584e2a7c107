"""The training-step half of `kl-ae bench`: our step against reference-style loops, and its FLOP/s against a
GEMM peak measured in the same run (and, on a GPU, against its datasheet's bf16 peak: MFU).

Our step is `training/train.py`'s: ONE autoencoder forward feeds the generator update and then the discriminator
update (the D sees the detached reconstruction), the adversarial weight computed with LPIPS and D differentiated
once, fused AdamW, a fused EMA, no host synchronisation. The baselines are the loop of diffusers'
`train_autoencoderkl.py` (the reference the project grew from), with our weights in diffusers' `AutoencoderKL`,
`lpips.LPIPS`, the same PatchGAN, `torch.optim.AdamW` and diffusers' `EMAModel` at their defaults, the same
losses and the same precision (bf16 autocast over fp32 weights): G and D alternate by step parity, and every
call runs the autoencoder forward.

- `reference`: as that script runs it. The forward keeps its graph on the D call too, and the D loss is taken on
  the reconstructions without detaching them, so its backward runs through the whole autoencoder (the script then
  applies those gradients in its next G step; here they are dropped so both loops optimise the same losses); D
  is not frozen in the G call; the EMA steps after every call; the logged values are read with `.item()`.
- `fixed`: what a careful user writes after it: the D call's forward under `no_grad` and detached, D frozen in
  the G call, the EMA stepped after G calls only.

Both baselines run LPIPS WITH gradients (the script wraps it in `no_grad`, so it trains without a perceptual
gradient: not the same loss) and keep fp32 weights (the script casts them to bf16, where small updates vanish).
"""

from __future__ import annotations

import contextlib
import statistics
from typing import TYPE_CHECKING

import torch

from kl_ae.bench.device import DTYPES, autocast, bf16_peak_tflops, gemm_peak, timed

if TYPE_CHECKING:
    from kl_ae.bench.run import BenchConfig

BASELINES = ("reference", "fixed")


def interleaved(fns: dict, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in turns after one untimed warm-up call each (the device's
    queued work waited for at both ends of each timing)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(lambda fn=fn: [fn() for _ in range(steps)]) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


class _Single:
    """What `guarded_step` needs of an Accelerator, for one process without one."""

    clip_grad_norm_ = staticmethod(torch.nn.utils.clip_grad_norm_)


def images(resolution: int, batch: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """Smooth random images in [-1, 1] (B, 3, H, W): cheaper than decoding files, not constant."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, max(resolution // 8, 1), max(resolution // 8, 1), generator=g)
    x = torch.nn.functional.interpolate(low, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1).to(device)


def diffusers_twin(ours):
    """diffusers' AutoencoderKL holding our KL autoencoder's weights (loaded strictly), fp32."""
    from diffusers import AutoencoderKL

    from kl_autoencoder.diffusers_format import to_diffusers_config, to_diffusers_state_dict

    theirs = AutoencoderKL(**to_diffusers_config(ours.config))
    theirs.load_state_dict(to_diffusers_state_dict(ours.state_dict()), strict=True)
    return theirs


def model_pair(preset: str, seed: int, device: str = "cpu"):
    """Our autoencoder of `preset` (initialised from `seed`) and its diffusers twin, both fp32."""
    from kl_autoencoder import PRESETS, Autoencoder

    torch.manual_seed(seed)
    ours = Autoencoder(PRESETS[preset])
    return ours.to(device), diffusers_twin(ours).to(device)


def lpips_random(dtype: torch.dtype | None = None, device: str = "cpu"):
    from kl_ae.common.lpips import LPIPS

    return LPIPS(net="vgg", random_backbone=True, dtype=dtype).to(device)


def _disc(seed: int, device: torch.device, channels: int = 64):
    from training.discriminator import PatchDiscriminator

    torch.manual_seed(seed + 1)
    return PatchDiscriminator(base_channels=channels, norm="group").to(device)  # GroupNorm, as the default run's


class _Scaled:
    """fp16's loss scaling as accelerate's optimizer wrapper does it: `step` steps through the GradScaler (which
    skips an update whose gradients overflowed) and updates the scale."""

    def __init__(self, optimizer, scaler):
        self.optimizer, self.scaler = optimizer, scaler

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


def our_step_fn(
    autoencoder, x: torch.Tensor, precision: str, gan: bool, lpips, ema: bool = True, scaler=None, disc_channels=64
):
    """One step of OUR trainer (training/train.py), with the default recipe's EMA, in x's device.

    precision: fp32, bf16 or fp16 autocast; fp16 scales the loss with `scaler` (a torch.amp.GradScaler; one is
    made when none is given), as accelerate does for the trainer. lpips: None for a step without it.
    """
    from training.config import LossConfig
    from training.step import (
        Generator,
        GuardedEMA,
        adamw,
        discriminator_objective,
        generator_objective,
        guarded_step,
    )

    device, dtype, fp16 = x.device, DTYPES[precision], precision == "fp16"
    loss_cfg = LossConfig(disc_start=0 if gan else 10**9, disc_norm="group", disc_channels=disc_channels)
    gen = Generator(autoencoder, learn_logvar=False, logvar_init=0.0).to(device).train()
    disc = _disc(0, device, disc_channels).train()
    params_g = [p for p in gen.parameters() if p.requires_grad]
    opt_g = adamw(params_g, lr=1e-4, betas=(0.5, 0.9))
    opt_d = adamw(disc.parameters(), lr=1e-4, betas=(0.5, 0.9))
    if fp16:
        scaler = scaler or torch.amp.GradScaler(device.type)
        opt_g, opt_d = _Scaled(opt_g, scaler), _Scaled(opt_d, scaler)
    average = GuardedEMA(autoencoder.parameters(), decay=0.999, use_ema_warmup=True) if ema else None

    def backward(loss, opt) -> None:
        if fp16:
            scaler.scale(loss).backward()
            scaler.unscale_(opt.optimizer)  # before clipping, as accelerate's clip_grad_norm_ does
        else:
            loss.backward()

    def step() -> None:
        with autocast(dtype, device.type):
            recon, posterior, _ = gen(x)
            loss, _, factor = generator_objective(
                x, recon, posterior, gen.logvar, lpips, disc, autoencoder.last_layer, loss_cfg, step=1
            )
        backward(loss, opt_g)
        ok, _ = guarded_step(_Single, opt_g, params_g, 1.0, fp16)
        if factor > 0:
            with autocast(dtype, device.type):
                d_loss, _ = discriminator_objective(x, recon, disc, loss_cfg, factor)
            backward(d_loss, opt_d)
            guarded_step(_Single, opt_d, list(disc.parameters()), 1.0, fp16)  # the EMA follows the autoencoder's
        if average is not None:
            average.step(autoencoder.parameters(), keep=ok)

    return step


def baseline_step_fn(vae, x: torch.Tensor, bf16: bool, gan: bool, variant: str = "fixed", ema: bool = True):
    """One call of the reference-style loop (see the module docstring): with the GAN, even calls update G and
    odd calls update D; without it, every call updates G."""
    import lpips as lpips_pkg
    from diffusers.training_utils import EMAModel

    if variant not in BASELINES:
        raise ValueError(f"unknown baseline {variant!r}; choose from {BASELINES}")
    faithful = variant == "reference"
    lp = lpips_pkg.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval().requires_grad_(False)
    lp, disc = lp.to(x.device), _disc(0, x.device).train()
    dtype = torch.bfloat16 if bf16 else None
    vae.train()
    opt_g = torch.optim.AdamW(vae.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.5, 0.9))
    average = EMAModel(vae.parameters(), decay=0.999, use_ema_warmup=True) if ema else None
    last_layer = vae.decoder.conv_out.weight
    B = x.shape[0]
    calls = [0]

    def step() -> None:
        d_turn = gan and calls[0] % 2 == 1
        calls[0] += 1
        graph = contextlib.nullcontext() if faithful or not d_turn else torch.no_grad()
        with autocast(dtype, x.device.type), graph:
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
        if d_turn:
            with autocast(dtype, x.device.type):
                real, fake = disc(x).float(), disc(recon if faithful else recon.detach()).float()
                d_loss = 0.5 * (torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())
            d_loss.backward()  # reference: through the autoencoder as well
            torch.nn.utils.clip_grad_norm_(disc.parameters(), 1.0)
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
            opt_g.zero_grad(set_to_none=True)
            logs = (d_loss, real.mean(), fake.mean())
        else:
            with autocast(dtype, x.device.type):
                rec = (x.float() - recon.float()).abs() + lp(x, recon).float()
                nll = rec.sum() / B
                loss = nll + 1e-6 * posterior.kl().sum() / B
                logs = (loss, nll, rec.mean())
                if gan:
                    disc.requires_grad_(faithful)
                    g_loss = -disc(recon).float().mean()
                    g1 = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
                    g2 = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
                    d_weight = (g1.norm() / (g2.norm() + 1e-4)).clamp(0.0, 1e4).detach() * 0.5
                    loss = loss + d_weight * g_loss
                    logs += (d_weight, g_loss)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            disc.requires_grad_(True)
            opt_d.zero_grad(set_to_none=True)  # reference: D's gradients from the G loss
        if average is not None and (faithful or not d_turn):
            average.step(vae.parameters())
        if faithful:
            [t.item() for t in logs]

    return step


def bench_train(cfg: BenchConfig, precisions: list[str]) -> dict:
    """img/s with G and D both updated for every image: ours = B / step, a baseline = B / (G call + D call)."""
    ours_ae, vae = model_pair(cfg.preset, cfg.seed, cfg.device)
    x = images(cfg.resolution, cfg.batch_size, cfg.seed, cfg.device)
    lpips = lpips_random(device=cfg.device)
    out = {}
    for prec in precisions:
        bf16 = prec == "bf16"
        fns = {
            "ours_gan": our_step_fn(ours_ae, x, prec, True, lpips),
            "ours_nogan": our_step_fn(ours_ae, x, prec, False, lpips),
            "fixed_nogan": baseline_step_fn(vae, x, bf16, False, "fixed"),
        }
        for variant in BASELINES:
            # G and D calls alternate, so time them in pairs: 2 calls = one G and one D update per image
            call = baseline_step_fn(vae, x, bf16, True, variant)
            fns[f"{variant}_gan"] = lambda call=call: (call(), call())
        s = interleaved(fns, cfg.steps, cfg.repeats)
        B = cfg.batch_size
        row = {"ours_gan_ms_per_step": 1e3 * s["ours_gan"], "ours_gan_img_s": B / s["ours_gan"]}
        for variant in BASELINES:
            row[f"{variant}_gan_ms_per_g_and_d_call"] = 1e3 * s[f"{variant}_gan"]
            row[f"{variant}_gan_img_s"] = B / s[f"{variant}_gan"]
            row[f"speedup_gan_vs_{variant}"] = s[f"{variant}_gan"] / s["ours_gan"]
        row["ours_nogan_img_s"] = B / s["ours_nogan"]
        row["fixed_nogan_img_s"] = B / s["fixed_nogan"]
        row["speedup_nogan_vs_fixed"] = s["fixed_nogan"] / s["ours_nogan"]
        out[prec] = row
    if "fp32" in out and "bf16" in out:
        out["bf16_over_fp32"] = out["bf16"]["ours_gan_img_s"] / out["fp32"]["ours_gan_img_s"]
        out["bf16_over_fp32_nogan"] = out["bf16"]["ours_nogan_img_s"] / out["fp32"]["ours_nogan_img_s"]
    out["lpips"] = "random VGG backbone (timing only)"
    return out


def bench_default(cfg: BenchConfig, precisions: list[str]) -> dict:
    """The default run's step (`kl-ae train` with no arguments: the `tiny` preset, 64 px crops, batch 8, no LPIPS
    as offline, its discriminator) against the default run before it was made for fp32 CPUs (`tiny` at 32 base
    channels, a 64-channel discriminator), before and after `disc_start`; and the run's step time, those two
    weighted by the steps the recipe spends in each (the rest of a run, validation and export, not counted).
    Also the default step with LPIPS (random VGG and AlexNet backbones: the cost is right), as it trains online."""
    import dataclasses

    from kl_autoencoder import PRESETS, Autoencoder
    from training.config import TrainConfig

    recipe = TrainConfig()
    data, loss, steps = recipe.data, recipe.loss, recipe.train.max_steps
    x = images(data.resolution, data.batch_size, cfg.seed, cfg.device)
    arms = {
        "default": (PRESETS[recipe.model.preset], loss.disc_channels),
        "before": (dataclasses.replace(PRESETS[recipe.model.preset], base_channels=32), 64),
    }
    out: dict = {"config": f"{data.resolution} px, batch {data.batch_size}, {steps} steps, GAN from step "
                           f"{loss.disc_start}, no LPIPS; before: base_channels 32, disc_channels 64"}  # fmt: skip
    from kl_ae.common.lpips import LPIPS

    perceptual = {net: LPIPS(net=net, random_backbone=True).to(cfg.device) for net in ("vgg", "alex")}
    for prec in precisions:
        fns = {}
        for arm, (model_cfg, disc_channels) in arms.items():
            torch.manual_seed(cfg.seed)
            model = Autoencoder(model_cfg).to(cfg.device)
            for gan in (False, True):
                fns[(arm, gan)] = our_step_fn(model, x, prec, gan, None, disc_channels=disc_channels)
        for net, lp in perceptual.items():  # online, the run also trains with LPIPS (loss.lpips_net)
            torch.manual_seed(cfg.seed)
            model = Autoencoder(arms["default"][0]).to(cfg.device)
            fns[(f"default_lpips_{net}", False)] = our_step_fn(
                model, x, prec, False, lp, disc_channels=loss.disc_channels
            )
        s = interleaved(fns, cfg.steps, cfg.repeats)
        for net in perceptual:
            out[f"default_lpips_{net}_{prec}_nogan_img_s"] = data.batch_size / s[(f"default_lpips_{net}", False)]
        run = {arm: (min(loss.disc_start, steps) * s[(arm, False)] + max(steps - loss.disc_start, 0) * s[(arm, True)])
               for arm in arms}  # fmt: skip
        for arm in arms:
            out[f"{arm}_{prec}_nogan_img_s"] = data.batch_size / s[(arm, False)]
            out[f"{arm}_{prec}_gan_img_s"] = data.batch_size / s[(arm, True)]
            out[f"{arm}_{prec}_run_step_seconds"] = run[arm]
        out[f"speedup_{prec}"] = run["before"] / run["default"]
    return out


def bench_optim(cfg: BenchConfig) -> dict:
    """ms per update of the autoencoder's parameters (random gradients): AdamW as torch defaults it (one tensor at
    a time on a CPU, foreach on a GPU), foreach and fused (ours); diffusers' EMAModel at its defaults and our
    fused-lerp EMA."""
    from diffusers.training_utils import EMAModel

    from training.step import GuardedEMA

    autoencoder, _ = model_pair(cfg.preset, cfg.seed, cfg.device)
    params = list(autoencoder.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    keep = torch.ones((), dtype=torch.bool, device=cfg.device)
    fns = {
        **{
            f"adamw_{name}": torch.optim.AdamW(params, lr=1e-6, **kwargs).step
            for name, kwargs in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True}))
        },
        "ema_diffusers": lambda e=EMAModel(params, decay=0.999, use_ema_warmup=True): e.step(params),
        "ema_ours": lambda e=GuardedEMA(params, decay=0.999, use_ema_warmup=True): e.step(params, keep=keep),
    }
    s = interleaved(fns, cfg.steps, cfg.repeats)
    out = {f"{k}_ms": 1e3 * v for k, v in s.items()}
    out["parameters_millions"] = sum(p.numel() for p in params) / 1e6
    out["fused_over_default"] = s["adamw_default"] / s["adamw_fused"]
    out["ema_ours_over_diffusers"] = s["ema_diffusers"] / s["ema_ours"]
    return out


def bench_peak(cfg: BenchConfig, precisions: list[str]) -> dict:
    """FLOPs of one of our steps (GAN on), achieved FLOP/s against the GEMM peak (and against the peaks of the
    precisions its parts run in: LPIPS is fp32 under bf16 unless `loss.lpips_autocast`), and the profiler's top
    ops. Step and GEMM are both timed best-of-N, the machine's best against the machine's best. On a GPU also the
    MFU: achieved FLOP/s over the datasheet's dense bf16 peak of that GPU (kl_ae/bench/device.py)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    cuda = cfg.device == "cuda"
    ours_ae, _ = model_pair(cfg.preset, cfg.seed, cfg.device)
    x, lpips = images(cfg.resolution, cfg.batch_size, cfg.seed, cfg.device), lpips_random(device=cfg.device)
    sizes = (4096, 8192) if cuda else (2048, 4096) if cfg.resolution >= 64 else (512,)
    peak = gemm_peak(sizes, device=cfg.device)
    out = {"gemm_peak_gflop_s": {k: v / 1e9 for k, v in peak.items()}}
    datasheet = bf16_peak_tflops(torch.cuda.get_device_name()) if cuda else None
    if cuda:
        out["bf16_datasheet_tflop_s"] = datasheet or "not in the table: MFU not reported"
    # by default LPIPS runs in fp32 whatever the step's precision (see kl_ae/common/lpips.py): its FLOPs, as the step
    # runs it (both images forward, backward to the reconstruction), are held to the fp32 peak
    lpips_counter = FlopCounterMode(display=False)
    with lpips_counter:
        lpips(x, x.clone().requires_grad_(True)).sum().backward()
    lpips_flops = lpips_counter.get_total_flops()
    runs = [(prec, prec, lpips, lpips_flops) for prec in precisions]
    if "bf16" in precisions:  # loss.lpips_autocast=true: everything in bf16
        runs.append(("bf16_lpips_autocast", "bf16", lpips_random(torch.bfloat16, cfg.device), 0))
    for name, prec, perceptual, fp32_flops in runs:
        step = our_step_fn(ours_ae, x, prec, True, perceptual)
        step()
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops = counter.get_total_flops()
        # the same statistic as the GEMM peak (best of several calls) for the step; the median is reported too
        times = sorted(timed(step) for _ in range(max(cfg.repeats, 3)))
        seconds, median = times[0], times[len(times) // 2]
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            step()
        events = prof.key_averages()
        where = "cuda" if cuda else "cpu"
        self_time = {e.key: getattr(e, "self_device_time_total" if cuda else "self_cpu_time_total") for e in events}
        total = sum(self_time.values())
        top = sorted(self_time, key=self_time.get, reverse=True)[:10]
        peak_prec = peak["bf16" if prec == "fp16" else prec]  # fp16 runs at the bf16 rate on these tensor cores
        out[name] = {
            "gflop_per_step": flops / 1e9,
            "achieved_gflop_s": flops / seconds / 1e9,
            "step_s_best": seconds,
            "step_s_median": median,
            "fraction_of_gemm_peak": flops / seconds / peak_prec,
            "fraction_of_gemm_peak_median_step": flops / median / peak_prec,
            "lpips_fp32_gflop_per_step": fp32_flops / 1e9,
            # the time the step's FLOPs would take at the peak of the precision each part runs in, over its time
            "fraction_of_precision_peak": (fp32_flops / peak["fp32"] + (flops - fp32_flops) / peak_prec) / seconds,
            f"top_ops_self_{where}_share": {k: self_time[k] / total for k in top},
        }
        if datasheet:
            out[name]["mfu_bf16_datasheet"] = flops / seconds / (datasheet * 1e12)
            out[name]["mfu_bf16_datasheet_median_step"] = flops / median / (datasheet * 1e12)
    return out
