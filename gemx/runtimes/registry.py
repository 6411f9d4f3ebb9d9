"""Open a session by runtime name; `auto` measures which runtime and precision is fastest here (gemx.runtimes.auto)."""

from __future__ import annotations

from pathlib import Path

from gemx.contract import graph_precision
from gemx.errors import GemxError
from gemx.runtimes.base import Session

RUNTIMES = ("torch", "ort", "openvino", "torch-cuda", "ort-cuda", "ort-tensorrt", "tensorrt")
# What each runtime computes in: ORT's CPU provider upcasts FP16 graphs (so no fp16 there) and runs INT8 QDQ graphs
# with its int8 kernels; OpenVINO runs the FP32 graphs in f32 or bf16 and the QDQ graphs as they are; TensorRT builds
# INT8 engines from the same QDQ graphs.
RUNTIME_PRECISIONS = {"torch": ("fp32",), "ort": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8"),
                      "torch-cuda": ("fp32", "fp16", "bf16"), "ort-cuda": ("fp32", "fp16"), "ort-tensorrt": ("fp32", "fp16"),
                      "tensorrt": ("fp32", "fp16", "int8")}


def check_precision(runtime: str, precision: str) -> None:
    if precision not in RUNTIME_PRECISIONS[runtime]:
        which = [r for r in RUNTIMES if precision in RUNTIME_PRECISIONS[r]]
        raise GemxError(f"the {runtime} runtime does not run {precision}; {precision} runs on {', '.join(which) or 'no runtime'}")


def runtime_available(runtime: str) -> tuple[bool, str]:
    """Whether `runtime` can run here, and if not, what is missing."""
    from gemx.runtimes.gpu import detect_gpu, tensorrt_version

    if runtime in ("torch", "ort"):
        return True, ""
    if runtime == "openvino":
        from gemx.runtimes.openvino_session import openvino_version

        version, why = openvino_version()
        return version is not None, why
    if runtime == "torch-cuda":
        from gemx.runtimes.torch_cuda_session import cuda_available

        return cuda_available()
    gpu, why = detect_gpu()
    if gpu is None:
        return False, why
    if runtime == "tensorrt":
        version, why = tensorrt_version()
        return version is not None, why
    import onnxruntime as ort

    provider = {"ort-cuda": "CUDAExecutionProvider", "ort-tensorrt": "TensorrtExecutionProvider"}[runtime]
    ok = provider in ort.get_available_providers()
    return ok, "" if ok else f"onnxruntime has no {provider} (pip install 'gemx[gpu]')"


def precisions_here(runtime: str) -> tuple[list[str], list[str]]:
    """(the precisions `runtime` runs fast on this machine, notes on those it does not)."""
    from gemx.runtimes.cpu import bf16_native, cpu_flags

    fast, notes = [], []
    for precision in RUNTIME_PRECISIONS[runtime]:
        if precision == "bf16" and runtime == "torch-cuda":
            ok, why = _gpu_bf16()
            if not ok:
                notes.append(f"bf16: {why}")
                continue
        elif precision == "bf16" and not bf16_native()[0]:
            notes.append("bf16: no bf16 instructions on this CPU")
            continue
        fast.append(precision)
        if precision == "int8" and runtime in ("ort", "openvino") and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_flags()):
            notes.append("int8: no VNNI/AMX here, so int8 gains less")
    return fast, notes


def _gpu_bf16() -> tuple[bool, str]:
    import torch

    from gemx.runtimes.torch_cuda_session import bf16_on_gpu, cuda_available

    if not cuda_available()[0]:
        return True, ""  # no GPU at all: the runtime's own line says so
    return bf16_on_gpu(torch.cuda.get_device_name(), torch.cuda.get_device_capability())


def available_runtimes() -> list[str]:
    return [r for r in RUNTIMES if runtime_available(r)[0]]


def resolve_runtime(runtime: str) -> str:
    """A runtime name checked against this machine; `auto` stays `auto` (it is measured when a session opens)."""
    if runtime == "auto":
        return runtime
    if runtime not in RUNTIMES:
        raise GemxError(f"unknown runtime {runtime!r}; choose auto or one of {', '.join(RUNTIMES)}")
    ok, why = runtime_available(runtime)
    if not ok:
        raise GemxError(f"runtime {runtime} is not available: {why}")
    return runtime


