"""manifest.json: what an export directory holds, and the check every reader runs before using it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import onnx

import gemx
from gemx.contract import VALIDATE_BATCH, Contract, GraphSpec
from gemx.errors import GemxError
from gemx.fs import atomic_write, json_field
from gemx.model.config import ModelConfig
from gemx.revision import code_revision

FORMAT = "gemx-export"
VERSION = 1
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


def graph_entry(spec: GraphSpec, path: Path, proto: onnx.ModelProto) -> dict:
    return {
        "file": path.name,
        "sha256": sha256(path),
        "inputs": [s.to_dict() for s in spec.inputs],
        "outputs": [s.to_dict() for s in spec.outputs],
        "op_counts": _op_counts(proto),
    }


def _op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in proto.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


def content_sha256(manifest: dict) -> str:
    """The manifest's own hash (over every field but this one): a hand-edited manifest no longer matches."""
    body = {k: v for k, v in manifest.items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = out_dir / MANIFEST
    manifest["content_sha256"] = content_sha256(manifest)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    return path


@dataclass
class ExportDir:
    """A checked export directory: its manifest, model config and the graph files per precision."""

    path: Path
    manifest: dict

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["model"]["config"])

    @property
    def max_refs(self) -> int:
        return int(self.manifest["refs"]["max"])

    @property
    def max_size(self) -> tuple[int, int] | None:
        """The largest (height, width) the graphs were validated at; None for a fixed-size export."""
        size = self.manifest.get("spatial", {}).get("max_size")
        return tuple(size) if size else None

    @property
    def precisions(self) -> list[str]:
        return list(self.manifest["precisions"])

    def contract(self, precision: str = "fp32") -> Contract:
        return Contract(self.config, precision)

    def graph_path(self, graph: str, precision: str = "fp32") -> Path:
        if precision not in self.manifest["precisions"]:
            raise GemxError(f"{self.path} has no {precision} graphs; re-export with `gemx export --{precision}`")
        return self.path / self.manifest["precisions"][precision]["graphs"][graph]["file"]


def is_export(path: Path) -> bool:
    """A folder is an export when its manifest says so, not merely because it holds a `manifest.json`."""
    return json_field(Path(path) / MANIFEST, "format") == FORMAT


def read_export_dir(path: Path, verify: bool = True) -> ExportDir:
    """Open an export directory, refusing one whose files do not match its manifest."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.exists():
        raise GemxError(f"{path} is not a gemx export directory (no {MANIFEST}); create one with `gemx export`")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise GemxError(f"{mpath} is corrupt ({e}); re-run `gemx export --force`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GemxError(f"{mpath} is not a gemx export manifest")
    if not isinstance(manifest.get("version"), int):
        raise GemxError(f"{mpath} is malformed (no integer version); re-run `gemx export --force`")
    if manifest["version"] > VERSION:
        raise GemxError(f"{mpath} has format version {manifest['version']}; this gemx reads up to {VERSION}, upgrade gemx")
    if "content_sha256" not in manifest:
        raise GemxError(f"{mpath} has no content hash (written by an older gemx); re-run `gemx export --force`")
    if manifest.get("content_sha256") != content_sha256(manifest):
        raise GemxError(f"{mpath} was changed after export (its content no longer matches its recorded sha256); "
                        "re-run `gemx export --force`")
    _check_fields(manifest, mpath)
    export = ExportDir(path, manifest)
    for precision, entry in manifest["precisions"].items():
        if entry["graphs"]["frame"].get("inputs") != [s.to_dict() for s in export.contract(precision).frame.inputs]:
            raise GemxError(f"{path} was exported by an older gemx: its {precision} graphs lay out the reference cache "
                            "differently from this gemx's; re-run `gemx export --force`")
    if verify:
        for precision, entry in manifest["precisions"].items():
            for graph in entry["graphs"].values():
                f = path / graph["file"]
                if not f.exists():
                    raise GemxError(f"{f} named by the manifest is missing; re-run `gemx export --force`")
                if sha256(f) != graph["sha256"]:
                    raise GemxError(f"{f} does not match the sha256 in its manifest ({precision}); it was changed "
                                    "after export: re-run `gemx export --force`")
    return export


def _check_fields(manifest: dict, mpath: Path) -> None:
    """Every field a reader uses, with its type; the refs range must be the validated one."""
    try:
        ModelConfig.from_dict(manifest["model"]["config"])
        refs = manifest["refs"]
        validated = refs["validated"]
        if not (isinstance(refs["max"], int) and isinstance(validated, list) and validated
                and all(isinstance(r, int) and r >= 1 for r in validated)):
            raise TypeError("refs.max and refs.validated must be positive integers")
        if refs["max"] != max(validated):
            raise ValueError(f"refs.max {refs['max']} is not the largest validated reference count {max(validated)} "
                             "(edited by hand?)")
        precisions = manifest["precisions"]
        if not isinstance(precisions, dict) or "fp32" not in precisions:
            raise TypeError("precisions must map fp32 (and more) to graphs")
        for entry in precisions.values():
            for graph in ("reference_encoder", "frame"):
                g = entry["graphs"][graph]
                if not (isinstance(g["file"], str) and "/" not in g["file"] and isinstance(g["sha256"], str)):
                    raise TypeError(f"graph entry {graph} needs a plain file name and a sha256")
    except GemxError as e:
        raise GemxError(f"{mpath}: {e}; re-run `gemx export --force`") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"missing {e}" if isinstance(e, KeyError) else str(e)
        raise GemxError(f"{mpath} is malformed ({what}); re-run `gemx export --force`") from None


def new_manifest(config: ModelConfig, params: int, opset: int, max_refs: int, validated: list[int], source: dict,
                 max_size: tuple[int, int] | None = None) -> dict:
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "gemx_version": gemx.__version__,
        "graphs_revision": graphs_revision(),
        "model": {"config": config.to_dict(), "parameters": params, "checkpoint": source},
        "opset": opset,
        "refs": {"axis": "refs", "min": 1, "max": max_refs, "validated": validated},
        # frames of several streams in one frame-graph run, checked against the same frames one by one
        "batch": {"axis": "batch", "validated": VALIDATE_BATCH},
        "precisions": {},
    }
    if max_size is not None:  # graphs of any size on the grid, up to this one
        manifest["spatial"] = {"axes": ["height", "width"], "grid": config.grid, "max_size": list(max_size)}
    return manifest
