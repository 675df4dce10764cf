"""Zero insertion + Conv -> canonical site: the masked ``--to resize`` form and Unsqueeze/Reshape ->
Pad -> Reshape runs read back, round trips checked in onnxruntime against the original."""

from __future__ import annotations

import math
import random

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from sweep import EPS32, Config, batch_model, random_config, run_model

from onnx_uprewrite.api import convert, find_sites
from onnx_uprewrite.surgery import PERIODIC_CONSTANT_MAX

from onnx_uprewrite.passes.from_zero_insertion import mask_phases

PER_BATCH = 10


@pytest.fixture(scope="module")
def sweep_stats():
    stats = {"sites": 0, "worst": 0.0, "worst_err": 0.0, "worst_tol": 0.0}
    yield stats
    if stats["sites"]:
        print(f"\nzero-insertion round trips: {stats['sites']} masked sites read back -> convtranspose and "
              f"-> subpixel, worst error/tolerance "
              f"{stats['worst']:.3f} ({stats['worst_err']:.2e} vs {stats['worst_tol']:.2e})")


def _config(rng: random.Random, i: int) -> Config:
    """A ConvTranspose whose kernel does not factor as box ⊛ G (random weights), so --to resize
    writes the masked form: strides 2/3, kernels smaller and larger than the stride."""
    rank = 1 + i % 2
    strides = tuple(rng.choice([2, 3]) for _ in range(rank))
    kernel = tuple(rng.choice([1, s - 1, s, s + 1, 2 * s + 1]) or 1 for s in strides)
    dilations = tuple(1 if rng.random() < 0.7 else 2 for _ in range(rank))
    g = rng.choice([1, 1, 2, "dw"])
    if g == "dw":
        group = rng.randint(2, 3)
        c_in, c_out = group, group * rng.choice([1, 2])
    else:
        group, c_in, c_out = g, g * rng.randint(1, 3), g * rng.randint(1, 2)
    lengths = tuple(rng.randint(2, 6) for _ in range(rank))
    output_padding = tuple(rng.randint(0, s - 1) if rng.random() < 0.4 else 0 for s in strides)
    keff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    full = [(n - 1) * s + ke + op for n, s, ke, op in zip(lengths, strides, keff, output_padding)]
    pads = []
    for f in full:
        pb = rng.randint(0, min(f - 1, 4))
        pads.append((pb, rng.randint(0, min(f - 1 - pb, 4))))
    pads = tuple(p[0] for p in pads) + tuple(p[1] for p in pads)
    return Config(rank, lengths, strides, kernel, dilations, group, c_in, c_out, pads, output_padding,
                  "NOTSET", None, rng.random() < 0.6, rng.randint(1, 2), False)


