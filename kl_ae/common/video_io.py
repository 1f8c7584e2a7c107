"""Reading and writing video files with PyAV (FFmpeg inside its wheel): probing, frame indices, clips, whole videos.

Frame numbers are presentation order: frame i is the packet with the i-th smallest timestamp. A file's index (its
timestamps, read by demuxing packets, never by decoding) is kept per process, so `read_clip` seeks to the keyframe at
or before its first frame, decodes forward and stops after its last: a clip costs its own frames, not the file's. A
file that cannot be used raises `Unusable` (one of `DECODE_ERRORS`) with a one-line reason: FFmpeg's errors by name,
"empty file", "no video stream", "no frames", "too short: ...", "truncated or corrupt: ...".
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from kl_ae.common.images import Unusable, resize_shorter

VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif"}


def list_videos(folder: Path) -> list[Path]:
    """Video files under `folder` (suffixes VIDEO_SUFFIXES, any case), recursively, sorted by relative path."""
    files = [p for p in Path(folder).rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    width: int
    height: int


@contextlib.contextmanager
def _opened(source) -> Iterator[tuple[av.container.InputContainer, av.video.stream.VideoStream]]:
    """(container, first video stream) of a path, bytes or {"bytes", "path"} row; FFmpeg's errors as Unusable."""
    if isinstance(source, dict):
        source = source["bytes"] if source.get("bytes") is not None else source["path"]
    if isinstance(source, bytes | bytearray):
        source = io.BytesIO(source)
    size = len(source.getbuffer()) if isinstance(source, io.BytesIO) else os.path.getsize(source)
    if size == 0:
        raise Unusable("empty file (0 bytes)")
    if isinstance(source, io.BytesIO):
        source.seek(0)
    try:
        with av.open(source if isinstance(source, io.BytesIO) else str(source), metadata_errors="ignore") as c:
            if not c.streams.video:
                raise Unusable("no video stream")
            yield c, c.streams.video[0]
    except av.FFmpegError as e:  # not all of them are OSError / ValueError; the message without the file name
        raise Unusable(f"{type(e).__name__}: {e.strerror}") from None


@dataclass(frozen=True)
class FrameIndex:
    """The presentation timestamps of a video's frames (sorted, in its stream's time base) and its frame size."""

    pts: np.ndarray  # int64 (frames,)
    time_base: Fraction
    width: int
    height: int

    @property
    def fps(self) -> float:
        span = float((int(self.pts[-1]) - int(self.pts[0])) * self.time_base)
        return (len(self.pts) - 1) / span if len(self.pts) > 1 and span > 0 else 0.0


def _index(source) -> FrameIndex:
    with _opened(source) as (c, s):
        # packets, not frames: demuxing reads the file but decodes nothing. Discarded packets (an edit list's
        # pre-roll) are never shown; B-frames make the packet order differ from the presentation order
        stamps = [p.pts if p.pts is not None else p.dts for p in c.demux(s) if p.size and not p.is_discard]
        if any(t is None for t in stamps):
            raise Unusable("packets without timestamps")
        if not stamps:
            raise Unusable("no frames")
        cc = s.codec_context
        return FrameIndex(np.unique(np.asarray(stamps, dtype=np.int64)), s.time_base, cc.width, cc.height)


@functools.lru_cache(maxsize=1024)
def _file_index(path: str, mtime_ns: int, size: int) -> FrameIndex:
    return _index(path)  # a bad file raises each time: its dataset remembers it instead


def frame_index(source) -> FrameIndex:
    """The frame index of a video (kept per process for files, keyed by their modification time and size)."""
    if isinstance(source, str | os.PathLike) and os.path.exists(source):
        st = os.stat(source)
        return _file_index(str(source), st.st_mtime_ns, st.st_size)
    return _index(source)


def probe_video(source) -> VideoInfo:
    """Frames, frame rate and size of a video from its header; frames are counted by demuxing packets (nothing is
    decoded) when the header lacks them. Raises `Unusable` for a file that is no video or has no frames."""
    with _opened(source) as (c, s):
        frames, rate = s.frames, s.average_rate or s.guessed_rate
        width, height = s.codec_context.width, s.codec_context.height
    if not frames or not rate:
        index = frame_index(source)
        frames, rate = len(index.pts), rate or index.fps
    if not frames:
        raise Unusable("no frames")
    return VideoInfo(frames, float(rate or 0.0), width, height)


def _decode(container, stream) -> Iterator[av.VideoFrame]:
    """Every frame decoded from the container's position on: the one place frames are decoded."""
    for packet in container.demux(stream):
        yield from packet.decode()


def _rgb(frame: av.VideoFrame, size: int | None) -> np.ndarray:
    if size is None:
        return frame.to_ndarray(format="rgb24")  # (H, W, 3)
    return np.asarray(resize_shorter(frame.to_image(), size))  # resized like images: PIL bicubic, antialiased


