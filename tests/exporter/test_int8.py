"""INT8: the QDQ graphs' form, the range tables, calibration errors, the ORT CPU preparation, and quality."""

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from gemx import GemxError
from gemx.cli import app
from gemx.exporter.export import ExportOptions, export
from gemx.exporter.manifest import read_export_dir, sha256
from gemx.exporter.validate import INT8_PSNR_GOAL
from gemx.int8.ort_cpu import prepare_for_ort_cpu
from gemx.int8.ranges import RANGES_FILE, load_ranges, shipped_ranges_path
from gemx.metrics import psnr_db
from gemx.runtimes.build import BuildOptions, build
from gemx.runtimes.cpu import bf16_native
from gemx.runtimes.registry import open_session, runtime_available
from tests.conftest import INT8_CALIB, frames, videos_or_skip


def _initializers(proto):
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


@pytest.mark.data
def test_int8_graphs_are_tensorrt_qdq(int8_export):
    """Zero points 0 (int8), per-channel weight scales on the output-channel axis, the bicubic upsampler in FP32 and
    each encoder's first layer (RGB in, features out) in int8, the decoder's sums quantized, the residual Add in FP32
    over the float bicubic frame, the references' downsampling for the keys over the float references."""
    _, result = int8_export
    export_dir = read_export_dir(result.path)
    for graph in ("reference_encoder", "frame"):
        proto = onnx.load(str(export_dir.graph_path(graph, "int8")))
        inits = _initializers(proto)
        producer = {o: n for n in proto.graph.node for o in n.output}
        qdq = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert qdq
        for n in qdq:
            zero = inits[n.input[2]]
            assert zero.dtype == np.int8 and not zero.any(), n.name
        quantized, rgb_in = 0, 0
        for conv in (n for n in proto.graph.node if n.op_type == "Conv"):
            if conv.input[1] in inits:  # a float weight: kept FP32, only the bicubic upsampler (RGB in, RGB out)
                assert inits[conv.input[1]].shape[1] <= 3, conv.name
                continue
            dq = producer[conv.input[1]]
            weight, scale = inits[dq.input[0]], inits[dq.input[1]]
            assert dq.op_type == "DequantizeLinear" and weight.dtype == np.int8
            assert scale.shape == (weight.shape[0],)  # one scale per output channel
            assert {a.name: a.i for a in dq.attribute}.get("axis", 1) == 0
            assert len(conv.input) < 3 or conv.input[2] in inits  # float bias (TensorRT's form)
            quantized += 1
            rgb_in += weight.shape[1] == 3
        assert rgb_in == (2 if graph == "reference_encoder" else 1) and quantized > rgb_in  # the encoders' first layers
        dequantized = {i for i in producer if producer[i].op_type == "DequantizeLinear"}
        float_readers = [n for n in proto.graph.node if n.op_type == "AveragePool"
                         or (n.op_type == "Add" and not set(n.input) <= dequantized)]  # downsampling, a residual
        assert not any(i in dequantized for n in float_readers for i in n.input)
        for relu in (n for n in proto.graph.node if n.op_type == "Relu"):  # Conv -> Relu -> Q, never Q -> DQ -> Relu
            assert producer[relu.input[0]].op_type in ("Conv", "Add"), relu.name
        adds = [n for n in proto.graph.node if n.op_type == "Add"]
        summed = [a for a in adds if all(producer[i].op_type == "DequantizeLinear" for i in a.input)]
        if graph == "frame":  # the decoder's partial sums in int8; only a residual over the bicubic frame in FP32
            assert len(summed) >= 2
            assert all(a.output[0] == proto.graph.output[0].name for a in adds if a not in summed)


