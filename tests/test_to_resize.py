"""Canonical site -> Resize(nearest) [x phase mask] + Conv: a randomized sweep checked in
onnxruntime against the float64 reference, the box factorization, and the structure of both forms."""

from __future__ import annotations

import random

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import node_attrs as _attrs
from onnx_uprewrite.passes import to_resize
from onnx_uprewrite.surgery import Builder, Namer
from onnx_uprewrite.weights import Axis, box_conv_weight
from sweep import check_site, emit_model, make_site, random_site, run_model

OPSETS = (7, 9, 10, 11, 13, 17, 19)
BATCHES = 7
PER_BATCH = 200  # 1400 sites


@pytest.fixture(scope="module")
def sweep_stats():
    stats = {"ratios": [], "box": 0, "masked": 0}
    yield stats
    if stats["ratios"]:
        print(f"\nto_resize sweep: {len(stats['ratios'])} sites ({stats['box']} box-factored, "
              f"{stats['masked']} masked), worst error/tolerance {max(stats['ratios']):.4f}")


def _factorable(site):
    """The same site with a kernel that is box ⊛ G (dilation 1), as Resize+Conv exports give."""
    rng = np.random.default_rng(len(site.node))
    axes = tuple(Axis(a.stride, 1, max(a.kernel, a.stride), a.crop_begin, a.extension) for a in site.axes)
    g_shape = site.weight.shape[:2] + tuple(a.kernel - a.stride + 1 for a in axes)
    w = box_conv_weight(rng.standard_normal(g_shape).astype(np.float32), [a.stride for a in axes])
    return make_site(w, site.bias, site.group, axes, site.input_lengths, int(site.node[2:]), site.phase_bias)


@pytest.mark.parametrize("batch", range(BATCHES))
def test_sweep_matches_reference(batch, sweep_stats):
    rng = random.Random(9100 + batch)
    opset = OPSETS[batch % len(OPSETS)]
    drawn = []
    for i in range(PER_BATCH):
        site, shape, symbolic = random_site(rng, i, phase_bias=0.15)
        if rng.random() < 0.4:
            site = _factorable(site)
        drawn.append((site, shape, symbolic))
    sites = [d[0] for d in drawn]
    declared = [
        ["N", shape[1], *(f"L{i}_{a}" for a in range(len(shape) - 2))] if symbolic else list(shape)
        for i, (_, shape, symbolic) in enumerate(drawn)
    ]
    model = emit_model(sites, declared, opset, to_resize)
    nrng = np.random.default_rng(batch)
    feeds = {s.input: nrng.standard_normal(shape).astype(np.float32) for s, shape, _ in drawn}
    got = run_model(model, feeds)
    for site, shape, _ in drawn:
        sweep_stats["ratios"].append(check_site(site, feeds[site.input], got[site.output]))
    masks = {n.name.split("/")[0] for n in model.graph.node if n.op_type == "Mul"}
    sweep_stats["masked"] += len(masks)
    sweep_stats["box"] += PER_BATCH - len(masks)
    assert 0 < len(masks) < PER_BATCH
    assert not {n.op_type for n in model.graph.node} & {"ConvTranspose", "DepthToSpace"}


def _emit(site, opset=17):
    b = Builder(Namer(onnx.ModelProto()), "up")
    text = to_resize.emit(site, b, opset)
    return b.emission, text




def test_nearest_conv_kernel_comes_back_from_its_convtranspose():
    # nearest x2 + Conv3x3 p1 == ConvTranspose k4 s2 p1 with W = box ⊛ flip(V): the emitter recovers V
    rng = np.random.default_rng(0)
    v = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)  # Conv [Cout, Cin, 3, 3]
    g = np.ascontiguousarray(v[:, :, ::-1, ::-1].swapaxes(0, 1))
    w = box_conv_weight(g, (2, 2))
    site = make_site(w, None, 1, [Axis(2, 1, 4, 1, 0)] * 2, (5, 5))
    emission, text = _emit(site)
    assert [n.op_type for n in emission.nodes] == ["Resize", "Conv"]
    assert "box-factored" in text
    conv = emission.nodes[-1]
    assert _attrs(conv)["pads"] == [1, 1, 1, 1] and _attrs(conv)["kernel_shape"] == [3, 3]
    got = numpy_helper.to_array(next(t for t in emission.initializers if t.name == conv.input[1]))
    np.testing.assert_allclose(got, v, rtol=0, atol=8 * np.finfo(np.float32).eps * np.abs(v).max())
    resize = _attrs(emission.nodes[0])
    assert resize["coordinate_transformation_mode"] == b"asymmetric" and resize["nearest_mode"] == b"floor"


