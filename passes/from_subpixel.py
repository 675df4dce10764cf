"""Parser: sub-pixel ``Conv`` -> depth-to-space [-> ``Slice``] as a transposed convolution (R2).

A stride-1 Conv producing ``C*S`` channels followed by a depth-to-space by ``s`` is a
transposed convolution with ``K = s*(dc*(Ks-1) + 1)`` and ``W[ci, c, s*dc*(Ks-1-j) + r] =
V[channel(c, r), ci, j]`` (DESIGN.md R2).  Depth-to-space comes as

- ``DepthToSpace`` in DCR (the default when ``mode`` is absent) or CRD mode, or
- the pixel shuffle of older exporters, ``Reshape -> Transpose -> Reshape`` of any rank, with the
  channel axis split as ``(C, s0, s1, ...)``, ``(s0, s1, ..., C)`` or any other order that the
  Transpose interleaves into ``[N, C, Q0, s0, Q1, s1, ...]``.  The split is read from the shapes
  onnxruntime measured for the intermediate tensors, so constant and computed shape inputs both work.

A ``Slice`` of the spatial axes that follows (the crop our own sub-pixel emitter writes) is folded
into the crop.  A Conv bias that differs across the phases of a channel becomes a per-phase bias
(emitted as an ``Add`` of a periodic constant where the target form has no per-phase bias).
All-zero kernel borders are trimmed, so ConvTranspose -> sub-pixel -> ConvTranspose returns the
original kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from onnx import NodeProto

from onnx_uprewrite.sites import (
    GraphIndex, NotConstant, Refusal, Site, attributes, conv_weights, text,
)
from onnx_uprewrite.surgery import INT64_MAX
from onnx_uprewrite.weights import (
    Axis, depth_to_space_map, rearrange_quantized, split_phase_bias, subpixel_conv_axis, subpixel_conv_weight,
)

SOURCE = "subpixel"


@dataclass(frozen=True)
class _Shuffle:
    """A depth-to-space found in the graph."""

    conv: NodeProto
    nodes: tuple[NodeProto, ...]  # depth-to-space nodes, first to last
    strides: tuple[int, ...] | None  # None: not yet known (shapes missing)
    order: tuple | None  # split order of the channel axis, e.g. ("c", 0, 1)
    consts: tuple[str, ...]  # shape constants read by the nodes
    problem: str | None = None


def _op(index: GraphIndex, name: str, op_type: str) -> NodeProto | None:
    node = index.producer.get(name)
    if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx"):
        return node
    return None


def _conv_before(index: GraphIndex, tensor: str):
    """``(Conv, (Q, DQ) or (), (scale, zero point) or None)`` when ``tensor`` is a Conv output, or
    one read back through a per-tensor QuantizeLinear -> DequantizeLinear pair (QDQ models:
    quantizing commutes with depth-to-space, which only moves values)."""
    conv = _op(index, tensor, "Conv")
    if conv is not None:
        return conv, (), None
    pair = index.qdq_pair_before(tensor)
    conv = pair and _op(index, pair[0][0].input[0], "Conv")
    return (conv, pair[0], pair[1]) if conv is not None else None


def _chain(node: NodeProto, index: GraphIndex | None):
    """``(Conv, depth-to-space nodes, Q/DQ nodes, their (scale, zero point))`` when ``node`` ends a
    depth-to-space fed by a Conv."""
    if index is None or node.domain not in ("", "ai.onnx") or not node.input:
        return None
    if node.op_type == "DepthToSpace":
        found = _conv_before(index, node.input[0])
        return (found[0], (node,), found[1], found[2]) if found is not None else None
    if node.op_type == "Reshape":
        transpose = _op(index, node.input[0], "Transpose")
        split = transpose and _op(index, transpose.input[0], "Reshape")
        found = split and _conv_before(index, split.input[0])
        return (found[0], (split, transpose, node), found[1], found[2]) if found else None
    return None


def matches(node: NodeProto, index: GraphIndex | None) -> bool:
    return _chain(node, index) is not None


def taps(node: NodeProto, index: GraphIndex) -> list[str]:
    conv, nodes, qdq, _ = _chain(node, index)
    return [conv.input[0]] + [n.output[0] for n in qdq + nodes] + [conv.output[0]]


def _shape(index: GraphIndex, name: str):
    shape = index.static_shapes.get(name)
    if shape is None or None in shape:
        shape = index.assumed_shapes.get(name, shape)
    return shape


def _shuffle(conv: NodeProto, nodes: tuple[NodeProto, ...], index: GraphIndex, rank: int) -> _Shuffle:
    if len(nodes) == 1:
        attrs = attributes(nodes[0])
        block = int(attrs.get("blocksize", 0))
        mode = text(attrs.get("mode", "DCR"))
        if rank != 2 or block < 1 or mode not in ("DCR", "CRD"):
            return _Shuffle(conv, nodes, None, None, (), f"DepthToSpace mode={mode!r} blocksize={block} "
                            f"on a rank-{rank} Conv is not a depth-to-space this parser knows")
        order = ("c", 0, 1) if mode == "CRD" else (0, 1, "c")
        return _Shuffle(conv, nodes, (block, block), order, ())
    split, transpose, merge = nodes
    consts = tuple(t for n in (split, merge) if len(n.input) > 1 for t in index.shape_computation(n.input[1]))
    shapes = [_shape(index, t) for t in (split.input[0], split.output[0], merge.output[0])]
    if any(s is None or None in s for s in shapes):
        return _Shuffle(conv, nodes, None, None, consts,
                        "Reshape-Transpose-Reshape needs known tensor shapes to be read as a pixel shuffle "
                        "(pass --shape, or let verification run)")
    conv_shape, a, out = shapes
    perm = [int(p) for p in attributes(transpose).get("perm", range(len(a) - 1, -1, -1))]
    m = rank + 1
    problem = (f"Reshape {list(conv_shape)} -> {list(a)} -> Transpose perm={perm} -> Reshape {list(out)} "
               "is not a pixel shuffle")
    if (len(conv_shape) != rank + 2 or len(a) != 1 + m + rank  # [N, m channel factors, Q...]
            or len(perm) != len(a) or sorted(perm) != list(range(len(a)))):
        return _Shuffle(conv, nodes, None, None, consts, problem)
    q = tuple(conv_shape[2:])
    if a[0] != conv_shape[0] or tuple(a[1 + m:]) != q or math.prod(a[1:1 + m]) != conv_shape[1]:
        return _Shuffle(conv, nodes, None, None, consts, problem)
    if perm[0] != 0 or any(perm[2 + 2 * i] != 1 + m + i for i in range(rank)):
        return _Shuffle(conv, nodes, None, None, consts, problem)
    middle = [perm[1]] + [perm[3 + 2 * i] for i in range(rank)]
    if sorted(middle) != list(range(1, 1 + m)):
        return _Shuffle(conv, nodes, None, None, consts, problem)
    order = tuple("c" if p == perm[1] else middle.index(p) - 1 for p in range(1, 1 + m))
    strides = tuple(int(a[perm[3 + 2 * i]]) for i in range(rank))
    channels = int(a[perm[1]])
    if tuple(out) != (a[0], channels) + tuple(n * s for n, s in zip(q, strides)):
        return _Shuffle(conv, nodes, None, None, consts, problem)
    return _Shuffle(conv, nodes, strides, order, consts)


def _trailing_slice(last: NodeProto, index: GraphIndex, rank: int):
    """``(Slice node, {axis: (start, end)}, constants)`` for a crop of spatial axes after ``last``, or None."""
    readers = index.consumers.get(last.output[0], [])
    if len(readers) != 1 or last.output[0] in index.graph_outputs:
        return None
    node = readers[0]
    if node.op_type != "Slice" or node.domain not in ("", "ai.onnx") or node.input[0] != last.output[0]:
        return None
    try:
        if index.opset < 10:
            attrs = attributes(node)
            starts, ends = list(attrs.get("starts", [])), list(attrs.get("ends", []))
            axes = list(attrs.get("axes", range(len(starts))))
            steps, consts = [1] * len(starts), ()
        else:
            names = list(node.input) + [""] * 5
            values, consts = [], []
            for name in names[1:5]:
                if not name:
                    values.append(None)
                    continue
                value, chain = index.constant(name)
                values.append([int(v) for v in np.asarray(value).ravel()])
                consts += chain
            starts, ends, axes, steps = values
            axes = axes if axes is not None else list(range(len(starts)))
            steps = steps if steps is not None else [1] * len(starts)
    except NotConstant:
        return None
    full = rank + 2
    crops = {}
    for st, en, ax, sp in zip(starts, ends, axes, steps):
        ax = int(ax) % full
        if sp != 1 or ax < 2 or ax in crops:
            return None
        crops[ax - 2] = (int(st), int(en))
    return node, crops, tuple(consts)


def _apply_crop(axis: Axis, start: int, end: int, length: int | None) -> Axis | None:
    """Fold ``Slice[start:end]`` of this axis' output into the canonical crop (None: cannot)."""
    out = None if length is None else axis.output_length(length)
    if start < 0:
        if out is None:
            return None
        start = max(out + start, 0)
    if out is not None:
        start = min(start, out)
        stop = min(end, out) if end >= 0 else max(out + end, 0)
        if stop <= start:
            return None
        return Axis(axis.stride, axis.dilation, axis.kernel, axis.crop_begin + start,
                    axis.extension - (out - stop) - start)
    if end >= INT64_MAX // 2:
        end = 0
    if end > 0:
        return None  # an absolute end needs a static length
    return Axis(axis.stride, axis.dilation, axis.kernel, axis.crop_begin + start, axis.extension + end - start)


