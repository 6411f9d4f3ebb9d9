"""Will TensorRT's ONNX parser take this graph? Answered from data, without TensorRT installed.

Checks every op type against the parser's supported-operator list (kept as data in
`tensorrt_onnx_ops.json` with the TensorRT version it describes), and the attributes known to break
exports in practice: Resize mode/coordinate transform/antialias, Pad mode, and Reshape shapes computed
from anything but the graph's own shapes: a shape read from a tensor (Shape) and combined with constants by
the integer ops TensorRT evaluates on shape tensors is how graphs of any frame size lay out blocks.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

import onnx
from onnx import helper, numpy_helper

# Integer ops TensorRT evaluates on shape tensors (ONNX-TensorRT's shape-tensor support), besides Shape itself.
SHAPE_OPS = {"Constant", "Slice", "Gather", "Concat", "Mul", "Div", "Add", "Sub", "Unsqueeze", "Squeeze", "Cast"}


@cache
def supported_ops() -> dict:
    return json.loads((resources.files("gemx.exporter") / "tensorrt_onnx_ops.json").read_text())


@dataclass
class TrtReport:
    graph: str
    op_counts: dict[str, int]
    tensorrt_version: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_tensorrt_compat(proto: onnx.ModelProto, graph: str) -> TrtReport:
    data = supported_ops()
    allowed, rules = set(data["supported_ops"]), data["restrictions"]
    g = proto.graph
    report = TrtReport(graph, dict(Counter(n.op_type for n in g.node)), data["tensorrt_version"])
    constants = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            value = next((a for a in n.attribute if a.name == "value"), None)
            if value is not None:
                constants[n.output[0]] = numpy_helper.to_array(value.t)
    shape_tensors = set(constants)  # computed at build time from shapes alone: TensorRT's shape tensors
    for n in g.node:
        if n.op_type == "Shape" or (n.op_type in SHAPE_OPS and all(i in shape_tensors for i in n.input if i)):
            shape_tensors.update(n.output)
    for n in g.node:
        where = f"{n.op_type} node {n.name!r}"
        if n.domain not in ("", "ai.onnx"):
            report.problems.append(f"{where} is from custom domain {n.domain!r}")
        elif n.op_type not in allowed:
            report.problems.append(f"{where}: TensorRT {report.tensorrt_version}'s parser does not list {n.op_type}")
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        for attr, ok in rules.get(n.op_type, {}).items():
            if isinstance(ok, list) and attr in attrs and attrs[attr] not in ok:
                report.problems.append(f"{where}: {attr}={attrs[attr]!r} (TensorRT supports {ok})")
        if n.op_type == "Reshape":
            shape = constants.get(n.input[1])
            if shape is None and n.input[1] not in shape_tensors:
                report.problems.append(f"{where}: shape is computed from tensor values; TensorRT needs it from shapes and constants")
            elif shape is not None and (shape == -1).sum() > 1:
                report.problems.append(f"{where}: shape {shape.tolist()} has more than one -1")
    return report
