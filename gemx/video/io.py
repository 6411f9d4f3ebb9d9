"""Writing video with PyAV (reading lives in gemx.frames); frames are uint8 RGB numpy arrays [H, W, 3]."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}


def write_video(path: Path, frames: Iterator[np.ndarray], fps: Fraction, audio_from: Path | None = None,
                overwrite: bool = True) -> int:
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
        atomic_write(Path(path), write, overwrite=overwrite)
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