@pytest.mark.data
def test_the_cache_is_int8_with_one_scale_per_tensor_in_both_graphs(int8_export):
    """The encoder writes each int8 cache tensor through a Q, the frame graph reads it through a DQ with the same
    scale: every value_i, and key_i where its dot products are 64 channels deep or more (here key_2 only)."""
    from gemx.contract import Contract

    _, result = int8_export
    export_dir = read_export_dir(result.path)
    contract = export_dir.contract("int8")
    assert [s.dtype for s in contract.kv] == ["float32", "int8", "float32", "int8", "int8", "int8"]
    encoder = onnx.load(str(export_dir.graph_path("reference_encoder", "int8")))
    frame = onnx.load(str(export_dir.graph_path("frame", "int8")))
    want = {s.name: onnx.helper.np_dtype_to_tensor_dtype(np.dtype(s.dtype)) for s in contract.kv}
    int8 = [s.name for s in contract.kv if s.dtype == "int8"]
    scales = []
    for proto, ios, op in ((encoder, encoder.graph.output, "QuantizeLinear"), (frame, frame.graph.input, "DequantizeLinear")):
        assert {t.name: t.type.tensor_type.elem_type for t in ios if t.name in want} == want
        inits = _initializers(proto)
        nodes = {n.name: n for n in proto.graph.node}
        scales.append([float(inits[nodes[f"{name}_{op[:-6].lower()}"].input[1]]) for name in int8])
    assert scales[0] == scales[1] and all(s > 0 for s in scales[0])
    in_int8 = sum(np.prod(contract.shape(s, 1)) for s in contract.kv if s.dtype == "int8")
    assert contract.kv_bytes(1) == Contract(contract.config).kv_bytes(1) - 3 * in_int8


@pytest.mark.data
def test_manifest_records_method_source_and_accuracy(int8_export):
    _, result = int8_export
    entry = read_export_dir(result.path).manifest.precisions["int8"]
    q = entry.quantization
    assert q.method == "ptq-minmax" and INT8_CALIB in q.calibration.source and not q.calibration.shipped
    assert q.calibration.table_sha256 == sha256(result.path / RANGES_FILE)
    assert "2x2 phases" in q.frame_head
    assert entry.parity_against == "fp32 graphs"
    assert [(r.refs, r.size) for r in entry.parity] == [  # the training size, landscape, portrait, the largest
        (1, None), (2, None), (5, None), (2, [64, 96]), (2, [96, 64])]
    assert all(INT8_PSNR_GOAL < r.psnr_db < 100 for r in entry.parity)  # quantized, and close


def test_a_table_beside_the_checkpoint_replaces_calibration(int8_export, tmp_path):
    """The shipped mechanism: NAME.int8.json next to NAME.pt; same ranges, byte-identical INT8 graphs."""
    root, result = int8_export
    ckpt = tmp_path / "tiny.pt"
    shutil.copy(root / "tiny.pt", ckpt)
    with pytest.raises(GemxError, match="pass --calib VIDEO"):
        export(ckpt, ExportOptions(out=tmp_path / "a.export", int8=True))
    shutil.copy(result.path / RANGES_FILE, shipped_ranges_path(ckpt))
    again = export(ckpt, ExportOptions(out=tmp_path / "b.export", max_refs=5, int8=True))
    assert again.manifest.precisions["int8"].quantization.calibration.shipped
    for graph in ("reference_encoder", "frame"):
        name = f"{graph}.int8.onnx"
        assert (again.path / name).read_bytes() == (result.path / name).read_bytes()


def test_range_table_is_checked(int8_export, tmp_path):
    root, result = int8_export
    table = result.path / RANGES_FILE
    with pytest.raises(GemxError, match="calibrated for another checkpoint"):
        load_ranges(table, "0" * 64)
    d = json.loads(table.read_text())
    d["graphs"]["frame"][next(iter(d["graphs"]["frame"]))] = [0, float("nan")]
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(GemxError, match=r"bad\.json is malformed \(graphs: a range is not finite\); calibrate again with --calib"):
        load_ranges(tmp_path / "bad.json", sha256(root / "tiny.pt"))
    d = json.loads(table.read_text())
    d["graphs"]["frame"] = {}
    ckpt = tmp_path / "tiny.pt"
    shutil.copy(root / "tiny.pt", ckpt)
    shipped_ranges_path(ckpt).write_text(json.dumps(d))
    with pytest.raises(GemxError, match=r"has no range for a tensor of frame\.onnx"):
        export(ckpt, ExportOptions(out=tmp_path / "c.export", int8=True))
    assert not (tmp_path / "c.export").exists()
    d = json.loads(table.read_text())
    del d["graphs"]["reference_encoder"]["value_0"]  # a table from before the cache was int8
    shipped_ranges_path(ckpt).write_text(json.dumps(d))
    with pytest.raises(GemxError, match=r"has no range for value_0 \(made by an older gemx\?\); calibrate again"):
        export(ckpt, ExportOptions(out=tmp_path / "d.export", int8=True))
    assert not (tmp_path / "d.export").exists()


