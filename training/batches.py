"""The trainer's batches, epoch by epoch, and where a resumed run picks them up.

Two kinds of source. A map-style table (a folder, `sample`, a downloaded hub dataset) goes through a DataLoader
that `accelerate` prepares: it shards the seeded shuffle over processes, and a resumed run skips the batches
of its epoch already seen (`batches_seen` in trainer_state.json). A stream (`kl_ae.common.stream`) is NOT prepared:
each process reads its own shards, so `accelerate`'s sharding of an iterable would split it twice. It goes
through a `torchdata` `StatefulDataLoader`, whose state (every worker's stream position) each process saves
in the checkpoint, and batches are moved to the device here. (`accelerate`'s own `use_stateful_dataloader`
writes every process's state to one file, `dl_state_dict.bin`, so it cannot hold per-process streams.)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator

import torch
from accelerate import Accelerator

from kl_ae.common.config import ConfigError, DataConfig

# torchdata 0.11 calls a torch API that recent torch versions deprecate, once per iterator
warnings.filterwarnings("ignore", message=".*set_vital.*is deprecated")


class EpochBatches:
    """A prepared map-style DataLoader: epoch `batches_seen // per_epoch`, resumed by skipping batches."""

    def __init__(self, accelerator: Accelerator, loader, dataset, per_epoch: int):
        self.accelerator, self.loader, self.dataset, self.per_epoch = accelerator, loader, dataset, per_epoch

    def epoch(self, batches_seen: int) -> Iterable[torch.Tensor]:
        epoch = batches_seen // self.per_epoch
        self.loader.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        skip = batches_seen - epoch * self.per_epoch
        return self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader

    def state_dict(self) -> dict | None:
        return None  # batches_seen says it all

    def load_state_dict(self, state: dict | None) -> None:
        pass


class StreamBatches:
    """This process's share of a stream (`kl_ae.common.stream.StreamImages`, or `StreamClips` of videos) through a
    StatefulDataLoader."""

    def __init__(self, dataset, cfg: DataConfig, device: torch.device, processes: int, seed: int):
        from torchdata.stateful_dataloader import StatefulDataLoader

        self.dataset, self.device, self.processes, self.workers = dataset, device, processes, cfg.num_workers
        self.loader = StatefulDataLoader(
            dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, drop_last=True,
            pin_memory=device.type == "cuda",
            # each iterator draws a base seed: from its own generator, not from the global RNG, whose state (the
            # posterior noise) a resumed run restores and must not see shifted by a draw the first run made elsewhere
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        self.number = 0  # epochs of the stream completed
        self.resumed = False

    def epoch(self, batches_seen: int) -> Iterator[torch.Tensor]:
        self.dataset.set_epoch(self.number)
        count = 0
        for _labels, x in self.loader:
            count += 1
            yield x.to(self.device, non_blocking=True)
        if count == 0 and not self.resumed:  # a whole epoch gave nothing: the next would neither
            raise ConfigError(
                f"data.source: this process's share of the stream has fewer than data.batch_size "
                f"({self.loader.batch_size}) usable images (clips) per DataLoader worker; see skipped.txt"
            )
        self.resumed = False
        self.number += 1

    def state_dict(self) -> dict:
        state = {"epoch": self.number, "loader": self.loader.state_dict()}
        return state | {"processes": self.processes, "workers": self.workers}

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            raise ConfigError("resume: the checkpoint holds no stream position (it was saved by a map-style run)")
        saved = (state["processes"], state["workers"])
        if saved != (self.processes, self.workers):
            raise ConfigError(
                f"resume: the stream position was saved by {saved[0]} process(es) with data.num_workers={saved[1]}; "
                f"resume with the same (now {self.processes}, {self.workers}) to continue at the same sample"
            )
        self.number = state["epoch"]
        self.loader.load_state_dict(state["loader"])
        self.resumed = True
