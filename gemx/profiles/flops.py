"""FLOPs and parameters of an ONNX graph, counted over the graph itself at a concrete reference count.

Counts the ops that dominate this model: Conv (2 x MACs, bias adds ignored), MatMul (2 x M x N x K)
and Softmax/elementwise ops are ignored; the same convention as torch's FlopCounterMode, so the two
agree for this model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from gemx.contract import REFS


def _concrete(model: onnx.ModelProto, dims: dict[str, int]) -> onnx.ModelProto:
    """The graph with its symbolic dimensions set, and the integer arithmetic on shapes that lays out blocks
    (`gemx.exporter.spatial`) folded into constants, so that shape inference knows every tensor's shape."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in [*model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in dims:
                dim.dim_value = dims[dim.dim_param]
    del model.graph.value_info[:]
    _fold_shapes(model.graph)
    return shape_inference.infer_shapes(model, data_prop=True)


_SHAPE_ARITHMETIC = {
    "Mul": lambda a, b: a * b, "Div": lambda a, b: a // b, "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b,
}


def _fold_shapes(g: onnx.GraphProto) -> None:
    """Evaluate Shape -> Slice/Mul/Div/Add/Sub/Concat chains on the graph inputs' concrete shapes into initializers."""
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in g.input}
    known = {i.name: numpy_helper.to_array(i) for i in g.initializer if i.data_type == onnx.TensorProto.INT64}
    folded = []
    for n in g.node:
        ins = [known.get(i) for i in n.input]
        out = None
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out = numpy_helper.to_array(n.attribute[0].t)
        elif n.op_type == "Shape" and n.input[0] in shapes and all(shapes[n.input[0]]):
            attrs = {a.name: a.i for a in n.attribute}
            out = np.array(shapes[n.input[0]], np.int64)[attrs.get("start", 0):attrs.get("end")]
        elif any(x is None for x in ins):
            continue
        elif n.op_type in _SHAPE_ARITHMETIC:
            out = _SHAPE_ARITHMETIC[n.op_type](*ins)
        elif n.op_type == "Concat":
            out = np.concatenate(ins)
        elif n.op_type == "Slice" and len(ins) == 3:
            out = ins[0][int(ins[1][0]):int(ins[2][0])]
        if out is not None and out.dtype == np.int64:
            known[n.output[0]] = out
            folded.append(n)
    for n in folded:
        g.node.remove(n)
        g.initializer.append(numpy_helper.from_array(known[n.output[0]], n.output[0]))


def graph_cost(path: Path, refs: int, dims: dict[str, int] | None = None) -> dict[str, int]:
    """{"flops": ..., "params": ...} of the graph at `path` with `refs` references, its other symbolic dimensions
    (height, width, blocks) at `dims` (`Contract.dims(size)`)."""
    model = _concrete(onnx.load(str(path)), {**(dims or {}), REFS: refs})
    g = model.graph
    shapes = {}
    for v in [*g.input, *g.output, *g.value_info]:
        shapes[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    inits = {i.name: i for i in g.initializer}
    for i in g.initializer:
        shapes[i.name] = list(i.dims)
    flops = 0
    for n in g.node:
        out = shapes.get(n.output[0])
        if not out or 0 in out:
            continue
        if n.op_type == "Conv":
            w = shapes[n.input[1]]  # [Cout, Cin/groups, kh, kw]
            flops += 2 * int(np.prod(out)) * int(np.prod(w[1:]))
        elif n.op_type == "MatMul":
            a = shapes.get(n.input[0])
            if a:
                flops += 2 * int(np.prod(out)) * a[-1]
    params = sum(int(np.prod(i.dims)) for i in inits.values()
                 if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and len(i.dims) > 0)
    return {"flops": flops, "params": params}
