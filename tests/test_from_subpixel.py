"""Sub-pixel Conv -> depth-to-space [-> Slice] parsed as a transposed convolution (DESIGN.md R2).

A randomized sweep of Conv -> DepthToSpace (DCR / CRD / mode absent) or Reshape -> Transpose ->
Reshape pixel shuffles (any split order of the channel axis) [-> Slice], many sites per model,
rewritten to ConvTranspose and to Resize + Conv and checked in onnxruntime against the original;
the structure of the DESIGN.md ESPCN example; refusals; and the round trip ConvTranspose ->
sub-pixel -> ConvTranspose, which must give back the original kernel.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_uprewrite as up
from conftest import node_attrs as _attrs, run_model as _run
from onnx_uprewrite.api import _measure, find_sites
from onnx_uprewrite.verify import run_rewritten, session
from sweep import batch_model, random_config

EPS32 = float(np.finfo(np.float32).eps)
INT64_MAX = int(np.iinfo(np.int64).max)
IR = {9: 4, 11: 6, 13: 8, 17: 8, 18: 8}
OPSETS = (9, 11, 13, 17)
BATCHES = 11
PER_BATCH = 100  # 11 * 100 = 1,100 sites, each rewritten to two targets




def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]




def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _find(model: onnx.ModelProto, shapes=None):
    """find_sites with the tensor shapes measured in onnxruntime, as convert() does: the
    Reshape-Transpose-Reshape split is read from measured shapes (shape inference runs on a
    weightless copy, so the Reshape shape constants are unknown to it)."""
    captured = _measure(model, None, shapes, 0, required=True)[2]
    return find_sites(model, shapes, {k: tuple(v.shape) for k, v in captured.items()})


def _conv_channel(order, channels: int, strides, c: int, phase) -> int:
    """Conv output channel that a depth-to-space splitting the channel axis as ``order`` sends to
    output channel ``c``, phase ``phase`` (written out independently of the parser)."""
    sizes = [channels if f == "c" else strides[f] for f in order]
    index = [c if f == "c" else phase[f] for f in order]
    return int(np.ravel_multi_index(index, sizes))


def _expected_kernel(v: np.ndarray, group: int, strides, dilations, order) -> np.ndarray:
    """Dense ConvTranspose kernel [Cin, C, K...] (group 1) of Conv(V) -> depth-to-space, by R2:
    ``W[ci, c, s*dc*(Ks-1-j) + r] = V[channel(c, r), ci, j]``."""
    c_conv, cig = v.shape[:2]
    ks = v.shape[2:]
    n_phase = math.prod(strides)
    channels = c_conv // n_phase
    kernel = tuple(s * (d * (k - 1) + 1) for s, d, k in zip(strides, dilations, ks))
    w = np.zeros((cig * group, channels) + kernel, np.float64)
    per_group = c_conv // group
    for c in range(channels):
        for phase in np.ndindex(*strides):
            oc = _conv_channel(order, channels, strides, c, phase)
            g = oc // per_group
            for j in np.ndindex(*ks):
                k = tuple(s * d * (kk - 1 - jj) + r for s, d, kk, jj, r in zip(strides, dilations, ks, j, phase))
                w[(slice(g * cig, (g + 1) * cig), c) + k] = v[(oc, slice(None)) + j]
    return w


def _dense_of(weight: np.ndarray, group: int) -> np.ndarray:
    """Grouped ConvTranspose kernel [Cin, Cout/g, K...] -> block-diagonal dense [Cin, Cout, K...]."""
    if group == 1:
        return weight
    c_in, cog = weight.shape[:2]
    cig = c_in // group
    dense = np.zeros((c_in, cog * group) + weight.shape[2:], weight.dtype)
    for g in range(group):
        dense[g * cig:(g + 1) * cig, g * cog:(g + 1) * cog] = weight[g * cig:(g + 1) * cig]
    return dense


# ----------------------------------------------------------------------------------------------
# randomized sweep


def _reshape_shape(dims: list[int], rng: random.Random, zero_ok: tuple[int, ...]) -> list[int]:
    """A Reshape shape for ``dims`` as exporters write it: 0 (copy the input dim) where that is the
    same value, at most one -1."""
    shape = list(dims)
    for i in zero_ok:
        if rng.random() < 0.5:
            shape[i] = 0
    if rng.random() < 0.5:
        free = [i for i, v in enumerate(shape) if v != 0]
        shape[rng.choice(free)] = -1
    return shape


def _low_res_crop(i: int, opset: int, q: list[int], zero_beyond: list[tuple[bool, bool]], rng: random.Random,
                  inits: list):
    """A Pad or Slice of the Conv output c{i} -> k{i} (Real-CUGAN's fast variant crops there), or None.

    ``zero_beyond[a]``: whether Conv output positions added before / after axis a would be zero (no
    bias, pads reaching the kernel's span), so that zero padding is exact there.  Returns
    ``(node, cropped lengths, description)``."""
    if rng.random() >= 0.35:
        return None
    rank = len(q)
    amounts = []
    for n, zero in zip(q, zero_beyond):
        before = rng.randint(0, min(2, n - 1))
        after = rng.randint(0, min(2, n - 1 - before))
        before = rng.randint(1, 2) if zero[0] and rng.random() < 0.3 else -before
        after = rng.randint(1, 2) if zero[1] and rng.random() < 0.3 else -after
        amounts.append((before, after))
    new_q = [n + b + e for n, (b, e) in zip(q, amounts)]
    positive = any(v > 0 for a in amounts for v in a)
    if positive or rng.random() < 0.5:
        mode = "constant" if positive else rng.choice(["constant", "reflect", "edge"])
        pads = [0, 0] + [b for b, _ in amounts] + [0, 0] + [e for _, e in amounts]
        if opset < 11:
            node = helper.make_node("Pad", [f"c{i}"], [f"k{i}"], name=f"lowres{i}", pads=pads, mode=mode,
                                    **({"value": 0.0} if rng.random() < 0.5 else {}))
        else:
            inits.append(numpy_helper.from_array(np.array(pads, np.int64), f"lp{i}"))
            names = [f"c{i}", f"lp{i}"]
            if rng.random() < 0.5:
                inits.append(numpy_helper.from_array(np.array(0.0, np.float32), f"lv{i}"))
                names.append(f"lv{i}")
            node = helper.make_node("Pad", names, [f"k{i}"], name=f"lowres{i}", mode=mode)
        return node, new_q, f"Pad {mode} {amounts}"
    axes = [a for a in range(rank) if amounts[a] != (0, 0) or rng.random() < 0.3] or [0]
    starts = [-amounts[a][0] - (q[a] if rng.random() < 0.3 else 0) for a in axes]  # negative starts too
    ends = []
    for a in axes:
        drop, pick = -amounts[a][1], rng.random()
        if drop and pick < 0.5:
            ends.append(-drop)
        elif pick < 0.8:
            ends.append(q[a] - drop + (rng.randint(0, 3) if not drop else 0))  # absolute, past the end at times
        else:
            ends.append(q[a] - drop if drop else rng.choice([INT64_MAX, (1 << 31) - 1]))
    full_axes = [2 + a - (rank + 2 if rng.random() < 0.2 else 0) for a in axes]
    if rng.random() < 0.2:  # every axis listed, batch and channels untouched
        starts, ends, full_axes = [0, 0] + starts, [INT64_MAX, INT64_MAX] + ends, [0, 1] + full_axes
    if opset < 10:
        node = helper.make_node("Slice", [f"c{i}"], [f"k{i}"], name=f"lowres{i}", starts=starts, ends=ends,
                                axes=full_axes)
    else:
        names = [f"ls{i}", f"le{i}", f"la{i}"]
        for name, values in zip(names, (starts, ends, full_axes)):
            inits.append(numpy_helper.from_array(np.array(values, np.int64), name))
        node = helper.make_node("Slice", [f"c{i}", *names], [f"k{i}"], name=f"lowres{i}")
    return node, new_q, f"Slice {starts}:{ends} axes {full_axes}"


def _sweep_site(i: int, opset: int, rng: random.Random, nrng: np.random.Generator, inits: list,
                crop_rng: random.Random | None = None):
    """Nodes x{i} -> Conv [-> Pad/Slice] -> depth-to-space [-> Slice] -> y{i}; returns (nodes, input
    shape, terms, info)."""
    kind = "d2s" if rng.random() < 0.4 else "rtr"
    if kind == "d2s":
        rank = 2
        s = rng.choice([1, 2, 2, 3, 3, 4])
        strides = (s, s)
        mode = None if opset < 11 else rng.choice([None, "DCR", "CRD"])  # mode exists from opset 11
        order = ("c", 0, 1) if mode == "CRD" else (0, 1, "c")
    else:
        rank = rng.choices([1, 2, 3], weights=[3, 4, 2])[0]
        strides = tuple(rng.randint(1, 3) for _ in range(rank))
        order = ["c", *range(rank)]
        rng.shuffle(order)
        order = tuple(order)
        mode = None
    n_phase = math.prod(strides)
    kernel = tuple(rng.randint(1, 4 if rank < 3 else 3) for _ in range(rank))
    dil = [1 if rng.random() < 0.7 else 2 for _ in range(rank)]
    g = rng.choice(["1", "1", "2", "dw"])
    if g == "dw":
        group = rng.randint(2, 4)
        cin = group
    else:
        group = int(g)
        cin = group * rng.randint(1, 2 if group > 1 else 3)
    channels = rng.choice([c for c in range(1, 5) if (c * n_phase) % group == 0] or [group])
    c_conv = channels * n_phase
    lengths = [rng.randint(1, 4 if rank < 3 else 3) for _ in range(rank)]
    batch = rng.randint(1, 2)
    attrs = {"group": group}
    mode_p = rng.random()
    if mode_p < 0.15:  # onnxruntime rejects SAME with dilation
        attrs["auto_pad"] = rng.choice(["SAME_UPPER", "SAME_LOWER"])
        dil = [1] * rank
        pads = [((k - 1) // 2, (k - 1) - (k - 1) // 2) for k in kernel]  # only for the length below
    elif mode_p < 0.25:
        attrs["auto_pad"] = "VALID"
        pads = [(0, 0)] * rank
    else:
        pads = [(rng.randint(0, 3), rng.randint(0, 3)) for _ in range(rank)]
    q = [n + pb + pe - (k - 1) * d for n, (pb, pe), k, d in zip(lengths, pads, kernel, dil)]
    if any(v < 1 for v in q):  # the Conv must produce >= 1 position: pad the end
        attrs.pop("auto_pad", None)
        pads = [(pb, pe + max(1 - v, 0)) for (pb, pe), v in zip(pads, q)]
        q = [max(v, 1) for v in q]
    if "auto_pad" not in attrs:
        attrs["pads"] = [p[0] for p in pads] + [p[1] for p in pads]
    if rng.random() < 0.5 or any(d != 1 for d in dil):
        attrs["dilations"] = dil
    if rng.random() < 0.5:
        attrs["kernel_shape"] = list(kernel)

    v = nrng.standard_normal((c_conv, cin // group) + kernel).astype(np.float32)
    inits.append(numpy_helper.from_array(v, f"w{i}"))
    conv_in = [f"x{i}", f"w{i}"]
    bias = None
    if rng.random() < 0.5:
        if rng.random() < 0.3:  # equal across the phases of each channel: a plain bias
            per_channel = nrng.standard_normal(channels).astype(np.float32)
            bias = np.zeros(c_conv, np.float32)
            for c in range(channels):
                for phase in np.ndindex(*strides):
                    bias[_conv_channel(order, channels, strides, c, phase)] = per_channel[c]
        else:
            bias = nrng.standard_normal(c_conv).astype(np.float32)
        inits.append(numpy_helper.from_array(bias, f"b{i}"))
        conv_in.append(f"b{i}")
    nodes = [helper.make_node("Conv", conv_in, [f"c{i}"], name=f"conv{i}", **attrs)]
    low_res = None
    if crop_rng is not None:
        explicit = "auto_pad" not in attrs or attrs["auto_pad"] == "VALID"
        zero_beyond = [(explicit and bias is None and pb >= (k - 1) * d, explicit and bias is None and pe >= (k - 1) * d)
                       for (pb, pe), k, d in zip(pads, kernel, dil)]
        low_res = _low_res_crop(i, opset, q, zero_beyond, crop_rng, inits)
    if low_res is not None:
        nodes.append(low_res[0])
        q = low_res[1]
    conv_out = f"k{i}" if low_res is not None else f"c{i}"

    crop = rng.random() < 0.35
    shuffled = f"t{i}" if crop else f"y{i}"
    if kind == "d2s":
        d2s_attrs = {"blocksize": strides[0]}
        if mode is not None:
            d2s_attrs["mode"] = mode
        nodes.append(helper.make_node("DepthToSpace", [conv_out], [shuffled], name=f"d2s{i}", **d2s_attrs))
    else:
        m = rank + 1
        split = [batch] + [channels if f == "c" else strides[f] for f in order] + q
        perm = [0, 1 + order.index("c")]
        for a in range(rank):
            perm += [1 + m + a, 1 + order.index(a)]
        merge = [batch, channels] + [n * s for n, s in zip(q, strides)]
        inits.append(numpy_helper.from_array(np.array(_reshape_shape(split, rng, (0,)), np.int64), f"s{i}"))
        inits.append(numpy_helper.from_array(np.array(_reshape_shape(merge, rng, (0, 1)), np.int64), f"m{i}"))
        nodes += [
            helper.make_node("Reshape", [conv_out, f"s{i}"], [f"r{i}"], name=f"split{i}"),
            helper.make_node("Transpose", [f"r{i}"], [f"p{i}"], name=f"perm{i}", perm=perm),
            helper.make_node("Reshape", [f"p{i}", f"m{i}"], [shuffled], name=f"merge{i}"),
        ]
    if crop:
        out = [n * s for n, s in zip(q, strides)]
        axes = sorted(rng.sample(range(rank), rng.randint(1, rank)))
        starts, ends = [], []
        for a in axes:
            st = rng.randint(0, min(3, out[a] - 1))
            room = out[a] - st - 1  # positions that may still be dropped at the end
            pick = rng.random()
            if room >= 1 and pick < 0.55:
                ends.append(-rng.randint(1, min(3, room)))
            elif pick < 0.7:  # an absolute end (the lengths are static), past the end at times
                ends.append(rng.randint(st + 1, out[a] + 2))
            else:
                ends.append(INT64_MAX)
            starts.append(st)
        axes = [2 + a - (rank + 2 if rng.random() < 0.2 else 0) for a in axes]  # negative axes too
        if opset < 10:
            nodes.append(helper.make_node("Slice", [shuffled], [f"y{i}"], name=f"crop{i}",
                                          starts=starts, ends=ends, axes=axes))
        else:
            names = [f"cs{i}", f"ce{i}", f"ca{i}"]
            for name, values in zip(names, (starts, ends, axes)):
                inits.append(numpy_helper.from_array(np.array(values, np.int64), name))
            if rng.random() < 0.5:
                inits.append(numpy_helper.from_array(np.ones(len(axes), np.int64), f"cp{i}"))
                names.append(f"cp{i}")
            nodes.append(helper.make_node("Slice", [shuffled, *names], [f"y{i}"], name=f"crop{i}"))
    shape = [batch, cin, *lengths]
    terms = (cin // group) * math.prod(kernel) * n_phase
    info = {"kind": kind, "mode": mode, "order": order, "strides": strides, "kernel": kernel, "dil": dil,
            "group": group, "cin": cin, "channels": channels, "attrs": attrs, "lengths": lengths, "crop": crop,
            "bias": bias is not None, "low_res": low_res and low_res[2]}
    return nodes, shape, terms, info


def _sweep_batch(n: int, opset: int, seed: int):
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    crop_rng = random.Random(seed + 1)  # its own stream: the other draws stay as they were
    nodes, inits, inputs, outputs, feeds, terms, infos = [], [], [], [], {}, [], []
    for i in range(n):
        site_nodes, shape, t, info = _sweep_site(i, opset, rng, nrng, inits, crop_rng)
        nodes += site_nodes
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, shape))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
        feeds[f"x{i}"] = nrng.standard_normal(shape).astype(np.float32)
        terms.append(t)
        infos.append(info)
    graph = helper.make_graph(nodes, "subpixel_sweep", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR[opset])
    return model, feeds, terms, infos


@pytest.fixture(scope="module")
def sweep_stats():
    stats = {"convtranspose": [], "resize": [], "kinds": {}}
    yield stats
    if stats["convtranspose"]:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(stats["kinds"].items()))
        print(f"\nfrom_subpixel sweep: {len(stats['convtranspose'])} sites ({kinds}); worst error/tolerance: "
              + ", ".join(f"to {t} {max(stats[t]):.4f}" for t in ("convtranspose", "resize") if stats[t]))


@pytest.mark.parametrize("batch", range(BATCHES))
def test_sweep_matches_onnxruntime(batch, sweep_stats):
    opset = OPSETS[batch % len(OPSETS)]
    model, feeds, terms, infos = _sweep_batch(PER_BATCH, opset, seed=5000 + batch)
    for info in infos:
        key = "DepthToSpace " + (info["mode"] or "(no mode)") if info["kind"] == "d2s" else "Reshape-Transpose-Reshape"
        key += f" + low-res {info['low_res'].split()[0]}" if info["low_res"] else ""
        key += " + Slice" if info["crop"] else ""
        sweep_stats["kinds"][key] = sweep_stats["kinds"].get(key, 0) + 1
    original = _run(model, feeds)

    skipped = up.convert(model, to="subpixel", verify=False).report
    not_skipped = [s.reason for s in skipped.sites if s.status != "skipped"]
    assert len(skipped.sites) == PER_BATCH and not not_skipped, not_skipped[:3]

    for target in ("convtranspose", "resize"):
        result = up.convert(model, to=target, verify=False)
        report = result.report
        assert not report.refused, [s.reason for s in report.refused][:3]
        assert len(report.rewritten) == PER_BATCH
        ops = set(_ops(result.model))
        assert not ops & {"DepthToSpace", "Transpose"}, ops
        assert ("ConvTranspose" in ops) == (target == "convtranspose")
        kept = [n.name for n in result.model.graph.node if n.name.startswith("crop")]
        assert not kept, kept  # every trailing Slice (unit steps, static lengths) is folded into the site
        rewritten = _run(result.model, feeds)
        for i, info in enumerate(infos):
            ref, got = original[f"y{i}"], rewritten[f"y{i}"]
            assert got.shape == ref.shape, (target, info, got.shape, ref.shape)
            tol = 8 * EPS32 * math.sqrt(terms[i]) * max(float(np.abs(ref).max()), 1e-30)
            err = float(np.abs(got.astype(np.float64) - ref).max())
            sweep_stats[target].append(err / tol)
            assert err <= tol, (target, i, info, err, tol)


# ----------------------------------------------------------------------------------------------
# structure


def _conv_d2s(v, bias=None, opset=13, mode="CRD", pads=(1, 1, 1, 1), shape=(1, 3, 8, 8), blocksize=2,
              weight_as_input=False, extra_reader=False, conv_attrs=None):
    """x -> Conv(V, B) -> DepthToSpace(blocksize, mode) -> y (mode None: attribute absent)."""
    inits = [] if weight_as_input else [numpy_helper.from_array(v, "V")]
    ins = ["x", "V"]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))]
    if weight_as_input:
        inputs.append(helper.make_tensor_value_info("V", TensorProto.FLOAT, list(v.shape)))
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "B"))
        ins.append("B")
    attrs = dict(conv_attrs or {"pads": list(pads)})
    d2s = {"blocksize": blocksize} if mode is None else {"blocksize": blocksize, "mode": mode}
    nodes = [helper.make_node("Conv", ins, ["c"], name="conv", **attrs),
             helper.make_node("DepthToSpace", ["c"], ["y"], name="shuffle", **d2s)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["c"], ["r"], name="relu"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR[opset])


def _espcn(equal_bias=False, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((12, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(12).astype(np.float32)
    if equal_bias:  # CRD: channel c owns Conv channels 4c .. 4c+3
        b = np.repeat(b[:3], 4)
    return v, b


def test_espcn_is_one_convtranspose_k6_s2_p2_plus_per_phase_bias():
    """DESIGN.md R2: ESPCN Conv3x3 p1 (12 outputs) + PixelShuffle(2) == ConvTranspose k6 s2 p2."""
    v, b = _espcn()
    model = _conv_d2s(v, b)
    (site,), refusals = find_sites(model)
    assert not refusals
    assert [(a.stride, a.dilation, a.kernel, a.crop_begin, a.extension) for a in site.axes] == [(2, 1, 6, 2, 0)] * 2
    assert site.bias is None and site.phase_bias is not None and site.phase_bias.shape == (3, 2, 2)
    np.testing.assert_array_equal(site.phase_bias.reshape(-1), b)  # CRD: phases of c are 4c .. 4c+3
    result = up.convert(model, to="convtranspose")
    assert result.report.verified
    ops = _ops(result.model)
    assert ops[0] == "ConvTranspose" and ops[-1] == "Add" and ops.count("ConvTranspose") == 1
    assert not {"Conv", "DepthToSpace", "Slice", "Pad"} & set(ops)
    node = result.model.graph.node[0]
    attrs = _attrs(node)
    assert attrs["kernel_shape"] == [6, 6] and attrs["strides"] == [2, 2] and attrs["pads"] == [2, 2, 2, 2]
    assert attrs.get("group", 1) == 1 and "output_padding" not in attrs and len(node.input) == 2
    w = _init(result.model, node.input[1])
    np.testing.assert_array_equal(w, _expected_kernel(v, 1, (2, 2), (1, 1), ("c", 0, 1)))
    # spot check of R2: W[ci, c, 2*(2-j0) + r0, 2*(2-j1) + r1] = V[4c + 2*r0 + r1, ci, j0, j1]
    assert w[1, 2, 2 * (2 - 0) + 1, 2 * (2 - 2) + 0] == v[4 * 2 + 2 * 1 + 0, 1, 0, 2]
    assert {"V", "B"}.isdisjoint(t.name for t in result.model.graph.initializer)
    assert result.report.sites[0].macs_before == 12 * 3 * 9 * 64


def test_zero_kernel_borders_are_trimmed_and_move_the_crop():
    """ESPCN with the taps that land on the first and last ConvTranspose row all zero: k(4, 6), pads
    (1, 2, 1, 2) instead of k(6, 6) p2 (row 0 is tap j=2 of phase r0=0, row 5 tap j=0 of phase r0=1)."""
    v, b = _espcn(equal_bias=True)
    v = v.reshape(3, 2, 2, 3, 3, 3)  # CRD: [c, r0, r1, ci, j0, j1]
    v[:, 0, :, :, 2, :] = 0
    v[:, 1, :, :, 0, :] = 0
    v = v.reshape(12, 3, 3, 3)
    result = up.convert(_conv_d2s(v, b), to="convtranspose")
    assert result.report.verified
    (node,) = result.model.graph.node
    attrs = _attrs(node)
    assert attrs["kernel_shape"] == [4, 6] and attrs["pads"] == [1, 2, 1, 2]
    full = _expected_kernel(v, 1, (2, 2), (1, 1), ("c", 0, 1))
    np.testing.assert_array_equal(_init(result.model, node.input[1]), full[:, :, 1:5])


def test_espcn_with_bias_equal_across_phases_is_one_convtranspose():
    v, b = _espcn(equal_bias=True)
    result = up.convert(_conv_d2s(v, b), to="convtranspose")
    assert result.report.verified
    (node,) = result.model.graph.node
    assert node.op_type == "ConvTranspose" and len(node.input) == 3
    np.testing.assert_array_equal(_init(result.model, node.input[2]), b[::4])


@pytest.mark.parametrize("opset", [9, 11, 17])
def test_depth_to_space_without_mode_is_dcr(opset):
    v, b = _espcn(seed=1)
    sites = {}
    for mode in [None, "DCR", "CRD"] if opset >= 11 else [None]:
        result = up.convert(_conv_d2s(v, b, opset=opset, mode=mode), to="convtranspose")
        assert result.report.verified
        node = result.model.graph.node[0]
        sites[mode] = _init(result.model, node.input[1])
    # DCR: Conv channel r*C + c (phase-major); the kernel is the R2 rearrangement in that order
    np.testing.assert_array_equal(sites[None], _expected_kernel(v, 1, (2, 2), (1, 1), (0, 1, "c")))
    if opset >= 11:
        np.testing.assert_array_equal(sites[None], sites["DCR"])
        assert not np.array_equal(sites[None], sites["CRD"])


def test_grouped_dcr_becomes_dense_and_crd_stays_grouped():
    """DESIGN.md §2a: DCR interleaves the groups of a grouped sub-pixel Conv (dense kernel, noted)."""
    rng = np.random.default_rng(4)
    v = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)  # 2 groups, 2 output channels x 4 phases
    for mode, group in [("CRD", 2), ("DCR", 1)]:
        model = _conv_d2s(v, None, mode=mode, shape=(1, 2, 5, 5), conv_attrs={"pads": [1, 1, 1, 1], "group": 2})
        result = up.convert(model, to="convtranspose")
        assert result.report.verified
        node = result.model.graph.node[0]
        assert _attrs(node)["group"] == group
        assert bool(result.report.sites[0].notes) == (group == 1)
        order = ("c", 0, 1) if mode == "CRD" else (0, 1, "c")
        w = _dense_of(_init(result.model, node.input[1]), group)
        np.testing.assert_array_equal(w, _expected_kernel(v, 2, (2, 2), (1, 1), order))


def test_conv_output_read_elsewhere_is_refused():
    v, b = _espcn()
    model = _conv_d2s(v, b, extra_reader=True)
    result = up.convert(model, to="convtranspose")
    (refusal,) = result.report.refused
    assert "read elsewhere" in refusal.reason and "'c'" in refusal.reason
    assert _ops(result.model) == _ops(model)


def test_reshape_transpose_intermediate_read_elsewhere_is_refused():
    model = _rtr_model([0, 1, 4, 2, 5, 3])
    model.graph.node.append(helper.make_node("Relu", ["p"], ["r"], name="relu"))
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    result = up.convert(model, to="convtranspose")
    (refusal,) = result.report.refused
    assert "read elsewhere" in refusal.reason and "'p'" in refusal.reason
    assert _ops(result.model) == _ops(model)


def test_conv_weight_from_graph_input_is_refused():
    v, b = _espcn()
    model = _conv_d2s(v, b, weight_as_input=True)
    _, (refusal,) = find_sites(model)
    assert "Conv weight is not constant" in refusal.reason and "graph input" in refusal.reason
    feeds = {"x": np.ones((1, 3, 8, 8), np.float32), "V": v}
    result = up.convert(model, to="convtranspose", inputs=feeds)
    assert result.report.refused and _ops(result.model) == ["Conv", "DepthToSpace"]


def test_unknown_depth_to_space_mode_and_rank_are_refused():
    v, b = _espcn()
    model = _conv_d2s(v, b)
    next(a for a in model.graph.node[1].attribute if a.name == "mode").s = b"XYZ"
    _, (refusal,) = find_sites(model)
    assert "mode='XYZ'" in refusal.reason


def test_strided_conv_is_refused():
    v, b = _espcn()
    model = _conv_d2s(v, b, shape=(1, 3, 8, 8), conv_attrs={"pads": [1, 1, 1, 1], "strides": [2, 2]})
    _, (refusal,) = find_sites(model)
    assert "strides=[2, 2]" in refusal.reason


def _rtr_model(perm, split=None, merge=None, shape=(1, 2, 3, 4), c_conv=8, opset=13):
    """x -> Conv1x1 (c_conv outputs) -> Reshape(split) -> Transpose(perm) -> Reshape(merge) -> y."""
    rng = np.random.default_rng(2)
    v = rng.standard_normal((c_conv, shape[1], 1, 1)).astype(np.float32)
    split = split or [1, 2, 2, 2, shape[2], shape[3]]
    merge = merge or [1, 2, 2 * shape[2], 2 * shape[3]]
    inits = [numpy_helper.from_array(v, "V"), numpy_helper.from_array(np.array(split, np.int64), "split"),
             numpy_helper.from_array(np.array(merge, np.int64), "merge")]
    nodes = [helper.make_node("Conv", ["x", "V"], ["c"], name="conv"),
             helper.make_node("Reshape", ["c", "split"], ["a"], name="split"),
             helper.make_node("Transpose", ["a"], ["p"], name="perm", **({"perm": perm} if perm else {})),
             helper.make_node("Reshape", ["p", "merge"], ["y"], name="merge")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR[opset])


def test_pixel_shuffle_reshape_transpose_reshape_is_parsed():
    for perm, order in [([0, 1, 4, 2, 5, 3], ("c", 0, 1)), ([0, 3, 4, 1, 5, 2], (0, 1, "c")),
                        ([0, 2, 4, 1, 5, 3], (0, "c", 1))]:
        model = _rtr_model(perm)
        (site,), _ = _find(model)
        assert [(a.stride, a.kernel, a.crop_begin, a.extension) for a in site.axes] == [(2, 2, 0, 0)] * 2
        result = up.convert(model, to="convtranspose")
        assert result.report.verified and _ops(result.model) == ["ConvTranspose"]
        v = _init(model, "V")
        w = _init(result.model, result.model.graph.node[0].input[1])
        np.testing.assert_array_equal(w, _expected_kernel(v, 1, (2, 2), (1, 1), order))


@pytest.mark.parametrize(
    "perm,split,merge",
    [
        ([0, 1, 2, 4, 3, 5], None, None),  # [N, C, s0, H, s1, W]: tiles blocks, does not interleave
        ([0, 1, 2, 3, 4, 5], None, None),  # identity: channel blocks stacked, not interleaved
        ([0, 1, 5, 2, 4, 3], None, [1, 2, 8, 6]),  # H and W swapped
        ([0, 1, 4, 3, 5, 2], None, None),  # s0/s1 swapped (still a shuffle: CRD order (c, 1, 0)), here 2 = 2
        ([0, 4, 1, 2, 5, 3], [1, 2, 2, 2, 3, 4], [1, 3, 4, 8]),  # a spatial axis as channels
        (None, None, [4, 3, 2, 4]),  # default perm (reverse)
        ([0, 1, 4, 2, 5, 3], None, [1, 2, 12, 4]),  # merge to a different shape
        ([0, 1, 4, 2, 5, 3], None, [1, 4, 6, 4]),  # merge folds a phase back into channels
        ([0, 1, 4, 2, 5, 3], None, [1, 2, 48]),  # merge to rank 3
        ([0, 2, 3, 1, 4, 5], [1, 2, 2, 2, 3, 4], [1, 2, 4, 12]),  # channels moved, no spatial interleave
    ],
)
def test_reshape_transpose_reshape_that_is_not_a_pixel_shuffle_is_never_rewritten_wrongly(perm, split, merge):
    model = _rtr_model(perm, split, merge)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 2, 3, 4)).astype(np.float32)}
    original = _run(model, feeds)["y"]
    sites, refusals = _find(model)
    result = up.convert(model, to="convtranspose")  # verifies in onnxruntime, raises if wrong
    assert result.report.verified
    got = _run(result.model, feeds)["y"]
    assert got.shape == original.shape
    np.testing.assert_allclose(got, original, rtol=1e-5, atol=1e-6)
    if sites:  # a genuine pixel shuffle in disguise: must then be the R2 kernel
        assert perm == [0, 1, 4, 3, 5, 2]
    else:
        (refusal,) = refusals
        assert "is not a pixel shuffle" in refusal.reason, refusal.reason
        assert _ops(result.model) == _ops(model)


def test_constant_shapes_on_symbolic_lengths_pin_them_or_are_refused():
    """Constant Reshape shapes on a symbolic input: where they fix one symbolic length (H = 3 here),
    the original runs at that length only and the chain is read there (with a note); where they fix
    only a product (N*H = 3: at N=3, H=1 the batch would be mixed into H), refused, never guessed."""
    model = _rtr_model([0, 1, 4, 2, 5, 3])
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    result = up.convert(model, to="convtranspose", verify=False)
    (site,) = result.report.sites
    assert site.status == "rewritten" and any("fixes H = 3" in n for n in site.notes), site.notes
    assert _ops(result.model) == ["ConvTranspose"]
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    result = up.convert(model, to="convtranspose", shapes={"x": (1, 2, 3, 4)})
    (refusal,) = result.report.refused
    assert "at every input size" in refusal.reason and "Reshape 'split'" in refusal.reason, refusal.reason
    assert "the product N·H" in refusal.reason and _ops(result.model) == _ops(model)
    # copying the batch (0) leaves H the only length the constants fix
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.array([0, 2, 2, 2, 3, 4], np.int64), "split"))
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.array([0, 2, 6, 8], np.int64), "merge"))
    result = up.convert(model, to="convtranspose", shapes={"x": (1, 2, 3, 4)})
    assert result.report.verified and _ops(result.model) == ["ConvTranspose"]


def test_a_chain_that_is_a_pixel_shuffle_at_the_measured_size_only_is_refused():
    """[0, 2, 2, 2, 3, -1] splits H as 3 and leaves W to the -1: a pixel shuffle at H=3, W=4, where it
    was measured, and a different rearrangement at H=6 (the measured shapes alone cannot tell)."""
    model = _rtr_model([0, 1, 4, 2, 5, 3], split=[0, 2, 2, 2, 3, -1], merge=[0, 2, -1, 8])
    for axis, name in ((0, "N"), (2, "H"), (3, "W")):
        model.graph.input[0].type.tensor_type.shape.dim[axis].dim_param = name
    result = up.convert(model, to="convtranspose", shapes={"x": (1, 2, 3, 4)})
    (site,) = result.report.sites
    assert site.status == "refused" and "at every input size" in site.reason, site.reason
    assert "Reshape 'split' shape [0, 2, 2, 2, 3, -1]" in site.reason and _ops(result.model) == _ops(model)


def _symbolic_subpixel():
    """Our own sub-pixel form of a 2-D k(4, 3) s(2, 3) ConvTranspose on a symbolic [N, 4, H, W]
    input: Shape(conv output) -> Gather -> Concat builds the Reshape shapes at run time."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 3, 4, 3)).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="up", strides=[2, 3], pads=[1, 0, 1, 0])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    sub = up.convert(model, to="subpixel", shapes={"x": (2, 4, 5, 6)}).model
    assert {"Shape", "Reshape", "Transpose"} <= set(_ops(sub))
    return w, sub


def test_shuffle_shapes_computed_from_the_conv_output_go_with_the_site():
    w, sub = _symbolic_subpixel()
    result = up.convert(sub, to="convtranspose", shapes={"x": (2, 4, 5, 6)})
    assert result.report.verified and not result.report.refused
    assert _ops(result.model) == ["ConvTranspose"]  # Shape/Gather/Concat dropped with the site
    node = result.model.graph.node[0]
    assert _attrs(node)["pads"] == [1, 0, 1, 0] and _attrs(node)["strides"] == [2, 3]
    np.testing.assert_array_equal(_init(result.model, node.input[1]), w)
    assert len(result.model.graph.initializer) == 1
    for h, w_ in [(1, 1), (3, 7)]:  # still symbolic
        x = np.random.default_rng(h).standard_normal((1, 4, h, w_)).astype(np.float32)
        assert _run(result.model, {"x": x})["y"].shape == (1, 3, 2 * h, 3 * w_)


def test_shuffle_shape_also_read_elsewhere_is_refused():
    _, sub = _symbolic_subpixel()
    shape = next(n for n in sub.graph.node if n.op_type == "Shape")
    sub.graph.output.append(helper.make_tensor_value_info(shape.output[0], TensorProto.INT64, None))
    result = up.convert(sub, to="convtranspose", shapes={"x": (2, 4, 5, 6)})
    (refusal,) = result.report.refused
    assert "read elsewhere" in refusal.reason
    assert _ops(result.model) == _ops(sub)


def test_slice_with_step_is_not_folded_but_kept():
    v, b = _espcn()
    model = _conv_d2s(v, b)
    model.graph.node[1].output[0] = "d"
    inits = {"st": [1, 0], "en": [INT64_MAX, -1], "ax": [2, 3], "sp": [2, 1]}
    for k, val in inits.items():
        model.graph.initializer.append(numpy_helper.from_array(np.array(val, np.int64), k))
    model.graph.node.append(helper.make_node("Slice", ["d", "st", "en", "ax", "sp"], ["y"], name="crop"))
    result = up.convert(model, to="convtranspose")
    assert result.report.verified and not result.report.refused
    assert _ops(result.model)[0] == "ConvTranspose" and _ops(result.model)[-1] == "Slice"


def test_folded_slice_becomes_convtranspose_pads():
    """Conv 2x2 p1 -> DepthToSpace(2) -> Slice[1 : -1] (our own k4 s2 p1 sub-pixel form) is k4 s2 p1."""
    rng = np.random.default_rng(3)
    v = rng.standard_normal((16, 3, 2, 2)).astype(np.float32)
    model = _conv_d2s(v, None, mode="CRD", pads=(1, 1, 1, 1))
    model.graph.node[1].output[0] = "d"
    for k, val in {"st": [1, 1], "en": [-1, -1], "ax": [2, 3]}.items():
        model.graph.initializer.append(numpy_helper.from_array(np.array(val, np.int64), k))
    model.graph.node.append(helper.make_node("Slice", ["d", "st", "en", "ax"], ["y"], name="crop"))
    result = up.convert(model, to="convtranspose")
    assert result.report.verified
    (node,) = result.model.graph.node
    attrs = _attrs(node)
    assert attrs["kernel_shape"] == [4, 4] and attrs["pads"] == [1, 1, 1, 1] and "output_padding" not in attrs


# ----------------------------------------------------------------------------------------------
# round trip: ConvTranspose -> sub-pixel -> ConvTranspose


def _dilate(weight: np.ndarray, dilations) -> np.ndarray:
    out = np.zeros(weight.shape[:2] + tuple((k - 1) * d + 1 for k, d in zip(weight.shape[2:], dilations)),
                   weight.dtype)
    out[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in dilations)] = weight
    return out


def _feeding_convtranspose(model: onnx.ModelProto, output: str):
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer.get(output)
    while node is not None and node.op_type != "ConvTranspose":
        node = producer.get(node.input[0])
    return node


@pytest.fixture(scope="module")
def round_trip_stats():
    stats = {"sites": 0, "symbolic": 0, "exact": 0, "dilated": 0, "stride1": 0, "fallback": 0, "ratios": []}
    yield stats
    if stats["sites"]:
        print(f"\nround trip: {stats['sites']} ConvTranspose sites ({stats['symbolic']} declared symbolic): "
              f"{stats['exact']} same kernel, "
              f"{stats['dilated']} dilated (same kernel, dilation restored), "
              f"{stats['stride1']} stride 1 on every axis (plain Conv, no depth-to-space, not parsed), "
              f"{stats['fallback']} back in the Pad/Slice/Add fallback form; "
              f"worst error/tolerance {max(stats['ratios']):.4f}")


@pytest.mark.parametrize("batch", range(3))
def test_round_trip_gives_back_the_kernel(batch, round_trip_stats):
    opset = (11, 13, 17)[batch]
    rng = random.Random(9000 + batch)
    configs = [random_config(rng) for _ in range(100)]
    model, feeds, terms = batch_model(configs, opset, seed=9000 + batch)
    original = _run(model, feeds)
    before = {s.node: s for s in find_sites(model)[0]}
    shapes = {name: x.shape for name, x in feeds.items()}  # symbolic inputs: measure the shuffles at these

    sub = up.convert(model, to="subpixel", verify=False)
    assert not sub.report.refused
    back = up.convert(sub.model, to="convtranspose", verify=False, shapes=shapes)
    assert not back.report.refused, [s.reason for s in back.report.refused][:3]
    assert not {"Shape", "Gather", "Concat", "Reshape", "Transpose", "DepthToSpace"} & set(_ops(back.model))
    got = _run(back.model, feeds)
    after = {s.output: s for s in find_sites(back.model)[0]}
    round_trip_stats["sites"] += len(configs)
    round_trip_stats["symbolic"] += sum(c.symbolic for c in configs)
    for i, c in enumerate(configs):
        ref = original[f"y{i}"]
        assert got[f"y{i}"].shape == ref.shape, (c, got[f"y{i}"].shape, ref.shape)
        # terms of the dense dilated kernel: the sum may now run over its zero taps in another order
        dense = math.prod((k - 1) * d + 1 for k, d in zip(c.kernel, c.dilations))
        dense_terms = terms[i] * dense // math.prod(c.kernel)
        tol = 8 * EPS32 * math.sqrt(dense_terms) * max(float(np.abs(ref).max()), 1e-30)
        err = float(np.abs(got[f"y{i}"].astype(np.float64) - ref).max())
        round_trip_stats["ratios"].append(err / tol)
        assert err <= tol, (c, err, tol)

        node = _feeding_convtranspose(back.model, f"y{i}")
        if all(s == 1 for s in c.strides):
            # the sub-pixel form of a stride-1 site is a plain Conv (+ Slice), which no parser reads
            assert node is None
            round_trip_stats["stride1"] += 1
            continue
        assert node is not None, c
        w0 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == f"w{i}"))
        w1 = _init(back.model, node.input[1])
        attrs = _attrs(node)
        assert attrs["group"] == c.group and attrs["strides"] == list(c.strides)
        # Each tap k of W lands in phase k*d mod s at low-resolution tap k*d // s, and R2 puts it
        # back at offset k*d: the dense dilated kernel, whose all-zero borders the parser trims and
        # whose regular grid of taps gives back the dilation.  The same kernel, bit for bit.
        assert np.array_equal(w1, w0), c
        want = [d if k > 1 else 1 for d, k in zip(c.dilations, c.kernel)]
        assert [d if k > 1 else 1 for d, k in zip(attrs.get("dilations", [1] * c.rank), c.kernel)] == want, c
        round_trip_stats["exact" if all(d == 1 for d in want) else "dilated"] += 1
        if c.bias:  # a plain per-channel bias again (not a per-phase one), on the node or in the Add after it
            b0 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == f"b{i}"))
            if len(node.input) > 2:
                b1 = _init(back.model, node.input[2])
            else:
                add = next(n for n in back.model.graph.node if n.op_type == "Add" and n.output[0] == f"y{i}")
                b1 = _init(back.model, add.input[1]).reshape(-1)
            assert np.array_equal(b1, b0), c
        if node.output[0] != f"y{i}":
            round_trip_stats["fallback"] += 1
        else:
            # the plain form is the original transposed convolution, geometry included
            a0 = [(a.stride, a.kernel, a.crop_begin, a.extension, a.dilation if a.kernel > 1 else 1)
                  for a in before[f"ct{i}"].axes]
            a1 = [(a.stride, a.kernel, a.crop_begin, a.extension, a.dilation if a.kernel > 1 else 1)
                  for a in after[f"y{i}"].axes]
            assert a1 == a0, c


