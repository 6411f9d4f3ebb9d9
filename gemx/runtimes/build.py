"""`gemx build`: turn an export directory into artifacts for the machine at hand.

With an NVIDIA GPU and TensorRT: one engine per graph with an optimization profile over the refs
axis, a reusable timing cache, and a record of what it was built for. TensorRT 10 builds FP16 from
the FP32 graph with its (deprecated) FP16 flag; TensorRT 11 networks are strongly typed, so FP16 comes
from the export's mixed-precision graph. INT8 always comes from the export's QDQ graphs (explicit
quantization; TensorRT 10 also wants its INT8 flag for them, without a calibrator).
Without a GPU: ORT-optimized graphs for the CPU provider (INT8: first prepared for its x86 kernels).
Every build ends with an accuracy gate against the FP32 ONNX graphs on real frames.
"""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gemx.contract import within
from gemx.errors import GemxError, check_positive
from gemx.exporter.manifest import TIMING_CACHE, ExportDir, read_export_dir, sha256
from gemx.frames import sample_frames
from gemx.fs import atomic_dir, atomic_write, refuse_foreign
from gemx.metrics import psnr_db
from gemx.model.lr import downsample
from gemx.runtimes.build_record import (
    RECORD,
    Accuracy,
    BuildRecord,
    Gpu,
    OpenVinoBuild,
    OrtCpuBuild,
    TensorRTBuild,
    TrtProfile,
    engine_dir,
    is_build,
    write_record,
)
from gemx.runtimes.gpu import detect_gpu, tensorrt_version


def ort_cpu_dir(precision: str) -> str:
    return "ort_cpu" if precision == "fp32" else f"ort_cpu_{precision}"


def openvino_dir(precision: str) -> str:
    return f"openvino_{precision}"


TARGETS = ("tensorrt", "ort-cpu", "openvino")  # --runtime: default tensorrt on a GPU with TensorRT, else ort-cpu


DEFAULT_REFS_OPT = 5


@dataclass
class BuildOptions:
    fp16: bool = False
    int8: bool = False
    bf16: bool = False  # OpenVINO's bf16 mode of the FP32 graphs (--runtime openvino)
    runtime: str | None = None  # one of TARGETS; default: TensorRT where it runs, else ONNX Runtime's CPU graphs
    refs_min: int = 1
    refs_opt: int | None = None  # default: 5, or the largest count the build runs when that is fewer
    refs_max: int | None = None  # default: the export's max
    timing_cache: Path | None = None
    force: bool = False
    frames: Path | None = None  # a video to check accuracy on (synthetic frames without one)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) TensorRT tunes for; the first is opt
    max_size: tuple[int, int] | None = None  # the largest frame an engine takes (default: the export's)
    max_batch: int = 1  # the most frames of different streams one frame-engine run takes (a server's --max-batch)

    def __post_init__(self) -> None:
        check_positive(refs_min=self.refs_min, refs_opt=self.refs_opt, refs_max=self.refs_max, max_batch=self.max_batch)
        if self.fp16 + self.int8 + self.bf16 > 1:
            raise GemxError("a build has one precision: pass one of --fp16, --bf16, --int8")
        if self.runtime is not None and self.runtime not in TARGETS:
            raise GemxError(f"gemx build --runtime takes {', '.join(TARGETS)}, got {self.runtime!r}")
        if self.bf16 and self.runtime != "openvino":
            raise GemxError("--bf16 is OpenVINO's mode: pass --runtime openvino with it")

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "int8" if self.int8 else "bf16" if self.bf16 else "fp32"


@dataclass
class BuildResult:
    target: str  # "tensorrt" or "ort-cpu"
    path: Path
    record: BuildRecord
    accuracy: Accuracy | None = None  # against the FP32 ONNX graphs


