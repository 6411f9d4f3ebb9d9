"""The export's INT8 graphs in the form ONNX Runtime's x86 CPU kernels fuse.

The export writes QDQ in TensorRT's form: symmetric int8 activations (zero point 0) and float biases.
ONNX Runtime's x86 kernels are u8 x s8 (VNNI), and its Conv fusion wants a Q right after the Conv,
int32 biases and matching input/output types. So, tensor by tensor, with the same calibrated ranges:
- an activation that comes out of a Relu becomes uint8 with zero point 0 over the same [0, amax]: 255
  steps instead of 127, and Relu -> Q is then a clamp ONNX Runtime folds away, leaving Conv -> Q; so do the
  attention probabilities (a Softmax's output, in [0, 1]);
- any other activation becomes uint8 with zero point 128 and the same scale (the same grid, shifted);
- each quantized Conv's float bias becomes int32 at scale x_scale * w_scale, as QLinearConv needs;
- a Pad between a DQ and a Q of the same grid pads the quantized tensor itself (no float copy);
- x / max(||x||, eps) over dequantized rows (the unit queries) becomes one LpNormalization, the same numbers;
- a quantized Conv whose output channels are not a multiple of 16 (the decoder's RGB head: 3 in 4 phases, 12)
  computes zero channels up to the next multiple, and its int8 output is sliced back: MLAS's int8 convolutions work
  in blocks of 16 output channels, and a remainder takes a path that is slower than the whole block (measured in
  docs/int8.md).
Weights stay int8 per channel; no grid changes beyond these. The result is checked against FP32 like any build.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from gemx.int8.graph import DEQUANTIZE, QUANTIZE, Graph
from gemx.revision import code_revision

CONV_CHANNEL_BLOCK = 16  # output channels MLAS's int8 convolution kernels compute at once
CONV_INPUT_GROUP = 4  # input channels MLAS's int8 convolutions take at once (VNNI multiplies 4 bytes by 4 bytes)


def preparation_revision() -> str:
    """What decides the prepared graphs: a build made by other preparation code is not used."""
    return code_revision("int8/ort_cpu.py", "int8/graph.py")


def prepare_for_ort_cpu(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a TensorRT-form QDQ graph rewritten for ONNX Runtime's CPU provider."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = Graph(proto.graph)
    _uint8_activations(graph)
    _quantized_pads(graph)
    _unit_rows(graph)
    for conv in graph.quantized_convs():
        _pad_output_channels(graph, conv)
        _pad_input_channels(graph, conv)
    for conv in graph.quantized_convs():
        if graph.has_float_bias(conv):
            _int32_bias(graph, conv)
    graph.drop_unused()  # the int8 grids' scales and float biases replaced above
    return proto


def _uint8_activations(graph: Graph) -> None:
    """Each symmetric int8 activation becomes uint8 over the same range (zero point 0 after a Relu or a Softmax)."""
    value, add = graph.value, graph.add
    for q in graph.nodes(QUANTIZE):
        if q.input[0] in graph.inits or len(q.input) < 3:
            continue  # a weight, or no zero point
        zero = value(q.input[2])
        users = graph.consumers.get(q.output[0], [])
        if zero.dtype != np.int8 or zero.any() or not users or not all(u.op_type == DEQUANTIZE for u in users):
            continue  # not symmetric int8, or a graph output (the int8 cache keeps its contract type)
        non_negative = graph.non_negative(q.input[0])
        scale = value(q.input[1]) * np.float32(127 / 255 if non_negative else 1)
        names = (add(scale.astype(np.float32), f"{q.output[0]}_u8_scale"),
                 add(np.full(zero.shape, 0 if non_negative else 128, np.uint8), f"{q.output[0]}_u8_zero_point"))
        for n in (q, *users):
            n.input[1], n.input[2] = names


def _quantized_pads(graph: Graph) -> None:
    """DQ -> Pad -> Q on one grid (see `_pads_keep_grid` in the quantizer) becomes a Pad of the quantized tensor:
    no float copy of it, and ONNX Runtime pads the uint8 tensor in its NHWC layout."""
    value = graph.value
    for pad in graph.nodes("Pad"):
        dq, readers = graph.producer.get(pad.input[0]), graph.consumers.get(pad.output[0], [])
        if dq is None or dq.op_type != DEQUANTIZE or len(readers) != 1 or readers[0].op_type != QUANTIZE:
            continue
        q = readers[0]
        if len(q.input) < 3 or any((value(q.input[k]) != value(dq.input[k])).any() or value(q.input[k]).dtype != value(dq.input[k]).dtype
                                   for k in (1, 2)):
            continue  # another grid: the float Pad stays
        pad.input[0], pad.output[0] = dq.input[0], q.output[0]
        graph.remove(q)
        if len(graph.consumers[dq.output[0]]) == 1:
            graph.remove(dq)
    graph.relink()


LAYOUT_ONLY = ("Reshape", "Transpose", "Squeeze", "Unsqueeze")
UNIT_EPS_MAX = 1e-6  # a clamp of the norm this small is below any int8 grid's step


def _unit_rows(graph: Graph) -> None:
    """x / max(||x||, eps) over the last axis of dequantized values (the attention's unit queries, exported as
    ReduceL2 -> Clip -> Div) becomes one LpNormalization: the same numbers, since on an int8 grid a row's norm is 0 or
    at least a step, far above eps, and LpNormalization leaves a zero row zero as the clamp does. One node reads the
    dequantized queries instead of two, for which ONNX Runtime would dequantize them twice."""
    for norm in graph.nodes("ReduceL2"):
        x = norm.input[0]
        clips = graph.consumers.get(norm.output[0], [])
        if len(clips) != 1 or clips[0].op_type != "Clip" or len(norm.input) < 2 or norm.input[1] not in graph.inits:
            continue
        clip = clips[0]
        divs = graph.consumers.get(clip.output[0], [])
        keepdims = next((a.i for a in norm.attribute if a.name == "keepdims"), 1)
        if (len(divs) != 1 or divs[0].op_type != "Div" or list(divs[0].input) != [x, clip.output[0]] or not keepdims
                or graph.value(norm.input[1]).tolist() != [-1] or len(clip.input) != 2 or clip.input[1] not in graph.inits
                or not 0 <= graph.value(clip.input[1]) <= UNIT_EPS_MAX or not _dequantized_values(graph, x)):
            continue
        div = divs[0]
        unit = onnx.helper.make_node("LpNormalization", [x], [div.output[0]], name=f"{div.name}_unit", axis=-1, p=2)
        graph.insert_before(div, unit)
        graph.remove(norm, clip, div)
    graph.relink()


def _dequantized_values(graph: Graph, tensor: str) -> bool:
    """Whether `tensor` holds a DequantizeLinear's values, moved about by layout-only ops at most."""
    source = graph.producer.get(tensor)
    while source is not None and source.op_type in LAYOUT_ONLY:
        source = graph.producer.get(source.input[0])
    return source is not None and source.op_type == DEQUANTIZE


