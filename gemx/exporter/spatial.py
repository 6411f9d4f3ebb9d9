"""Symbolic batch, height and width from fixed-size traces.

Tracing with symbolic sizes makes torch.export reason about every shape in sympy: on the tiny model it took 5-10x
the time of a fixed-size trace (33 s against 6 for the reference encoder). The network is fully convolutional and
batches frame by frame, so a fixed-size graph differs from another size's only in the integer constants that lay
out blocks (Reshape shapes: blocks per row and column, blocks per frame, frames per batch). gemx therefore traces
each graph at a few points (batch, height, width) chosen so that every product of the three changes differently
between them, checks that the graphs are the same but for such constants, and rewrites every constant that
differs as what it is: a fixed rational multiple of the input's batch, height, width or a product of them,
computed from the graph input's shape at run time. Anything else that differs is refused.
"""

from __future__ import annotations

from fractions import Fraction
from itertools import combinations
from math import prod

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gemx.errors import GemxError

AXES = {"n": 0, "h": 2, "w": 3}  # of the graph input the sizes are read from (NCHW)
# What a constant may be a multiple of, simplest first: products of the batch (n), height (h) and width (w).
MONOMIALS = tuple("".join(c) for k in range(4) for c in combinations("nhw", k))

Point = tuple[int, int, int]  # (batch, height, width) of the source input in one trace


def symbolic_axes(protos: list[onnx.ModelProto], points: list[Point], source: str) -> onnx.ModelProto:
    """The first graph with every size-dependent integer constant computed from `source`'s batch, height and width.

    `protos[k]` is the same graph traced with `source` of shape (batch, _, height, width) = `points[k]`. The
    graphs are compared node by node and input by input, not by constant names: the exporter shares a constant
    between readers whose values coincide at one size (the 8 blocks of a row and a channel count of 8), which
    another size tells apart. An axis that no two points differ in stays fixed."""
    varied = {axis for k, axis in enumerate("nhw") if len({p[k] for p in points}) > 1}
    _check_separable(points, varied)
    a = protos[0]
    g = a.graph
    if any(len(p.graph.node) != len(g.node) for p in protos[1:]):
        raise GemxError("internal: the graph traced at two frame sizes differs in its nodes; it cannot be made size-agnostic")
    inits = [{i.name: numpy_helper.to_array(i) for i in p.graph.initializer} for p in protos]
    builder = _ShapeBuilder(source)
    computed = []
    for k, nodes in enumerate(zip(*(p.graph.node for p in protos), strict=True)):
        na = nodes[0]
        if any(n.op_type != na.op_type or len(n.input) != len(na.input) or list(n.attribute) != list(na.attribute)
               for n in nodes[1:]):
            raise GemxError(f"internal: node {k} ({na.op_type}) differs between the traced sizes; it cannot be made size-agnostic")
        for j, names in enumerate(zip(*(n.input for n in nodes), strict=True)):
            is_const = [x in init for x, init in zip(names, inits, strict=True)]
            if any(is_const) and not all(is_const):
                raise GemxError(f"internal: input {j} of node {k} ({na.op_type}) is constant at one frame size only")
            if not is_const[0]:
                continue
            values = [init[x] for x, init in zip(names, inits, strict=True)]
            if all(np.array_equal(values[0], v) for v in values[1:]):
                continue
            x = values[0]
            if x.dtype != np.int64 or x.ndim != 1 or any(v.shape != x.shape for v in values):
                raise GemxError(f"internal: input {j} of node {k} ({na.op_type}, {x.dtype}) depends on the frame size")
            terms = [_term([int(v[e]) for v in values], points, varied, names[0]) for e in range(len(x))]
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


def _at(point: Point, monomial: str) -> int:
    n, h, w = point
    return prod({"n": n, "h": h, "w": w}[c] for c in monomial)


def _check_separable(points: list[Point], varied: set[str]) -> None:
    """Any two monomials over the varied axes must change differently across the points, or a constant could be
    read as the wrong one (a multiple of the height where it is one of the width)."""
    usable = [m for m in MONOMIALS if set(m) <= varied]
    for m1, m2 in combinations(usable, 2):
        if len({Fraction(_at(p, m1), _at(p, m2)) for p in points}) < 2:
            raise GemxError(f"internal: the trace points cannot tell {m1 or '1'} from {m2 or '1'}; choose other sizes")


def _term(values: list[int], points: list[Point], varied: set[str], name: str) -> tuple[str, Fraction]:
    """One element of a constant as (monomial, factor): its value at any size is factor x the monomial there."""
    for monomial in (m for m in MONOMIALS if set(m) <= varied):
        factor = Fraction(values[0], _at(points[0], monomial))
        if all(Fraction(v) == factor * _at(p, monomial) for v, p in zip(values, points, strict=True)):
            return monomial, factor
    raise GemxError(f"internal: element {' -> '.join(map(str, values))} of constant {name} is no multiple of the "
                    "batch, height, width or their products")


class _ShapeBuilder:
    """Nodes computing int64 vectors from the source's batch, height and width (shared between the constants)."""

    def __init__(self, source: str):
        self.source = source
        self.nodes: list[onnx.NodeProto] = []
        self.made: dict[tuple[str, Fraction], str] = {}

    def _const(self, name: str, values: list[int]) -> str:
        self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64), name)))
        return name

    def _dim(self, monomial: str) -> str:
        key = (monomial, Fraction(1))
        if key not in self.made:
            if len(monomial) > 1:
                self.nodes.append(helper.make_node("Mul", [self._dim(monomial[:-1]), self._dim(monomial[-1])],
                                                   [f"source_{monomial}"]))
            else:
                at = AXES[monomial]
                shape = self._shape(at)
                self.nodes.append(helper.make_node("Slice", [shape, self._const(f"source_{monomial}_at", [0]),
                                                             self._const(f"source_{monomial}_end", [1])],
                                                   [f"source_{monomial}"]))
            self.made[key] = f"source_{monomial}"
        return self.made[key]

    def _shape(self, axis: int) -> str:
        """The source's size along one axis, as a 1-element vector."""
        name = f"source_shape_{axis}"
        if not any(n.output[0] == name for n in self.nodes):
            self.nodes.append(helper.make_node("Shape", [self.source], [name], start=axis, end=axis + 1))
        return name

    def _scaled(self, monomial: str, factor: Fraction) -> str:
        key = (monomial, factor)
        if key not in self.made:
            name = self._dim(monomial)
            tag = f"{monomial}_{factor.numerator}_{factor.denominator}"
            if factor.numerator != 1:
                name_mul = f"source_{tag}_num"
                self.nodes.append(helper.make_node("Mul", [name, self._const(f"{name_mul}_c", [factor.numerator])], [name_mul]))
                name = name_mul
            if factor.denominator != 1:
                name_div = f"source_{tag}"
                self.nodes.append(helper.make_node("Div", [name, self._const(f"{name_div}_c", [factor.denominator])], [name_div]))
                name = name_div
            self.made[key] = name
        return self.made[key]

    def vector(self, out: str, terms: list[tuple[str, Fraction]]) -> onnx.NodeProto:
        """The node that computes `out` from its terms: runs of constants stay constants, the rest read the shape."""
        parts, run = [], []
        for monomial, factor in terms:
            if not monomial:
                run.append(int(factor))
                continue
            if run:
                parts.append(self._const(f"{out}_part{len(parts)}", run))
                run = []
            parts.append(self._scaled(monomial, factor))
        if run:
            parts.append(self._const(f"{out}_part{len(parts)}", run))
        return helper.make_node("Concat", parts, [out], axis=0)
