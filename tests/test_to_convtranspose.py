"""Canonical site -> ConvTranspose: a randomized sweep of sites checked in onnxruntime against the
float64 reference, plus the structure of the plain and fallback forms."""

from __future__ import annotations

import random

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import node_attrs as _attrs
from onnx_uprewrite.passes import to_convtranspose
from onnx_uprewrite.sites import Site
from onnx_uprewrite.surgery import Builder, Namer
from onnx_uprewrite.weights import Axis
from sweep import check_site as _check
from sweep import make_site as _site
from sweep import emit_model, random_site
from sweep import run_model as _run


def build_model(sites, declared_shapes, opset: int) -> onnx.ModelProto:
    return emit_model(sites, declared_shapes, opset, to_convtranspose)

OPSETS = (9, 11, 13, 17)
BATCHES = 8
PER_BATCH = 250  # 8 * 250 = 2000 sites


@pytest.fixture(scope="module")
def sweep_stats():
    stats = {"ratios": [], "fallback": 0, "symbolic": 0}
    yield stats
    if stats["ratios"]:
        print(f"\nto_convtranspose sweep: {len(stats['ratios'])} sites ({stats['fallback']} fallback, "
              f"{stats['symbolic']} symbolic), worst error/tolerance {max(stats['ratios']):.4f}")


@pytest.mark.parametrize("batch", range(BATCHES))
def test_sweep_matches_reference(batch, sweep_stats):
    rng = random.Random(7000 + batch)
    opset = OPSETS[batch % len(OPSETS)]
    drawn = [random_site(rng, i, phase_bias=0.15) for i in range(PER_BATCH)]
    sites = [d[0] for d in drawn]
    declared = [
        ["N", shape[1], *(f"L{i}_{a}" for a in range(len(shape) - 2))] if symbolic else list(shape)
        for i, (_, shape, symbolic) in enumerate(drawn)
    ]
    model = build_model(sites, declared, opset)
    nrng = np.random.default_rng(batch)
    feeds = {s.input: nrng.standard_normal(shape).astype(np.float32) for s, shape, _ in drawn}
    got = _run(model, feeds)
    for site, shape, symbolic in drawn:
        sweep_stats["ratios"].append(_check(site, feeds[site.input], got[site.output]))
        sweep_stats["symbolic"] += symbolic
    emitted_ops = {}
    for n in model.graph.node:
        emitted_ops.setdefault(n.name.split("/")[0], []).append(n.op_type)
    sweep_stats["fallback"] += sum(ops != ["ConvTranspose"] for ops in emitted_ops.values())
    # both forms are exercised in every batch
    assert 0 < sum(ops == ["ConvTranspose"] for ops in emitted_ops.values()) < PER_BATCH


# ----------------------------------------------------------------------------------------------
# structure


def _emit(site: Site, opset: int = 17):
    b = Builder(Namer(onnx.ModelProto()), "up")
    text = to_convtranspose.emit(site, b, opset)
    return b.emission, text




