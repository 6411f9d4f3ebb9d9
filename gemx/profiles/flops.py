"""FLOPs and parameters of an ONNX graph, counted over the graph itself at a concrete reference count.

Counts the ops that dominate this model: Conv (2 x MACs, bias adds ignored), MatMul (2 x M x N x K)
and Softmax/elementwise ops are ignored; the same convention as torch's FlopCounterMode, so the two
agree for this model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import shape_inference

from gemx.exporter.contract import REFS


def _concrete(model: onnx.ModelProto, refs: int) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in [*model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == REFS:
                dim.dim_value = refs
    del model.graph.value_info[:]
    return shape_inference.infer_shapes(model, data_prop=True)


def graph_cost(path: Path, refs: int) -> dict[str, int]:
    """{"flops": ..., "params": ...} of the graph at `path` with `refs` references."""
    model = _concrete(onnx.load(str(path)), refs)
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
