"""Train an autoencoder with L1 + LPIPS + PatchGAN + KL under Hugging Face Accelerate: our KL / VQ model from a
preset, a new DC-AE or FLUX.2 model (`model.family`, `model.arch`), or any family of `kl_autoencoder.interface`
fine-tuned from `model.init_from` (FLUX.2, DC-AE, Qwen-Image, Wan, HunyuanImage, RAE, SD's AutoencoderKL), training
the parameter groups `train.trainable` names (a phase of DC-AE's recipe: the groups of that phase).

One straight-line `main(cfg)`: setup in small helpers above it, then the loop. The same code runs under plain
`python` on one CPU and under `accelerate launch` on many GPUs. Each batch goes through `TrainStep`
(training/step.py): ONE autoencoder forward feeds the generator update and the discriminator update; the loop
decides the step's schedule (the discriminator's factor, the KL warm-up) and passes it down. Both models go
through `accelerator.prepare` and the step calls the prepared modules, so DDP all-reduces every gradient (the
reference scripts bypass it). Runs resume exactly, keep an EMA of the autoencoder for validation and export,
skip non-finite steps, and stop cleanly on SIGTERM or before `train.max_time` runs out.

    python -m training.train [--config NAME|FILE] [--data SPEC] [--out DIR] [--max-steps N] [k=v ...]
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from kl_ae.common.channels import save_mapping, value_mapping
from kl_ae.common.config import ConfigError
from kl_ae.common.data import build_datasets
from kl_ae.common.lpips import ChannelLPIPS, autocast_dtype, build_lpips
from kl_ae.common.release import export_after_training
from kl_ae.common.stream import build_stream, is_stream
from kl_autoencoder import Autoencoder
from kl_autoencoder.channels import adapt_channels
from kl_autoencoder.families.ours import wrap
from kl_autoencoder.folders import find_diffusers_folder
from kl_autoencoder.interface import BUILDABLE, SUPPORTED, LatentAutoencoder, load_autoencoder, read_class_name
from kl_autoencoder.ldm import load_ldm_checkpoint
from training import checkpoint, shaping
from training.align import build_align
from training.batches import EpochBatches, StreamBatches
from training.checkpoint import CheckpointWriteError, NonFiniteError, StopSignal
from training.cli import parse_config
from training.config import TrainConfig, flat_config, save_config
from training.discriminator import PatchDiscriminator
from training.progress import LogWriter, RunningMeans, TimeBudget, agree_on_stop, check_nonfinite, run_summary
from training.step import (
    AutoencoderWithLoss,
    GuardedEMA,
    StepModules,
    StepSchedule,
    TrainStep,
    adamw,
)
from training.sync_batchnorm import synchronize_batchnorm
from training.trackers import check_tracker
from training.validation import Validator, weights_for_use

Log = Callable[[str], None]  # prints on the main process only (accelerator.print)


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


def make_accelerator(cfg: TrainConfig, precision: str) -> Accelerator:
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=None if cfg.train.tracker == "none" else cfg.train.tracker,
        project_dir=str(Path(cfg.out_dir)),
        step_scheduler_with_optimizer=False,
        # batches go to a GPU from pinned memory without waiting (pin_memory below), so a step never syncs
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=cfg.train.seed, non_blocking=True
        ),
    )


def build_autoencoder(cfg: TrainConfig) -> Autoencoder | LatentAutoencoder:
    """A new autoencoder of `model.preset` (or of `model.family`, from `model.arch`), or one loaded from
    `model.init_from`, with its own architecture; a bad file is a ConfigError.

    Our own model comes as itself (`kl_autoencoder.families.ours.wrap` puts it behind the interface); a folder
    or hub model of another family (`kl_autoencoder.interface.SUPPORTED`), or a new one, as its adapter, in
    training mode. A run folder means its newest weights (`find_diffusers_folder`): a phase continues the last.
    """
    path, family = cfg.model.init_from, cfg.model.family
    try:
        if path and Path(path).is_file():  # an LDM / SD VAE checkpoint: the architecture is the preset's
            return load_ldm_checkpoint(path, cfg.model.autoencoder_config(), cfg.model.trust_pickle)
        if path:  # a diffusers folder, run or checkpoint: its own architecture
            folder = find_diffusers_folder(path)
            name = read_class_name(folder)
            if family != "ours" and SUPPORTED.get(name) != family:
                raise ValueError(f"{folder} holds a {name}, not model.family {family}'s {BUILDABLE[family]}")
            if SUPPORTED.get(name) in ("kl", "vq"):  # its codebook trains as vq.* says
                return Autoencoder.from_pretrained(folder, vq=cfg.vq).train()
            ae = load_autoencoder(folder)
            ae.module.train()
            return ae
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise ConfigError(f"model.init_from: {e}") from None
    channels = cfg.data.channels  # a new model takes the data's channels; a loaded one is adapted (`adapt`)
    if family != "ours":  # seeded by the caller: every process builds the same weights
        return cfg.model.new_autoencoder(channels)
    config = dataclasses.replace(cfg.model.autoencoder_config(), in_channels=channels, out_channels=channels)
    return Autoencoder(config, vq=cfg.vq)


def adapt(cfg: TrainConfig, ae: LatentAutoencoder, log: Log) -> bool:
    """A loaded model whose channels are not data.channels, widened (3 -> 4) or narrowed (3 -> 1) as
    `kl_autoencoder.channels` says, in one line; any other pair is a ConfigError naming both counts. True when
    widened to RGBA."""
    try:
        what = adapt_channels(ae, cfg.data.channels)
    except ValueError as e:
        raise ConfigError(f"model.init_from: {e}") from None
    if what:
        log(f"{what} (data.channels={cfg.data.channels})")
    return what != "" and cfg.data.channels == 4


def freeze(cfg: TrainConfig, ae: LatentAutoencoder) -> None:
    """Train only the groups `train.trainable` names; a ConfigError for a group this family cannot train."""
    groups = cfg.train.trainable_groups()
    if groups is None and ae.family in ("kl", "vq"):
        return  # as the model sets it: an EMA-trained codebook takes no gradient
    try:
        ae.freeze(groups if groups is not None else ["encoder", "decoder"])  # RAE: a ValueError
    except ValueError as e:
        raise ConfigError(f"train.trainable: {e}") from None


def check_family(cfg: TrainConfig, ae: LatentAutoencoder, last_layer: torch.Tensor) -> None:
    """What the run asks of this autoencoder and it cannot do, as a ConfigError before any compute."""
    try:
        ae.check_size(cfg.data.resolution, cfg.data.resolution)
    except ValueError as e:
        raise ConfigError(f"data.resolution: {e}") from None
    try:
        ae.check_frames(cfg.data.num_frames)
    except ValueError as e:
        raise ConfigError(f"data.num_frames: {e}") from None
    loss = cfg.loss
    if cfg.data.num_frames > 1 and (loss.eq_weight > 0 or loss.align_weight > 0 or loss.latent_noise > 0
                                    or loss.channel_mask > 0):  # fmt: skip
        raise ConfigError("loss: the latent-shaping terms (eq_weight, align_weight, latent_noise, channel_mask) take "
                          "images; set them to 0 for clips (data.num_frames > 1)")  # fmt: skip
    if loss.eq_weight > 0 and "scale" in loss.eq_transforms and ae.family == "rae":
        raise ConfigError(
            "loss.eq_transforms: AutoencoderRAE decodes a fixed number of patches, so the scale transform's smaller "
            "latents cannot be decoded; use the rotations only"
        )
    if not last_layer.requires_grad and loss.disc_start < cfg.train.max_steps:
        raise ConfigError(
            f"train.trainable: the adversarial loss's adaptive weight is taken at the decoder's last layer, which "
            f"{cfg.train.trainable} freezes; train decoder_head too, or set loss.disc_start beyond train.max_steps"
        )


@dataclass
class Models:
    """What a run trains, the frozen networks its losses use (None where unavailable, with the reason in
    `status`), and the EMA of the autoencoder with the model that holds its weights for validation and export."""

    model: AutoencoderWithLoss
    discriminator: PatchDiscriminator
    lpips: nn.Module | None
    align: nn.Module | None
    status: dict[str, str]
    ema: GuardedEMA | None
    ema_model: LatentAutoencoder | None


def build_models(cfg: TrainConfig, accelerator: Accelerator, precision: str, log: Log) -> Models:
    """Every model of the run, built in the same order with the same seed on every process, so all start
    identical. `train.trainable` freezes the other groups (and a VQ codebook) here, before the optimizer."""
    set_seed(cfg.train.seed)
    built = build_autoencoder(cfg)
    ae = wrap(built) if isinstance(built, Autoencoder) else built
    widened = False
    if cfg.model.init_from:
        log(f"initialised from {cfg.model.init_from} ({ae.class_name}); training {cfg.train.trainable}")
        widened = adapt(cfg, ae, log)
    if cfg.model.gradient_checkpointing:
        try:  # ours, Wan's per causal chunk, and diffusers' classes that support it (ValueError from the others)
            ae.gradient_checkpointing(True)
        except ValueError:
            raise ConfigError(f"model.gradient_checkpointing: {ae.class_name} does not support it") from None
    freeze(cfg, ae)  # decoder: SD's ft-EMA / ft-MSE recipe, the latent space stays as it is
    if widened and not ae.channel_convs().first.weight.requires_grad:  # its alpha kernel is 0 and would stay 0
        raise ConfigError(f"train.trainable: {cfg.train.trainable} freezes the encoder's first conv, whose new alpha "
                          "input starts at zero: the latents would never see alpha; train the encoder too")  # fmt: skip
    align, align_status = load_align(cfg, accelerator, log)
    model = AutoencoderWithLoss(ae, cfg.loss.learn_logvar, cfg.loss.logvar_init, align.dim if align else 0)
    check_family(cfg, ae, model.last_layer)
    discriminator = PatchDiscriminator(  # it judges every channel of the data (alpha, every band)
        cfg.data.channels,
        base_channels=cfg.loss.disc_channels,
        n_layers=cfg.loss.disc_layers,
        norm=cfg.loss.disc_norm,
        dims=cfg.loss.disc_dims,
    )
    lpips, lpips_status = load_lpips(cfg, accelerator, precision, log)
    ema = ema_model = None
    if cfg.train.ema:
        ema = GuardedEMA(ae.module.parameters(), decay=cfg.train.ema_decay, use_ema_warmup=True)
        ema_model = copy.deepcopy(ae)  # what validation and export use
        ema_model.module.eval().requires_grad_(False)
        accelerator.register_for_checkpointing(ema)
    return Models(model, discriminator, lpips, align, {"lpips": lpips_status, "align": align_status}, ema, ema_model)


def load_align(cfg: TrainConfig, accelerator: Accelerator, log: Log) -> tuple[nn.Module | None, str]:
    """VA-VAE's frozen vision foundation model, when the VF loss is on: (module or None, status)."""
    if cfg.loss.align_weight <= 0:
        return None, "not used (loss.align_weight=0)"
    try:
        align, status = build_align(cfg.loss.align, cfg.loss.align_model)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    if align is None:
        log(f"WARNING: training WITHOUT the VF loss ({status})")
        return None, f"OFF: {status}"
    return align.to(accelerator.device), status


