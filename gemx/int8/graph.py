"""Editing ONNX graphs in place: who writes and who reads each tensor, and the few edits every INT8 pass makes.

Every INT8 rewrite (the TensorRT-form passes in `gemx.int8.qdq`, ONNX Runtime's preparation in `gemx.int8.ort_cpu`)
goes through `Graph`. It works on the onnx protobuf itself, so a pass changes only what it rewrites and the bytes
of everything else stay as the exporter wrote them.
"""

from __future__ import annotations

from collections.abc import Iterable

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

    def relink(self) -> None:
        """Producers and readers again, after a pass that removed or rewired nodes."""
        self.producer, self.consumers = graph_links(self.g)

    # -- reading ---------------------------------------------------------------------------------------------------
    def nodes(self, op_type: str) -> list[onnx.NodeProto]:
        return [n for n in self.g.node if n.op_type == op_type]

    def value(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def outputs(self) -> set[str]:
        return {o.name for o in self.g.output}

    def readers(self, tensor: str) -> list[onnx.NodeProto]:
        return self.consumers.get(tensor, [])

    def made_by(self, tensor: str, *op_types: str) -> bool:
        return tensor in self.producer and self.producer[tensor].op_type in op_types

    def dequantized(self, tensor: str) -> bool:
        return self.made_by(tensor, DEQUANTIZE)

    def quantized_convs(self) -> list[onnx.NodeProto]:
        """Convs reading a dequantized input and dequantized weights."""
        return [n for n in self.nodes("Conv") if all(self.dequantized(i) for i in n.input[:2])]

    def has_float_bias(self, conv: onnx.NodeProto) -> bool:
        return len(conv.input) > 2 and conv.input[2] in self.inits

    def non_negative(self, tensor: str) -> bool:
        """Written by a Relu or a Softmax, or a Pad of such a tensor's quantized values (zero or edge padding)."""
        source = self.producer.get(tensor)
        if source is not None and source.op_type == "Pad" and self.dequantized(source.input[0]) and pad_adds_no_values(source):
            q = self.producer.get(self.producer[source.input[0]].input[0])
            return q is not None and q.op_type == QUANTIZE and self.non_negative(q.input[0])
        return source is not None and source.op_type in ("Relu", "Softmax")

    # -- editing ---------------------------------------------------------------------------------------------------
    def add(self, array: np.ndarray, name: str) -> str:
        self.g.initializer.append(numpy_helper.from_array(array, name))
        self.inits[name] = self.g.initializer[-1]
        return name

    def add_scale(self, tensor: str, scale: float) -> tuple[str, str]:
        """Initializers for a symmetric int8 Q/DQ pair of `tensor`: (scale, zero point 0)."""
        return (self.add(np.array(scale, np.float32), f"{tensor}_int8_scale"),
                self.add(np.array(0, np.int8), f"{tensor}_int8_zero_point"))

    def insert_before(self, anchor: onnx.NodeProto, *nodes: onnx.NodeProto) -> None:
        """`nodes`, in order, right before `anchor` (the node list stays in topological order)."""
        at = self.position(anchor)
        for k, n in enumerate(nodes):
            self.g.node.insert(at + k, n)

    def insert_after(self, anchor: onnx.NodeProto, *nodes: onnx.NodeProto) -> None:
        at = self.position(anchor) + 1
        for k, n in enumerate(nodes):
            self.g.node.insert(at + k, n)

    def remove(self, *nodes: onnx.NodeProto) -> None:
        for n in nodes:
            self.g.node.remove(n)

    def position(self, node: onnx.NodeProto) -> int:
        return list(self.g.node).index(node)

    def first(self, nodes: Iterable[onnx.NodeProto]) -> onnx.NodeProto:
        """The earliest of `nodes` in the graph."""
        return min(nodes, key=self.position)

    @staticmethod
    def read_instead(reader: onnx.NodeProto, old: str, new: str) -> None:
        """`reader` reads `new` wherever it read `old`."""
        reader.input[:] = [new if i == old else i for i in reader.input]

    def set_type(self, tensor: str, elem_type: int) -> None:
        for info in self.g.value_info:
            if info.name == tensor:
                info.type.tensor_type.elem_type = elem_type

    def drop_unused(self) -> None:
        """Initializers no node reads any more (replaced by a pass)."""
        used = {i for n in self.g.node for i in n.input}
        for name in [i.name for i in self.g.initializer if i.name not in used]:
            self.g.initializer.remove(self.inits.pop(name))


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
