"""Train a KL autoencoder with L1 + LPIPS + PatchGAN + KL under Hugging Face Accelerate.

One straight-line `main(cfg)`: the same code runs under plain `python` on one CPU and under
`accelerate launch` on many GPUs. Each iteration runs ONE autoencoder forward that feeds both the
generator update and the discriminator update; the discriminator is frozen during the generator
update, sees the detached reconstruction in its own, and is not run at all before `disc_start`.
Both models go through `accelerator.prepare` and the step calls the prepared modules, so DDP
all-reduces every gradient (the reference scripts bypass it). Runs resume exactly, keep an EMA of
the autoencoder for validation and export, skip non-finite steps, and stop cleanly on SIGTERM or
before `train.max_time` runs out.

    python -m training.train [--config NAME|FILE] [--data SPEC] [--out DIR] [--max-steps N] [k=v ...]
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from kl_ae.common.config import ConfigError
from kl_ae.common.data import build_datasets, read_skipped
from kl_ae.common.lpips import autocast_dtype, build_lpips
from kl_ae.common.release import export_after_training
from kl_ae.common.runs import find_latest_checkpoint
from kl_ae.common.stream import build_stream, is_stream
from kl_autoencoder import Autoencoder
from kl_autoencoder.ldm import load_ldm_checkpoint
from training import checkpoint, shaping
from training.align import build_align
from training.batches import EpochBatches, StreamBatches
from training.checkpoint import NonFiniteError, StopSignal
from training.config import TrainConfig, save_config
from training.discriminator import PatchDiscriminator
from training.progress import LogWriter, RunningMeans, TimeBudget
from training.step import (
    Generator,
    GuardedEMA,
    NonFiniteGuard,
    adamw,
    discriminator_objective,
    generator_objective,
    guarded_step,
    replicas_identical,
)
from training.trackers import check_tracker
from training.validation import Validator, weights_for_use


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


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """The learning rate of optimizer step `step` relative to optim.lr: a linear warm-up over `warmup` steps, then
    constant or a cosine decay from 1 to `min_ratio` at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_autoencoder(cfg: TrainConfig) -> Autoencoder:
    """A new autoencoder of `model.preset`, or one loaded from `model.init_from`; a bad file is a ConfigError."""
    path = cfg.model.init_from
    try:
        if path and Path(path).is_file():  # an LDM / SD VAE checkpoint: the architecture is the preset's
            return load_ldm_checkpoint(path, cfg.model.autoencoder_config(), cfg.model.trust_pickle)
        if path:  # a diffusers folder, run or checkpoint: its own architecture
            return Autoencoder.from_pretrained(path, vq=cfg.vq).train()
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"model.init_from: {e}") from None
    return Autoencoder(cfg.model.autoencoder_config(), vq=cfg.vq)


def check_nonfinite(guards: dict[str, NonFiniteGuard], history: dict, step: int, limit: int, out: Path, log) -> None:
    """Count the skipped steps of each model (one host read); stop after `limit` in a row of either."""
    for name, guard in guards.items():
        new, longest = guard.check()
        key, what = ("nonfinite_steps", "") if name == "autoencoder" else (f"nonfinite_{name}_steps", f" {name}")
        if new:
            history[key] = history.get(key, 0) + new
            log(f"WARNING: {new}{what} step(s) with non-finite loss or gradients skipped by step {step}")
        if longest >= limit:
            last = find_latest_checkpoint(out)
            raise NonFiniteError(
                f"{longest} non-finite{what} steps in a row by step {step}; stopping. Last good checkpoint: "
                f"{last or 'none'} (skipped steps leave the weights untouched). Lower optim.lr or check the data"
            )