def load_lpips(cfg: TrainConfig, accelerator: Accelerator, precision: str, log: Log) -> tuple[nn.Module | None, str]:
    """The perceptual loss's network per `loss.lpips`, fed the data's channels as `ChannelLPIPS` says: (module or
    None, status). Data it cannot see as RGB (not 1, 3 or 4 channels, no `loss.lpips_channels`) trains without it,
    whatever `loss.lpips` says, loudly: never a crash, never bands averaged into a colour image."""
    mode = cfg.loss.lpips if cfg.loss.perceptual_weight > 0 else "off"
    channels, bands = cfg.data.channels, cfg.loss.lpips_channels
    if mode != "off" and bands is None and channels not in (1, 3, 4):
        why = f"data.channels={channels} is not RGB; name band triplets in loss.lpips_channels, e.g. [3, 2, 1]"
        log(f"WARNING: training WITHOUT the LPIPS perceptual loss ({why})")
        return None, f"OFF: {why}"
    # the step's autocast covers only the prepared modules' forwards: LPIPS opens its own when asked to
    dtype = autocast_dtype(precision) if cfg.loss.lpips_autocast else None
    with accelerator.local_main_process_first():  # one download per machine; the others find it in the cache
        args = (mode, cfg.loss.lpips_net, cfg.loss.lpips_weights, dtype)
        lpips, status = build_lpips(*args, download=accelerator.is_local_main_process)
    if lpips is None:
        log(f"WARNING: training WITHOUT the LPIPS perceptual loss ({status})")
        return None, f"OFF: {status}"
    if dtype is not None:
        status += f" (under {precision} autocast: loss.lpips_autocast)"
    if bands is not None:
        status += f" on bands {bands}"
    return ChannelLPIPS(lpips, bands).to(accelerator.device), status