def _graph(nodes, x_shape, inits, opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, list(x_shape))],
                              [helper.make_tensor_value_info(nodes[-1].output[0], 1, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def test_two_single_axis_transposes_in_crd_order_are_a_pixel_shuffle():
    """[N, C*4, H, W] -> [N, C*2, 2, H*W] -T-> [N, C*2, H*W, 2] -> [N, C, 2, H, 2W] -T-> [N, C, H, 2, 2W]:
    PixelShuffle(2) written as two single-axis moves, a chain the one-Transpose matcher does not know."""
    rng = np.random.default_rng(0)
    c, h, w = 3, 5, 4
    nodes = [helper.make_node("Conv", ["x", "V", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "s1"], ["r1"]), helper.make_node("Transpose", ["r1"], ["t1"], perm=[0, 1, 3, 2]),
             helper.make_node("Reshape", ["t1", "s2"], ["r2"]),
             helper.make_node("Transpose", ["r2"], ["t2"], perm=[0, 1, 3, 2, 4]),
             helper.make_node("Reshape", ["t2", "s3"], ["y"], name="merge")]
    inits = [_const("V", rng.standard_normal((4 * c, 2, 3, 3)).astype(np.float32)),
             _const("B", np.repeat(rng.standard_normal(c), 4).astype(np.float32)),  # CRD: one bias a channel
             _const("s1", [1, 2 * c, 2, h * w]), _const("s2", [1, c, 2, h, 2 * w]), _const("s3", [1, c, 2 * h, 2 * w])]
    model = _graph(nodes, (1, 2, h, w), inits)
    result = up.convert(model, to="convtranspose")
    assert result.report.verified and not result.report.refused, [s.reason for s in result.report.refused]
    assert _ops(result.model) == ["ConvTranspose"]
    (site,) = result.report.sites
    assert site.node == "merge" and site.source == "subpixel"


def test_a_transpose_chain_that_is_not_a_pixel_shuffle_is_refused_with_the_reason():
    """Same shapes, but the second Transpose swaps the wrong neighbours: H and the phase stay apart."""
    rng = np.random.default_rng(0)
    c, h, w = 3, 4, 4
    nodes = [helper.make_node("Conv", ["x", "V"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "s1"], ["r1"]), helper.make_node("Transpose", ["r1"], ["t1"], perm=[0, 1, 3, 2]),
             helper.make_node("Reshape", ["t1", "s2"], ["r2"]),
             helper.make_node("Transpose", ["r2"], ["t2"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t2", "s3"], ["y"], name="merge")]
    inits = [_const("V", rng.standard_normal((4 * c, 2, 3, 3)).astype(np.float32)),
             _const("s1", [1, 2 * c, 2, h * w]), _const("s2", [1, c, 2, h, 2 * w]), _const("s3", [1, c, 2 * h, 2 * w])]
    model = _graph(nodes, (1, 2, h, w), inits)
    result = up.convert(model, to="convtranspose")
    assert result.report.verified and _ops(result.model) == _ops(model)
    reasons = [s.reason for s in result.report.refused]
    assert len(reasons) == 1 and "'merge'" in reasons[0] and "is not a pixel shuffle" in reasons[0]


def test_per_phase_convs_of_another_exporter_become_one_convtranspose():
    """Four Convs of one input (each phase's taps, exact pads) -> Concat -> DepthToSpace DCR: the
    union of their taps is the ConvTranspose k4 s2 p1 they were made from."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 5, 4, 4)).astype(np.float32)
    taps, pads = {0: [3, 1], 1: [2, 0]}, {0: (1, 0), 1: (0, 1)}
    nodes, inits, outs = [], [_const("W", w)], []
    for r0 in (0, 1):
        for r1 in (0, 1):
            v = w[:, :, taps[r0]][:, :, :, taps[r1]].transpose(1, 0, 2, 3)
            inits.append(_const(f"v{r0}{r1}", np.ascontiguousarray(v)))
            nodes.append(helper.make_node("Conv", ["x", f"v{r0}{r1}"], [f"p{r0}{r1}"], name=f"conv{r0}{r1}",
                                          pads=[pads[r0][0], pads[r1][0], pads[r0][1], pads[r1][1]]))
            outs.append(f"p{r0}{r1}")
    nodes += [helper.make_node("Concat", outs, ["cat"], name="cat", axis=1),
              helper.make_node("DepthToSpace", ["cat"], ["y"], name="d2s", blocksize=2, mode="DCR")]
    model = _graph(nodes, (1, 6, 7, 5), inits[1:])
    result = up.convert(model, to="convtranspose")
    assert result.report.verified and _ops(result.model) == ["ConvTranspose"]
    node = result.model.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["strides"] == [2, 2] and list(attrs.get("pads", [])) == [1, 1, 1, 1]
    got = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == node.input[1]))
    np.testing.assert_array_equal(got, w)


def test_a_concat_of_convs_with_other_readers_is_refused():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "a"], ["p0"], name="c0"), helper.make_node("Conv", ["x", "b"], ["p1"], name="c1"),
             helper.make_node("Concat", ["p0", "p1"], ["cat"], name="cat", axis=1),
             helper.make_node("DepthToSpace", ["cat"], ["d"], name="d2s", blocksize=2, mode="DCR"),
             helper.make_node("Relu", ["p0"], ["r"], name="other")]
    inits = [_const("a", rng.standard_normal((4, 2, 1, 1)).astype(np.float32)),
             _const("b", rng.standard_normal((4, 2, 1, 1)).astype(np.float32))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 2, 3, 3])],
                              [helper.make_tensor_value_info("d", 1, None), helper.make_tensor_value_info("r", 1, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = up.convert(model, to="convtranspose")
    (refused,) = result.report.refused
    assert "also read elsewhere" in refused.reason and "2 Convs + Concat 'cat'" in refused.reason


def test_a_chain_that_is_a_pixel_shuffle_only_at_batch_1_is_refused():
    """Reshape [4, -1, H, W] moves the batch into the channels: PixelShuffle(2) at N=1, not at N=2."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Reshape", ["c", "sA"], ["r1"], name="r1"),
             helper.make_node("Transpose", ["r1"], ["t1"], perm=[1, 0, 2, 3], name="t1"),
             helper.make_node("Reshape", ["t1", "sB"], ["r2"], name="r2"),
             helper.make_node("Transpose", ["r2"], ["t2"], perm=[0, 1, 4, 2, 5, 3], name="t2"),
             helper.make_node("Reshape", ["t2", "sC"], ["y"], name="r3")]
    inits = [_const("w", rng.standard_normal((4, 2, 3, 3)).astype(np.float32)), _const("sA", [4, -1, 3, 3]),
             _const("sB", [0, 1, 2, 2, 3, 3]), _const("sC", [0, 1, 6, 6])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, ["N", 2, 3, 3])],
                              [helper.make_tensor_value_info("y", 1, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    report = up.convert(model, to="convtranspose", verify=False, shapes={"x": (1, 2, 3, 3)}).report
    (site,) = report.sites
    assert site.status == "refused" and "at every input size" in site.reason and "'r1'" in site.reason


def test_per_phase_bias_follows_a_trimmed_kernel_border():
    """Conv whose first kernel row is zero for two phases, with a bias per phase: trimming the zero row
    moves the crop by one, and the per-phase bias must move with it."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 1, 2, 2)).astype(np.float32)
    w[0:2, :, 1, :] = 0
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 0, 0], name="conv"),
             helper.make_node("DepthToSpace", ["c"], ["y"], blocksize=2, mode="CRD", name="d2s")]
    model = _graph(nodes, (1, 1, 3, 3), [_const("w", w), _const("b", np.array([1, 2, 3, 4], np.float32))], opset=13)
    for to in ("convtranspose", "resize"):
        result = up.convert(model, to=to, verify=False)
        x = rng.standard_normal((1, 1, 3, 3)).astype(np.float32)
        want, got = _run(model, {"x": x})["y"], _run(result.model, {"x": x})["y"]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# a crop between the sub-pixel Conv and its depth-to-space (Real-CUGAN's fast variant)


def _cropped_subpixel(crop_nodes, crop_inits=(), opset=13, mode="CRD", bias=True, conv_pads=(0, 0, 0, 0),
                      x_shape=(1, 4, 9, 8), seed=0):
    """x -> Conv 3x3 (4 -> 12 channels, ``conv_pads``) -> c -> ``crop_nodes`` -> k -> depth-to-space(2) -> y."""
    rng = np.random.default_rng(seed)
    inits = [_const("w", rng.standard_normal((12, 4, 3, 3)).astype(np.float32)), *crop_inits]
    conv_in = ["x", "w"]
    if bias:
        inits.append(_const("b", rng.standard_normal(12).astype(np.float32)))
        conv_in.append("b")
    nodes = [helper.make_node("Conv", conv_in, ["c"], name="conv", pads=list(conv_pads)), *crop_nodes,
             helper.make_node("DepthToSpace", ["k"], ["y"], name="d2s", blocksize=2, **({"mode": mode} if mode else {}))]
    return _graph(nodes, x_shape, inits, opset=opset)


def _pad(pads, opset, mode="constant", value=None, axes=None):
    """Pad c -> k in the attribute form (opset < 11) or the input form (pads, value, opset-18 axes)."""
    if opset < 11:
        attrs = {"pads": list(pads), "mode": mode, **({"value": value} if value is not None else {})}
        return [helper.make_node("Pad", ["c"], ["k"], name="crop_lr", **attrs)], []
    inits = [_const("pads", np.array(pads, np.int64))]
    names = ["c", "pads", ""]
    if value is not None:
        inits.append(_const("value", np.array(value, np.float32)))
        names[2] = "value"
    if axes is not None:
        inits.append(_const("pad_axes", np.array(axes, np.int64)))
        names.append("pad_axes")
    while not names[-1]:
        names.pop()
    return [helper.make_node("Pad", names, ["k"], name="crop_lr", mode=mode)], inits


def _slice(starts, ends, axes, opset, steps=None):
    if opset < 10:
        return [helper.make_node("Slice", ["c"], ["k"], name="crop_lr", starts=starts, ends=ends, axes=axes)], []
    inits = [_const("st", np.array(starts, np.int64)), _const("en", np.array(ends, np.int64)),
             _const("ax", np.array(axes, np.int64))]
    names = ["c", "st", "en", "ax"]
    if steps is not None:
        inits.append(_const("sp", np.array(steps, np.int64)))
        names.append("sp")
    return [helper.make_node("Slice", names, ["k"], name="crop_lr")], inits


def _both_targets_match(model, shapes=((1, 4, 9, 8),), **convert):
    """Rewrites ``model`` to ConvTranspose and to Resize + Conv and compares them in onnxruntime at each
    input shape; returns the ConvTranspose result."""
    rng = np.random.default_rng(5)
    results = {}
    for to in ("convtranspose", "resize"):
        result = up.convert(model, to=to, verify=False, **convert)
        assert not result.report.refused, [s.reason for s in result.report.refused]
        ops = set(_ops(result.model))
        assert not ops & {"DepthToSpace", "Transpose", "Reshape"}, ops
        assert ("ConvTranspose" in ops) == (to == "convtranspose")
        for shape in shapes:
            x = rng.standard_normal(shape).astype(np.float32)
            want, got = _run(model, {"x": x})["y"], _run(result.model, {"x": x})["y"]
            assert got.shape == want.shape
            tol = 8 * EPS32 * math.sqrt(4 * 9 * 4) * float(np.abs(want).max())
            assert float(np.abs(got.astype(np.float64) - want).max()) <= tol, (to, shape)
        results[to] = result
    return results["convtranspose"]


@pytest.mark.parametrize("opset, mode", [(9, None), (11, "CRD"), (11, "DCR"), (13, None), (13, "CRD"), (18, "DCR")])
def test_negative_pad_between_conv_and_depth_to_space_is_one_site(opset, mode):
    """Real-CUGAN's UpCunet2x_fast: Conv 3x3 p0 -> F.pad(x, (-1, -1, -1, -1)) -> PixelShuffle(2).
    Dropping one low-resolution position per side drops two high-resolution ones."""
    model = _cropped_subpixel(*_pad([0, 0, -1, -1, 0, 0, -1, -1], opset), opset=opset, mode=mode)
    result = _both_targets_match(model)
    (site,) = result.report.sites
    assert site.status == "rewritten"
    assert _ops(result.model)[0] == "ConvTranspose"
    assert not {"c", "k"} & {o for n in result.model.graph.node for o in n.output}


def test_negative_pad_on_the_conv_output_is_the_convtranspose_pads():
    """Conv 2x2 p1 -> Pad(-1 at the end) -> DepthToSpace(2) -> Slice[1:]: one high-resolution position
    cropped at the start, two at the end, i.e. ConvTranspose k4 s2 with pads (1, 2)."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Pad", ["c", "pads"], ["k"], name="crop_lr"),
             helper.make_node("DepthToSpace", ["k"], ["d"], name="d2s", blocksize=2, mode="CRD"),
             helper.make_node("Slice", ["d", "st", "en", "ax"], ["y"], name="crop")]
    inits = [_const("w", rng.standard_normal((16, 3, 2, 2)).astype(np.float32)),
             _const("pads", np.array([0, 0, 0, 0, 0, 0, -1, -1], np.int64)),
             _const("st", np.array([1, 1], np.int64)), _const("en", np.array([INT64_MAX, INT64_MAX], np.int64)),
             _const("ax", np.array([2, 3], np.int64))]
    model = _graph(nodes, (1, 3, 6, 5), inits, opset=13)
    result = up.convert(model, to="convtranspose")
    assert result.report.verified
    (node,) = result.model.graph.node
    attrs = _attrs(node)
    assert attrs["kernel_shape"] == [4, 4] and attrs["pads"] == [1, 1, 2, 2] and "output_padding" not in attrs


@pytest.mark.parametrize("opset", [9, 11, 13])
@pytest.mark.parametrize("starts, ends, axes", [
    ([1, 1], [-1, -2], [2, 3]),
    ([1], [INT64_MAX], [-1]),  # negative axis, to the end
    ([-5, 0], [6, 5], [2, 3]),  # negative start, absolute ends
    ([0, 0, 2, 1], [INT64_MAX, INT64_MAX, (1 << 31) - 1, 4], [0, 1, 2, 3]),  # batch and channels untouched
])
def test_slice_between_conv_and_depth_to_space_is_one_site(opset, starts, ends, axes):
    model = _cropped_subpixel(*_slice(starts, ends, axes, opset), opset=opset, mode="DCR" if opset >= 11 else None)
    (site,) = _both_targets_match(model).report.sites
    assert site.status == "rewritten"


def test_pad_with_axes_input_crops_the_listed_axes():
    """Pad-18 with ``axes``: pads listed for the spatial axes only (one as a negative axis)."""
    model = _cropped_subpixel(*_pad([-1, 0, 0, -2], 18, axes=[2, -1]), opset=18)
    _both_targets_match(model)


def test_symbolic_lengths_with_a_relative_crop_run_at_two_sizes():
    model = _cropped_subpixel(*_slice([1, 2], [-1, INT64_MAX], [2, 3], 13), x_shape=("N", 4, "H", "W"))
    _both_targets_match(model, shapes=((1, 4, 9, 8), (2, 4, 7, 11)))


def test_zero_padding_where_the_conv_output_is_zero_is_read():
    """A Conv padded by its kernel's span (2) has zero border positions (no bias); padding its output
    with more zeros extends that border: the same transposed convolution, cropped wider."""
    model = _cropped_subpixel(*_pad([0, 0, 1, 2, 0, 0, 2, -1], 13), bias=False, conv_pads=(2, 2, 2, 0))
    (site,) = _both_targets_match(model).report.sites
    assert site.status == "rewritten"


@pytest.mark.parametrize("crop, bias, conv_pads, reason", [
    (lambda: _slice([0], [2], [1], 13), True, (0, 0, 0, 0), "crops the channel axis ([0:2])"),
    (lambda: _slice([0, 1], [1, INT64_MAX], [0, 2], 13), True, (0, 0, 0, 0), "crops the batch axis"),
    (lambda: _slice([1], [INT64_MAX], [2], 13, steps=[2]), True, (0, 0, 0, 0), "step 2 on axis 2"),
    (lambda: _pad([0, 1, 0, 0, 0, 1, 0, 0], 13), True, (0, 0, 0, 0), "pads the channel axis by [1, 1]"),
    (lambda: _pad([0, 0, 1, 0, 0, 0, 0, 0], 13), False, (1, 1, 1, 1), "where the Conv output is not zero"),
    (lambda: _pad([0, 0, 1, 0, 0, 0, 0, 0], 13), True, (2, 2, 2, 2), "after a Conv with a bias"),
    (lambda: _pad([0, 0, 1, 0, 0, 0, 0, 0], 13, mode="edge"), False, (2, 2, 2, 2), "mode='edge'"),
    (lambda: _pad([0, 0, 1, 0, 0, 0, 0, 0], 13, value=1.0), False, (2, 2, 2, 2), "value=1.0"),
])
def test_crops_that_are_not_a_transposed_convolution_are_refused_with_the_reason(crop, bias, conv_pads, reason):
    model = _cropped_subpixel(*crop(), bias=bias, conv_pads=conv_pads)
    result = up.convert(model, to="convtranspose", verify=False)
    (site,) = result.report.sites
    assert site.status == "refused" and reason in site.reason and "'crop_lr'" in site.reason, site.reason
    assert _ops(result.model) == _ops(model)


def test_crop_with_bounds_computed_at_run_time_is_refused():
    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "two"], ["h"], name="h", axis=0),
             helper.make_node("Sub", ["h", "one"], ["end"], name="end"),
             *_slice([1], [0], [2], 13)[0]]
    nodes[-1].input[2] = "end"
    inits = [_const("two", np.array([2], np.int64)), _const("one", np.array([1], np.int64)),
             *[t for t in _slice([1], [0], [2], 13)[1] if t.name != "en"]]
    model = _cropped_subpixel(nodes, inits, x_shape=("N", 4, "H", "W"))
    (site,) = up.convert(model, to="convtranspose", verify=False, shapes={"x": (1, 4, 9, 8)}).report.sites
    assert site.status == "refused" and "Slice 'crop_lr' is not constant" in site.reason, site.reason


