"""The modern formats' sections of `kl-ae bench`: what the deep-compression architecture is worth, and what it costs.

- `dc-vs-sd` (`--what dc-vs-sd --seeds 0,1,2`): DC-AE's architecture (the `tiny-dc` recipe's) against SD's pushed
  to the same compression (our model with as many downsamplings and latent channels, its widths scaled until the
  parameter counts are within 10%), each trained with the trainer's own step (`training.step.TrainStep`) on the
  same batches of the bundled photographs (random crops), for the same steps, with the same loss (L1 only), once per
  seed; then the held-out PSNR on the photographs neither run saw, paired over the seeds: the mean difference DC -
  SD and its standard error.
- `dc-step`: our DC training step (the trainer's, L1 only) against diffusers' `AutoencoderDC` forward + L1 +
  backward + AdamW in a plain loop at the same size; and where DC's time per parameter goes: the same plain loop
  over variants of the architecture (the EfficientViT blocks swapped for ResBlocks; strided convolutions and
  interpolation in place of the pixel (un)shuffles; without the latent shortcuts; BatchNorm in place of the
  decoder's RMSNorm) and over SD's architecture at the same parameter count.
- `formats-step`: step time and peak memory of the `dc-f32c32` and `flux2-f8c32` recipes' architectures against
  `kl-f8`'s at the same image size: the trainer's step, L1 (+ KL for the KL models; no LPIPS or GAN, whose cost is
  the same for all three), fp32 and bf16 where the device runs it; the memory of one step in a fresh process each.

Timings are interleaved and reported as medians (`kl_ae.bench.common.interleaved`); on a shared machine only the
ratios are meaningful.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, fields
from functools import partial

import torch

from kl_ae.bench.common import BenchConfig, interleaved
from kl_ae.bench.device import DTYPES, device_info, peak_memory_mib, reset_peak_memory

SECTIONS = ("dc-vs-sd", "dc-step", "formats-step")


@dataclass
class FormatsConfig:
    seeds: tuple[int, ...] = (0, 1, 2)  # dc-vs-sd: one pair of runs per seed
    train_steps: int = 300  # dc-vs-sd: optimizer steps of each run
    train_batch_size: int = 4  # dc-vs-sd: images per step
    # dc-vs-sd: the trainer's default optimizer: AdamW at optim.lr's default, warmed up over optim.warmup_steps'
    # default, then a cosine decay to 0 at the last step
    lr: float | None = None  # None: optim.lr's default
    resolution: int = 128  # dc-vs-sd: training crops; the step sections: image size
    eval_resolution: int = 256  # dc-vs-sd: the held-out photographs, center crops
    dc_recipe: str = "tiny-dc"  # the DC architecture of dc-vs-sd and dc-step
    batch_size: int = 2  # the step sections: images per step
    steps: int = 2  # the step sections: timed steps per measurement
    repeats: int = 3  # the step sections: interleaved repetitions
    precision: str = "both"  # formats-step: fp32 | bf16 | both (bf16 only where the device runs it)
    formats: tuple[str, ...] = ("dc-f32c32", "flux2-f8c32", "kl-f8")  # formats-step: recipes; the last, the baseline
    device: str = "cpu"
    compiled: bool = True  # dc-step: also our step with train.compile (its compilation untimed)

    @classmethod
    def from_bench(cls, cfg: BenchConfig) -> FormatsConfig:
        """These settings from `kl-ae bench`'s: the fields both have; the others keep their defaults here."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)})


L1_ONLY = dict(rec_loss="l1", perceptual_weight=0.0, lpips="off", kl_weight=0.0, disc_start=10**9)


def recipe_arch(recipe: str) -> tuple[str, dict]:
    """(family, the diffusers class's constructor arguments) of a recipe that builds a new family model."""
    from training.config import load_config

    model = load_config(recipe).model
    if model.family == "ours":
        raise ValueError(f"recipe {recipe!r} trains our own model, not a diffusers family")
    return model.family, dict(model.arch or {})


