"""Many streams on one session: each stream's key/value cache, encoded once, bounded in time and bytes.

A video call is a stream (a Triton sequence). Its references are encoded once when they arrive and the
cache stays here, never travelling with a frame. Caches are freed when the stream ends, when it has been
silent for `idle_timeout_s` (Triton does not tell the model when it drops an idle sequence), and, least
recently used first, when a new cache would take the total past `budget_bytes`. A frame for a stream
whose cache is gone is refused with a message that asks the client to send references again.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gemx.errors import GemxError
from gemx.runtimes.base import FrameJob, Session

# Clients look for this phrase to re-send references by themselves (gemx stream does).
RESEND = "send references again"
_FORGET_AFTER = 4096  # how many gone streams are remembered, to say why each went


class ReferencesNeeded(GemxError):
    """The stream has no cache here (never had one, evicted, or the server restarted)."""


@dataclass
class Request:
    """One request of a stream, as Triton's sequence batcher hands it over."""

    stream_id: int
    target_lr: np.ndarray | None = None
    references: np.ndarray | None = None
    start: bool = False
    end: bool = False


@dataclass
class _Stream:
    kv: Any
    nbytes: int
    refs: int
    last_used: float


class StreamTable:
    """Per-stream caches over one `Session`; thread-safe (Triton may call from several threads)."""

    def __init__(self, session: Session, budget_bytes: int, idle_timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self.session = session
        self.budget_bytes = budget_bytes
        self.idle_timeout_s = idle_timeout_s
        self.clock = clock
        self.evictions = {"ended": 0, "idle": 0, "budget": 0}
        self._streams: OrderedDict[int, _Stream] = OrderedDict()  # least recently used first
        self._gone: OrderedDict[int, str] = OrderedDict()
        self._lock = threading.Lock()

    # -- what a request does ---------------------------------------------------------------------
    def step(self, stream_id: int, target_lr: np.ndarray | None, references: np.ndarray | None = None,
             start: bool = False, end: bool = False) -> np.ndarray | None:
        """Handle one request of a stream: new references if any, then the frame if any."""
        result, = self.step_batch([Request(stream_id, target_lr, references, start, end)])
        if isinstance(result, GemxError):
            raise result
        return result

    def step_batch(self, requests: list[Request]) -> list[np.ndarray | GemxError | None]:
        """Handle the requests of one execution, each answered on its own: its frame, None, or its error.

        Each request's bookkeeping (a new stream, new references, its end) happens in order; then every frame runs,
        frames of one size and reference count as one batch (`Session.run`). A frame holds its stream's cache from
        the moment its request is read, so a later request of the same execution that evicts the stream (the byte
        budget) or ends it does not take the cache from under it; a request read after the eviction is told to
        send references again. A bad request fails alone."""
        results: list[np.ndarray | GemxError | None] = [None] * len(requests)
        with self._lock:
            self._expire_locked()
            jobs, owners = [], []
            for k, request in enumerate(requests):
                try:
                    job = self._admit_locked(request)
                    if job is not None:
                        jobs.append(job)
                        owners.append(k)
                except GemxError as e:
                    results[k] = e
                finally:
                    if request.end:
                        self._drop_locked(request.stream_id, "ended")
            if jobs:
                try:
                    frames = self.session.run(jobs)
                except GemxError as e:  # the runtime refused the execution: every frame in it gets the reason
                    frames = [e] * len(jobs)
                for k, frame in zip(owners, frames, strict=True):
                    results[k] = frame
        return results

    def _admit_locked(self, request: Request) -> FrameJob | None:
        """One request's bookkeeping, then its frame checked against its stream's cache (None without a frame)."""
        stream_id = request.stream_id
        if request.start:
            self._drop_locked(stream_id, None)  # a new sequence never inherits an old cache
            if request.references is None:
                raise GemxError(f"stream {stream_id}: the first request of a stream must carry `references` "
                                "(float32 [refs, 3, H, W] in [0, 1])")
        if request.references is not None:
            self._set_locked(stream_id, request.references)
        if request.target_lr is None:
            return None
        stream = self._streams.get(stream_id)
        if stream is None:
            raise ReferencesNeeded(f"stream {stream_id} has no references on this server "
                                   f"({self._gone.get(stream_id, 'never sent, or the server restarted')}); {RESEND}")
        self._streams.move_to_end(stream_id)
        stream.last_used = self.clock()
        return self.session.prepare(request.target_lr, stream.kv)

    def expire(self) -> int:
        """Drop streams idle for longer than the timeout; returns how many went."""
        with self._lock:
            return self._expire_locked()

    # -- what the server reports -----------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._streams.values())

    def __len__(self) -> int:
        return len(self._streams)

    def __contains__(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def clear(self) -> None:
        with self._lock:
            self._streams.clear()

    # -- the bookkeeping -------------------------------------------------------------------------
    def _set_locked(self, stream_id: int, references: np.ndarray) -> None:
        refs = len(references) if np.ndim(references) == 4 else 0
        size = tuple(np.shape(references)[-2:]) if np.ndim(references) == 4 and min(np.shape(references)[-2:]) > 0 else None
        nbytes = self.session.kv_bytes(refs, size)  # at the stream's own size: a 720p call holds 15x a 256x256 one
        if nbytes > self.budget_bytes:
            raise GemxError(f"stream {stream_id}: {refs} references need {nbytes / 2**20:.1f} MB of keys/values, over this "
                            f"server's budget of {self.budget_bytes / 2**20:.1f} MB; send fewer references")
        kv = self.session.encode(references)  # checks shape, size, range and count before anything is evicted
        nbytes = kv.nbytes
        self._drop_locked(stream_id, None)
        while self._streams and self.nbytes + nbytes > self.budget_bytes:
            oldest = next(iter(self._streams))
            self._drop_locked(oldest, f"evicted by the {self.budget_bytes / 2**20:.0f} MB key/value budget")
            self.evictions["budget"] += 1
        self._streams[stream_id] = _Stream(kv, nbytes, refs, self.clock())
        self._gone.pop(stream_id, None)

    def _expire_locked(self) -> int:
        now = self.clock()
        idle = [sid for sid, s in self._streams.items() if now - s.last_used > self.idle_timeout_s]
        for sid in idle:
            self._drop_locked(sid, f"evicted after {self.idle_timeout_s:g} s without frames")
            self.evictions["idle"] += 1
        return len(idle)

    def _drop_locked(self, stream_id: int, why: str | None) -> None:
        if self._streams.pop(stream_id, None) is not None and why == "ended":
            self.evictions["ended"] += 1
        if why is not None:
            self._gone[stream_id] = why if why != "ended" else "the stream ended"
            self._gone.move_to_end(stream_id)
            while len(self._gone) > _FORGET_AFTER:
                self._gone.popitem(last=False)
