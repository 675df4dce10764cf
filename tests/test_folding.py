"""Weights that are constant but not initializers, and BatchNormalization after a ConvTranspose.

Exporters that skip constant folding compute weights in the graph (weight norm: ``Mul(Div(v,
ReduceL2(v)), g)``, Cast, Reshape ...); those subgraphs are evaluated in onnxruntime when every
leaf is a constant, and refused with the blocking tensor otherwise.  A BatchNormalization in
inference mode right after a ConvTranspose (TorchScript leaves it unfolded) is folded into the
site's weights and bias; the report says so.
"""

from __future__ import annotations

import random

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnx_uprewrite as up
from onnx_uprewrite.api import find_sites
from sweep import batch_model, random_config


def _model(nodes, inits, x_shape=(1, 2, 4, 4), extra_inputs=(), opset=17):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", 1, list(x_shape)), *extra_inputs],
        [helper.make_tensor_value_info("y", 1, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _weight_norm_nodes(v_name="v", g_name="g"):
    return [
        helper.make_node("ReduceL2", [v_name], ["norm"], name="l2", axes=[1, 2, 3], keepdims=1),
        helper.make_node("Div", [v_name, "norm"], ["dir"], name="div"),
        helper.make_node("Mul", ["dir", g_name], ["w"], name="mul"),
    ]


@pytest.mark.parametrize("to", ["subpixel", "resize"])
def test_weight_norm_subgraph_is_folded(to):
    rng = np.random.default_rng(0)
    nodes = _weight_norm_nodes() + [
        helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[2, 2], pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(rng.standard_normal((2, 3, 4, 4)).astype(np.float32), "v"),
             numpy_helper.from_array(rng.uniform(0.5, 2, (2, 1, 1, 1)).astype(np.float32), "g")]
    result = up.convert(_model(nodes, inits, opset=13), to=to)
    report = result.report
    assert report.verified and not report.refused
    assert not {"l2", "div", "mul"} & {n.name for n in result.model.graph.node}
    assert any("Div, Mul, ReduceL2 were evaluated as constants" in n for n in report.sites[0].notes)


def test_cast_and_reshape_of_constants_fold():
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Constant", [], ["w16"], name="c", value=numpy_helper.from_array(
            rng.standard_normal(18).astype(np.float16))),
        helper.make_node("Cast", ["w16"], ["w32"], name="cast", to=onnx.TensorProto.FLOAT),
        helper.make_node("Reshape", ["w32", "shape"], ["w"], name="reshape"),
        helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[3]),
    ]
    inits = [numpy_helper.from_array(np.array([2, 3, 3], np.int64), "shape")]
    report = up.convert(_model(nodes, inits, x_shape=(1, 2, 5)), to="subpixel").report
    assert report.verified and report.rewritten and not report.refused


@pytest.mark.parametrize("case,needle", [
    ("graph_input", "depends on graph input 'g_in'"),
    ("random", "RandomNormal node 'rand', which is not constant-foldable"),
    ("custom", "computed by Scale node 'custom'"),
])
def test_weights_that_are_not_constant_are_refused(case, needle):
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((2, 3, 4, 4)).astype(np.float32), "v")]
    extra = ()
    if case == "graph_input":
        nodes = _weight_norm_nodes(g_name="g_in")
        extra = (helper.make_tensor_value_info("g_in", 1, [2, 1, 1, 1]),)
    elif case == "random":
        nodes = [helper.make_node("RandomNormal", [], ["noise"], name="rand", shape=[2, 3, 4, 4]),
                 helper.make_node("Add", ["v", "noise"], ["w"], name="add")]
    else:
        nodes = [helper.make_node("Scale", ["v"], ["w"], name="custom", domain="example.custom")]
    nodes.append(helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[2, 2]))
    model = _model(nodes, inits, extra_inputs=extra)
    sites, refusals = find_sites(model)
    assert not sites and len(refusals) == 1
    assert needle in refusals[0].reason, refusals[0].reason


# ---------------------------------------------------------------------------------------------
# BatchNormalization after ConvTranspose


def _with_batch_norm(model, configs, seed, every=1.0, eps=1e-5):
    """Insert an inference BatchNormalization after each ConvTranspose (with probability ``every``)."""
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    graph = model.graph
    nodes = list(graph.node)
    del graph.node[:]
    count = 0
    for node in nodes:
        if node.op_type != "ConvTranspose" or pick.random() >= every:
            graph.node.append(node)
            continue
        i = node.name[2:]
        c = configs[int(i)].c_out
        out = node.output[0]
        node.output[0] = f"pre_bn{i}"
        graph.node.append(node)
        params = [rng.uniform(0.5, 2, c), rng.standard_normal(c), rng.standard_normal(c), rng.uniform(0.1, 3, c)]
        names = []
        for k, p in zip(("scale", "beta", "mean", "var"), params):
            graph.initializer.append(numpy_helper.from_array(p.astype(np.float32), f"bn_{k}{i}"))
            names.append(f"bn_{k}{i}")
        graph.node.append(helper.make_node("BatchNormalization", [f"pre_bn{i}", *names], [out], name=f"bn{i}",
                                           epsilon=eps))
        count += 1
    return count


@pytest.mark.parametrize("to", ["subpixel", "resize", "convtranspose"])
def test_batch_norm_after_convtranspose_is_folded_sweep(to):
    rng = random.Random(5)
    configs = [random_config(rng) for _ in range(120)]
    model, feeds, _ = batch_model(configs, 17, seed=9)
    folded = _with_batch_norm(model, configs, seed=4, every=0.7)
    shapes = {k: v.shape for k, v in feeds.items()}
    result = up.convert(model, to=to, inputs=feeds, shapes=shapes)
    report = result.report
    assert report.verified and not report.refused, [s.reason for s in report.refused]
    if to == "convtranspose":  # already in form: skipped, BatchNormalization stays
        return
    assert "BatchNormalization" not in report.ops_after
    assert sum(any("BatchNormalization" in n for n in s.notes) for s in report.sites) == folded
    print(f"\nConvTranspose+BatchNormalization -> {to}: {len(configs)} sites ({folded} with BN), worst "
          f"error/tolerance {max(o.ratio for o in report.outputs):.3g}")


def test_batch_norm_whose_input_is_read_elsewhere_stays():
    rng = np.random.default_rng(3)
    c = 3
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w"], ["t"], name="up", strides=[2, 2]),
        helper.make_node("BatchNormalization", ["t", "s", "b", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Add", ["bn", "t"], ["y"], name="add"),
    ]
    inits = [numpy_helper.from_array(rng.standard_normal((2, c, 3, 3)).astype(np.float32), "w")] + [
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), n) for n in "sbmv"]
    report = up.convert(_model(nodes, inits), to="subpixel").report
    assert report.verified and report.ops_after.get("BatchNormalization") == 1
    assert not any("BatchNormalization" in n for s in report.sites for n in s.notes)
