"""Resize/Upsample(nearest, integer scale) + Conv -> canonical site (R1), checked in onnxruntime."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from onnx import helper, numpy_helper

import onnx_uprewrite as up
from conftest import run_model as _run
from onnx_uprewrite.api import find_sites

EPS32 = float(np.finfo(np.float32).eps)
REPLICATING = [
    ("half_pixel", "round_prefer_floor"), ("half_pixel", "round_prefer_ceil"),
    ("pytorch_half_pixel", "round_prefer_floor"), ("asymmetric", "floor"), ("tf_half_pixel_for_nn", "floor"),
]
# nearest modes with an index shift: edge clamping at the borders, exact with Pad(edge)
NOT_REPLICATING = [("half_pixel", "floor"), ("asymmetric", "round_prefer_floor"), ("asymmetric", "ceil"),
                   ("tf_half_pixel_for_nn", "ceil"), ("half_pixel_symmetric", "round_prefer_ceil")]
SHIFTED_AT_2 = [("half_pixel", "floor"), ("asymmetric", "round_prefer_ceil"), ("asymmetric", "ceil"),
                ("tf_half_pixel_for_nn", "ceil")]  # (asymmetric, round_prefer_floor) is replication at s = 2
LINEAR = ["half_pixel", "pytorch_half_pixel", "half_pixel_symmetric", "asymmetric"]


def _upsample_nodes(i, x, out, scales, opset, how, rng, inits):
    """Nodes that upsample ``x`` by ``scales`` (N, C included) the way exporters write it."""
    sc = numpy_helper.from_array(np.array(scales, np.float32), f"sc{i}")
    if opset < 9:
        return [helper.make_node("Upsample", [x], [out], name=f"rs{i}", mode="nearest", scales=scales)]
    if opset == 9:
        inits.append(sc)
        return [helper.make_node("Upsample", [x, f"sc{i}"], [out], name=f"rs{i}", mode="nearest")]
    if opset == 10:
        inits.append(sc)
        return [helper.make_node("Resize", [x, f"sc{i}"], [out], name=f"rs{i}", mode="nearest")]
    ctm, nm = how
    mode = "linear" if nm == "linear" else "nearest"
    attrs = dict(mode=mode, coordinate_transformation_mode=ctm, nearest_mode="floor" if mode == "linear" else nm)
    roi = "" if opset >= 13 else f"roi{i}"  # roi is a required input before opset 13
    if roi:
        inits.append(numpy_helper.from_array(np.zeros(0, np.float32), roi))
    if rng.random() < 0.3:  # scales from a Constant node, PyTorch style
        node = helper.make_node("Constant", [], [f"sc{i}"], name=f"scc{i}", value=sc)
        return [node, helper.make_node("Resize", [x, roi, f"sc{i}"], [out], name=f"rs{i}", **attrs)]
    inits.append(sc)
    return [helper.make_node("Resize", [x, roi, f"sc{i}"], [out], name=f"rs{i}", **attrs)]


def _batch(n, opset, seed):
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    nodes, inits, inputs, outputs, feeds, terms = [], [], [], [], {}, []
    for i in range(n):
        rank = 2 if opset < 11 else rng.choice([1, 2, 2, 3])
        if opset < 11:
            strides = [rng.randint(1, 3)] * rank
        else:
            strides = [rng.randint(1, 3) for _ in range(rank)]
        kernel = [rng.randint(1, 4) for _ in range(rank)]
        dil = [1 if rng.random() < 0.7 else 2 for _ in range(rank)]
        group = rng.choice([1, 1, 2])
        cin, cout = group * rng.randint(1, 3), group * rng.randint(1, 3)
        lengths = [rng.randint(1, 4) for _ in range(rank)]
        attrs = dict(dilations=dil, group=group)
        mode = rng.random()
        if mode < 0.15:  # onnxruntime rejects SAME with dilation
            attrs["auto_pad"] = rng.choice(["SAME_UPPER", "SAME_LOWER"])
            attrs["dilations"] = [1] * rank
        elif mode < 0.2:
            attrs["auto_pad"] = "VALID"
        else:
            attrs["pads"] = [rng.randint(0, 3) for _ in range(2 * rank)]
        up_len = [n_ * s for n_, s in zip(lengths, strides)]
        p = attrs.get("pads", [0] * 2 * rank)
        if attrs.get("auto_pad") in (None, "VALID") and any(
            u + p[a] + p[rank + a] - (k - 1) * d < 1 for a, (u, k, d) in enumerate(zip(up_len, kernel, dil))
        ):
            attrs["pads"] = [(k - 1) * d for k, d in zip(kernel, dil)] * 2
            attrs.pop("auto_pad", None)
        how = rng.choice(REPLICATING + NOT_REPLICATING + [(c, "linear") for c in LINEAR])
        if rng.random() < 0.3:
            attrs.pop("auto_pad", None)  # zero pads: edge-clamped upsamplings fold in too
            attrs["pads"] = [0] * (2 * rank)
            if any(u - (k - 1) * d < 1 for u, k, d in zip(up_len, kernel, dil)):
                attrs["pads"] = [(k - 1) * d for k, d in zip(kernel, dil)] * 2
        nodes += _upsample_nodes(i, f"x{i}", f"u{i}", [1.0, 1.0] + [float(s) for s in strides], opset, how, rng, inits)
        w = nrng.standard_normal((cout, cin // group, *kernel)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        ins = [f"u{i}", f"w{i}"]
        if rng.random() < 0.5:
            inits.append(numpy_helper.from_array(nrng.standard_normal(cout).astype(np.float32), f"b{i}"))
            ins.append(f"b{i}")
        nodes.append(helper.make_node("Conv", ins, [f"y{i}"], name=f"conv{i}", **attrs))
        shape = [1, cin, *lengths]
        inputs.append(helper.make_tensor_value_info(f"x{i}", 1, shape))
        outputs.append(helper.make_tensor_value_info(f"y{i}", 1, None))
        feeds[f"x{i}"] = nrng.standard_normal(shape).astype(np.float32)
        terms.append((cin // group) * math.prod(kernel))
    graph = helper.make_graph(nodes, "sweep", inputs, outputs, inits)
    ir = 8 if opset >= 13 else 6 if opset >= 11 else 4
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir), feeds, terms




def _assert_outputs_match(ref, got, terms):
    for i, t in enumerate(terms):
        r, g = ref[f"y{i}"], got[f"y{i}"]
        assert g.shape == r.shape
        tol = 8 * EPS32 * math.sqrt(t * 9) * max(float(np.abs(r).max()), 1e-30)
        assert float(np.abs(g.astype(np.float64) - r).max()) <= tol, i


@pytest.mark.parametrize("batch", range(12))
def test_resize_conv_sweep_to_subpixel_matches_onnxruntime(batch):
    opset = (8, 9, 10, 11, 13, 17, 19)[batch % 7]
    model, feeds, terms = _batch(90, opset, seed=batch)
    ref = _run(model, feeds)
    result = up.convert(model, verify=False)
    assert not result.report.refused, [s.reason for s in result.report.refused][:3]
    ops = {n.op_type for n in result.model.graph.node}
    assert not ops & {"Resize", "Upsample", "ConvTranspose"}, ops
    assert len(result.report.rewritten) >= 90
    _assert_outputs_match(ref, _run(result.model, feeds), terms)


def _set(node, name, value):
    next(a for a in node.attribute if a.name == name).s = value


def _nearest2_conv3(opset=17, ctm="asymmetric", nm="floor", extra_consumer=False):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "W")]
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["u"], name="up", mode="nearest",
                              coordinate_transformation_mode=ctm, nearest_mode=nm),
             helper.make_node("Conv", ["u", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    outputs = [helper.make_tensor_value_info("y", 1, None)]
    if extra_consumer:
        nodes.append(helper.make_node("Relu", ["u"], ["r"], name="relu"))
        outputs.append(helper.make_tensor_value_info("r", 1, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 4, 6, 6])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def test_nearest2_conv3_is_convtranspose_k4_s2_p1():
    """DESIGN.md R1 example: x2 nearest + Conv3x3 p1 == ConvTranspose k4 s2 p1 with W = flip(V) ⊛ 1_2x2."""
    model = _nearest2_conv3()
    (site,), _ = find_sites(model)
    assert [(a.stride, a.kernel, a.crop_begin, a.extension) for a in site.axes] == [(2, 4, 1, 0)] * 2
    v = numpy_helper.to_array(model.graph.initializer[1]).astype(np.float64)
    flipped = v[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
    box = np.zeros((4, 8, 4, 4))
    for dy in range(2):
        for dx in range(2):
            box[:, :, dy:dy + 3, dx:dx + 3] += flipped
    np.testing.assert_allclose(site.weight, box, rtol=1e-6)
    result = up.convert(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "DepthToSpace", "Slice"]
    kernel = {a.name: helper.get_attribute_value(a) for a in result.model.graph.node[0].attribute}["kernel_shape"]
    assert kernel == [2, 2]  # 2x2 at low resolution instead of 3x3 at high: 16 vs 36 MACs per 2x2 block
    assert result.report.verified
    assert "scales" not in {t.name for t in result.model.graph.initializer}


def test_resize_with_other_consumers_stays():
    result = up.convert(_nearest2_conv3(extra_consumer=True))
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Resize") == 1 and "Relu" in ops
    assert result.report.verified


@pytest.mark.parametrize("ctm,nm", SHIFTED_AT_2 + [(c, "linear") for c in LINEAR])
def test_edge_clamped_resize_before_padded_conv_is_rewritten_alone(ctm, nm):
    model = _nearest2_conv3(ctm=ctm, nm="floor" if nm == "linear" else nm)
    if nm == "linear":
        _set(model.graph.node[0], "mode", b"linear")
    (site,), refusals = find_sites(model)
    assert not refusals and site.node == "up" and site.pre_pad is not None and site.group == 4
    for to in ("subpixel", "convtranspose"):
        result = up.convert(model, to=to)
        ops = [n.op_type for n in result.model.graph.node]
        assert ops[0] == "Pad" and ops[-1] == "Conv" and "Resize" not in ops, ops
        assert result.report.verified


def test_linear_x2_half_pixel_is_edge_pad_and_triangle_kernel():
    """DESIGN.md R3: Pad(edge, 1) + depthwise ConvTranspose [1/4, 3/4, 3/4, 1/4] per axis, crop 3."""
    model = _nearest2_conv3(ctm="half_pixel")
    _set(model.graph.node[0], "mode", b"linear")
    (site,), _ = find_sites(model)
    assert site.pre_pad == (1, 1, 1, 1)
    assert [(a.stride, a.kernel, a.crop_begin, a.extension) for a in site.axes] == [(2, 4, 3, -4)] * 2
    tri = np.array([0.25, 0.75, 0.75, 0.25])
    np.testing.assert_array_equal(site.weight[0, 0], np.outer(tri, tri))


def test_linear_resize_before_unpadded_conv_folds_into_one_site():
    model = _nearest2_conv3(ctm="half_pixel")
    _set(model.graph.node[0], "mode", b"linear")
    del model.graph.node[1].attribute[:]  # Conv without pads
    (site,), _ = find_sites(model)
    assert site.node == "conv" and site.pre_pad == (1, 1, 1, 1) and site.group == 1
    result = up.convert(model, to="convtranspose")
    assert [n.op_type for n in result.model.graph.node] == ["Pad", "ConvTranspose"]
    assert result.report.verified


@pytest.mark.parametrize("attr,value,needle", [
    ("mode", b"cubic", "mode='cubic'"),
    ("coordinate_transformation_mode", b"align_corners", "align_corners"),
    ("coordinate_transformation_mode", b"tf_crop_and_resize", "tf_crop_and_resize"),
])
def test_unsupported_resize_attributes_are_refused_by_name(attr, value, needle):
    model = _nearest2_conv3()
    _set(model.graph.node[0], attr, value)
    (r,) = find_sites(model)[1]
    assert r.reason.startswith("Resize 'up' + Conv 'conv': ") and needle in r.reason


def test_strided_conv_is_refused():
    model = _nearest2_conv3()
    model.graph.node[1].attribute.append(helper.make_attribute("strides", [2, 2]))
    assert "strides=[2, 2]" in find_sites(model)[1][0].reason


def test_sizes_input_uses_static_shape():
    model = _nearest2_conv3()
    model.graph.node[0].input[:] = ["x", "", "", "sizes"]
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, 4, 18, 12], np.int64), "sizes"))
    (site,), _ = find_sites(model)
    assert [a.stride for a in site.axes] == [3, 2]
    assert up.convert(model).report.verified
    model.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.array([1, 4, 13, 12], np.int64), "sizes"))
    assert "not integer multiples" in find_sites(model)[1][0].reason


def test_nearest2_conv3_to_convtranspose_is_one_k4_s2_p1_node():
    result = up.convert(_nearest2_conv3(), to="convtranspose")
    (node,) = result.model.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.op_type == "ConvTranspose"
    assert attrs["strides"] == [2, 2] and attrs["pads"] == [1, 1, 1, 1] and "output_padding" not in attrs
    assert numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == node.input[1])).shape == (
        4, 8, 4, 4)
    assert result.report.verified


@pytest.mark.parametrize("batch", range(4))
def test_resize_conv_sweep_to_convtranspose_matches_onnxruntime(batch):
    opset = (9, 11, 13, 17)[batch]
    model, feeds, terms = _batch(90, opset, seed=100 + batch)
    ref = _run(model, feeds)
    result = up.convert(model, to="convtranspose", verify=False)
    assert not result.report.refused, [s.reason for s in result.report.refused][:3]
    ops = {n.op_type for n in result.model.graph.node}
    assert not ops & {"Resize", "Upsample"} and "ConvTranspose" in ops
    _assert_outputs_match(ref, _run(result.model, feeds), terms)


@pytest.mark.parametrize("seed", range(3))
def test_round_trip_resize_conv_to_convtranspose_to_resize_gives_back_the_conv_kernel(seed):
    """Resize(nearest) + Conv -> ConvTranspose -> Resize + Conv: the box factorization recovers V."""
    rng = random.Random(seed)
    model = _nearest2_conv3()
    conv = model.graph.node[1]
    s = rng.randint(2, 4)
    k = rng.randint(1, 4)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array([1, 1, s, s], np.float32), "scales"))
    v = np.random.default_rng(seed).standard_normal((5, 4, k, k)).astype(np.float32)
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(v, "W"))
    pads = [rng.randint(0, k - 1) for _ in range(4)]
    del conv.attribute[:]
    conv.attribute.append(helper.make_attribute("pads", pads))
    there = up.convert(model, to="convtranspose")
    assert [n.op_type for n in there.model.graph.node] in (["ConvTranspose"], ["ConvTranspose", "Slice"],
                                                           ["ConvTranspose", "Pad"])
    back = up.convert(there.model, to="resize")
    assert back.report.verified and "box-factored" in back.report.sites[0].form
    (conv2,) = [n for n in back.model.graph.node if n.op_type == "Conv"]
    w2 = numpy_helper.to_array(next(t for t in back.model.graph.initializer if t.name == conv2.input[1]))
    np.testing.assert_allclose(w2, v, rtol=0, atol=16 * EPS32 * np.abs(v).max())
