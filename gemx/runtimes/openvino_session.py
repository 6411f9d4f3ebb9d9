"""OpenVINO on the CPU: oneDNN's AVX-512 / VNNI / BF16 / AMX kernels behind the one Session.

OpenVINO reads the export's ONNX graphs as they are, symbolic axes included:
    fp32  the FP32 graphs, computed in f32 (`INFERENCE_PRECISION_HINT=f32`): parity with PyTorch
    bf16  the same FP32 graphs, computed in bf16 where the CPU multiplies bf16 natively (refused where it would be
          emulated); frames and caches stay float32 at the graph's edges
    int8  the export's TensorRT-form QDQ graphs, with no preparation: OpenVINO fuses each Q/DQ pair into its int8
          kernels, and computes what stays float in f32
Both graphs run compiled for exact shapes, which OpenVINO's CPU kernels run faster than symbolic ones (docs/cpu.md):
the encoder for each reference set's shape, compiled at its first encode (a fresh request per encode, so its buffers
are not held between sets), and the frame graph for the set's geometry, compiled with it so that no frame of the call
waits. The encoder blocks its keys from the layout its convolutions leave (`keys_blocked_from_nhwc`: the same bits,
3-10% faster encodes; the export's graphs keep the form ONNX Runtime runs faster). Keys and values are copied once
per reference set out of the encoder's request into arrays this process owns;
every frame hands them to the frame request without a copy (`share_inputs`). A batch of several streams' frames runs
the symbolic frame graph until one compiled for its shapes is ready (compiled in the background on first sight). A
build (`gemx build --runtime openvino`) holds the compiled symbolic frame graph, so a later session imports it instead
of compiling.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable
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
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # what OpenVINO computes the float ops in
FIXED_GEOMETRIES = 8  # reference-set shapes (encoder) and (batch, reference count, frame size) geometries (frame graph)
#                      a session keeps compiled, each


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
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision]}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


class OpenVinoSession(Session):
    def __init__(self, export: ExportDir, precision: str = "fp32", threads: int | None = None,
                 compiled: dict[str, bytes] | None = None):
        """`compiled`: the build's compiled symbolic models by graph name (imported instead of compiling)."""
        self.config = compile_config(precision, threads)
        super().__init__(export.contract(graph_precision(precision)), export.max_refs, export.max_size)
        self.name, self.precision = "openvino", precision
        self.core = core()
        self.graphs = {g: export.graph_path(g, graph_precision(precision)) for g in ("reference_encoder", "frame")}
        if compiled is not None:
            frame = self.core.import_model(io.BytesIO(compiled["frame"]), "CPU", self.config)
        else:
            frame = self.core.compile_model(str(self.graphs["frame"]), "CPU", self.config)
        self.frame = frame.create_infer_request()  # any geometry, until its own is compiled
        self.encoders: OrderedDict[tuple, Any] = OrderedDict()  # references' shape -> the encoder compiled for it
        self.fixed: OrderedDict[tuple, Any] = OrderedDict()  # geometry -> a frame request compiled for its exact shapes
        self._fixed_lock = threading.Lock()
        self._compiling: set[tuple] = set()
        self._compiler: ThreadPoolExecutor | None = None  # made on the first batch: compiles batch geometries
        self.kv_names = [s.name for s in self.contract.kv]

    def _encode(self, references: np.ndarray) -> dict[str, np.ndarray]:
        shape = tuple(references.shape)
        encoder = self._kept(self.encoders, shape, lambda: self._compile("reference_encoder", {"references": shape}))
        request = encoder.create_infer_request()
        request.infer({"references": references}, share_inputs=True)
        kv = {name: request.get_tensor(name).data.copy() for name in self.kv_names}  # owned, past the request
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
        """A frame request compiled for one geometry's exact shapes (one compile per batch, reference count and frame
        size); a geometry without one runs the symbolic graph."""
        shapes = {"target_lr": tuple(target), **_shapes(kv)}
        return self._kept(self.fixed, _geometry(target, kv), lambda: self._compile("frame", shapes).create_infer_request())

    def _compile(self, graph: str, shapes: dict[str, tuple[int, ...]]):
        model = self.core.read_model(str(self.graphs[graph]))
        model.reshape({name: list(shape) for name, shape in shapes.items()})
        if graph == "reference_encoder":
            keys_blocked_from_nhwc(model, [spec.name for spec in self.contract.keys])
        return self.core.compile_model(model, "CPU", self.config)

    def _kept(self, kept: OrderedDict, key: tuple, make: Callable[[], Any]):
        """`kept[key]`, made on first sight (outside the lock: a compile takes a while, and frames of other geometries
        go on); the most recent FIXED_GEOMETRIES are kept."""
        with self._fixed_lock:
            if key in kept:
                kept.move_to_end(key)
                return kept[key]
        value = make()
        with self._fixed_lock:
            kept[key] = value
            if len(kept) > FIXED_GEOMETRIES:
                kept.popitem(last=False)
        return value

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