def _pad_output_channels(graph: Graph, conv: onnx.NodeProto) -> None:
    """A quantized Conv (-> Relu) -> Q with output channels short of a multiple of CONV_CHANNEL_BLOCK computes zero
    channels up to it (zero weights and bias); its quantized output is sliced back to the channels it had."""
    w_dq = graph.producer[conv.input[1]]
    channels = graph.value(w_dq.input[0]).shape[0]
    extra = -channels % CONV_CHANNEL_BLOCK
    out = conv.output[0]
    if [n.op_type for n in graph.consumers.get(out, [])] == ["Relu"]:
        out = graph.consumers[out][0].output[0]
    readers = graph.consumers.get(out, [])
    q = readers[0] if len(readers) == 1 and readers[0].op_type == QUANTIZE else None
    if (not extra or q is None or q.output[0] in {o.name for o in graph.g.output}
            or len(graph.consumers[w_dq.output[0]]) > 1 or (len(conv.input) > 2 and not graph.has_float_bias(conv))):
        return  # whole blocks already; or an output, weights or a bias this Conv does not own alone

    def padded(name: str, fill_with_last: bool = False) -> str:
        a = graph.value(name)
        if a.ndim == 0:
            return name  # per tensor: nothing per channel
        more = np.repeat(a[-1:], extra, axis=0) if fill_with_last else np.zeros((extra, *a.shape[1:]), a.dtype)
        return graph.add(np.concatenate([a, more]), f"{name}_padded{channels + extra}")

    w_dq.input[0] = padded(w_dq.input[0])
    w_dq.input[1] = padded(w_dq.input[1], fill_with_last=True)  # a real scale: the bias's int32 scale is built from it
    if len(w_dq.input) > 2:
        w_dq.input[2] = padded(w_dq.input[2])
    if graph.has_float_bias(conv):
        conv.input[2] = padded(conv.input[2])
    bounds = [graph.add(np.array([v], np.int64), f"{q.output[0]}_slice_{k}") for k, v in (("start", 0), ("end", channels), ("axis", 1))]
    sliced = onnx.helper.make_node("Slice", [q.output[0], *bounds], [f"{q.output[0]}_sliced"], name=f"{q.name}_sliced")
    for reader in graph.readers(q.output[0]):
        graph.read_instead(reader, q.output[0], sliced.output[0])
    graph.insert_after(q, sliced)
    stale = {conv.output[0], out, q.output[0]}  # recorded shapes of these, if any, have the old channel count
    kept = [v for v in graph.g.value_info if v.name not in stale]
    del graph.g.value_info[:]
    graph.g.value_info.extend(kept)


