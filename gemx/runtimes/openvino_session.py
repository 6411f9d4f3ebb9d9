"""OpenVINO on the CPU: oneDNN's AVX-512 / VNNI / BF16 / AMX kernels behind the one Session.

OpenVINO reads the export's ONNX graphs as they are, symbolic axes included:
    fp32  the FP32 graphs, computed in f32 (`INFERENCE_PRECISION_HINT=f32`): parity with PyTorch
    bf16  the same FP32 graphs, computed in bf16 where the CPU multiplies bf16 natively (refused where it would be
          emulated); frames and caches stay float32 at the graph's edges
    int8  the export's TensorRT-form QDQ graphs, with no preparation: OpenVINO fuses each Q/DQ pair into its int8
          kernels, and computes what stays float (softmax, the float logits, the bicubic frame) in bf16 where the
          CPU multiplies bf16 natively (OpenVINO's own default there; inside the int8 quality bar, docs/cpu.md), in
          f32 elsewhere
Keys and values are copied once per reference set out of the encoder's request into arrays this process owns; every
frame hands them to the frame request without a copy (`share_inputs`). Frames run a frame graph compiled for the
reference set's exact shapes, made when the references are encoded; a batch of several streams' frames runs the
symbolic graph until one compiled for its shapes is ready (compiled in the background on first sight). A build
(`gemx build --runtime openvino`) holds the compiled symbolic models, so a later session imports them instead of
compiling.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from gemx.contract import graph_precision
from gemx.errors import GemxError
from gemx.exporter.manifest import ExportDir
from gemx.runtimes.base import Session
from gemx.runtimes.cpu import bf16_native

PRECISIONS = ("fp32", "bf16", "int8")
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "bf16"}  # what OpenVINO computes the float ops in
FIXED_GEOMETRIES = 8  # (batch, reference count, frame size) whose frame graph a session keeps compiled for its shapes


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
        raise GemxError("OpenVINO is not installed; install it with: pip install openvino") from None
    return ov.Core()


def compile_config(precision: str, threads: int | None) -> dict[str, Any]:
    if precision not in PRECISIONS:
        raise GemxError(f"OpenVINO runs {', '.join(PRECISIONS)}, not {precision}")
    if precision == "bf16":
        ok, why = bf16_native()
        if not ok:
            raise GemxError(why)
    hint = INFERENCE_PRECISION[precision]
    if hint == "bf16" and precision == "int8" and not bf16_native()[0]:
        hint = "f32"  # int8's float ops: bf16 only where the CPU multiplies it natively
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


class OpenVinoSession(Session):
    def __init__(self, export: ExportDir, precision: str = "fp32", threads: int | None = None,
                 compiled: dict[str, bytes] | None = None):
        """`compiled`: the build's compiled models by graph name (imported instead of compiling the ONNX graphs)."""
        self.config = compile_config(precision, threads)
        super().__init__(export.contract(graph_precision(precision)), export.max_refs, export.max_size)
        self.name, self.precision = "openvino", precision
        self.core = core()
        models = {}
        for spec in self.contract.graphs:
            if compiled is not None:
                models[spec.name] = self.core.import_model(io.BytesIO(compiled[spec.name]), "CPU", self.config)
            else:
                models[spec.name] = self.core.compile_model(str(export.graph_path(spec.name, graph_precision(precision))), "CPU",
                                                            self.config)
        self.compiled = models
        self.encoder = models["reference_encoder"].create_infer_request()
        self.frame = models["frame"].create_infer_request()  # any geometry, until its own is compiled
        self.frame_graph = export.graph_path("frame", graph_precision(precision))
        self.fixed: OrderedDict[tuple, Any] = OrderedDict()  # geometry -> a frame request compiled for its exact shapes
        self._fixed_lock = threading.Lock()
        self._compiling: set[tuple] = set()
        self._compiler: ThreadPoolExecutor | None = None  # made on the first batch: compiles batch geometries
        self.kv_names = [s.name for s in self.contract.kv]

    def _encode(self, references: np.ndarray) -> dict[str, np.ndarray]:
        self.encoder.infer({"references": references}, share_inputs=True)
        kv = {name: self.encoder.get_tensor(name).data.copy() for name in self.kv_names}  # owned: the next encode reuses
        scale = self.contract.config.scale
        target = (1, 3, references.shape[2] // scale, references.shape[3] // scale)
        self._fixed_frame(target, kv)  # compiled now, with the references, so no frame of the call waits for it
        return kv

    def _decode(self, target_lr: np.ndarray, kv: dict[str, np.ndarray]) -> np.ndarray:
        key = _geometry(target_lr.shape, kv)
        with self._fixed_lock:
            request = self.fixed.get(key)
        if request is None:
            request = self.frame
            if target_lr.shape[0] > 1:
                self._compile_later(target_lr.shape, kv)
        request.infer({"target_lr": target_lr, **kv}, share_inputs=True)
        return request.get_tensor("frame_hr").data.copy()

    def _fixed_frame(self, target: tuple[int, ...], kv: dict[str, np.ndarray]):
        """The frame graph compiled for one geometry's exact shapes: OpenVINO's CPU kernels run static shapes faster
        than the symbolic graph, for one compile per batch, reference count and frame size (measured in docs/cpu.md).
        The most recent FIXED_GEOMETRIES are kept; a geometry without one runs the symbolic graph."""
        key = _geometry(target, kv)
        with self._fixed_lock:
            if key in self.fixed:
                self.fixed.move_to_end(key)
                return self.fixed[key]
        model = self.core.read_model(str(self.frame_graph))
        model.reshape({"target_lr": list(target), **{name: list(shape) for name, shape in _shapes(kv).items()}})
        request = self.core.compile_model(model, "CPU", self.config).create_infer_request()
        with self._fixed_lock:
            self.fixed[key] = request
            if len(self.fixed) > FIXED_GEOMETRIES:
                self.fixed.popitem(last=False)
        return request

    def _compile_later(self, target: tuple[int, ...], kv: dict[str, np.ndarray]) -> None:
        """Compile a batch geometry's frame graph in the background: the batch that first shows it, and those after
        it until the compile is done, run the symbolic graph rather than wait."""
        key = _geometry(target, kv)
        with self._fixed_lock:
            if key in self._compiling:
                return
            self._compiling.add(key)
            self._compiler = self._compiler or ThreadPoolExecutor(1, thread_name_prefix="gemx-openvino-compile")
        shapes = _shapes(kv)  # the shapes only: the batch's arrays are not kept

        def compile_it():
            try:
                self._fixed_frame(tuple(target), shapes)
            finally:
                with self._fixed_lock:
                    self._compiling.discard(key)

        self._compiler.submit(compile_it)

    def close(self) -> None:
        if self._compiler is not None:
            self._compiler.shutdown(wait=True, cancel_futures=True)
            self._compiler = None
        super().close()


def _shapes(kv: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Each cache tensor's shape (`kv` holds arrays, or already their shapes)."""
    return {name: tuple(value) if isinstance(value, tuple) else value.shape for name, value in kv.items()}


def _geometry(target: tuple[int, ...], kv: dict[str, Any]) -> tuple:
    return (tuple(target), *_shapes(kv).values())


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