def build(export_path: Path, opts: BuildOptions, progress=lambda msg: None) -> BuildResult:
    export = read_export_dir(export_path)
    refs_max = opts.refs_max or export.max_refs
    if opts.refs_opt is None:
        opts = dataclasses.replace(opts, refs_opt=max(opts.refs_min, min(DEFAULT_REFS_OPT, refs_max)))
    if not 1 <= opts.refs_min <= opts.refs_opt <= refs_max:
        raise GemxError(f"need 1 <= --refs-min ({opts.refs_min}) <= --refs-opt ({opts.refs_opt}) <= --refs-max ({refs_max})")
    if refs_max > export.max_refs:
        raise GemxError(f"--refs-max {refs_max} exceeds the {export.max_refs} references the export was validated for; "
                        f"re-export with --max-refs {refs_max}")
    if opts.int8 and "int8" not in export.precisions:
        raise GemxError(f"{export.path} has no INT8 graphs; re-export with `gemx export --int8 --force` first")
    if opts.runtime == "openvino":
        return build_openvino(export, opts, progress)
    if opts.runtime == "ort-cpu":
        return build_ort_cpu(export, opts, progress)
    gpu, gpu_why = detect_gpu()
    trt, trt_why = tensorrt_version()
    if opts.runtime == "tensorrt" and (gpu is None or trt is None):
        raise GemxError(f"TensorRT engines need an NVIDIA GPU and TensorRT: {gpu_why or trt_why} (pip install 'gemx[gpu]')")
    if gpu is not None and trt is not None:
        return build_tensorrt(export, opts, refs_max, progress)
    if opts.fp16:
        why = gpu_why if gpu is None else trt_why
        raise GemxError(f"FP16 engines need an NVIDIA GPU and TensorRT: {why} (pip install 'gemx[gpu]' on a GPU machine). "
                        "Without --fp16, `gemx build` writes ORT-optimized graphs for the CPU")
    return build_ort_cpu(export, opts, progress)


def _claim(out: Path, force: bool) -> None:
    if out.exists() and not is_build(out):
        raise GemxError(f"{out} exists and is not a gemx build; move it away (gemx will not replace it)")
    if out.exists() and not force:
        raise GemxError(f"{out} already holds a build; pass --force to rebuild it")
    refuse_foreign(out, None)


def build_ort_cpu(export: ExportDir, opts: BuildOptions, progress) -> BuildResult:
    import onnxruntime as ort

    from gemx.int8.ort_cpu import ort_cpu_graph, preparation_revision

    precision = opts.precision
    out = export.path / ort_cpu_dir(precision)
    _claim(out, opts.force)
    with atomic_dir(out, replaceable=lambda p: opts.force and is_build(p)) as tmp:
        graphs = {}
        for graph in ("reference_encoder", "frame"):
            progress(f"optimizing {graph} ({precision}) for the CPU provider")
            so = ort.SessionOptions()
            # EXTENDED, not ALL: ALL bakes in layouts tuned to this CPU's instruction set.
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            so.optimized_model_filepath = str(tmp / f"{graph}.onnx")
            so.log_severity_level = 3
            ort.InferenceSession(ort_cpu_graph(export.graph_path(graph, precision), precision), so,
                                 providers=["CPUExecutionProvider"])
            graphs[graph] = f"{graph}.onnx"
        record = OrtCpuBuild(
            onnxruntime_version=ort.__version__, precision=precision, cpu=platform.processor() or platform.machine(),
            graphs=graphs, onnx_sha256={g: sha256(export.graph_path(g, precision)) for g in graphs},
            optimization_level="extended")
        if precision == "int8":
            record.prepared = ("uint8 activations, int32 biases, whole channel blocks, pads of uint8 tensors, one-node unit "
                               "queries, for ONNX Runtime's x86 kernels (gemx.int8.ort_cpu)")
            record.preparation_revision = preparation_revision()
        write_record(tmp, record)
    result = BuildResult("ort-cpu", out, record)
    progress("accuracy gate")
    from gemx.runtimes.ort_session import OrtSession

    optimized = OrtSession(export, precision=precision, graphs={g: out / f for g, f in graphs.items()})
    result.accuracy = accuracy_gate(export, optimized, opts.refs_opt, opts.frames)
    _update_record(out, record, result.accuracy)
    return result


