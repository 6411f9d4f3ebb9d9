"""Export one graph module to ONNX, named and shaped exactly as its contract says.

torch.export traces with a symbolic `refs` dimension (exported from a 2-reference example: a
1-reference example invites 0/1 specialisation) at a few (batch, height, width) points, the dynamo ONNX exporter
lowers each, `gemx.exporter.spatial` makes batch, height and width symbolic from them, and the result is renamed
to the contract, checked (onnx checker with shape inference) and saved atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from gemx.contract import REFS, GraphSpec
from gemx.errors import GemxError
from gemx.exporter.spatial import Point, symbolic_axes
from gemx.fs import atomic_write

OPSETS = range(18, 24)  # what the dynamo exporter emits and ONNX Runtime 1.2x runs
DEFAULT_OPSET = 20


def check_opset(opset: int) -> None:
    if opset not in OPSETS:
        raise GemxError(f"opset {opset} is not supported; use an opset from {OPSETS.start} to {OPSETS.stop - 1} (default {DEFAULT_OPSET})")


def export_graph(module: torch.nn.Module, example: Callable[[Point], tuple], spec: GraphSpec,
                 refs_axes: list[int | None], max_refs: int, opset: int, path: Path,
                 trace_points: tuple[Point, ...], source_scale: int = 1) -> onnx.ModelProto:
    """Trace `module(*example(point))` with the given refs axis per flat input, write `path`, return the proto.

    With several `trace_points` (batch, HR height, width) the graph takes every batch and size they tell apart
    (`gemx.exporter.spatial`); its first input is the one whose shape is read, at the HR size over `source_scale`."""
    check_opset(opset)
    key = _fingerprint(module, spec, refs_axes, max_refs, opset, trace_points, source_scale)
    if key in _TRACED:
        _TRACED.move_to_end(key)
        proto = onnx.ModelProto.FromString(_TRACED[key])
    else:
        proto = _symbolic_graph(module, example, spec, refs_axes, max_refs, opset, trace_points, source_scale)
        _TRACED[key] = proto.SerializeToString()
        while len(_TRACED) > _TRACED_KEPT:
            _TRACED.popitem(last=False)
    strip_build_metadata(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise GemxError(f"exported {spec.name} graph failed the ONNX checker: {str(e).splitlines()[0]}") from None
    atomic_write(path, lambda tmp: onnx.save(proto, str(tmp)))
    return proto


# Graphs traced in this process, by everything that decides them (the module's weights, the contract, the options):
# tracing is deterministic and costs seconds, so exporting the same checkpoint again (a test suite, a profile over
# precisions) reuses the graph instead of tracing it twice more.
_TRACED: OrderedDict[str, bytes] = OrderedDict()
_TRACED_KEPT = 12


def _fingerprint(module: torch.nn.Module, *decides) -> str:
    h = hashlib.sha256(repr((type(module).__name__, getattr(module, "subpixel_head", None), decides)).encode())
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _symbolic_graph(module: torch.nn.Module, example: Callable[[Point], tuple], spec: GraphSpec,
                    refs_axes: list[int | None], max_refs: int, opset: int, trace_points: tuple[Point, ...],
                    source_scale: int) -> onnx.ModelProto:
    protos = [_trace(module, example(point), refs_axes, max_refs, opset) for point in trace_points]
    proto = protos[0]
    if len(protos) > 1:
        k = source_scale
        proto = symbolic_axes(protos, [(n, h // k, w // k) for n, h, w in trace_points], proto.graph.input[0].name)
        del proto.graph.value_info[:]  # shapes at the first trace's size: inferred again below, symbolically
    conform_to_contract(proto, spec)
    if len(protos) > 1:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    return proto


def _trace(module: torch.nn.Module, args: tuple, refs_axes: list[int | None], max_refs: int, opset: int) -> onnx.ModelProto:
    refs = Dim(REFS, min=1, max=max_refs)
    flat = [None if a is None else {a: refs} for a in refs_axes]
    dynamic_shapes = (flat[0],) if len(args) == 1 else (flat[0], tuple(flat[1:]))
    with _quiet():
        ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
        program = torch.onnx.export(ep, (), dynamo=True, opset_version=opset, optimize=True, verbose=False)
    return program.model_proto


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
            else:
                dim.ClearField("dim_param")
                dim.dim_value = d
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
