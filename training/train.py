"""Train a KL autoencoder with L1 + LPIPS + PatchGAN + KL under Hugging Face Accelerate.

One straight-line `main(cfg)`: the same code runs under plain `python` on one CPU and under
`accelerate launch` on many GPUs. Each iteration runs ONE autoencoder forward that feeds both the
generator update and the discriminator update; the discriminator is frozen during the generator
update, sees the detached reconstruction in its own, and is not run at all before `disc_start`.
Both models go through `accelerator.prepare` and the step calls the prepared modules, so DDP
all-reduces every gradient (the reference scripts bypass it).

    python -m training.train [--config NAME|FILE] [--data SPEC] [--out DIR] [--max-steps N] [k=v ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader
from torchvision.utils import save_image
from tqdm.auto import tqdm

from eval.metrics import reconstruction_metrics
from kl_autoencoder import Autoencoder
from kl_autoencoder.export import save_diffusers
from training.config import ConfigError, LossConfig, TrainConfig, load_config, save_config
from training.data import build_datasets
from training.discriminator import PatchDiscriminator
from training.losses import (
    adaptive_weight,
    disc_factor,
    discriminator_loss,
    generator_adv_loss,
    kl_anneal,
    kl_loss,
    nll_loss,
    reconstruction_error,
)
from training.lpips import build_lpips


class Generator(nn.Module):
    """The autoencoder plus the decoder's output log-variance, trained together under one DDP wrapper.

    Keeping `logvar` inside the wrapped module means it sits in the optimizer and its gradient is
    all-reduced with the autoencoder's (LDM declares it and never optimizes it).
    """

    def __init__(self, autoencoder: Autoencoder, learn_logvar: bool, logvar_init: float):
        super().__init__()
        self.autoencoder = autoencoder
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)), requires_grad=learn_logvar)

    def forward(self, x: torch.Tensor):
        return self.autoencoder(x, sample_posterior=True, return_posterior=True)


def generator_objective(
    x: torch.Tensor,
    recon: torch.Tensor,
    posterior,
    logvar: torch.Tensor,
    lpips: nn.Module | None,
    discriminator: nn.Module,
    last_layer: torch.Tensor,
    cfg: LossConfig,
    step: int,
    no_sync=contextlib.nullcontext,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    """The autoencoder's loss: NLL(rec + perceptual) + beta * KL (+ adaptive-weighted adversarial term).

    The discriminator runs only once `disc_start` is reached, frozen, and outside DDP's gradient
    bookkeeping (`no_sync`), so its parameters get no gradient while the reconstruction does.
    Returns (loss, logs, disc_factor).
    """
    error = reconstruction_error(x, recon, cfg.rec_loss)
    logs = {f"train/{cfg.rec_loss}": error.detach().mean()}
    if lpips is not None:
        p_loss = lpips(x, recon)  # (B,)
        error = error + cfg.perceptual_weight * p_loss.view(-1, 1, 1, 1)
        logs["train/lpips"] = p_loss.detach().mean()
    nll, nll_logs = nll_loss(error, logvar, cfg.rec_loss, cfg.reduction)
    kl, kl_logs = kl_loss(posterior.mean, posterior.logvar, cfg.reduction, cfg.free_bits, x[0].numel())
    loss = nll + cfg.kl_weight * kl_anneal(step, cfg.kl_anneal_steps) * kl
    logs |= nll_logs | kl_logs
    factor = disc_factor(step, cfg.disc_start, cfg.disc_ramp)
    if factor > 0:
        discriminator.requires_grad_(False)
        with no_sync():
            g_adv = generator_adv_loss(discriminator(recon), cfg.gan_loss)
        discriminator.requires_grad_(True)
        d_weight = adaptive_weight(nll, g_adv, last_layer) * cfg.disc_weight
        loss = loss + d_weight * factor * g_adv
        logs |= {"train/g_adv": g_adv.detach(), "train/d_weight": d_weight}
    logs["train/disc_factor"] = torch.tensor(factor)
    return loss, logs, factor


def discriminator_objective(
    x: torch.Tensor, recon: torch.Tensor, discriminator: nn.Module, cfg: LossConfig, factor: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The discriminator's loss on real images and the DETACHED reconstruction of the same forward."""
    loss, logs = discriminator_loss(discriminator(x), discriminator(recon.detach()), cfg.gan_loss)
    return factor * loss, logs


