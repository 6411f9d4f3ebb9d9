"""OpenVINO on the CPU: oneDNN's AVX-512 / VNNI / BF16 / AMX kernels behind the one Session.

OpenVINO reads the export's ONNX graphs as they are, symbolic axes included:
    fp32  the FP32 graphs, computed in f32 (`INFERENCE_PRECISION_HINT=f32`): parity with PyTorch
    bf16  the same FP32 graphs, computed in bf16 where the CPU multiplies bf16 natively (refused where it would be
          emulated); frames and caches stay float32 at the graph's edges
    int8  the export's TensorRT-form QDQ graphs, with no preparation: OpenVINO fuses each Q/DQ pair into its int8
          kernels, and computes what stays float in f32
Keys and values are copied once per reference set out of the encoder's request into arrays this process owns; every
frame hands them to the frame request without a copy (`share_inputs`). A build (`gemx build --runtime openvino`)
holds the compiled models, so a later session imports them instead of compiling.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from gemx.errors import GemxError
from gemx.exporter.contract import graph_precision
from gemx.exporter.manifest import ExportDir
from gemx.runtimes.base import Session, missing_backend
from gemx.runtimes.cpu import bf16_native

PRECISIONS = ("fp32", "bf16", "int8")
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # what OpenVINO computes the float ops in


def openvino_version() -> tuple[str | None, str]:
    try:
        import openvino
    except ImportError:
        return None, "OpenVINO is not installed"
    return openvino.get_version().split("-")[0], ""


def core():
    try:
        import openvino as ov
    except ImportError:
        raise missing_backend("OpenVINO is not installed", "") from None
    return ov.Core()


def compile_config(precision: str, threads: int | None) -> dict[str, Any]:
    if precision not in PRECISIONS:
        raise GemxError(f"OpenVINO runs {', '.join(PRECISIONS)}, not {precision}")
    if precision == "bf16":
        ok, why = bf16_native()
        if not ok:
            raise GemxError(why)
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision]}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


class OpenVinoSession(Session):
    def __init__(self, export: ExportDir, precision: str = "fp32", threads: int | None = None,
                 compiled: dict[str, bytes] | None = None):
        """`compiled`: the build's compiled models by graph name (imported instead of compiling the ONNX graphs)."""
        config = compile_config(precision, threads)
        super().__init__(export.contract(graph_precision(precision)), export.max_refs, export.max_size)
        self.name, self.precision = "openvino", precision
        ov = core()
        models = {}
        for spec in self.contract.graphs:
            if compiled is not None:
                models[spec.name] = ov.import_model(io.BytesIO(compiled[spec.name]), "CPU", config)
            else:
                models[spec.name] = ov.compile_model(str(export.graph_path(spec.name, graph_precision(precision))), "CPU", config)
        self.compiled = models
        self.encoder = models["reference_encoder"].create_infer_request()
        self.frame = models["frame"].create_infer_request()
        self.kv_names = [s.name for s in self.contract.kv]

    def _encode(self, references: np.ndarray) -> dict[str, np.ndarray]:
        self.encoder.infer({"references": references}, share_inputs=True)
        return {name: self.encoder.get_tensor(name).data.copy() for name in self.kv_names}  # owned: the next encode reuses

    def _decode(self, target_lr: np.ndarray, kv: dict[str, np.ndarray]) -> np.ndarray:
        self.frame.infer({"target_lr": target_lr, **kv}, share_inputs=True)
        return self.frame.get_tensor("frame_hr").data.copy()


def export_compiled(export: ExportDir, precision: str, out: Path) -> dict[str, str]:
    """Compile both graphs for this CPU and write each compiled model into `out`; returns graph -> file name. (A
    session sets its thread count when it imports them.)"""
    ov = core()
    config = compile_config(precision, None)
    files = {}
    for graph in ("reference_encoder", "frame"):
        compiled = ov.compile_model(str(export.graph_path(graph, graph_precision(precision))), "CPU", config)
        files[graph] = f"{graph}.blob"
        (out / files[graph]).write_bytes(compiled.export_model().getvalue())
    return files