def test_absolute_slice_end_on_symbolic_lengths_is_refused():
    model = _cropped_subpixel(*_slice([1], [5], [2], 13), x_shape=("N", 4, "H", "W"))
    (site,) = up.convert(model, to="convtranspose", verify=False, shapes={"x": (1, 4, 9, 8)}).report.sites
    assert site.status == "refused" and "needs the static length" in site.reason, site.reason


def test_conv_output_read_besides_the_crop_is_refused():
    nodes, inits = _pad([0, 0, -1, -1, 0, 0, -1, -1], 13)
    model = _cropped_subpixel(nodes, inits)
    model.graph.node.append(helper.make_node("Relu", ["c"], ["r"], name="relu"))
    model.graph.output.append(helper.make_tensor_value_info("r", 1, None))
    (site,) = up.convert(model, to="convtranspose", verify=False).report.sites
    assert site.status == "refused" and "'c' is also read elsewhere" in site.reason


# ----------------------------------------------------------------------------------------------
# pixel shuffles as other exporters write them (Unsqueeze / Squeeze / Flatten, 0 and -1, computed
# shapes), on symbolic inputs: read only where the chain is a depth-to-space at every input size

EXPORTED = Path(__file__).resolve().parent.parent / "models" / "exported"
CHAIN_OPS = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Flatten"}