@dataclass
class Data:
    """The run's images: a map-style table with its loader (`train_dl`, `per_epoch` batches per process), or a
    stream (`train_dl` None: it is read by `StreamBatches`); and the held-out ones."""

    train: Dataset
    val: Dataset
    train_dl: DataLoader | None
    val_dl: DataLoader
    per_epoch: int


def build_data(cfg: TrainConfig, accelerator: Accelerator, log: Log) -> Data:
    """A map-style table (folder, sample, hub) or a stream (shards, data.streaming), see training/batches.py."""
    try:
        if is_stream(cfg.data):
            rank, world = accelerator.process_index, accelerator.num_processes
            train_ds, val_ds, plan = build_stream(cfg.data, cfg.train.seed, rank, world)
            log(plan)
        else:
            train_ds, val_ds = build_datasets(cfg.data, cfg.train.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    val_dl = DataLoader(val_ds, batch_size=cfg.data.batch_size, generator=torch.Generator().manual_seed(0))
    if is_stream(cfg.data):
        return Data(train_ds, val_ds, None, val_dl, 0)
    # clips mixed with image batches (kl_ae.common.video.ClipDataset) are ordered by the dataset, per step
    self_shuffled = getattr(train_ds, "shuffles_itself", False)
    if self_shuffled:
        train_ds.processes = accelerator.num_processes  # one kind of batch (one T) on every process per step
    train_dl = DataLoader(
        train_ds,
        batch_size=cfg.data.batch_size,
        shuffle=not self_shuffled,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        generator=torch.Generator().manual_seed(cfg.train.seed),  # iterator seeding stays off the global RNG
        pin_memory=accelerator.device.type == "cuda",
    )
    per_epoch = len(train_ds) // (cfg.data.batch_size * accelerator.num_processes)
    if per_epoch == 0:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} per process is more than the {len(train_ds)} images")
    return Data(train_ds, val_ds, train_dl, val_dl, per_epoch)