def _check_outputs(ref, got, configs, stats):
    for i, c in enumerate(configs):
        r, g = ref[f"y{i}"].astype(np.float64), got[f"y{i}"]
        assert g.shape == r.shape, (i, c)
        terms = (c.c_in // c.group) * math.prod(c.kernel)
        tol = 8 * EPS32 * math.sqrt(terms) * max(float(np.abs(r).max()), 1e-30)
        err = float(np.abs(g - r).max())
        assert err <= tol, (i, c, err, tol)
        if err / tol >= stats["worst"]:
            stats.update(worst=err / tol, worst_err=err, worst_tol=tol)


@pytest.mark.parametrize("batch,opset", [(0, 17), (1, 17), (2, 13), (3, 11), (4, 10), (5, 9), (6, 7)])
def test_masked_form_round_trips(batch, opset, sweep_stats):
    """ConvTranspose --to resize (masked) -> --to convtranspose / --to subpixel equals the original."""
    rng = random.Random(1500 + batch)
    configs = [_config(rng, i) for i in range(PER_BATCH)]
    if opset < 11:  # Upsample / Resize-10: 2-D only (Upsample-7 takes its scales as an attribute)
        configs = [c for c in configs if c.rank == 2]
    model, feeds, _ = batch_model(configs, opset, 1500 + batch)
    ref = run_model(model, feeds)
    masked = convert(model, to="resize")
    assert [s.status for s in masked.report.sites] == ["rewritten"] * len(configs)
    assert all("phase mask" in s.form for s in masked.report.sites)
    again = convert(masked.model, to="resize", verify=False)
    assert {(s.source, s.status, s.reason) for s in again.report.sites} == {
        ("resize", "skipped", "already in form resize")}
    for to, op in (("convtranspose", "ConvTranspose"), ("subpixel", "Conv")):
        back = convert(masked.model, to=to)
        assert [(s.source, s.status) for s in back.report.sites] == [("resize", "rewritten")] * len(configs)
        ops = {n.op_type for n in back.model.graph.node}
        assert op in ops and not ops & {"Resize", "Upsample", "Mul", "Tile"}, ops
        _check_outputs(ref, run_model(back.model, feeds), configs, sweep_stats)
    sweep_stats["sites"] += len(configs)


@pytest.mark.parametrize("batch", [0, 1])
def test_random_configs_round_trip(batch, sweep_stats):
    """sweep.random_config: ranks 1-3, strides 1-4 (unequal too), auto_pad, output_shape, symbolic
    lengths (masks built by Tile at run time); the masked sites read back."""
    rng = random.Random(700 + batch)
    configs = [random_config(rng) for _ in range(2 * PER_BATCH)]
    model, feeds, _ = batch_model(configs, 17, 700 + batch)
    ref = run_model(model, feeds)
    masked = convert(model, to="resize", inputs=feeds)
    n_masked = sum("phase mask" in s.form for s in masked.report.sites)
    assert n_masked >= PER_BATCH
    for to in ("convtranspose", "subpixel"):
        back = convert(masked.model, to=to, inputs=feeds)
        assert [s.status for s in back.report.sites] == ["rewritten"] * len(configs)
        assert sum(s.source == "resize" for s in back.report.sites) == len(configs)
        _check_outputs(ref, run_model(back.model, feeds), configs, sweep_stats)
    sweep_stats["sites"] += n_masked


def test_tiled_mask_reads_back():
    """A mask larger than PERIODIC_CONSTANT_MAX is a Tile of one period (constant repeats), and with
    symbolic lengths a Tile by the input's Shape: both read back."""
    rng = np.random.default_rng(3)
    side = int(math.isqrt(PERIODIC_CONSTANT_MAX)) // 2 + 8
    c = Config(2, (side, side), (2, 2), (3, 3), (1, 1), 1, 2, 2, (1, 1, 1, 1), (1, 1), "NOTSET", None, True, 1, False)
    for symbolic in (False, True):
        c.symbolic = symbolic
        model, feeds, _ = batch_model([c], 17, 7)
        shapes = {"x0": feeds["x0"].shape} if symbolic else None
        masked = convert(model, to="resize", shapes=shapes)
        ops = {n.op_type for n in masked.model.graph.node}
        assert "Tile" in ops and ("Shape" in ops) == symbolic
        back = convert(masked.model, to="convtranspose", shapes=shapes)
        assert [(s.source, s.status) for s in back.report.sites] == [("resize", "rewritten")]
        assert {n.op_type for n in back.model.graph.node} == {"ConvTranspose"}
        x = rng.standard_normal(feeds["x0"].shape).astype(np.float32)
        ref, got = run_model(model, {"x0": x})["y0"], run_model(back.model, {"x0": x})["y0"]
        assert float(np.abs(got - ref).max()) <= 8 * EPS32 * 6 * float(np.abs(ref).max())


# ---------------------------------------------------------------------------------------------
# hand-written zero insertion


def _conv_model(nodes, inits, x_shape, weight, conv_attrs, bias=None, opset=17, tail=()):
    """``nodes`` make tensor 'z' from graph input 'x'; a Conv reads it into 'y' (then ``tail``)."""
    inits = list(inits) + [numpy_helper.from_array(weight, "V")]
    ins = ["z", "V"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "B"))
        ins.append("B")
    last = "y" if not tail else "c"
    nodes = list(nodes) + [helper.make_node("Conv", ins, [last], name="conv", **conv_attrs)] + list(tail)
    graph = helper.make_graph(nodes, "zi", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _const(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(values, dtype), name)


def _round_trip(model, x_shape, source, terms, targets=("convtranspose", "subpixel", "resize")):
    x = np.random.default_rng(5).standard_normal(x_shape).astype(np.float32)
    ref = run_model(model, {"x": x})["y"].astype(np.float64)
    for to in targets:
        out = convert(model, to=to)
        assert [(s.source, s.status) for s in out.report.sites] == [(source, "rewritten")], out.report.sites
        got = run_model(out.model, {"x": x})["y"]
        tol = 8 * EPS32 * math.sqrt(terms) * float(np.abs(ref).max())
        assert got.shape == ref.shape and float(np.abs(got - ref).max()) <= tol, to
    return out


@pytest.mark.parametrize("phases", [(0, 0), (1, 0), (2, 1)])
def test_unsqueeze_pad_reshape_all_axes(phases):
    """x[N,C,H,W] -> Unsqueeze(3, 5) -> Pad(r before, s-1-r after) -> Reshape[N,C,3H,3W] -> Conv."""
    s, (n, c, h, w) = 3, (1, 4, 5, 6)
    pads = [0] * 12
    pads[3], pads[5] = phases
    pads[9], pads[11] = s - 1 - phases[0], s - 1 - phases[1]
    nodes = [helper.make_node("Unsqueeze", ["x", "ax"], ["u"]), helper.make_node("Pad", ["u", "pads"], ["p"]),
             helper.make_node("Reshape", ["p", "shape"], ["z"])]
    inits = [_const("ax", [3, 5]), _const("pads", pads), _const("shape", [n, c, h * s, w * s])]
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 2, 4, 3)).astype(np.float32)
    model = _conv_model(nodes, inits, [n, c, h, w], weight, dict(pads=[2, 1, 0, 3], group=2),
                        rng.standard_normal(6).astype(np.float32))
    _round_trip(model, (n, c, h, w), "zeroinsert", 2 * 12)


