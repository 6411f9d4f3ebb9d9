"""`gemx profile`: what each reference count, block size and runtime costs, measured.

For each block size the checkpoint is exported (into a cache, reused across runs) and built for
this machine; for each runtime and reference count the one-time reference encoding and the
per-frame attend+decode step are timed separately, with the KV cache size, peak memory and the
graph's FLOPs. A "naive" row times the full PyTorch model re-encoding the references every frame,
as a user without the split would run it. Ctrl-C stops the sweep and keeps the rows measured so far.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from gemx.contract import COMPUTE_PRECISIONS, graph_precision
from gemx.contract import PRECISIONS as GRAPH_PRECISIONS
from gemx.errors import GemxError, check_positive
from gemx.exporter.cache import cached_export
from gemx.exporter.manifest import read_export_dir
from gemx.frames import sample_frames
from gemx.metrics import psnr_db
from gemx.model.checkpoint import load_checkpoint
from gemx.model.lr import downsample
from gemx.model.network import with_block_size
from gemx.profiles.flops import graph_cost
from gemx.profiles.machine import gemm_peaks, machine_info
from gemx.profiles.measure import device_memory_used, peak_rss_delta, release_freed_memory, rss_now, time_calls
from gemx.runtimes.base import pad_edges
from gemx.runtimes.registry import RUNTIME_PRECISIONS, available_runtimes, open_session, resolve_runtime


@dataclass
class ProfileOptions:
    refs: list[int] = field(default_factory=lambda: [1, 2, 5, 10])
    block_sizes: list[int] | None = None  # default: the checkpoint's and twice it
    runtimes: list[str] = field(default_factory=lambda: default_runtimes())
    precisions: list[str] = field(default_factory=lambda: ["fp32"])  # a sweep axis: fp32, bf16 (openvino), int8, fp16 (GPU)
    warmup: int = 3
    iters: int = 20
    seconds: float | None = None
    threads: int | None = None
    cache_dir: Path | None = None
    naive: bool = True
    ops: bool = False  # also break ORT CPU per-frame kernel time down by op type
    frames: Path | None = None  # a video: references and targets from it, and quality against its HR frames
    calib: list[Path] = field(default_factory=list)  # INT8 calibration videos (the shipped checkpoint needs none)
    sizes: list[tuple[int, int]] | None = None  # HR (height, width) per row; default: the training size
    memory: bool = True  # each CPU session's peak memory, in a fresh interpreter (a few seconds per runtime and precision)

    def __post_init__(self) -> None:
        check_positive(iters=self.iters, threads=self.threads)
        if not self.refs:
            raise GemxError("--refs needs at least one reference count")
        for name, values in (("refs", self.refs), ("block_sizes", self.block_sizes or [])):
            for value in values:
                check_positive(**{name: value})
        known = (*GRAPH_PRECISIONS, *COMPUTE_PRECISIONS)
        unknown = [p for p in self.precisions if p not in known]
        if unknown or not self.precisions:
            raise GemxError(f"--precision takes {', '.join(known)}, got {', '.join(self.precisions) or 'nothing'}")
        if self.warmup < 0 or (self.seconds is not None and not self.seconds > 0):
            raise GemxError(f"--warmup must be 0 or more and --seconds positive, got {self.warmup} and {self.seconds}")


@dataclass
class ProfileRow:
    block_size: int
    runtime: str
    precision: str
    refs: int
    stage: str  # "encode" (once per reference set), "frame" (per frame), "naive" (full model per frame)
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    fps: float
    iters: int
    peak_memory_bytes: int | None
    memory_kind: str  # "rss over pre-session, own process" on the CPU, "device over pre-session" on a GPU
    kv_cache_bytes: int
    flops: int
    params: int
    psnr_vs_fp32_db: float | None = None  # this row's frame against the FP32 PyTorch/ORT frame (same inputs)
    psnr_vs_truth_db: float | None = None  # with --frames: against the video's own HR frame
    height: int = 0  # of the HR frame this row ran at (the session pads it to the grid)
    width: int = 0


@dataclass
class ProfileResult:
    rows: list[ProfileRow]
    machine: dict
    checkpoint: str
    interrupted: bool = False
    ops: list[dict] = field(default_factory=list)  # with --ops: {block_size, precision, refs, ms_per_frame, nodes, layout_share}

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "machine": self.machine, "interrupted": self.interrupted,
                "rows": [asdict(r) for r in self.rows], "ops": self.ops}


def default_runtimes() -> list[str]:
    """torch and ONNX Runtime, and OpenVINO where it is installed."""
    from gemx.runtimes.registry import runtime_available

    return ["torch", "ort"] + (["openvino"] if runtime_available("openvino")[0] else [])


def _runs_here(runtime: str, precision: str) -> bool:
    from gemx.runtimes.cpu import bf16_native

    return precision in RUNTIME_PRECISIONS[runtime] and (precision != "bf16" or bf16_native()[0])


def default_block_sizes(block: int, level: int) -> list[int]:
    return [block] + ([block * 2] if level % (block * 2) == 0 else [])


def profile(source: Path | None, opts: ProfileOptions, progress=lambda msg, advance=0: None,
            on_total=lambda total: None) -> ProfileResult:
    """plan (what runs here, refused before any export) -> prepare (exports, then per block size and frame size the
    frames, the FP32 frames quality is measured against, the graphs' cost) -> measure (each runtime and precision,
    then the naive row)."""
    combos = plan(opts)
    exports, model = _exports_for(source, opts, progress)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    result = ProfileResult([], machine_info(opts.threads), str(source or "shipped default checkpoint"))
    on_total(len(exports) * len(opts.sizes or [None]) * len(opts.refs) * (len(combos) + opts.naive))
    try:
        for block, path in exports.items():
            for point in prepare(block, path, model, opts):
                for runtime, precision in combos:
                    _measure_combo(point, runtime, precision, source, opts, result, progress)
                if opts.naive and point.model is not None:
                    for refs in opts.refs:
                        flops = point.costs[refs]["reference_encoder"]["flops"] + point.costs[refs]["frame"]["flops"]
                        frames = _padded(point.frames, point.contract)
                        result.rows.append(_naive_row(point.model, block, refs, frames, opts, flops, point.size))
                        progress(f"{point.where} naive {refs} refs", advance=1)
    except KeyboardInterrupt:
        result.interrupted = True
    if result.machine["gemm_peak_gmacs"] and not result.interrupted:
        result.machine["gemm_peak_gmacs"] = _best(result.machine["gemm_peak_gmacs"], gemm_peaks(opts.threads))
    return result


def _best(*peaks: dict[str, float]) -> dict[str, float]:
    """The roof is what the CPU reached: measured at the start and again at the end of a run, the higher of the two
    (a shared machine busy at one moment only lowers it)."""
    return {p: max(peak.get(p, 0.0) for peak in peaks) for p in peaks[0]}


def plan(opts: ProfileOptions) -> list[tuple[str, str]]:
    """The (runtime, precision) pairs to measure: those asked for that this machine runs."""
    runtimes = list(dict.fromkeys(r for name in opts.runtimes  # auto: every runtime this machine has
                                  for r in (available_runtimes() if name == "auto" else [resolve_runtime(name)])))
    combos = [(rt, p) for rt in runtimes for p in opts.precisions if _runs_here(rt, p)]
    if not combos:
        asked = ", ".join(f"{p} ({'/'.join(r for r in RUNTIME_PRECISIONS if p in RUNTIME_PRECISIONS[r])})" for p in opts.precisions)
        raise GemxError(f"none of --runtime {', '.join(runtimes)} runs --precision {asked} on this machine")
    return combos


@dataclass
class SweepPoint:
    """One block size at one frame size: everything its rows share."""
    block: int
    path: Path  # the export
    contract: object
    model: object  # the PyTorch model at this block size (None when profiling an export directory)
    size: tuple[int, int]  # HR (height, width)
    frames: torch.Tensor  # [1 + max refs, 3, H, W]: the target's HR frame, then the references
    target: np.ndarray  # the LR target
    fp32_frames: dict[int, np.ndarray]  # per reference count: the FP32 frame every row's quality is measured against
    costs: dict[int, dict[str, dict]]  # per reference count and graph: FLOPs and parameters

    @property
    def where(self) -> str:
        return f"b{self.block} {self.size[1]}x{self.size[0]}"


def prepare(block: int, path: Path, model, opts: ProfileOptions):
    """The sweep points of one export, one per frame size."""
    export_dir = read_export_dir(path)
    max_refs = max(opts.refs)
    if max_refs > export_dir.max_refs:
        raise GemxError(f"--refs up to {max_refs} exceeds the export's {export_dir.max_refs}")
    cfg, contract = export_dir.config, export_dir.contract()
    block_model = with_block_size(model, block) if model is not None else None
    video, _ = sample_frames(cfg.size, max_refs + 1, opts.frames)
    for size in opts.sizes or [contract.default_size]:
        frames = _at_size(video, size)
        target = downsample(frames[:1], cfg.scale).numpy()
        dims = contract.dims(contract.on_grid(size))  # what the graphs run at: the size padded to the grid
        costs = {refs: {g: graph_cost(export_dir.graph_path(g), refs, dims) for g in ("reference_encoder", "frame")}
                 for refs in opts.refs}  # per graph and reference count, the same for every runtime
        yield SweepPoint(block, path, contract, block_model, tuple(size), frames, target,
                         _fp32_frames(path, block_model, frames, target, opts.refs), costs)


def _measure_combo(point: SweepPoint, runtime: str, precision: str, source: Path | None, opts: ProfileOptions,
                   result: ProfileResult, progress) -> None:
    """One runtime and precision at one sweep point: encode and frame rows per reference count (and op rows)."""
    on_cpu = runtime in ("torch", "ort", "openvino")
    mem_kind = "rss over pre-session, own process" if on_cpu else "device over pre-session"
    cpu_memory = dict.fromkeys(opts.refs)
    max_refs = max(opts.refs)
    if on_cpu and opts.memory:  # in a fresh interpreter: here, memory an earlier session freed would be reused unseen
        progress(f"{point.where} {runtime} {precision} memory")
        cpu_memory = _cpu_memory(_MemoryProbe(runtime, point.path, precision, opts.threads, source, point.block, opts.refs,
                                              point.frames[1:max_refs + 1].numpy(), point.target))
    base = None if on_cpu else device_memory_used()
    session = open_session(runtime, point.path, precision, opts.threads, model=point.model)
    h, w = point.size
    truth = point.frames[:1].numpy()
    for refs in opts.refs:
        progress(f"{point.where} {runtime} {precision} {refs} refs")
        refs_hr = point.frames[1:refs + 1].numpy()
        encode, frame, memory = _measure(session, refs_hr, point.target, opts, mem_kind, base)
        memory = cpu_memory[refs] if on_cpu else memory
        out = session(point.target)  # references of this count are set: the frame the timings measured
        quality = {"psnr_vs_fp32_db": min(psnr_db(out, point.fp32_frames[refs]), EXACT_DB),
                   "psnr_vs_truth_db": psnr_db(np.clip(out, 0, 1), truth) if opts.frames else None}
        kv = session.kv_nbytes()
        by_graph = point.costs[refs]
        for stage, t, cost in (("encode", encode, by_graph["reference_encoder"]), ("frame", frame, by_graph["frame"])):
            result.rows.append(ProfileRow(point.block, runtime, precision, refs, stage, t.min_ms, t.p50_ms, t.p90_ms,
                                          t.p99_ms, t.fps, t.iters, memory, mem_kind, kv, cost["flops"], cost["params"],
                                          **quality, height=h, width=w))
        if opts.ops and runtime == "ort":
            result.ops.append(_ops_row(session, point.block, precision, refs, refs_hr, point.target, opts) | {"height": h, "width": w})
        progress(f"{point.where} {runtime} {refs} refs", advance=1)
    session.close()

EXACT_DB = 200.0  # PSNR at or above this is the same frame to float32 rounding (stored capped: JSON has no inf)


def _at_size(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The sampled frames at an HR size (height, width): resized, as a camera of that geometry would see them."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return torch.nn.functional.interpolate(frames, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def _padded(frames: torch.Tensor, contract) -> torch.Tensor:
    """Frames padded to the grid as a session pads them: what the naive full model runs at."""
    return torch.from_numpy(pad_edges(frames.numpy(), contract.on_grid(frames.shape[-2:])))


def _fp32_frames(export_path: Path, model, frames: torch.Tensor, target: np.ndarray, refs_list: list[int]) -> dict[int, np.ndarray]:
    """The FP32 frame for each reference count: what every precision's row is compared with."""
    if model is not None:
        from gemx.runtimes.torch_session import TorchSession

        session = TorchSession(model)
    else:
        session = open_session("ort", export_path)
    out = {}
    for refs in refs_list:
        session.set_references(frames[1:refs + 1].numpy())
        out[refs] = session(target)
    session.close()
    return out


