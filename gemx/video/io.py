"""Reading and writing video with PyAV; frames are uint8 RGB numpy arrays [H, W, 3]."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from gemx.errors import GemxError


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: Fraction
    frames: int  # as the container reports it; 0 when unknown
    has_audio: bool


def _open(path: Path):
    import av

    path = Path(path)
    if not path.exists():
        raise GemxError(f"video {path} does not exist")
    try:
        container = av.open(str(path))
    except Exception as e:  # PyAV raises many error types for unreadable files
        raise GemxError(f"cannot read video {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not container.streams.video:
        container.close()
        raise GemxError(f"{path} has no video stream")
    return container


def probe(path: Path) -> VideoInfo:
    with _open(path) as c:
        s = c.streams.video[0]
        fps = s.average_rate or s.guessed_rate or Fraction(25)
        return VideoInfo(s.codec_context.width, s.codec_context.height, Fraction(fps), s.frames or 0, bool(c.streams.audio))


def iter_frames(path: Path) -> Iterator[np.ndarray]:
    """Every decoded frame of the first video stream, as RGB uint8."""
    with _open(path) as c:
        try:
            for frame in c.decode(video=0):
                yield frame.to_ndarray(format="rgb24")
        except Exception as e:
            if type(e).__module__.startswith("av"):
                raise GemxError(f"video {path} is corrupt or truncated ({e})") from None
            raise


def read_frames(path: Path, limit: int | None = None) -> np.ndarray:
    frames = []
    for frame in iter_frames(path):
        frames.append(frame)
        if limit is not None and len(frames) >= limit:
            break
    if not frames:
        raise GemxError(f"video {path} contains no decodable frames")
    return np.stack(frames)


def square_crop_resize(frame: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop, then resize to size x size (Lanczos). Talking-head framings put the face
    near the centre, so the centre square keeps it; portrait videos lose the top and bottom."""
    from PIL import Image

    h, w = frame.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = frame[top:top + side, left:left + side]
    if side == size:
        return np.ascontiguousarray(crop)
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.LANCZOS))


CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}


def write_video(path: Path, frames: Iterator[np.ndarray], fps: Fraction, audio_from: Path | None = None) -> int:
    """Encode RGB frames as H.264 (yuv420p) into `path` atomically, copying the audio of `audio_from` if any.

    Returns the number of frames written; nothing is left at `path` when no frame came.
    """
    from gemx.fs import atomic_write

    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        count = _encode(tmp, CONTAINERS[Path(path).suffix.lower()], frames, fps, audio_from)
        if count == 0:
            raise _NoFrames

    try:
        atomic_write(Path(path), write)
    except _NoFrames:
        return 0
    return count


class _NoFrames(Exception):
    pass


def _encode(path: Path, container: str, frames: Iterator[np.ndarray], fps: Fraction, audio_from: Path | None) -> int:
    import av

    count = 0
    with av.open(str(path), mode="w", format=container) as out, contextlib.ExitStack() as stack:
        stream = out.add_stream("libx264", rate=fps)
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        # Every stream must exist before the first packet is muxed (the header is written then).
        audio_in = audio_out = None
        if audio_from is not None:
            src = stack.enter_context(av.open(str(audio_from)))
            if src.streams.audio:
                audio_in = src.streams.audio[0]
                audio_out = out.add_stream_from_template(audio_in)
        for frame in frames:
            if count == 0:
                stream.height, stream.width = frame.shape[:2]
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
            count += 1
        for packet in stream.encode():
            out.mux(packet)
        if audio_in is not None and count:
            for packet in audio_in.container.demux(audio_in):
                if packet.dts is None:
                    continue
                packet.stream = audio_out
                out.mux(packet)
    return count