def create_run_folder(cfg: TrainConfig, accelerator: Accelerator, data: Data) -> None:
    """The run folder and its resolved config.yaml: written only now, once every input has been checked."""
    out = Path(cfg.out_dir)
    if accelerator.is_main_process:
        for folder in (out, out / "samples", out / "checkpoints"):
            folder.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        save_mapping(out, getattr(data.train, "mapping", None) or value_mapping(cfg.data, cfg.train.seed))
    accelerator.wait_for_everyone()
    data.train.skip_log = data.val.skip_log = out / "skipped.txt"  # every process lists the files it skipped


def prepare_step(cfg: TrainConfig, accelerator: Accelerator, models: Models, data: Data, fp16: bool):
    """The optimizers and their schedules, everything through `accelerator.prepare`, and the step that uses the
    prepared objects: (TrainStep, the training batches, the prepared held-out loader)."""
    if accelerator.num_processes > 1:
        if not isinstance(models.model.autoencoder, Autoencoder):
            # a diffusers class may leave parameters out of a batch's graph (a causal video class's temporal
            # convolutions on one-frame clips: images mixed into clips, Qwen-Image on images); DDP must look for them
            accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
        # BatchNorm statistics of the whole batch, the same on every process
        synced = sum(synchronize_batchnorm(m, accelerator.device) for m in (models.model, models.discriminator))
        accelerator.print(f"BatchNorm: {synced} layer(s) synchronized across {accelerator.num_processes} processes")
    lr, disc_lr = cfg.optim.lr, cfg.optim.disc_lr or cfg.optim.lr
    if cfg.optim.scale_lr:
        scale = cfg.data.batch_size * accelerator.num_processes * cfg.train.grad_accum
        lr, disc_lr = lr * scale, disc_lr * scale
    adam = dict(betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    opt_g = adamw([p for p in models.model.parameters() if p.requires_grad], lr=lr, **adam)
    opt_d = adamw(models.discriminator.parameters(), lr=disc_lr, **adam)
    o = cfg.optim
    schedule = partial(lr_factor, warmup=o.warmup_steps, total=cfg.train.max_steps, schedule=o.schedule,
                       min_ratio=o.min_lr_ratio)  # fmt: skip
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, schedule) for opt in (opt_g, opt_d)]
    stream = data.train_dl is None  # a stream is split by node already: not prepared
    loaders = (data.val_dl,) if stream else (data.train_dl, data.val_dl)
    model, disc, opt_g, opt_d, sched_g, sched_d, *loaders = accelerator.prepare(
        models.model, models.discriminator, opt_g, opt_d, *schedulers, *loaders
    )
    if stream:
        (val_dl,) = loaders
        batches = StreamBatches(data.train, cfg.data, accelerator.device, accelerator.num_processes, cfg.train.seed)
    else:
        train_dl, val_dl = loaders
        batches = EpochBatches(accelerator, train_dl, data.train, data.per_epoch)
    if models.ema is not None:  # the EMA lives where the weights now are
        models.ema.to(accelerator.device)
        models.ema_model.to(accelerator.device)
    modules = StepModules(model, disc, opt_g, opt_d, models.lpips, models.align, models.ema, (sched_g, sched_d))
    return TrainStep(accelerator, modules, cfg.loss, cfg.optim.grad_clip, fp16), batches, val_dl