def new_dc(arch: dict, seed: int):
    """A randomly initialised DC-AE behind the family interface."""
    from kl_autoencoder.interface import new_autoencoder

    torch.manual_seed(seed)
    return new_autoencoder("dc-ae", arch)


def sd_config(widths: list[int], latent_channels: int, target: int):
    """SD's architecture (our `Autoencoder`: GroupNorm ResNets, stride-2 convolutions, nearest + conv upsampling,
    mid-block attention, a KL posterior) with as many levels as `widths` and `latent_channels`, its widths `widths`
    scaled by the factor (multiples of 8) whose parameter count comes nearest `target`."""
    from kl_autoencoder import Autoencoder, AutoencoderConfig

    best = None
    for i in range(4, 33):  # scale factors 1/8 .. 2 in steps of 1/16
        mult = tuple(max(1, round(w * i / 16 / 8)) for w in widths)
        cfg = AutoencoderConfig(base_channels=8, channel_mult=mult, layers_per_block=1, latent_channels=latent_channels,
                                norm_num_groups=8, sample_size=128)  # fmt: skip
        with torch.device("meta"):
            n = sum(p.numel() for p in Autoencoder(cfg).parameters())
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (cfg, n)
    return best[0]


def new_sd(cfg, seed: int):
    from kl_autoencoder import Autoencoder
    from kl_autoencoder.families.ours import wrap

    torch.manual_seed(seed)
    return wrap(Autoencoder(cfg))


def trainer_step(ae, device: str, lr: float, precision: str = "fp32", ema: bool = False, total: int = 0, **loss):
    """A call `step(x)` runs the trainer's step (`training.step.TrainStep`) on `ae` with `loss` (LossConfig fields;
    the GAN is off: the discriminator never runs), AdamW at `lr`, grad_clip 1.0, the EMA when `ema`. With `total`
    steps, the learning rate follows the trainer's default schedule over them (`training.train.lr_factor`: linear
    warm-up over optim.warmup_steps' default, cosine to 0); else it stays at `lr`."""
    from kl_ae.bench.step import LocalAccelerator, _disc
    from training.config import LossConfig
    from training.step import AutoencoderWithLoss, GuardedEMA, StepModules, StepSchedule, TrainStep, adamw

    acc = LocalAccelerator(precision, device)
    model = acc.prepare_module(AutoencoderWithLoss(ae, learn_logvar=False, logvar_init=0.0).to(device))
    model.train()
    disc = _disc(0, torch.device(device), 8)
    opt_g = adamw([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.5, 0.9))
    opt_d = adamw(disc.parameters(), lr=lr, betas=(0.5, 0.9))
    average = GuardedEMA(ae.module.parameters(), decay=0.999, use_ema_warmup=True) if ema else None
    modules = StepModules(model, disc, acc.prepare_optimizer(opt_g), acc.prepare_optimizer(opt_d), ema=average)
    step = TrainStep(acc, modules, LossConfig(**loss), grad_clip=1.0, fp16=False)
    schedule = StepSchedule()
    if not total:
        return lambda x: step(x, None, schedule)
    from training.config import OptimConfig
    from training.train import lr_factor

    factor = partial(lr_factor, warmup=OptimConfig().warmup_steps, total=total, schedule="cosine", min_ratio=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt_g, factor)

    def scheduled(x: torch.Tensor) -> None:
        step(x, None, schedule)
        scheduler.step()

    return scheduled