def _ops_row(session, block: int, precision: str, refs: int, refs_hr: np.ndarray, target: np.ndarray, opts: ProfileOptions) -> dict:
    from gemx.profiles.ops import frame_op_breakdown

    cache = session.encode(refs_hr)  # the host arrays, fed to the graph directly: the target padded as the session pads it
    lr = pad_edges(target, tuple(side // session.contract.config.scale for side in cache.padded))
    b = frame_op_breakdown(session.frame_graph, {"target_lr": lr, **cache.kv}, runs=max(3, opts.iters // 2), threads=opts.threads)
    return {"block_size": block, "precision": precision, "refs": refs, "ms_per_frame": b.ms_per_frame, "nodes": b.nodes,
            "layout_share": b.layout_share}


def _measure(session, refs_hr: np.ndarray, target: np.ndarray, opts: ProfileOptions, mem_kind: str, base: int | None):
    """(encode timing, per-frame timing, device memory above `base` on a GPU) for one session and reference set."""
    # Encoding runs once per reference set: fewer calls than frames, but enough that one slow call cannot move the p50.
    encode = time_calls(lambda: session.set_references(refs_hr), 2, max(5, opts.iters // 2))
    frame = time_calls(lambda: session(target), opts.warmup, opts.iters, opts.seconds)
    memory = None
    if mem_kind.startswith("device"):
        session.set_references(refs_hr)
        session(target)
        after = device_memory_used()
        memory = None if base is None or after is None else max(after - base, 0)
    return encode, frame, memory


@dataclass(frozen=True)
class _MemoryProbe:
    """What a fresh interpreter needs to open one CPU session and measure its memory at each reference count."""
    runtime: str
    export: Path
    precision: str
    threads: int | None
    checkpoint: Path | None  # the torch runtime runs the checkpoint's model (None: the shipped one)
    block_size: int
    refs: list[int]
    references: np.ndarray  # [max refs, 3, H, W]
    target: np.ndarray


def _cpu_memory(probe: _MemoryProbe) -> dict[int, int | None]:
    """Peak resident memory of one session per reference count, measured in a fresh interpreter.

    In this process, memory an earlier (larger) session freed stays resident and a later session reuses it
    without growing RSS, so its figure would read low (even 0). A spawned process starts clean."""
    import pickle
    import subprocess
    import sys

    code = ("import pickle, sys; from gemx.profiles.sweep import _probe_memory; "
            "sys.stdout.buffer.write(pickle.dumps(_probe_memory(pickle.loads(sys.stdin.buffer.read()))))")
    run = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(probe), capture_output=True, check=False)
    if run.returncode != 0:
        if run.returncode < 0:  # a signal (Ctrl-C reaches the whole process group): stop like the sweep itself
            raise KeyboardInterrupt
        last = (run.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise GemxError(f"measuring {probe.runtime} {probe.precision} memory in a fresh process failed: {last}")
    return pickle.loads(run.stdout)


def _probe_memory(p: _MemoryProbe) -> dict[int, int | None]:
    """In the fresh interpreter: everything the session holds (weights, arenas, the key/value cache) at its peak
    over one encode + frame, above the process before the session was opened."""
    model = None
    if p.runtime == "torch":
        model = with_block_size(load_checkpoint(p.checkpoint).model, p.block_size)
    if p.threads:
        torch.set_num_threads(p.threads)
    release_freed_memory()
    base = rss_now()
    session = open_session(p.runtime, p.export, p.precision, p.threads, model=model)
    return {r: peak_rss_delta(lambda r=r: (session.set_references(p.references[:r]), session(p.target)), base)
            for r in p.refs}


@torch.inference_mode()
def _naive_row(model, block: int, refs: int, frames: torch.Tensor, opts: ProfileOptions, flops: int,
               size: tuple[int, int]) -> ProfileRow:
    """The full model re-encoding its references every frame, on `frames` on the grid."""
    refs_hr, lr = frames[1:refs + 1][None], downsample(frames[:1], model.config.scale)
    t = time_calls(lambda: model(lr, refs_hr), 1, max(3, opts.iters // 4), opts.seconds)
    memory = peak_rss_delta(lambda: model(lr, refs_hr))  # above the process with the model loaded
    params = sum(p.numel() for p in model.parameters())
    return ProfileRow(block, "torch", "fp32", refs, "naive", t.min_ms, t.p50_ms, t.p90_ms, t.p99_ms, t.fps, t.iters,
                      memory, "rss over model", 0, flops, params, height=size[0], width=size[1])


def _exports_for(source: Path | None, opts: ProfileOptions, progress) -> tuple[dict[int, Path], object]:
    """{block size: export dir}; exports (and builds for the CPU) into the cache when needed.

    `source` is a checkpoint (exported per block size) or an export directory (profiled as it is).
    """
    if source is not None and Path(source).is_dir():
        export_dir = read_export_dir(source)
        if opts.block_sizes and opts.block_sizes != [export_dir.config.block_size]:
            raise GemxError("an export directory has one block size; profile a checkpoint to sweep block sizes")
        model = None
        if "torch" in opts.runtimes or opts.naive:
            raise GemxError("the torch runtime and the naive row need the checkpoint; pass the .pt file, or --runtime ort --no-naive")
        return {export_dir.config.block_size: Path(source)}, model
    ckpt = load_checkpoint(source)
    cfg = ckpt.config
    exports = {}
    for block in opts.block_sizes or default_block_sizes(cfg.block_size, cfg.level_sizes[-1]):
        with_block_size(ckpt.model, block)  # a block size that does not fit fails here, before any export
        graphs = list(dict.fromkeys(graph_precision(p) for p in opts.precisions))
        exports[block], fresh = cached_export(ckpt, block, max(opts.refs), graphs, opts.calib, opts.cache_dir, progress)
        if fresh:
            _build_for_machine(exports[block], opts, progress)
    return exports, ckpt.model


def _build_for_machine(out: Path, opts: ProfileOptions, progress) -> None:
    """TensorRT engines where TensorRT runs and is asked for; ORT-optimized CPU graphs on a CPU machine."""
    from gemx.runtimes.build import BuildOptions, build
    from gemx.runtimes.registry import runtime_available

    has_trt = runtime_available("tensorrt")[0]
    if has_trt and "tensorrt" not in opts.runtimes:
        return
    for precision in dict.fromkeys(["fp32", *map(graph_precision, opts.precisions)]):
        if precision == "fp16" and not has_trt:
            continue  # the CPU build has no FP16
        progress(f"building {precision}")
        build(out, BuildOptions(fp16=precision == "fp16", int8=precision == "int8", refs_max=max(max(opts.refs), 2),
                                refs_opt=min(5, max(opts.refs)), force=True))