def keys_blocked_from_nhwc(model, keys: list[str]) -> int:
    """Rewrite an encoder with static shapes so that each key is blocked from NHWC; returns the keys rewritten.

    The export blocks keys [N*R, C, H, W] -> [M, C, R, BB] by one permute of their NCHW split (`key_blocks`), the
    form ONNX Runtime runs fastest. OpenVINO's convolutions leave NHWC, so it reorders to NCHW before that permute,
    then permutes: two passes over the largest float tensor of the encode. Here the key is first transposed to NHWC,
    which OpenVINO drops as its layout already, and the same permute is taken from that split. Data movement only:
    the keys are the same bits (tested). A key of another form is left as it is."""
    import openvino.opset13 as ops

    def const(values):
        return ops.constant(np.array(values, np.int64))

    rewritten = 0
    for result in model.outputs:
        if result.any_name not in keys:
            continue
        node = result.get_node()
        while node.get_type_name() in ("Result", "Convert", "FakeQuantize", "Reshape"):  # its quantization, final view
            node = node.input_value(0).get_node()
        if node.get_type_name() != "Transpose":
            continue
        split, perm = (node.input_value(i).get_node() for i in (0, 1))
        if split.get_type_name() != "Reshape" or perm.get_type_name() != "Constant":
            continue
        source, perm = split.input_value(0), list(perm.get_vector())
        if split.get_output_partial_shape(0).rank.get_length() != 7 or not source.get_partial_shape().is_static:
            continue
        n, r, c, hb, b, wb, b2 = split.get_output_partial_shape(0).to_shape()
        if list(source.get_shape())[-3:] != [c, hb * b, wb * b2]:
            continue
        nhwc = ops.transpose(ops.reshape(source, const([n * r, c, hb * b, wb * b2]), False), const([0, 2, 3, 1]))
        moved = [0, 1, 6, 2, 3, 4, 5]  # where each axis of the NCHW split sits in the NHWC one
        blocks = ops.transpose(ops.reshape(nhwc, const([n, r, hb, b, wb, b2, c]), False), const([moved[p] for p in perm]))
        node.output(0).replace(blocks.output(0))
        rewritten += 1
    model.validate_nodes_and_infer_types()
    return rewritten


def _shapes(kv: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Each cache tensor's shape (`kv` holds arrays, or already their shapes)."""
    return {name: tuple(value) if isinstance(value, tuple) else value.shape for name, value in kv.items()}


def _geometry(target: tuple[int, ...], kv: dict[str, Any]) -> tuple:
    return (tuple(target), *_shapes(kv).values())


def export_compiled(export: ExportDir, precision: str, out: Path) -> dict[str, str]:
    """Compile the symbolic frame graph (the one graph a session compiles before it sees a shape) for this CPU and
    write the compiled model into `out`; returns graph -> file name. (A session sets its thread count when it imports
    it.)"""
    compiled = core().compile_model(str(export.graph_path("frame", graph_precision(precision))), "CPU",
                                    compile_config(precision, None))
    (out / "frame.blob").write_bytes(compiled.export_model().getvalue())
    return {"frame": "frame.blob"}