def test_per_axis_chain_and_reshape_insertion_1d_with_crop():
    """1-D, two chained units (x2 then x2 = x4, phase 2*1 + 0), the first inserting its unit axis by
    Reshape; dilation 2, and a Slice after the Conv."""
    c, length = 3, 7
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["u1"]), helper.make_node("Pad", ["u1", "p1"], ["q1"]),
             helper.make_node("Reshape", ["q1", "m1"], ["r1"]), helper.make_node("Unsqueeze", ["r1", "ax"], ["u2"]),
             helper.make_node("Pad", ["u2", "p2"], ["q2"]), helper.make_node("Reshape", ["q2", "m2"], ["z"])]
    inits = [_const("s1", [1, c, length, 1]), _const("p1", [0, 0, 0, 1, 0, 0, 0, 0]),
             _const("m1", [1, c, 2 * length]), _const("ax", [3]), _const("p2", [0, 0, 0, 0, 0, 0, 0, 1]),
             _const("m2", [1, c, 4 * length]), _const("st", [2]), _const("en", [-1]), _const("axs", [2])]
    tail = [helper.make_node("Slice", ["c", "st", "en", "axs"], ["y"])]
    weight = np.random.default_rng(1).standard_normal((2, c, 5)).astype(np.float32)
    model = _conv_model(nodes, inits, [1, c, length], weight, dict(pads=[1, 2], dilations=[2]), tail=tail)
    _round_trip(model, (1, c, length), "zeroinsert", c * 5)
    sites, refusals = find_sites(model)
    assert not refusals and [a.stride for a in sites[0].axes] == [4] and sites[0].output == "y"


