"""ConvTranspose -> sub-pixel: a randomized attribute sweep checked in onnxruntime, plus structure."""

from __future__ import annotations

import math
import random

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnx_uprewrite as up
from onnx_uprewrite.verify import session
from sweep import batch_model, random_config

OPSETS = (7, 9, 10, 11, 13, 17, 19)
BATCHES = 40
PER_BATCH = 100  # 40 * 100 = 4000 configurations
EPS32 = float(np.finfo(np.float32).eps)


def _run(model: onnx.ModelProto, feeds: dict) -> dict:
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


@pytest.mark.parametrize("batch", range(BATCHES))
def test_sweep_matches_onnxruntime(batch, sweep_stats):
    rng = random.Random(1000 + batch)
    opset = OPSETS[batch % len(OPSETS)]
    configs = [random_config(rng) for _ in range(PER_BATCH)]
    model, feeds, terms = batch_model(configs, opset, seed=batch)
    original = _run(model, feeds)
    result = up.convert(model, verify=False)
    assert not result.report.refused, [s.reason for s in result.report.refused]
    ops = {n.op_type for n in result.model.graph.node}
    assert "ConvTranspose" not in ops
    assert result.model.ir_version == model.ir_version
    assert [(o.domain, o.version) for o in result.model.opset_import] == [("", opset)]
    rewritten = _run(result.model, feeds)
    for i, cfg in enumerate(configs):
        ref, got = original[f"y{i}"], rewritten[f"y{i}"]
        assert got.shape == ref.shape, (cfg, got.shape, ref.shape)
        tol = 8 * EPS32 * math.sqrt(terms[i]) * max(float(np.abs(ref).max()), 1e-30)
        err = float(np.abs(got.astype(np.float64) - ref).max())
        sweep_stats.append(err / tol)
        assert err <= tol, (cfg, err, tol)


@pytest.fixture(scope="module")
def sweep_stats():
    stats: list[float] = []
    yield stats
    if stats:
        print(f"\nsweep: {len(stats)} configurations, worst error/tolerance {max(stats):.4f}")


