"""`gemx export`: a checkpoint -> an export directory of split ONNX graphs, a manifest, and checks.

Writes reference_encoder.onnx and frame.onnx (plus *.fp16.onnx with --fp16) and manifest.json into
a temporary sibling directory and moves it into place only when every check passed, so a failed or
interrupted export never leaves a half-written directory, and an existing export is replaced only
with --force.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from gemx.contract import DEFAULT_MAX_SIZE, MAX_REFS, VALIDATE_BATCH, Contract
from gemx.errors import GemxError, check_positive
from gemx.exporter.graphs import FrameGraph, ReferenceEncoderGraph
from gemx.exporter.manifest import (
    MANIFEST,
    WRITTEN_LATER,
    CheckpointFile,
    ExportManifest,
    Int8Calibration,
    ModelEntry,
    Parity,
    Precision,
    Quantization,
    Refs,
    Spatial,
    graph_file,
    is_export,
    sha256,
)
from gemx.exporter.onnx_export import DEFAULT_OPSET, check_opset, export_graph, strip_build_metadata
from gemx.exporter.trt_check import TrtReport, check_tensorrt_compat
from gemx.exporter.validate import (
    BATCH_TOLERANCE,
    FP32_TOLERANCE,
    INT8_PSNR_GOAL,
    ParityRow,
    check_batch,
    check_parity,
)
from gemx.frames import sample_frames
from gemx.fs import atomic_dir, atomic_write, check_target
from gemx.int8.calibrate import calibrate, calibration_frames_needed, calibration_videos
from gemx.int8.qdq import QUANTIZED_OPS, Int8Cache, fold_constants, fp32_convs, quantize
from gemx.int8.ranges import METHOD, RANGES_FILE, RangeTable, load_ranges, shipped_ranges_path
from gemx.model.checkpoint import Checkpoint, load_checkpoint
from gemx.model.config import MAX_SIZE
from gemx.model.network import GeminoAttention, with_block_size

VALIDATE_REFS = (1, 2, 5, 10)


@dataclass
class ExportOptions:
    out: Path | None = None
    block_size: int | None = None  # attention block size to deploy with; weights do not depend on it
    opset: int = DEFAULT_OPSET
    max_refs: int = 10
    fp16: bool = False
    simplify: bool = False
    force: bool = False
    frames: Path | None = None  # a video to check parity on (synthetic frames without one)
    int8: bool = False
    calib: list[Path] = field(default_factory=list)  # videos or folders of videos to calibrate INT8 on
    max_size: tuple[int, int] | None = None  # (height, width): the largest frame validated (default 1088x1920)

    def __post_init__(self) -> None:
        check_positive(block_size=self.block_size, max_refs=self.max_refs)


@dataclass
class ExportResult:
    path: Path
    manifest: ExportManifest | None = None  # written last, once every check passed
    parity: dict[str, list[ParityRow]] = field(default_factory=dict)
    trt: list[TrtReport] = field(default_factory=list)
    frames_source: str = ""


def default_out_dir(ckpt: Checkpoint, block_size: int) -> Path:
    from gemx.model.checkpoint import default_checkpoint_path

    name = f"{ckpt.path.stem}-b{block_size}.export"
    try:
        shipped = ckpt.path.resolve() == default_checkpoint_path().resolve()
    except GemxError:  # no default checkpoint in this install
        shipped = False
    return Path.cwd() / name if shipped else ckpt.path.parent / name  # never inside the installed package


def export(ckpt_path: Path | None, opts: ExportOptions, progress=lambda msg: None) -> ExportResult:
    check_opset(opts.opset)
    if opts.max_refs < 2:
        raise GemxError("--max-refs must be at least 2 (graphs are exported from a 2-reference example)")
    if opts.max_refs > MAX_REFS:
        raise GemxError(f"--max-refs {opts.max_refs} is above the {MAX_REFS} references gemx validates; use at most {MAX_REFS}")
    ckpt = load_checkpoint(ckpt_path)
    model = with_block_size(ckpt.model, opts.block_size)
    cfg = model.config
    contract = Contract(cfg)  # refuses models without references before any work
    max_size = _max_size(contract, opts.max_size)
    out = Path(opts.out) if opts.out else default_out_dir(ckpt, cfg.block_size)
    check_target(out, opts.force, is_export, "a gemx export", written_later=WRITTEN_LATER)
    refs_list = sorted({r for r in (*VALIDATE_REFS, opts.max_refs) if r <= opts.max_refs})
    ckpt_sha = sha256(ckpt.path)
    calib = _int8_calibration(ckpt.path, ckpt_sha, opts, contract) if opts.int8 else None  # refused before any work
    frames, source = sample_frames(cfg.size, max(refs_list) + 1, opts.frames)
    params = sum(p.numel() for p in model.parameters())
    result = ExportResult(out, frames_source=source)
    precisions: dict[str, Precision] = {}
    with atomic_dir(out, replaceable=lambda p: opts.force and is_export(p), written_later=WRITTEN_LATER) as tmp:
        for precision in ("fp32", "fp16") if opts.fp16 else ("fp32",):
            progress(f"exporting {precision} graphs")
            contract = Contract(cfg, precision)
            protos = _export_pair(model, contract, tmp, opts, frames)
            paths = tuple(tmp / spec.file(precision) for spec in contract.graphs)
            if opts.simplify:
                progress(f"simplifying {precision} graphs")
                protos = [_simplify(p, path) for p, path in zip(protos, paths, strict=True)]
            result.trt += [check_tensorrt_compat(p, path.name) for p, path in zip(protos, paths, strict=True)]
            progress(f"checking {precision} parity at refs {refs_list}")
            fp32_paths = None if precision == "fp32" else tuple(tmp / s.file("fp32") for s in contract.graphs)
            rows = check_parity(model, contract, paths, refs_list, frames, reference_paths=fp32_paths,
                                sizes=parity_sizes(contract, max_size))
            if max_size is not None and precision == "fp32":
                progress(f"running the graphs at the largest size, {max_size[1]}x{max_size[0]}")
                _check_largest(contract, paths, max_size)
            batch_error = _checked_batch(paths, contract, frames)
            result.parity[precision] = rows
            if not all(math.isfinite(r.max_abs_error) for r in rows):
                raise GemxError(f"the {precision} graphs produce NaN or Inf on real frames; export refused")
            worst = max(r.max_abs_error for r in rows)
            if precision == "fp32" and worst > FP32_TOLERANCE:
                raise GemxError(f"exported graphs differ from PyTorch by {worst:.2e} (> {FP32_TOLERANCE}); export refused")
            precisions[precision] = Precision(
                graphs={spec.name: graph_file(spec, path, proto)
                        for spec, path, proto in zip(contract.graphs, paths, protos, strict=True)},
                parity=[Parity(**vars(r)) for r in rows],
                parity_against="pytorch" if precision == "fp32" else "fp32 graphs",
                batch_max_abs_error=batch_error)
        if opts.int8:
            int8 = _export_int8(Contract(cfg), tmp, calib, ckpt_sha, frames, refs_list, model, max_size, opts, progress)
            precisions["int8"] = int8.entry
            result.parity["int8"], result.trt = int8.parity, result.trt + int8.trt
        result.manifest = ExportManifest(
            model=ModelEntry(config=cfg.to_dict(), parameters=params, checkpoint=CheckpointFile(file=ckpt.path.name, sha256=ckpt_sha)),
            opset=opts.opset, refs=Refs(max=opts.max_refs, validated=refs_list), precisions=precisions,
            spatial=None if max_size is None else Spatial(grid=cfg.grid, max_size=max_size))
        result.manifest.write(tmp / MANIFEST)
    return result


def _int8_calibration(checkpoint: Path, checkpoint_sha: str, opts: ExportOptions,
                      contract: Contract) -> list[Path] | RangeTable:
    """The calibration videos named by --calib, else the range table shipped with the checkpoint (checked against
    the contract)."""
    if opts.calib:
        return calibration_videos(opts.calib)
    shipped = shipped_ranges_path(checkpoint)
    if not shipped.exists():
        raise calibration_frames_needed(checkpoint)
    table = load_ranges(shipped, checkpoint_sha)
    _check_table(table, contract)
    return table


@dataclass
class Int8Export:
    entry: Precision  # the manifest's precisions.int8
    parity: list[ParityRow]
    trt: list[TrtReport]


def _export_int8(contract: Contract, out: Path, calib: list[Path] | RangeTable, checkpoint_sha: str, frames: torch.Tensor,
                 refs_list: list[int], model: GeminoAttention, max_size: tuple[int, int] | None, opts: ExportOptions,
                 progress) -> Int8Export:
    """QDQ INT8 graphs from FP32 graphs (the encoder in `out`; the frame graph exported again with its head on 2x2
    phases, see `subpixel_head`) and the range table used, written into `out`; their accuracy against the FP32
    graphs there."""
    import tempfile

    fp32_paths = tuple(out / spec.file("fp32") for spec in contract.graphs)
    with tempfile.TemporaryDirectory(prefix="gemx-int8-") as work:
        sources = (fp32_paths[0], Path(work) / "frame.subpixel.onnx")
        _export_frame(model, contract, sources[1], opts, frames, subpixel_head=True)
        folded = tuple(Path(work) / p.name for p in fp32_paths)
        for src, dst in zip(sources, folded, strict=True):
            fold_constants(src, dst)
        table = calibrate(folded, contract, calib, checkpoint_sha, progress) if isinstance(calib, list) else calib
        progress("quantizing graphs to INT8 (QDQ)")
        paths = tuple(out / spec.file("int8") for spec in contract.graphs)
        cache = _int8_cache(table, contract)
        protos = [quantize(src, table.graphs[spec.name], dst, cache)
                  for spec, src, dst in zip(contract.graphs, folded, paths, strict=True)]
    table.write(out / RANGES_FILE)
    kept_fp32 = {spec.name: fp32_convs(proto) for spec, proto in zip(contract.graphs, protos, strict=True)}
    trt = [check_tensorrt_compat(p, path.name) for p, path in zip(protos, paths, strict=True)]
    progress(f"checking int8 accuracy at refs {refs_list}")
    int8 = Contract(contract.config, "int8")
    rows = check_parity(model, int8, paths, refs_list, frames, reference_paths=fp32_paths, sizes=parity_sizes(int8, max_size))
    worst = min(r.psnr_db for r in rows)
    if not worst > INT8_PSNR_GOAL:
        raise GemxError(f"the int8 graphs reach only {worst:.1f} dB PSNR against FP32 (goal > {INT8_PSNR_GOAL} dB); "
                        "export refused: calibrate on video closer to what you serve (--calib)")
    quantization = Quantization(
        method=METHOD, format="QDQ",
        activations="int8, symmetric per tensor (zero point 0)", weights="int8, symmetric per output channel",
        quantized_ops=QUANTIZED_OPS, kept_fp32=kept_fp32,
        frame_head="2x2 phases (gemx.model.network.subpixel_head): as FP32 but on the frame's outer 2 pixels",
        calibration=Int8Calibration(**table.calibration.model_dump(), block_size=table.block_size, table=RANGES_FILE,
                                    table_sha256=sha256(out / RANGES_FILE), shipped=not isinstance(calib, list)))
    entry = Precision(graphs={spec.name: graph_file(spec, path, proto)
                              for spec, path, proto in zip(int8.graphs, paths, protos, strict=True)},
                      parity=[Parity(**vars(r)) for r in rows], parity_against="fp32 graphs",
                      batch_max_abs_error=_checked_batch(paths, int8, frames), quantization=quantization)
    return Int8Export(entry, rows, trt)


def _check_table(table: RangeTable, contract: Contract) -> None:
    """A range table that cannot quantize these graphs is refused before any work: one that holds no ranges for a
    graph, or none for a cache tensor the INT8 contract holds in int8. (A table missing some other tensor is found
    when that graph is quantized.)"""
    for spec in contract.graphs:
        if not table.graphs.get(spec.name):
            raise GemxError(f"the INT8 range table has no range for a tensor of {spec.file('fp32')} (it holds none for "
                            "that graph); calibrate again with --calib VIDEO|DIR")
    _int8_cache(table, contract)


def _int8_cache(table: RangeTable, contract: Contract) -> Int8Cache:
    """The cache tensors the INT8 contract holds in int8, with their calibrated ranges: both graphs use the same
    scales."""
    ranges = table.graphs["reference_encoder"]
    int8 = Contract(contract.config, "int8")
    names = [s.name for s in int8.kv if s.dtype == "int8"]
    missing = [n for n in names if n not in ranges]
    if missing:
        raise GemxError(f"the INT8 range table has no range for {missing[0]} (made by an older gemx?); "
                        "calibrate again with --calib VIDEO|DIR")
    return Int8Cache({n: ranges[n] for n in names}, frozenset(s.name for s in int8.keys if s.dtype == "int8"))


def _export_pair(model: GeminoAttention, contract: Contract, out: Path, opts: ExportOptions,
                 frames: torch.Tensor) -> list[onnx.ModelProto]:
    enc_spec, frame_spec = contract.graphs
    encoder = ReferenceEncoderGraph(model, contract)
    enc = export_graph(encoder, lambda point: (_example_refs(frames, point[1:]),), enc_spec, [0], opts.max_refs,
                       opts.opset, out / enc_spec.file(contract.precision), trace_points(contract, batched=False))
    return [enc, _export_frame(model, contract, out / frame_spec.file(contract.precision), opts, frames)]


def _max_size(contract: Contract, asked: tuple[int, int] | None) -> tuple[int, int] | None:
    """The largest (height, width) to validate, on the grid; None for a fixed-size contract."""
    if not contract.any_size:
        if asked is not None:
            raise GemxError(f"a {contract.config.arch} model attends over the whole frame: its graphs keep the training "
                            f"size {contract.config.size}x{contract.config.size}; drop --max-size")
        return None
    h, w = contract.on_grid(asked or DEFAULT_MAX_SIZE)
    if max(h, w) > MAX_SIZE or min(h, w) < 1:
        raise GemxError(f"--max-size {w}x{h} is outside 1..{MAX_SIZE} pixels a side")
    return h, w


def parity_sizes(contract: Contract, max_size: tuple[int, int] | None) -> list[tuple[tuple[int, int], int]]:
    """(size, refs) checked against PyTorch beside the training size: a landscape and a portrait frame at 2
    references (the largest size is run by `_check_largest`)."""
    if max_size is None:
        return []
    g = contract.grid
    return [((2 * g, 3 * g), 2), ((3 * g, 2 * g), 2)]


def _check_largest(contract: Contract, paths: tuple[Path, ...], max_size: tuple[int, int]) -> None:
    """The graphs run at the largest size the export promises (1 reference): a frame of that size, finite. Parity
    itself is checked at the smaller sizes above: the graphs are the same at every size but for its shape arithmetic."""
    from gemx.exporter.validate import ort_session, run_pipeline

    h, w = max_size
    rng = np.random.default_rng(0)
    refs = rng.random((1, 3, h, w), np.float32)
    target = rng.random((1, 3, h // contract.config.scale, w // contract.config.scale), np.float32)
    out = run_pipeline(*(ort_session(p) for p in paths), contract, refs, target)
    if out.shape != (1, 3, h, w) or not np.isfinite(out).all():
        raise GemxError(f"the {contract.precision} graphs do not run at --max-size {w}x{h} (got {list(out.shape)}); "
                        "export refused")


def _checked_batch(paths: tuple[Path, ...], contract: Contract, frames: torch.Tensor) -> float:
    """The frame graph's batch axis, checked: streams run together give each its own frame (refused otherwise)."""
    error = check_batch(paths, contract, frames)
    if not error <= BATCH_TOLERANCE:
        raise GemxError(f"the {contract.precision} frame graph gives {error:.2e} different frames in a batch of "
                        f"{VALIDATE_BATCH} streams than one by one (> {BATCH_TOLERANCE}); export refused")
    return error