def _masked_model(mask, up_mode="nearest", ctm="asymmetric", nearest="floor", gate=False):
    """x[1,2,4,5] -> Resize x2 -> Mul(mask) -> Conv 3x3 pads 1."""
    scales = _const("sc", [1, 1, 2, 2], np.float32)
    nodes = [helper.make_node("Resize", ["x", "", "sc"], ["u"], mode=up_mode, coordinate_transformation_mode=ctm,
                              nearest_mode=nearest)]
    inits = [scales]
    if gate:
        nodes.append(helper.make_node("Sigmoid", ["u"], ["m"]))
    else:
        inits.append(numpy_helper.from_array(np.asarray(mask, np.float32), "m"))
    nodes.append(helper.make_node("Mul", ["u", "m"], ["z"]))
    weight = np.random.default_rng(2).standard_normal((3, 2, 3, 3)).astype(np.float32)
    return _conv_model(nodes, inits, [1, 2, 4, 5], weight, dict(pads=[1, 1, 1, 1]))


def _phase_mask(phase, shape=(1, 1, 8, 10), strides=(2, 2)):
    mask = np.zeros(shape, np.float32)
    mask[(Ellipsis,) + tuple(slice(r, None, s) for r, s in zip(phase, strides))] = 1
    return mask


@pytest.mark.parametrize("phase", [(0, 1), (1, 1)])
def test_hand_written_mask_with_any_phase(phase):
    _round_trip(_masked_model(_phase_mask(phase)), (1, 2, 4, 5), "resize", 18, ("convtranspose", "subpixel"))


def test_mask_without_batch_and_channel_axes_reads_back():
    """A [H*s, W*s] mask broadcasts over batch and channels like the [1, 1, H*s, W*s] one."""
    _round_trip(_masked_model(_phase_mask((1, 0))[0, 0]), (1, 2, 4, 5), "resize", 18, ("convtranspose",))


def test_zero_pad_before_and_cropping_pad_after_the_conv_fold_in():
    """Resize x mask -> Pad(zeros) -> Conv -> Pad(negative: a crop): one site, the Pads folded into
    the pads and the crop."""
    model = _masked_model(_phase_mask((0, 1)))
    graph = model.graph
    conv = next(n for n in graph.node if n.op_type == "Conv")
    conv.input[0], conv.output[0] = "zp", "c"
    graph.node.insert(list(graph.node).index(conv), helper.make_node("Pad", ["z", "pre"], ["zp"]))
    graph.node.append(helper.make_node("Pad", ["c", "post"], ["y"]))
    graph.initializer.extend([_const("pre", [0, 0, 2, 0, 0, 0, 0, 1]), _const("post", [0, 0, 0, -1, 0, 0, -2, 0])])
    _round_trip(model, (1, 2, 4, 5), "resize", 18, ("convtranspose", "subpixel"))
    sites, _ = find_sites(model)
    assert sites[0].replaced_outputs == ("c", "y") and {"zp", "pre", "post"} <= set(sites[0].weight_tensors)


@pytest.mark.parametrize("mask,why", [
    (_phase_mask((0, 0)) + _phase_mask((1, 1)), "keeps 2 of the 4 phases"),
    (np.concatenate([_phase_mask((0, 0)), _phase_mask((1, 0))], axis=1), "differs across the batch or channel"),
    (np.tile(np.array([[1, 0], [0, 0], [0, 0], [0, 0]], np.float32), (2, 5))[None, None], "period [2, 2]"),
])
def test_masks_that_are_not_zero_insertion_are_refused(mask, why):
    sites, refusals = find_sites(_masked_model(mask))
    assert not sites and len(refusals) == 1 and why in refusals[0].reason, refusals