def _single(attrs, x_shape, w_shape, opset=17, bias=False, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(w_shape).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    ins = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(w_shape[1] * attrs.get("group", 1)).astype(np.float32), "B"))
        ins.append("B")
    node = helper.make_node("ConvTranspose", ins, ["y"], name="up", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, x_shape)],
                              [helper.make_tensor_value_info("y", 1, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _ops(model):
    return [n.op_type for n in model.graph.node]


def test_k4s2p1_structure_matches_design_example():
    """DESIGN.md §2a: k4 s2 p1 -> Conv 2x2 (4C outputs, pads 1/1) -> DepthToSpace(2) -> Slice[1 : 2H+1]."""
    model = _single(dict(strides=[2, 2], pads=[1, 1, 1, 1]), [1, 8, 6, 6], [8, 5, 4, 4], bias=True)
    result = up.convert(model)
    assert _ops(result.model) == ["Conv", "DepthToSpace", "Slice"]
    conv = result.model.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs["kernel_shape"] == [2, 2] and attrs["pads"] == [1, 1, 1, 1]
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert weights[conv.input[1]].shape == (20, 8, 2, 2)
    d2s = {a.name: helper.get_attribute_value(a) for a in result.model.graph.node[1].attribute}
    assert d2s == {"blocksize": 2, "mode": b"CRD"}
    starts = weights[result.model.graph.node[2].input[1]]
    assert list(starts) == [1, 1]
    assert result.report.verified and result.report.worst_ratio < 1
    # original weight and bias are gone, no stale initializers left
    assert {"W", "B"}.isdisjoint(weights)


def test_kernel_equal_stride_needs_no_slice():
    model = _single(dict(strides=[2, 2]), [1, 4, 5, 5], [4, 3, 2, 2])
    result = up.convert(model)
    assert _ops(result.model) == ["Conv", "DepthToSpace"]


def test_stride_one_becomes_plain_conv():
    model = _single(dict(strides=[1, 1], pads=[1, 1, 1, 1]), [1, 4, 5, 5], [4, 3, 3, 3])
    result = up.convert(model)
    assert _ops(result.model) == ["Conv"]
    assert result.report.verified


@pytest.mark.parametrize("opset", [9, 11, 17])
def test_unequal_strides_and_old_opsets_use_reshape_transpose(opset):
    model = _single(dict(strides=[2, 3], pads=[1, 0, 1, 2]), [1, 4, 5, 4], [4, 3, 4, 5], opset=opset)
    result = up.convert(model)
    assert "DepthToSpace" not in _ops(result.model)
    assert _ops(result.model)[:4] == ["Conv", "Reshape", "Transpose", "Reshape"]
    assert result.report.verified


def test_grouped_site_stays_grouped():
    model = _single(dict(strides=[2, 2], group=4, pads=[1, 1, 1, 1]), [1, 8, 5, 5], [8, 2, 4, 4])
    result = up.convert(model)
    conv = result.model.graph.node[0]
    assert {a.name: helper.get_attribute_value(a) for a in conv.attribute}["group"] == 4
    assert result.report.verified


def test_dilation_multiple_of_stride_uses_conv_dilation():
    model = _single(dict(strides=[2], dilations=[4]), [1, 3, 7], [3, 2, 3])
    result = up.convert(model)
    conv = result.model.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs["dilations"] == [2] and attrs["kernel_shape"] == [3]
    assert result.report.verified


def test_symbolic_spatial_dims_run_at_two_sizes():
    model = _single(dict(strides=[2, 3], pads=[1, 2, 0, 1], output_padding=[1, 0]), ["N", 4, "H", "W"],
                    [4, 3, 4, 5], bias=True)
    result = up.convert(model, shapes={"x": (2, 4, 5, 6)})
    assert "ConvTranspose" not in _ops(result.model)
    for shape in [(1, 4, 3, 9), (2, 4, 7, 2)]:
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        ref = _run(model, {"x": x})["y"]
        got = _run(result.model, {"x": x})["y"]
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_shared_weight_is_kept_while_still_used():
    w = numpy_helper.from_array(np.ones((2, 2, 3, 3), np.float32), "W")
    nodes = [
        helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="a", strides=[2, 2]),
        helper.make_node("Conv", ["x", "W"], ["z"], name="b", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", 1, None), helper.make_tensor_value_info("z", 1, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = up.convert(model)
    assert "W" in {t.name for t in result.model.graph.initializer}
    assert result.report.verified


def test_caller_model_is_not_mutated():
    model = _single(dict(strides=[2, 2]), [1, 4, 5, 5], [4, 3, 3, 3])
    before = model.SerializeToString()
    up.convert(model)
    assert model.SerializeToString() == before


@pytest.mark.parametrize("name", ["torch_dcgan_op13", "torch_dcgan_op13_qdq_pc", "torch_fsrcnn_op13",
                                  "torch_unet_decoder_op17_qdq_pt", "keras_conv2dtranspose_same"])
def test_dcr_layout_verifies(name):
    """--d2s-mode DCR: the Conv's output channels are permuted so that DepthToSpace DCR is exact
    (float, per-tensor and per-channel QDQ weights)."""
    from pathlib import Path

    exported = Path(__file__).resolve().parent.parent / "models" / "exported"
    data = np.load(exported / f"{name}.npz")
    inputs = {k: data[k] for k in data.files if not k.startswith("out:")}
    result = up.convert(str(exported / f"{name}.onnx"), to="subpixel", d2s_mode="DCR", inputs=inputs)
    assert result.report.verification == "passed"
    modes = {a.s for n in result.model.graph.node if n.op_type == "DepthToSpace" for a in n.attribute
             if a.name == "mode"}
    assert modes == {b"DCR"}


def test_dcr_refuses_grouped_sites_with_the_reason():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 2, 4, 4)).astype(np.float32), "W")
    node = helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="up", strides=[2, 2], pads=[1, 1, 1, 1], group=2)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [1, 4, 5, 5])],
                              [helper.make_tensor_value_info("y", 1, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (site,) = up.convert(model, to="subpixel", d2s_mode="DCR").report.sites
    assert site.status == "refused" and "cannot follow a grouped Conv" in site.reason