def open_session(runtime: str, export_path: Path, precision: str = "fp32", threads: int | None = None,
                 model=None) -> Session:
    """A session over an export directory. The torch runtime runs the export's own checkpoint, or `model`.

    `auto` measures the runtimes and precisions this machine has at least as precise as `precision` (once per export
    and machine; the choice is recorded in the export) and opens the fastest; the session's `choice` says why."""
    from gemx.exporter.manifest import read_export_dir

    runtime = resolve_runtime(runtime)
    if runtime == "auto":
        from gemx.runtimes.auto import choose

        choice = choose(Path(export_path), precision, threads, model)
        session = open_session(choice.runtime, export_path, choice.precision, threads, model)
        session.choice = choice
        return session
    if not (runtime == "ort" and precision == "fp16"):  # ORT CPU runs FP16 graphs upcast: their numerics, not a speed
        check_precision(runtime, precision)
    export = read_export_dir(export_path)
    if runtime == "torch":
        import torch

        from gemx.runtimes.torch_session import TorchSession

        if threads:
            torch.set_num_threads(threads)
        if model is None:
            raise GemxError("the torch runtime needs the PyTorch model; pass a checkpoint")
        return TorchSession(model, max_refs=export.max_refs, max_size=export.max_size)
    if runtime == "torch-cuda":
        from gemx.runtimes.torch_cuda_session import TorchCudaSession

        if model is None:
            raise GemxError("the torch-cuda runtime needs the PyTorch model; pass a checkpoint")
        return TorchCudaSession(model, precision, max_refs=export.max_refs, max_size=export.max_size)
    if runtime == "tensorrt":
        from gemx.runtimes.trt_session import TensorRTSession

        return TensorRTSession(export, precision)
    if runtime == "openvino":
        from gemx.runtimes.openvino_session import OpenVinoSession

        return OpenVinoSession(export, precision, threads, compiled=_openvino_build(export, precision))
    from gemx.runtimes.ort_session import OrtSession

    provider = {"ort": "cpu", "ort-cuda": "cuda", "ort-tensorrt": "tensorrt"}[runtime]
    graphs = None
    if provider == "cpu" and precision != "fp16":
        graphs = _ort_cpu_build(export, precision)
        if graphs is None and precision == "int8":  # not built: prepared now, in memory
            from gemx.int8.ort_cpu import ort_cpu_graph

            graphs = {g: ort_cpu_graph(export.graph_path(g, precision), precision) for g in ("reference_encoder", "frame")}
    return OrtSession(export, provider, precision, threads, graphs=graphs)


def _ort_cpu_build(export, precision: str) -> dict[str, Path] | None:
    """The ORT-optimized CPU graphs from `gemx build`, when present and built from these exact graphs (for INT8,
    prepared by this gemx's preparation: an older build is passed over for the preparation done in memory).

    The export's files were just verified against the manifest's sha256, so the manifest is the reference;
    the optimized graphs are verified against their build record.
    """
    from gemx.int8.ort_cpu import preparation_revision
    from gemx.runtimes.build import ort_cpu_dir
    from gemx.runtimes.build_record import RECORD, OrtCpuBuild, built_from, read_record

    path = export.path / ort_cpu_dir(precision)
    if precision not in export.precisions or not (path / RECORD).exists():
        return None
    record = read_record(path, export, OrtCpuBuild)
    if not built_from(record, export, precision):
        return None
    if precision == "int8" and record.preparation_revision != preparation_revision():
        return None
    return {g: path / f for g, f in record.graphs.items()}


def _openvino_build(export, precision: str) -> dict[str, bytes] | None:
    """The compiled models of `gemx build --runtime openvino`, when there is a build of this precision: verified (sha256)
    and refused in one line when built from other graphs, by another OpenVINO or for another CPU."""
    from gemx.runtimes.build import openvino_dir
    from gemx.runtimes.build_record import RECORD, OpenVinoBuild, check_openvino_record, read_record

    path = export.path / openvino_dir(precision)
    if not (path / RECORD).exists():
        return None
    record = read_record(path, export, OpenVinoBuild)
    check_openvino_record(record, export)
    return {g: (path / f).read_bytes() for g, f in record.graphs.items()}


def deployed_models(checkpoints: list, runtime: str, precisions: list[str], progress=lambda msg: None) -> dict:
    """{"NAME RUNTIME PRECISION": model-like} for each checkpoint's exported graphs (exports cached per checkpoint),
    for code written against the PyTorch model's split interface. SISR baselines stay PyTorch models."""
    from gemx.exporter.cache import cached_export
    from gemx.runtimes.base import SessionModel

    runtime = resolve_runtime(runtime)
    for p in precisions:
        if runtime != "auto":
            check_precision(runtime, p)
    graphs = sorted({graph_precision(p) for p in precisions})
    models = {}
    for ckpt in checkpoints:
        if ckpt.config.arch == "sisr":
            models[ckpt.path.stem] = ckpt.model
            continue
        path, _ = cached_export(ckpt, ckpt.config.block_size, 10, graphs, progress=progress)
        for p in precisions:
            models[f"{ckpt.path.stem} {runtime} {p}"] = SessionModel(open_session(runtime, path, p, model=ckpt.model), ckpt.config)
    return models
