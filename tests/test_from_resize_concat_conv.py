"""Resize(nearest) -> Concat(channels) -> Conv split into a site + the Conv over the other inputs:
every target and --to fastest compared with the original in onnxruntime, the structure of the result,
and the refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_model as _run
from onnx_uprewrite import api
from onnx_uprewrite.api import find_sites
from onnx_uprewrite.passes import from_resize_concat_conv, to_resize
from onnx_uprewrite.sites import Site, priced

EPS32 = float(np.finfo(np.float32).eps)
TARGETS = ("subpixel", "convtranspose", "resize")


def _upsample(x, out, opset, inits, scale=2, **how):
    """Nearest x``scale`` the way exporters write it at ``opset`` (Upsample-9, Resize-11 with roi)."""
    scales = numpy_helper.from_array(np.array([1, 1, scale, scale], np.float32), f"{out}_scales")
    inits.append(scales)
    if opset == 9:
        return helper.make_node("Upsample", [x, scales.name], [out], name="up", mode="nearest")
    attrs = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    attrs.update(how)
    roi = ""
    if opset < 13:  # roi is a required input before opset 13
        roi = f"{out}_roi"
        inits.append(numpy_helper.from_array(np.zeros(0, np.float32), roi))
    return helper.make_node("Resize", [x, roi, scales.name], [out], name="up", **attrs)


def decoder_step(opset=17, cx=4, skips=(3,), position=0, kernel=3, bias=True, hw=(5, 4), cout=6, group=1,
                 axis=1, seed=0, extra_readers=(), **how):
    """``x [1, cx, H, W] -> up x2 -> Concat(axis, with skips at 2H x 2W, up at ``position``) -> Conv``.

    ``extra_readers``: "resize" / "concat" add a graph output reading that tensor (it must stay)."""
    rng = np.random.default_rng(seed)
    inits = []
    nodes = [_upsample("x", "u", opset, inits, **how)]
    up_hw = [2 * n for n in hw]
    names = [f"skip{i}" for i in range(len(skips))]
    cat = list(names)
    cat.insert(position, "u")
    nodes.append(helper.make_node("Concat", cat, ["c"], name="cat", axis=axis))
    cin = cx + sum(skips) if axis == 1 else cx
    w = rng.standard_normal((cout, cin // group, kernel, kernel)).astype(np.float32)
    inits.append(numpy_helper.from_array(w, "W"))
    conv_in = ["c", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "B"))
        conv_in.append("B")
    nodes.append(helper.make_node("Conv", conv_in, ["y"], name="conv", pads=[kernel // 2] * 4, group=group))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cx, *hw])]
    for name, c in zip(names, skips):
        dims = [1, c, *up_hw] if axis == 1 else [1, cx, c, up_hw[1]]  # axis 2: c more rows
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    outputs += [helper.make_tensor_value_info({"resize": "u", "concat": "c"}[r], TensorProto.FLOAT, None)
                for r in extra_readers]
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def _feeds(model, seed=1):
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input}




def _assert_same(original, rewritten, terms):
    """Outputs agree within float rounding of sums of ``terms`` products (8 eps sqrt(T) max|y|)."""
    feeds = _feeds(original)
    ref, got = _run(original, feeds), _run(rewritten, feeds)
    assert ref.keys() == got.keys()
    worst = 0.0
    for name, r in ref.items():
        tol = 8 * EPS32 * math.sqrt(terms) * float(np.abs(r).max())
        err = float(np.abs(got[name].astype(np.float64) - r).max())
        assert got[name].shape == r.shape and err <= tol, (name, err, tol)
        worst = max(worst, err / tol)
    return worst


def _ops(model):
    return [n.op_type for n in model.graph.node]


CASES = [(skips, position) for skips, position in (((3,), 0), ((3,), 1), ((2, 5), 1))]


@pytest.mark.parametrize("opset", [9, 11, 13, 17])
@pytest.mark.parametrize("skips,position", CASES)
@pytest.mark.parametrize("kernel", [3, 1])
def test_every_target_matches_the_original(opset, skips, position, kernel):
    bias = (opset + position + kernel) % 2 == 0
    model = decoder_step(opset, skips=skips, position=position, kernel=kernel, bias=bias, seed=opset + kernel)
    terms = (4 + sum(skips)) * kernel * kernel
    for to in TARGETS:
        result = api.convert(model, to=to)
        report = result.report
        assert report.verification == "passed"
        [site] = report.sites
        assert site.status == "rewritten" and site.source == "concat" and site.target == to, site
        ops = _ops(result.model)
        # the upsampled part runs in the target form; the Resize and the Concat are gone
        assert "Concat" not in ops or len(skips) > 1, ops
        assert ops.count("Add") == 1 and ("Resize" in ops or "Upsample" in ops) == (to == "resize"), ops
        if to == "resize" and kernel == 1:  # pointwise: the Conv runs before the upsampling
            assert ops.index("Conv") < ops.index("Resize" if opset > 9 else "Upsample"), ops
            assert "runs before the upsampling" in site.form
        assert _assert_same(model, result.model, terms) <= 1


@pytest.mark.parametrize("ctm,nm", [("half_pixel", "round_prefer_floor"), ("pytorch_half_pixel", "round_prefer_ceil"),
                                    ("tf_half_pixel_for_nn", "floor")])
def test_other_replicating_modes(ctm, nm):
    model = decoder_step(17, coordinate_transformation_mode=ctm, nearest_mode=nm)
    result = api.convert(model, to="subpixel")
    assert result.report.sites[0].status == "rewritten"
    assert _assert_same(model, result.model, 7 * 9) <= 1


def test_fastest_keeps_the_original_or_a_faster_split_and_verifies():
    model = decoder_step(17, cx=16, skips=(8,), hw=(12, 12), cout=8)
    result = api.convert(model, to="fastest")
    [site] = result.report.sites
    assert result.report.verification == "passed"
    ms = site.timings_ms
    assert {"original", "convtranspose", "resize", "subpixel"} <= set(ms), ms
    best = min(ms, key=ms.get)
    assert site.chosen == best or site.chosen == "original", ms
    if site.chosen == "original":
        assert _ops(result.model) == ["Resize", "Concat", "Conv"]
    assert _assert_same(model, result.model, 24 * 9) <= 1


def test_fastest_on_a_pointwise_conv_times_the_commuted_form():
    model = decoder_step(13, cx=16, skips=(8,), kernel=1, hw=(16, 16), cout=16)
    result = api.convert(model, to="fastest")
    [site] = result.report.sites
    assert result.report.verification == "passed" and "resize" in site.timings_ms
    assert _assert_same(model, result.model, 24) <= 1


def test_readers_of_the_resize_and_the_concat_keep_them():
    model = decoder_step(17, extra_readers=("resize", "concat"))
    for to in TARGETS:
        result = api.convert(model, to=to)
        ops = _ops(result.model)
        assert ops.count("Concat") == 1 and ops.count("Resize") == 1 + (to == "resize"), ops
        conv_inputs = {n.input[0] for n in result.model.graph.node if n.op_type in ("Conv", "ConvTranspose")}
        assert "c" not in conv_inputs  # only the Conv's use of the Concat is rewritten
        assert _assert_same(model, result.model, 7 * 9) <= 1


def test_two_convs_reading_one_concat_are_two_sites():
    model = decoder_step(17)
    w2 = numpy_helper.from_array(np.random.default_rng(3).standard_normal((2, 7, 1, 1)).astype(np.float32), "W2")
    model.graph.initializer.append(w2)
    model.graph.node.append(helper.make_node("Conv", ["c", "W2"], ["y2"], name="conv2"))
    model.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, None))
    result = api.convert(model, to="convtranspose")
    assert [s.status for s in result.report.sites] == ["rewritten", "rewritten"]
    assert not {"Resize", "Concat"} & set(_ops(result.model))
    assert _assert_same(model, result.model, 7 * 9) <= 1


def test_site_is_the_upsampled_part_and_macs_count_it():
    model = decoder_step(17, cx=4, skips=(3,), position=1, kernel=1, hw=(5, 4), cout=6)
    [site], refusals = find_sites(model)
    assert not refusals and isinstance(site, Site)
    assert site.input == "x" and site.in_channels == 4 and site.out_channels == 6
    assert site.addend.inputs == ("skip0",) and site.addend.channels == ((0, 3),)
    assert site.addend.weight.shape == (6, 3, 1, 1)
    assert site.source_macs == 6 * 4 * 10 * 8  # the upsampled part, at the high resolution
    assert to_resize.macs(priced(site)) == 6 * 4 * 5 * 4  # commuted: at the input resolution
    assert any("split by input channels" in n for n in site.notes)


@pytest.mark.parametrize("change,reason", [
    (dict(group=2, cx=4, skips=(4,), cout=6), "attribute group=2"),
    (dict(axis=2, skips=(1,)), "attribute axis=2"),
])
def test_refused_with_the_attribute(change, reason):
    model = decoder_step(17, **change)
    sites, refusals = find_sites(model)
    assert not sites and len(refusals) == 1
    assert refusals[0].node == "conv" and reason in refusals[0].reason and "Concat 'cat'" in refusals[0].reason
    result = api.convert(model, to="subpixel")
    assert [s.status for s in result.report.sites] == ["refused"]
    assert _ops(result.model) == _ops(model)


def test_two_upsampled_inputs_are_refused():
    model = decoder_step(17)
    inits = []
    model.graph.node.insert(1, _upsample("x", "u2", 17, inits))
    model.graph.node[1].name = "up2"
    model.graph.initializer.extend(inits)
    cat = next(n for n in model.graph.node if n.op_type == "Concat")
    cat.input.append("u2")
    w = np.random.default_rng(0).standard_normal((6, 11, 3, 3)).astype(np.float32)
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "W"))
    model.graph.initializer.append(numpy_helper.from_array(w, "W"))
    sites, refusals = find_sites(model)
    assert not sites and "2 of its inputs are upsampled ('up', 'up2')" in refusals[0].reason


def test_non_replicating_nearest_with_pads_and_linear_are_refused_unless_foldable():
    # asymmetric + ceil is a shifted copy with edge clamping: a padded Conv would read the clamp
    model = decoder_step(17, coordinate_transformation_mode="asymmetric", nearest_mode="ceil")
    _, refusals = find_sites(model)
    assert "not foldable" in refusals[0].reason
    # linear half_pixel before a 1x1 Conv without pads folds (R3)
    model = decoder_step(17, kernel=1, mode="linear", coordinate_transformation_mode="half_pixel")
    result = api.convert(model, to="convtranspose")
    assert result.report.sites[0].status == "rewritten" and "Pad" in _ops(result.model)
    assert _assert_same(model, result.model, 7 * 4) <= 1
    model = decoder_step(17, mode="linear", coordinate_transformation_mode="align_corners")
    assert "align_corners" in find_sites(model)[1][0].reason


def test_unknown_channel_counts_use_the_conv_or_are_refused():
    model = decoder_step(17, skips=(2, 3))
    for vi in model.graph.input[1:]:
        vi.type.tensor_type.shape.dim[1].dim_param = "C"
    [refusal] = find_sites(model)[1]
    assert "channel counts of inputs 'skip0', 'skip1' are unknown" in refusal.reason
    one = decoder_step(17, skips=(2, 3))
    one.graph.input[2].type.tensor_type.shape.dim[1].dim_param = "C"
    [site], _ = find_sites(one)
    assert site.addend.channels == ((4, 6), (6, 9))


def test_channel_ranges():
    assert from_resize_concat_conv.channel_ranges([2, None, 3], 9) == [(0, 2), (2, 6), (6, 9)]
    assert "7 channels together" in from_resize_concat_conv.channel_ranges([4, 3], 8)
    assert from_resize_concat_conv.channel_ranges([None, None], 8) == "unknown"


def test_inspect_lists_every_form_with_the_addend():
    info = api.inspect(decoder_step(17))
    [site] = info["sites"] if isinstance(info, dict) else info.sites
    site = site if isinstance(site, dict) else site.to_dict()
    assert site["source"] == "concat" and set(site["exact_forms"]) == set(TARGETS)
    assert all("on the other Concat input + Add" in f for f in site["forms"].values())


def test_from_concat_selects_only_split_sites():
    model = decoder_step(17)
    assert api.convert(model, to="subpixel", sources=["resize"]).report.sites == []
    assert len(api.convert(model, to="subpixel", sources=["concat"]).report.sites) == 1


def test_opset_6_refuses_the_form():
    site = find_sites(decoder_step(17))[0][0]
    forms = api.exact_forms(site, 6)
    assert all(f.startswith("not possible") for f in forms.values()), forms


def test_edge_clamped_nearest_before_a_pointwise_conv_folds_with_edge_padding():
    model = decoder_step(17, kernel=1, coordinate_transformation_mode="asymmetric", nearest_mode="ceil")
    for to in TARGETS:
        result = api.convert(model, to=to)
        assert result.report.sites[0].status == "rewritten" and "Pad" in _ops(result.model), _ops(result.model)
        assert _assert_same(model, result.model, 7) <= 1


def test_symbolic_lengths_verified_at_two_sizes():
    model = decoder_step(13, skips=(2, 3), position=1)
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        for i, sym in ((0, "N"), (2, f"H_{vi.name}"), (3, f"W_{vi.name}")):
            dims[i].dim_param = sym
    shapes = {"x": (1, 4, 5, 4), "skip0": (1, 2, 10, 8), "skip1": (1, 3, 10, 8)}
    for to in TARGETS:
        result = api.convert(model, to=to, shapes=shapes)
        report = result.report
        assert report.verification == "passed" and report.sites[0].status == "rewritten"
        assert report.second_size == {"x": [2, 4, 10, 8], "skip0": [2, 2, 20, 16], "skip1": [2, 3, 20, 16]}


def test_a_concat_of_the_upsampled_tensor_alone_is_a_plain_site():
    model = decoder_step(17, skips=())
    [site], _ = find_sites(model)
    assert site.addend is None and not site.notes
    result = api.convert(model, to="subpixel")
    assert _ops(result.model) == ["Conv", "DepthToSpace", "Slice"]
    assert _assert_same(model, result.model, 4 * 9) <= 1


def test_per_site_tolerance_counts_the_skip_part():
    # skip values 1e4x the upsampled ones: the rounding of the split sum is that of |W_b|*|skip|, which
    # the per-site magnitude model must include (else the tolerance of |W_a|*|up(x)| alone is far too tight)
    model = decoder_step(17, cx=8, skips=(64,), cout=16, hw=(8, 8))
    feeds = _feeds(model)
    feeds["skip0"] *= 1e4
    result = api.convert(model, to="subpixel", inputs=feeds)
    [site] = result.report.sites
    assert result.report.verification == "passed" and site.ratio <= 1
    assert site.max_abs_error > 0  # the sum was reordered: a real rounding difference was judged


def _random_step(seed):
    """A random Resize(nearest, asymmetric floor) -> Concat -> Conv of rank 1-3: per-axis scales 1-3,
    kernel 1-4, dilation 1-2, explicit asymmetric pads or auto_pad, 0-2 other inputs anywhere."""
    rng = np.random.default_rng(seed)
    rank = int(rng.choice([1, 2, 2, 3]))
    scales = [int(v) for v in rng.integers(1, 4, rank)]
    lengths = [int(v) for v in rng.integers(2, 5 if rank < 3 else 4, rank)]
    kernel = [int(v) for v in rng.integers(1, 5, rank)]
    attrs = {"dilations": [int(v) for v in rng.integers(1, 3, rank)]}
    if rng.random() < 0.2:
        attrs = {"auto_pad": str(rng.choice(["SAME_UPPER", "SAME_LOWER"]))}
    else:
        attrs["pads"] = [int(v) for v in rng.integers(0, 3, 2 * rank)]
    up_len = [n * s for n, s in zip(lengths, scales)]
    pads = attrs.get("pads", [0] * 2 * rank)
    d = attrs.get("dilations", [1] * rank)
    if "pads" in attrs and any(u + pads[a] + pads[rank + a] - (k - 1) * d[a] < 1
                               for a, (u, k) in enumerate(zip(up_len, kernel))):
        attrs["pads"] = [(k - 1) * dd for k, dd in zip(kernel, d)] * 2
    cx, cout = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    others = [int(v) for v in rng.integers(1, 5, int(rng.integers(0, 3)))]
    position = int(rng.integers(0, len(others) + 1))
    inits = [numpy_helper.from_array(np.array([1, 1, *scales], np.float32), "sc")]
    nodes = [helper.make_node("Resize", ["x", "", "sc"], ["u"], name="up", mode="nearest",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor")]
    cat = [f"s{i}" for i in range(len(others))]
    cat.insert(position, "u")
    nodes.append(helper.make_node("Concat", cat, ["c"], name="cat", axis=1))
    w = rng.standard_normal((cout, cx + sum(others), *kernel)).astype(np.float32)
    inits += [numpy_helper.from_array(w, "W"), numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "B")]
    nodes.append(helper.make_node("Conv", ["c", "W", "B"], ["y"], name="conv", **attrs))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, cx, *lengths])]
    inputs += [helper.make_tensor_value_info(f"s{i}", TensorProto.FLOAT, [2, c, *up_len]) for i, c in enumerate(others)]
    graph = helper.make_graph(nodes, "step", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model, (cx + sum(others)) * math.prod(kernel)


@pytest.mark.parametrize("seed", range(24))
def test_random_steps_every_target(seed):
    model, terms = _random_step(seed)
    for to in TARGETS:
        result = api.convert(model, to=to)
        assert result.report.verification == "passed"
        assert [s.status for s in result.report.sites] == ["rewritten"], result.report.sites
        assert _assert_same(model, result.model, terms) <= 1
