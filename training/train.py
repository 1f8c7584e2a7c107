"""Train a KL autoencoder with L1 + LPIPS + PatchGAN + KL under Hugging Face Accelerate.

One straight-line `main(cfg)`: the same code runs under plain `python` on one CPU and under
`accelerate launch` on many GPUs. Each iteration runs ONE autoencoder forward that feeds both the
generator update and the discriminator update; the discriminator is frozen during the generator
update, sees the detached reconstruction in its own, and is not run at all before `disc_start`.
Both models go through `accelerator.prepare` and the step calls the prepared modules, so DDP
all-reduces every gradient (the reference scripts bypass it). Runs resume exactly, keep an EMA of
the autoencoder for validation and export, skip non-finite steps, and stop cleanly on SIGTERM.

    python -m training.train [--config NAME|FILE] [--data SPEC] [--out DIR] [--max-steps N] [k=v ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from torchvision.utils import save_image
from tqdm.auto import tqdm

from eval.export import export_after_training
from eval.metrics import reconstruction_metrics
from kl_autoencoder import Autoencoder
from kl_autoencoder.export import save_diffusers
from kl_autoencoder.ldm import load_ldm_checkpoint
from training import checkpoint
from training.checkpoint import CheckpointWriteError, NonFiniteError, StopSignal, find_latest_checkpoint
from training.config import ConfigError, TrainConfig, load_config, save_config
from training.data import build_datasets, read_skipped
from training.discriminator import PatchDiscriminator
from training.lpips import autocast_dtype, build_lpips
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

QUANTIZER_FILE = "quantizer.pt"


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


def check_tracker(name: str) -> None:
    if name == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("train.tracker: wandb is not installed (pip install wandb), or use tensorboard")


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


def main(cfg: TrainConfig) -> dict:
    """Train as `cfg` says; returns the run summary (also written to `<out>/summary.json`)."""
    out = Path(cfg.out_dir)
    precision = resolve_mixed_precision(cfg.train.mixed_precision)
    check_tracker(cfg.train.tracker)
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
    log(f"kl-ae: {accelerator.num_processes} process(es), device {accelerator.device}, mixed precision {precision}")

    # --- models: built with the same seed on every process, so all start identical
    set_seed(cfg.train.seed)
    autoencoder = build_autoencoder(cfg)
    if cfg.model.init_from:
        log(f"initialised from {cfg.model.init_from}")
    if cfg.model.gradient_checkpointing:
        autoencoder.enable_gradient_checkpointing()
    if cfg.train.trainable == "decoder":  # SD's ft-EMA / ft-MSE recipe: the latent space stays as it is
        for module in (autoencoder.encoder, autoencoder.quant_conv):
            if module is not None:
                module.requires_grad_(False)
    generator = Generator(autoencoder, cfg.loss.learn_logvar, cfg.loss.logvar_init)
    discriminator = PatchDiscriminator(
        base_channels=cfg.loss.disc_channels, n_layers=cfg.loss.disc_layers, norm=cfg.loss.disc_norm
    )
    lpips_mode = cfg.loss.lpips if cfg.loss.perceptual_weight > 0 else "off"
    # the step's autocast covers only the prepared modules' forwards: LPIPS opens its own when asked to
    lpips_dtype = autocast_dtype(precision) if cfg.loss.lpips_autocast else None
    lpips, lpips_status = build_lpips(lpips_mode, cfg.loss.lpips_net, cfg.loss.lpips_weights, lpips_dtype)
    if lpips is None:
        log(f"WARNING: training WITHOUT the LPIPS perceptual loss ({lpips_status})")
    else:
        lpips = lpips.to(accelerator.device)
        if lpips_dtype is not None:
            lpips_status += f" (under {precision} autocast: loss.lpips_autocast)"
    ema = None
    if cfg.train.ema:
        ema = GuardedEMA(autoencoder.parameters(), decay=cfg.train.ema_decay, use_ema_warmup=True)
        ema_model = copy.deepcopy(autoencoder).eval().requires_grad_(False)  # what validation and export use
        accelerator.register_for_checkpointing(ema)
    set_seed(cfg.train.seed, device_specific=True)  # different posterior noise per process

    # --- data
    try:
        train_ds, val_ds = build_datasets(cfg.data, cfg.train.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    train_dl = DataLoader(
        train_ds,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        generator=torch.Generator().manual_seed(cfg.train.seed),  # iterator seeding stays off the global RNG
    )
    val_dl = DataLoader(val_ds, batch_size=cfg.data.batch_size, generator=torch.Generator().manual_seed(0))
    per_epoch = len(train_ds) // (cfg.data.batch_size * accelerator.num_processes)
    if per_epoch == 0:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} per process is more than the {len(train_ds)} images")
    # a fixed batch of held-out images for the reconstruction grids (main process only, unsharded)
    sample_batch = torch.stack([val_ds[i] for i in range(min(8, len(val_ds)))])
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
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, warmup_schedule(cfg.optim.warmup_steps))
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, warmup_schedule(cfg.optim.warmup_steps))
    generator, discriminator, opt_g, opt_d, sched_g, sched_d, train_dl, val_dl = accelerator.prepare(
        generator, discriminator, opt_g, opt_d, sched_g, sched_d, train_dl, val_dl
    )
    if ema is not None:  # the EMA lives where the weights now are
        ema.to(accelerator.device)
        ema_model.to(accelerator.device)
    gen_module = accelerator.unwrap_model(generator)  # to reach logvar and the last layer's weight
    last_layer = gen_module.autoencoder.last_layer
    trainable_g = [p for p in generator.parameters() if p.requires_grad]
    fp16 = precision == "fp16"

    # --- resume: the same command continues from the latest complete checkpoint
    step, batches_seen = 0, 0
    history = {"first_eval": None, "last_eval": None, "wall_s": 0.0, "nonfinite_steps": 0}
    latest = find_latest_checkpoint(out)
    if latest is not None:
        try:
            accelerator.load_state(str(latest))
        except Exception as e:  # truncated or corrupt files, or a checkpoint of another architecture
            details = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # names the tensors
            raise ConfigError(
                f"resume: {latest} cannot be loaded ({type(e).__name__}: {details[:600]}); "
                "use another --out, or delete this checkpoint to resume from an older one"
            ) from None
        if ema is not None:  # accelerate restores custom objects on the CPU
            ema.to(accelerator.device)
        state = json.loads((latest / checkpoint.STATE_FILE).read_text())
        step, batches_seen, history = state["step"], state["batches_seen"], state["history"]
        if (latest / QUANTIZER_FILE).is_file():  # after load_state: loading weights resets these statistics
            stats = torch.load(latest / QUANTIZER_FILE, map_location=accelerator.device, weights_only=True)
            gen_module.autoencoder.load_quantizer_state(stats)
        log(f"resumed from {latest} at step {step}")
    if is_main:  # rows a killed run logged after its checkpoint (or before any) are about to be logged again
        for name in ("metrics.jsonl", "val.jsonl"):
            checkpoint.trim_log(out / name, step if latest is not None else -1)
    if is_main and cfg.train.tracker != "none":
        accelerator.init_trackers("kl-ae", config=_flat(cfg.to_dict()))

    def weights_for_use() -> Autoencoder:
        """The EMA weights when EMA is on (validation and export use them), else the live ones."""
        if ema is None:
            return gen_module.autoencoder
        ema.copy_to(ema_model.parameters())
        return ema_model

    def evaluate() -> dict[str, float]:
        """Validation metrics of the posterior mode over every held-out image, gathered from all processes."""
        model = weights_for_use()
        was_training = model.training
        model.eval()
        values: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for x in val_dl:
                for k, v in reconstruction_metrics(x, model(x), lpips).items():
                    values.setdefault(k, []).append(accelerator.gather_for_metrics(v))
        model.train(was_training)
        metrics = {f"val/{k}": torch.cat(v).mean().item() for k, v in values.items()}
        metrics["val/images"] = len(torch.cat(values["psnr"]))
        return metrics

    def save_samples() -> None:
        if is_main:
            model = weights_for_use()
            was_training = model.training
            model.eval()
            x = sample_batch.to(accelerator.device)
            with torch.no_grad():
                recon = model(x).float().clamp(-1, 1)
            model.train(was_training)
            path = out / "samples" / f"{checkpoint.checkpoint_name(step)}.png"
            save_image(torch.cat([x, recon]) * 0.5 + 0.5, path, nrow=len(x))

    def save_checkpoint() -> None:
        root = out / "checkpoints"
        tmp = checkpoint.temporary_folder(root, step, clear=is_main)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp))
            if is_main:
                save_diffusers(weights_for_use(), tmp / "autoencoder")
                if gen_module.autoencoder.config.bottleneck == "vq":  # codebook statistics, outside the state dict
                    torch.save(gen_module.autoencoder.quantizer_state(), tmp / QUANTIZER_FILE)
                state = {"step": step, "batches_seen": batches_seen, "history": history}
                (tmp / checkpoint.STATE_FILE).write_text(json.dumps(state, indent=1))
                checkpoint.commit(root, tmp, step, cfg.train.keep_checkpoints)
        except OSError as e:  # a full disk or a permission error: keep what is already saved, and stop
            shutil.rmtree(tmp, ignore_errors=True)
            last = find_latest_checkpoint(out)
            raise CheckpointWriteError(
                f"could not write the checkpoint of step {step} ({e}); the previous checkpoint "
                f"({last.name if last else 'none'}) and checkpoints/latest are intact. Free space or fix "
                "permissions, then re-run the same command to resume"
            ) from None
        accelerator.wait_for_everyone()

    def record_eval() -> None:
        metrics = evaluate()
        entry = {"step": step, **metrics}
        history["first_eval"] = history["first_eval"] or entry
        history["last_eval"] = entry
        accelerator.log(metrics, step=step)
        log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if is_main:
            with open(out / "val.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

    if step == 0:
        record_eval()
        save_samples()

    # --- the loop
    loss_cfg = cfg.loss
    metrics_file = open(out / "metrics.jsonl", "a") if is_main else None
    images_per_step = cfg.data.batch_size * accelerator.num_processes * cfg.train.grad_accum
    # nothing in a step waits for the device: skipped steps and the logged means are counted there, and read
    # at logging and checkpoint steps
    running: dict[str, torch.Tensor] = {}
    n_good = torch.zeros((), device=accelerator.device)
    all_ok = torch.ones((), dtype=torch.bool, device=accelerator.device)
    guard = NonFiniteGuard(accelerator.device)
    interrupted = False

    def check_guard() -> None:
        new, longest = guard.check()
        if new:
            history["nonfinite_steps"] += new
            log(f"WARNING: {new} step(s) with non-finite loss or gradients skipped by step {step}")
        if longest >= cfg.train.max_nonfinite:
            last = find_latest_checkpoint(out)
            raise NonFiniteError(
                f"{longest} non-finite steps in a row by step {step}; stopping. Last good checkpoint: "
                f"{last or 'none'} (skipped steps leave the weights untouched). Lower optim.lr or check the data"
            )

    bar = tqdm(total=cfg.train.max_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True)
    # the bar is a context too: an error message then starts on a line of its own
    t_start = t_log = time.perf_counter()
    steps_at_log = step
    with StopSignal() as stop, bar:
        while step < cfg.train.max_steps and not interrupted:
            epoch = batches_seen // per_epoch
            train_dl.set_epoch(epoch)
            train_ds.set_epoch(epoch)
            skip = batches_seen - epoch * per_epoch
            for x in accelerator.skip_first_batches(train_dl, skip) if skip else train_dl:
                batches_seen += 1
                with accelerator.accumulate(generator, discriminator):
                    recon, posterior = generator(x)
                    loss, logs, factor = generator_objective(
                        x, recon, posterior, gen_module.logvar, lpips, discriminator, last_layer, loss_cfg, step,
                        no_sync=lambda: accelerator.no_sync(discriminator),
                    )  # fmt: skip
                    accelerator.backward(loss)
                    ok = all_ok
                    if accelerator.sync_gradients:
                        ok, logs["train/grad_norm"] = guarded_step(
                            accelerator, opt_g, trainable_g, cfg.optim.grad_clip, fp16
                        )
                    if factor > 0:  # a non-finite batch is skipped by each optimizer on its own
                        d_loss, d_logs = discriminator_objective(x, recon, discriminator, loss_cfg, factor)
                        accelerator.backward(d_loss)
                        if accelerator.sync_gradients:
                            d_ok, _ = guarded_step(
                                accelerator, opt_d, list(discriminator.parameters()), cfg.optim.grad_clip, fp16
                            )
                            ok = ok & d_ok
                        logs |= d_logs
                if not accelerator.sync_gradients:
                    continue
                guard.update(ok)  # a skipped step counts as a step; its weights and optimizer state are untouched
                sched_g.step()
                if factor > 0:
                    sched_d.step()
                if ema is not None:
                    ema.step(gen_module.autoencoder.parameters(), keep=ok)
                step += 1
                bar.update(1)
                for k, v in logs.items():
                    running[k] = running.get(k, 0.0) + torch.where(ok, v.detach().float(), 0.0)
                n_good += ok

                if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                    check_guard()
                    now = time.perf_counter()
                    values = torch.stack([n_good, *running.values()]).tolist()  # one sync per log line
                    good = values[0]
                    record = {k: v / good for k, v in zip(running, values[1:])} if good else {}
                    record["train/disc_factor"] = factor
                    record["lr"] = sched_g.get_last_lr()[0]
                    record["img_per_s"] = (step - steps_at_log) * images_per_step / (now - t_log)
                    record["nonfinite_steps"] = history["nonfinite_steps"]
                    running, t_log, steps_at_log = {}, now, step
                    n_good.zero_()
                    accelerator.log(record, step=step)
                    if metrics_file is not None:
                        metrics_file.write(json.dumps({"step": step, **record}) + "\n")
                        metrics_file.flush()
                    rec = record.get("train/l1", record.get("train/l2", 0.0))
                    bar.set_postfix(
                        loss=f"{record.get('train/loss', float('nan')):.4g}", rec=f"{rec:.4f}",
                        img_s=f"{record['img_per_s']:.1f}",
                    )  # fmt: skip
                    if accelerator.num_processes > 1:  # agree on a stop request, so all save together
                        flag = torch.tensor(float(stop.requested), device=accelerator.device)
                        stop.requested = accelerator.reduce(flag, "sum").item() > 0
                if accelerator.num_processes == 1 or step % cfg.train.log_every == 0:
                    interrupted = stop.requested
                if step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
                    record_eval()
                if step % cfg.train.sample_every == 0 or step == cfg.train.max_steps:
                    save_samples()
                if step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps or interrupted:
                    history["wall_s"] += time.perf_counter() - t_start
                    t_start = time.perf_counter()
                    check_guard()  # stop before saving when the limit is reached; the last checkpoint stays
                    save_checkpoint()
                if step >= cfg.train.max_steps or interrupted:
                    break

    in_sync = replicas_identical(
        accelerator, accelerator.unwrap_model(generator), accelerator.unwrap_model(discriminator)
    )
    if not in_sync:
        log("WARNING: the processes hold different weights at the end of the run")
    summary = {
        "steps": step,
        "interrupted": interrupted,
        "wall_s": round(history["wall_s"], 2),
        "img_per_s": round(step * images_per_step / max(history["wall_s"], 1e-9), 2),
        "num_processes": accelerator.num_processes,
        "mixed_precision": precision,
        "ema": cfg.train.ema,
        "nonfinite_steps": history["nonfinite_steps"],
        "skipped_images": len(read_skipped(out / "skipped.txt")),
        "replicas_identical": in_sync,
        "lpips": lpips_status if lpips is not None else f"OFF: {lpips_status}",
        "first_eval": history["first_eval"],
        "last_eval": history["last_eval"],
    }
    if is_main:
        metrics_file.close()
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        if interrupted:
            log(f"stopped at step {step}; checkpoint saved. Re-run the same command to resume.")
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


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a recipe name (tiny, kl-f8, ...) or a YAML file")
    parser.add_argument("--data", help="a folder of images, a hub dataset name, or 'sample'")
    parser.add_argument("--out", help="the run folder (default runs/default)")
    parser.add_argument("--max-steps", type=int, help="shorthand for train.max_steps=N")
    parser.add_argument(
        "--trust-pickle", action="store_true", help="let model.init_from unpickle a .ckpt file (only files you trust)"
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.source={args.data}")
    if args.out is not None:
        overrides.append(f"out_dir={args.out}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.trust_pickle:
        overrides.append("model.trust_pickle=true")
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
    except (NonFiniteError, CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
