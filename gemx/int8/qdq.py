"""QDQ graphs in the form TensorRT's explicit quantization takes, from a range table (`gemx.int8.ranges`).

Quantization turns the table into QDQ graphs: symmetric int8 activations (zero points 0), per-channel
symmetric int8 weights, float biases. Quantized: every Conv, and the decoder's sums of partial convolutions
(so ONNX Runtime adds in int8 instead of dequantizing three tensors per level). The bicubic upsampler stays FP32: its
output is the frame the network adds its residual to, and a symmetric int8 grid over a frame's [-0.1, 1.1] is coarser
than its 8-bit pixels. Each encoder's first layer reads RGB in int8 (the frame or references quantized for it alone:
-0.004 dB on the test split, simulated; its other readers keep the float frame), and the decoder's last
convolution writes RGB from int8 features. Attention: values, and keys of 64 channels or more (the contract says
which), are cached in int8 (one calibrated scale each); the products with them run in int8, their other operands
at fixed scales (queries are unit vectors, probabilities lie in [0, 1]); the softmax, the logits over float keys
and the residual over the bicubic frame stay FP32. The frame graph quantized is exported with its head on 2x2 phases
(`gemx.model.network.subpixel_head`): the last upsampling folds into the head's first convolution, so both head
convolutions run at a quarter of the pixels with four times the channels, which int8 convolutions turn into speed,
and no upsampled tensor is quantized; it differs from the FP32 graph only on the frame's outer 2 pixels.

ONNX Runtime's quantizer places the Q/DQ pairs; then each pass of QDQ_PASSES rewrites the graph, in order, and the
result is checked against TensorRT's form (`gemx.int8.trt_form`).
"""


from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from gemx.errors import GemxError
from gemx.fs import atomic_write
from gemx.int8.graph import DEQUANTIZE, QUANTIZE, Graph, graph_links, pad_adds_no_values
from gemx.int8.trt_form import check_tensorrt_form

QUANTIZED_OPS = ["Conv", "Add"]  # Adds: only the decoder's sums of partial convolutions (`feature_sums`)
INT8_OPS = ("Conv", "Add", "MatMul")  # ops that run in int8 when their operands come through DQs
RGB_CHANNELS = 3


@dataclass(frozen=True)
class Int8Cache:
    """The cache tensors the INT8 contract holds in int8, with their calibrated ranges: both graphs use one scale
    each (the encoder quantizes them, the frame graph dequantizes them alike)."""

    ranges: dict[str, tuple[float, float]]
    keys: frozenset[str]  # which of them are keys (the logits' right-hand side), by the contract's names


def quantize(fp32_path: Path, ranges: dict[str, tuple[float, float]], out: Path, cache: Int8Cache) -> onnx.ModelProto:
    """The QDQ INT8 graph of one (constant-folded) FP32 graph from its calibrated ranges: ONNX Runtime's quantizer
    places the Q/DQ pairs, then QDQ_PASSES rewrite them in order, and the result is checked against TensorRT's form."""
    from onnxruntime.quantization import CalibrationMethod, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    with tempfile.TemporaryDirectory(prefix="gemx-int8-") as tmp:
        table_path = Path(tmp) / "ranges.json"
        table = {t: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for t, (lo, hi) in ranges.items()}
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, table), table_path)
        quantized = Path(tmp) / "int8.onnx"
        try:
            quantize_static(str(fp32_path), str(quantized), None, calibration_cache_path=table_path,
                            **quantizer_args(fp32_path))
        except (KeyError, ValueError) as e:  # ORT: a tensor to quantize without calibrated parameters
            raise GemxError(f"the INT8 range table has no range for a tensor of {fp32_path.name} ({str(e).splitlines()[0]}; "
                            "made for another gemx or torch version?); calibrate again with --calib VIDEO|DIR") from None
        proto = onnx.load(str(quantized))
    graph = Graph(proto.graph)
    for rewrite in QDQ_PASSES:
        graph.relink()
        rewrite(graph, cache)
    check_tensorrt_form(proto, fp32_path.name)
    atomic_write(out, lambda tmp: onnx.save(proto, str(tmp)))
    return proto


