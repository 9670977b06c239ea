"""Video input and output for ``aidkd predict`` through PyAV (``av``), whose wheels bundle FFmpeg and its codecs.

* :func:`iter_video_frames` decodes every frame of a video file as ``(name, PIL.Image RGB)``; names are
  ``<stem>_<frame index, 6 digits>`` so per-frame outputs sort in frame order.
* :func:`write_video` / :class:`VideoWriter` encode RGB ``uint8`` frames to H.264 (``libx264``, ``yuv420p``; MPEG-4
  Part 2 when the FFmpeg build lacks x264) in an ``.mp4``. Odd frame sizes are padded by one pixel (yuv420p needs
  even sizes); frames of another size than the first are refused.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".gif"}

__all__ = ["VIDEO_SUFFIXES", "VideoWriter", "count_frames", "iter_video_frames", "video_fps", "write_video"]


def _av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - av is a declared dependency
        raise ImportError("video input/output needs PyAV: pip install av") from e
    return av


def _open(path: Path):
    av = _av()
    if not path.exists():
        raise FileNotFoundError(f"video not found: {path}")
    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"{path}: not a readable video ({type(e).__name__}: {e})") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path}: the file has no video stream")
    return container


def iter_video_frames(path: str | Path) -> Iterator[tuple[str, Image.Image]]:
    """Every frame of the video at ``path`` as ``(f"{stem}_{index:06d}", RGB PIL image)``, in order."""
    path = Path(path)
    av = _av()
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        index = 0
        try:
            for frame in container.decode(stream):
                yield f"{path.stem}_{index:06d}", frame.to_image().convert("RGB")
                index += 1
        except av.error.FFmpegError as e:
            raise ValueError(f"{path}: decoding failed at frame {index} ({type(e).__name__}: {e})") from None
        if index == 0:
            raise ValueError(f"{path}: the video has no decodable frame")
    finally:
        container.close()


def video_fps(path: str | Path, default: float = 10.0) -> float:
    """The video's average frame rate (``default`` when the container does not say)."""
    container = _open(Path(path))
    try:
        rate = container.streams.video[0].average_rate or container.streams.video[0].guessed_rate
        return float(rate) if rate else float(default)
    finally:
        container.close()


def count_frames(path: str | Path) -> int:
    """Number of frames, by decoding them all (exact, unlike the container's header)."""
    container = _open(Path(path))
    try:
        return sum(1 for _ in container.decode(video=0))
    finally:
        container.close()


class VideoWriter:
    """Incremental encoder: ``with VideoWriter(path, fps) as w: w.write(frame)``; frames RGB uint8 (H, W, 3)."""

    def __init__(self, path: str | Path, fps: float = 10.0, crf: int = 20):
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.path = Path(path)
        self.fps = fps
        self.crf = crf
        self.frames = 0
        self._container = None
        self._stream = None
        self._size: tuple[int, int] | None = None
        self._tmp = self.path.with_name(self.path.stem + ".partial" + (self.path.suffix or ".mp4"))

    def _start(self, h: int, w: int) -> None:
        av = _av()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self._tmp), mode="w")
        rate = Fraction(self.fps).limit_denominator(1001)
        try:
            self._stream = self._container.add_stream("libx264", rate=rate)
            self._stream.options = {"crf": str(self.crf), "preset": "veryfast"}
        except (av.error.FFmpegError, ValueError):  # an FFmpeg build without x264
            self._stream = self._container.add_stream("mpeg4", rate=rate)
            self._stream.bit_rate = 4_000_000
        self._stream.width, self._stream.height = w + (w % 2), h + (h % 2)
        self._stream.pix_fmt = "yuv420p"
        self._size = (h, w)

    def write(self, frame: np.ndarray | Image.Image) -> None:
        av = _av()
        arr = np.asarray(frame.convert("RGB") if isinstance(frame, Image.Image) else frame)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"video frames must be HxWx3 RGB, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            raise ValueError(f"video frames must be uint8, got {arr.dtype}")
        h, w = arr.shape[:2]
        if self._container is None:
            self._start(h, w)
        elif (h, w) != self._size:
            raise ValueError(f"frame {self.frames} is {w}x{h} but the video is {self._size[1]}x{self._size[0]}")
        if h % 2 or w % 2:
            arr = np.pad(arr, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
        for packet in self._stream.encode(vf):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> Path:
        if self._container is None:
            raise ValueError(f"{self.path}: no frame to write")
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._container is not None:
            with contextlib.suppress(Exception):  # best effort on an error path
                self._container.close()
            self._container = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_video(path: str | Path, frames: Iterable[np.ndarray | Image.Image], fps: float = 10.0) -> Path:
    """Encode ``frames`` (RGB uint8 HxWx3 arrays or PIL images, all one size) to ``path`` (.mp4, H.264)."""
    writer = VideoWriter(path, fps=fps)
    with writer:
        for frame in frames:
            writer.write(frame)
    return writer.path