def test_mask_that_broadcasts_the_activation_is_refused():
    """x has 1 channel, the mask 2 equal ones: the Mul output (2 channels) is not x zero-inserted."""
    model = _masked_model(np.concatenate([_phase_mask((0, 0))] * 2, axis=1))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 1
    conv = next(t for t in model.graph.initializer if t.name == "V")
    conv.CopyFrom(numpy_helper.from_array(np.ones((3, 2, 3, 3), np.float32), "V"))
    sites, refusals = find_sites(model)  # no measured shapes: cannot tell
    assert not sites and "may broadcast the activation" in refusals[0].reason
    report = convert(model, to="convtranspose").report  # measured in onnxruntime
    assert [s.status for s in report.sites] == ["refused"]
    assert "broadcasts the upsampled [1, 1, 8, 10] to [1, 2, 8, 10]" in report.sites[0].reason


def test_mask_after_a_resize_that_is_not_replication_is_refused():
    sites, refusals = find_sites(_masked_model(_phase_mask((0, 0)), ctm="half_pixel", nearest="floor"))
    assert not sites and "not plain replication" in refusals[0].reason and "half_pixel" in refusals[0].reason


def test_activation_gate_and_other_pads_are_not_sites():
    """Resize x Sigmoid(...) and a Pad of a non-unit axis between Reshapes are not zero insertion."""
    assert find_sites(_masked_model(None, gate=True)) == ([], [])
    nodes = [helper.make_node("Unsqueeze", ["x", "ax"], ["u"]), helper.make_node("Pad", ["u", "pads"], ["p"]),
             helper.make_node("Reshape", ["p", "shape"], ["z"])]
    inits = [_const("ax", [3]), _const("pads", [0, 0, 1, 0, 0, 0, 1, 0]), _const("shape", [1, 2, 7, 1])]
    model = _conv_model(nodes, inits, [1, 2, 5, 1], np.ones((1, 2, 1, 1), np.float32), {})
    assert find_sites(model) == ([], [])
    nodes[1] = helper.make_node("Concat", ["u", "zeros"], ["p"], axis=2)  # zeros after the rows: not insertion
    inits.append(numpy_helper.from_array(np.zeros((1, 2, 2, 1, 1), np.float32), "zeros"))
    model = _conv_model(nodes, inits, [1, 2, 5, 1], np.ones((1, 2, 1, 1), np.float32), {})
    assert find_sites(model) == ([], [])


def test_mask_phases():
    assert mask_phases(_phase_mask((1, 0)), (2, 2)) == (1, 0)
    assert mask_phases(_phase_mask((2,), (1, 1, 9), (3,)), (3,)) == (2,)
    assert "not a multiple" in mask_phases(np.zeros((1, 1, 5), np.float32), (2,))


def test_qdq_masked_form_reads_back_with_int8_weights():
    """QDQ ConvTranspose --to resize keeps int8 weights behind DequantizeLinear; reading the masked
    form back keeps them int8 too (W is a rearrangement of V)."""
    from test_quantized import _int8_weights, _qdq_model

    rng = random.Random(11)
    configs = [_config(rng, i) for i in range(8)]
    model, feeds = _qdq_model(configs, [c.group == 1 and i % 2 == 0 for i, c in enumerate(configs)], seed=4)
    masked = convert(model, to="resize", inputs=feeds)
    assert not masked.report.refused and _int8_weights(masked.model)
    back = convert(masked.model, to="convtranspose", inputs=feeds)
    assert [(s.source, s.status) for s in back.report.sites] == [("resize", "rewritten")] * len(configs)
    assert back.report.verified and _int8_weights(back.model)
    assert "Resize" not in back.report.ops_after