def agree_on_stop(accelerator: Accelerator, requested: bool) -> bool:
    """True on every process when any process was asked to stop, so that all save together."""
    if accelerator.num_processes == 1:
        return requested
    flag = torch.tensor(float(requested), device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() > 0


def main(cfg: TrainConfig) -> dict:
    """Train as `cfg` says; returns the run summary (also written to `<out>/summary.json`)."""
    budget = TimeBudget(cfg.train.max_time_seconds())  # the wall clock starts now
    out = Path(cfg.out_dir)
    precision = resolve_mixed_precision(cfg.train.mixed_precision)
    check_tracker(cfg.train.tracker)
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=None if cfg.train.tracker == "none" else cfg.train.tracker,
        project_dir=str(out),
        step_scheduler_with_optimizer=False,
        # batches go to a GPU from pinned memory without waiting (pin_memory below), so a step never syncs
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=cfg.train.seed, non_blocking=True
        ),
    )
    is_main = accelerator.is_main_process
    log = accelerator.print
    log(f"kl-ae: {accelerator.num_processes} process(es), device {accelerator.device}, mixed precision {precision}")

    # --- models: built with the same seed on every process, so all start identical
    set_seed(cfg.train.seed)
    autoencoder = build_autoencoder(cfg)
    if cfg.model.init_from:
        log(f"initialised from {cfg.model.init_from}")
    if cfg.model.gradient_checkpointing:
        autoencoder.enable_gradient_checkpointing()
    if cfg.train.trainable == "decoder":  # SD's ft-EMA / ft-MSE recipe: the latent space stays as it is
        autoencoder.freeze_encoder()
    align, align_status = None, "not used (loss.align_weight=0)"
    if cfg.loss.align_weight > 0:  # VA-VAE's VF loss: a frozen vision foundation model
        try:
            align, align_status = build_align(cfg.loss.align, cfg.loss.align_model)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from None
        if align is None:
            log(f"WARNING: training WITHOUT the VF loss ({align_status})")
        else:
            align = align.to(accelerator.device)
    generator = Generator(autoencoder, cfg.loss.learn_logvar, cfg.loss.logvar_init, align.dim if align else 0)
    discriminator = PatchDiscriminator(
        base_channels=cfg.loss.disc_channels, n_layers=cfg.loss.disc_layers, norm=cfg.loss.disc_norm
    )
    lpips_mode = cfg.loss.lpips if cfg.loss.perceptual_weight > 0 else "off"
    # the step's autocast covers only the prepared modules' forwards: LPIPS opens its own when asked to
    lpips_dtype = autocast_dtype(precision) if cfg.loss.lpips_autocast else None
    with accelerator.local_main_process_first():  # one download per machine; the others find it in the cache
        lpips_args = (lpips_mode, cfg.loss.lpips_net, cfg.loss.lpips_weights, lpips_dtype)
        lpips, lpips_status = build_lpips(*lpips_args, download=accelerator.is_local_main_process)
    if lpips is None:
        log(f"WARNING: training WITHOUT the LPIPS perceptual loss ({lpips_status})")
    else:
        lpips = lpips.to(accelerator.device)
        if lpips_dtype is not None:
            lpips_status += f" (under {precision} autocast: loss.lpips_autocast)"
    ema = ema_model = None
    if cfg.train.ema:
        ema = GuardedEMA(autoencoder.parameters(), decay=cfg.train.ema_decay, use_ema_warmup=True)
        ema_model = copy.deepcopy(autoencoder).eval().requires_grad_(False)  # what validation and export use
        accelerator.register_for_checkpointing(ema)
    set_seed(cfg.train.seed, device_specific=True)  # different posterior noise per process

    # --- data: a map-style table (folder, sample, hub) or a stream (shards, data.streaming), see training/batches.py
    stream = is_stream(cfg.data)
    try:
        if stream:
            rank, world = accelerator.process_index, accelerator.num_processes
            train_ds, val_ds, plan = build_stream(cfg.data, cfg.train.seed, rank, world)
            log(plan)
        else:
            train_ds, val_ds = build_datasets(cfg.data, cfg.train.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not stream:
        train_dl = DataLoader(
            train_ds,
            batch_size=cfg.data.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=cfg.data.num_workers,
            generator=torch.Generator().manual_seed(cfg.train.seed),  # iterator seeding stays off the global RNG
            pin_memory=accelerator.device.type == "cuda",
        )
        per_epoch = len(train_ds) // (cfg.data.batch_size * accelerator.num_processes)
        if per_epoch == 0:
            raise ConfigError(
                f"data.batch_size: {cfg.data.batch_size} per process is more than the {len(train_ds)} images"
            )
    val_dl = DataLoader(val_ds, batch_size=cfg.data.batch_size, generator=torch.Generator().manual_seed(0))
    sample_batch = torch.stack([val_ds[i] for i in range(min(8, len(val_ds)))])  # for the reconstruction grids
    if is_main:  # only now, once every input has been checked, is anything written
        for folder in (out, out / "samples", out / "checkpoints"):
            folder.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    accelerator.wait_for_everyone()
    train_ds.skip_log = val_ds.skip_log = out / "skipped.txt"  # every process lists the files it had to skip

    if cfg.train.compile:  # after the EMA copy; compiled in place, so state dict names stay the same
        for module in (autoencoder.encoder, autoencoder.decoder):
            module.compile()
        log("torch.compile: encoder and decoder (compiling during the first steps)")

    # --- optimizers
    lr, disc_lr = cfg.optim.lr, cfg.optim.disc_lr or cfg.optim.lr
    if cfg.optim.scale_lr:
        scale = cfg.data.batch_size * accelerator.num_processes * cfg.train.grad_accum
        lr, disc_lr = lr * scale, disc_lr * scale
    adam = dict(betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    opt_g = adamw([p for p in generator.parameters() if p.requires_grad], lr=lr, **adam)
    opt_d = adamw(discriminator.parameters(), lr=disc_lr, **adam)
    o = cfg.optim
    schedule = partial(lr_factor, warmup=o.warmup_steps, total=cfg.train.max_steps, schedule=o.schedule,
                       min_ratio=o.min_lr_ratio)  # fmt: skip
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, schedule)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, schedule)
    loaders = (val_dl,) if stream else (train_dl, val_dl)  # a stream is split by node already: not prepared
    generator, discriminator, opt_g, opt_d, sched_g, sched_d, *loaders = accelerator.prepare(
        generator, discriminator, opt_g, opt_d, sched_g, sched_d, *loaders
    )
    if stream:
        (val_dl,) = loaders
        batches = StreamBatches(train_ds, cfg.data, accelerator.device, accelerator.num_processes, cfg.train.seed)
    else:
        train_dl, val_dl = loaders
        batches = EpochBatches(accelerator, train_dl, train_ds, per_epoch)
    if ema is not None:  # the EMA lives where the weights now are
        ema.to(accelerator.device)
        ema_model.to(accelerator.device)
    gen_module = accelerator.unwrap_model(generator)  # to reach logvar and the last layer's weight
    live = gen_module.autoencoder
    trainable_g = [p for p in generator.parameters() if p.requires_grad]
    fp16 = precision == "fp16"
    use_weights = partial(weights_for_use, live, ema, ema_model)

    # --- resume: the same command continues from the latest complete checkpoint
    state = checkpoint.resume(accelerator, out, ema, live)
    step, batches_seen, history = 0, 0, {"first_eval": None, "last_eval": None, "wall_s": 0.0, "nonfinite_steps": 0}
    if state is not None:
        step, batches_seen, history = state["step"], state["batches_seen"], state["history"]
        batches.load_state_dict(state["data_state"])
    if is_main:  # rows a killed run logged after its checkpoint (or before any) are about to be logged again
        for name in ("metrics.jsonl", "val.jsonl"):
            checkpoint.trim_log(out / name, step if state is not None else -1)
    if is_main and cfg.train.tracker != "none":
        accelerator.init_trackers("kl-ae", config=_flat(cfg.to_dict()))
    validator = Validator(accelerator, val_dl, sample_batch, lpips, out, use_weights)
    if step == 0:
        validator.record(step, history)
        validator.save_samples(step)

    def save() -> None:
        trainer_state = {"step": step, "batches_seen": batches_seen, "history": history}
        checkpoint.save(
            accelerator, out, step, trainer_state, use_weights(), live, cfg.train.keep_checkpoints, batches.state_dict()
        )

    # --- the loop. Nothing in a step waits for the device: skipped steps and the logged means are counted
    # there, and read at logging and checkpoint steps
    images_per_step = cfg.data.batch_size * accelerator.num_processes * cfg.train.grad_accum
    means = RunningMeans()
    no_skip = torch.ones((), dtype=torch.bool, device=accelerator.device)
    guards = {"autoencoder": NonFiniteGuard(accelerator.device), "discriminator": NonFiniteGuard(accelerator.device)}
    nonfinite = partial(check_nonfinite, guards, history, limit=cfg.train.max_nonfinite, out=out, log=log)
    interrupted = time_up = False
    bar = tqdm(total=cfg.train.max_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True)
    writer = LogWriter(accelerator, out / "metrics.jsonl", bar)
    t_start = t_log = time.perf_counter()
    steps_at_log = step
    # the bar is a context too: an error message then starts on a line of its own
    with StopSignal() as stop, bar:
        while step < cfg.train.max_steps and not interrupted:
            for x in batches.epoch(batches_seen):
                batches_seen += 1
                with accelerator.accumulate(generator, discriminator):
                    shape = shaping.draw(cfg.loss, cfg.train.seed, step, live.config.latent_channels)
                    recon, posterior, extras = generator(x, shape)
                    loss, g_logs, factor = generator_objective(
                        x, recon, posterior, gen_module.logvar, lpips, discriminator, live.last_layer, cfg.loss, step,
                        no_sync=lambda: accelerator.no_sync(discriminator), extras=extras, align=align,
                        align_layer=live.encoder.conv_out.weight,
                    )  # fmt: skip
                    accelerator.backward(loss)
                    # each optimizer skips a non-finite batch on its own; the EMA follows the autoencoder's update
                    g_ok = d_ok = no_skip
                    if accelerator.sync_gradients:
                        g_ok, g_logs["train/grad_norm"] = guarded_step(
                            accelerator, opt_g, trainable_g, cfg.optim.grad_clip, fp16
                        )
                    d_logs = {}
                    if factor > 0:
                        d_loss, d_logs = discriminator_objective(x, recon, discriminator, cfg.loss, factor)
                        accelerator.backward(d_loss)
                        if accelerator.sync_gradients:
                            d_params = list(discriminator.parameters())
                            d_ok, _ = guarded_step(accelerator, opt_d, d_params, cfg.optim.grad_clip, fp16)
                if not accelerator.sync_gradients:
                    continue
                guards["autoencoder"].update(g_ok)  # a skipped step counts as a step; nothing in it is applied
                means.add(g_logs, g_ok)
                sched_g.step()
                if ema is not None:
                    ema.step(live.parameters(), keep=g_ok)
                if factor > 0:
                    guards["discriminator"].update(d_ok)
                    means.add(d_logs, d_ok)
                    sched_d.step()
                step += 1
                bar.update(1)

                last = step == cfg.train.max_steps
                if step % cfg.train.log_every == 0 or last:
                    nonfinite(step=step)
                    now = time.perf_counter()
                    record = means.pop() | {
                        "train/disc_factor": factor,
                        "lr": sched_g.get_last_lr()[0],
                        "img_per_s": (step - steps_at_log) * images_per_step / (now - t_log),
                        "nonfinite_steps": history["nonfinite_steps"],
                    }
                    t_log, steps_at_log = now, step
                    writer.write(step, record)
                    time_up = budget.seconds is not None and agree_on_stop(accelerator, budget.due())
                    stop.requested = agree_on_stop(accelerator, stop.requested) or time_up
                if accelerator.num_processes == 1 or step % cfg.train.log_every == 0:
                    interrupted = stop.requested
                if step % cfg.train.eval_every == 0 or last:
                    validator.record(step, history)
                if step % cfg.train.sample_every == 0 or last:
                    validator.save_samples(step)
                if step % cfg.train.checkpoint_every == 0 or last or interrupted:
                    history["wall_s"] += time.perf_counter() - t_start
                    t_start = time.perf_counter()
                    nonfinite(step=step)  # stop before saving when the limit is reached; the last checkpoint stays
                    budget.timed(save)
                if step >= cfg.train.max_steps or interrupted:
                    break

    in_sync = replicas_identical(accelerator, gen_module, accelerator.unwrap_model(discriminator))
    if not in_sync:
        log("WARNING: the processes hold different weights at the end of the run")
    summary = {
        "steps": step,
        "interrupted": interrupted,
        "stopped_by": ("max_time" if time_up else "signal") if interrupted else None,
        "wall_s": round(history["wall_s"], 2),
        "img_per_s": round(step * images_per_step / max(history["wall_s"], 1e-9), 2),
        "num_processes": accelerator.num_processes,
        "mixed_precision": precision,
        "ema": cfg.train.ema,
        "nonfinite_steps": history["nonfinite_steps"],
        "nonfinite_discriminator_steps": history.get("nonfinite_discriminator_steps", 0),
        "skipped_images": len(read_skipped(out / "skipped.txt")),
        "replicas_identical": in_sync,
        "lpips": lpips_status if lpips is not None else f"OFF: {lpips_status}",
        "align": f"OFF: {align_status}" if align is None and cfg.loss.align_weight > 0 else align_status,
        "first_eval": history["first_eval"],
        "last_eval": history["last_eval"],
    }
    writer.close()
    if is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        if interrupted:
            why = f" (train.max_time {cfg.train.max_time})" if time_up else ""
            log(f"stopped at step {step}{why}; checkpoint saved. Re-run the same command to resume.")
        else:
            # the checkpoint of the last step holds these weights: exported from there, written once
            export_after_training(out)  # measured scaling/shift factors, force_upcast, model card
            first, last = history["first_eval"], history["last_eval"]
            log(
                f"validation PSNR: {first['val/psnr']:.2f} dB at step {first['step']} -> "
                f"{last['val/psnr']:.2f} dB at step {last['step']}" + (" (EMA weights)" if ema else "")
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


if __name__ == "__main__":
    from training.cli import cli

    sys.exit(cli())
