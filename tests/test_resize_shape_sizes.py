"""Resize/Upsample whose ``sizes``/``scales`` are computed from ``Shape`` (shape_arith), checked in onnxruntime.

The models mimic what exporters write: ``F.interpolate(x, size=(16, 16))`` and torchvision's heads
(``Concat(Slice(Shape(x), 0, 2), Constant)``), ``F.interpolate(x, size=skip.shape[2:])`` (smp Unet,
Linknet decoders, lraspp), ``recompute_scale_factor`` (``Floor(Mul(Cast(Shape(x)[2:]), 2.0))``), and
the old Upsample-9 exports whose scales divide that by the input length.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_uprewrite as up
from onnx_uprewrite.api import TARGETS, find_sites
from onnx_uprewrite.shape_arith import Affine, evaluate
from onnx_uprewrite.shapes import infer_static_shapes
from onnx_uprewrite.sites import GraphIndex
from onnx_uprewrite.verify import session

EPS32 = float(np.finfo(np.float32).eps)
SYMBOLIC = ["N", 4, "H", "W"]
NEAREST = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")  # PyTorch nearest
LINEAR = dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel")  # PyTorch bilinear


class _Graph:
    """A small graph under construction: Constant nodes for shape constants, as PyTorch writes them."""

    def __init__(self, opset: int):
        self.opset, self.nodes, self.inits, self.n = opset, [], [], 0

    def node(self, op, inputs, **attrs) -> str:
        self.n += 1
        out = f"{op.lower()}{self.n}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{self.n}", **attrs))
        return out

    def const(self, value, dtype=np.int64) -> str:
        return self.node("Constant", [], value=numpy_helper.from_array(np.array(value, dtype)))

    def slice(self, x, start, end) -> str:
        if self.opset < 10:
            return self.node("Slice", [x], starts=[start], ends=[end], axes=[0])
        return self.node("Slice", [x, self.const([start]), self.const([end]), self.const([0])])

    def unsqueeze(self, x) -> str:
        if self.opset < 13:
            return self.node("Unsqueeze", [x], axes=[0])
        return self.node("Unsqueeze", [x, self.const([0])])

    def resize(self, x, scales="", sizes="", **attrs) -> str:
        if self.opset < 10:
            return self.node("Upsample", [x, scales], mode=attrs.get("mode", "nearest"))
        if self.opset == 10:
            return self.node("Resize", [x, scales], mode=attrs.get("mode", "nearest"))
        roi = self.const(np.zeros(0), np.float32) if self.opset < 13 else ""
        if sizes and self.opset < 13:  # roi and scales are required inputs of Resize-11: empty tensors
            scales = self.const(np.zeros(0), np.float32)
        return self.node("Resize", [x, roi, scales, sizes][: 4 if sizes else 3], **attrs)

    def conv(self, x, cin, cout, pads=1, seed=0) -> str:
        rng = np.random.default_rng(seed)
        w, b = f"w{self.n}", f"b{self.n}"
        self.inits += [numpy_helper.from_array(rng.standard_normal((cout, cin, 3, 3)).astype(np.float32), w),
                       numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), b)]
        return self.node("Conv", [x, w, b], pads=[pads] * 4)

    def model(self, inputs: dict, output: str):
        vis = [helper.make_tensor_value_info(k, TensorProto.FLOAT, dims) for k, dims in inputs.items()]
        out = helper.make_tensor_value_info(output, TensorProto.FLOAT, None)
        graph = helper.make_graph(self.nodes, "g", vis, [out], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 7 if self.opset < 15 else 8
        return model


def fixed_sizes(opset, mode=NEAREST, dims=(1, 4, 8, 8)):
    """``F.interpolate(x, size=(16, 16))``: ``Concat(Slice(Shape(x), 0, 2), Constant[16, 16])``."""
    g = _Graph(opset)
    sizes = g.node("Concat", [g.slice(g.node("Shape", ["x"]), 0, 2), g.const([16, 16])], axis=0)
    return g.model({"x": list(dims)}, g.conv(g.resize("x", sizes=sizes, **mode), 4, 3))


def skip_sizes(opset, skip=(1, 3, 16, 16), x=(1, 4, 8, 8)):
    """``F.interpolate(x, size=skip.shape[2:])`` then a Conv and the skip connection added."""
    g = _Graph(opset)
    nc = g.slice(g.node("Shape", ["x"]), 0, 2)
    hw = g.node("Cast", [g.slice(g.node("Shape", ["skip"]), 2, 4)], to=TensorProto.INT64)
    up_ = g.resize("x", sizes=g.node("Concat", [nc, hw], axis=0), **NEAREST)
    return g.model({"x": list(x), "skip": list(skip)}, g.node("Add", [g.conv(up_, 4, 3), "skip"]))


def doubled_sizes(opset, mode=NEAREST, how="float", dims=SYMBOLIC):
    """Sizes twice the input's own lengths: ``recompute_scale_factor`` (float), an integer Mul, one
    Gather per axis, Shape's start/end; opset 18 also with ``axes=[2, 3]`` and two sizes."""
    g = _Graph(opset)
    shape = g.node("Shape", ["x"]) if how != "shape_attr" else None
    if how == "float":
        hw = g.node("Cast", [g.slice(shape, 2, 4)], to=TensorProto.FLOAT)
        hw = g.node("Floor", [g.node("Mul", [hw, g.const(2.0, np.float32)])])
        hw = g.node("Cast", [hw], to=TensorProto.INT64)
    elif how == "gather":
        hw = g.node("Concat", [g.unsqueeze(g.node("Mul", [g.node("Gather", [shape, g.const(a)], axis=0), g.const(2)]))
                               for a in (2, 3)], axis=0)
    elif how == "shape_attr":  # Shape-15 start/end, as the dynamo exporter writes sym_size
        hw = g.node("Mul", [g.node("Shape", ["x"], start=2), g.const([2])])
    else:
        hw = g.node("Mul", [g.slice(shape, 2, 4), g.const([2])])
    if how == "shape_attr":
        up_ = g.resize("x", sizes=g.node("Concat", [g.node("Shape", ["x"], end=-2), hw], axis=0), **mode)
    elif how == "axes":
        up_ = g.resize("x", sizes=hw, axes=[2, 3], **mode)
    else:
        up_ = g.resize("x", sizes=g.node("Concat", [g.slice(shape, 0, 2), hw], axis=0), **mode)
    return g.model({"x": dims}, g.conv(up_, 4, 3))


