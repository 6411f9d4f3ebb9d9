"""Each INT8 graph pass on a hand-built graph: what it rewrites, and what it must leave alone. (The bit-exact tests
on exported models in tests/exporter/test_int8.py guard the passes together.)"""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from gemx import GemxError
from gemx.int8.graph import Graph
from gemx.int8.qdq import (
    QDQ_PASSES,
    Int8Cache,
    drop_unused,
    float_sources_stay_float,
    int8_cache,
    pads_keep_grid,
    quantize,
    quantize_after_relu,
    quantize_probabilities,
    quantize_queries,
)
from gemx.int8.trt_form import check_tensorrt_form

NO_CACHE = Int8Cache({}, frozenset())


def model(nodes, inputs, outputs, inits=()):
    """A graph of `nodes` over float tensors; `inits`: name -> array."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()])
    return helper.make_model(graph)


def run(rewrite, proto, cache):
    """One pass over a hand-built graph, as `quantize` runs it."""
    rewrite(Graph(proto.graph), cache)


def scale(value=0.1):
    return {"s": np.float32(value), "z": np.int8(0)}


def ops(proto):
    return [n.op_type for n in proto.graph.node]


def node(proto, name):
    return next(n for n in proto.graph.node if n.name == name)


def test_the_passes_run_in_their_declared_order():
    assert [p.__name__ for p in QDQ_PASSES] == ["quantize_after_relu", "float_sources_stay_float", "pads_keep_grid",
                                                 "drop_unused", "int8_cache", "quantize_queries", "quantize_probabilities"]


def test_quantize_after_relu_moves_the_pair_after_the_relu_or_drops_it():
    w = {"w": np.ones((1, 1, 1, 1), np.float32)}
    moved = model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
                   helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"], name="q"),
                   helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["yd"], name="dq"),
                   helper.make_node("Relu", ["yd"], ["r"], name="relu"),
                   helper.make_node("Resize", ["r"], ["out"], name="float_reader")], ["x"], ["out"], {**w, **scale()})
    run(quantize_after_relu, moved, NO_CACHE)
    assert ops(moved) == ["Conv", "Relu", "QuantizeLinear", "DequantizeLinear", "Resize"]
    assert list(node(moved, "relu").input) == ["y"] and list(node(moved, "q").input[:1]) == ["r"]
    assert list(node(moved, "float_reader").input) == ["yd"]  # a float reader reads the grid the Q defines
    dropped = model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
                     helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"], name="q"),
                     helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["yd"], name="dq"),
                     helper.make_node("Relu", ["yd"], ["r"], name="relu"),
                     helper.make_node("QuantizeLinear", ["r", "s", "z"], ["out"], name="own_q")], ["x"], ["out"], {**w, **scale()})
    run(quantize_after_relu, dropped, NO_CACHE)
    assert ops(dropped) == ["Conv", "Relu", "QuantizeLinear"]  # Conv -> Relu -> Q: one rounding
    untouched = model([helper.make_node("Identity", ["x"], ["y"]),  # not a Conv's or a sum's output
                       helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"]),
                       helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["yd"]),
                       helper.make_node("Relu", ["yd"], ["out"])], ["x"], ["out"], scale())
    run(quantize_after_relu, untouched, NO_CACHE)
    assert ops(untouched) == ["Identity", "QuantizeLinear", "DequantizeLinear", "Relu"]


def test_float_readers_of_a_tensor_quantized_for_an_int8_op_read_the_float_tensor():
    proto = model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                   helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                   helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
                   helper.make_node("Conv", ["xd", "wd"], ["y"], name="int8_conv"),
                   helper.make_node("Add", ["xd", "y"], ["out"], name="residual")], ["x"], ["out"],
                  {"wq": np.ones((1, 1, 1, 1), np.int8), **scale()})
    run(float_sources_stay_float, proto, NO_CACHE)
    assert list(node(proto, "int8_conv").input) == ["xd", "wd"]  # the int8 op keeps its quantized operand
    assert list(node(proto, "residual").input) == ["x", "y"]  # the float reader: the float frame, not its int8 copy


def test_a_pad_between_a_dq_and_a_q_keeps_its_inputs_grid_unless_it_adds_a_value():
    def graph(mode, value=None):
        pad_inputs = ["xd", "pads"] + (["v"] if value is not None else [])
        return model([helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                      helper.make_node("Pad", pad_inputs, ["p"], mode=mode),
                      helper.make_node("QuantizeLinear", ["p", "s2", "z2"], ["pq"], name="q"),
                      helper.make_node("DequantizeLinear", ["pq", "s2", "z2"], ["out"], name="dq")], ["xq"], ["out"],
                     {"pads": np.zeros(8, np.int64), "s2": np.float32(0.2), "z2": np.int8(0), "v": np.float32(0.5), **scale()})

    edge = graph("edge")
    run(pads_keep_grid, edge, NO_CACHE)
    assert list(node(edge, "q").input[1:]) == ["s", "z"] and list(node(edge, "dq").input[1:]) == ["s", "z"]
    constant = graph("constant", value=0.5)  # 0.5 may lie off the input's grid
    run(pads_keep_grid, constant, NO_CACHE)
    assert list(node(constant, "q").input[1:]) == ["s2", "z2"]


def test_drop_unused_removes_initializers_no_node_reads():
    proto = model([helper.make_node("Relu", ["x"], ["out"])], ["x"], ["out"], {"orphan": np.float32(1)})
    run(drop_unused, proto, NO_CACHE)
    assert not proto.graph.initializer


def test_the_int8_cache_is_quantized_where_written_and_dequantized_where_a_product_reads_it():
    cache = Int8Cache({"value_0": (-2.54, 1.0)}, frozenset())
    encoder = model([helper.make_node("Relu", ["x"], ["value_0"], name="last")], ["x"], ["value_0"])
    run(int8_cache, encoder, cache)
    assert ops(encoder) == ["Relu", "QuantizeLinear"] and encoder.graph.output[0].type.tensor_type.elem_type == TensorProto.INT8
    scales = {i.name: numpy_helper.to_array(i) for i in encoder.graph.initializer}
    assert scales["value_0_int8_scale"] == pytest.approx(2.54 / 127)  # symmetric over the larger side
    frame = model([helper.make_node("Reshape", ["value_0", "shape"], ["v"]),
                   helper.make_node("MatMul", ["p", "v"], ["out"], name="product")], ["value_0", "p"], ["out"],
                  {"shape": np.array([4, 4], np.int64)})
    run(int8_cache, frame, cache)
    assert ops(frame) == ["Reshape", "DequantizeLinear", "MatMul"]  # the reshape moves int8 bytes; the DQ feeds the product
    assert list(node(frame, "product").input) == ["p", "v_dq"]
    assert frame.graph.input[0].type.tensor_type.elem_type == TensorProto.INT8


def test_queries_are_quantized_only_where_they_meet_int8_keys_the_contract_names():
    def graph():
        return model([helper.make_node("DequantizeLinear", ["kq", "s", "z"], ["k"], name="key_1_dequantize"),
                      helper.make_node("DequantizeLinear", ["vq", "s", "z"], ["v"], name="value_1_dequantize"),
                      helper.make_node("MatMul", ["q", "k"], ["logits"], name="logits"),
                      helper.make_node("MatMul", ["q2", "v"], ["out"], name="values")], ["q", "q2"], ["logits", "out"],
                     {"kq": np.ones((2, 2), np.int8), "vq": np.ones((2, 2), np.int8), **scale()})

    proto = graph()
    run(quantize_queries, proto, Int8Cache({}, frozenset({"key_1"})))
    assert list(node(proto, "logits").input) == ["q_dq", "k"] and list(node(proto, "values").input) == ["q2", "v"]
    scales = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert scales["q_int8_scale"] == pytest.approx(1 / 127)  # unit vectors: no calibration needed
    float_keys = graph()
    run(quantize_queries, float_keys, NO_CACHE)  # no int8 keys in the contract: nothing to meet
    assert list(node(float_keys, "logits").input) == ["q", "k"]


def test_probabilities_are_quantized_only_where_they_meet_int8_values():
    proto = model([helper.make_node("Softmax", ["logits"], ["p"], name="softmax"),
                   helper.make_node("DequantizeLinear", ["vq", "s", "z"], ["v"]),
                   helper.make_node("MatMul", ["p", "v"], ["out"], name="product"),
                   helper.make_node("Softmax", ["logits2"], ["p2"], name="float_softmax"),
                   helper.make_node("MatMul", ["p2", "w"], ["out2"], name="float_product")], ["logits", "logits2", "w"],
                  ["out", "out2"], {"vq": np.ones((2, 2), np.int8), **scale()})
    run(quantize_probabilities, proto, NO_CACHE)
    assert list(node(proto, "product").input) == ["p_dq", "v"] and list(node(proto, "float_product").input) == ["p2", "w"]


def test_tensorrt_form_refuses_a_zero_point_other_than_int8_zero():
    def graph(zero):
        return model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["out"], name="q")], ["x"], ["out"],
                     {"s": np.float32(0.1), "z": zero})

    check_tensorrt_form(graph(np.int8(0)), "ok.onnx")
    with pytest.raises(GemxError, match=r"bad\.onnx: q has a non-zero or non-int8 zero point"):
        check_tensorrt_form(graph(np.uint8(128)), "bad.onnx")
    with pytest.raises(GemxError, match="non-zero"):
        check_tensorrt_form(graph(np.int8(3)), "bad.onnx")


def test_a_range_table_without_a_tensor_the_quantizer_needs_is_one_line(tmp_path):
    """ONNX Runtime's quantizer meets a tensor to quantize with no calibrated range: one line, and nothing written."""
    import onnx

    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    proto = model([conv], ["x"], ["y"], {"w": np.ones((4, 4, 3, 3), np.float32)})
    proto.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8]))
    onnx.save(proto, tmp_path / "frame.onnx")
    with pytest.raises(GemxError, match=r"^the INT8 range table has no range for a tensor of frame\.onnx .*calibrate "
                                        r"again with --calib VIDEO\|DIR$"):
        quantize(tmp_path / "frame.onnx", {"y": (0.0, 1.0)}, tmp_path / "frame.int8.onnx", NO_CACHE)
    assert not (tmp_path / "frame.int8.onnx").exists()
