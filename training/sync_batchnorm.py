"""BatchNorm synchronized across processes: the batch statistics of every process's batch taken as one batch.

Under DDP each process would otherwise normalize with its own batch's statistics and move its own running
statistics, so the replicas' BatchNorm buffers drift apart (DDP broadcasts process 0's before each forward, so the
others' batches never reach them). On an accelerator torch's `nn.SyncBatchNorm` does this; it refuses CPU tensors,
so CPU runs (gloo) use `CPUSyncBatchNorm`, the same arithmetic in a few readable lines. Both keep the layer's
parameters and buffers (the same tensors, the same state-dict keys), so optimizers, the EMA and export see no
difference.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce
from torch.nn.modules.batchnorm import _BatchNorm


class CPUSyncBatchNorm(_BatchNorm):
    """BatchNorm over the batches of all processes together, for CPU runs; a plain BatchNorm on one process.

    In training, each process sums its batch's per-channel count, sum and sum of squares; one differentiable
    all-reduce adds them up (its backward all-reduces the gradients, so each input's gradient sees every process's
    loss, as `nn.SyncBatchNorm`'s backward does). The batch is normalized with the biased variance and the running
    statistics move as BatchNorm moves them: by `momentum` (or the cumulative average when it is None), the running
    variance unbiased. In eval mode it is BatchNorm itself.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]  # every axis but the channels
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in fp32 at least, under autocast too
        count = xf.new_full((1,), x.numel() / channels)
        stats = torch.cat([count, xf.sum(dims), xf.square().sum(dims)])  # (1 + 2C,)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            stats = all_reduce(stats)
        n, total, squares = stats[0], stats[1 : 1 + channels], stats[1 + channels :]
        mean = total / n
        var = (squares / n - mean.square()).clamp_min(0)  # biased: what the batch is normalized with
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * n / (n - 1).clamp_min(1))
        shape = (1, channels) + (1,) * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased_var.to(self.running_var.dtype), alpha=momentum)


def synchronize_batchnorm(module: nn.Module, device: torch.device) -> int:
    """Replace every BatchNorm layer below `module` in place by a synchronized one for `device` (torch's
    `nn.SyncBatchNorm` on an accelerator, `CPUSyncBatchNorm` on the CPU), keeping its parameters, buffers and
    mode; the number of layers replaced. Call it before `accelerator.prepare`, on every process."""
    synced = (nn.SyncBatchNorm, CPUSyncBatchNorm)
    cls = CPUSyncBatchNorm if device.type == "cpu" else nn.SyncBatchNorm
    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm) and not isinstance(child, synced):
            module.add_module(name, _replacement(child, cls))
            replaced += 1
        else:
            replaced += synchronize_batchnorm(child, device)
    return replaced


def _replacement(bn: _BatchNorm, cls: type[_BatchNorm]) -> _BatchNorm:
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new.weight, new.bias = bn.weight, bn.bias  # the same tensors: an optimizer or EMA built on them still holds them
    new.running_mean, new.running_var, new.num_batches_tracked = bn.running_mean, bn.running_var, bn.num_batches_tracked
    new.train(bn.training)
    return new
