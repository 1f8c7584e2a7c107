"""The diffusability probe's latent diffusion model and its fixed recipe (`kl-ae probe`, eval/probe.py).

A small DiT from diffusers (`DiTTransformer2DModel`, unconditional: one class, label 0) is trained on normalised
latents for a fixed budget; what is reported is its held-out denoising loss at a fixed grid of timesteps, and
samples drawn with DDIM. Nothing here knows about autoencoders: it takes latent tensors (N, C, h, w).

The recipe (`RECIPE`, recorded in metrics.json), the same for every model so that comparisons are fair:
- schedule: `DDPMScheduler`, 1000 steps, scaled-linear betas 0.00085 -> 0.012 (Stable Diffusion's latent
  schedule); x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t ~ U{0, ..., 999}, eps ~ N(0, I).
- target: eps (epsilon prediction), mean squared error per latent element.
- denoiser size, from the latent shape (C, h, w) (`denoiser_size`): patch size 2, doubled while there are more
  than 256 tokens; width 2 * C * patch^2 rounded up to a multiple of 64, at least 128, at most 512 (with at most
  256 tokens, the compute budget of a step, whatever the channel count); 4 blocks; heads of 32. Clips' latents
  (C, t, h, w) are seen as (C * t, h, w): each token a patch over all latent frames.
  A 4x16x16 latent gets 64 tokens of width 128 (1.4 M parameters), 16x32x32 256 tokens of width 128. Why a DiT:
  at equal CPU time (120 s, one thread, 4x16x16 latents of the tiny preset) it reached a slightly lower held-out
  loss than a UNet2DModel of similar cost (block_out_channels (32, 64), attention at 8x8): 0.288 against 0.296.
- AdamW, lr 3e-4, betas (0.9, 0.999), weight decay 0, linear warm-up over 50 steps then constant, gradients
  clipped to norm 1; fp32; `batch_size` latents per step over all processes (accelerate's `split_batches`, so
  the budget is the same whatever the number of processes); data order, noise and init seeded by `seed`.
- held-out loss: at `TIMESTEPS` (10 values spread over [0, 1000)), the MSE between eps and the prediction per
  latent element, averaged over the held-out latents. Held-out latent i gets its noise from a generator seeded
  with (seed << 32) + i, one draw of shape (10, C, h, w) for the 10 timesteps: the same draws for every model with
  that latent shape, whatever the batch size or number of processes (a model with another latent shape gets
  draws of its own shape from the same seeds).
- Gaussian baseline: for x0 ~ N(0, I) the best eps-predictor is E[eps | x_t] = sqrt(1 - abar_t) x_t (x_t is
  N(0, I) too, and Cov(eps, x_t) = sqrt(1 - abar_t) I), whose MSE is 1 - (1 - abar_t) = abar_t per element.
  A held-out loss below abar_t means the denoiser uses structure of the latents beyond their first two moments.
- sampling: `DDIMScheduler` from the same config (eta 0, "trailing" spacing, no clipping), `SAMPLE_STEPS`
  steps from noise drawn with a generator seeded by `seed`.

DiT's label embedding drops the (single) class label for 10 % of a batch during training (diffusers hard-codes
classifier-free-guidance dropout); with one class that swaps one learned bias for another.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from accelerate import Accelerator
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel
from diffusers.optimization import get_constant_schedule_with_warmup
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

NUM_TRAIN_TIMESTEPS = 1000
TIMESTEPS = [50 + 100 * k for k in range(10)]  # the held-out grid: 50, 150, ..., 950
SAMPLE_STEPS = 50
RECIPE = {
    "denoiser": "diffusers DiTTransformer2DModel, unconditional (one class, label 0)",
    "schedule": "DDPMScheduler, 1000 steps, scaled_linear betas 0.00085..0.012",
    "prediction": "epsilon, MSE per latent element",
    "optimizer": "AdamW lr 3e-4, betas (0.9, 0.999), weight_decay 0, warm-up 50 steps, grad norm clip 1",
    "timestep_grid": TIMESTEPS,
    "heldout_noise": "held-out latent i: torch.randn((10, C, h, w)) from manual_seed((seed << 32) + i)",
    "sampler": f"DDIMScheduler, {SAMPLE_STEPS} steps, eta 0, trailing spacing, no clipping",
}
LR, WARMUP, CLIP = 3e-4, 50, 1.0
MAX_TOKENS, HEAD_DIM, DEPTH = 256, 32, 4
MAX_WIDTH = 512  # with MAX_TOKENS, the compute budget of one probe step


def noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type="epsilon", clip_sample=False,
    )  # fmt: skip


def gaussian_baseline(scheduler: DDPMScheduler, timesteps: list[int] = TIMESTEPS) -> list[float]:
    """The least eps-prediction MSE per element for x0 ~ N(0, I) at each timestep: abar_t (module docstring)."""
    return [float(scheduler.alphas_cumprod[t]) for t in timesteps]


def denoiser_size(shape: tuple[int, int, int]) -> dict:
    """DiT hyperparameters from the latent shape (C, h, w), by the documented rule (module docstring)."""
    c, h, w = shape
    if h != w:
        raise ValueError(f"the probe's DiT needs square latents, got {h}x{w}")
    patch = 2 if h % 2 == 0 else 1
    while (h // patch) * (w // patch) > MAX_TOKENS and h % (2 * patch) == 0:
        patch *= 2
    width = max(128, math.ceil(2 * c * patch * patch / 64) * 64)
    # the compute budget: a step costs ~ tokens * width^2 * depth, tokens <= 256 and width <= 512; wide latents
    # (FLUX.2's 512 normalized channels, video latents with their frames in the channels) must not buy a wider one
    width = min(width, MAX_WIDTH)
    return {
        "patch_size": patch,
        "width": width,
        "depth": DEPTH,
        "heads": width // HEAD_DIM,
        "tokens": (h // patch) ** 2,
    }


def build_denoiser(shape: tuple[int, int, int]) -> DiTTransformer2DModel:
    size = denoiser_size(shape)
    return DiTTransformer2DModel(
        num_attention_heads=size["heads"], attention_head_dim=HEAD_DIM, in_channels=shape[0], num_layers=size["depth"],
        sample_size=shape[1], patch_size=size["patch_size"], num_embeds_ada_norm=1,
    )  # fmt: skip


def predict(model, x: Tensor, t: Tensor) -> Tensor:
    """The denoiser's eps prediction for noisy latents x (B, C, h, w) at timesteps t (B,)."""
    labels = torch.zeros(len(x), dtype=torch.long, device=x.device)
    return model(x, timestep=t, class_labels=labels).sample