def build_openvino(export: ExportDir, opts: BuildOptions, progress) -> BuildResult:
    """Compile the symbolic frame graph for this CPU once and keep the compiled model, so a later session imports it
    instead of compiling (the encoder, and the frame graph per geometry, compile for exact shapes at encode); the
    record names the OpenVINO version and the CPU and ISA flags it was compiled for."""
    from gemx.runtimes.cpu import cpu_flags, cpu_model
    from gemx.runtimes.openvino_session import OpenVinoSession, export_compiled, openvino_version

    precision = opts.precision
    if opts.fp16:
        raise GemxError("OpenVINO on the CPU builds fp32, bf16 or int8; FP16 engines are TensorRT's (on a GPU)")
    version, why = openvino_version()
    if version is None:
        raise GemxError(f"{why}; install it with: pip install openvino")
    if precision == "int8" and "int8" not in export.precisions:
        raise GemxError(f"{export.path} has no INT8 graphs; re-export with `gemx export --int8 --force` first")
    out = export.path / openvino_dir(precision)
    _claim(out, opts.force)
    with atomic_dir(out, replaceable=lambda p: opts.force and is_build(p)) as tmp:
        progress(f"compiling the frame graph ({precision}) with OpenVINO {version} for this CPU")
        graphs = export_compiled(export, precision, tmp)
        source = "int8" if precision == "int8" else "fp32"
        record = OpenVinoBuild(
            openvino_version=version, precision=precision, cpu=cpu_model(), cpu_flags=cpu_flags(), graphs=graphs,
            onnx_sha256={g: sha256(export.graph_path(g, source)) for g in graphs}, graph_precision=source)
        write_record(tmp, record)
    result = BuildResult("openvino", out, record)
    progress("accuracy gate")
    compiled = {g: (out / f).read_bytes() for g, f in graphs.items()}
    with OpenVinoSession(export, precision, compiled=compiled) as session:
        result.accuracy = accuracy_gate(export, session, opts.refs_opt, opts.frames)
    _update_record(out, record, result.accuracy)
    return result


def build_tensorrt(export: ExportDir, opts: BuildOptions, refs_max: int, progress) -> BuildResult:
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    precision = opts.precision
    strongly_typed = int(trt.__version__.split(".")[0]) >= 11
    if opts.fp16 and strongly_typed and "fp16" not in export.precisions:
        raise GemxError(f"TensorRT {trt.__version__} builds FP16 only from a mixed-precision graph; "
                        f"re-export with `gemx export --fp16 --force` first")
    # the graph that carries the precision: FP16 from TensorRT 11 on, INT8 (QDQ) always
    contract_precision = precision if precision == "int8" or (opts.fp16 and strongly_typed) else "fp32"
    contract = export.contract(contract_precision)
    out = export.path / engine_dir(precision)
    _claim(out, opts.force)
    gpu, _ = detect_gpu()
    engines, cache = {}, opts.timing_cache or export.path / TIMING_CACHE
    sizes = engine_sizes(export, opts)
    with atomic_dir(out, replaceable=lambda p: opts.force and is_build(p)) as tmp:
        for spec in contract.graphs:
            progress(f"building {spec.name} engine ({precision}, refs {opts.refs_min}/{opts.refs_opt}/{refs_max}, "
                     f"sizes {' / '.join(f'{w}x{h}' for h, w in sizes.values())}, batch up to {opts.max_batch})")
            profile = Profile()
            for s in spec.inputs:  # the batch axis (frame graph only) is tuned for full batches
                profile.add(s.name, min=contract.shape(s, opts.refs_min, sizes["min"]),
                            opt=contract.shape(s, opts.refs_opt, sizes["opt"], opts.max_batch),
                            max=contract.shape(s, refs_max, sizes["max"], opts.max_batch))
            network = NetworkFromOnnxPath(str(export.graph_path(spec.name, contract_precision)), strongly_typed=strongly_typed)
            config = CreateConfig(fp16=opts.fp16 and not strongly_typed, int8=opts.int8 and not strongly_typed, profiles=[profile],
                                  load_timing_cache=str(cache) if Path(cache).exists() else None)
            data = EngineBytesFromNetwork(network, config=config, save_timing_cache=str(cache))()
            engines[spec.name] = f"{spec.name}.engine"
            atomic_write(tmp / engines[spec.name], lambda p, data=data: p.write_bytes(data))
        record = TensorRTBuild(
            tensorrt_version=trt.__version__, precision=precision, strongly_typed=strongly_typed,
            contract_precision=contract_precision, gpu=Gpu(name=gpu.name, compute_capability=gpu.compute_capability),
            profile=TrtProfile(min=opts.refs_min, opt=opts.refs_opt, max=refs_max, sizes=sizes, max_batch=opts.max_batch),
            engines=engines,
            onnx_sha256={s.name: sha256(export.graph_path(s.name, contract_precision)) for s in contract.graphs})
        write_record(tmp, record)
    result = BuildResult("tensorrt", out, record)
    progress("accuracy gate")
    from gemx.runtimes.trt_session import TensorRTSession

    with TensorRTSession(export, precision) as session:
        result.accuracy = accuracy_gate(export, session, opts.refs_opt, opts.frames)
    _update_record(out, record, result.accuracy)
    return result