@pytest.mark.parametrize("to", ["subpixel", "convtranspose", "resize", "fastest"])
def test_torchscript_opset9_pixel_shuffle_with_dynamic_axes_converts(to):
    """PyTorch's TorchScript export of nn.PixelShuffle(2) at opset 9 with dynamic batch/height/width:
    Conv -> Unsqueeze(2, 3) -> Reshape[0,-1,2,2,0,0] -> Transpose -> Reshape[0,0,-1,1,0,0] ->
    Reshape[0,0,0,0,-1,1] -> Squeeze(3, 5), one sub-pixel site, verified at two sizes."""
    stem = "dyn_bhw_espcn_op9"
    original = onnx.load(str(EXPORTED / f"{stem}.onnx"))
    result = up.convert(EXPORTED / f"{stem}.onnx", to=to)
    report = result.report
    assert report.verified and report.chosen_shapes and not report.refused, [s.reason for s in report.refused]
    (site,) = report.sites
    assert site.source == "subpixel" and site.node == "/3/Squeeze"
    if to == "subpixel":
        assert site.status == "skipped" and "already in form" in site.reason
        assert _ops(result.model) == _ops(original)
    else:
        assert site.status == "rewritten" and report.outputs_second_size
        assert not CHAIN_OPS & set(_ops(result.model)), _ops(result.model)
    assert [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in result.model.graph.input] == \
        [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in original.graph.input]
    data = np.load(EXPORTED / f"{stem}.npz")
    got = run_rewritten(result.model, {k: data[k] for k in data.files if not k.startswith("out:")})
    for key in (k for k in data.files if k.startswith("out:")):
        ref = data[key]
        tol = 8 * EPS32 * math.sqrt(3 * 3 * 32) * max(1.0, float(np.abs(ref).max()))
        assert float(np.abs(got[key[4:]] - ref).max()) <= tol, key