def test_trained_kernel_gets_the_masked_form_and_says_why():
    w = np.random.default_rng(1).standard_normal((2, 3, 4, 4)).astype(np.float32)
    site = make_site(w, np.ones(3, np.float32), 1, [Axis(2, 1, 4, 1, 0)] * 2, (4, 4))
    emission, text = _emit(site)
    assert [n.op_type for n in emission.nodes] == ["Resize", "Mul", "Conv"]  # static: the mask is a constant
    assert "masked" in text and "phase sums differ" in text
    x = np.random.default_rng(2).standard_normal((1, 2, 4, 4)).astype(np.float32)
    model = emit_model([site], [[1, 2, 4, 4]], 17, to_resize)
    check_site(site, x, run_model(model, {"x0": x})["y0"])


@pytest.mark.parametrize("opset", [7, 9, 10, 11, 13])
def test_upsampling_op_follows_the_opset(opset):
    w = box_conv_weight(np.ones((1, 1, 2), np.float32), (3,))
    site = make_site(w, None, 1, [Axis(3, 1, 4, 0, 1)], (4,))
    emission, _ = _emit(site, opset)
    op = emission.nodes[0]
    assert op.op_type == ("Upsample" if opset < 10 else "Resize")
    assert len(op.input) == (1 if opset < 9 else 2 if opset < 11 else 3)
    if opset in (11, 12):
        assert op.input[1]  # onnxruntime needs a roi input before opset 13
    x = np.arange(4, dtype=np.float32).reshape(1, 1, 4)
    model = emit_model([site], [[1, 1, 4]], opset, to_resize)
    check_site(site, x, run_model(model, {"x0": x})["y0"])


def test_negative_pads_become_a_slice_and_symbolic_lengths_run_at_two_sizes():
    w = np.random.default_rng(3).standard_normal((2, 2, 3)).astype(np.float32)
    site = make_site(w, None, 1, [Axis(2, 2, 3, 7, -3)], None)  # pb beyond the kernel reach
    emission, text = _emit(site)
    assert "Slice" in text
    for n in (2, 6):
        x = np.random.default_rng(n).standard_normal((1, 2, n)).astype(np.float32)
        model = emit_model([site], [["N", 2, "L"]], 17, to_resize)
        check_site(site, x, run_model(model, {"x0": x})["y0"])


def test_opset_6_is_refused():
    site = make_site(np.ones((1, 1, 2), np.float32), None, 1, [Axis(2, 1, 2, 0, 0)], (3,))
    with pytest.raises(ValueError, match="opset 6"):
        _emit(site, 6)


def test_macs_of_box_and_masked_forms():
    box = make_site(box_conv_weight(np.ones((4, 3, 3, 3), np.float32), (2, 2)), None, 1,
                    [Axis(2, 1, 4, 1, 0)] * 2, (8, 8))
    assert to_resize.macs(box) == 3 * 4 * 9 * 16 * 16
    masked = make_site(np.random.default_rng(0).standard_normal((4, 3, 4, 4)).astype(np.float32), None, 1,
                       [Axis(2, 1, 4, 1, 0)] * 2, (8, 8))
    assert to_resize.macs(masked) == 3 * 4 * 16 * 16 * 16