def main(cfg: TrainConfig) -> dict:
    """Train as `cfg` says; returns the run summary (also written to `<out>/summary.json`)."""
    budget = TimeBudget(cfg.train.max_time_seconds())  # the wall clock starts now
    out, precision = Path(cfg.out_dir), resolve_mixed_precision(cfg.train.mixed_precision)
    check_tracker(cfg.train.tracker)
    accelerator = make_accelerator(cfg, precision)
    log = accelerator.print
    log(f"kl-ae: {accelerator.num_processes} process(es), device {accelerator.device}, mixed precision {precision}")
    models = build_models(cfg, accelerator, precision, log)
    set_seed(cfg.train.seed, device_specific=True)  # different posterior noise per process
    data = build_data(cfg, accelerator, log)
    shown = 8 if cfg.data.num_frames == 1 else 2  # clips show every frame
    sample_batch = torch.stack([data.val[i] for i in range(min(shown, len(data.val)))])  # the reconstruction grids
    create_run_folder(cfg, accelerator, data)
    if cfg.train.compile:  # after the EMA copy; compiled in place, so state dict names stay the same
        for module in (models.model.autoencoder.encoder, models.model.autoencoder.decoder):
            # static shapes: a recompile with symbolic sizes fails in AutoencoderDC's attention (torch 2.14)
            module.compile(dynamic=False)
        log("torch.compile: encoder and decoder (compiling during the first steps)")
    train_step, batches, val_dl = prepare_step(cfg, accelerator, models, data, precision == "fp16")
    live = train_step.core.adapter
    use_weights = partial(weights_for_use, live, models.ema, models.ema_model)

    # --- resume: the same command continues from the latest complete checkpoint
    state = checkpoint.resume(accelerator, out, models.ema, live)
    step, batches_seen, history = 0, 0, {"first_eval": None, "last_eval": None, "wall_s": 0.0, "nonfinite_steps": 0}
    if state is not None:
        step, batches_seen, history = state["step"], state["batches_seen"], state["history"]
        batches.load_state_dict(state["data_state"])
    if accelerator.is_main_process:  # rows a killed run logged after its checkpoint (or before any) come again
        for name in ("metrics.jsonl", "val.jsonl"):
            checkpoint.trim_log(out / name, step if state is not None else -1)
    if accelerator.is_main_process and cfg.train.tracker != "none":
        accelerator.init_trackers("kl-ae", config=flat_config(cfg))
    val_lpips = models.lpips.deterministic() if models.lpips is not None else None  # RGBA: over the fixed grey
    validator = Validator(accelerator, val_dl, sample_batch, val_lpips, out, use_weights, cfg.loss.lpips_channels)
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
    t = cfg.train
    images_per_step = cfg.data.batch_size * accelerator.num_processes * t.grad_accum
    means = RunningMeans()
    nonfinite = partial(check_nonfinite, train_step.guards, history, limit=t.max_nonfinite, out=out, log=log)
    interrupted = time_up = False
    bar = tqdm(total=t.max_steps, initial=step, disable=not accelerator.is_main_process, desc="train",
               dynamic_ncols=True)  # fmt: skip
    writer = LogWriter(accelerator, out / "metrics.jsonl", bar, images_per_step, step)
    t_start = time.perf_counter()
    with StopSignal() as stop, bar:  # the bar is a context too: an error message then starts on a line of its own
        while step < t.max_steps and not interrupted:
            for x in batches.epoch(batches_seen):
                batches_seen += 1
                schedule = StepSchedule.at(step, cfg.loss)
                result = train_step(x, shaping.draw(cfg.loss, t.seed, step, live.latent_channels), schedule)
                if not result.applied:  # gradients accumulate over this batch and the next
                    continue
                means.add(result.g_logs, result.g_ok)  # a skipped update's logs are left out of the means
                means.add(result.d_logs, result.d_ok)
                step += 1
                bar.update(1)
                last = step == t.max_steps
                if step % t.log_every == 0 or last:
                    nonfinite(step=step)
                    lr = train_step.modules.schedulers[0].get_last_lr()[0]
                    extra = {"train/disc_factor": schedule.disc_factor, "lr": lr}
                    writer.write(step, means.pop() | extra | {"nonfinite_steps": history["nonfinite_steps"]})
                    time_up = budget.seconds is not None and agree_on_stop(accelerator, budget.due())
                    stop.requested = agree_on_stop(accelerator, stop.requested) or time_up
                if accelerator.num_processes == 1 or step % t.log_every == 0:
                    interrupted = stop.requested
                if step % t.eval_every == 0 or last:
                    validator.record(step, history)
                if step % t.sample_every == 0 or last:
                    validator.save_samples(step)
                if step % t.checkpoint_every == 0 or last or interrupted:
                    history["wall_s"] += time.perf_counter() - t_start
                    t_start = time.perf_counter()
                    nonfinite(step=step)  # stop before saving when the limit is reached; the last checkpoint stays
                    budget.timed(save)
                if step >= t.max_steps or interrupted:
                    break
    writer.close()
    stopped_by = ("max_time" if time_up else "signal") if interrupted else None
    trained = (train_step.core, accelerator.unwrap_model(train_step.modules.discriminator))
    summary = run_summary(cfg, accelerator, trained, models.status, history, step, stopped_by, precision)
    finish(cfg, accelerator, summary, history, models.ema is not None)
    return summary