def computed_scales(dims=SYMBOLIC, opset=9):
    """Old PyTorch (Upsample-9, Resize-10): ``scales = Concat([1, 1], Floor(Cast(H) * 2) / Cast(H), ...)``."""
    g = _Graph(opset)
    shape = g.node("Shape", ["x"])
    per_axis = []
    for a in (2, 3):
        length = g.node("Cast", [g.node("Gather", [shape, g.const(a)], axis=0)], to=TensorProto.FLOAT)
        out = g.node("Floor", [g.node("Mul", [length, g.const(2.0, np.float32)])])
        per_axis.append(g.unsqueeze(g.node("Div", [out, length])))
    scales = g.node("Concat", [g.const([1.0, 1.0], np.float32)] + per_axis, axis=0)
    return g.model({"x": dims}, g.conv(g.resize("x", scales=scales), 4, 3))


def _compare(original, converted, shape, extra=None):
    """Max abs difference of the two models in onnxruntime, and a tolerance from the sums involved."""
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
    if extra:
        feeds.update({k: rng.standard_normal(s).astype(np.float32) for k, s in extra.items()})
    ref = session(original).run(None, feeds)[0]
    got = session(converted).run(None, feeds)[0]
    assert got.shape == ref.shape
    # each output sums T = 4 channels x 3x3 taps x (up to 4 interpolation weights) products: rounding
    # grows like sqrt(T) relative to the output's magnitude
    tol = 8 * EPS32 * np.sqrt(4 * 9 * 4) * max(1.0, float(np.max(np.abs(ref))))
    return float(np.max(np.abs(got - ref))), tol