def trace_points(contract: Contract, batched: bool) -> tuple[tuple[int, int, int], ...]:
    """The (batch, height, width) points a graph is traced at (see `gemx.exporter.spatial`): two sizes whose height,
    width and area ratios differ (then the graphs take any size on the grid; a fixed-size contract keeps its
    training size), and for the frame graph a batch of 2 beside 1 (it runs frames of several streams at once)."""
    g = contract.grid
    sizes = ((2 * g, 3 * g), (3 * g, 5 * g)) if contract.any_size else (contract.default_size,)
    points = tuple((1, *size) for size in sizes)
    return (*points, (2, *sizes[0])) if batched else points


def _example_refs(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    refs = frames[1:3]  # two references: one would invite 0/1 specialisation
    if tuple(refs.shape[-2:]) != tuple(size):
        refs = torch.nn.functional.interpolate(refs, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
    return refs.contiguous()


def _export_frame(model: GeminoAttention, contract: Contract, path: Path, opts: ExportOptions, frames: torch.Tensor,
                  subpixel_head: bool = False) -> onnx.ModelProto:
    def example(point: tuple[int, int, int]) -> tuple:
        batch, size = point[0], point[1:]
        refs = _example_refs(frames, size)
        sets = [refs.roll(k, dims=0) for k in range(batch)]  # each stream its own cache (the same frames in another order)
        with torch.no_grad():
            kv = [ReferenceEncoderGraph(model, contract)(r) for r in sets]
        stacked = tuple(torch.cat(parts) for parts in zip(*kv, strict=True))
        return torch.nn.functional.avg_pool2d(torch.cat([r[:1] for r in sets]), contract.config.scale), stacked

    axes = [None] + [contract.refs_axis(s) for s in contract.batch_kv]
    return export_graph(FrameGraph(model, contract, subpixel_head), example, contract.graphs[1], axes, opts.max_refs,
                        opts.opset, path, trace_points(contract, batched=True), source_scale=contract.config.scale)


def _simplify(proto: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    try:
        import onnxslim
    except ImportError:
        raise GemxError("--simplify needs onnxslim: pip install 'gemx[simplify]'") from None
    slim = onnxslim.slim(proto)
    strip_build_metadata(slim)
    atomic_write(path, lambda tmp: onnx.save(slim, str(tmp)))
    return slim
