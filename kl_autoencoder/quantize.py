"""The VQ bottleneck: nearest-code lookup, VQ losses, EMA codebook, dead-code restarts, usage over a window.

The only persistent tensor is `embedding.weight`, diffusers' `VectorQuantizer` key, so a trained quantizer
exports exactly (diffusers picks the Euclidean nearest code of the same codebook). Everything else is training
state kept in non-persistent buffers, identical on every process: save it with `statistics()` beside a
checkpoint and restore it with `load_statistics()`.

Sources: the losses and straight-through estimator of VQ-VAE (van den Oord et al. 2017); the EMA codebook with
Laplace-smoothed cluster sizes of VQ-VAE-2 / Sonnet's `VectorQuantizerEMA`; dead-code expiry and L2-normalised
codes from lucidrains/vector-quantize-pytorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

EPS = 1e-5  # Laplace smoothing of the EMA cluster sizes (Sonnet's epsilon): no division by ~0 for rare codes
_STATISTICS = ("cluster_size", "embed_sum", "window_counts", "unused_for", "recent", "recent_seen", "steps", "restarts")


@dataclass
class QuantizerConfig:
    """How the codebook is trained (the trainer's `vq` section); nothing here changes the exported model."""

    beta: float = 0.25  # commitment weight
    # False: codebook + beta * commitment (VQ-VAE). True: beta * codebook + commitment, the weighting taming,
    # LDM and diffusers use (their "legacy" flag: beta on the wrong term, kept for compatibility)
    legacy_loss: bool = False
    codebook: str = "ema"  # "ema": codes are EMAs of the encoder outputs assigned to them; "loss": learned by SGD
    decay: float = 0.99  # EMA decay of cluster sizes and summed vectors
    dead_after: int = 100  # restart a code unused for this many training forwards; 0 turns restarts off
    window: int = 100  # training forwards over which usage and perplexity are counted (all processes summed)
    buffer_size: int = 4096  # recent encoder outputs kept as restart candidates

    def __post_init__(self) -> None:
        if self.codebook not in ("ema", "loss"):
            raise ValueError(f"codebook must be 'ema' or 'loss', got {self.codebook!r}")
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {self.decay}")
        if self.beta < 0 or self.dead_after < 0:
            raise ValueError(f"beta and dead_after must be >= 0, got {self.beta} and {self.dead_after}")
        if self.window < 1 or self.buffer_size < 1:
            raise ValueError(f"window and buffer_size must be >= 1, got {self.window} and {self.buffer_size}")


class QuantizerOutput(NamedTuple):
    z_q: torch.Tensor  # (B, D, h, w) quantized latents; the gradient passes straight through to z
    indices: torch.Tensor  # (B, h, w) code indices
    loss: torch.Tensor  # scalar VQ loss: weighted codebook and commitment terms
    logs: dict[str, torch.Tensor]  # detached scalars: train/vq_loss, train/commitment, train/codebook, vq/*


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes in place, so that every process applies the same codebook update."""
    if _distributed():
        dist.all_reduce(t)
    return t


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's tensor everywhere."""
    if _distributed():
        dist.broadcast(t, src=0)
    return t


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index of the Euclidean nearest code for each row of z (N, D): argmin ||z||^2 - 2 z.e + ||e||^2, (N,).

    Chunked over rows, so the (rows, num_codes) distance matrix stays small for large batches.
    """
    e2 = codebook.pow(2).sum(1)  # (K,)
    return torch.cat([(c.pow(2).sum(1, keepdim=True) - 2 * c @ codebook.T + e2).argmin(1) for c in z.split(chunk)])


def vq_terms(z: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook, commitment) = (||sg[z] - e||^2, ||z - sg[e]||^2), mean over elements."""
    return F.mse_loss(e, z.detach()), F.mse_loss(z, e.detach())


class Latents:
    """A VQ encoder's output before quantization, (B, code_dim, h, w), as diffusers' `VQModel.encode(x).latents`.

    `mode()` and `sample()` return the latents, so code written for the KL posterior (latent statistics, a
    scaling_factor for the diffusion model) runs unchanged; LDM diffuses VQ latents before quantization too.
    """

    def __init__(self, latents: torch.Tensor):
        self.latents = latents

    def mode(self) -> torch.Tensor:
        return self.latents

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents


class VectorQuantizer(nn.Module):
    """(B, D, h, w) latents -> nearest codes of a (num_codes, D) codebook, with losses, EMA and restarts."""

    def __init__(
        self, num_codes: int, code_dim: int, normalize_codes: bool = False, config: QuantizerConfig | None = None
    ):
        super().__init__()
        self.config = c = config or QuantizerConfig()
        self.num_codes, self.code_dim, self.normalize_codes = num_codes, code_dim, normalize_codes
        self.embedding = nn.Embedding(num_codes, code_dim)
        with torch.no_grad():  # taming's init; codes far from the data are what restarts are for
            self.embedding.weight.uniform_(-1.0 / num_codes, 1.0 / num_codes)
            if normalize_codes:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=1))
        # an EMA codebook takes no gradient: leaving it out keeps it out of the optimizer and DDP's reducer
        self.embedding.weight.requires_grad_(c.codebook == "loss")
        buffers = {
            # EMA state, as if each code had been assigned itself once (Sonnet debiases zeros instead)
            "cluster_size": torch.ones(num_codes),
            "embed_sum": self.embedding.weight.detach().clone(),
            "window_counts": torch.zeros(c.window, num_codes),  # ring of per-forward code counts
            "unused_for": torch.zeros(num_codes, dtype=torch.long),  # training forwards since last assignment
            "recent": torch.zeros(c.buffer_size, code_dim),  # ring of recent encoder outputs
            "recent_seen": torch.zeros((), dtype=torch.long),
            "steps": torch.zeros((), dtype=torch.long),  # training forwards so far
            "restarts": torch.zeros((), dtype=torch.long),  # codes restarted so far
        }
        for name, value in buffers.items():  # not in state_dict: the export stays diffusers' VQModel
            self.register_buffer(name, value, persistent=False)
        self._host: dict[str, int] = {}  # host copies of `steps` and `recent_seen` (see `_host_count`)
        self.frozen = False  # True: usage is still counted, but the codes never move (no EMA step, no restart)
        self.register_load_state_dict_post_hook(_restart_ema_from_loaded_codebook)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        B, D, H, W = z.shape
        # fp32 whatever autocast says: in bf16, close codes tie and distances round to the wrong code
        with torch.autocast(z.device.type, enabled=False):
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, D)  # (N, D), N = B*h*w
            codebook = self.embedding.weight
            if self.normalize_codes:  # unit vectors: Euclidean argmin = cosine argmax, so diffusers agrees
                flat, codebook = F.normalize(flat, dim=1), F.normalize(codebook, dim=1)
            indices = nearest_code(flat.detach(), codebook.detach())
            e = F.embedding(indices, codebook)  # (N, D)
            codebook_term, commitment = vq_terms(flat, e)
            loss = self._weigh(codebook_term, commitment)
            z_q = flat + (e - flat).detach()  # straight-through: forward e, backward identity to z
            if self.training:
                self._update(flat.detach(), indices)
        z_q = z_q.view(B, H, W, D).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w), as diffusers lays it out
        logs = {
            "train/vq_loss": loss.detach(),
            "train/commitment": commitment.detach(),
            "train/codebook": codebook_term.detach(),
            "vq/usage": self.usage,
            "vq/perplexity": self.perplexity,
            "vq/dead_codes": self.dead_codes.float(),
            "vq/restarts": self.restarts.float(),
        }
        return QuantizerOutput(z_q, indices.view(B, H, W), loss, logs)

    def _weigh(self, codebook_term: torch.Tensor, commitment: torch.Tensor) -> torch.Tensor:
        c = self.config
        codebook_weight, commitment_weight = (c.beta, 1.0) if c.legacy_loss else (1.0, c.beta)
        if c.codebook == "ema":  # the EMA moves the codes; the codebook term would have no gradient
            return commitment_weight * commitment
        return codebook_weight * codebook_term + commitment_weight * commitment

    @property
    def usage(self) -> torch.Tensor:
        """Fraction of codes assigned at least once in the window."""
        return (self.window_counts.sum(0) > 0).float().mean()

    @property
    def perplexity(self) -> torch.Tensor:
        """exp(entropy) of the code frequencies over the window (window * batch tokens, not one batch)."""
        counts = self.window_counts.sum(0)
        return torch.special.entr(counts / counts.sum().clamp_min(1)).sum().exp()

    @property
    def dead_codes(self) -> torch.Tensor:
        """Codes unused for dead_after (restarts off: window) training forwards; restarts revive them at once."""
        return (self.unused_for >= (self.config.dead_after or self.config.window)).sum()

    @torch.no_grad()
    def _update(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        """After a training lookup: code statistics summed over processes, EMA step, restarts."""
        c = self.config
        # one all-reduce for both: column 0 counts, columns 1: sum the assigned vectors, (K, 1 + D)
        stats = torch.zeros(self.num_codes, 1 + self.code_dim, device=z.device)
        stats.index_add_(0, indices, torch.cat([torch.ones_like(z[:, :1]), z], dim=1))
        counts, sums = _all_reduce(stats).split([1, self.code_dim], dim=1)
        counts = counts.squeeze(1)
        self.window_counts.index_copy_(0, torch.remainder(self.steps, c.window).view(1), counts[None])
        self.unused_for.add_(1).masked_fill_(counts > 0, 0)
        self._host["steps"] = self._host_count("steps") + 1
        self.steps += 1
        if self.frozen:
            return
        if c.codebook == "ema":
            self._ema_update(counts, sums)
        # nothing here waits for the device: the step count is mirrored on the host, the draws come from a
        # generator on z's device seeded with it (the same on every process, resumable), and restarts are masked
        generator = torch.Generator(device=z.device).manual_seed(self._host["steps"])
        self._remember(z, generator)
        if c.dead_after > 0:  # the same on every process: unused_for comes from the summed counts
            self._restart(self.unused_for >= c.dead_after, generator)

    def _host_count(self, name: str) -> int:
        """The host's copy of the `steps` or `recent_seen` buffer; read from the device once after a load."""
        if name not in self._host:
            self._host[name] = int(getattr(self, name))
        return self._host[name]

    def _ema_update(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        d = self.config.decay
        self.cluster_size.mul_(d).add_(counts, alpha=1 - d)
        self.embed_sum.mul_(d).add_(sums, alpha=1 - d)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + EPS) / (n + self.num_codes * EPS) * n
        self._set_codes(self.embed_sum / smoothed[:, None])

    def _remember(self, z: torch.Tensor, generator: torch.Generator) -> None:
        """Write a random subset of this forward's encoder outputs into the ring of restart candidates."""
        size = self.config.buffer_size
        n = min(len(z), size)
        rows = torch.randperm(len(z), generator=generator, device=z.device)[:n]
        seen = self._host_count("recent_seen")
        self.recent[(seen + torch.arange(n, device=z.device)) % size] = z[rows]
        self.recent_seen += n
        self._host["recent_seen"] = seen + n

    def _restart(self, dead: torch.Tensor, generator: torch.Generator) -> None:
        """Move the dead codes (a (K,) mask) onto recent encoder outputs (rank 0's pick, broadcast), with fresh EMA
        state. Every code gets a candidate and only the dead ones take it: no host decision."""
        available = min(self._host["recent_seen"], self.config.buffer_size)
        pick = torch.randperm(available, generator=generator, device=self.recent.device)
        rank = (torch.cumsum(dead, 0) - 1).clamp_min(0)  # each dead code's place among the dead
        new = _broadcast(self.recent[pick[rank % available]])  # distinct vectors while there are enough
        self._set_codes(new, where=dead)
        # a revived code starts its EMA from itself: left stale, cluster_size and embed_sum would drag it back
        # to its old (dead) place at the next EMA step (a bug in several references)
        self.cluster_size.masked_fill_(dead, 1.0)
        self.embed_sum.copy_(torch.where(dead[:, None], self.embedding.weight.data, self.embed_sum))
        self.unused_for.masked_fill_(dead, 0)
        self.restarts += dead.sum()

    def _set_codes(self, values: torch.Tensor, where: torch.Tensor | None = None) -> None:
        """Write the codebook (K, D): all of it, or the rows where the (K,) mask `where` is True."""
        if self.normalize_codes:  # stored unit-norm, so the exported codebook is the one we look up in
            values = F.normalize(values, dim=1)
        # through .data: in "loss" mode this forward's graph saved the codebook (F.normalize), and the rows we
        # overwrite were unused in this forward, so their gradient is zero either way
        codes = self.embedding.weight.data
        codes.copy_(values if where is None else torch.where(where[:, None], values, codes))

    def statistics(self) -> dict[str, torch.Tensor]:
        """The training state outside state_dict (EMA, usage window, restart candidates), for checkpoints."""
        return {name: getattr(self, name).detach().clone() for name in _STATISTICS}

    def load_statistics(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `statistics()`; call it after loading the weights (a weight load resets the EMA state)."""
        missing = [name for name in _STATISTICS if name not in state]
        if missing:
            raise ValueError(f"quantizer statistics lack {missing}")
        for name in _STATISTICS:
            buffer = getattr(self, name)
            if state[name].shape != buffer.shape:  # e.g. window or buffer_size changed since the checkpoint
                shapes = f"{tuple(state[name].shape)} != {tuple(buffer.shape)}"
                raise ValueError(f"quantizer statistic {name}: shape {shapes}")
            buffer.copy_(state[name])
        self._host.clear()


def _restart_ema_from_loaded_codebook(module: VectorQuantizer, incompatible_keys) -> None:
    """After a weight load (from_pretrained, resume): EMA state of the loaded codebook, not the one it replaced."""
    with torch.no_grad():
        module.cluster_size.fill_(1.0)
        module.embed_sum.copy_(module.embedding.weight)