def _convert_everywhere(model, shapes, compare_at, extra=None, removed=("Shape",)):
    for to in TARGETS:
        result = up.convert(model, to=to, shapes=shapes)
        report = result.report
        assert report.verified and not report.refused, [s.reason for s in report.refused]
        if to == "resize" or to == "fastest" and not report.rewritten:  # already in form, or fastest as it is
            assert all(s.status == "skipped" for s in report.sites)
            continue
        assert len(report.rewritten) == 1
        ops = {n.op_type for n in result.model.graph.node}
        assert not ops & {"Resize", "Upsample", *removed}, ops  # the shape computation went with the Resize
        for shape in compare_at:
            err, tol = _compare(model, result.model, shape, extra)
            assert err <= tol, (to, shape, err, tol)


@pytest.mark.parametrize("opset", [11, 13, 17, 18])
def test_fixed_sizes_on_a_static_model_fold_to_scale_2(opset):
    model = fixed_sizes(opset)
    (site,), _ = find_sites(model)
    assert [a.stride for a in site.axes] == [2, 2]
    _convert_everywhere(model, None, [(1, 4, 8, 8)])


@pytest.mark.parametrize("opset", [11, 17])
def test_fixed_sizes_linear_before_padded_conv_rewrite_the_resize_alone(opset):
    model = fixed_sizes(opset, LINEAR)
    (site,), _ = find_sites(model)
    assert site.node.startswith("Resize") and site.pre_pad == (1, 1, 1, 1)
    for to in ("subpixel", "convtranspose"):
        result = up.convert(model, to=to)
        assert result.report.verified and len(result.report.rewritten) == 1
        assert {"Conv", "Pad"} <= {n.op_type for n in result.model.graph.node}
        assert not {"Resize", "Shape"} & {n.op_type for n in result.model.graph.node}
        err, tol = _compare(model, result.model, (1, 4, 8, 8))
        assert err <= tol


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_sizes_from_a_static_skip_connection(opset):
    model = skip_sizes(opset)
    (site,), _ = find_sites(model)
    assert [a.stride for a in site.axes] == [2, 2]
    _convert_everywhere(model, None, [(1, 4, 8, 8)], extra={"skip": (1, 3, 16, 16)})


def test_skip_scale_need_not_be_2():
    model = skip_sizes(13, skip=(1, 3, 24, 16))
    (site,), _ = find_sites(model)
    assert [a.stride for a in site.axes] == [3, 2]
    result = up.convert(model, to="convtranspose")
    assert result.report.verified and len(result.report.rewritten) == 1


@pytest.mark.parametrize("opset,how", [(11, "float"), (13, "int"), (13, "gather"), (17, "float"), (18, "axes"),
                                       (18, "gather"), (18, "shape_attr")])
def test_doubled_own_lengths_on_a_symbolic_model_stay_symbolic(opset, how):
    model = doubled_sizes(opset, how=how)
    (site,), refusals = find_sites(model)
    assert not refusals and [a.stride for a in site.axes] == [2, 2] and site.input_lengths == (None, None)
    _convert_everywhere(model, {"x": (1, 4, 8, 8)}, [(1, 4, 8, 8), (2, 4, 5, 11)])


def test_doubled_lengths_linear_resize_alone_on_a_symbolic_model():
    model = doubled_sizes(17, LINEAR, how="int")
    result = up.convert(model, to="convtranspose", shapes={"x": (1, 4, 8, 8)})
    assert result.report.verified and len(result.report.rewritten) == 1
    for shape in [(1, 4, 8, 8), (3, 4, 7, 4)]:
        err, tol = _compare(model, result.model, shape)
        assert err <= tol


@pytest.mark.parametrize("opset", [9, 10])
@pytest.mark.parametrize("dims", [SYMBOLIC, [1, 4, 8, 8]])
def test_scales_computed_from_the_input_length(dims, opset):
    model = computed_scales(dims, opset)
    (site,), _ = find_sites(model)
    assert [a.stride for a in site.axes] == [2, 2]
    shapes = {"x": (1, 4, 8, 8)} if dims == SYMBOLIC else None
    at = [(1, 4, 8, 8), (2, 4, 6, 3)] if dims == SYMBOLIC else [(1, 4, 8, 8)]
    _convert_everywhere(model, shapes, at)


