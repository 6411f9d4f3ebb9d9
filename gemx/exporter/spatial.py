"""Symbolic height and width from two fixed-size traces.

Tracing with symbolic spatial sizes makes torch.export reason about every shape in sympy: on the tiny model it
took 5-10x the time of a fixed-size trace (33 s against 6 for the reference encoder). The network is fully
convolutional, so a fixed-size graph differs from any other size's only in the integer constants that lay out
blocks (Reshape shapes: blocks per row and column, blocks per frame). gemx therefore traces each graph at two sizes
whose height, width and area ratios all differ, checks that the two graphs are the same but for such constants,
and rewrites every constant that differs as what it is: a fixed rational multiple of the input's height, its
width, or both, computed from the graph input's shape at run time. Anything else that differs is refused.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gemx.errors import GemxError

H_AXIS, W_AXIS = 2, 3  # of the graph input the sizes are read from (NCHW)


def symbolic_spatial(a: onnx.ModelProto, b: onnx.ModelProto, source: str, size_a: tuple[int, int],
                     size_b: tuple[int, int]) -> onnx.ModelProto:
    """`a` with every size-dependent integer constant computed from `source`'s height and width.

    `a` and `b` are the same graph traced with `source` of spatial size `size_a` and `size_b`. They are compared
    node by node and input by input, not by constant names: the exporter shares a constant between readers whose
    values coincide at one size (the 8 blocks of a row and a channel count of 8), which the other size tells apart."""
    ha, wa = size_a
    hb, wb = size_b
    if len({Fraction(hb, ha), Fraction(wb, wa), Fraction(hb * wb, ha * wa)}) < 3:
        raise GemxError("internal: the two trace sizes must differ in height, width and area ratio")
    g = a.graph
    if len(g.node) != len(b.graph.node):
        raise GemxError("internal: the graph traced at two frame sizes differs in its nodes; it cannot be made size-agnostic")
    ia = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    ib = {i.name: numpy_helper.to_array(i) for i in b.graph.initializer}
    builder = _ShapeBuilder(source)
    computed = []
    for k, (na, nb) in enumerate(zip(g.node, b.graph.node, strict=True)):
        if na.op_type != nb.op_type or len(na.input) != len(nb.input) or list(na.attribute) != list(nb.attribute):
            raise GemxError(f"internal: node {k} ({na.op_type}) differs between the two frame sizes; it cannot be made size-agnostic")
        for j, (xa, xb) in enumerate(zip(na.input, nb.input, strict=True)):
            if (xa in ia) != (xb in ib):
                raise GemxError(f"internal: input {j} of node {k} ({na.op_type}) is constant at one frame size only")
            if xa not in ia or np.array_equal(ia[xa], ib[xb]):
                continue
            x, y = ia[xa], ib[xb]
            if x.dtype != np.int64 or x.ndim != 1 or x.shape != y.shape:
                raise GemxError(f"internal: input {j} of node {k} ({na.op_type}, {x.dtype}) depends on the frame size")
            terms = [_term(int(u), int(v), size_a, size_b, xa) for u, v in zip(x, y, strict=True)]
            name = f"{na.output[0]}_sized_input{j}"
            computed.append(builder.vector(name, terms))
            na.input[j] = name
    nodes = [*builder.nodes, *computed, *g.node]  # the shape arithmetic reads only the source: it goes first
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return a


def _term(u: int, v: int, size_a: tuple[int, int], size_b: tuple[int, int], name: str) -> tuple[str, Fraction]:
    """One element of a constant as ("1" | "h" | "w" | "hw", factor): its value at any size is factor x that."""
    (ha, wa), (hb, wb) = size_a, size_b
    if u == v:
        return "1", Fraction(u)
    for kind, at_a, at_b in (("h", ha, hb), ("w", wa, wb), ("hw", ha * wa, hb * wb)):
        if Fraction(u, at_a) == Fraction(v, at_b):
            return kind, Fraction(u, at_a)
    raise GemxError(f"internal: element {u} -> {v} of constant {name} is no multiple of the frame's height, width or area")


class _ShapeBuilder:
    """Nodes computing int64 vectors from the source's height and width (shared between the constants using them)."""

    def __init__(self, source: str):
        self.source = source
        self.nodes: list[onnx.NodeProto] = []
        self.made: dict[tuple[str, Fraction], str] = {}

    def _const(self, name: str, values: list[int]) -> str:
        self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64), name)))
        return name

    def _dim(self, kind: str) -> str:
        key = (kind, Fraction(1))
        if key not in self.made:
            if not any(n.output[0] == "spatial_shape" for n in self.nodes):
                self.nodes.append(helper.make_node("Shape", [self.source], ["spatial_shape"], start=H_AXIS, end=W_AXIS + 1))
            if kind == "hw":
                self.nodes.append(helper.make_node("Mul", [self._dim("h"), self._dim("w")], ["spatial_hw"]))
                self.made[key] = "spatial_hw"
            else:
                at = H_AXIS if kind == "h" else W_AXIS
                start = self._const(f"spatial_{kind}_at", [at - H_AXIS])
                end = self._const(f"spatial_{kind}_end", [at - H_AXIS + 1])
                self.nodes.append(helper.make_node("Slice", ["spatial_shape", start, end], [f"spatial_{kind}"]))
                self.made[key] = f"spatial_{kind}"
        return self.made[key]

    def _scaled(self, kind: str, factor: Fraction) -> str:
        key = (kind, factor)
        if key not in self.made:
            name = self._dim(kind)
            tag = f"{kind}_{factor.numerator}_{factor.denominator}"
            if factor.numerator != 1:
                name_mul = f"spatial_{tag}_num"
                self.nodes.append(helper.make_node("Mul", [name, self._const(f"{name_mul}_c", [factor.numerator])], [name_mul]))
                name = name_mul
            if factor.denominator != 1:
                name_div = f"spatial_{tag}"
                self.nodes.append(helper.make_node("Div", [name, self._const(f"{name_div}_c", [factor.denominator])], [name_div]))
                name = name_div
            self.made[key] = name
        return self.made[key]

    def vector(self, out: str, terms: list[tuple[str, Fraction]]) -> onnx.NodeProto:
        """The node that computes `out` from its terms: runs of constants stay constants, the rest read the shape."""
        parts, run = [], []
        for kind, factor in terms:
            if kind == "1":
                run.append(int(factor))
                continue
            if run:
                parts.append(self._const(f"{out}_part{len(parts)}", run))
                run = []
            parts.append(self._scaled(kind, factor))
        if run:
            parts.append(self._const(f"{out}_part{len(parts)}", run))
        return helper.make_node("Concat", parts, [out], axis=0)

