"""The record written beside built artifacts, and the checks a reader runs before trusting them."""

from __future__ import annotations

import json
from pathlib import Path

from gemx.errors import GemxError
from gemx.exporter.manifest import ExportDir, sha256
from gemx.fs import atomic_write, json_field
from gemx.runtimes.gpu import detect_gpu, tensorrt_version

RECORD = "build.json"


def engine_dir(precision: str) -> str:
    return f"engines_{precision}"


def _artifacts(record: dict) -> dict[str, str]:
    return record.get("engines") or record.get("graphs") or {}


def write_record(path: Path, record: dict) -> None:
    """The record, with the sha256 of every artifact it names (a reader verifies them before loading)."""
    record["artifacts_sha256"] = {f: sha256(path / f) for f in _artifacts(record).values()}
    atomic_write(path / RECORD, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))


def is_build(path: Path) -> bool:
    return json_field(Path(path) / RECORD, "target") in ("ort-cpu", "tensorrt", "openvino")


def read_record(path: Path, export: ExportDir) -> dict:
    """A build directory's record, refusing a corrupt record or an artifact whose bytes changed since the build."""
    rebuild = f"rebuild with `gemx build {export.path} --force`"
    try:
        record = json.loads((path / RECORD).read_text())
        artifacts, hashes = _artifacts(record), record["artifacts_sha256"]
        if not isinstance(record["onnx_sha256"], dict) or not artifacts or set(artifacts.values()) != set(hashes):
            raise ValueError("it names no artifacts, or artifacts without a sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise GemxError(f"the build record {path / RECORD} is corrupt ({e}); {rebuild}") from None
    for name, want in hashes.items():
        f = path / name
        if not f.is_file():
            raise GemxError(f"{f} named by the build record is missing; {rebuild}")
        if sha256(f) != want:
            raise GemxError(f"{f} does not match the sha256 in its build record (changed after the build); {rebuild}")
    return record


def read_engine_record(export: ExportDir, precision: str) -> dict:
    path = export.path / engine_dir(precision)
    if not (path / RECORD).exists():
        raise GemxError(f"no {precision} TensorRT engines in {export.path}; build them with `gemx build {export.path}"
                        f"{'' if precision == 'fp32' else ' --' + precision}` on the GPU that will run them")
    record = read_record(path, export)
    record["dir"] = engine_dir(precision)
    return record


def check_engine_record(record: dict, export: ExportDir) -> None:
    """Refuse engines that TensorRT would reject or that no longer match the export."""
    version, why = tensorrt_version()
    if version is None:
        raise GemxError(f"{why}; the tensorrt runtime needs it: pip install 'gemx[gpu]'")
    gpu, why = detect_gpu()
    if gpu is None:
        raise GemxError(f"TensorRT engines need an NVIDIA GPU: {why}")
    rebuild = f"rebuild with `gemx build {export.path}`"
    if record["tensorrt_version"] != version:
        raise GemxError(f"engines were built with TensorRT {record['tensorrt_version']}, this is {version}; {rebuild}")
    if (record["gpu"]["name"], record["gpu"]["compute_capability"]) != (gpu.name, gpu.compute_capability):
        raise GemxError(f"engines were built for {record['gpu']['name']} (sm {record['gpu']['compute_capability']}), "
                        f"this GPU is {gpu.name} (sm {gpu.compute_capability}); {rebuild}")
    for graph, sha in record["onnx_sha256"].items():
        want = export.manifest["precisions"][record["contract_precision"]]["graphs"][graph]["sha256"]
        if sha != want:
            raise GemxError(f"engine for {graph} was built from another export of the model; {rebuild} --force")


def check_openvino_record(record: dict, export: ExportDir) -> None:
    """Refuse compiled models that were built from other graphs, by another OpenVINO, or for another CPU: OpenVINO
    would import a blob compiled for instructions this CPU lacks, and fail or run slowly. (The thread count is set
    again at import.)"""
    from gemx.runtimes.cpu import cpu_flags, cpu_model
    from gemx.runtimes.openvino_session import openvino_version

    flag = "" if record["precision"] == "fp32" else f" --{record['precision']}"
    rebuild = f"rebuild with `gemx build {export.path} --runtime openvino{flag} --force`"
    version, why = openvino_version()
    if version is None:
        raise GemxError(f"{why}; the openvino runtime needs it: pip install openvino")
    if record["openvino_version"] != version:
        raise GemxError(f"the OpenVINO build was compiled by OpenVINO {record['openvino_version']}, this is {version}; {rebuild}")
    if (record["cpu"], record["cpu_flags"]) != (cpu_model(), cpu_flags()):
        raise GemxError(f"the OpenVINO build was compiled for {record['cpu']} ({' '.join(record['cpu_flags'])}), this CPU is "
                        f"{cpu_model()} ({' '.join(cpu_flags())}); {rebuild}")
    for graph, sha in record["onnx_sha256"].items():
        if sha != export.manifest["precisions"][record["graph_precision"]]["graphs"][graph]["sha256"]:
            raise GemxError(f"the OpenVINO build of {graph} was compiled from another export of the model; {rebuild}")