def _trim_zero_borders(weight: np.ndarray, axes: list[Axis]) -> tuple[np.ndarray, list[Axis]]:
    """Drop all-zero kernel slabs at both ends of each axis (leading ones move the crop), and give a
    kernel whose nonzero taps sit on a regular grid its dilation back (ConvTranspose round trips)."""
    for i, a in enumerate(axes):
        w = np.moveaxis(weight, 2 + i, 0)
        nonzero = [t for t in range(w.shape[0]) if np.any(w[t] != 0)]
        if not nonzero:
            continue
        lo, hi = nonzero[0], nonzero[-1] + 1
        w = w[lo:hi]
        a = Axis(a.stride, a.dilation, hi - lo, a.crop_begin - lo, a.extension)
        if a.dilation == 1 and hi - lo > 2:
            offsets = [t - lo for t in nonzero]
            for d in range(hi - lo - 1, 1, -1):
                if (hi - lo - 1) % d == 0 and all(t % d == 0 for t in offsets):
                    w = w[::d]
                    a = Axis(a.stride, d, w.shape[0], a.crop_begin, a.extension)
                    break
        weight = np.moveaxis(w, 0, 2 + i)
        axes[i] = a
    return np.ascontiguousarray(weight), axes


def _shape_readers(tensor: str, nodes: tuple[NodeProto, ...], index: GraphIndex) -> int:
    """Readers of ``tensor`` that are ``Shape`` nodes feeding only the shape inputs of the shuffle's
    Reshapes (the run-time shapes our emitter and exporters build for symbolic dims).  They go with
    the site: their outputs are among its constants, which are dropped once nothing reads them."""
    ours = {n.output[0] for n in nodes}
    private = {t for n in nodes if n.op_type == "Reshape" and len(n.input) > 1
               for t in index.shape_computation(n.input[1])}

    def feeds_only_the_shuffle(reader: NodeProto) -> bool:
        stack, seen = [o for o in reader.output if o], set()
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            if t not in private or t in index.graph_outputs:
                return False
            for c in index.consumers.get(t, []):
                if c.output[0] not in ours:
                    stack.extend(o for o in c.output if o)
        return True

    return sum(r.op_type == "Shape" and r.domain in ("", "ai.onnx") and feeds_only_the_shuffle(r)
               for r in index.consumers.get(tensor, []))