def finish(cfg: TrainConfig, accelerator: Accelerator, summary: dict, history: dict, ema: bool) -> None:
    """Write summary.json and, for a run that reached train.max_steps, the diffusers folder (`train.export`)."""
    out, log = Path(cfg.out_dir), accelerator.print
    if accelerator.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        if summary["interrupted"]:
            why = f" (train.max_time {cfg.train.max_time})" if summary["stopped_by"] == "max_time" else ""
            log(f"stopped at step {summary['steps']}{why}; checkpoint saved. Re-run the same command to resume.")
        else:
            if cfg.train.export:  # the checkpoint of the last step holds these weights: exported from there
                export_after_training(out)  # measured scaling/shift factors, force_upcast, model card
            first, last = history["first_eval"], history["last_eval"]
            log(
                f"validation PSNR: {first['val/psnr']:.2f} dB at step {first['step']} -> "
                f"{last['val/psnr']:.2f} dB at step {last['step']}" + (" (EMA weights)" if ema else "")
            )
            if cfg.train.export:
                log(f"diffusers folder: {out / 'diffusers'}")
            else:
                log(f"no diffusers folder (train.export=false); `kl-ae export {out}` writes one")
    accelerator.end_training()


def cli(argv: list[str] | None = None) -> int:
    """`python -m training.train ARGS` (also under `accelerate launch`): `kl-ae train`'s arguments; the exit status."""
    try:
        main(parse_config(argv))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteError, CheckpointWriteError) as e:  # the run stopped, its checkpoints intact
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