def plain_step(module: torch.nn.Module, x: torch.Tensor):
    """A call runs a diffusers autoencoder as a plain training loop would: forward (posterior mode), L1, backward,
    `torch.optim.AdamW`."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    module.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        (module(x).sample - x).abs().mean().backward()
        optimizer.step()

    return step


def photo_batches(resolution: int, batch: int, steps: int, seed: int):
    """`steps` batches of random crops (and flips) of the bundled photographs' training split, the same for a
    given seed: (B, 3, r, r) in [-1, 1]."""
    from kl_ae.common.data import DataConfig, build_datasets

    train, _ = build_datasets(DataConfig(resolution=resolution, resize=resolution * 5 // 4), seed)
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for step in range(steps):
        while len(order) < batch:
            train.set_epoch(step)
            order += torch.randperm(len(train), generator=g).tolist()
        yield torch.stack([train[i] for i in order[:batch]])
        order = order[batch:]


def held_out_photos(resolution: int) -> torch.Tensor:
    """The bundled photographs the training split leaves out, center crops: (N, 3, r, r) in [-1, 1]."""
    from kl_ae.common.data import DataConfig, build_datasets

    _, val = build_datasets(DataConfig(resolution=resolution, resize=resolution, random_crop=False, hflip=False), 0)
    return torch.stack([val[i] for i in range(len(val))])


@torch.no_grad()
def held_out_psnr(ae, x: torch.Tensor) -> float:
    """Mean PSNR (dB) of the reconstructions of images `x` in [-1, 1], as the trainer's validation measures it (on
    [0, 1])."""
    from kl_ae.common.metrics import psnr

    ae.module.eval()
    recon = ae.decode(ae.encode(x).mode()).clamp(-1, 1)
    return float(psnr((x + 1) / 2, (recon + 1) / 2).mean())


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean of the paired differences a - b and its standard error (0 for a single pair)."""
    d = [x - y for x, y in zip(a, b)]
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    return {"mean_diff_db": statistics.fmean(d), "stderr_db": se}


def bench_dc_vs_sd(cfg: FormatsConfig) -> dict:
    """Held-out PSNR of DC-AE's architecture and SD's at f32 after the same training, paired over seeds."""
    from training.config import OptimConfig

    _, arch = recipe_arch(cfg.dc_recipe)
    dc = new_dc(arch, 0)
    widths = list(arch.get("encoder_block_out_channels") or dc.config["encoder_block_out_channels"])
    n_dc = dc.parameter_counts()["total"]
    sd_cfg = sd_config(widths, dc.latent_channels, n_dc)
    sd = new_sd(sd_cfg, 0)
    n_sd = sd.parameter_counts()["total"]
    if not 0.9 <= n_sd / n_dc <= 1.1:
        raise ValueError(f"no SD configuration within 10% of the DC model's {n_dc} parameters")
    held_out = held_out_photos(cfg.eval_resolution).to(cfg.device)
    lr, warmup = cfg.lr or OptimConfig().lr, OptimConfig().warmup_steps
    rows, psnr = [], {"dc": [], "sd": []}
    for seed in cfg.seeds:
        row = {"seed": seed}
        for name, build in (("dc", lambda s: new_dc(arch, s)), ("sd", lambda s: new_sd(sd_cfg, s))):
            ae = build(seed).to(cfg.device)
            step = trainer_step(ae, cfg.device, lr, total=cfg.train_steps, **L1_ONLY)
            seconds = []
            for x in photo_batches(cfg.resolution, cfg.train_batch_size, cfg.train_steps, seed):
                seconds.append(_timed(step, x.to(cfg.device)))
            psnr[name].append(held_out_psnr(ae, held_out))
            row |= {f"{name}_psnr_db": psnr[name][-1], f"{name}_s_per_step": statistics.median(seconds)}
        rows.append(row)
    return {
        "dc_architecture": f"{cfg.dc_recipe}: f{dc.spatial_factor}c{dc.latent_channels}, widths {widths}",
        "sd_architecture": f"ours: f{sd.spatial_factor}c{sd.latent_channels}, widths {list(sd_cfg.block_out_channels)}",
        "dc_parameters": n_dc,
        "sd_parameters": n_sd,
        "sd_over_dc_parameters": n_sd / n_dc,
        "training": f"{cfg.train_steps} steps x {cfg.train_batch_size} random {cfg.resolution} px crops of the "
        f"bundled photographs, L1 only, AdamW lr {lr}, {warmup} warm-up steps, cosine to 0",
        "held_out": f"{len(held_out)} held-out photographs, {cfg.eval_resolution} px center crops",
        "per_seed": {str(r.pop("seed")): r for r in rows},
        "dc_minus_sd": paired(psnr["dc"], psnr["sd"]),
        "dc_mean_psnr_db": statistics.fmean(psnr["dc"]),
        "sd_mean_psnr_db": statistics.fmean(psnr["sd"]),
    }