def _weights(kernel, c_in=4, c_out=3, group=1, bias=True, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((c_in, c_out // group) + tuple(kernel)).astype(np.float32)
    return w, rng.standard_normal(c_out).astype(np.float32) if bias else None


def _run_site(site: Site, shape, opset=17, declared=None) -> np.ndarray:
    model = build_model([site], [list(declared or shape)], opset)
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    got = _run(model, {site.input: x})[site.output]
    _check(site, x, got)
    return got


@pytest.mark.parametrize("opset", OPSETS)
def test_plain_case_is_one_convtranspose_with_explicit_pads(opset):
    # k4 s2 p1 (e = 0: pads 1/1) and k2 s3 with e = 1 (output 3L + 1: pads 0/0, output_padding 2)
    w, bias = _weights((4, 2))
    site = _site(w, bias, 1, [Axis(2, 1, 4, 1, 0), Axis(3, 1, 2, 0, 1)], (5, 6))
    emission, text = _emit(site, opset)
    assert [n.op_type for n in emission.nodes] == ["ConvTranspose"]
    node = emission.nodes[0]
    attrs = _attrs(node)
    assert attrs["pads"] == [1, 0, 1, 0] and attrs["output_padding"] == [0, 2]
    assert attrs["strides"] == [2, 3] and attrs["kernel_shape"] == [4, 2]
    assert "auto_pad" not in attrs and "output_shape" not in attrs
    assert node.output[0] == site.output and len(node.input) == 3
    inits = {t.name: numpy_helper.to_array(t) for t in emission.initializers}
    np.testing.assert_array_equal(inits[node.input[1]], w)  # weights as-is
    np.testing.assert_array_equal(inits[node.input[2]], bias)
    assert "pads [1, 0, 1, 0] output_padding [0, 2]" in text
    _run_site(site, (2, 4, 5, 6), opset)


def test_group_and_dilation_are_kept():
    w, bias = _weights((3,), c_in=6, c_out=6, group=6)
    site = _site(w, bias, 6, [Axis(3, 2, 3, 2, 1)], (7,))
    emission, _ = _emit(site)
    attrs = _attrs(emission.nodes[0])
    assert attrs["group"] == 6 and attrs["dilations"] == [2] and attrs["pads"] == [2, 0]
    _run_site(site, (1, 6, 7))


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("bias", [True, False])
def test_negative_crop_begin_uses_pad_fallback(opset, bias):
    w, b = _weights((4, 4), bias=bias)
    site = _site(w, b, 1, [Axis(2, 1, 4, -2, 0), Axis(2, 1, 4, 1, 0)], (4, 5))
    emission, text = _emit(site, opset)
    ops = [n.op_type for n in emission.nodes]
    # axis 0: F has 2L+2 positions, y = F[-2 : 2L-2]: pad_end 4 drops the tail, Pad inserts 2 zeros
    assert ops == ["ConvTranspose", "Pad"] + (["Add"] if bias else [])
    conv = emission.nodes[0]
    assert len(conv.input) == 2  # bias goes to the Add, after the zero padding
    assert _attrs(conv)["pads"] == [0, 1, 4, 1]
    assert emission.nodes[-1].output[0] == site.output
    assert "Pad" in text and "Slice" not in text
    got = _run_site(site, (1, 4, 4, 5), opset)
    if bias:  # the inserted zeros carry the bias
        np.testing.assert_allclose(got[0, :, 0, 0], b, rtol=0, atol=0)


@pytest.mark.parametrize("opset", [9, 17])
def test_output_longer_than_full_result_uses_pad_fallback(opset):
    # k1 s2: full result 2L-1, wanted 2L+3 -> output_padding would be 4 >= stride
    w, b = _weights((1,))
    site = _site(w, b, 1, [Axis(2, 1, 1, 0, 3)], (5,))
    emission, _ = _emit(site, opset)
    assert [n.op_type for n in emission.nodes] == ["ConvTranspose", "Pad", "Add"]
    assert _attrs(emission.nodes[0])["output_padding"] == [1]  # the largest onnxruntime accepts
    _run_site(site, (1, 4, 5), opset)


def test_crop_past_the_end_keeps_convtranspose_non_empty():
    # pb = 8 beyond the full result (length 3 at L = 1): output is all bias
    w, b = _weights((3,))
    site = _site(w, b, 1, [Axis(1, 1, 3, 8, 2)], (1,))
    emission, _ = _emit(site)
    assert [n.op_type for n in emission.nodes] == ["ConvTranspose", "Pad", "Slice", "Add"]
    got = _run_site(site, (1, 4, 1))
    np.testing.assert_array_equal(got[0], np.repeat(b[:, None], 3, axis=1))


@pytest.mark.parametrize(
    "axes",
    [
        [Axis(2, 1, 4, 1, 0), Axis(3, 1, 5, 2, 1)],  # plain
        [Axis(2, 1, 4, -3, 1), Axis(3, 2, 2, 0, 6)],  # fallback, Pad on both ends
        [Axis(2, 1, 3, 8, 5), Axis(1, 1, 2, 6, 4)],  # fallback, pads shrunk for the shortest input
    ],
)
@pytest.mark.parametrize("opset", [9, 13])
def test_symbolic_spatial_dims_run_at_two_sizes(axes, opset):
    w, b = _weights((axes[0].kernel, axes[1].kernel))
    site = _site(w, b, 1, axes, None)
    for shape in [(1, 4, 1, 1), (2, 4, 6, 3)]:
        _run_site(site, shape, opset, declared=["N", 4, "H", "W"])


def test_design_golden_examples():
    """DESIGN.md §5 seeds: 1-D k3 s2 and 2-D k3 s2 with padding 0 and 1."""
    w = np.array([1, 2, 3], np.float32).reshape(1, 1, 3)
    site = _site(w, None, 1, [Axis(2, 1, 3, 0, 1)], (2,))
    model = build_model([site], [[1, 1, 2]], 17)
    got = _run(model, {"x0": np.array([[[2, 3]]], np.float32)})["y0"]
    np.testing.assert_array_equal(got[0, 0], [2, 4, 9, 6, 9])
    k = np.array([[1, 1, 1], [0, 0, 0], [-1, -1, -1]], np.float32).reshape(1, 1, 3, 3)
    x = np.array([[[[1, 2], [3, 4]]]], np.float32)
    for pad, e, want in [
        (0, 1, [[1, 1, 3, 2, 2], [0, 0, 0, 0, 0], [2, 2, 4, 2, 2], [0, 0, 0, 0, 0], [-3, -3, -7, -4, -4]]),
        (1, -1, [[0, 0, 0], [2, 4, 2], [0, 0, 0]]),
    ]:
        site = _site(k, None, 1, [Axis(2, 1, 3, pad, e)] * 2, (2, 2))
        got = _run(build_model([site], [[1, 1, 2, 2]], 17), {"x0": x})["y0"]
        np.testing.assert_array_equal(got[0, 0], want)


def test_refusals_carry_reasons():
    w, b = _weights((3,))
    with pytest.raises(ValueError, match="output length"):
        _emit(_site(w, b, 1, [Axis(2, 1, 3, 0, -5)], (2,)))
    with pytest.raises(ValueError, match="opset 6"):
        _emit(_site(w, b, 1, [Axis(2, 1, 3, -1, 0)], (2,)), opset=6)
    # the plain form is a single ConvTranspose, fine at any opset
    emission, _ = _emit(_site(w, b, 1, [Axis(2, 1, 3, 1, 0)], (2,)), opset=6)
    assert [n.op_type for n in emission.nodes] == ["ConvTranspose"]


def test_macs_count_every_tap():
    w, b = _weights((4, 3), c_in=6, c_out=4, group=2)
    site = _site(w, b, 2, [Axis(2, 1, 4, 1, 0), Axis(2, 1, 3, 1, 0)], (5, 7))
    assert to_convtranspose.macs(site) == 6 * 2 * 12 * 35
    assert to_convtranspose.macs(_site(w, b, 2, site.axes, None)) is None