@pytest.mark.parametrize("symbolic", [False, True])
def test_per_phase_bias_add_reads_back(symbolic):
    """A sub-pixel Conv whose bias differs across phases --to resize writes Conv + Add(periodic bias);
    reading it back folds the Add into the per-phase bias: --to subpixel gives Conv + DepthToSpace again."""
    rng = np.random.default_rng(8)
    weight, bias = rng.standard_normal((12, 3, 3, 3)).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "V", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("DepthToSpace", ["c"], ["y"], blocksize=2, mode="CRD")]
    graph = helper.make_graph(nodes, "sp", [helper.make_tensor_value_info("x", 1, ["N", 3, "H", "W"] if symbolic
                                                                          else [1, 3, 5, 6])],
                              [helper.make_tensor_value_info("y", 1, None)],
                              [numpy_helper.from_array(weight, "V"), numpy_helper.from_array(bias, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    shapes = {"x": (1, 3, 5, 6)}
    masked = convert(model, to="resize", shapes=shapes)
    assert {"Mul", "Conv", "Add"} <= {n.op_type for n in masked.model.graph.node}
    back = convert(masked.model, to="subpixel", shapes=shapes)
    assert [n.op_type for n in back.model.graph.node] == ["Conv", "DepthToSpace"]
    x = rng.standard_normal((2 if symbolic else 1, 3, 5, 6)).astype(np.float32)
    ref, got = run_model(model, {"x": x})["y"], run_model(back.model, {"x": x})["y"]
    assert float(np.abs(got - ref).max()) <= 8 * EPS32 * math.sqrt(27) * float(np.abs(ref).max())


def test_add_of_a_per_channel_constant_becomes_the_bias():
    """Resize x mask -> Conv (no bias) -> Add([1, C, 1, 1]): one site with a plain bias."""
    model = _masked_model(_phase_mask((0, 0)))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    conv.output[0] = "c"
    model.graph.node.append(helper.make_node("Add", ["bc", "c"], ["y"]))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, 2, 3], np.float32).reshape(1, 3, 1, 1), "bc"))
    _round_trip(model, (1, 2, 4, 5), "resize", 18, ("convtranspose",))
    site = find_sites(model)[0][0]
    assert site.phase_bias is None and site.bias.tolist() == [1, 2, 3] and site.output == "y"


@pytest.mark.parametrize("zeros", ["constant", "constant_of_shape"])
def test_stack_with_zeros(zeros):
    """torch.stack([x, zeros], dim).flatten per axis: Unsqueeze -> Concat(x, zeros) -> Reshape, zeros
    after x on H (phase 0) and before it on W (phase 1).  ConstantOfShape(Shape(u)) zeros on an
    input of symbolic width."""
    c, h, w = 2, 4, 5
    symbolic = zeros == "constant_of_shape"
    nodes, inits = [], []

    def stack(x, axis, zeros_first, shape, merged, out):
        u, zero = f"{out}_u", f"{out}_zeros"
        inits.append(_const(f"{out}_axes", [axis]))
        nodes.append(helper.make_node("Unsqueeze", [x, f"{out}_axes"], [u]))
        if symbolic:
            nodes.extend([helper.make_node("Shape", [u], [f"{out}_shape"]),
                          helper.make_node("ConstantOfShape", [f"{out}_shape"], [zero])])
        else:
            inits.append(numpy_helper.from_array(np.zeros(shape, np.float32), zero))
        nodes.append(helper.make_node("Concat", [zero, u] if zeros_first else [u, zero], [f"{out}_cat"], axis=axis))
        inits.append(_const(f"{out}_to", merged))
        nodes.append(helper.make_node("Reshape", [f"{out}_cat", f"{out}_to"], [out]))

    stack("x", 3, False, (1, c, h, 1, w), [0, c, 2 * h, -1] if symbolic else [1, c, 2 * h, w], "r1")
    stack("r1", 4, True, (1, c, 2 * h, w, 1), [0, c, 0, -1] if symbolic else [1, c, 2 * h, 2 * w], "z")
    weight = np.random.default_rng(4).standard_normal((3, c, 3, 2)).astype(np.float32)
    model = _conv_model(nodes, inits, [1, c, h, "W"] if symbolic else [1, c, h, w], weight, dict(pads=[1, 0, 1, 1]))
    _round_trip(model, (1, c, h, w), "zeroinsert", c * 6)
    if not symbolic:
        site = find_sites(model)[0][0]
        assert [(a.stride, a.crop_begin) for a in site.axes] == [(2, 1), (2, 0)]