def engine_sizes(export: ExportDir, opts: BuildOptions) -> dict[str, tuple[int, int]]:
    """The (height, width) of a TensorRT optimization profile, on the grid: from the smallest size asked (or one grid
    cell) through the first size asked (or the training size), to --max-size (or the export's largest)."""
    contract = export.contract()
    if not contract.any_size:
        if opts.sizes or opts.max_size:
            raise GemxError(f"a {export.config.arch} model's graphs keep the training size; drop --sizes and --max-size")
        return {k: contract.default_size for k in ("min", "opt", "max")}
    asked = [contract.on_grid(s) for s in opts.sizes]
    largest = contract.on_grid(opts.max_size) if opts.max_size else export.max_size
    opt = asked[0] if asked else contract.default_size
    low = (min(s[0] for s in asked), min(s[1] for s in asked)) if asked else (contract.grid, contract.grid)
    for name, size in (("--sizes", s) for s in [*asked, opt]):
        if size[0] > largest[0] or size[1] > largest[1]:
            raise GemxError(f"{name} {size[1]}x{size[0]} is above the engine's largest size {largest[1]}x{largest[0]}; "
                            "raise --max-size (re-export with a larger --max-size if it is above the export's)")
    if export.max_size and not within(largest, export.max_size):
        raise GemxError(f"--max-size {largest[1]}x{largest[0]} is above the {export.max_size[1]}x{export.max_size[0]} "
                        f"the export was validated at; re-export with --max-size {largest[1]}x{largest[0]}")
    return {"min": low, "opt": opt, "max": largest}


def accuracy_gate(export: ExportDir, session, refs: int, video: Path | None = None) -> Accuracy:
    """Built artifact vs the FP32 ONNX graphs (ONNX Runtime CPU) on frames of `video` (synthetic without one)."""
    from gemx.runtimes.ort_session import OrtSession

    cfg = export.config
    frames, source = sample_frames(cfg.size, refs + 4, video)
    reference = OrtSession(export)
    refs_hr, targets = frames[:refs].numpy(), downsample(frames[refs:], cfg.scale).numpy()
    worst_psnr, worst_err = np.inf, 0.0
    for s in (reference, session):
        s.set_references(refs_hr)
    for t in targets:
        want, got = reference(t[None]), session(t[None])
        worst_psnr = min(worst_psnr, psnr_db(got, want))
        worst_err = max(worst_err, float(np.abs(got - want).max()))
    if not np.isfinite(worst_err):
        raise GemxError(f"the built {session.name} graphs produce NaN or Inf on real frames; the build is not usable")
    return Accuracy(psnr_db=float(worst_psnr), max_abs_error=worst_err, refs=refs, frames=len(targets), source=source)


def _update_record(out: Path, record: BuildRecord, accuracy: Accuracy) -> None:
    record.accuracy_vs_fp32_onnx = accuracy
    write_record(out, record)
    assert (out / RECORD).exists()