def _axes_node(op, x, out, axes, opset, name, inits):
    """Unsqueeze/Squeeze with ``axes`` as an attribute (opset < 13) or an input."""
    if opset < 13:
        return helper.make_node(op, [x], [out], name=name, axes=axes)
    inits.append(_const(f"{name}_axes", np.array(axes, np.int64)))
    return helper.make_node(op, [x, f"{name}_axes"], [out], name=name)


def _reshape(x, out, shape, name, inits):
    inits.append(_const(f"{name}_shape", np.array(shape, np.int64)))
    return helper.make_node("Reshape", [x, f"{name}_shape"], [out], name=name)


def _torch_op9_shuffle(r: int, order: str, opset: int, perm=None, negative=False, c=2, cin=3, seed=0,
                       squeeze_axes=True):
    """x [N, cin, H, W] -> Conv 3x3 p1 (c*r*r outputs, per-phase bias) -> PixelShuffle(r) spelled as
    the opset-9 TorchScript exporter writes it; ``order`` CRD (PyTorch: [0,-1,r,r,0,0]) or DCR
    ([0,r,r,-1,0,0], TF's depth_to_space order); ``perm`` overrides the Transpose (near misses)."""
    rng = np.random.default_rng(seed)
    inits = [_const("w", rng.standard_normal((c * r * r, cin, 3, 3)).astype(np.float32)),
             _const("b", rng.standard_normal(c * r * r).astype(np.float32))]
    split, default = ([0, -1, r, r, 0, 0], [0, 1, 4, 2, 5, 3]) if order == "CRD" else ([0, r, r, -1, 0, 0], [0, 3, 4, 1, 5, 2])
    unsq, sq = ([-4, -3], [-3, -1]) if negative else ([2, 3], [3, 5])
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             _axes_node("Unsqueeze", "c", "u", unsq, opset, "unsqueeze", inits),
             _reshape("u", "r1", split, "split", inits),
             helper.make_node("Transpose", ["r1"], ["t"], name="perm", perm=perm or default),
             _reshape("t", "r2", [0, 0, -1, 1, 0, 0], "merge_h", inits),
             _reshape("r2", "r3", [0, 0, 0, 0, -1, 1], "merge_w", inits)]
    if squeeze_axes:
        nodes.append(_axes_node("Squeeze", "r3", "y", sq, opset, "squeeze", inits))
    else:
        nodes.append(helper.make_node("Squeeze", ["r3"], ["y"], name="squeeze"))
    return _graph(nodes, ("N", cin, "H", "W"), inits, opset=opset)