def parse(node: NodeProto, index: GraphIndex) -> Site | Refusal:
    conv, nodes, qdq, requantize = _chain(node, index)
    name = node.name or node.output[0]
    cname = conv.name or conv.output[0]
    label = f"Conv '{cname}' + {'DepthToSpace' if len(nodes) == 1 else 'Reshape-Transpose-Reshape'} '{name}'"

    def refuse(reason: str) -> Refusal:
        return Refusal(name, SOURCE, f"{label}: {reason}")

    for inner in (conv,) + qdq + nodes[:-1]:
        if index.uses(inner.output[0]) - _shape_readers(inner.output[0], nodes, index) != 1:
            return refuse(f"tensor '{inner.output[0]}' is also read elsewhere, so it cannot be removed")
    try:
        weight, w_chain, bias, b_chain, geo = conv_weights(conv, index)
    except ValueError as exc:
        return refuse(str(exc))
    rank = weight.ndim - 2
    shuffle = _shuffle(conv, nodes, index, rank)
    if shuffle.problem:
        return refuse(shuffle.problem)
    strides, n_phase = shuffle.strides, math.prod(shuffle.strides)
    c_conv = weight.shape[0]
    if c_conv % n_phase:
        return refuse(f"Conv has {c_conv} output channels, not a multiple of {n_phase} phases")
    if bias is not None and bias.shape != (c_conv,):
        return refuse(f"Conv bias shape {list(bias.shape)} is not [{c_conv}]")
    channel_map = depth_to_space_map(c_conv // n_phase, strides, shuffle.order)
    w, group = subpixel_conv_weight(weight, geo.group, strides, geo.dilations, channel_map)
    plain_bias, phase_bias = (None, None) if bias is None else split_phase_bias(bias, channel_map, strides)
    try:
        weight_quant, bias_quant = _quantized(conv, index, geo.group, strides, geo.dilations, channel_map)
    except (NotConstant, ValueError) as exc:
        return refuse(f"quantized weights: {exc}")
    if bias_quant is not None and phase_bias is not None:
        return refuse("the quantized Conv bias differs across the phases of a channel (a per-phase Add "
                      "would need a float bias)")
    axes = [subpixel_conv_axis(s, k, d, b, e) for s, k, d, b, e in
            zip(strides, geo.kernel, geo.dilations, geo.pads_begin, geo.pads_end)]
    lengths = index.spatial_lengths(conv.input[0], rank)
    replaced = [conv.output[0]] + [n.output[0] for n in qdq + nodes]
    consts = list(shuffle.consts)
    crop = _trailing_slice(nodes[-1], index, rank)
    if crop is not None:
        cropped = list(axes)
        for i, (start, end) in crop[1].items():
            cropped[i] = _apply_crop(axes[i], start, end, lengths[i])
            if cropped[i] is None:
                break
        else:
            axes = cropped
            replaced.append(crop[0].output[0])
            consts += crop[2]
    q = [None if n is None else n + b + e - d * (k - 1) for n, b, e, d, k in
         zip(lengths, geo.pads_begin, geo.pads_end, geo.dilations, geo.kernel)]
    source_macs = None if None in q else c_conv * (weight.shape[1]) * math.prod(geo.kernel) * math.prod(q)
    if weight_quant is None:  # integer weights keep their layout: trimming is value-dependent
        w, axes = _trim_zero_borders(w, axes)
    notes = ()
    if group != geo.group:
        notes = (f"the depth-to-space order mixes Conv groups: dense ConvTranspose kernel (group 1, was {geo.group})",)
    return Site(
        node=name,
        source=SOURCE,
        replaced_outputs=tuple(replaced),
        input=conv.input[0],
        output=replaced[-1],
        weight=w,
        bias=plain_bias,
        group=group,
        axes=tuple(axes),
        input_lengths=lengths,
        weight_tensors=w_chain + b_chain + tuple(consts),
        notes=notes,
        phase_bias=phase_bias,
        source_macs=source_macs,
        weight_quant=weight_quant,
        bias_quant=bias_quant,
        requantize=requantize,
    )


def _quantized(conv: NodeProto, index: GraphIndex, group: int, strides, dilations, channel_map):
    """The Conv's DequantizeLinear weight and bias rearranged like the float ones (R2 is a pure
    rearrangement); ValueError when a per-channel scale cannot follow (one ConvTranspose output
    channel gathers S Conv channels, so per-channel scales must agree across phases)."""
    weight_quant = index.quantized(conv.input[1])
    bias_quant = index.quantized(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    if weight_quant is not None:
        weight_quant = rearrange_quantized(
            weight_quant, lambda v: subpixel_conv_weight(v, group, strides, dilations, channel_map)[0], 1)
    if bias_quant is not None:
        bias_quant = rearrange_quantized(bias_quant, lambda v: v[channel_map[:, 0]], 0)
    return weight_quant, bias_quant
