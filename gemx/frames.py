"""Frames, at the bottom of the house: reading video, the square crop/resize, tensor conversion, frame caches.

Training, export validation, calibration, video and serving all take their frames from here; nothing
here knows where a user keeps videos: commands and tests name their frames (`--frames`, `--videos`,
fixtures), and synthetic frames are the stated fallback where only numerics are checked.
Frames are uint8 RGB numpy arrays [H, W, 3]; tensors are float32 [..., 3, H, W] in [0, 1].
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from gemx.errors import GemxError
from gemx.fs import atomic_write, cache_root


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


def as_array(x: object, name: str) -> np.ndarray:
    """What the Python API takes as frames: a numpy array or a torch tensor (detached and moved to the CPU, so a
    tensor that requires grad or lives on a GPU is read, not refused); anything else is one GemxError."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise GemxError(f"{name} must be a numpy array or a torch tensor of float32 pixels in [0, 1], got {type(x).__name__}")


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in [0, 1]."""
    t = torch.from_numpy(np.array(frames, dtype=np.float32)).div_(255)  # a copy: cached frames are read-only
    return t.movedim(-1, -3).contiguous()


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """float [..., 3, H, W] in [0, 1] -> uint8 [..., H, W, 3]."""
    return frames.detach().clamp(0, 1).mul(255).round().byte().movedim(-3, -1).cpu().numpy()


def cached_frames(video: Path, size: int | None, cache_dir: Path | None = None, multiple: int = 1) -> np.ndarray:
    """The video's frames at size x size (centre square, resized), or with `size` None at the video's own geometry
    cropped below and right to a multiple of `multiple`; decoded on first use and memory-mapped afterwards."""
    video = Path(video)
    stat = video.stat()
    tag = size if size is not None else f"native{multiple}"
    key = hashlib.sha1(f"{video.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{tag}".encode()).hexdigest()[:12]
    path = (cache_dir or cache_root()) / "frames" / f"{video.stem}-{tag}-{key}.npy"
    if not path.exists():
        if size is None:
            frames = np.stack([f[: f.shape[0] - f.shape[0] % multiple, : f.shape[1] - f.shape[1] % multiple]
                               for f in iter_frames(video)])
        else:
            frames = np.stack([square_crop_resize(f, size) for f in iter_frames(video)])

        def save(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a path
                np.save(f, frames)

        atomic_write(path, save)
    return np.load(path, mmap_mode="r")


def sample_frames(size: int, count: int, video: Path | None = None) -> tuple[torch.Tensor, str]:
    """Frames to check numerics on: `count` spaced frames of `video` when the user names one, otherwise a
    deterministic smooth synthetic sequence (the stated fallback). Returns [count, 3, size, size] and the source."""
    if video is not None:
        raw = read_frames(video, limit=15 * count)
        picks = raw[np.linspace(0, len(raw) - 1, count).astype(int)]
        return to_tensor(np.stack([square_crop_resize(f, size) for f in picks])), Path(video).name
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(count, 3, max(size // 16, 2), max(size // 16, 2), generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (smooth + 0.05 * torch.rand(count, 3, size, size, generator=g)).clamp(0, 1), "synthetic frames"