def _matches_at(model, result, shapes, terms):
    """The rewritten model equals the original at each input shape (symbolic dims kept)."""
    rng = np.random.default_rng(7)
    for shape in shapes:
        x = {"x": rng.standard_normal(shape).astype(np.float32)}
        want, got = _run(model, x)["y"], _run(result.model, x)["y"]
        assert got.shape == want.shape
        tol = 8 * EPS32 * math.sqrt(terms) * max(1.0, float(np.abs(want).max()))
        assert float(np.abs(got.astype(np.float64) - want).max()) <= tol, shape


@pytest.mark.parametrize("opset", [9, 11, 13, 18])
@pytest.mark.parametrize("r, order", [(2, "CRD"), (3, "CRD"), (2, "DCR"), (3, "DCR")])
def test_unsqueeze_reshape_squeeze_pixel_shuffle_is_the_r2_kernel_at_every_size(r, order, opset):
    model = _torch_op9_shuffle(r, order, opset, negative=opset >= 11 and r == 3)
    for to in ("convtranspose", "resize"):
        result = up.convert(model, to=to)
        report = result.report
        assert report.verified and report.outputs_second_size and not report.refused, \
            [s.reason for s in report.refused]
        (site,) = report.sites
        assert site.node == "squeeze" and site.status == "rewritten"
        assert not CHAIN_OPS & set(_ops(result.model)), _ops(result.model)
        _matches_at(model, result, [(1, 3, 5, 7), (3, 3, 2, 1), (2, 3, 9, 4)], 3 * 9 * r * r)
        if to == "convtranspose":
            node = next(n for n in result.model.graph.node if n.op_type == "ConvTranspose")
            assert _attrs(node)["strides"] == [r, r]
            want = _expected_kernel(_init(model, "w"), 1, (r, r), (1, 1), ("c", 0, 1) if order == "CRD" else (0, 1, "c"))
            np.testing.assert_array_equal(_init(result.model, node.input[1]), want)


