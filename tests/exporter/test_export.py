import json

import numpy as np
import onnx
import pytest
import torch

from gemx import GemxError
from gemx.contract import REFS, Contract
from gemx.exporter.export import ExportOptions, export
from gemx.exporter.manifest import read_export_dir
from gemx.exporter.trt_check import check_tensorrt_compat
from gemx.exporter.validate import ort_session, run_pipeline
from gemx.model import load_checkpoint
from gemx.model.lr import downsample
from tests.conftest import frames


def dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_refs_axis_is_symbolic_in_both_graphs(tiny_export):
    for precision in ("fp32", "fp16"):
        contract = Contract(read_export_dir(tiny_export.path).config, precision)
        for spec in contract.graphs:
            g = onnx.load(tiny_export.path / spec.file(precision)).graph
            values = {v.name: v for v in [*g.input, *g.output]}
            assert [v.name for v in g.input] == [s.name for s in spec.inputs]
            for s in spec.inputs + spec.outputs:
                assert dims(values[s.name]) == list(s.shape)
            assert any(REFS in dims(v) for v in values.values())
            first = dims(values[spec.inputs[0].name])
            assert first[2:] in (["height", "width"], ["lr_height", "lr_width"])  # any frame size on the grid


def test_parity_at_1_2_5_10_and_max(tiny_export):
    rows = {(r.refs, tuple(r.size or ())): r for r in tiny_export.parity["fp32"]}
    assert sorted(rows) == [(1, ()), (2, ()), (2, (64, 96)), (2, (96, 64)), (5, ()), (10, ()), (12, ())]
    assert all(r.max_abs_error <= 1e-4 for r in rows.values())  # at the training size, landscape and portrait


def test_fp16_graphs_are_mixed_precision_with_fp32_softmax(tiny_export):
    g = onnx.load(tiny_export.path / "frame.fp16.onnx").graph
    f16 = onnx.TensorProto.FLOAT16
    assert any(i.data_type == f16 for i in g.initializer), "weights should be FP16"
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    assert types["target_lr"] == types["frame_hr"] == onnx.TensorProto.FLOAT
    softmax = [n for n in g.node if n.op_type == "Softmax"]
    assert softmax and all(types.get(n.input[0]) == onnx.TensorProto.FLOAT for n in softmax)
    assert all(r.psnr_db > 50 for r in tiny_export.parity["fp16"])


def _pipeline(path, contract, refs, target):
    enc, frame = (ort_session(path / s.file(contract.precision)) for s in contract.graphs)
    return run_pipeline(enc, frame, contract, refs.numpy(), target.numpy())


def test_exported_graphs_are_invariant_to_reference_order_and_duplication(tiny_export):
    contract = read_export_dir(tiny_export.path).contract()
    size = contract.config.size
    target = downsample(frames(1, size, seed=5), contract.config.scale)
    refs = frames(3, size, seed=6)
    base = _pipeline(tiny_export.path, contract, refs, target)
    np.testing.assert_allclose(_pipeline(tiny_export.path, contract, refs[[1, 2, 0]], target), base, atol=1e-5)
    np.testing.assert_allclose(_pipeline(tiny_export.path, contract, torch.cat([refs, refs]), target), base, atol=1e-5)


def test_manifest_describes_graphs_and_hashes(tiny_export):
    m = json.loads((tiny_export.path / "manifest.json").read_text())
    assert m["format"] == "gemx-export" and m["refs"] == {"axis": "refs", "min": 1, "max": 12, "validated": [1, 2, 5, 10, 12]}
    assert m["batch"] == {"axis": "batch", "validated": 3} and m["precisions"]["fp32"]["batch_max_abs_error"] <= 1e-5
    graph = m["precisions"]["fp32"]["graphs"]["frame"]
    assert graph["file"] == "frame.onnx" and len(graph["sha256"]) == 64
    assert graph["inputs"][0] == {"name": "target_lr", "shape": ["batch", 3, "lr_height", "lr_width"], "dtype": "float32"}
    assert m["spatial"] == {"axes": ["height", "width"], "grid": 32, "max_size": [1088, 1920]}
    assert m["model"]["parameters"] == sum(p.numel() for p in load_checkpoint(tiny_export.path.parent / "tiny.pt").model.parameters())


def test_graphs_pass_the_tensorrt_compatibility_check(tiny_export):
    for r in tiny_export.trt:
        assert r.ok, r.problems
        assert "Resize" not in r.op_counts or r.graph.startswith("frame")  # only the decoder's bilinear x2


