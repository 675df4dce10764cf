"""ConvTranspose -> sub-pixel: a randomized attribute sweep checked in onnxruntime, plus structure."""

from __future__ import annotations

import math
import random

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnx_uprewrite as up
from conftest import run_model as _run
from onnx_uprewrite import api
from sweep import batch_model, random_config

OPSETS = (7, 9, 10, 11, 13, 17, 19)
BATCHES = 40
PER_BATCH = 100  # 40 * 100 = 4000 configurations
EPS32 = float(np.finfo(np.float32).eps)




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


def _grouped(attrs, x_shape=(1, 4, 5, 5)):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 2, 4, 4)).astype(np.float32), "W")
    node = helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="up", group=2, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, list(x_shape))],
                              [helper.make_tensor_value_info("y", 1, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_dcr_takes_grouped_sites_per_phase():
    """One grouped Conv cannot feed DepthToSpace DCR (its phase-major order splits the groups), one
    grouped Conv per phase can: concatenated, the phases are in DCR order."""
    result = up.convert(_grouped(dict(strides=[2, 2], pads=[1, 1, 1, 1])), to="subpixel", d2s_mode="DCR")
    assert result.report.verified and not result.report.refused
    assert _ops(result.model) == ["Conv"] * 4 + ["Concat", "DepthToSpace"]
    assert {helper.get_attribute_value(a) for n in result.model.graph.node if n.op_type == "Conv"
            for a in n.attribute if a.name == "group"} == {2}


def test_dcr_refuses_grouped_sites_without_a_per_phase_layout_with_the_reason():
    """output_padding 1 with stride 2: the phases differ in length, so no per-phase layout either."""
    model = _grouped(dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 0]))
    (site,) = up.convert(model, to="subpixel", d2s_mode="DCR").report.sites
    assert site.status == "refused" and "cannot follow a grouped Conv" in site.reason


def _assert_round_trip(rewritten_model, feeds, original, configs, terms):
    """The rewritten model and its read-back ConvTranspose form both match ``original`` (outputs
    ``y<i>``) within 8*eps*sqrt(T*dense kernel)*max|ref|; returns the read-back model."""
    rewritten = _run(rewritten_model, feeds)
    back = up.convert(rewritten_model, to="convtranspose", verify=False,
                      shapes={name: x.shape for name, x in feeds.items()})
    assert not back.report.refused, [s.reason for s in back.report.refused][:3]
    returned = _run(back.model, feeds)
    for i, cfg in enumerate(configs):
        ref = original[f"y{i}"]
        for got in (rewritten[f"y{i}"], returned[f"y{i}"]):
            assert got.shape == ref.shape, (cfg, got.shape, ref.shape)
            dense = math.prod((k - 1) * d + 1 for k, d in zip(cfg.kernel, cfg.dilations))
            tol = 8 * EPS32 * math.sqrt(terms[i] * dense) * max(float(np.abs(ref).max()), 1e-30)
            assert float(np.abs(got.astype(np.float64) - ref).max()) <= tol, cfg
    return back.model


@pytest.mark.parametrize("batch", range(4))
def test_dcr_sweep_without_depth_to_space_matches_onnxruntime_and_reads_back(batch):
    """--d2s-mode DCR on every rank and stride: the one Conv writes phase-major channels (``ph*C + c``)
    and the depth-to-space reads them in that order (DepthToSpace DCR for 2-D square strides, else
    single-axis Transposes, or one Reshape-Transpose-Reshape where lengths are symbolic); grouped
    sites go per phase or are refused with the reason.  The result parses back to ConvTranspose."""
    rng = random.Random(9100 + batch)
    opset = (9, 11, 13, 17)[batch]
    configs = [random_config(rng) for _ in range(40)]
    model, feeds, terms = batch_model(configs, opset, seed=9100 + batch)
    original = _run(model, feeds)
    result = up.convert(model, to="subpixel", d2s_mode="DCR", verify=False)
    sites = {s.node: s for s in result.report.sites}
    for i, cfg in enumerate(configs):
        site = sites[f"ct{i}"]
        if site.status == "refused":
            assert cfg.group > 1 and "cannot follow a grouped Conv" in site.reason, (cfg, site.reason)
        elif math.prod(cfg.strides) > 1:
            assert "DCR" in site.form and "CRD" not in site.form, (cfg, site.form)
    rewritten_ranks = {cfg.rank for i, cfg in enumerate(configs)
                       if sites[f"ct{i}"].status == "rewritten" and math.prod(cfg.strides) > 1}
    assert rewritten_ranks >= {1, 2}, rewritten_ranks
    assert {a.s for n in result.model.graph.node if n.op_type == "DepthToSpace" for a in n.attribute
            if a.name == "mode"} <= {b"DCR"}
    _assert_round_trip(result.model, feeds, original, configs, terms)


