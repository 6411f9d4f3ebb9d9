"""The form TensorRT's explicit quantization takes, checked: int8 Q/DQ with zero points 0."""

from __future__ import annotations

import numpy as np
import onnx

from gemx.errors import GemxError


def check_tensorrt_form(proto: onnx.ModelProto, name: str) -> None:
    """What TensorRT's explicit quantization requires: int8 Q/DQ with zero points 0."""
    inits = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = onnx.numpy_helper.to_array(inits[node.input[2]])
            if zp.dtype != np.int8 or zp.any():
                raise GemxError(f"{name}: {node.name} has a non-zero or non-int8 zero point; not TensorRT's QDQ form")