def test_sizes_from_a_dynamic_other_tensor_are_refused_naming_it():
    model = skip_sizes(13, skip=["N", 3, "H2", "W2"], x=SYMBOLIC)
    sites, (refusal,) = find_sites(model)
    assert not sites
    assert "'skip'" in refusal.reason and "not an integer multiple" in refusal.reason, refusal.reason
    result = up.convert(model, shapes={"x": (1, 4, 8, 8), "skip": (1, 3, 16, 16)})
    assert result.report.verified and len(result.report.refused) == 1 and not result.report.rewritten


def test_fixed_sizes_on_symbolic_lengths_are_refused():
    _, (refusal,) = find_sites(fixed_sizes(13, dims=SYMBOLIC))
    assert "fixed while dim 2 of the Resize input 'x' is symbolic" in refusal.reason, refusal.reason


def test_a_non_integer_multiple_is_refused():
    g = _Graph(13)
    shape = g.node("Shape", ["x"])
    hw = g.node("Add", [g.node("Mul", [g.slice(shape, 2, 4), g.const([2])]), g.const([1])])
    sizes = g.node("Concat", [g.slice(shape, 0, 2), hw], axis=0)
    model = g.model({"x": SYMBOLIC}, g.conv(g.resize("x", sizes=sizes, **NEAREST), 4, 3))
    _, (refusal,) = find_sites(model)
    assert "2·dim 2 of 'x' + 1 is not an integer multiple" in refusal.reason, refusal.reason


def test_a_shape_read_elsewhere_stays():
    """The Shape also feeds a Reshape: only the nodes nothing else reads go with the Resize."""
    model = doubled_sizes(13, how="int")
    shape = next(n for n in model.graph.node if n.op_type == "Shape").output[0]
    model.graph.node.append(helper.make_node("Reshape", ["x", shape], ["x_again"], name="keep"))
    model.graph.output.append(helper.make_tensor_value_info("x_again", TensorProto.FLOAT, None))
    result = up.convert(model, to="convtranspose", shapes={"x": (1, 4, 8, 8)})
    assert result.report.verified and len(result.report.rewritten) == 1
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Shape") == 1 and "Concat" not in ops and "Resize" not in ops, ops


def test_nhwc_lengths_are_followed_through_the_transpose():
    """tf2onnx: ``tf.image.resize(x, tf.shape(x)[1:3] * 2)`` resizes ``Transpose(x_nhwc)`` by sizes
    computed from ``Shape(x_nhwc)``; a Relu between them keeps the lengths."""
    g = _Graph(13)
    nchw = g.node("Transpose", [g.node("Relu", ["x"])], perm=[0, 3, 1, 2])
    hw = g.node("Mul", [g.slice(g.node("Shape", ["x"]), 1, 3), g.const([2])])
    sizes = g.node("Concat", [g.slice(g.node("Shape", [nchw]), 0, 2), hw], axis=0)
    model = g.model({"x": ["N", "H", "W", 4]}, g.conv(g.resize(nchw, sizes=sizes, **NEAREST), 4, 3))
    (site,), _ = find_sites(model)
    assert [a.stride for a in site.axes] == [2, 2]
    result = up.convert(model, to="convtranspose", shapes={"x": (1, 8, 8, 4)})
    assert result.report.verified and len(result.report.rewritten) == 1
    for shape in [(1, 8, 8, 4), (2, 5, 3, 4)]:
        err, tol = _compare(model, result.model, shape)
        assert err <= tol
    model.graph.node[1].attribute[0].ints[:] = [0, 3, 2, 1]  # H and W swapped: not its own lengths
    _, (refusal,) = find_sites(model)
    assert "2·dim 1 of 'x' is not an integer multiple of dim 2 of the Resize input 'transpose2' (dim 2 of 'x')" \
        in refusal.reason, refusal.reason


def test_evaluate_tracks_multiples_of_symbolic_lengths():
    model = doubled_sizes(13, how="gather")
    index = GraphIndex(model, infer_static_shapes(model))
    sizes = next(n for n in model.graph.node if n.op_type == "Resize").input[3]
    values = evaluate(index, sizes).flat()
    assert values == [Affine.of_dim("x", 0), Affine(4), Affine.of_dim("x", 2).scaled(2), Affine.of_dim("x", 3).scaled(2)]
    assert values[2].ratio(Affine.of_dim("x", 2)) == 2 and values[2].ratio(Affine.of_dim("x", 3)) is None


