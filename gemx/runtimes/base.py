"""One session interface for every backend (after Polygraphy's runners).

    with open_session("ort", export_dir) as session:
        session.set_references(refs)      # [R, 3, H, W] float32 in [0, 1]: encoded once, cached
        frame_hr = session(target_lr)     # [1, 3, H/s, W/s] -> [1, 3, H, W], cached keys/values reused

    A server holding many streams keeps one cache per stream and runs their frames together:
        caches = [session.encode(refs) for refs in each_streams_references]
        frames_hr = session.decode_batch(targets, caches)   # one execution per frame size and reference count

The base class owns every check a user can fail (shapes, reference counts, call order) so that each
backend adapter only implements `_encode` and `_decode`, and no error reaches the user from deep
inside a runtime.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from gemx.contract import Contract, within
from gemx.errors import GemxError
from gemx.frames import as_array

# Resampled frames overshoot [0, 1] a little (bicubic ringing); 0-255 pixels are far outside.
PIXEL_SLACK = 0.25


@dataclass
class Cache:
    """One reference set's keys and values as the backend holds them, with the geometry they were encoded at."""

    kv: Any
    refs: int
    size: tuple[int, int]  # of the references as given (height, width): frames of this size over the scale go with it
    padded: tuple[int, int]  # on the grid, what the graphs ran at (edge-replicated below and right)
    nbytes: int


@dataclass
class FrameJob:
    """One checked frame with its stream's cache, padded to the cache's grid: what `Session.run` executes."""

    target: np.ndarray  # [1, 3, h, w] on the grid
    cache: Cache

    @property
    def group(self) -> tuple:
        """Frames run in one batch only with others of the same padded size and reference count."""
        return self.cache.padded, self.cache.refs


