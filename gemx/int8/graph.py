"""Editing ONNX graphs in place: who writes and who reads each tensor, and the few edits every INT8 pass makes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

QUANTIZE, DEQUANTIZE = "QuantizeLinear", "DequantizeLinear"


class Graph:
    """One graph being rewritten: its initializers by name, who produces and who reads each tensor."""

    def __init__(self, graph: onnx.GraphProto):
        self.g = graph
        self.inits = {i.name: i for i in graph.initializer}
        self.relink()

    def value(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def relink(self) -> None:
        """Producers and readers again, after a pass that removed or rewired nodes."""
        self.producer, self.consumers = graph_links(self.g)

    def add(self, array: np.ndarray, name: str) -> str:
        self.g.initializer.append(numpy_helper.from_array(array, name))
        self.inits[name] = self.g.initializer[-1]
        return name

    def quantized_convs(self) -> list[onnx.NodeProto]:
        """Convs reading a dequantized input and dequantized weights."""
        return [n for n in self.g.node if n.op_type == "Conv" and all(self.dequantized(i) for i in n.input[:2])]

    def dequantized(self, tensor: str) -> bool:
        return tensor in self.producer and self.producer[tensor].op_type == DEQUANTIZE

    def has_float_bias(self, conv: onnx.NodeProto) -> bool:
        return len(conv.input) > 2 and conv.input[2] in self.inits

    def non_negative(self, tensor: str) -> bool:
        """Written by a Relu or a Softmax, or a Pad of such a tensor's quantized values (zero or edge padding)."""
        source = self.producer.get(tensor)
        if source is not None and source.op_type == "Pad" and self.dequantized(source.input[0]) and pad_adds_no_values(source):
            q = self.producer.get(self.producer[source.input[0]].input[0])
            return q is not None and q.op_type == QUANTIZE and self.non_negative(q.input[0])
        return source is not None and source.op_type in ("Relu", "Softmax")


def graph_links(graph: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """(the node producing each tensor, the nodes reading each tensor) of one graph."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def pad_adds_no_values(pad: onnx.NodeProto) -> bool:
    """A Pad that copies its input's values (edge, reflect, wrap) or pads zeros."""
    mode = next((a.s.decode() for a in pad.attribute if a.name == "mode"), "constant")
    return mode != "constant" or len(pad.input) < 3 or not pad.input[2]


def drop_unused_initializers(g: onnx.GraphProto) -> None:
    """Initializers no node reads any more (replaced by a pass)."""
    used = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)


def set_type(g: onnx.GraphProto, tensor: str, elem_type: int) -> None:
    for info in g.value_info:
        if info.name == tensor:
            info.type.tensor_type.elem_type = elem_type


def add_scale(g: onnx.GraphProto, tensor: str, scale: float) -> tuple[str, str]:
    """Initializers for a symmetric int8 Q/DQ pair of `tensor`: (scale, zero point 0)."""
    g.initializer.extend([onnx.numpy_helper.from_array(np.array(scale, np.float32), f"{tensor}_int8_scale"),
                          onnx.numpy_helper.from_array(np.array(0, np.int8), f"{tensor}_int8_zero_point")])
    return f"{tensor}_int8_scale", f"{tensor}_int8_zero_point"
