"""manifest.json: what an export directory holds, and the check every reader runs before using it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import onnx
from pydantic import Field, PositiveInt, field_validator, model_validator

import gemx
from gemx.contract import VALIDATE_BATCH, Contract, GraphSpec
from gemx.errors import GemxError
from gemx.fs import json_field
from gemx.model.config import ModelConfig
from gemx.records import Part, Record, omitted_when_none
from gemx.revision import code_revision

# What decides the graphs gemx writes for a checkpoint and options: an export cached by other code (an older
# gemx, another torch or ONNX Runtime) is made again instead of measured as if current.
GRAPH_SOURCES = ("contract.py", "model/config.py", "model/network.py", "model/lr.py", "exporter/graphs.py",
                 "exporter/onnx_export.py", "exporter/spatial.py", "exporter/export.py", "int8/calibrate.py",
                 "int8/qdq.py", "int8/graph.py")
GRAPH_LIBRARIES = ("torch", "onnx", "onnxscript", "onnxruntime")


def graphs_revision() -> str:
    return code_revision(*GRAPH_SOURCES, libraries=GRAPH_LIBRARIES)


MANIFEST = "manifest.json"
# What runtimes write into an export after it was made (ONNX Runtime's TensorRT engine cache, TensorRT's timing
# cache, `--runtime auto`'s measured choices): gemx's too, so `gemx export --force` may replace them with the rest.
TRT_EP_CACHE = "ort_trt_cache"
TIMING_CACHE = "timing.cache"
AUTO_RECORD = "auto.json"
WRITTEN_LATER = (TRT_EP_CACHE, TIMING_CACHE, AUTO_RECORD)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CheckpointFile(Part):
    file: str
    sha256: str


class ModelEntry(Part):
    config: dict[str, Any]  # a ModelConfig's fields
    parameters: int
    checkpoint: CheckpointFile

    @field_validator("config")
    @classmethod
    def _a_model_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        try:
            ModelConfig.from_dict(config)
        except (GemxError, TypeError) as e:
            raise ValueError(str(e)) from None
        return config


class Refs(Part):
    """The reference axis: the graphs take 1..max references; parity was checked at each of `validated`."""
    axis: Literal["refs"] = "refs"
    min: Literal[1] = 1
    max: int
    validated: list[PositiveInt] = Field(min_length=1)

    @model_validator(mode="after")
    def _max_is_validated(self) -> Self:
        if self.max != max(self.validated):
            raise ValueError(f"refs.max {self.max} is not the largest validated reference count {max(self.validated)} "
                             "(edited by hand?)")
        return self


class Batch(Part):
    """Frames of several streams in one frame-graph run, checked against the same frames one by one."""
    axis: Literal["batch"] = "batch"
    validated: PositiveInt


class Tensor(Part):
    name: str
    shape: list[int | str]
    dtype: str


class GraphFile(Part):
    file: str = Field(pattern=r"^[^/\\]+$")  # a plain file name inside the export
    sha256: str
    inputs: list[Tensor]
    outputs: list[Tensor]
    op_counts: dict[str, int]


class Parity(Part):
    refs: int
    max_abs_error: float
    psnr_db: float
    size: list[int] | None  # HR height and width (the frames' own when None)


class Int8Calibration(Part):
    source: str
    frames: int
    block_size: int
    table: str
    table_sha256: str
    shipped: bool


class Quantization(Part):
    method: str
    format: str
    activations: str
    weights: str
    quantized_ops: list[str]
    kept_fp32: dict[str, list[str]]
    frame_head: str
    calibration: Int8Calibration


class Precision(Part):
    """One precision's pair of graphs, and how close they came to their reference."""
    graphs: dict[Literal["reference_encoder", "frame"], GraphFile]
    parity: list[Parity]
    parity_against: str
    batch_max_abs_error: float
    quantization: Quantization | None = omitted_when_none()

    @field_validator("graphs")
    @classmethod
    def _both_graphs(cls, graphs: dict) -> dict:
        if set(graphs) != {"reference_encoder", "frame"}:
            raise ValueError("a precision needs both graphs, reference_encoder and frame")
        return graphs


class Spatial(Part):
    """Graphs of any size on the grid, validated up to `max_size` (height, width)."""
    axes: list[str] = Field(default_factory=lambda: ["height", "width"])
    grid: PositiveInt
    max_size: tuple[PositiveInt, PositiveInt]