def _pointwise_site(cin, cout, group, axes, lengths, bias=None, seed=0):
    """nearest x s + 1x1 Conv: W = box_s ⊛ G with G of size 1 on every axis."""
    g = np.random.default_rng(seed).standard_normal((cin, cout // group) + (1,) * len(axes)).astype(np.float32)
    return make_site(box_conv_weight(g, [a.stride for a in axes]), bias, group, axes, lengths)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("opset", [7, 9, 11, 17])
def test_pointwise_conv_runs_before_the_upsampling(group, opset):
    bias = np.random.default_rng(5).standard_normal(8).astype(np.float32)
    site = _pointwise_site(4, 8, group, [Axis(2, 1, 2, 0, 0), Axis(3, 1, 3, 0, 0)], (5, 3), bias)
    emission, text = _emit(site, opset)
    assert [n.op_type for n in emission.nodes] == ["Conv", "Upsample" if opset < 10 else "Resize"]
    assert "runs before the upsampling" in text
    assert emission.nodes[0].input[0] == "x0" and emission.nodes[-1].output == ["y0"]
    x = np.random.default_rng(6).standard_normal((2, 4, 5, 3)).astype(np.float32)
    model = emit_model([site], [[2, 4, 5, 3]], opset, to_resize)
    check_site(site, x, run_model(model, {"x0": x})["y0"])
    # MACs at the input resolution: 6x fewer than the Conv after the upsampling
    assert to_resize.macs(site) == 8 * (4 // group) * 5 * 3


def test_pointwise_crop_is_a_slice_after_the_upsampling_and_leading_zeros_keep_the_order():
    cropped = _pointwise_site(3, 2, 1, [Axis(2, 1, 2, 1, -2)], None, np.ones(2, np.float32))
    emission, text = _emit(cropped)
    assert [n.op_type for n in emission.nodes] == ["Conv", "Resize", "Slice"]
    for n in (3, 7):  # symbolic length, run at two sizes
        x = np.random.default_rng(n).standard_normal((1, 3, n)).astype(np.float32)
        check_site(cropped, x, run_model(emit_model([cropped], [["N", 3, "L"]], 17, to_resize), {"x0": x})["y0"])
    # a leading zero position (crop_begin < 0) would hold the bias, not a replicated value: not commuted
    padded = _pointwise_site(3, 2, 1, [Axis(2, 1, 2, -1, 1)], (4,), np.ones(2, np.float32))
    emission, text = _emit(padded)
    assert [n.op_type for n in emission.nodes] == ["Resize", "Conv"] and "runs before" not in text
    assert to_resize.macs(padded) == 2 * 3 * 9
    x = np.random.default_rng(0).standard_normal((1, 3, 4)).astype(np.float32)
    check_site(padded, x, run_model(emit_model([padded], [[1, 3, 4]], 17, to_resize), {"x0": x})["y0"])


def test_pointwise_with_per_phase_bias():
    rng = np.random.default_rng(7)
    site = _pointwise_site(2, 3, 1, [Axis(2, 1, 2, 0, 0)] * 2, (4, 4))
    site = make_site(site.weight, None, 1, site.axes, site.input_lengths,
                     phase_bias=rng.standard_normal((3, 2, 2)).astype(np.float32))
    emission, text = _emit(site)
    assert [n.op_type for n in emission.nodes][:2] == ["Conv", "Resize"] and "per-phase bias" in text
    x = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    check_site(site, x, run_model(emit_model([site], [[1, 2, 4, 4]], 17, to_resize), {"x0": x})["y0"])


def test_fastest_times_the_commuted_form_of_a_resize_source():
    import onnx_uprewrite as up

    rng = np.random.default_rng(8)
    inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc"),
             numpy_helper.from_array(rng.standard_normal((16, 16, 1, 1)).astype(np.float32), "W")]
    nodes = [helper.make_node("Resize", ["x", "", "sc"], ["u"], name="up", mode="nearest",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
             helper.make_node("Conv", ["u", "W"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 16, 16, 16])],
                              [helper.make_tensor_value_info("y", 1, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = up.convert(model, to="fastest")
    [site] = result.report.sites
    assert result.report.verification == "passed" and "resize" in site.timings_ms, site.timings_ms
    if site.chosen == "resize":
        assert [n.op_type for n in result.model.graph.node] == ["Conv", "Resize"]
        assert site.macs_after * 4 == site.macs_before