def resolve_mixed_precision(mode: str) -> str:
    """`auto` -> bf16 where the hardware runs it natively, else no; fp16 needs CUDA."""
    cpu_only = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    cuda = torch.cuda.is_available() and not cpu_only
    if mode == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "no"
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return "bf16" if native else "no"
    if mode == "fp16" and not cuda:
        raise ConfigError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on CPU")
    return mode


def warmup_schedule(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


@torch.no_grad()
def replicas_identical(accelerator: Accelerator, *modules: nn.Module) -> bool:
    """True when every process holds the same weights: per-tensor fingerprints gathered and compared.

    Cheap enough to run at the end of every run; it catches the failure of the reference scripts,
    whose forwards bypassed DDP so each process trained its own model.
    """
    if accelerator.num_processes == 1:
        return True
    gen = torch.Generator().manual_seed(0)
    prints = []
    for module in modules:
        for p in module.parameters():
            flat = p.detach().double().flatten().cpu()
            prints.append(
                torch.stack(
                    [flat.sum(), flat.abs().sum(), flat @ torch.rand(flat.numel(), generator=gen, dtype=torch.float64)]
                )
            )
    mine = torch.stack(prints).to(accelerator.device)
    everyone = accelerator.gather(mine[None])  # (P, n, 3)
    return bool((everyone == everyone[0:1]).all())


def find_latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint named by `checkpoints/latest`, which only ever names a complete checkpoint."""
    pointer = out_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = out_dir / "checkpoints" / pointer.read_text().strip()
    return path if path.is_dir() else None


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(cfg: TrainConfig) -> dict:
    """Train as `cfg` says; returns the run summary (also written to `<out>/summary.json`)."""
    out = Path(cfg.out_dir)
    precision = resolve_mixed_precision(cfg.train.mixed_precision)
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=None if cfg.train.tracker == "none" else cfg.train.tracker,
        project_dir=str(out),
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
    )
    is_main = accelerator.is_main_process
    log = accelerator.print
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "samples").mkdir(exist_ok=True)
        (out / "checkpoints").mkdir(exist_ok=True)
        save_config(cfg, out / "config.yaml")
    log(f"kl-ae: {accelerator.num_processes} process(es), device {accelerator.device}, mixed precision {precision}")

    # --- models: built with the same seed on every process, so all start identical
    set_seed(cfg.train.seed)
    if cfg.model.init_from:
        autoencoder = Autoencoder.from_pretrained(cfg.model.init_from)
        log(f"initialised from {cfg.model.init_from} (its architecture replaces model.preset)")
    else:
        autoencoder = Autoencoder(cfg.model.autoencoder_config())
    if cfg.model.gradient_checkpointing:
        autoencoder.enable_gradient_checkpointing()
    generator = Generator(autoencoder, cfg.loss.learn_logvar, cfg.loss.logvar_init)
    discriminator = PatchDiscriminator(
        base_channels=cfg.loss.disc_channels, n_layers=cfg.loss.disc_layers, norm=cfg.loss.disc_norm
    )
    lpips, lpips_status = build_lpips(
        cfg.loss.lpips if cfg.loss.perceptual_weight > 0 else "off", cfg.loss.lpips_net, cfg.loss.lpips_weights
    )
    if lpips is None:
        log(f"WARNING: training WITHOUT the LPIPS perceptual loss ({lpips_status})")
    else:
        lpips = lpips.to(accelerator.device)
    set_seed(cfg.train.seed, device_specific=True)  # different crops and posterior noise per process

    # --- data
    train_ds, val_ds = build_datasets(cfg.data, cfg.train.seed)
    loader_rng = torch.Generator().manual_seed(cfg.train.seed)  # keeps iterator seeding off the global RNG
    train_dl = DataLoader(
        train_ds,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
        generator=loader_rng,
    )
    val_dl = DataLoader(val_ds, batch_size=cfg.data.batch_size, shuffle=False, generator=loader_rng)
    # a fixed batch of held-out images for the reconstruction grids (main process only, unsharded)
    sample_batch = torch.stack([val_ds[i] for i in range(min(8, len(val_ds)))])
    if len(train_dl) == 0:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is larger than the {len(train_ds)} training images")

    # --- optimizers
    lr, disc_lr = cfg.optim.lr, cfg.optim.disc_lr or cfg.optim.lr
    if cfg.optim.scale_lr:
        scale = cfg.data.batch_size * accelerator.num_processes * cfg.train.grad_accum
        lr, disc_lr = lr * scale, disc_lr * scale
    adam = dict(betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    opt_g = torch.optim.AdamW([p for p in generator.parameters() if p.requires_grad], lr=lr, **adam)
    opt_d = torch.optim.AdamW(discriminator.parameters(), lr=disc_lr, **adam)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, warmup_schedule(cfg.optim.warmup_steps))
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, warmup_schedule(cfg.optim.warmup_steps))
    generator, discriminator, opt_g, opt_d, sched_g, sched_d, train_dl, val_dl = accelerator.prepare(
        generator, discriminator, opt_g, opt_d, sched_g, sched_d, train_dl, val_dl
    )
    gen_module = accelerator.unwrap_model(generator)  # to reach logvar and the last layer's weight
    last_layer = gen_module.autoencoder.last_layer

    # --- resume: the same command continues from the latest complete checkpoint
    step, batches_seen, history = 0, 0, {"first_eval": None, "last_eval": None, "wall_s": 0.0}
    latest = find_latest_checkpoint(out)
    if latest is not None:
        accelerator.load_state(str(latest))
        state = json.loads((latest / "trainer_state.json").read_text())
        step, batches_seen, history = state["step"], state["batches_seen"], state["history"]
        log(f"resumed from {latest} at step {step}")
    if is_main and cfg.train.tracker != "none":
        accelerator.init_trackers("kl-ae", config=_flat(cfg.to_dict()))

    def evaluate() -> dict[str, float]:
        """Validation PSNR/SSIM(/LPIPS) of the posterior mode, gathered from every process, in fp32."""
        model = gen_module.autoencoder
        model.eval()
        values: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for x in val_dl:
                for k, v in reconstruction_metrics(x, model(x), lpips).items():
                    values.setdefault(k, []).append(accelerator.gather_for_metrics(v))
        model.train()
        return {f"val/{k}": torch.cat(v).mean().item() for k, v in values.items()}

    def save_samples(tag: str) -> None:
        if not is_main:
            return
        model = gen_module.autoencoder
        model.eval()
        x = sample_batch.to(accelerator.device)
        with torch.no_grad():
            recon = model(x)
        model.train()
        grid = torch.cat([x, recon.float().clamp(-1, 1)]) * 0.5 + 0.5
        save_image(grid, out / "samples" / f"{tag}.png", nrow=len(x))

    def save_checkpoint() -> None:
        """Write into a temporary folder, rename it, then move the `latest` pointer; keep the last K."""
        root = out / "checkpoints"
        name = f"step_{step:07d}"
        tmp, final = root / f".tmp_{name}", root / name
        if is_main and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if is_main:
            save_diffusers(gen_module.autoencoder, tmp / "autoencoder")
            state = {"step": step, "batches_seen": batches_seen, "history": history}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_atomic(root / "latest", name)
            done = sorted(p for p in root.glob("step_*") if p.is_dir())
            for old in done[: -cfg.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def record_eval(metrics: dict[str, float]) -> None:
        entry = {"step": step, **metrics}
        history["first_eval"] = history["first_eval"] or entry
        history["last_eval"] = entry
        accelerator.log(metrics, step=step)
        log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    if step == 0:
        record_eval(evaluate())
        save_samples(f"step_{step:07d}")

    # --- the loop
    loss_cfg = cfg.loss
    metrics_file = open(out / "metrics.jsonl", "a") if is_main else None
    images_per_step = cfg.data.batch_size * accelerator.num_processes * cfg.train.grad_accum
    running: dict[str, torch.Tensor] = {}
    n_running = 0
    bar = tqdm(total=cfg.train.max_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True)
    t_start = t_log = time.perf_counter()
    steps_at_log = step
    epoch = batches_seen // len(train_dl)
    while step < cfg.train.max_steps:
        train_dl.set_epoch(epoch)
        skip = batches_seen - epoch * len(train_dl)
        loader = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        for x in loader:
            batches_seen += 1
            with accelerator.accumulate(generator, discriminator):
                recon, posterior = generator(x)
                loss, logs, factor = generator_objective(
                    x,
                    recon,
                    posterior,
                    gen_module.logvar,
                    lpips,
                    discriminator,
                    last_layer,
                    loss_cfg,
                    step,
                    no_sync=lambda: accelerator.no_sync(discriminator),
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                    logs["train/grad_norm"] = accelerator.clip_grad_norm_(generator.parameters(), cfg.optim.grad_clip)
                opt_g.step()
                opt_g.zero_grad(set_to_none=True)
                if factor > 0:
                    # discriminator update on the same forward's reconstruction, detached
                    d_loss, d_logs = discriminator_objective(x, recon, discriminator, loss_cfg, factor)
                    accelerator.backward(d_loss)
                    if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                        accelerator.clip_grad_norm_(discriminator.parameters(), cfg.optim.grad_clip)
                    opt_d.step()
                    opt_d.zero_grad(set_to_none=True)
                    logs |= d_logs
                logs["train/loss"] = loss.detach()
            if not accelerator.sync_gradients:
                continue
            sched_g.step()
            if factor > 0:
                sched_d.step()
            step += 1
            bar.update(1)
            for k, v in logs.items():
                running[k] = running.get(k, 0.0) + v.detach().float()
            n_running += 1

            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                now = time.perf_counter()
                record = {k: (v / n_running).item() for k, v in running.items()}
                record["lr"] = sched_g.get_last_lr()[0]
                record["img_per_s"] = (step - steps_at_log) * images_per_step / (now - t_log)
                running, n_running, t_log, steps_at_log = {}, 0, now, step
                accelerator.log(record, step=step)
                if metrics_file is not None:
                    metrics_file.write(json.dumps({"step": step, **record}) + "\n")
                    metrics_file.flush()
                bar.set_postfix(
                    loss=f"{record['train/loss']:.4g}",
                    l1=f"{record.get('train/l1', record.get('train/l2', 0)):.4f}",
                    img_s=f"{record['img_per_s']:.1f}",
                )
            if step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
                record_eval(evaluate())
            if step % cfg.train.sample_every == 0 or step == cfg.train.max_steps:
                save_samples(f"step_{step:07d}")
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps:
                history["wall_s"] += time.perf_counter() - t_start
                t_start = time.perf_counter()
                save_checkpoint()
            if step >= cfg.train.max_steps:
                break
        else:
            epoch += 1
    bar.close()

    in_sync = replicas_identical(
        accelerator, accelerator.unwrap_model(generator), accelerator.unwrap_model(discriminator)
    )
    if not in_sync:
        log("WARNING: the processes hold different weights at the end of the run")
    summary = {
        "steps": step,
        "wall_s": round(history["wall_s"], 2),
        "img_per_s": round(step * images_per_step / max(history["wall_s"], 1e-9), 2),
        "num_processes": accelerator.num_processes,
        "mixed_precision": precision,
        "replicas_identical": in_sync,
        "lpips": lpips_status if lpips is not None else f"OFF: {lpips_status}",
        "first_eval": history["first_eval"],
        "last_eval": history["last_eval"],
    }
    if is_main:
        metrics_file.close()
        save_diffusers(gen_module.autoencoder, out / "diffusers")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        first, last = history["first_eval"], history["last_eval"]
        log(
            f"validation PSNR: {first['val/psnr']:.2f} dB at step {first['step']} -> "
            f"{last['val/psnr']:.2f} dB at step {last['step']}"
        )
        log(f"diffusers folder: {out / 'diffusers'}")
    accelerator.end_training()
    return summary


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested config -> flat {"a.b": value} with tracker-friendly values."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a recipe name (tiny, kl-f8, ...) or a YAML file")
    parser.add_argument("--data", help="a folder of images, a hub dataset name, or 'sample'")
    parser.add_argument("--out", help="the run folder (default runs/default)")
    parser.add_argument("--max-steps", type=int, help="shorthand for train.max_steps=N")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.source={args.data}")
    if args.out is not None:
        overrides.append(f"out_dir={args.out}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    # keep strings as strings: `--data 123` is a folder name, not a number
    return load_config(args.config, [_quote(o) for o in overrides])


def _quote(override: str) -> str:
    key, _, value = override.partition("=")
    if key in ("data.source", "out_dir", "model.init_from", "loss.lpips_weights") and value:
        return f"{key}={json.dumps(value)}"
    return override


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kl-ae train", description="Train a KL autoencoder.")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        main(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