def read_frames(source, indices: Sequence[int], size: int | None = None) -> torch.Tensor:
    """Frames `indices` (presentation order, repeats allowed) -> uint8 (3, T, H, W), shorter side `size` if given.

    Seeks to the keyframe at or before the first, decodes forward and stops after the last; raises `Unusable`."""
    index = frame_index(source)
    if min(indices) < 0 or max(indices) >= len(index.pts):
        raise Unusable(f"too short: {len(index.pts)} frames, frame {max(indices)} wanted")
    wanted = {int(index.pts[i]) for i in indices}
    first, last = int(index.pts[min(indices)]), max(wanted)
    got: dict[int, np.ndarray] = {}
    for seek in (first > int(index.pts[0]), False):
        with _opened(source) as (c, s):
            if seek:
                c.seek(first, stream=s, backward=True, any_frame=False)
            for n, frame in enumerate(_decode(c, s)):
                pts = frame.pts if frame.pts is not None else frame.dts
                if n == 0 and seek and (pts is None or pts > first):
                    break  # the seek overshot (a demuxer that seeks roughly): decode from the start instead
                if pts in wanted:
                    got[pts] = _rgb(frame, size)
                if len(got) == len(wanted) or (pts is not None and pts > last):
                    break
        if got or not seek:
            break
    if len(got) < len(wanted):
        raise Unusable(f"truncated or corrupt: {len(wanted) - len(got)} of {len(wanted)} frames did not decode")
    x = np.stack([got[int(index.pts[i])] for i in indices])  # (T, H, W, 3)
    return torch.from_numpy(x).permute(3, 0, 1, 2).contiguous()  # (3, T, H, W)


def read_clip(source, start: int, num_frames: int, stride: int = 1, size: int | None = None) -> torch.Tensor:
    """Frames start, start + stride, ... (num_frames of them) -> uint8 (3, T, H, W); decodes only what they need."""
    if num_frames < 1 or stride < 1:
        raise ValueError(f"read_clip: num_frames and stride must be >= 1, got {num_frames}, {stride}")
    return read_frames(source, range(start, start + (num_frames - 1) * stride + 1, stride), size)


def read_video(source, max_frames: int | None = None, size: int | None = None) -> tuple[torch.Tensor, float]:
    """The first `max_frames` frames (all by default) -> (uint8 (3, T, H, W), frames per second)."""
    with _opened(source) as (c, s):
        rate = s.average_rate or s.guessed_rate
        frames = []
        for frame in _decode(c, s):
            frames.append(_rgb(frame, size))
            if len(frames) == max_frames:
                break
    if not frames:
        raise Unusable("no frames")
    x = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).contiguous()  # (3, T, H, W)
    return x, float(rate) if rate else frame_index(source).fps


def write_video(path: str | os.PathLike, frames: torch.Tensor, fps: float) -> Path:
    """Write frames, uint8 (3, T, H, W) or float in [-1, 1], as H.264 .mp4 (yuv420p, crf 18; an odd side loses its
    last row or column, as yuv420p needs even sides) or as an animated .gif (a palette per frame)."""
    path = Path(path)
    x = frames if frames.dtype == torch.uint8 else frames.float().add(1).mul(127.5).round().clamp(0, 255).byte()
    x = x.detach().cpu().permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)
    if path.suffix.lower() == ".gif":
        images = [Image.fromarray(f) for f in x]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        return path
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"write_video: {path.name}: write .mp4 (H.264) or .gif")
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    if h == 0 or w == 0:
        raise ValueError(f"write_video: frames of {x.shape[1]}x{x.shape[2]} are too small for yuv420p")
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:  # index first: playable while loading
        s = c.add_stream("libx264", rate=Fraction(fps).limit_denominator(10_000), options={"crf": "18"})
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for f in x:
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f[:h, :w]), format="rgb24")))
        c.mux(s.encode())
    return path


# ----------------------------------------------------------------------------- clips of a frame index


def clip_starts(index: FrameIndex, num_frames: int, stride: int = 1, fps: float | None = None) -> int:
    """How many first frames a clip may have; raises `Unusable` ("too short") when none."""
    n = len(index.pts)
    if fps is None:
        starts, need = n - (num_frames - 1) * stride, f"{(num_frames - 1) * stride + 1} frames at stride {stride}"
    else:
        span = (num_frames - 1) / (fps * index.time_base)  # the clip's duration in the stream's time base
        starts, need = int(np.searchsorted(index.pts, index.pts[-1] - float(span), "right")), f"{fps} fps"
    if starts < 1:
        raise Unusable(f"too short: {n} frames, a clip of {num_frames} needs {need}")
    return starts


def clip_indices(index: FrameIndex, start: int, num_frames: int, stride: int = 1, fps: float | None = None):
    """The frames of the clip that starts at frame `start`: every `stride`-th, or the nearest to each tick of `fps`."""
    if fps is None:
        return list(range(start, start + (num_frames - 1) * stride + 1, stride))
    ticks = int(index.pts[start]) + np.arange(num_frames) / (fps * float(index.time_base))
    after = np.clip(np.searchsorted(index.pts, ticks), 1, len(index.pts) - 1)
    nearer_before = ticks - index.pts[after - 1] <= index.pts[after] - ticks
    return (after - nearer_before).tolist()