def fold_constants(src: Path, out: Path) -> None:
    """Constant folding (ONNX Runtime's basic level, standard ONNX ops only): weight slices become plain
    initializers, so every convolution gets constant, per-channel quantizable weights."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(out), skip_symbolic_shape=True)


def fp32_convs(proto: onnx.ModelProto) -> list[str]:
    """Convolutions kept in FP32: the bicubic upsampler's, which read RGB into resampled RGB (no Relu after them; the
    frame's upsampled copy is the residual the network adds to). Each encoder's first layer reads RGB into features
    (a Relu follows) and is quantized. In a quantized graph the same list: only FP32 convolutions still take their
    weight straight from an initializer."""
    weights = {i.name: i.dims for i in proto.graph.initializer}
    _, consumers = graph_links(proto.graph)
    return [n.name for n in proto.graph.node if n.op_type == "Conv" and n.input[1] in weights
            and weights[n.input[1]][1] <= RGB_CHANNELS and not any(c.op_type == "Relu" for c in consumers.get(n.output[0], []))]


def feature_sums(proto: onnx.ModelProto) -> list[str]:
    """Adds of two convolution outputs (or of such sums): the decoder's partial convolutions over each input part.
    They are quantized; other Adds (the residual over the bicubic frame) stay FP32."""
    sums: list[str] = []
    features = set()  # tensors written by a Conv or by such a sum
    for n in proto.graph.node:  # topological order: a sum's inputs are seen first
        if n.op_type == "Add" and all(i in features for i in n.input):
            sums.append(n.name)
        if n.op_type == "Conv" or n.name in sums:
            features.update(n.output)
    return sums


def quantizer_args(fp32_path: Path) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    proto = onnx.load(str(fp32_path))
    adds = {n.name for n in proto.graph.node if n.op_type == "Add"} - set(feature_sums(proto))
    return dict(quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANTIZED_OPS, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=fp32_convs(proto) + sorted(adds),
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                               "QuantizeBias": False})  # TensorRT takes float biases; ORT's CPU build quantizes them


def quantize_after_relu(graph: Graph, cache: Int8Cache) -> None:
    """Conv (or a sum) -> Q -> DQ -> Relu becomes Conv -> Relu -> Q -> DQ; where the Relu is only read by Qs of its
    own, the pair is dropped (Conv -> Relu -> Q).

    ONNX Runtime's quantizer quantizes a Relu's input, which rounds twice where a Relu feeds a Conv, and spends half
    the grid on values the Relu zeroes where it feeds float ops (the decoder's upsampling). A Relu's output has the
    same symmetric range as its input, so the Conv's Q moves after the Relu unchanged. The result has TensorRT's
    canonical placement (Q/DQ at Conv inputs, Conv + Relu + Q fused), and ONNX Runtime fuses Conv -> Relu -> Q into
    one int8 convolution as well."""
    drop = []
    for q in graph.nodes(QUANTIZE):
        if not graph.made_by(q.input[0], "Conv", "Add"):
            continue
        dqs = graph.readers(q.output[0])
        if len(dqs) != 1 or dqs[0].op_type != DEQUANTIZE:
            continue
        relus = graph.readers(dqs[0].output[0])
        if len(relus) != 1 or relus[0].op_type != "Relu" or len(graph.readers(q.input[0])) != 1:
            continue
        dq, relu = dqs[0], relus[0]
        readers = graph.readers(relu.output[0])
        relu.input[0] = q.input[0]
        if all(r.op_type == QUANTIZE for r in readers):
            drop += [q, dq]
            continue
        q.input[0] = relu.output[0]
        for r in readers:
            if r.op_type != QUANTIZE:  # a Q of its own keeps reading the Relu
                graph.read_instead(r, relu.output[0], dq.output[0])
        graph.remove(q, dq)
        graph.insert_after(relu, q, dq)
    graph.remove(*drop)


def float_sources_stay_float(graph: Graph, cache: Int8Cache) -> None:
    """A float tensor quantized for the int8 op that reads it (an encoder's first layer reads the upsampled frame or
    the references) stays float for its float readers (the residual over the bicubic frame, the references'
    downsampling for the keys): ONNX Runtime's quantizer hands every reader the dequantized copy. Int8 results (a
    Conv's, a sum's, a product's) reach float readers through their DQ: they exist as int8 only."""

    def in_int8(node: onnx.NodeProto) -> bool:
        return node.op_type in INT8_OPS and all(graph.dequantized(i) for i in node.input[:2])

    for q in [n for n in graph.nodes(QUANTIZE) if n.input[0] not in graph.inits]:
        source = graph.producer.get(q.input[0])
        if source is not None and (in_int8(source) or source.op_type == "Relu"):
            continue  # an int8 result (Conv -> Relu -> Q, Add -> Q): no float copy to read
        for dq in graph.readers(q.output[0]):
            for reader in [r for r in graph.readers(dq.output[0]) if not in_int8(r)]:
                graph.read_instead(reader, dq.output[0], q.input[0])


def pads_keep_grid(graph: Graph, cache: Int8Cache) -> None:
    """DQ -> Pad -> Q: the Q (and the DQs reading it) take the DQ's scale. A Pad that copies values (edge, reflect,
    wrap) or pads zeros only holds values of its input's grid, so the Pad's own calibrated range rounds once more for
    nothing; on one grid, ONNX Runtime's preparation pads the int8 tensor itself (the sub-pixel head's edge Pad)."""
    for pad in graph.nodes("Pad"):
        dq, readers = graph.producer.get(pad.input[0]), graph.readers(pad.output[0])
        if (dq is None or dq.op_type != DEQUANTIZE or not readers or any(r.op_type != QUANTIZE for r in readers)
                or not pad_adds_no_values(pad)):
            continue  # a float input, a float reader, or a constant that may lie off the grid
        for q in readers:
            for n in (q, *graph.readers(q.output[0])):
                n.input[1], n.input[2] = dq.input[1], dq.input[2]


def int8_cache(graph: Graph, cache: Int8Cache) -> None:
    """The cache tensors of `cache` in int8 (symmetric, one scale each): the encoder ends each such
    output with a Q, the frame graph reads each as int8 and dequantizes it where an attention product reads it
    (after free reshapes), so that the product runs in int8 and the cache takes a quarter of the memory."""
    g = graph.g
    outputs = graph.outputs()
    for io in [t for t in (*g.input, *g.output) if t.name in cache.ranges]:
        v = io.name
        amax = max(abs(cache.ranges[v][0]), abs(cache.ranges[v][1]), 1e-8)  # an all-zero level still gets a valid scale
        scale, zero = graph.add_scale(v, amax / 127)
        if v in outputs:  # encoder: ... -> Q -> key_i / value_i (int8)
            node = graph.producer[v]
            node.output[:] = [f"{v}_float" if o == v else o for o in node.output]
            graph.insert_after(node, onnx.helper.make_node(QUANTIZE, [f"{v}_float", scale, zero], [v], name=f"{v}_quantize"))
        else:  # frame: key_i / value_i (int8) -> Reshape... -> DQ -> the attention product
            tensor = v
            while len(graph.readers(tensor)) == 1 and graph.readers(tensor)[0].op_type == "Reshape":
                tensor = graph.readers(tensor)[0].output[0]
                graph.set_type(tensor, onnx.TensorProto.INT8)
            readers = graph.readers(tensor)
            for reader in readers:
                graph.read_instead(reader, tensor, f"{tensor}_dq")
            graph.insert_before(graph.first(readers), onnx.helper.make_node(DEQUANTIZE, [tensor, scale, zero],
                                                                            [f"{tensor}_dq"], name=f"{v}_dequantize"))
        io.type.tensor_type.elem_type = onnx.TensorProto.INT8


def quantize_queries(graph: Graph, cache: Int8Cache) -> None:
    """Q/DQ on the queries where they meet the int8 keys: queries are unit vectors (every component in [-1, 1]), so
    the scale is 1/127 without calibration, and the logits run as an int8 product with float output."""
    key_dequantizers = {f"{k}_dequantize" for k in cache.keys}
    for matmul in graph.nodes("MatMul"):
        keys = graph.producer.get(matmul.input[1])
        if keys is None or keys.op_type != DEQUANTIZE or keys.name not in key_dequantizers:
            continue
        q = matmul.input[0]
        scale, zero = graph.add_scale(q, 1 / 127)
        graph.insert_before(matmul,
                            onnx.helper.make_node(QUANTIZE, [q, scale, zero], [f"{q}_q"], name=f"{q}_quantize"),
                            onnx.helper.make_node(DEQUANTIZE, [f"{q}_q", scale, zero], [f"{q}_dq"], name=f"{q}_dequantize"))
        matmul.input[0] = f"{q}_dq"


def quantize_probabilities(graph: Graph, cache: Int8Cache) -> None:
    """Q/DQ on the attention probabilities where they meet the int8 values: softmax lies in [0, 1], so the scale is
    1/127 without calibration (ONNX Runtime's preparation makes it uint8 over the same range: 1/255)."""
    for softmax in graph.nodes("Softmax"):
        readers = graph.readers(softmax.output[0])
        if not any(graph.dequantized(i) for r in readers for i in r.input):
            continue  # no int8 partner: the product stays float
        p = softmax.output[0]
        scale, zero = graph.add_scale(p, 1 / 127)
        q = onnx.helper.make_node(QUANTIZE, [p, scale, zero], [f"{p}_q"], name=f"{softmax.name}_quantize")
        dq = onnx.helper.make_node(DEQUANTIZE, [f"{p}_q", scale, zero], [f"{p}_dq"], name=f"{softmax.name}_dequantize")
        for r in readers:
            graph.read_instead(r, p, dq.output[0])
        graph.insert_after(softmax, q, dq)


def drop_unused(graph: Graph, cache: Int8Cache) -> None:
    """Initializers the passes before it left unread (the Q/DQ pairs `quantize_after_relu` dropped)."""
    graph.drop_unused()


# What turns ONNX Runtime's QDQ placement into gemx's, in order: each a rewrite of one graph in place.
QDQ_PASSES: tuple[Callable[[Graph, Int8Cache], None], ...] = (
    quantize_after_relu,  # Conv -> Q -> DQ -> Relu becomes Conv -> Relu -> Q -> DQ (TensorRT's placement)
    float_sources_stay_float,  # float readers of a tensor quantized for an int8 op read the float tensor
    pads_keep_grid,  # DQ -> Pad -> Q keeps the input's grid
    drop_unused,
    int8_cache,  # the cache tensors in int8: Q at the encoder's outputs, DQ where the frame graph's products read them
    quantize_queries,  # the queries at 1/127 where they meet int8 keys
    quantize_probabilities,  # the softmax at 1/127 where it meets int8 values
)
