"""The record written beside built artifacts, and the checks a reader runs before trusting them."""

from __future__ import annotations

import json
from pathlib import Path

from gemx.errors import GemxError
from gemx.exporter.manifest import ExportDir
from gemx.fs import atomic_write
from gemx.runtimes.gpu import detect_gpu, tensorrt_version

RECORD = "build.json"


def engine_dir(precision: str) -> str:
    return f"engines_{precision}"


def write_record(path: Path, record: dict) -> None:
    atomic_write(path / RECORD, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))


def read_engine_record(export: ExportDir, precision: str) -> dict:
    path = export.path / engine_dir(precision) / RECORD
    if not path.exists():
        raise GemxError(f"no {precision} TensorRT engines in {export.path}; build them with `gemx build {export.path}"
                        f"{' --fp16' if precision == 'fp16' else ''}` on the GPU that will run them")
    record = json.loads(path.read_text())
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
