"""Hostile input, subgraphs and functions: sites inside If / Loop / Scan bodies and model-local
functions are left alone with a reason (exit 3), never silently broken; main-graph sites whose
tensors a subgraph also reads (outer-scope names) are rewritten without breaking that subgraph.

Each model really runs in onnxruntime: the CLI verifies the rewritten model against the original
on both If branches (the condition is a graph input, fed False by the default zero inputs, and True
through ``--inputs``).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hostile import IR_VERSION, OPSET, assert_clean_exit, invoke

RNG = np.random.default_rng(7)
W = RNG.standard_normal((2, 2, 4, 4)).astype(np.float32)
W_INNER = RNG.standard_normal((2, 2, 3, 3)).astype(np.float32)
X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])
COND = helper.make_tensor_value_info("c", TensorProto.BOOL, [])


def _convtranspose(inp, out, name, weight="W", **attrs):
    attrs.setdefault("strides", [2, 2])
    attrs.setdefault("pads", [1, 1, 1, 1])
    return helper.make_node("ConvTranspose", [inp, weight], [out], name=name, **attrs)


def _model(nodes, inputs, outputs, inits=(), functions=(), opsets=(("", OPSET),)):
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                                   for o in outputs], initializer=list(inits))
    return helper.make_model(graph, ir_version=IR_VERSION, functions=list(functions),
                             opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


def _branch(name, nodes, output, inits=()):
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                             initializer=list(inits))


def if_model():
    """Main site 'up' (rewritable); the then-branch has its own ConvTranspose 'inner' on the
    outer tensor 'h' and reuses the outer weight 'W'; the else-branch reads 'h' directly."""
    then = _branch("then", [_convtranspose("h", "t1", "inner", "W_inner", output_padding=[1, 1]),
                            _convtranspose("h", "t2", "inner_outer_weight", "W"),
                            helper.make_node("Add", ["t1", "t2"], ["t"])], "t",
                   [numpy_helper.from_array(W_INNER, "W_inner")])
    other = _branch("else", [helper.make_node("Relu", ["h"], ["e"])], "e")
    nodes = [_convtranspose("x", "h", "up"), helper.make_node("If", ["c"], ["y"], name="branch",
                                                               then_branch=then, else_branch=other)]
    return _model(nodes, [X, COND], ["y"], [numpy_helper.from_array(W, "W")])


def loop_model():
    """A Loop body (2 iterations) holding a ConvTranspose of the outer 'h'."""
    body = helper.make_graph(
        [_convtranspose("h", "b", "in_loop", "W"), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
    )
    nodes = [_convtranspose("x", "h", "up"),
             helper.make_node("Loop", ["n", "c_true"], ["y"], name="loop", body=body)]
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.array(2, np.int64), "n"),
             numpy_helper.from_array(np.array(True), "c_true")]
    return _model(nodes, [X], ["y"], inits)


def scan_model():
    """A Scan over the batch axis whose body upsamples each slice with a ConvTranspose."""
    body = helper.make_graph(
        [helper.make_node("Unsqueeze", ["s", "axis0"], ["s4"]), _convtranspose("s4", "o4", "in_scan", "W"),
         helper.make_node("Squeeze", ["o4", "axis0"], ["o"])],
        "body", [helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 5, 5])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([0], np.int64), "axis0")],
    )
    nodes = [helper.make_node("Scan", ["x"], ["y"], name="scan", body=body, num_scan_inputs=1)]
    return _model(nodes, [X], ["y"], [numpy_helper.from_array(W, "W")])


def function_model():
    """A model-local function 'local.Up' holding a ConvTranspose, called once after the main site."""
    fn = helper.make_function("local", "Up", ["a", "w"], ["b"], [_convtranspose("a", "b", "in_function", "w")],
                              [helper.make_opsetid("", OPSET)])
    nodes = [_convtranspose("x", "h", "up"), helper.make_node("Up", ["h", "W"], ["y"], name="call", domain="local")]
    return _model(nodes, [X], ["y"], [numpy_helper.from_array(W, "W")], functions=[fn],
                  opsets=(("", OPSET), ("local", 1)))


def resize_read_by_subgraph_model():
    """Main-graph nearest Resize + Conv whose upsampled tensor an If branch also reads: the Resize
    must survive the rewrite, because the branch still needs it."""
    conv_w = RNG.standard_normal((2, 2, 3, 3)).astype(np.float32)
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    then = _branch("then", [helper.make_node("Relu", ["u"], ["r"])], "r")
    other = _branch("else", [helper.make_node("Neg", ["u"], ["n"])], "n")
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["u"], name="resize", mode="nearest"),
             helper.make_node("Conv", ["u", "CW"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("If", ["c"], ["z"], name="branch", then_branch=then, else_branch=other)]
    return _model(nodes, [X, COND], ["y", "z"], [scales, numpy_helper.from_array(conv_w, "CW")])


def resize_conv_if_model():
    """Resize -> Conv and Conv -> DepthToSpace inside If branches (weights in the branch and outer):
    refused by name like a ConvTranspose there (only the ConvTranspose parser used to see subgraphs)."""
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    w_sub = numpy_helper.from_array(RNG.standard_normal((8, 2, 3, 3)).astype(np.float32), "W_sub")
    then = _branch("then", [helper.make_node("Resize", ["h", "", "scales"], ["r"], name="inner_resize",
                                             mode="nearest"),
                            helper.make_node("Conv", ["r", "W_inner"], ["t"], name="inner_conv", pads=[1, 1, 1, 1])],
                   "t", [scales, numpy_helper.from_array(W_INNER, "W_inner")])
    other = _branch("else", [helper.make_node("Conv", ["h", "W_sub"], ["s"], name="sub_conv", pads=[1, 1, 1, 1]),
                             helper.make_node("DepthToSpace", ["s"], ["e"], name="inner_d2s", blocksize=2,
                                              mode="CRD")], "e")
    nodes = [_convtranspose("x", "h", "up"), helper.make_node("If", ["c"], ["y"], name="branch",
                                                               then_branch=then, else_branch=other)]
    return _model(nodes, [X, COND], ["y"], [numpy_helper.from_array(W, "W"), w_sub])


CASES = {
    "if": (if_model, {"inner": "a subgraph of If 'branch'", "inner_outer_weight": "a subgraph of If 'branch'"}),
    "if_resize_conv": (resize_conv_if_model, {"inner_conv": "a subgraph of If 'branch'",
                                              "inner_d2s": "a subgraph of If 'branch'"}),
    "loop": (loop_model, {"in_loop": "a subgraph of Loop 'loop'"}),
    "scan": (scan_model, {"in_scan": "a subgraph of Scan 'scan'"}),
    "function": (function_model, {"in_function": "model-local function 'local.Up'"}),
}


def _feeds(model, cond: bool):
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 2, 5, 5)).astype(np.float32)}
    if any(i.name == "c" for i in model.graph.input):
        feeds["c"] = np.array(cond)
    return feeds


def _run(model, feeds):
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cond", [False, True])
def test_sites_in_subgraphs_and_functions_are_left_alone_with_a_reason(tmp_path, case, cond):
    build, inner = CASES[case]
    model = build()
    src, out, rep = tmp_path / "model.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    src.write_bytes(model.SerializeToString())
    before = src.read_bytes()
    feeds = _feeds(model, cond)
    npz = tmp_path / "in.npz"
    np.savez(npz, **feeds)
    result = invoke("convert", src, "-o", out, "--report", rep, "--inputs", npz)
    assert_clean_exit(result, 3)
    assert src.read_bytes() == before
    report = json.loads(rep.read_text())
    assert report["verification"] == "passed"
    status = {s["node"]: s for s in report["sites"]}
    assert {k for k, s in status.items() if s["status"] == "refused"} == set(inner)
    for node, where in inner.items():
        assert where in status[node]["reason"] and "not rewritten" in status[node]["reason"]
    if "up" in status:
        assert status["up"]["status"] == "rewritten"
    for a, b in zip(_run(model, feeds), _run(out, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    # the bodies are untouched
    saved = onnx.load(str(out))
    bodies = [a for n in saved.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    original = [a for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    assert [b.g.SerializeToString() for b in bodies] == [b.g.SerializeToString() for b in original]
    assert [f.SerializeToString() for f in saved.functions] == [f.SerializeToString() for f in model.functions]


@pytest.mark.parametrize("cond", [False, True])
def test_tensor_read_by_a_subgraph_keeps_its_producer(tmp_path, cond):
    model = resize_read_by_subgraph_model()
    src, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    src.write_bytes(model.SerializeToString())
    feeds = _feeds(model, cond)
    npz = tmp_path / "in.npz"
    np.savez(npz, **feeds)
    result = invoke("convert", src, "-o", out, "--to", "convtranspose", "--inputs", npz)
    assert result.exit_code in (0, 3), result.output
    saved = onnx.load(str(out))
    assert "Resize" in [n.op_type for n in saved.graph.node]  # the branch still reads 'u'
    for a, b in zip(_run(model, feeds), _run(out, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_inspect_lists_subgraph_and_function_sites_as_refused(tmp_path):
    for build, inner in (c for c in CASES.values()):
        src = tmp_path / "model.onnx"
        src.write_bytes(build().SerializeToString())
        result = invoke("inspect", src, "--json")
        assert_clean_exit(result, 0)
        sites = {s["node"]: s for s in json.loads(result.stdout)["sites"]}
        for node in inner:
            assert sites[node]["refused"] and sites[node]["exact_forms"] == []
