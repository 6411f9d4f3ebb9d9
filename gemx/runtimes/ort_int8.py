"""The export's INT8 graphs in the form ONNX Runtime's x86 CPU kernels fuse.

The export writes QDQ in TensorRT's form: symmetric int8 activations (zero point 0) and float biases.
ONNX Runtime's x86 kernels are u8 x s8 (VNNI), and its Conv fusion wants a Q right after the Conv,
int32 biases and matching input/output types. So, tensor by tensor, with the same calibrated ranges:
- an activation that comes out of a Relu becomes uint8 with zero point 0 over the same [0, amax]: 255
  steps instead of 127, and Relu -> Q is then a clamp ONNX Runtime folds away, leaving Conv -> Q; so do the
  attention probabilities (a Softmax's output, in [0, 1]);
- any other activation becomes uint8 with zero point 128 and the same scale (the same grid, shifted);
- each quantized Conv's float bias becomes int32 at scale x_scale * w_scale, as QLinearConv needs.
Weights stay int8 per channel. Nothing else changes; the result is checked against FP32 like any build.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from gemx.exporter.quantize import graph_links

QUANTIZE, DEQUANTIZE = "QuantizeLinear", "DequantizeLinear"


def prepare_for_ort_cpu(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a TensorRT-form QDQ graph rewritten for ONNX Runtime's CPU provider."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    producer, consumers = graph_links(g)

    def add(array: np.ndarray, name: str) -> str:
        g.initializer.append(numpy_helper.from_array(array, name))
        inits[name] = g.initializer[-1]
        return name

    value = lambda name: numpy_helper.to_array(inits[name])  # noqa: E731
    for q in [n for n in g.node if n.op_type == QUANTIZE]:
        if q.input[0] in inits or len(q.input) < 3:
            continue  # a weight, or no zero point
        zero = value(q.input[2])
        users = consumers.get(q.output[0], [])
        if zero.dtype != np.int8 or zero.any() or not users or not all(u.op_type == DEQUANTIZE for u in users):
            continue  # not symmetric int8, or a graph output (the int8 value cache keeps its contract type)
        non_negative = q.input[0] in producer and producer[q.input[0]].op_type in ("Relu", "Softmax")
        scale = value(q.input[1]) * np.float32(127 / 255 if non_negative else 1)
        names = (add(scale.astype(np.float32), f"{q.output[0]}_u8_scale"),
                 add(np.full(zero.shape, 0 if non_negative else 128, np.uint8), f"{q.output[0]}_u8_zero_point"))
        for n in (q, *users):
            n.input[1], n.input[2] = names
    for conv in [n for n in g.node if n.op_type == "Conv" and len(n.input) > 2 and n.input[2] in inits]:
        x, w = (producer.get(i) for i in conv.input[:2])
        if not (x is not None and w is not None and x.op_type == DEQUANTIZE and w.op_type == DEQUANTIZE):
            continue
        scale = (value(x.input[1]) * value(w.input[1])).astype(np.float32)
        bias = np.round(value(conv.input[2]).astype(np.float64) / scale).astype(np.int32)
        dq = onnx.helper.make_node(DEQUANTIZE, [add(bias, f"{conv.name}_bias_int32"), add(scale, f"{conv.name}_bias_scale"),
                                                add(np.zeros(scale.shape, np.int32), f"{conv.name}_bias_zero_point")],
                                   [f"{conv.name}_bias_dq"], name=f"{conv.name}_bias_dq", axis=0)
        g.node.insert(list(g.node).index(conv), dq)
        conv.input[2] = dq.output[0]
    return proto


def ort_cpu_graph(path: Path, precision: str) -> str | bytes:
    """What ONNX Runtime's CPU provider loads for an export graph: its path, or the prepared INT8 graph's bytes."""
    if precision != "int8":
        return str(path)
    return prepare_for_ort_cpu(onnx.load(str(path))).SerializeToString()