def test_one_dimensional_unsqueeze_pixel_shuffle():
    """Conv1d (c*r outputs) -> Unsqueeze(2) -> Reshape[0,-1,r,0] -> Transpose -> Reshape[0,0,-1]."""
    rng = np.random.default_rng(1)
    r, c = 3, 2
    inits = [_const("w", rng.standard_normal((c * r, 4, 5)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[2, 2]),
             _axes_node("Unsqueeze", "c", "u", [2], 13, "unsqueeze", inits),
             _reshape("u", "r1", [0, -1, r, 0], "split", inits),
             helper.make_node("Transpose", ["r1"], ["t"], name="perm", perm=[0, 1, 3, 2]),
             _reshape("t", "y", [0, 0, -1], "merge", inits)]
    model = _graph(nodes, ("N", 4, "L"), inits, opset=13)
    result = up.convert(model, to="convtranspose")
    assert result.report.verified and result.report.outputs_second_size and not result.report.refused
    assert _ops(result.model) == ["ConvTranspose"]
    node = result.model.graph.node[0]
    assert _attrs(node)["strides"] == [r]
    np.testing.assert_array_equal(_init(result.model, node.input[1]), _expected_kernel(_init(model, "w"), 1, (r,), (1,), ("c", 0)))
    _matches_at(model, result, [(1, 4, 6), (2, 4, 1), (3, 4, 11)], 4 * 5 * r)


def test_shapes_computed_from_the_conv_output_and_a_flatten_are_followed():
    """``x.view(n, c, 2, 2, h, w).permute(...).flatten(1).view(n, c, 2*h, 2*w)`` with the sizes read off
    the tensor: Shape -> Gather -> Mul -> Concat shapes, and a Flatten in the chain."""
    rng = np.random.default_rng(2)
    c = 3
    inits = [_const("w", rng.standard_normal((4 * c, 2, 3, 3)).astype(np.float32)),
             _const("i0", np.array([0], np.int64)), _const("i2", np.array([2], np.int64)),
             _const("i3", np.array([3], np.int64)), _const("two", np.array([2], np.int64)),
             _const("head", np.array([c, 2, 2], np.int64)), _const("ch", np.array([c], np.int64))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["c"], ["shape"], name="shape"),
             *[helper.make_node("Gather", ["shape", f"i{a}"], [f"d{a}"], name=f"dim{a}", axis=0) for a in (0, 2, 3)],
             helper.make_node("Concat", ["d0", "head", "d2", "d3"], ["s1"], name="s1", axis=0),
             helper.make_node("Mul", ["d2", "two"], ["h2"], name="h2"), helper.make_node("Mul", ["d3", "two"], ["w2"], name="w2"),
             helper.make_node("Concat", ["d0", "ch", "h2", "w2"], ["s2"], name="s2", axis=0),
             helper.make_node("Reshape", ["c", "s1"], ["r1"], name="split"),
             helper.make_node("Transpose", ["r1"], ["t"], name="perm", perm=[0, 1, 4, 2, 5, 3]),
             helper.make_node("Flatten", ["t"], ["f"], name="flat", axis=1),
             helper.make_node("Reshape", ["f", "s2"], ["y"], name="merge")]
    model = _graph(nodes, ("N", 2, "H", "W"), inits, opset=13)
    result = up.convert(model, to="convtranspose")
    assert result.report.verified and not result.report.refused, [s.reason for s in result.report.refused]
    assert _ops(result.model) == ["ConvTranspose"]  # the shape computation went with the site
    np.testing.assert_array_equal(_init(result.model, result.model.graph.node[0].input[1]),
                                  _expected_kernel(_init(model, "w"), 1, (2, 2), (1, 1), ("c", 0, 1)))
    _matches_at(model, result, [(1, 2, 3, 5), (2, 2, 6, 1)], 2 * 9 * 4)


