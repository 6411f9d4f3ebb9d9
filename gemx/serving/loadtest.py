"""`gemx loadtest`: how many real-time streams one server holds.

S simulated calls run at once, each a stream with its own references, each sending frames on a real-time
clock at `fps`. A call keeps one frame in flight: when a frame's time comes while the previous one is still
out, that frame is dropped (a live call skips it rather than fall behind), and a frame answered after
more than one frame interval is late. Each row reports achieved fps per stream, latency percentiles,
late and dropped frames and the server's key/value memory; the answer is the largest S at which every
stream keeps the target fps with p99 latency under the frame interval. A one-stream row of the same
export run in this process (no server) gives the serving overhead as a ratio measured in the same run.

Several servers (say, one repository written without batching and one with `--max-batch 8`) are measured in
one run, their rows interleaved so that a shared machine's noise falls on both alike. Each server row also
reports the model executions per second Triton ran and the mean number of requests each carried (Triton's
own inference statistics, read before and after the row).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gemx.errors import GemxError
from gemx.frames import sample_frames

KEEPS_UP = 0.95  # a stream keeps the target when it achieves at least this share of it
# When each call's frame clock starts within one frame interval. Real calls start at unrelated moments: jittered
# (call k of S at (k + u)/S of the interval, u uniform and seeded) is the headline; evenly spread (k/S) is the best
# case for a server that runs one frame at a time, all aligned (every call at 0) the worst.
PHASES = ("jittered", "even", "aligned")
CLIP_FRAMES = 64  # frames each simulated call draws its references and targets from


@dataclass
class LoadOptions:
    streams: list[int]
    fps: float = 25.0
    seconds: float = 10.0
    refs: int = 5
    video: Path | None = None  # an HR video to draw references and targets from (synthetic frames without one)
    repo: Path | None = None  # the repository the server serves: adds the in-process row
    size: tuple[int, int] | None = None  # HR (height, width) of every call; default: the model's training size
    phases: list[str] = field(default_factory=lambda: ["jittered"])  # see PHASES; the first decides max_streams
    seed: int = 0  # of the jittered phases

    def __post_init__(self) -> None:
        if not self.phases or any(p not in PHASES for p in self.phases):
            raise GemxError(f"--phases takes {', '.join(PHASES)}, got {', '.join(self.phases) or 'nothing'}")
        if not self.streams or min(self.streams) < 1:
            raise GemxError(f"--streams must be positive integers, got {self.streams}")
        if not self.fps > 0 or not self.seconds > 0:
            raise GemxError(f"--fps and --seconds must be positive, got {self.fps} and {self.seconds}")
        if self.refs < 1:
            raise GemxError(f"--refs must be at least 1, got {self.refs}")


@dataclass
class StreamStats:
    latencies_ms: list[float] = field(default_factory=list)
    late: int = 0
    dropped: int = 0
    errors: list[str] = field(default_factory=list)
    recoveries: int = 0
    server_kv_bytes: int = 0


@dataclass
class LoadRow:
    mode: str  # "server" or "in-process"
    streams: int
    fps_min: float  # the slowest stream's achieved fps
    fps_mean: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    late: int
    dropped: int
    errors: int
    server_kv_mb: float
    keeps_up: bool
    first_error: str = ""
    recoveries: int = 0  # streams healed by re-sending their references (eviction, a replica lost behind a balancer)
    phases: str = ""  # of a server row: how the calls' frame clocks were placed in the interval (PHASES)
    server: str = ""  # of a server row: its address and batching ("unbatched", "batch <= 8")
    executions_per_s: float = 0.0  # model executions Triton ran during the row
    mean_batch: float = 0.0  # requests per execution: the batches Triton formed


@dataclass
class LoadResult:
    urls: list[str]
    fps: float
    seconds: float
    refs: int
    frame_source: str
    rows: list[LoadRow]

    @property
    def servers(self) -> list[str]:
        return list(dict.fromkeys(r.server for r in self.rows if r.mode == "server"))

    def max_streams_of(self, server: str) -> int:
        """The largest stream count at which every stream of `server` kept up (0 if none did), with the first phases
        asked."""
        headline = next((r.phases for r in self.rows if r.mode == "server"), "")
        return max((r.streams for r in self.rows
                    if r.mode == "server" and r.server == server and r.phases == headline and r.keeps_up), default=0)

    @property
    def max_streams(self) -> int:
        """`max_streams_of` the first server."""
        return self.max_streams_of(self.servers[0]) if self.servers else 0

    @property
    def overhead(self) -> float | None:
        """Server p50 latency at one stream over the in-process p50, both from this run."""
        server = next((r for r in self.rows if r.mode == "server" and r.streams == 1), None)
        local = next((r for r in self.rows if r.mode == "in-process"), None)
        return server.p50_ms / local.p50_ms if server and local and local.p50_ms > 0 else None


def loadtest(urls: str | list[str], opts: LoadOptions, progress: Callable[[str], None] = lambda msg: None) -> LoadResult:
    from gemx.serving.client import RemoteStream, executions

    urls = [urls] if isinstance(urls, str) else list(urls)
    servers, contract = {}, None
    for url in urls:
        with RemoteStream(url) as probe:  # reachable, and which geometry and batching it serves
            if contract is not None and probe.contract.config != contract.config:
                raise GemxError(f"{url} serves another model than {urls[0]}; compare servers of one export")
            contract = probe.contract
            servers[url] = f"{url} ({f'batch <= {probe.max_batch}' if probe.batched else 'unbatched'})"
    frames, source = sample_frames(contract.config.size, CLIP_FRAMES, opts.video)  # timing does not depend on content
    if opts.size is not None and tuple(opts.size) != tuple(frames.shape[-2:]):  # calls from a camera of that geometry
        frames = torch.nn.functional.interpolate(frames, size=tuple(opts.size), mode="bilinear", align_corners=False).clamp(0, 1)
        source += f", resized to {opts.size[1]}x{opts.size[0]}"
    frames = frames.numpy()
    rows = []
    if opts.repo is not None:
        progress("1 stream in this process (no server)")
        rows.append(_in_process_row(opts, frames, contract))
    for phases in opts.phases:
        for s in opts.streams:
            for url, server in servers.items():
                progress(f"{server}: {s} concurrent stream(s) at {opts.fps:g} fps for {opts.seconds:g} s, {phases} phases")
                before, t0 = executions(url), time.monotonic()
                row = _server_row(url, s, opts, frames, contract.config.scale, phases)
                (runs, requests), elapsed = np.subtract(executions(url), before), time.monotonic() - t0
                row.server, row.executions_per_s, row.mean_batch = server, runs / elapsed, requests / max(runs, 1)
                rows.append(row)
    return LoadResult(urls, opts.fps, opts.seconds, opts.refs, source, rows)


def phase_offsets(streams: int, fps: float, phases: str, seed: int = 0) -> list[float]:
    """Seconds after the common start at which each call's frame clock starts, all within one frame interval."""
    interval = 1 / fps
    if phases == "aligned":
        return [0.0] * streams
    jitter = np.random.default_rng([seed, streams]).uniform(size=streams) if phases == "jittered" else np.zeros(streams)
    return [float((k + u) / streams * interval) for k, u in enumerate(jitter)]


