"""Unsqueeze -> Tile -> Reshape repeats (Keras/tf2onnx UpSampling) [-> Transpose] + Conv -> canonical
site: a randomized sweep checked in onnxruntime, and the patterns that must not match."""

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


def _repeat_nodes(i, x, shape, axis, s, opset, inits, tile_instead=False):
    """``x[j // s]`` along ``axis`` as tf2onnx writes it (or, with ``tile_instead``, ``x[j % L]``)."""
    u = axis + 1 if not tile_instead else axis
    reps = [1] * (len(shape) + 1)
    reps[u] = s
    out_shape = list(shape)
    out_shape[axis] *= s
    names = [f"{x}_ax", f"{x}_reps", f"{x}_shape"]
    inits += [numpy_helper.from_array(np.array(reps, np.int64), names[1]),
              numpy_helper.from_array(np.array(out_shape, np.int64), names[2])]
    if opset >= 13:
        inits.append(numpy_helper.from_array(np.array([u], np.int64), names[0]))
        unsq = helper.make_node("Unsqueeze", [x, names[0]], [f"{x}_u"], name=f"{x}_unsq")
    else:
        unsq = helper.make_node("Unsqueeze", [x], [f"{x}_u"], name=f"{x}_unsq", axes=[u])
    y = f"{x}_r"
    return [unsq, helper.make_node("Tile", [f"{x}_u", names[1]], [f"{x}_t"], name=f"{x}_tile"),
            helper.make_node("Reshape", [f"{x}_t", names[2]], [y], name=f"{x}_reshape")], y, out_shape