def _pad_input_channels(graph: Graph, conv: onnx.NodeProto) -> None:
    """A quantized Conv reading input channels short of a multiple of CONV_INPUT_GROUP (an encoder's first layer, RGB)
    reads the quantized input padded with zero-valued channels, through zero weights: the same sums, on MLAS's
    whole-group path (measured in docs/int8.md)."""
    x_dq, w_dq = graph.producer[conv.input[0]], graph.producer[conv.input[1]]
    weights = graph.value(w_dq.input[0])
    extra = -weights.shape[1] % CONV_INPUT_GROUP
    grouped = any(a.name == "group" and a.i != 1 for a in conv.attribute)
    if not extra or grouped or len(graph.consumers[w_dq.output[0]]) > 1 or len(graph.consumers[x_dq.output[0]]) > 1:
        return  # whole groups already, a grouped Conv, or weights or a dequantized input this Conv does not own alone
    zeros = np.zeros((weights.shape[0], extra, *weights.shape[2:]), weights.dtype)
    w_dq.input[0] = graph.add(np.concatenate([weights, zeros], axis=1), f"{w_dq.input[0]}_in{weights.shape[1] + extra}")
    zero_point = x_dq.input[2]  # the padded channels hold the zero point: they dequantize to 0
    pads = graph.add(np.array([0, 0, 0, 0, 0, extra, 0, 0], np.int64), f"{x_dq.name}_channel_pads")
    padded = onnx.helper.make_node("Pad", [x_dq.input[0], pads, zero_point], [f"{x_dq.input[0]}_channels{weights.shape[1] + extra}"],
                                   name=f"{x_dq.name}_channel_pad", mode="constant")
    x_dq.input[0] = padded.output[0]
    graph.insert_before(x_dq, padded)


def _int32_bias(graph: Graph, conv: onnx.NodeProto) -> None:
    """A quantized Conv's float bias becomes int32 at scale x_scale * w_scale, as QLinearConv needs."""
    value, add = graph.value, graph.add
    x, w = (graph.producer[i] for i in conv.input[:2])
    scale = (value(x.input[1]) * value(w.input[1])).astype(np.float32)
    bias = np.round(value(conv.input[2]).astype(np.float64) / scale).astype(np.int32)
    dq = onnx.helper.make_node(DEQUANTIZE, [add(bias, f"{conv.name}_bias_int32"), add(scale, f"{conv.name}_bias_scale"),
                                            add(np.zeros(scale.shape, np.int32), f"{conv.name}_bias_zero_point")],
                               [f"{conv.name}_bias_dq"], name=f"{conv.name}_bias_dq", axis=0)
    graph.insert_before(conv, dq)
    conv.input[2] = dq.output[0]


def ort_cpu_graph(path: Path, precision: str) -> str | bytes:
    """What ONNX Runtime's CPU provider loads for an export graph: its path, or the prepared INT8 graph's bytes."""
    if precision != "int8":
        return str(path)
    return prepare_for_ort_cpu(onnx.load(str(path))).SerializeToString()
