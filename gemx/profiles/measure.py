"""Timing and memory measurement primitives: warm-up, then repeated timed calls."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Timing:
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    iters: int

    @property
    def fps(self) -> float:
        return 1000.0 / self.p50_ms if self.p50_ms > 0 else float("inf")


def time_calls(fn: Callable[[], object], warmup: int, iters: int, seconds: float | None = None) -> Timing:
    """Run `fn` `warmup` times untimed, then `iters` times (or for `seconds`, at least 3 times) timed."""
    for _ in range(warmup):
        fn()
    samples = []
    deadline = time.perf_counter() + seconds if seconds else None
    while (len(samples) < iters) if deadline is None else (time.perf_counter() < deadline or len(samples) < 3):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    a = np.asarray(samples)
    return Timing(float(a.min()), *(float(np.percentile(a, q)) for q in (50, 90, 99)), len(a))


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_now() -> int | None:
    """The process's resident memory now, in bytes (Linux)."""
    return _status_kb("VmRSS")


def release_freed_memory() -> None:
    """Give memory freed by earlier sessions back to the OS (glibc's malloc_trim), so the next session's
    allocations show up as resident growth instead of silently reusing the freed pages."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_rss_delta(fn: Callable[[], object], baseline: int | None = None) -> int | None:
    """Peak resident memory during `fn` above `baseline` (default: the RSS just before), in bytes.

    Resets the kernel's high-water mark first (clear_refs), so the figure is this call's own peak;
    None where it cannot be measured (not Linux).
    """
    before = rss_now() if baseline is None else baseline
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return None
    fn()
    peak = _status_kb("VmHWM")
    return None if before is None or peak is None else max(peak - before, 0)


def device_memory_used() -> int | None:
    """Bytes in use on the first CUDA device (driver-wide), or None without a GPU."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        if cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) != 0:
            return None
        return total.value - free.value
    except OSError:
        return None
