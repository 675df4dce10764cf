"""ConvTranspose parser: padding resolved as onnxruntime computes it, refusals with reasons."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnx_uprewrite as up
from onnx_uprewrite.api import find_sites
from onnx_uprewrite.passes.from_convtranspose import resolve_axis
from onnx_uprewrite.verify import session
from onnx_uprewrite.weights import Axis, conv_transpose_reference


def _model(attrs, x_shape, w=None, bias=None, opset=17, ir=8, weight_as_input=False):
    w = np.random.default_rng(0).standard_normal((1, 1, 3)).astype(np.float32) if w is None else w
    inits = [] if weight_as_input else [numpy_helper.from_array(w, "W")]
    inputs = [helper.make_tensor_value_info("x", 1, x_shape)]
    if weight_as_input:
        inputs.append(helper.make_tensor_value_info("W", 1, list(w.shape)))
    ins = ["x", "W"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "B"))
        ins.append("B")
    node = helper.make_node("ConvTranspose", ins, ["y"], name="up", **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", 1, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)


PROBES = [
    (ap, s, k, d, op, pads, os_)
    for ap in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")
    for s, k, d in itertools.product((1, 2, 3), (1, 2, 3, 5), (1, 2))
    for op in range(s)
    for pads, os_ in (((0, 0), None), ((1, 2), None), ((3, 0), None), (None, "crop"), (None, "grow"))
    if not (ap != "NOTSET" and pads not in ((0, 0), None))
]


@pytest.mark.parametrize("ap,s,k,d,op,pads,os_", PROBES)
def test_resolved_padding_matches_onnxruntime(ap, s, k, d, op, pads, os_):
    """The parser's (pb, Lout) reproduce onnxruntime's output exactly, on a random 1-D input."""
    length = 4
    keff = (k - 1) * d + 1
    full = (length - 1) * s + keff + op
    attrs = dict(strides=[s], dilations=[d], output_padding=[op])
    if ap != "NOTSET":
        attrs["auto_pad"] = ap
    if pads and ap == "NOTSET":
        if pads[0] + pads[1] >= full:
            pytest.skip("empty output")
        attrs["pads"] = list(pads)
    if os_ is not None:
        out = full - 1 if os_ == "crop" else full + s - 1 - op
        attrs["output_shape"] = [out]
    rng = np.random.default_rng(1)
    w = rng.standard_normal((1, 1, k)).astype(np.float32)
    x = rng.standard_normal((1, 1, length)).astype(np.float32)
    model = _model(attrs, [1, 1, length], w=w)
    y = session(model).run(None, {"x": x})[0]
    pb, e = resolve_axis(length, s, k, d, op, ap, *(attrs.get("pads", [0, 0])), attrs.get("output_shape", [None])[0])
    ref = conv_transpose_reference(x, w, None, (Axis(s, d, k, pb, e),))
    assert ref.shape == y.shape
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5)


def _refusal(model, shapes=None):
    sites, refusals = find_sites(model, shapes)
    assert not sites
    assert len(refusals) == 1
    return refusals[0].reason


def test_weight_graph_input_is_refused_with_node_and_reason():
    reason = _refusal(_model(dict(strides=[2]), [1, 1, 4], weight_as_input=True))
    assert reason.startswith("ConvTranspose 'up': weight W is not constant")
    assert "graph input" in reason


def test_ir3_weights_listed_as_inputs_are_constant_and_noted():
    model = _model(dict(strides=[2]), [1, 1, 4], ir=3, opset=9)
    model.graph.input.append(helper.make_tensor_value_info("W", 1, [1, 1, 3]))
    sites, refusals = find_sites(model)
    assert len(sites) == 1 and not refusals
    assert "IR < 4" in sites[0].notes[0]


def test_ir8_input_with_default_initializer_is_refused():
    model = _model(dict(strides=[2]), [1, 1, 4])
    model.graph.input.append(helper.make_tensor_value_info("W", 1, [1, 1, 3]))
    assert "override" in _refusal(model)


def test_weight_through_constant_and_identity_is_accepted_and_removed():
    w = np.random.default_rng(0).standard_normal((2, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["wc"], name="const", value=numpy_helper.from_array(w)),
        helper.make_node("Identity", ["wc"], ["wi"], name="ident"),
        helper.make_node("ConvTranspose", ["x", "wi"], ["y"], name="up", strides=[2, 2], pads=[1, 1, 0, 0]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", 1, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = up.convert(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "DepthToSpace", "Slice"]
    assert result.report.verified


def test_weight_computed_at_run_time_is_refused():
    nodes = [
        helper.make_node("Relu", ["w_in"], ["w"], name="relu"),
        helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[2]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 1, 4]),
                                           helper.make_tensor_value_info("w_in", 1, [1, 1, 3])],
                              [helper.make_tensor_value_info("y", 1, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert "depends on graph input 'w_in'" in _refusal(model)


@pytest.mark.parametrize(
    "attrs,w_shape,needle",
    [
        (dict(strides=[2], kernel_shape=[5]), (1, 1, 3), "kernel_shape"),
        (dict(strides=[2], group=2), (3, 1, 3), "group=2"),
        (dict(strides=[2], output_padding=[2]), (1, 1, 3), "output_padding"),
        (dict(strides=[1], dilations=[2], output_padding=[1]), (1, 1, 3), "output_padding"),
        (dict(strides=[2], output_shape=[20]), (1, 1, 3), "output_shape"),
        (dict(strides=[0]), (1, 1, 3), "strides"),
        (dict(strides=[2], pads=[1]), (1, 1, 3), "pads"),
        (dict(strides=[2], auto_pad="SAME"), (1, 1, 3), "auto_pad"),
    ],
)
def test_invalid_attributes_are_refused_naming_the_attribute(attrs, w_shape, needle):
    w = np.ones(w_shape, np.float32)
    reason = _refusal(_model(attrs, [1, w_shape[0], 4], w=w))
    assert reason.startswith("ConvTranspose 'up': ") and needle in reason


def test_output_shape_needs_a_static_input_length():
    """output_shape fixes the output whatever the input length: with a symbolic length (even at a
    --shape) the crop would only hold at that size, so the site is refused; a static one converts."""
    model = _model(dict(strides=[2], output_shape=[8]), [1, 1, "L"])
    assert "input length is not static" in _refusal(model)
    sites, refusals = find_sites(model, {"x": (1, 1, 4)})
    assert not sites and "input length is not static" in refusals[0].reason
    sites, _ = find_sites(_model(dict(strides=[2], output_shape=[8]), [1, 1, 4]))
    assert sites[0].axes[0].crop_begin == 1 and sites[0].axes[0].output_length(4) == 8


def test_site_inside_subgraph_is_refused_not_broken():
    inner = _model(dict(strides=[2]), [1, 1, 4]).graph
    inner_graph = helper.make_graph(list(inner.node), "then", [], [helper.make_tensor_value_info("y", 1, None)],
                                    list(inner.initializer))
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y2"])], "else", [],
                                   [helper.make_tensor_value_info("y2", 1, None)])
    node = helper.make_node("If", ["c"], ["out"], name="branch", then_branch=inner_graph, else_branch=else_graph)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [1, 1, 4]),
                                            helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", 1, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    reason = _refusal(model)
    assert "subgraph" in reason and "'branch'" in reason