def heldout_noise(index: int, seed: int, shape: tuple[int, ...], steps: int = len(TIMESTEPS)) -> Tensor:
    """The fixed noise of held-out latent `index`: (steps, C, h, w), independent of the model and the batching."""
    return torch.randn((steps, *shape), generator=torch.Generator().manual_seed((seed << 32) + index))


@torch.no_grad()
def heldout_loss(model, loader, scheduler: DDPMScheduler, seed: int, accelerator: Accelerator) -> list[float]:
    """Mean eps-MSE per latent element at each grid timestep over the held-out latents of `loader` (prepared).

    Every process evaluates its shard; per-latent values are gathered (`gather_for_metrics` drops the padding).
    """
    model.eval()
    abar = scheduler.alphas_cumprod.to(accelerator.device)
    grid = torch.tensor(TIMESTEPS, device=accelerator.device)
    rows = []
    for index, x0 in loader:  # (B,), (B, C, h, w)
        eps = torch.stack([heldout_noise(int(i), seed, x0.shape[1:]) for i in index]).to(x0.device)  # (B, K, C, h, w)
        errors = []
        for k, t in enumerate(grid):
            a = abar[t]
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps[:, k]
            pred = predict(model, x_t, t.expand(len(x0)))
            errors.append((pred.float() - eps[:, k]).square().flatten(1).mean(1))  # (B,)
        rows.append(accelerator.gather_for_metrics(torch.stack(errors, 1)).cpu())  # (B_all, K)
    model.train()
    return torch.cat(rows).double().mean(0).tolist()