@pytest.mark.parametrize("spatial, strides", [((40,), (4,)), ((9, 7), (2, 3)), ((5, 4, 3), (2, 2, 2))])
def test_dcr_mode_without_a_depth_to_space_interleaves_phase_major_channels(spatial, strides):
    """1-D, unequal 2-D and 3-D strides: no DepthToSpace applies, so the single-axis Transposes read
    the Conv's DCR channels; the Conv weight is the CRD one with its channels permuted."""
    from onnx_uprewrite.weights import crd_to_dcr_permutation

    rank = len(spatial)
    attrs = dict(strides=list(strides), pads=[s // 2 for s in strides] * 2)
    model = _single(attrs, [1, 6, *spatial], [6, 3] + [2 * s for s in strides], bias=True)
    dcr = up.convert(model, d2s_mode="DCR")
    crd = up.convert(model, d2s_mode="CRD")
    assert dcr.report.verified and not dcr.report.refused
    ops = _ops(dcr.model)
    assert "DepthToSpace" not in ops and ops.count("Conv") == 1 and ops.count("Transpose") == rank
    weights = [{t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer} for r in (dcr, crd)]
    w_dcr, w_crd = (w[next(n for n in r.model.graph.node if n.op_type == "Conv").input[1]]
                    for w, r in zip(weights, (dcr, crd)))
    np.testing.assert_array_equal(w_dcr, w_crd[crd_to_dcr_permutation(3, math.prod(strides))])


def _layer(cin, cout, spatial, kernel, stride, pad, output_padding=0, seed=0):
    rank = len(spatial)
    attrs = dict(strides=[stride] * rank, pads=[pad] * 2 * rank)
    if output_padding:
        attrs["output_padding"] = [output_padding] * rank
    return _single(attrs, [1, cin, *spatial], [cin, cout] + [kernel] * rank, bias=True, seed=seed)


def test_wide_layer_on_a_small_map_gets_one_conv_per_phase():
    """DCGAN's 256->128 k4 s2 p1 at 8x8: one Conv would compute 9x9 positions for 8x8 outputs per
    phase (27% more MACs) and then crop; four exact Convs compute 8x8 each and need no Slice."""
    result = up.convert(_layer(32, 32, (8, 8), 4, 2, 1))
    assert _ops(result.model) == ["Conv"] * 4 + ["Concat", "DepthToSpace"]
    (site,) = result.report.sites
    assert site.form.startswith("4 Conv (2x2) -> 32 ch + Concat + DepthToSpace(2, DCR)")
    assert site.macs_after == 32 * 32 * 16 * 64 and site.macs_before == site.macs_after
    assert result.report.verified


def test_phases_with_different_kernels_read_no_zero_taps():
    """k3 s2 p1 op1: the phases have 1 or 2 taps per axis; one Conv would pad them all to 2x2."""
    result = up.convert(_layer(16, 16, (10, 10), 3, 2, 1, output_padding=1))
    (site,) = result.report.sites
    assert site.form.startswith("4 Conv (1x1/1x2/2x1/2x2)")
    assert site.macs_after == 16 * 16 * 9 * 100
    assert result.report.verified


def test_narrow_layer_keeps_one_conv():
    """32->3: per-phase Convs of 3 channels run far below the Conv's speed (MIN_PHASE_CHANNELS)."""
    result = up.convert(_layer(32, 3, (16, 16), 4, 2, 1))
    assert _ops(result.model) == ["Conv", "DepthToSpace", "Slice"]


def test_crd_mode_keeps_the_pixel_shuffle_layout():
    result = up.convert(_layer(32, 32, (8, 8), 4, 2, 1), d2s_mode="CRD")
    assert _ops(result.model) == ["Conv", "DepthToSpace", "Slice"]


@pytest.mark.parametrize("spatial, stride", [((40,), 4), ((6, 5, 4), 2)])
def test_other_ranks_interleave_with_single_axis_transposes(spatial, stride):
    """1-D and 3-D sites: one Transpose per axis, each moving one phase axis (onnxruntime's fast path)."""
    result = up.convert(_layer(8, 4, spatial, 2 * stride, stride, stride // 2))
    ops = _ops(result.model)
    assert "DepthToSpace" not in ops and ops.count("Transpose") == len(spatial)
    for node in result.model.graph.node:
        if node.op_type == "Transpose":
            perm = list(helper.get_attribute_value(node.attribute[0]))
            moved = [i for i, p in enumerate(perm) if p != i]
            assert len(moved) == 2 and moved[1] == moved[0] + 1, perm  # two neighbours swap
    assert result.report.verified


def test_transpose_mode_replaces_depth_to_space_with_4d_transposes():
    result = up.convert(_layer(32, 32, (8, 8), 4, 2, 1), d2s_mode="transpose")
    ops = _ops(result.model)
    assert "DepthToSpace" not in ops and ops.count("Transpose") == 2
    shapes = [numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name.endswith(("split_0", "split_1"))]
    assert all(len(s) == 4 for s in shapes)
    assert result.report.verified


@pytest.fixture
def phases_everywhere(monkeypatch):
    """The per-phase layout wherever it exists (the speed rule would pick it for wide layers only)."""
    from onnx_uprewrite.passes import to_subpixel

    monkeypatch.setattr(to_subpixel, "MIN_PHASE_CHANNELS", 0)
    monkeypatch.setattr(to_subpixel, "MIN_PHASE_SAVING", -1.0)
    monkeypatch.setattr(to_subpixel, "MAX_PHASE_RANK", 3)


@pytest.mark.parametrize("batch", range(6))
@pytest.mark.parametrize("mode", ["auto", "transpose"])
def test_per_phase_sweep_matches_onnxruntime_and_round_trips(batch, mode, phases_everywhere):
    """Every layout choice on random attributes; and the result parses back to the same kernels."""
    rng = random.Random(7000 + batch)
    opset = (7, 9, 11, 13, 17, 19)[batch % 6]
    configs = [random_config(rng) for _ in range(60)]
    model, feeds, terms = batch_model(configs, opset, seed=7000 + batch)
    original = _run(model, feeds)
    result = up.convert(model, d2s_mode=mode, verify=False)
    assert not result.report.refused, [s.reason for s in result.report.refused][:3]
    assert any(s.form and "Concat" in s.form for s in result.report.sites)
    back = _assert_round_trip(result.model, feeds, original, configs, terms)
    assert {n.op_type for n in back.graph.node} <= {"ConvTranspose", "Conv", "Slice", "Pad", "Add"}


def test_float16_per_phase_verifies_and_stays_float16(phases_everywhere):
    from test_site_check import to_float16

    rng = random.Random(77)
    configs = [random_config(rng, allow_symbolic=False) for _ in range(30)]
    model = to_float16(batch_model(configs, 17, 77)[0])
    for mode in ("auto", "transpose"):
        result = up.convert(model, d2s_mode=mode)
        assert result.report.verified and "float16" in result.report.tolerance
        assert any("Concat" in (s.form or "") for s in result.report.sites)
        dtypes = {t.data_type for t in result.model.graph.initializer if t.data_type in (1, 10)}
        assert dtypes == {onnx.TensorProto.FLOAT16}, "a float32 weight was written into a float16 model"


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(strides=st.lists(st.integers(1, 4), min_size=1, max_size=3), q=st.lists(st.integers(1, 4), min_size=3, max_size=3),
       channels=st.integers(1, 5), batch=st.integers(1, 2), dcr=st.booleans())
def test_single_axis_moves_are_a_depth_to_space(strides, q, channels, batch, dcr):
    """The Reshape/Transpose steps of the Transpose shuffle, run in numpy, equal depth-to-space, and
    every step swaps two neighbouring axes only."""
    from onnx_uprewrite.passes.to_subpixel import _single_axis_moves
    from onnx_uprewrite.weights import crd_to_dcr_permutation, depth_to_space_crd

    q = q[: len(strides)]
    n_phase = math.prod(strides)
    x = np.arange(batch * channels * n_phase * math.prod(q)).reshape([batch, channels * n_phase, *q])
    want = depth_to_space_crd(x, tuple(strides))
    y = x[:, crd_to_dcr_permutation(channels, n_phase)] if dcr else x  # the Conv writes DCR order then
    for dims, perm in _single_axis_moves(channels, strides, q, dcr):
        moved = [i for i, p in enumerate(perm) if p != i]
        assert len(moved) == 2 and moved[1] == moved[0] + 1 and perm[0] == 0
        y = y.reshape([batch, *dims]).transpose(perm)
    got = y.reshape([batch, channels, *(n * s for n, s in zip(q, strides))])
    np.testing.assert_array_equal(got, want)


def test_three_d_sites_keep_one_conv():
    """Eight per-phase 3-D Convs cost more than the border they save (MAX_PHASE_RANK)."""
    result = up.convert(_layer(32, 32, (6, 6, 6), 4, 2, 1))
    assert _ops(result.model).count("Conv") == 1 and result.report.verified


def test_a_forced_per_phase_layout_without_one_is_refused_with_the_reason():
    from onnx_uprewrite.passes import to_subpixel

    api.SUBPIXEL_LAYOUTS["phases"] = to_subpixel.PHASES
    try:
        (site,) = up.convert(_layer(8, 4, (6, 6), 3, 2, 1), d2s_mode="phases").report.sites  # 2L-1: odd
    finally:
        del api.SUBPIXEL_LAYOUTS["phases"]
    assert site.status == "refused" and "no per-phase layout" in site.reason and "phases differ in length" in site.reason