def _timed(step, x: torch.Tensor) -> float:
    from kl_ae.bench.device import timed

    return timed(lambda: step(x))


def dc_variants(arch: dict) -> dict[str, dict]:
    """The DC architecture and its variants, each one piece replaced: name -> AutoencoderDC arguments."""
    n = len(arch["encoder_block_out_channels"])
    return {
        "dc": arch,
        "dc_attention_as_resblocks": arch | {"encoder_block_types": "ResBlock", "decoder_block_types": "ResBlock"},
        "dc_conv_instead_of_shuffles": arch | {"downsample_block_type": "conv", "upsample_block_type": "interpolate"},
        "dc_without_latent_shortcuts": arch | {"encoder_out_shortcut": False, "decoder_in_shortcut": False},
        "dc_batchnorm_decoder": arch | {"decoder_norm_types": ["batch_norm"] * n},
    }


def bench_dc_step(cfg: FormatsConfig) -> dict:
    """Our DC step against diffusers' AutoencoderDC in a plain loop; the plain loop's time per parameter for the
    architecture's variants and for SD's at the same parameter count."""
    from kl_ae.bench.common import images

    _, arch = recipe_arch(cfg.dc_recipe)
    x = images(cfg.resolution, cfg.batch_size, 1, cfg.device)
    dc = new_dc(arch, 0).to(cfg.device)
    twin = new_dc(arch, 0).module.to(cfg.device)  # the same initial weights, trained by the plain loop
    ours, ours_ema = (trainer_step(new_dc(arch, 0).to(cfg.device), cfg.device, 1e-4, ema=e, **L1_ONLY) for e in (0, 1))
    calls = {"ours": lambda: ours(x), "ours_with_ema": lambda: ours_ema(x), "diffusers_plain": plain_step(twin, x)}
    if cfg.compiled:  # train.compile=true: the encoder and decoder compiled as the trainer compiles them
        compiled = new_dc(arch, 0).to(cfg.device)
        for module in (compiled.module.encoder, compiled.module.decoder):
            module.compile(dynamic=False)
        calls["ours_compiled"] = partial(trainer_step(compiled, cfg.device, 1e-4, **L1_ONLY), x)
    s = interleaved(calls, cfg.steps, cfg.repeats)  # the compilation happens in the untimed warm-up call
    out = {
        "architecture": f"{cfg.dc_recipe} at {cfg.resolution} px, batch {cfg.batch_size}, fp32, L1 only",
        "diffusers_plain_s_per_step": s["diffusers_plain"],
    }
    for name in ("ours", "ours_with_ema", "ours_compiled"):
        if name in s:  # speedup_vs_diffusers_plain, speedup_with_ema_vs_..., speedup_compiled_vs_...
            out[f"{name}_s_per_step"] = s[name]
            out[f"speedup{name.removeprefix('ours')}_vs_diffusers_plain"] = s["diffusers_plain"] / s[name]
    modules = {name: new_dc(a, 0).module.to(cfg.device) for name, a in dc_variants(arch).items()}
    sd = sd_config(list(arch["encoder_block_out_channels"]), dc.latent_channels, dc.parameter_counts()["total"])
    modules["sd_same_parameters"] = _diffusers_kl(sd).to(cfg.device)
    s = interleaved({k: plain_step(m, x) for k, m in modules.items()}, cfg.steps, cfg.repeats)
    for name, module in modules.items():
        n = sum(p.numel() for p in module.parameters())
        out[name] = {"parameters": n, "s_per_step": s[name], "us_per_step_per_mparam": s[name] / n * 1e12,
                     "time_over_dc": s[name] / s["dc"]}  # fmt: skip
    return out


def _diffusers_kl(cfg):
    """diffusers' AutoencoderKL of our configuration (SD's architecture), whose forward the plain loop calls."""
    from diffusers import AutoencoderKL

    from kl_autoencoder import to_diffusers_config

    torch.manual_seed(0)
    return AutoencoderKL(**to_diffusers_config(cfg))