def train_denoiser(
    train: Tensor,
    heldout: Tensor,
    steps: int,
    batch_size: int,
    seed: int,
    accelerator: Accelerator,
    eval_every: int,
    log: Callable[[str], None] = print,
) -> tuple[DiTTransformer2DModel, list[dict]]:
    """Train the probe's denoiser on `train` (N, C, h, w) by the recipe; returns (the unwrapped model, the curve).

    The curve: {"step", "loss" (per grid timestep), "mean"} every `eval_every` steps and at the last step,
    the held-out loss on `heldout` (M, C, h, w). `accelerator` must have `split_batches=True` and a seedable
    sampler seeded with `seed` (see `probe_accelerator`).
    """
    shape = tuple(train.shape[1:])
    torch.manual_seed(seed)  # the initial weights (and DiT's label dropout) only
    model = build_denoiser(shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=0.0)
    lr_schedule = get_constant_schedule_with_warmup(optimizer, WARMUP)
    gen = torch.Generator().manual_seed(seed)
    batch = min(batch_size, len(train) // accelerator.num_processes * accelerator.num_processes)
    loader = DataLoader(TensorDataset(train), batch_size=batch, shuffle=True, drop_last=True, generator=gen)
    held = DataLoader(TensorDataset(torch.arange(len(heldout)), heldout), batch_size=64 * accelerator.num_processes)
    model, optimizer, loader, held, lr_schedule = accelerator.prepare(model, optimizer, loader, held, lr_schedule)
    scheduler = noise_scheduler()
    abar = scheduler.alphas_cumprod.to(accelerator.device)
    noise_gen = torch.Generator(accelerator.device).manual_seed(seed * 1000 + accelerator.process_index)
    curve, step, epoch = [], 0, 0
    model.train()
    while step < steps:
        loader.set_epoch(epoch)
        for (x0,) in loader:  # (B / processes, C, h, w)
            t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(x0),), generator=noise_gen, device=x0.device)
            eps = torch.randn(x0.shape, generator=noise_gen, device=x0.device)
            a = abar[t].view(-1, 1, 1, 1)
            loss = (predict(model, a.sqrt() * x0 + (1 - a).sqrt() * eps, t).float() - eps).square().mean()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % eval_every == 0 or step == steps:
                values = heldout_loss(model, held, scheduler, seed, accelerator)
                curve.append({"step": step, "loss": values, "mean": sum(values) / len(values)})
                log(f"step {step}/{steps}: train loss {loss.item():.4f}, held-out loss {curve[-1]['mean']:.4f}")
            if step == steps:
                break
        epoch += 1
    return accelerator.unwrap_model(model), curve


@torch.no_grad()
def sample(model, shape: tuple[int, int, int], n: int, seed: int, device) -> Tensor:
    """n latents (n, C, h, w) in the normalised space, by DDIM from noise seeded with `seed`."""
    model.eval()
    ddim = DDIMScheduler.from_config(noise_scheduler().config, set_alpha_to_one=False, timestep_spacing="trailing")
    ddim.set_timesteps(SAMPLE_STEPS)
    x = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    for t in ddim.timesteps:
        x = ddim.step(predict(model, x, t.to(device).expand(n)), t, x, eta=0.0).prev_sample
    return x


def probe_accelerator(seed: int) -> Accelerator:
    """An Accelerator for `train_denoiser`: the batch size is the global one (split over processes) and the
    data order is seeded by `seed` (accelerate's seedable sampler, reshuffled each epoch by `set_epoch`)."""
    from accelerate import DataLoaderConfiguration

    config = DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=seed)
    return Accelerator(dataloader_config=config)