def _server_row(url: str, streams: int, opts: LoadOptions, frames: np.ndarray, scale: int, phases: str) -> LoadRow:
    from gemx.serving.client import RemoteStream

    stats = [StreamStats() for _ in range(streams)]
    offsets = phase_offsets(streams, opts.fps, phases, opts.seed)
    start = [0.0]
    # Set by the last call to arrive, before any is released: all clocks start from one instant.
    ready = threading.Barrier(streams + 1, action=lambda: start.__setitem__(0, time.monotonic() + 0.05))

    def call(k: int) -> None:
        refs, targets = _call_frames(frames, k, opts.refs, scale)
        st = stats[k]
        try:
            with RemoteStream(url) as stream:
                stream.set_references(refs)
                stream(targets[0])  # connected, references encoded: the call is set up
                ready.wait()
                _paced(lambda i: stream(targets[i % len(targets)]), start[0] + offsets[k], opts, st)
                st.recoveries = stream.recoveries
                st.server_kv_bytes = stream.server_kv_bytes
        except threading.BrokenBarrierError:
            pass
        except GemxError as e:
            st.errors.append(str(e))
            ready.abort()

    threads = [threading.Thread(target=call, args=(k,), daemon=True) for k in range(streams)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait(timeout=120)
    for t in threads:
        t.join(timeout=opts.seconds + 180)
    row = _row("server", opts, stats)
    row.phases = phases
    return row


def _in_process_row(opts: LoadOptions, frames: np.ndarray, contract) -> LoadRow:
    from gemx.serving.repository import read_repository
    from gemx.serving.triton_model import open_stream_table

    repo = read_repository(opts.repo)
    if repo.export().config != contract.config:
        raise GemxError(f"{opts.repo} is not the repository this server serves (its model differs); pass the served one to --repo")
    # The server's own session settings (threads), without its limits: one stream never meets them.
    table = open_stream_table(repo, {**repo.parameters(), "kv_budget_bytes": str(2**40), "idle_timeout_s": "3600"})
    refs, targets = _call_frames(frames, 0, opts.refs, contract.config.scale)
    st = StreamStats()
    table.step(1, targets[0], references=refs, start=True)
    _paced(lambda i: table.step(1, targets[i % len(targets)]), time.monotonic(), opts, st)
    st.server_kv_bytes = table.nbytes
    table.session.close()
    return _row("in-process", opts, [st])


def _paced(send: Callable[[int], object], t0: float, opts: LoadOptions, st: StreamStats) -> None:
    """Send frame i at t0 + i/fps, one in flight; a frame whose time has passed by a whole interval is dropped."""
    interval, total = 1.0 / opts.fps, round(opts.seconds * opts.fps)
    i = 0
    while i < total:
        due = t0 + i * interval
        now = time.monotonic()
        if now < due:
            time.sleep(due - now)
        elif now - due >= interval:
            skipped = min(int((now - due) / interval), total - i)
            st.dropped += skipped
            i += skipped
            continue
        sent = time.monotonic()
        try:
            send(i)
        except GemxError as e:
            st.errors.append(str(e))
            st.dropped += 1
            i += 1
            continue
        latency = time.monotonic() - sent
        st.latencies_ms.append(latency * 1e3)
        st.late += latency > interval
        i += 1


def _row(mode: str, opts: LoadOptions, stats: list[StreamStats]) -> LoadRow:
    lat = np.concatenate([np.asarray(s.latencies_ms, float) for s in stats]) if stats else np.zeros(0)
    fps = [len(s.latencies_ms) / opts.seconds for s in stats]
    p50, p90, p99 = (float(np.percentile(lat, q)) if len(lat) else float("nan") for q in (50, 90, 99))
    errors = sum(len(s.errors) for s in stats)
    keeps_up = bool(len(lat)) and min(fps) >= KEEPS_UP * opts.fps and p99 < 1e3 / opts.fps and errors == 0
    first = next((s.errors[0] for s in stats if s.errors), "")
    return LoadRow(mode, len(stats), min(fps), float(np.mean(fps)), p50, p90, p99, sum(s.late for s in stats),
                   sum(s.dropped for s in stats), errors, max(s.server_kv_bytes for s in stats) / 2**20, keeps_up, first,
                   recoveries=sum(s.recoveries for s in stats))


def _call_frames(frames: np.ndarray, k: int, refs: int, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Call k's own references (every few frames from its own starting point) and LR targets."""
    import torch

    from gemx.model.lr import downsample

    n = len(frames)
    idx = [(k * 7 + j * max(1, n // (refs + 1))) % n for j in range(refs)]
    targets = downsample(torch.from_numpy(np.roll(frames, -k * 3, axis=0)[:32]), scale).numpy()
    return np.ascontiguousarray(frames[idx]), np.ascontiguousarray(targets[:, None])

