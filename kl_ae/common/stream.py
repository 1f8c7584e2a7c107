"""Streamed training images: shards and hub datasets read by `datasets` streaming, split across processes and
DataLoader workers, resumable at the exact sample.

- Sources: shards (`kl_ae.common.shards`: webdataset `.tar` or `.parquet`, local patterns or URLs), always streamed;
  a hub dataset or a local hub-style folder with `data.streaming: true`. A stream has no held-out split:
  validation is the fixed set of `data.val_source`. `data.repeats` and `data.val_fraction` do not apply.
- Sharding: `datasets.distributed.split_dataset_by_node` gives each process whole shards when their number
  is a multiple of the process count (else every process reads every shard and keeps one sample in N), and
  `datasets` gives each DataLoader worker whole shards of its process's; `shard_plan` says how even that is.
- Order: `set_epoch` makes `datasets` reshuffle the shard order each epoch (seeded by the epoch; the file list
  itself is first permuted by the run's seed). The shuffle buffer is ours: `datasets`' own is not in its
  `state_dict` (its docs: "examples from shuffle buffers are lost when resuming"), so samples are read in
  blocks of `data.shuffle_buffer` (undecoded) and each block is yielded in an order seeded by (seed, epoch,
  process, worker, block).
- Exact resume: a worker's state is the `datasets` `state_dict` at the start of its current block plus how
  many samples of the block it has taken; a `torchdata` `StatefulDataLoader` collects the workers' states. A
  resumed run re-reads one block and continues at the same sample with the same crops: crops and flips are
  drawn from (seed, epoch, sample label) alone.
- Bad samples (undecodable, too large, no image member) are dropped and appended to the skip log as
  "<shard>:<key><TAB><reason>", once: a label already listed there is not written again.
- Video (`data.num_frames` > 1, `StreamClips`): video members (`.mp4`, `.webm`, ... or a `video` / bytes column, see
  `VIDEO_KEYS`) give clips, their first frame drawn from (seed, epoch, label) like the crop; `data.image_ratio` makes
  whole batches one-frame clips of a frame each, decided per batch of a worker by (seed, epoch, worker, batch), the
  same on every process. With `data.num_frames` == 1 a stream is read for its images only.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import datasets
import torch
from datasets.distributed import split_dataset_by_node

from kl_ae.common.config import ConfigError, DataConfig
from kl_ae.common.data import build_val, crop_flip, decode_resized
from kl_ae.common.images import DECODE_ERRORS, append_skips, check_size, read_skipped, reason
from kl_ae.common.shards import image_of, label_of, looks_like_hub_name, open_stream, shard_files, stable_seed
from kl_ae.common.video import clip_indices, clip_starts, frame_index, read_frames

log = logging.getLogger(__name__)


def is_stream(cfg: DataConfig) -> bool:
    """Whether `cfg.source` is read as a stream (shards, or `data.streaming`) rather than as a map-style table."""
    return cfg.streaming or shard_files(cfg.source) is not None


def shard_plan(num_shards: int, processes: int, workers: int) -> str:
    """One line on how `num_shards` spread over processes and their DataLoader workers, uneven cases named."""
    workers = max(1, workers)
    if num_shards % processes:
        return (
            f"data: {num_shards} shards do not divide over {processes} processes: each process reads every shard "
            f"and keeps 1 sample in {processes} (use a multiple of {processes} shards to read each shard once)"
        )
    local = num_shards // processes
    line = f"data: {num_shards} shards, {local} per process"
    if local < workers:
        return f"{line}; only {local} of the {workers} DataLoader workers per process get a shard (the others idle)"
    if local % workers:
        return f"{line}; uneven over {workers} DataLoader workers ({local // workers} or {local // workers + 1} each)"
    return f"{line}, {local // workers} per DataLoader worker"


class StreamImages(torch.utils.data.IterableDataset):
    """A process's share of a `datasets` stream -> (label, float32 (3, resolution, resolution) in [-1, 1]).

    `state_dict` / `load_state_dict` make it resumable under a `StatefulDataLoader` (see the module docstring).
    Set `skip_log` to a file to have each skipped sample appended to it.
    """

    def __init__(self, stream: datasets.IterableDataset, columns, cfg: DataConfig, seed: int, rank: int, source: str):
        self.stream, self.columns, self.source = stream, tuple(columns), source
        self.seed, self.rank, self.epoch = seed, rank, 0
        self.block = max(1, cfg.shuffle_buffer)
        self.shuffle = cfg.shuffle_buffer > 1
        self.resolution, self.resize = cfg.resolution, cfg.resize or cfg.resolution
        self.random_crop, self.hflip = cfg.random_crop, cfg.hflip
        self.min_side = cfg.resolution if cfg.small_images == "skip" else 0
        self.max_pixels = cfg.max_pixels
        self.skip_log: Path | None = None
        self._state: dict = {"epoch": 0, "stream": None, "block": 0, "taken": 0}
        self._resume: dict | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.stream.set_epoch(epoch)

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)

    def decode(self, example: dict) -> tuple[str, torch.Tensor]:
        """(label, uint8 (3, H, W) resized); raises one of DECODE_ERRORS for a bad sample."""
        value = image_of(example, self.columns)
        label = label_of(example, value, self.source)
        if value is None:
            raise _NoImage(label)
        try:
            return label, decode_resized(value, self.resize, self.max_pixels, self.min_side)
        except DECODE_ERRORS as e:
            raise _BadSample(label, reason(e)) from None

    def sample(self, example: dict, worker: int, yielded: int) -> tuple[str, torch.Tensor]:
        """(label, float (3, r, r) in [-1, 1]) of the `yielded`-th sample this worker yields; raises _BadSample."""
        label, x = self.decode(example)
        seed = stable_seed(self.seed, self.epoch, label)
        return label, crop_flip(x, self.resolution, self.random_crop, self.hflip, seed)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        start, self._resume = self._resume, None
        if start is not None and start["epoch"] != self.epoch:
            start = None  # a state of another epoch: this one starts at its beginning
        block, taken, block_start = (start["block"], start["taken"], start["stream"]) if start else (0, 0, None)
        yielded = start.get("yielded", 0) if start else 0  # StreamClips decides image batches by it
        self.stream.set_epoch(self.epoch)
        self.stream.load_state_dict(block_start)  # None: from the epoch's first sample
        self._state = {"epoch": self.epoch, "stream": block_start, "block": block, "taken": taken, "yielded": yielded}
        listed = set(read_skipped(self.skip_log)) if self.skip_log is not None else set()
        samples = iter(self.stream)
        while True:
            chunk = list(itertools.islice(samples, self.block))  # undecoded: a block costs its file bytes
            if not chunk:
                return
            after = self.stream.state_dict()  # where the next block starts
            order = list(range(len(chunk)))
            if self.shuffle:
                rng = torch.Generator().manual_seed(stable_seed(self.seed, self.epoch, self.rank, worker, block))
                order = torch.randperm(len(chunk), generator=rng).tolist()
            for n in range(taken, len(chunk)):
                self._state = {"epoch": self.epoch, "stream": block_start, "block": block, "taken": n + 1,
                               "yielded": yielded}  # fmt: skip
                try:
                    sample = self.sample(chunk[order[n]], worker, yielded)
                except _BadSample as e:
                    self._skip(e.label, e.reason, listed)
                    continue
                yielded += 1
                self._state["yielded"] = yielded  # the loader reads the state while this sample is out
                yield sample
            block, taken, block_start = block + 1, 0, after

    def _skip(self, label: str, why: str, listed: set[str]) -> None:
        if label in listed:  # seen in an earlier epoch, worker or process: it fails alike, and says so once
            return
        listed.add(label)
        log.warning("data: skipping %s: %s", label, why)
        if self.skip_log is not None:
            try:
                append_skips(self.skip_log, {label: why})
            except OSError as e:  # a full disk must not end the run
                log.warning("data: cannot write the skip log %s: %s", self.skip_log, e)


class StreamClips(StreamImages):
    """A process's share of a stream of videos -> (label, float32 clip (3, T, resolution, resolution) in [-1, 1]),
    or (3, 1, r, r) in the image batches of `data.image_ratio` (see the module docstring)."""

    def __init__(self, stream: datasets.IterableDataset, columns, cfg: DataConfig, seed: int, rank: int, source: str):
        super().__init__(stream, columns, cfg, seed, rank, source)
        self.num_frames, self.stride, self.fps = cfg.num_frames, cfg.frame_stride, cfg.fps
        self.image_ratio, self.batch_size = cfg.image_ratio, cfg.batch_size

    def is_still(self, worker: int, yielded: int) -> bool:
        # a worker's batch is `batch_size` consecutive samples it yields; not seeded by rank, so that the batches of
        # one step are of one kind on every process (each process's DataLoader takes its workers in turn)
        if self.image_ratio == 0:
            return False
        rng = torch.Generator().manual_seed(stable_seed(self.seed, self.epoch, worker, yielded // self.batch_size))
        return bool(torch.rand((), generator=rng) < self.image_ratio)

    def sample(self, example: dict, worker: int, yielded: int) -> tuple[str, torch.Tensor]:
        value = image_of(example, self.columns)
        label = label_of(example, value, self.source)
        if value is None:
            raise _BadSample(label, "no video member (none of the video columns / extensions)")
        still = self.is_still(worker, yielded)
        rng = torch.Generator().manual_seed(stable_seed(self.seed, self.epoch, label, "frames"))
        try:
            index = frame_index(value)
            check_size((index.width, index.height), self.max_pixels, self.min_side)
            if still:  # one frame: a one-frame clip
                frames = [int(torch.randint(len(index.pts), (), generator=rng))]
            else:
                starts = clip_starts(index, self.num_frames, self.stride, self.fps)
                start = int(torch.randint(starts, (), generator=rng))
                frames = clip_indices(index, start, self.num_frames, self.stride, self.fps)
            x = read_frames(value, frames, self.resize)  # uint8 (3, T, H, W)
        except DECODE_ERRORS as e:
            raise _BadSample(label, reason(e)) from None
        seed = stable_seed(self.seed, self.epoch, label)
        return label, crop_flip(x, self.resolution, self.random_crop, self.hflip, seed)  # (3, T, r, r)


class _BadSample(Exception):
    def __init__(self, label: str, reason: str):
        super().__init__(f"{label}: {reason}")
        self.label, self.reason = label, reason


class _NoImage(_BadSample):
    def __init__(self, label: str):
        super().__init__(label, "no image member (none of the image columns / extensions)")


def stream_source(cfg: DataConfig, seed: int) -> tuple[datasets.IterableDataset, tuple[str, ...]]:
    """The whole stream of `cfg.source` (shard file order permuted by `seed`), with its image (video) columns."""
    video = cfg.num_frames > 1
    shards = shard_files(cfg.source)
    if shards is None:
        folder = Path(cfg.source).expanduser()
        if cfg.source == "sample" or not (folder.is_dir() or looks_like_hub_name(cfg.source)):
            raise ConfigError(
                f"data.streaming: {cfg.source!r} is not a hub dataset name or a local hub-style folder; "
                "folders of images and 'sample' are read in place (data.streaming: false)"
            )
        return open_stream(cfg.source, cfg.image_column, cfg.hub_split, video=video)
    return open_stream(cfg.source, cfg.image_column, cfg.hub_split, shuffle_files=seed, video=video)


def build_stream(
    cfg: DataConfig, seed: int, rank: int, world: int
) -> tuple[StreamImages | StreamClips, torch.utils.data.Dataset, str]:
    """(this process's training stream, the fixed validation set of `data.val_source`, a line on the sharding)."""
    cfg.validate()
    if cfg.val_source is None:
        raise ConfigError(
            "data.val_source: a streamed source holds nothing out; name a fixed validation set "
            "(a folder, 'sample', shards, or a hub dataset 'name:split')"
        )
    stream, columns = stream_source(cfg, seed)
    plan = shard_plan(stream.num_shards, world, cfg.num_workers)
    if cfg.repeats != 1:
        plan += f"\ndata: data.repeats={cfg.repeats} does not apply to a stream (each epoch reads every sample once)"
    stream = split_dataset_by_node(stream, rank=rank, world_size=world)
    train = (StreamClips if cfg.num_frames > 1 else StreamImages)(stream, columns, cfg, seed, rank, cfg.source)
    try:
        val = build_val(cfg, seed)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    return train, val, plan
