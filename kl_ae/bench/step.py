"""The training-step half of `kl-ae bench`: our step against reference-style loops, and its FLOP/s against a
GEMM peak measured in the same run (and, on a GPU, against its datasheet's bf16 peak: MFU).

Our step is the trainer's own, `training.step.TrainStep` (the loop in `training/train.py` runs it on every batch):
ONE autoencoder forward feeds the generator update and then the discriminator update (the D sees the detached
reconstruction), the adversarial weight computed with LPIPS and D differentiated once, fused AdamW, a fused EMA, no
host synchronisation. Here it runs in one process without accelerate's process-wide state (`LocalAccelerator`), so
steps of several precisions can be timed in turns. The baselines are the loop of diffusers'
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
from types import MethodType

import torch
from accelerate.utils import convert_outputs_to_fp32

from kl_ae.bench.common import BenchConfig, images, interleaved, lpips_random, model_pair
from kl_ae.bench.device import DTYPES, autocast, bf16_peak_tflops, gemm_peak, timed

BASELINES = ("reference", "fixed")


class LocalAccelerator:
    """The members of `accelerate.Accelerator` that `TrainStep` uses, for one process and without accelerate's
    process-wide state (steps of several precisions interleave in one bench process), doing what accelerate does
    there: a prepared module's forward runs under autocast with fp32 outputs, and fp16 scales the loss with a
    GradScaler, unscales every prepared optimizer's gradients before clipping and steps through the scaler."""

    sync_gradients = True  # no gradient accumulation

    def __init__(self, precision: str, device: torch.device | str, scaler: torch.amp.GradScaler | None = None):
        self.device, self.dtype = torch.device(device), DTYPES[precision]
        fp16 = precision == "fp16"
        self.scaler = (scaler or torch.amp.GradScaler(self.device.type)) if fp16 else None
        self.optimizers: list[torch.optim.Optimizer] = []

    def prepare_module(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.dtype is not None:
            forward = torch.autocast(self.device.type, dtype=self.dtype)(type(module).forward)
            module.forward = MethodType(convert_outputs_to_fp32(forward), module)
        return module

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer):
        self.optimizers.append(optimizer)
        return optimizer if self.scaler is None else _Scaled(optimizer, self.scaler)

    def accumulate(self, *models):
        return contextlib.nullcontext()

    def no_sync(self, model):
        return contextlib.nullcontext()

    def unwrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        if self.scaler is not None:
            for optimizer in self.optimizers:
                self.scaler.unscale_(optimizer)
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


class _Scaled:
    """fp16's optimizer as accelerate wraps it: `step` steps through the GradScaler (which skips an update whose
    gradients overflowed) and updates the scale."""

    def __init__(self, optimizer, scaler):
        self.optimizer, self.scaler = optimizer, scaler

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


def _disc(seed: int, device: torch.device, channels: int = 64):
    from training.discriminator import PatchDiscriminator

    torch.manual_seed(seed + 1)
    return PatchDiscriminator(base_channels=channels, norm="group").to(device)  # GroupNorm, as the default run's


def our_step_fn(
    autoencoder, x: torch.Tensor, precision: str, gan: bool, lpips, ema: bool = True, scaler=None, disc_channels=64
):
    """A call runs one `training.step.TrainStep` on x (the trainer's step, its defaults: AdamW, grad_clip 1.0, the
    EMA), on x's device.

    precision: fp32, bf16 or fp16 autocast; fp16 scales the loss with `scaler` (a torch.amp.GradScaler; one is
    made when none is given), as accelerate does for the trainer. gan: the discriminator on (factor 1) or not yet
    started. lpips: None for a step without it.
    """
    from training.config import LossConfig
    from training.step import AutoencoderWithLoss, GuardedEMA, StepModules, StepSchedule, TrainStep, adamw

    device = x.device
    acc = LocalAccelerator(precision, device, scaler)
    model = acc.prepare_module(AutoencoderWithLoss(autoencoder, learn_logvar=False, logvar_init=0.0).to(device))
    disc = acc.prepare_module(_disc(0, device, disc_channels))
    model.train(), disc.train()
    opt_g = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.5, 0.9))
    opt_d = adamw(disc.parameters(), lr=1e-4, betas=(0.5, 0.9))
    average = GuardedEMA(model.autoencoder.parameters(), decay=0.999, use_ema_warmup=True) if ema else None
    modules = StepModules(model, disc, acc.prepare_optimizer(opt_g), acc.prepare_optimizer(opt_d), lpips, ema=average)
    train_step = TrainStep(acc, modules, LossConfig(), grad_clip=1.0, fp16=precision == "fp16")
    schedule = StepSchedule(disc_factor=1.0 if gan else 0.0)
    return lambda: train_step(x, None, schedule)


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
    as offline, its discriminator) before and after `disc_start`, and the run's step time: those two weighted by
    the steps the recipe spends in each (the rest of a run, validation and export, not counted). Also the default
    step with LPIPS (random VGG and AlexNet backbones: the cost is right), as it trains online."""
    from kl_ae.common.lpips import LPIPS
    from kl_autoencoder import PRESETS, Autoencoder
    from training.config import TrainConfig

    recipe = TrainConfig()
    data, loss, steps = recipe.data, recipe.loss, recipe.train.max_steps
    x = images(data.resolution, data.batch_size, cfg.seed, cfg.device)
    out: dict = {"config": f"{data.resolution} px, batch {data.batch_size}, {steps} steps, GAN from step "
                           f"{loss.disc_start}, no LPIPS"}  # fmt: skip
    perceptual = {net: LPIPS(net=net, random_backbone=True).to(cfg.device) for net in ("vgg", "alex")}
    for prec in precisions:
        torch.manual_seed(cfg.seed)
        model = Autoencoder(PRESETS[recipe.model.preset]).to(cfg.device)
        fns = {gan: our_step_fn(model, x, prec, gan, None, disc_channels=loss.disc_channels) for gan in (False, True)}
        for net, lp in perceptual.items():  # online, the run also trains with LPIPS (loss.lpips_net)
            torch.manual_seed(cfg.seed)
            model = Autoencoder(PRESETS[recipe.model.preset]).to(cfg.device)
            fns[f"lpips_{net}"] = our_step_fn(model, x, prec, False, lp, disc_channels=loss.disc_channels)
        s = interleaved(fns, cfg.steps, cfg.repeats)
        for net in perceptual:
            out[f"default_lpips_{net}_{prec}_nogan_img_s"] = data.batch_size / s[f"lpips_{net}"]
        out[f"default_{prec}_nogan_img_s"] = data.batch_size / s[False]
        out[f"default_{prec}_gan_img_s"] = data.batch_size / s[True]
        nogan_steps = min(loss.disc_start, steps)
        out[f"default_{prec}_run_step_seconds"] = nogan_steps * s[False] + (steps - nogan_steps) * s[True]
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