@pytest.mark.parametrize("perm, why", [
    ([0, 1, 2, 4, 3, 5], "axis 2 is not spatial axis 0"),  # tiles the phases: blocks, not interleaved
    ([0, 1, 5, 2, 4, 3], "axis 2 is not spatial axis 0"),  # H and W swapped
    ([0, 1, 4, 3, 5, 2], None),  # the phases swapped: still a depth-to-space (channel order (c, 1, 0))
])
def test_near_miss_opset9_chain_is_refused_with_the_reason(perm, why):
    model = _torch_op9_shuffle(2, "CRD", 9, perm=perm)
    result = up.convert(model, to="convtranspose")
    assert result.report.verified
    (site,) = result.report.sites
    if why is None:
        assert site.status == "rewritten" and "ConvTranspose" in _ops(result.model)
        assert not CHAIN_OPS & set(_ops(result.model)), _ops(result.model)
        return
    assert site.status == "refused" and "'squeeze'" in site.reason and "is not a pixel shuffle" in site.reason \
        and why in site.reason, site.reason
    assert "\n" not in site.reason and _ops(result.model) == _ops(model)


@pytest.mark.parametrize("change, why", [
    # -1 = H*W/8: a whole number of elements only at some sizes, and the split moves with them
    (lambda m: _set_shape(m, "split_shape", [0, -1, 2, 2, 8, 0]), "Reshape 'split'"),
    # no axes: at N = 1 it would also remove the batch
    (lambda m: _drop_squeeze_axes(m), "Squeeze 'squeeze' has no axes"),
    # [4, -1, ...] puts the batch after 4 channel groups: a pixel shuffle at N = 1 only
    (lambda m: _set_shape(m, "split_shape", [2, -1, 2, 2, 0, 0]), "Reshape 'split'"),
])
def test_chain_that_cannot_be_proven_at_every_size_is_refused_naming_the_node(change, why):
    model = _torch_op9_shuffle(2, "CRD", 13)
    change(model)
    result = up.convert(model, to="convtranspose", verify=False, shapes={"x": (2, 3, 4, 4)})
    (site,) = result.report.sites
    assert site.status == "refused" and "at every input size" in site.reason and why in site.reason, site.reason
    assert _ops(result.model) == _ops(model)


def _set_shape(model, name, values):
    init = next(t for t in model.graph.initializer if t.name == name)
    init.CopyFrom(numpy_helper.from_array(np.array(values, np.int64), name))


def _drop_squeeze_axes(model):
    node = next(n for n in model.graph.node if n.name == "squeeze")
    del node.input[1:]


def test_a_reshape_after_the_pixel_shuffle_is_not_part_of_the_site():
    """PixelShuffle then a flatten for a classifier head: the shuffle is the site, the chain through the
    flatten is another rearrangement and raises no refusal of its own."""
    model = _torch_op9_shuffle(2, "CRD", 13)
    inits = []
    model.graph.node[-1].output[0] = "z"
    model.graph.node.append(_reshape("z", "y", [0, -1], "flatten", inits))
    model.graph.initializer.extend(inits)
    result = up.convert(model, to="convtranspose")
    assert result.report.verified and not result.report.refused, [s.reason for s in result.report.refused]
    (site,) = result.report.sites
    assert site.node == "squeeze" and site.status == "rewritten"
    ops = _ops(result.model)
    assert ops[0] == "ConvTranspose" and ops[-1] == "Reshape" and ops.count("Reshape") == 1, ops


def _random_chain(rng: random.Random, nrng: np.random.Generator):
    """A 2-D pixel shuffle of a symbolic [N, 2, H, W] input spelled at random the ways exporters do
    (Unsqueeze + Reshape with 0 / -1, split order of the channel axis, merges by [0,0,-1,1,0,0] then
    [0,0,0,0,-1,1] + Squeeze or [0,0,0,-1]), its Transpose perm corrupted at times.  Returns
    (model, whether the perm was corrupted, description)."""
    opset = rng.choice([9, 11, 13, 17])
    strides, c = (rng.randint(1, 3), rng.randint(1, 3)), rng.randint(1, 3)
    order = ["c", 0, 1]
    rng.shuffle(order)
    k = c * strides[0] * strides[1]
    inits = [_const("w", nrng.standard_normal((k, 2, 3, 3)).astype(np.float32))]
    head = [c if f == "c" else strides[f] for f in order]
    minus = rng.randrange(len(head) + 1)  # a -1 among the head dims, or none
    split = [0] + [-1 if i == minus else v for i, v in enumerate(head)] + [0, 0]
    perm = [0, 1 + order.index("c"), 4, 1 + order.index(0), 5, 1 + order.index(1)]
    corrupt = rng.random() < 0.35
    if corrupt:
        i, j = rng.sample(range(1, 6), 2)
        perm[i], perm[j] = perm[j], perm[i]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             _axes_node("Unsqueeze", "c", "u", [2, 3], opset, "unsqueeze", inits),
             _reshape("u", "r1", split, "split", inits),
             helper.make_node("Transpose", ["r1"], ["t"], name="perm", perm=perm)]
    merge = rng.choice(["torch", "flat", "copy"])
    if merge == "torch":
        nodes += [_reshape("t", "r2", [0, 0, -1, 1, 0, 0], "merge_h", inits),
                  _reshape("r2", "r3", [0, 0, 0, 0, -1, 1], "merge_w", inits),
                  _axes_node("Squeeze", "r3", "y", [3, 5], opset, "end", inits)]
    elif merge == "flat":
        nodes += [_reshape("t", "r2", [0, 0, -1, 1, 0, 0], "merge_h", inits), _reshape("r2", "y", [0, 0, 0, -1], "end", inits)]
    else:  # [0, 0, -1, 0, 0] copies the phase s0 as axis 3, not W: a near miss unless the strides are 1
        nodes += [_reshape("t", "r2", [0, 0, -1, 0, 0], "merge_h", inits), _reshape("r2", "y", [0, 0, 0, -1], "end", inits)]
        corrupt = True
    model = _graph(nodes, ("N", 2, "H", "W"), inits, opset=opset)
    return model, corrupt, f"opset {opset} strides {strides} c {c} order {order} split {split} perm {perm} merge {merge}"


def test_random_chain_spellings_are_read_exactly_or_refused():
    """40 random spellings: the uncorrupted ones are sites, every site equals the original at three
    input sizes (batch and lengths changed), every refusal names the chain's last node."""
    rng, nrng = random.Random(11), np.random.default_rng(11)
    counts = {"site": 0, "refused": 0, "corrupt site": 0}
    worst = 0.0
    for _ in range(40):
        model, corrupt, what = _random_chain(rng, nrng)
        try:
            session(model)
            _run(model, {"x": np.zeros((1, 2, 3, 4), np.float32)})
        except Exception:  # a corrupted perm the original cannot run with
            continue
        (site,) = up.convert(model, to="convtranspose", verify=False).report.sites
        if site.status == "refused":
            assert corrupt, (what, site.reason)
            assert "'end'" in site.reason and "pixel shuffle" in site.reason, (what, site.reason)
            counts["refused"] += 1
            continue
        counts["corrupt site" if corrupt else "site"] += 1
        result = up.convert(model, to="convtranspose", verify=False)
        assert "ConvTranspose" in _ops(result.model)
        xrng = np.random.default_rng(3)
        for shape in [(1, 2, 3, 4), (2, 2, 5, 1), (3, 2, 2, 7)]:
            x = {"x": xrng.standard_normal(shape).astype(np.float32)}
            want, got = _run(model, x)["y"], _run(result.model, x)["y"]
            assert got.shape == want.shape, what
            tol = 8 * EPS32 * math.sqrt(2 * 9) * max(1.0, float(np.abs(want).max()))
            err = float(np.abs(got.astype(np.float64) - want).max())
            worst = max(worst, err / tol)
            assert err <= tol, (what, shape)
    print(f"\nrandom chain spellings: {counts}; worst error/tolerance {worst:.3f}")
    assert counts["site"] >= 15 and counts["refused"] >= 3, counts