def step_child(recipe: str, resolution: int, batch: int, precision: str, device: str, steps: int, repeats: int) -> dict:
    """In a fresh process: one recipe's architecture, the trainer's step (L1, + KL where there is one) timed (median
    of `repeats` x `steps` steps after a warm-up), and the memory of training it (MiB): the peak (CPU: the process's
    peak RSS; CUDA: torch's peak allocation) and its rise over the memory held before the model was built (weights,
    gradients, AdamW and EMA state and a step's activations; on a CPU a lower bound when importing peaked higher)."""
    from kl_ae.bench.device import timed
    from training.step import TrainStep  # noqa: F401  (imported before the memory is read: its imports are no rise)

    x = torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(1)).to(device) * 2 - 1
    reset_peak_memory(device)
    before = current_memory_mib(device)
    ae = build_recipe_model(recipe, 0).to(device)
    step = trainer_step(ae, device, 1e-5, precision, ema=True, **(L1_ONLY | {"kl_weight": 1e-6}))
    step(x)
    peak = peak_memory_mib(device)
    times = [timed(lambda: [step(x) for _ in range(steps)]) / steps for _ in range(repeats)]
    return {"parameters": ae.parameter_counts()["total"], "s_per_step": statistics.median(times), "peak_mib": peak,
            "rise_mib": max(peak - before, 0.0)}  # fmt: skip


def current_memory_mib(device: str) -> float:
    """CUDA: what torch's allocator holds now; CPU: this process's resident memory now (Linux; else its peak)."""
    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_memory_mib(device)


def build_recipe_model(recipe: str, seed: int):
    """A random model of a recipe's architecture behind the interface: a diffusers family's, or our preset's."""
    from training.config import load_config

    model = load_config(recipe).model
    torch.manual_seed(seed)
    if model.family == "ours":
        return new_sd(model.autoencoder_config(), seed)
    from kl_autoencoder.interface import new_autoencoder

    return new_autoencoder(model.family, model.arch)


def bench_formats_step(cfg: FormatsConfig) -> dict:
    """Step time and peak memory of each recipe of `cfg.formats` against the last, each in its own process, one
    after another (the models are large: side by side they would compete for memory and cores)."""
    bf16 = device_info(cfg.device).get("cpu_bf16", cfg.device == "cuda")
    precisions = ["fp32", "bf16"] if cfg.precision == "both" else [cfg.precision]
    precisions = [p for p in precisions if p == "fp32" or (bf16 and DTYPES.get(p) is not None)]
    out: dict = {"size": f"{cfg.resolution} px, batch {cfg.batch_size}", "baseline": cfg.formats[-1]}
    for precision in precisions:
        rows = {}
        for recipe in cfg.formats:
            args = (recipe, cfg.resolution, cfg.batch_size, precision, cfg.device, cfg.steps, cfg.repeats)
            code = f"import json; from kl_ae.bench.formats import step_child; print(json.dumps(step_child(*{args!r})))"
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:
                raise RuntimeError(f"formats-step {recipe} {precision}: {done.stderr.strip().splitlines()[-1:]}")
            rows[recipe] = json.loads(done.stdout.strip().splitlines()[-1])
        baseline = rows[cfg.formats[-1]]
        for row in rows.values():
            row["time_over_baseline"] = row["s_per_step"] / baseline["s_per_step"]
            row["rise_over_baseline"] = row["rise_mib"] / max(baseline["rise_mib"], 1e-9)
        out[precision] = rows
    return out


def bench_formats(cfg: BenchConfig) -> dict:
    """The sections of SECTIONS that `cfg.what` names, with `FormatsConfig.from_bench(cfg)`'s settings."""
    formats = FormatsConfig.from_bench(cfg)
    out = {}
    if "dc-vs-sd" in cfg.what:
        out["dc-vs-sd"] = bench_dc_vs_sd(formats)
    if "dc-step" in cfg.what:
        out["dc-step"] = bench_dc_step(formats)
    if "formats-step" in cfg.what:
        out["formats-step"] = bench_formats_step(formats)
    return out