class Session(ABC):
    """Runs the split model: `set_references` once per reference set, then `__call__` per frame.

    Frames of any size work: references and targets off the block grid are padded to it by replicating their
    edges (below and right), and the output is cropped back, here, so every backend and the server agree. Edge
    replication continues the picture the way the blocks near the border see it (zeros would read as a black
    frame border the model never saw in training; a reflection doubles features back into the attention)."""

    name: str = "session"
    choice = None  # opened by `--runtime auto`: what was measured, and why this runtime and precision (gemx.runtimes.auto)

    def __init__(self, contract: Contract, max_refs: int | None, max_size: tuple[int, int] | None = None):
        self.contract = contract
        self.precision = contract.precision  # what it computes in (an OpenVINO bf16 session runs the fp32 contract)
        self.max_refs = max_refs
        self.max_size = tuple(max_size) if max_size else None  # the largest size the graphs were validated at
        self.max_batch: int | None = None  # the most frames one execution takes (a TensorRT engine's profile)
        self.executions = 0  # frame-graph runs: fewer than frames when frames of several streams ran together
        self.encoder_runs = 0  # how often references were encoded: caching means once per set
        self._kv: Cache | None = None
        self.num_references = 0

    # -- what every backend implements ---------------------------------------------------------
    @abstractmethod
    def _encode(self, references: np.ndarray) -> Any:
        """Encode references [R, 3, H, W] on the grid into a backend-native key/value cache."""

    @abstractmethod
    def _decode(self, target_lr: np.ndarray, kv: Any) -> np.ndarray:
        """Run the frame graph: target_lr [N, 3, h, w] on the grid against N caches stacked by `_stack` (or one
        cache as encoded, for N = 1); returns float32 [N, 3, H, W]."""

    def _stack(self, kvs: list[Any]) -> Any:
        """The caches of a batch's streams as the frame graph takes them: each tensor stacked on its first axis,
        stream after stream (the contract's `batch_kv`). Host caches (name -> array) here; backends holding
        their own cache objects stack those."""
        return {name: np.concatenate([kv[name] for kv in kvs]) for name in kvs[0]}

    def kv_nbytes(self) -> int:
        return self._kv.nbytes if self._kv is not None else 0

    def close(self) -> None:
        self._kv = None

    # -- the interface ---------------------------------------------------------------------------
    def encode(self, references: np.ndarray) -> Cache:
        """Check and encode one reference set into a key/value cache, without making it this session's own.

        A server holding many streams keeps one cache per stream and passes it to `decode`.
        """
        references = self._as_input(as_array(references, "references"), "references", "[refs, 3, H, W]", batch=None)
        r = references.shape[0]
        if r == 0:
            raise GemxError("no references given; pass at least one high-resolution reference frame")
        if self.max_refs is not None and r > self.max_refs:
            raise GemxError(f"{r} references exceed the {self.max_refs} this {self.name} session was exported/built for; "
                            f"use at most {self.max_refs}, or re-export with --max-refs {r} (and rebuild)")
        size = references.shape[-2:]
        scale = self.contract.config.scale
        if size[0] % scale or size[1] % scale:
            raise GemxError(f"references are {size[1]}x{size[0]}: width and height must be multiples of the scale {scale} "
                            f"(crop at most {scale - 1} pixels)")
        padded = self.padded(size, "references")
        kv = self._encode(pad_edges(references, padded))
        self.encoder_runs += 1
        return Cache(kv, r, size, padded, self.contract.kv_bytes(r, padded))

    def decode(self, target_lr: np.ndarray, cache: Cache) -> np.ndarray:
        """One frame against a cache from `encode`: frame_hr [1, 3, H, W] at the references' size."""
        return self.run([self.prepare(target_lr, cache)])[0]

    def decode_batch(self, targets: list[np.ndarray], caches: list[Cache]) -> list[np.ndarray]:
        """Frames of several streams, each against its own cache: the same frames as `decode` one by one, in as few
        executions as their geometry allows (streams of one frame size and reference count run together)."""
        if len(targets) != len(caches):
            raise GemxError(f"decode_batch takes one cache per frame, got {len(targets)} frames and {len(caches)} caches")
        jobs = []
        for k, (target_lr, cache) in enumerate(zip(targets, caches, strict=True)):
            try:
                jobs.append(self.prepare(target_lr, cache))
            except GemxError as e:
                raise GemxError(f"frame {k} of the batch: {e}") from None
        return self.run(jobs)

    def prepare(self, target_lr: np.ndarray, cache: Cache) -> FrameJob:
        """Check one frame against its cache from `encode` and pad it to the cache's grid (refused in one line)."""
        if not isinstance(cache, Cache):
            raise GemxError(f"decode takes a cache from this session's encode(), got {type(cache).__name__}")
        self._check_cache(cache.kv)
        target_lr = self._as_input(as_array(target_lr, "target_lr"), "target_lr", "[1, 3, h, w]", batch=1)
        scale = self.contract.config.scale
        (h, w), (hh, ww) = target_lr.shape[-2:], cache.size
        if (h * scale, w * scale) != (hh, ww):
            raise GemxError(f"target_lr is {w}x{h} but its references are {ww}x{hh}: send frames of the references' size over "
                            f"the scale {scale} ({ww // scale}x{hh // scale}), or set references of this frame's size")
        return FrameJob(pad_edges(target_lr, (cache.padded[0] // scale, cache.padded[1] // scale)), cache)

    def run(self, jobs: list[FrameJob]) -> list[np.ndarray]:
        """Each job's frame_hr [1, 3, H, W], cropped to its references' size. Jobs of one group (`FrameJob.group`)
        run as one batch of at most `max_batch` frames: one execution, whose fixed costs (dispatch, weights read,
        a server's per-call overhead) the frames share."""
        groups: dict[tuple, list[int]] = {}
        for k, job in enumerate(jobs):
            groups.setdefault(job.group, []).append(k)
        frames: list[np.ndarray | None] = [None] * len(jobs)
        step = self.max_batch or len(jobs)
        for members in groups.values():
            for start in range(0, len(members), step):
                batch = [jobs[k] for k in members[start:start + step]]
                if len(batch) == 1:
                    out = self._decode(batch[0].target, batch[0].cache.kv)
                else:
                    out = self._decode(np.concatenate([j.target for j in batch]), self._stack([j.cache.kv for j in batch]))
                self.executions += 1
                for row, (k, job) in enumerate(zip(members[start:start + step], batch, strict=True)):
                    (hh, ww), frame = job.cache.size, out[row:row + 1]
                    frames[k] = np.ascontiguousarray(frame[..., :hh, :ww]) if job.cache.padded != job.cache.size else frame
        return frames

    def padded(self, size: tuple[int, int], what: str = "references") -> tuple[int, int]:
        """The grid size (height, width) frames of `size` run at, refused in one line when the graphs cannot run it."""
        padded = self.contract.on_grid(size) if self.contract.any_size else self.contract.default_size
        if not self.contract.any_size and tuple(size) != padded:
            raise GemxError(f"{what} must be {padded[1]}x{padded[0]} for this {self.contract.config.arch} model "
                            f"(it attends over the whole frame), got {size[1]}x{size[0]}")
        if self.max_size and not within(padded, self.max_size):
            raise GemxError(f"{what} of {size[1]}x{size[0]} exceed the largest size this export was validated at, "
                            f"{self.max_size[1]}x{self.max_size[0]} (either orientation); re-export with --max-size "
                            f"{size[1]}x{size[0]}")
        return padded

    def _check_cache(self, kv: Any) -> None:
        """A host cache (name -> array) must be of this session's contract: one made by a session of another
        precision (an INT8 session's values are int8) is refused in one line, not by the runtime's type error."""
        if not isinstance(kv, dict):
            return  # a runtime's own cache object (device buffers, a torch ReferenceCache)
        for spec in self.contract.kv:
            value = kv.get(spec.name)
            if isinstance(value, np.ndarray) and value.dtype != np.dtype(spec.dtype):
                raise GemxError(f"this {self.contract.precision} session takes {spec.name} as {spec.dtype}, got {value.dtype}: "
                                "use a cache encoded by a session of the same precision")

    def set_references(self, references: np.ndarray) -> None:
        self._kv = self.encode(references)
        self.num_references = self._kv.refs

    def __call__(self, target_lr: np.ndarray) -> np.ndarray:
        if self._kv is None:
            raise GemxError("no references set: call set_references(frames) before running frames")
        return self.decode(target_lr, self._kv)

    def kv_bytes(self, refs: int, size: tuple[int, int] | None = None) -> int:
        """Bytes of one cache of `refs` references at a frame size (default: the training size), from the contract;
        a size the graphs cannot run is refused here, before anything is encoded."""
        return self.contract.kv_bytes(refs, self.padded(size) if size else None)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _as_input(x: np.ndarray, name: str, layout: str, batch: int | None) -> np.ndarray:
        """RGB frames [N, 3, H, W] (N = `batch` when given) of float pixels in [0, 1], as contiguous float32."""
        if x.ndim != 4 or x.shape[1] != 3 or (batch is not None and x.shape[0] != batch) or min(x.shape[2:]) < 1:
            raise GemxError(f"{name} must be float32 {layout} (RGB), got shape {list(x.shape)}")
        if not np.issubdtype(x.dtype, np.floating):
            raise GemxError(f"{name} must be float32 in [0, 1], got {x.dtype} (divide 8-bit pixels by 255)")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise GemxError(f"{name} holds NaN or Inf values; send float32 pixels in [0, 1]")
        if x.size and (x.min() < -PIXEL_SLACK or x.max() > 1 + PIXEL_SLACK):
            raise GemxError(f"{name} has values in [{x.min():.3g}, {x.max():.3g}]; send float32 pixels in [0, 1] "
                            "(divide 8-bit pixels by 255)")
        return x


def pad_edges(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[N, C, H, W] grown to `size` below and right by repeating the last row and column: how frames off the grid are
    padded (`Session`), and what anything feeding the graphs directly must do the same way."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    return np.ascontiguousarray(np.pad(x, ((0, 0), (0, 0), (0, size[0] - h), (0, size[1] - w)), mode="edge"))


def missing_backend(what: str, extra: str = "gpu") -> GemxError:
    return GemxError(f"{what}; install it with: pip install 'gemx[{extra}]'" if extra else what)


class SessionModel:
    """A session seen through the PyTorch model's split interface (`encode_references`, `attend_and_decode`), so
    code written for the model, such as `gemx eval`'s quality table, measures a deployed graph unchanged."""

    def __init__(self, session: Session, config):
        self.session, self.config = session, config

    def encode_references(self, refs_hr):
        import torch

        refs = refs_hr[0] if refs_hr.dim() == 5 else refs_hr
        return self.session.encode(refs.to(torch.float32).numpy())

    def attend_and_decode(self, target_lr, cache):
        import torch

        return torch.from_numpy(self.session.decode(target_lr.to(torch.float32).numpy(), cache))
