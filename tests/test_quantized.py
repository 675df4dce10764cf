"""QDQ models: integer weights stay integer through every rearranging rewrite.

Sites whose weights arrive through ``DequantizeLinear`` (per tensor, or per channel on axis 1 as
onnxruntime's quantizer writes for ConvTranspose) become sub-pixel / masked-Resize Convs reading
rearranged int8 weights through a new ``DequantizeLinear``; the result is verified in onnxruntime
against the original QDQ model.  Forms that change integer values are refused with the reason.
"""

from __future__ import annotations

import random

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import onnx_uprewrite as up
from onnx_uprewrite.weights import (
    QuantizedWeight, gather_map, rearrange_quantized, subpixel_weight, transposed_to_conv_weight,
)
from sweep import Config, random_config

N_SITES = 160


def _qdq_model(configs, per_channel: list[bool], seed: int):
    """One QDQ model with a quantized ConvTranspose per config: x -> Q -> DQ -> ConvTranspose(DQ(int8 W),
    DQ(int32 b)) -> Q -> DQ -> y."""
    rng = np.random.default_rng(seed)
    nodes, inits, inputs, outputs, feeds = [], [], [], [], {}

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    x_scale, x_zp = np.float32(0.02), np.uint8(128)
    for i, (c, pc) in enumerate(zip(configs, per_channel)):
        cog = c.c_out // c.group
        wq = rng.integers(-127, 128, (c.c_in, cog) + c.kernel).astype(np.int8)
        if pc:
            w_scale = rng.uniform(0.005, 0.02, cog).astype(np.float32)
            w_zp = np.zeros(cog, np.int8)
        else:
            w_scale, w_zp = np.float32(rng.uniform(0.005, 0.02)), np.int8(0)
        sx = [const(f"xs{i}", x_scale), const(f"xz{i}", x_zp)]
        nodes += [helper.make_node("QuantizeLinear", [f"x{i}", *sx], [f"xq{i}"], name=f"qx{i}"),
                  helper.make_node("DequantizeLinear", [f"xq{i}", *sx], [f"xd{i}"], name=f"dqx{i}")]
        nodes.append(helper.make_node("DequantizeLinear", [const(f"wq{i}", wq), const(f"ws{i}", w_scale),
                                                           const(f"wz{i}", w_zp)], [f"w{i}"], name=f"dqw{i}",
                                      **({"axis": 1} if pc else {})))
        ins = [f"xd{i}", f"w{i}"]
        if c.bias:
            b_scale = (x_scale * np.tile(np.atleast_1d(w_scale), c.group)).astype(np.float32)
            if not pc:
                b_scale = np.float32(x_scale * w_scale)
            bq = rng.integers(-2000, 2000, c.c_out).astype(np.int32)
            nodes.append(helper.make_node(
                "DequantizeLinear", [const(f"bq{i}", bq), const(f"bs{i}", b_scale)], [f"b{i}"], name=f"dqb{i}",
                **({"axis": 0} if pc else {})))
            ins.append(f"b{i}")
        nodes.append(helper.make_node("ConvTranspose", ins, [f"ct{i}_out"], name=f"ct{i}", **c.attrs()))
        sy = [const(f"ys{i}", np.float32(0.05)), const(f"yz{i}", np.uint8(128))]
        nodes += [helper.make_node("QuantizeLinear", [f"ct{i}_out", *sy], [f"yq{i}"], name=f"qy{i}"),
                  helper.make_node("DequantizeLinear", [f"yq{i}", *sy], [f"y{i}"], name=f"dqy{i}")]
        shape = [c.batch, c.c_in, *c.lengths]
        inputs.append(helper.make_tensor_value_info(f"x{i}", onnx.TensorProto.FLOAT, shape))
        outputs.append(helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, None))
        feeds[f"x{i}"] = rng.standard_normal(shape).astype(np.float32)
    graph = helper.make_graph(nodes, "qdq_sweep", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7), feeds


def _int8_weights(model) -> bool:
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose"):
            dq = producer.get(node.input[1])
            if dq is None or dq.op_type != "DequantizeLinear" or inits[dq.input[0]].data_type != onnx.TensorProto.INT8:
                return False
    return True


@pytest.mark.parametrize("to", ["subpixel", "resize"])
def test_qdq_convtranspose_sweep_keeps_int8_weights(to):
    rng = random.Random(7)
    configs = [random_config(rng, allow_symbolic=False) for _ in range(N_SITES)]
    # per channel on axis 1 when the ConvTranspose is not grouped (onnxruntime's own quantizer
    # cannot quantize grouped ConvTranspose per channel)
    per_channel = [c.group == 1 and rng.random() < 0.5 for c in configs]
    model, feeds = _qdq_model(configs, per_channel, seed=3)
    result = up.convert(model, to=to, inputs=feeds)
    report = result.report
    assert report.verified, report.verification
    assert not report.refused, [s.reason for s in report.refused]
    assert "ConvTranspose" not in report.ops_after
    assert _int8_weights(result.model)
    if to == "subpixel":  # no float tensor of rank > 1 was added: weights stay int8
        assert not [t.name for t in result.model.graph.initializer
                    if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 1]
    worst = max(o.ratio for o in report.outputs)
    print(f"\nQDQ ConvTranspose -> {to}: {N_SITES} sites ({sum(per_channel)} per channel), worst error/tolerance "
          f"{worst:.3g}")