def test_calibration_input_errors_are_one_line(int8_export, tmp_path):
    root, _ = int8_export
    (tmp_path / "empty").mkdir()
    runner = CliRunner()
    for args, message in (
        (["--int8"], "pass --calib VIDEO|DIR"),
        (["--int8", "--calib", str(tmp_path / "empty")], "the folder holds no videos"),
        (["--int8", "--calib", str(tmp_path / "nope.mp4")], "does not exist"),
        (["--calib", str(tmp_path / "empty")], "add --int8"),
    ):
        res = runner.invoke(app, ["export", str(root / "tiny.pt"), "--out", str(tmp_path / "x.export"), *args])
        assert res.exit_code == 1, res.output
        assert message in res.output and "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.export").exists()


@pytest.mark.data
def test_ort_preparation_fuses_every_quantized_conv(int8_export):
    """The prepared graph runs each int8 Conv as one QLinearConv, each int8 sum as one QLinearAdd and each product
    with the int8 values in int8, with no float Relu left."""
    import onnxruntime as ort

    _, result = int8_export
    export_dir = read_export_dir(result.path)
    proto = onnx.load(str(export_dir.graph_path("frame", "int8")))
    quantized = sum(1 for n in proto.graph.node if n.op_type == "Conv" and n.input[1] not in _initializers(proto))
    producer = {o: n.op_type for n in proto.graph.node for o in n.output}
    sums = sum(1 for n in proto.graph.node if n.op_type == "Add" and {producer.get(i) for i in n.input} == {"DequantizeLinear"})
    prepared = prepare_for_ort_cpu(proto)
    onnx.checker.check_model(prepared)
    for n in prepared.graph.node:  # activations uint8 (zero point 0 after a Relu, else 128), biases int32
        if n.op_type == "QuantizeLinear":
            assert _initializers(prepared)[n.input[2]].dtype == np.uint8
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(result.path.parent / "optimized.onnx")
    ort.InferenceSession(prepared.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(opts.optimized_model_filepath).graph.node
    ops = Counter(n.op_type for n in optimized)
    assert ops["QLinearConv"] == quantized and ops["QLinearAdd"] == sums >= 2  # Relu -> Q folded, Conv/Add -> Q fused
    assert ops["Relu"] == 0
    assert ops["QLinearMatMul"] == 3  # probabilities x int8 values, at every level
    assert ops["MatMulIntegerToFloat"] == 1  # queries x the int8 keys of the 64-channel level, float logits
    writer = {o: n.op_type for n in optimized for o in n.output}
    pads = [n for n in optimized if n.op_type == "Pad" and n.input[0] in writer]  # not the one on the input frame
    assert len(pads) == 2 and not any(writer[p.input[0]] == "DequantizeLinear" for p in pads)  # the head's edge Pad and
    # the first layer's channel Pad both pad uint8


@pytest.mark.data
def test_int8_frame_graph_runs_its_head_on_phases(int8_export):
    """The INT8 frame graph's source has the sub-pixel head: one bilinear Resize fewer than the FP32 graph, the RGB
    phases laid out by a DepthToSpace, and the edge Pad before it quantized on its input's grid."""
    from gemx.int8.graph import graph_links

    _, result = int8_export
    export_dir = read_export_dir(result.path)
    fp32, int8 = (onnx.load(str(export_dir.graph_path("frame", p))) for p in ("fp32", "int8"))
    ops = {name: Counter(n.op_type for n in p.graph.node) for name, p in (("fp32", fp32), ("int8", int8))}
    assert ops["int8"]["Resize"] == ops["fp32"]["Resize"] - 1
    assert ops["int8"]["DepthToSpace"] == ops["fp32"]["DepthToSpace"] + 1
    producer, consumers = graph_links(int8.graph)
    [pad] = [n for n in int8.graph.node if n.op_type == "Pad" and n.input[0] in producer
             and producer[n.input[0]].op_type == "DequantizeLinear"]
    dq, [q] = producer[pad.input[0]], consumers[pad.output[0]]
    assert q.op_type == "QuantizeLinear" and q.input[1:] == dq.input[1:]


def test_ort_preparation_pads_short_convolutions_without_changing_an_output_bit(int8_export, monkeypatch):
    """The RGB head (3 output channels in 2x2 phases: 12) runs as a 16-channel int8 Conv sliced back and the first
    layer (3 input channels) reads 4, and both compute exactly what the unpadded Convs compute."""
    import onnxruntime as ort

    from gemx.int8 import ort_cpu

    _, result = int8_export
    export_dir = read_export_dir(result.path)
    proto = onnx.load(str(export_dir.graph_path("frame", "int8")))
    with open_session("ort", result.path, "int8") as session:
        kv = session.encode(frames(2, 64, seed=4).numpy()).kv
    feeds = {"target_lr": frames(1, 16, seed=5).numpy(), **kv}
    outs = []
    for block, group in ((ort_cpu.CONV_CHANNEL_BLOCK, ort_cpu.CONV_INPUT_GROUP), (1, 1)):  # 1: no Conv is padded
        monkeypatch.setattr(ort_cpu, "CONV_CHANNEL_BLOCK", block)
        monkeypatch.setattr(ort_cpu, "CONV_INPUT_GROUP", group)
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(result.path.parent / f"optimized{block}.onnx")
        session = ort.InferenceSession(prepare_for_ort_cpu(proto).SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outs.append(session.run(["frame_hr"], feeds)[0])
        optimized = onnx.load(opts.optimized_model_filepath).graph
        weights = _initializers(onnx.load(opts.optimized_model_filepath))
        channels = [weights[n.input[3]].shape[:2] for n in optimized.node if n.op_type == "QLinearConv"]
        if block == 1:
            assert any(out == 12 for out, _ in channels) and any(inp == 3 for _, inp in channels), channels
        else:
            assert all(out % block == 0 and inp % group == 0 for out, inp in channels), channels
    np.testing.assert_array_equal(outs[0], outs[1])


def test_ort_preparation_normalises_queries_in_one_node_without_changing_an_output_bit(int8_export, monkeypatch):
    """The unit queries (ReduceL2 -> Clip -> Div over dequantized rows) run as one LpNormalization per level, and the
    frame is the same to the bit as with the exported chain."""
    import onnxruntime as ort

    from gemx.int8 import ort_cpu

    _, result = int8_export
    proto = onnx.load(str(read_export_dir(result.path).graph_path("frame", "int8")))
    with open_session("ort", result.path, "int8") as session:
        kv = session.encode(frames(3, 64, seed=6).numpy()).kv
    feeds = {"target_lr": frames(1, 16, seed=7).numpy(), **kv}
    outs = []
    for rewrite in (True, False):
        if not rewrite:
            monkeypatch.setattr(ort_cpu, "_unit_rows", lambda graph: None)
        prepared = prepare_for_ort_cpu(proto)
        ops = Counter(n.op_type for n in prepared.graph.node)
        assert (ops["LpNormalization"], ops["ReduceL2"]) == ((3, 0) if rewrite else (0, 3))
        session = ort.InferenceSession(prepared.SerializeToString(), providers=["CPUExecutionProvider"])
        outs.append(session.run(["frame_hr"], feeds)[0])
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.data
def test_int8_sessions_match_fp32_and_the_cpu_build_is_used(int8_export):
    _, result = int8_export
    refs, target = frames(3, 64, seed=2).numpy(), frames(1, 16, seed=3).numpy()
    outs = {}
    for precision in ("fp32", "int8"):
        with open_session("ort", result.path, precision) as s:
            s.set_references(refs)
            outs[precision] = s(target)
    assert INT8_PSNR_GOAL < psnr_db(outs["int8"], outs["fp32"]) < 100
    built = build(result.path, BuildOptions(int8=True, refs_opt=2, force=True))
    assert built.record.precision == "int8" and built.path.name == "ort_cpu_int8"
    assert built.accuracy.psnr_db > INT8_PSNR_GOAL
    with open_session("ort", result.path, "int8") as s:
        assert s.frame_graph == built.path / "frame.onnx"
        s.set_references(refs)
        np.testing.assert_allclose(s(target), outs["int8"], atol=1e-5)  # the build is the in-memory preparation, saved
    record_path = built.path / "build.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "preparation_revision": "other preparation code"}))
    with open_session("ort", result.path, "int8") as s:  # a build by an older gemx's preparation is passed over
        assert isinstance(s.frame_graph, bytes)
        s.set_references(refs)
        np.testing.assert_allclose(s(target), outs["int8"], atol=1e-5)
    record_path.write_text(json.dumps(record))
    with pytest.raises(GemxError, match="the torch runtime does not run int8"):
        open_session("torch", result.path, "int8")
    with open_session("ort", result.path, "fp32") as f, open_session("ort", result.path, "int8") as i:
        cache = f.encode(refs)  # a cache from a session of another precision is refused in one line
        with pytest.raises(GemxError, match="this int8 session takes value_0 as int8, got float32"):
            i.decode(target, cache)


@pytest.mark.data
@pytest.mark.parametrize("runtime", ["ort", "openvino"])
def test_int8_frames_of_several_streams_in_one_execution_equal_each_alone(int8_export, runtime):
    """INT8 sessions batch too (ORT's prepared graphs; OpenVINO's int8 kernels): int8 caches stacked, one scale."""
    if not runtime_available(runtime)[0]:
        pytest.skip(runtime_available(runtime)[1])
    _, result = int8_export
    with open_session(runtime, result.path, "int8", threads=1) as s:
        caches = [s.encode(frames(2, 64, seed=60 + k).numpy()) for k in range(3)]
        targets = [frames(1, 16, seed=70 + k).numpy() for k in range(3)]
        alone = [s.decode(t, c) for t, c in zip(targets, caches, strict=True)]
        before = s.executions
        together = s.decode_batch(targets, caches)
        assert s.executions - before == 1
        for a, b in zip(alone, together, strict=True):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


@pytest.mark.data
def test_openvino_blocks_int8_keys_from_nhwc_to_the_same_bits(int8_export):
    """The int8 keys (the deepest level's) are found through their quantization and blocked before it, as they were."""
    if not runtime_available("openvino")[0]:
        pytest.skip(runtime_available("openvino")[1])
    from tests.runtimes.test_openvino import assert_keys_blocked_from_nhwc_to_the_same_bits

    _, result = int8_export
    assert "int8" in {spec.dtype for spec in read_export_dir(result.path).contract("int8").keys}
    assert_keys_blocked_from_nhwc_to_the_same_bits(result.path, "int8", frames(2, 64, seed=60).numpy())


def test_build_int8_needs_int8_graphs(tiny_export):
    copy = tiny_export.path.parent / "no-int8.export"
    shutil.copytree(tiny_export.path, copy, dirs_exist_ok=True)
    with pytest.raises(GemxError, match="re-export with `gemx export --int8"):
        build(copy, BuildOptions(int8=True))
    with pytest.raises(GemxError, match="one precision"):
        BuildOptions(int8=True, fp16=True)


@pytest.mark.data
def test_shipped_checkpoint_int8_needs_no_video_and_keeps_test_split_quality(tmp_path, monkeypatch):
    """`gemx export --int8` of the shipped checkpoint on a fresh install (no video named), then the issue's bar:
    video-mean PSNR on the test split at 1 and 5 references within 0.1 dB of FP32 (ORT CPU), for ORT's int8, OpenVINO's
    int8 of the same graphs, and OpenVINO's bf16 where the CPU has it. Every 24th frame: each row's difference from
    FP32 is that of every 12th frame to 0.003 dB, in half the time."""
    from gemx.model import load_checkpoint
    from gemx.runtimes.base import SessionModel
    from gemx.train.data import split_videos
    from gemx.train.evaluate import evaluate

    _, test_videos = split_videos(videos_or_skip())  # before the expensive export
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["export", "--int8", "--max-refs", "5", "--out", "shipped.export"])  # the bar is at 1 and 5
    assert res.exit_code == 0, res.output
    export_dir = read_export_dir(tmp_path / "shipped.export")
    calibration = export_dir.manifest.precisions["int8"].quantization.calibration
    assert calibration.shipped and "retalk5" not in calibration.source  # calibrated on the training split only
    _assert_int8_logits_where_keys_are_int8(export_dir)
    frame = onnx.load(str(export_dir.graph_path("frame", "int8")))
    producer = {o: n for n in frame.graph.node for o in n.output}
    [residual] = [n for n in frame.graph.node if n.output[0] == "frame_hr"]  # the float bicubic frame + the RGB phases
    assert residual.op_type == "Add" and [producer[i].op_type for i in residual.input] == ["DepthToSpace"] * 2
    config = load_checkpoint().config
    runs = [("ort", "fp32"), ("ort", "int8"), ("openvino", "int8")]  # OpenVINO runs the TensorRT-form QDQ graphs as they are
    if runtime_available("openvino")[0] and bf16_native()[0]:
        runs.append(("openvino", "bf16"))
    models = {f"{r} {p}": SessionModel(open_session(r, export_dir.path, p), config) for r, p in runs
              if r == "ort" or runtime_available(r)[0]}
    rows = {r.name: r.video_mean_psnr for r in evaluate(models, test_videos, config.size, config.scale, stride=24)}
    for refs in ("1 ref", "5 refs"):
        fp32 = rows[f"ort fp32 {refs}"]
        assert rows["bicubic"] + 1 < fp32, (refs, fp32)
        for name in models:
            assert abs(rows[f"{name} {refs}"] - fp32) < 0.1, (name, refs, fp32, rows[f"{name} {refs}"])


def _assert_int8_logits_where_keys_are_int8(export_dir):
    """Keys of 64 channels or more are int8 (the shipped model: levels 1 and 2; level 0 has 32): their logits read the
    dequantized keys and queries quantized at 1/127 (unit vectors), and ONNX Runtime runs each as one int8 product
    with float output."""
    import onnxruntime as ort

    contract = export_dir.contract("int8")
    assert [s.dtype for s in contract.keys] == ["float32", "int8", "int8"]
    frame = onnx.load(str(export_dir.graph_path("frame", "int8")))
    inits = _initializers(frame)
    producer = {o: n for n in frame.graph.node for o in n.output}
    logits = [n for n in frame.graph.node if n.op_type == "MatMul" and n.input[1] in producer
              and producer[n.input[1]].name.startswith("key_")]
    assert sorted(producer[n.input[1]].name for n in logits) == ["key_1_dequantize", "key_2_dequantize"]
    for matmul in logits:
        queries = producer[matmul.input[0]]
        assert queries.op_type == "DequantizeLinear" and float(inits[queries.input[1]]) == np.float32(1 / 127)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(export_dir.path.parent / "optimized.onnx")
    ort.InferenceSession(prepare_for_ort_cpu(frame).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    assert ops["MatMulIntegerToFloat"] == 2 and ops["QLinearMatMul"] == 3