def test_tensorrt_check_flags_cubic_resize_and_reshapes_from_tensor_values():
    """A Reshape whose shape is read from shapes (Shape, then integer ops with constants) is what TensorRT runs as
    shape tensors; one read from a tensor's values is not."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="cubic"),
        helper.make_node("Shape", ["y"], ["s"]),
        helper.make_node("Div", ["s", "two"], ["half"]),
        helper.make_node("Reshape", ["y", "half"], ["z"], name="from_shapes"),
        helper.make_node("Cast", ["y"], ["values"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["y", "values"], ["w"], name="from_values"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("z", "w")],
                              [helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2]),
                               helper.make_tensor("two", TensorProto.INT64, [1], [2])])
    problems = check_tensorrt_compat(helper.make_model(graph), "g").problems
    assert any("mode='cubic'" in p for p in problems)
    assert [p for p in problems if "Reshape" in p] == [
        "Reshape node 'from_values': shape is computed from tensor values; TensorRT needs it from shapes and constants"]


def test_existing_export_is_not_overwritten_without_force(tiny_export):
    before = (tiny_export.path / "manifest.json").read_bytes()
    with pytest.raises(GemxError, match="already holds a gemx export; pass --force"):
        export(tiny_export.path.parent / "tiny.pt", ExportOptions(out=tiny_export.path))
    assert (tiny_export.path / "manifest.json").read_bytes() == before


def test_foreign_directory_is_never_replaced(tmp_path, tiny_ckpt):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(GemxError, match="not a gemx export"):
        export(tiny_ckpt, ExportOptions(out=tmp_path, force=True))
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_bad_checkpoint_unsupported_opset_and_bad_block_size(tmp_path, tiny_ckpt):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(GemxError, match=r"bad\.pt"):
        export(bad, ExportOptions(out=tmp_path / "x"))
    with pytest.raises(GemxError, match="opset 9 is not supported"):
        export(tiny_ckpt, ExportOptions(out=tmp_path / "x", opset=9))
    with pytest.raises(GemxError, match="block size 3 does not divide"):
        export(tiny_ckpt, ExportOptions(out=tmp_path / "x", block_size=3))
    assert not (tmp_path / "x").exists()


def test_tampered_graph_is_refused_by_readers(tiny_export, tmp_path):
    import shutil

    copy = tmp_path / "copy.export"
    shutil.copytree(tiny_export.path, copy)
    with open(copy / "frame.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(GemxError, match="does not match the sha256"):
        read_export_dir(copy)


def test_cli_export_prints_summary_and_refuses_overwrite(tiny_ckpt, tmp_path):
    from typer.testing import CliRunner

    from gemx.cli import app

    out = tmp_path / "cli.export"
    res = CliRunner().invoke(app, ["export", str(tiny_ckpt), "--out", str(out), "--max-refs", "3"])
    assert res.exit_code == 0, res.output
    assert "parity" in res.output and "TensorRT" in res.output and (out / "manifest.json").exists()
    res = CliRunner().invoke(app, ["export", str(tiny_ckpt), "--out", str(out)])
    assert res.exit_code == 1 and "--force" in res.output


def test_simplify_keeps_parity(tiny_ckpt, tmp_path):
    pytest.importorskip("onnxslim", reason="--simplify needs onnxslim (the dev/simplify extra)")
    result = export(tiny_ckpt, ExportOptions(out=tmp_path / "slim.export", simplify=True, max_refs=3))
    assert all(r.max_abs_error <= 1e-4 for r in result.parity["fp32"])
    assert all(r.ok for r in result.trt)


def test_python_dash_m_gemx_lists_the_commands():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "gemx", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("info", "export", "build", "profile", "upscale", "train", "eval"):
        assert cmd in out


@pytest.mark.parametrize("variant", [{"robust": True, "residual": True}, {"arch": "coarse"}])
def test_every_deployable_variant_exports_with_parity(variant, tmp_path):
    from gemx.model import build_model, preset, save_checkpoint

    model = build_model(preset("tiny", **variant))
    torch.nn.init.normal_(model.decoder.head[-1].weight, std=0.1)  # a residual model starts as exact bicubic
    save_checkpoint(tmp_path / "v.pt", model)
    result = export(tmp_path / "v.pt", ExportOptions(out=tmp_path / "v.export", fp16=True, max_refs=3))
    assert all(0 < r.max_abs_error <= 1e-4 for r in result.parity["fp32"])  # > 0: the decoder really contributes
    assert all(r.psnr_db > 50 for r in result.parity["fp16"])


def test_sisr_has_nothing_to_split_and_says_so(tmp_path):
    from gemx.model import build_model, preset, save_checkpoint

    save_checkpoint(tmp_path / "s.pt", build_model(preset("tiny", arch="sisr")))
    with pytest.raises(GemxError, match="uses no references"):
        export(tmp_path / "s.pt", ExportOptions(out=tmp_path / "s.export"))


def test_default_out_dir_is_next_to_the_checkpoint(tiny_ckpt):
    result = export(tiny_ckpt, ExportOptions(max_refs=2))
    assert result.path == tiny_ckpt.parent / "tiny-b4.export" and (result.path / "manifest.json").exists()


def test_trace_points_must_tell_every_product_of_batch_height_and_width_apart():
    from gemx.exporter.spatial import _check_separable, _term

    points = [(1, 2, 3), (1, 3, 5), (2, 2, 3)]  # what the exporter traces the frame graph at (in grid units)
    _check_separable(points, {"n", "h", "w"})
    # blocks per batch at (n, h, w): 4*n*h*w; a row of blocks: 2*w; a constant stays one
    assert _term([24, 60, 48], points, {"n", "h", "w"}, "x") == ("nhw", 4)
    assert _term([6, 10, 6], points, {"n", "h", "w"}, "x") == ("w", 2)
    assert _term([7, 7, 7], points, {"n", "h", "w"}, "x") == ("", 7)
    with pytest.raises(GemxError, match="cannot tell h from w"):
        _check_separable([(1, 2, 3), (1, 4, 6)], {"h", "w"})  # both sides doubled: height and width look alike
    with pytest.raises(GemxError, match="no multiple of the batch, height, width"):
        _term([5, 7, 9], points, {"n", "h", "w"}, "x")