def test_quantized_subpixel_back_to_convtranspose_keeps_int8():
    """Per-tensor QDQ sub-pixel Conv (equal bias per phase) -> ConvTranspose with int8 weights."""
    rng = random.Random(11)
    configs = [random_config(rng, allow_symbolic=False) for _ in range(30)]
    model, feeds = _qdq_model(configs, [False] * len(configs), seed=5)
    sub = up.convert(model, to="subpixel", inputs=feeds).model
    back = up.convert(sub, to="convtranspose", inputs=feeds)
    assert back.report.verified and not back.report.refused, [s.reason for s in back.report.refused]
    assert _int8_weights(back.model)
    assert "DepthToSpace" not in back.report.ops_after


def test_per_channel_subpixel_to_convtranspose_is_refused_with_reason():
    """Per-channel Conv scales differ across the phases of a channel: no per-channel ConvTranspose."""
    rng = np.random.default_rng(0)
    vq = rng.integers(-127, 128, (8, 2, 3, 3)).astype(np.int8)
    nodes = [
        helper.make_node("DequantizeLinear", ["vq", "vs", "vz"], ["v"], name="dqv", axis=0),
        helper.make_node("Conv", ["x", "v"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("DepthToSpace", ["c"], ["y"], name="d2s", blocksize=2, mode="CRD"),
    ]
    inits = [numpy_helper.from_array(vq, "vq"),
             numpy_helper.from_array(rng.uniform(0.01, 0.02, 8).astype(np.float32), "vs"),
             numpy_helper.from_array(np.zeros(8, np.int8), "vz")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", 1, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    report = up.convert(model, to="convtranspose").report
    assert report.verified and len(report.refused) == 1
    assert "per-channel scales of DequantizeLinear 'dqv'" in report.refused[0].reason


def test_resize_conv_with_int8_conv_weights_is_refused_with_reason():
    """R1 sums kernel taps (box ⊛ V): integer values would change, so the site is refused."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Resize", ["x", "", "scales"], ["u"], name="up", mode="nearest"),
        helper.make_node("DequantizeLinear", ["vq", "vs"], ["v"], name="dqv"),
        helper.make_node("Conv", ["u", "v"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(rng.integers(-127, 128, (3, 2, 3, 3)).astype(np.int8), "vq"),
             numpy_helper.from_array(np.float32(0.01), "vs")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", 1, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    report = up.convert(model, to="subpixel").report
    assert report.verified and len(report.refused) == 1
    assert "DequantizeLinear 'dqv'" in report.refused[0].reason and "integer values" in report.refused[0].reason


# ---------------------------------------------------------------------------------------------
# the weight math: gather maps and quantized rearrangement


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=3, max_size=5), st.integers(0, 2**32 - 1))
def test_gather_map_recognises_moves_and_rejects_arithmetic(shape, seed):
    shape = tuple(shape)
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape)
    perm = rng.permutation(len(shape))

    def moved(a):
        return np.pad(np.flip(a, -1).transpose(perm), 1)

    m = gather_map(moved, shape)
    assert m is not None
    assert np.array_equal(np.where(m >= 0, w.reshape(-1)[np.maximum(m, 0)], 0.0), moved(w))
    assert gather_map(lambda a: a + np.flip(a, -1) if shape[-1] > 1 else a * 2, shape) is None
    assert gather_map(lambda a: a.sum(axis=0, keepdims=True), shape) is None or shape[0] == 1


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 5), st.integers(1, 4),
       st.booleans(), st.integers(0, 2**32 - 1))
def test_rearranged_int8_weight_dequantizes_to_the_rearranged_float_weight(group, cig, cog, k, s, pc, seed):
    """subpixel(dequantize(q)) == dequantize(rearranged q), structural zeros included."""
    from onnx_uprewrite.weights import Axis, plan_subpixel_axis

    rng = np.random.default_rng(seed)
    shape = (group * cig, cog, k, k)
    q = rng.integers(-127, 128, shape).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, cog if pc else 1).astype(np.float32)
    zp = rng.integers(-5, 5, scale.shape).astype(np.int8)
    quant = QuantizedWeight(q, scale if pc else scale.reshape(()), zp if pc else zp.reshape(()), 1 if pc else None,
                            "dq")

    def dequant(qw, axis_len_shape):
        sc = qw.scale if qw.axis is None else qw.scale.reshape(
            [-1 if a == qw.axis else 1 for a in range(qw.values.ndim)])
        z = 0 if qw.zero_point is None else (qw.zero_point if qw.axis is None else qw.zero_point.reshape(sc.shape))
        return (qw.values.astype(np.int32) - z).astype(np.float32) * sc

    plans = tuple(plan_subpixel_axis(Axis(s, 1, k, rng.integers(0, k + 1), 0)) for _ in range(2))
    for transform, axis in ((lambda w: subpixel_weight(w, group, plans), 0),
                            (lambda w: transposed_to_conv_weight(w, group), 0)):
        out = rearrange_quantized(quant, transform, axis)
        assert out.values.dtype == np.int8
        assert np.array_equal(dequant(out, None), transform(dequant(quant, None)))


def test_quantized_output_allows_one_step_and_says_so():
    """A wide int8 layer: float sums reordered by the rewrite may round a value that sits on a
    half step either way; outputs read through DequantizeLinear allow exactly one step."""
    config = Config(2, (24, 24), (2, 2), (4, 4), (1, 1), 1, 64, 64, (1, 1, 1, 1), (0, 0), "NOTSET", None,
                    True, 1, False)
    model, feeds = _qdq_model([config], [True], seed=8)
    report = up.convert(model, to="subpixel", inputs=feeds).report
    assert report.verified
    assert "one quantization step for outputs read through DequantizeLinear (y0)" in report.tolerance
    step = 0.05  # the output scale _qdq_model writes
    assert report.outputs[0].tolerance >= step and report.outputs[0].max_abs_error <= step * 1.0001