class ExportManifest(Record):
    """manifest.json: what an export holds, the sha256 of each graph, and the manifest's own hash."""

    format: Literal["gemx-export"] = "gemx-export"
    version: Literal[1] = 1
    gemx_version: str = gemx.__version__
    graphs_revision: str = Field(default_factory=lambda: graphs_revision())
    model: ModelEntry
    opset: int
    refs: Refs
    batch: Batch = Batch(validated=VALIDATE_BATCH)
    precisions: dict[str, Precision]
    spatial: Spatial | None = omitted_when_none()
    content_sha256: str = ""

    @field_validator("precisions")
    @classmethod
    def _fp32_first(cls, precisions: dict[str, Precision]) -> dict[str, Precision]:
        if "fp32" not in precisions:
            raise ValueError("precisions must map fp32 (and more) to graphs")
        return precisions

    @classmethod
    def check_raw(cls, data: dict, path: Path, redo: str) -> None:
        if "content_sha256" not in data:
            raise GemxError(f"{path} has no content hash (written by an older gemx); {redo}")
        if data["content_sha256"] != content_sha256(data):
            raise GemxError(f"{path} was changed after export (its content no longer matches its recorded sha256); {redo}")

    def write(self, path: Path) -> None:
        self.content_sha256 = content_sha256(self.to_dict())
        super().write(path)

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model.config)


def graph_file(spec: GraphSpec, path: Path, proto: onnx.ModelProto) -> GraphFile:
    return GraphFile(file=path.name, sha256=sha256(path), inputs=[Tensor(**s.to_dict()) for s in spec.inputs],
                     outputs=[Tensor(**s.to_dict()) for s in spec.outputs], op_counts=_op_counts(proto))


def _op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in proto.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


def content_sha256(manifest: dict) -> str:
    """The manifest's own hash (over every field but this one): a hand-edited manifest no longer matches."""
    body = {k: v for k, v in manifest.items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass
class ExportDir:
    """A checked export directory: its manifest, model config and the graph files per precision."""

    path: Path
    manifest: ExportManifest

    @property
    def config(self) -> ModelConfig:
        return self.manifest.config

    @property
    def max_refs(self) -> int:
        return self.manifest.refs.max

    @property
    def max_size(self) -> tuple[int, int] | None:
        """The largest (height, width) the graphs were validated at; None for a fixed-size export."""
        return self.manifest.spatial.max_size if self.manifest.spatial else None

    @property
    def precisions(self) -> list[str]:
        return list(self.manifest.precisions)

    def contract(self, precision: str = "fp32") -> Contract:
        return Contract(self.config, precision)

    def graph(self, graph: str, precision: str = "fp32") -> GraphFile:
        if precision not in self.manifest.precisions:
            raise GemxError(f"{self.path} has no {precision} graphs; re-export with `gemx export --{precision}`")
        return self.manifest.precisions[precision].graphs[graph]

    def graph_path(self, graph: str, precision: str = "fp32") -> Path:
        return self.path / self.graph(graph, precision).file


def is_export(path: Path) -> bool:
    """A folder is an export when its manifest says so, not merely because it holds a `manifest.json`."""
    return json_field(Path(path) / MANIFEST, "format") == ExportManifest.kind()[0]


def read_export_dir(path: Path, verify: bool = True) -> ExportDir:
    """Open an export directory, refusing one whose files do not match its manifest."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.exists():
        raise GemxError(f"{path} is not a gemx export directory (no {MANIFEST}); create one with `gemx export`")
    export = ExportDir(path, ExportManifest.read(mpath, "re-run `gemx export --force`"))
    for precision, entry in export.manifest.precisions.items():
        if [t.model_dump() for t in entry.graphs["frame"].inputs] != [s.to_dict() for s in export.contract(precision).frame.inputs]:
            raise GemxError(f"{path} was exported by an older gemx: its {precision} graphs lay out the reference cache "
                            "differently from this gemx's; re-run `gemx export --force`")
    if verify:
        for precision, entry in export.manifest.precisions.items():
            for graph in entry.graphs.values():
                f = path / graph.file
                if not f.exists():
                    raise GemxError(f"{f} named by the manifest is missing; re-run `gemx export --force`")
                if sha256(f) != graph.sha256:
                    raise GemxError(f"{f} does not match the sha256 in its manifest ({precision}); it was changed "
                                    "after export: re-run `gemx export --force`")
    return export
