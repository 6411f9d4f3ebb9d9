"""The record written beside built artifacts (`build.json`), one typed record per target, and the checks a reader
runs before trusting them."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field

from gemx.errors import GemxError
from gemx.exporter.manifest import ExportDir, sha256
from gemx.fs import json_field
from gemx.records import Part, Record, omitted_when_none
from gemx.runtimes.gpu import detect_gpu, tensorrt_version

RECORD = "build.json"
TARGETS = ("ort-cpu", "tensorrt", "openvino")


class Accuracy(Part):
    """The built artifacts against the FP32 ONNX graphs (ONNX Runtime CPU), at `refs` references."""
    psnr_db: float
    max_abs_error: float
    refs: int
    frames: int
    source: str


class BuildRecord(Record):
    """What every build records: the graphs it was built from (sha256) and the sha256 of each artifact it wrote."""

    format: Literal["gemx-build"] = "gemx-build"
    version: Literal[1] = 1
    target: str
    precision: str
    onnx_sha256: dict[str, str] = Field(min_length=1)
    artifacts_sha256: dict[str, str] = Field(default_factory=dict)
    accuracy_vs_fp32_onnx: Accuracy | None = omitted_when_none()  # set after the build's accuracy gate

    def artifacts(self) -> dict[str, str]:
        """Graph name -> artifact file in the build directory."""
        raise NotImplementedError


class OrtCpuBuild(BuildRecord):
    target: Literal["ort-cpu"] = "ort-cpu"
    onnxruntime_version: str
    cpu: str
    graphs: dict[str, str]
    optimization_level: str
    prepared: str | None = omitted_when_none()  # INT8: what gemx.int8.ort_cpu did to the graphs, in words
    preparation_revision: str | None = omitted_when_none()

    def artifacts(self) -> dict[str, str]:
        return self.graphs


class OpenVinoBuild(BuildRecord):
    target: Literal["openvino"] = "openvino"
    openvino_version: str
    cpu: str
    cpu_flags: list[str]
    graphs: dict[str, str]
    graph_precision: str  # the export's graphs it compiled (bf16 compiles the fp32 graphs)

    def artifacts(self) -> dict[str, str]:
        return self.graphs


class Gpu(Part):
    name: str
    compute_capability: str


class TrtProfile(Part):
    """The optimization profile: references min/opt/max, (height, width) per profile point, largest batch."""
    min: int
    opt: int
    max: int
    sizes: dict[str, tuple[int, int]]
    max_batch: int


class TensorRTBuild(BuildRecord):
    target: Literal["tensorrt"] = "tensorrt"
    tensorrt_version: str
    strongly_typed: bool
    contract_precision: str  # the graphs that carry the precision
    gpu: Gpu
    profile: TrtProfile
    engines: dict[str, str]

    def artifacts(self) -> dict[str, str]:
        return self.engines


Build = TypeVar("Build", bound=BuildRecord)


def engine_dir(precision: str) -> str:
    return f"engines_{precision}"


def write_record(path: Path, record: BuildRecord) -> None:
    """The record, with the sha256 of every artifact it names (a reader verifies them before loading)."""
    record.artifacts_sha256 = {f: sha256(path / f) for f in record.artifacts().values()}
    record.write(path / RECORD)


def is_build(path: Path) -> bool:
    return json_field(Path(path) / RECORD, "target") in TARGETS


def read_record(path: Path, export: ExportDir, kind: type[Build], rebuild: str | None = None) -> Build:
    """A build directory's record of `kind`, refusing a malformed record or an artifact whose bytes changed since the
    build."""
    rebuild = rebuild or f"rebuild with `gemx build {export.path} --force`"
    record = kind.read(path / RECORD, rebuild)
    if set(record.artifacts().values()) != set(record.artifacts_sha256):
        raise GemxError(f"{path / RECORD} names artifacts without a sha256; {rebuild}")
    for name, want in record.artifacts_sha256.items():
        f = path / name
        if not f.is_file():
            raise GemxError(f"{f} named by the build record is missing; {rebuild}")
        if sha256(f) != want:
            raise GemxError(f"{f} does not match the sha256 in its build record (changed after the build); {rebuild}")
    return record


def read_engine_record(export: ExportDir, precision: str) -> TensorRTBuild:
    path = export.path / engine_dir(precision)
    if not (path / RECORD).exists():
        raise GemxError(f"no {precision} TensorRT engines in {export.path}; build them with `gemx build {export.path}"
                        f"{'' if precision == 'fp32' else ' --' + precision}` on the GPU that will run them")
    return read_record(path, export, TensorRTBuild)


def check_engine_record(record: TensorRTBuild, export: ExportDir) -> None:
    """Refuse engines that TensorRT would reject or that no longer match the export."""
    version, why = tensorrt_version()
    if version is None:
        raise GemxError(f"{why}; the tensorrt runtime needs it: pip install 'gemx[gpu]'")
    gpu, why = detect_gpu()
    if gpu is None:
        raise GemxError(f"TensorRT engines need an NVIDIA GPU: {why}")
    rebuild = f"rebuild with `gemx build {export.path}`"
    if record.tensorrt_version != version:
        raise GemxError(f"engines were built with TensorRT {record.tensorrt_version}, this is {version}; {rebuild}")
    if (record.gpu.name, record.gpu.compute_capability) != (gpu.name, gpu.compute_capability):
        raise GemxError(f"engines were built for {record.gpu.name} (sm {record.gpu.compute_capability}), "
                        f"this GPU is {gpu.name} (sm {gpu.compute_capability}); {rebuild}")
    if not built_from(record, export, record.contract_precision):
        raise GemxError(f"the engines were built from another export of the model; {rebuild} --force")


def check_openvino_record(record: OpenVinoBuild, export: ExportDir) -> None:
    """Refuse compiled models that were built from other graphs, by another OpenVINO, or for another CPU: OpenVINO
    would import a blob compiled for instructions this CPU lacks, and fail or run slowly. (The thread count is set
    again at import.)"""
    from gemx.runtimes.cpu import cpu_flags, cpu_model
    from gemx.runtimes.openvino_session import openvino_version

    flag = "" if record.precision == "fp32" else f" --{record.precision}"
    rebuild = f"rebuild with `gemx build {export.path} --runtime openvino{flag} --force`"
    version, why = openvino_version()
    if version is None:
        raise GemxError(f"{why}; the openvino runtime needs it: pip install openvino")
    if record.openvino_version != version:
        raise GemxError(f"the OpenVINO build was compiled by OpenVINO {record.openvino_version}, this is {version}; {rebuild}")
    if (record.cpu, record.cpu_flags) != (cpu_model(), cpu_flags()):
        raise GemxError(f"the OpenVINO build was compiled for {record.cpu} ({' '.join(record.cpu_flags)}), this CPU is "
                        f"{cpu_model()} ({' '.join(cpu_flags())}); {rebuild}")
    if not built_from(record, export, record.graph_precision):
        raise GemxError(f"the OpenVINO build was compiled from another export of the model; {rebuild}")


def built_from(record: BuildRecord, export: ExportDir, precision: str) -> bool:
    """Whether the record's graphs are the export's `precision` graphs, byte for byte."""
    return all(sha == export.graph(graph, precision).sha256 for graph, sha in record.onnx_sha256.items())