def _batch(n, opset, seed):
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    nodes, inits, inputs, outputs, feeds, terms = [], [], [], [], {}, []
    for i in range(n):
        rank = rng.choice([1, 2, 2, 3])
        lengths = [rng.randint(1, 4) for _ in range(rank)]
        c_in, group = rng.randint(1, 3), 1
        if rng.random() < 0.3:
            group = c_in
        c_out = group * rng.randint(1, 2) if group > 1 else rng.randint(1, 3)
        channels_last = rng.random() < 0.6
        shape = [1, *lengths, c_in] if channels_last else [1, c_in, *lengths]
        x = f"x{i}"
        inputs.append(helper.make_tensor_value_info(x, 1, shape))
        feeds[x] = nrng.standard_normal(shape).astype(np.float32)
        spatial = list(range(1, 1 + rank)) if channels_last else list(range(2, 2 + rank))
        cur, cur_shape = x, list(shape)
        for axis in rng.sample(spatial, rng.randint(1, rank)):
            for _ in range(rng.choice([1, 1, 2])):  # the same axis twice: repeats multiply
                s = rng.randint(2, 3)
                more, cur, cur_shape = _repeat_nodes(f"{i}_{len(nodes)}", cur, cur_shape, axis, s, opset, inits)
                nodes += more
        if channels_last:
            perm = [0, rank + 1, *range(1, rank + 1)]
            nodes.append(helper.make_node("Transpose", [cur], [f"t{i}"], name=f"tr{i}", perm=perm))
            cur = f"t{i}"
            cur_shape = [cur_shape[p] for p in perm]
        kernel = [rng.randint(1, 3) for _ in range(rank)]
        dil = [rng.choice([1, 1, 2]) for _ in range(rank)]
        pads = [rng.randint(0, (k - 1) * d) for k, d in zip(kernel, dil) for _ in (0,)]
        pads = pads + [rng.randint(0, (k - 1) * d) for k, d in zip(kernel, dil)]
        if any(n + pads[a] + pads[rank + a] - (k - 1) * d < 1
               for a, (n, k, d) in enumerate(zip(cur_shape[2:], kernel, dil))):
            pads = [(k - 1) * d for k, d in zip(kernel, dil)] * 2
        w = nrng.standard_normal((c_out, c_in // group, *kernel)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        ins = [cur, f"w{i}"]
        if rng.random() < 0.5:
            inits.append(numpy_helper.from_array(nrng.standard_normal(c_out).astype(np.float32), f"b{i}"))
            ins.append(f"b{i}")
        nodes.append(helper.make_node("Conv", ins, [f"y{i}"], name=f"conv{i}", pads=pads, dilations=dil, group=group))
        outputs.append(helper.make_tensor_value_info(f"y{i}", 1, None))
        terms.append((c_in // group) * math.prod(kernel) * 27)
    graph = helper.make_graph(nodes, "sweep", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8 if opset >= 13 else 6)
    return model, feeds, terms




@pytest.fixture(scope="module")
def stats():
    ratios = {}
    yield ratios
    if ratios:
        print("\nfrom_repeat_conv sweep: " + ", ".join(f"to {k} {len(v)} sites, worst error/tolerance {max(v):.4f}"
                                                      for k, v in sorted(ratios.items())))


@pytest.mark.parametrize("batch", range(10))
def test_repeat_conv_sweep_matches_onnxruntime(batch, stats):
    opset = (11, 13, 17, 19)[batch % 4]
    model, feeds, terms = _batch(100, opset, seed=500 + batch)
    ref = _run(model, feeds)
    for to in ("subpixel", "convtranspose", "resize"):
        result = up.convert(model, to=to, verify=False)
        assert not result.report.refused, [s.reason for s in result.report.refused][:3]
        assert len(result.report.rewritten) == 100
        assert not {"Tile", "Unsqueeze"} & set(result.report.ops_after)
        got = _run(result.model, feeds)
        for i, t in enumerate(terms):
            r = ref[f"y{i}"]
            tol = 8 * EPS32 * math.sqrt(t) * max(float(np.abs(r).max()), 1e-30)
            err = float(np.abs(got[f"y{i}"].astype(np.float64) - r).max())
            assert got[f"y{i}"].shape == r.shape and err <= tol, (to, i, err, tol)
            stats.setdefault(to, []).append(err / tol)


def _one(tile_instead=False, channels_last=True, extra_reader=False):
    inits = []
    shape = [1, 5, 6, 3] if channels_last else [1, 3, 5, 6]
    axis = 1 if channels_last else 2
    nodes, y, out_shape = _repeat_nodes("a", "x", shape, axis, 2, 17, inits, tile_instead=tile_instead)
    if channels_last:
        nodes.append(helper.make_node("Transpose", [y], ["t"], name="tr", perm=[0, 3, 1, 2]))
        y = "t"
    inits.append(numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w"))
    nodes.append(helper.make_node("Conv", [y, "w"], ["y"], name="conv", pads=[1, 1, 1, 1]))
    outputs = [helper.make_tensor_value_info("y", 1, None)]
    if extra_reader:
        nodes.append(helper.make_node("Relu", [y], ["r"], name="relu"))
        outputs.append(helper.make_tensor_value_info("r", 1, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, shape)], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_keras_upsampling_is_a_nearest_site_read_through_the_transpose():
    (site,), _ = find_sites(_one())
    assert site.source == "repeat" and site.pre_perm == (0, 3, 1, 2)
    assert [(a.stride, a.kernel) for a in site.axes] == [(2, 4), (1, 3)]
    result = up.convert(_one(), to="convtranspose")
    assert [n.op_type for n in result.model.graph.node] == ["Transpose", "ConvTranspose"]
    assert result.report.verified


def test_tile_that_does_not_repeat_is_not_nearest():
    # Unsqueeze before the axis + Tile + Reshape merging into the axis after: x[j % L], a tiling
    model = _one(tile_instead=True, channels_last=False)
    sites, refusals = find_sites(model)
    assert not sites and "does not merge the tiled axis" in refusals[0].reason
    assert up.convert(model).report.verified  # left alone, model unchanged


def test_repeat_read_elsewhere_stays():
    result = up.convert(_one(extra_reader=True), to="convtranspose")
    ops = [n.op_type for n in result.model.graph.node]
    assert "Tile" in ops and "ConvTranspose" in ops and "Relu" in ops
    assert result.report.verified