def _random_chain(rng, g: _Graph) -> str:
    """A random Shape computation on ``x``: slices, gathers, integer and float arithmetic."""
    v = g.node("Shape", ["x"])
    for _ in range(rng.integers(1, 5)):
        step = rng.choice(["slice", "gather", "int", "float", "div", "concat"])
        if step == "slice":
            v = g.slice(v, int(rng.integers(-5, 3)), int(rng.choice([-1, 2, 3, 4, 9])))
        elif step == "gather":
            v = g.unsqueeze(g.node("Gather", [v, g.const(int(rng.choice([0, -1])))], axis=0))
        elif step == "int":
            v = g.node(str(rng.choice(["Mul", "Add", "Sub"])), [v, g.const([int(rng.integers(-2, 4))])])
        elif step == "float":
            f = g.node("Mul", [g.node("Cast", [v], to=TensorProto.FLOAT), g.const(float(rng.choice([0.5, 2.0, 1.5])),
                                                                                  np.float32)])
            v = g.node("Cast", [g.node(str(rng.choice(["Floor", "Ceil"])), [f])], to=TensorProto.INT64)
        elif step == "div":
            v = g.node("Div", [v, g.const([int(rng.choice([1, 2, 3]))])])
        else:
            v = g.node("Concat", [v, g.const([int(rng.integers(1, 9))])], axis=0)
    return v


@pytest.mark.parametrize("seed", range(30))
def test_evaluate_agrees_with_onnxruntime(seed):
    """Every element the evaluation follows equals what onnxruntime computes, at two input sizes
    (symbolic lengths substituted); the elements it cannot follow are the ones left unknown."""
    rng = np.random.default_rng(seed)
    g = _Graph(13)
    out = _random_chain(rng, g)
    model = g.model({"x": ["N", 3, "H", "W"] if seed % 2 else [2, 3, 5, 7]}, out)
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.INT64
    index = GraphIndex(model, infer_static_shapes(model))
    try:
        values = evaluate(index, out).flat()
    except Exception as exc:  # noqa: BLE001 - only NotConstant is allowed out
        assert type(exc).__name__ == "NotConstant", exc
        return
    if not seed % 2:  # static: everything folds to numbers
        assert all(isinstance(v, Affine) and v.is_const for v in values), values
    for shape in [(2, 3, 5, 7), (1, 3, 9, 4)] if seed % 2 else [(2, 3, 5, 7)]:
        got = session(model).run(None, {"x": np.zeros(shape, np.float32)})[0].ravel()
        assert len(got) == len(values)
        for v, n in zip(values, got):
            if isinstance(v, Affine):
                assert v.const + sum(c * shape[a] for (_, a), c in v.terms) == n, (v, n, shape)


def test_lengths_inference_misses_are_measured_on_a_static_model():
    """``skip`` goes through a Reshape by its own Shape: onnx inference (without data propagation)
    leaves its lengths unknown, the reference run measures them and the chain folds."""
    g = _Graph(13)
    skip = g.node("Reshape", ["skip", g.node("Shape", ["skip"])])
    nc = g.slice(g.node("Shape", ["x"]), 0, 2)
    sizes = g.node("Concat", [nc, g.slice(g.node("Shape", [skip]), 2, 4)], axis=0)
    up_ = g.resize("x", sizes=sizes, **NEAREST)
    model = g.model({"x": [1, 4, 8, 8], "skip": [1, 3, 16, 16]}, g.node("Add", [g.conv(up_, 4, 3), skip]))
    index = GraphIndex(model, infer_static_shapes(model))
    assert None in index.static_shapes.get(skip, (None,))  # inference: the fold needs the measurement
    _, (refusal,) = find_sites(model)
    assert f"'{skip}'" in refusal.reason, refusal.reason
    for to in ("subpixel", "convtranspose"):
        result = up.convert(model, to=to)
        assert result.report.verified and len(result.report.rewritten) == 1, result.report.refused
        err, tol = _compare(model, result.model, (1, 4, 8, 8), {"skip": (1, 3, 16, 16)})
        assert err <= tol
