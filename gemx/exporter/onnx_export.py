"""Export one graph module to ONNX, named and shaped exactly as its contract says.

torch.export traces with a symbolic `refs` dimension (exported from a 2-reference example: a
1-reference example invites 0/1 specialisation), the dynamo ONNX exporter lowers it, and the
result is renamed to the contract, checked (onnx checker with shape inference) and saved atomically.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from gemx.errors import GemxError
from gemx.exporter.contract import REFS, GraphSpec
from gemx.fs import atomic_write

OPSETS = range(18, 24)  # what the dynamo exporter emits and ONNX Runtime 1.2x runs
DEFAULT_OPSET = 20


def check_opset(opset: int) -> None:
    if opset not in OPSETS:
        raise GemxError(f"opset {opset} is not supported; use an opset from {OPSETS.start} to {OPSETS.stop - 1} (default {DEFAULT_OPSET})")


def export_graph(module: torch.nn.Module, args: tuple, spec: GraphSpec, refs_axes: list[int | None],
                 max_refs: int, opset: int, path: Path) -> onnx.ModelProto:
    """Trace `module(*args)` with the given refs axis per flat input, write `path`, return the proto."""
    check_opset(opset)
    refs = Dim(REFS, min=1, max=max_refs)
    flat = [None if a is None else {a: refs} for a in refs_axes]
    dynamic_shapes = (flat[0],) if len(args) == 1 else (flat[0], tuple(flat[1:]))
    with _quiet():
        ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
        program = torch.onnx.export(ep, (), dynamo=True, opset_version=opset, optimize=True, verbose=False)
    proto = program.model_proto
    conform_to_contract(proto, spec)
    strip_build_metadata(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise GemxError(f"exported {spec.name} graph failed the ONNX checker: {str(e).splitlines()[0]}") from None
    atomic_write(path, lambda tmp: onnx.save(proto, str(tmp)))
    return proto


def conform_to_contract(proto: onnx.ModelProto, spec: GraphSpec) -> None:
    """Rename graph inputs/outputs to the contract's names and the traced refs symbol to `refs`."""
    g = proto.graph
    if len(g.input) != len(spec.inputs) or len(g.output) != len(spec.outputs):
        raise GemxError(f"{spec.name}: exported graph has {len(g.input)} inputs/{len(g.output)} outputs, "
                        f"the contract {len(spec.inputs)}/{len(spec.outputs)}")
    renames = {}
    for value, want in zip([*g.input, *g.output], [*spec.inputs, *spec.outputs], strict=True):
        renames[value.name] = want.name
        for dim, d in zip(value.type.tensor_type.shape.dim, want.shape, strict=True):
            if isinstance(d, str):
                dim.ClearField("dim_value")
                dim.dim_param = d
    for value in [*g.input, *g.output]:
        value.name = renames[value.name]
    for node in g.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for vi in g.value_info:
        vi.name = renames.get(vi.name, vi.name)


def strip_build_metadata(proto: onnx.ModelProto) -> None:
    """Drop what only the exporting machine knew: per-node stack traces with absolute source paths, FX node
    text, module hierarchies, the exported program's signature. A deployment needs none of it, and without
    it the same checkpoint and options give byte-identical graphs wherever gemx is installed."""
    graphs = [proto.graph, *(f for f in proto.functions)]
    for graph in graphs:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    g = proto.graph
    for values in (g.input, g.output, g.value_info, g.initializer):
        for v in values:
            del v.metadata_props[:]
    del g.metadata_props[:]
    g.doc_string = ""
    del proto.metadata_props[:]
    proto.doc_string = ""


@contextlib.contextmanager
def _quiet():
    """The exporter narrates every stage on stdout and warns about unrelated optional packages."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)
