"""Parser: ``Resize``/``Upsample`` (integer scale) -> ``Concat`` (channels) -> ``Conv``, split by input channels.

The U-Net decoder idiom (smp Unet, YOLO necks, hand-written decoders): the upsampled tensor is
concatenated with skip connections and convolved.  A group-1 Conv sums over its input channels,
so with the Conv weight ``V = [V_a | V_b]`` split at the Concat's channel ranges

    Conv(Concat(up(x), skip), V, bias) = Conv(up(x), V_a) + Conv(skip, V_b, bias)

with the same pads and dilations (exact up to float rounding of the reordered sum).  The first
term is Resize + Conv, folded into a canonical transposed convolution exactly as
``from_resize_conv`` does (R1; the same modes and the same foldability rule); the second stays at
the high resolution and travels with the site as ``Site.addend`` (addend.py), which every emitter
form gets added.  The site's input is the Resize input; the Resize and the Concat stay while
anything else reads them.  MACs of the site count the upsampled part: the Conv over the other
inputs costs the same in every form.

Refused with the reason: grouped Convs (groups would straddle the Concat inputs), a Concat on a
non-channel axis, several upsampled inputs in one Concat, channel counts that are unknown or do not
add up to the Conv's, and whatever ``from_resize_conv`` refuses about the Resize or the Conv.
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto

from onnx_uprewrite.addend import Addend
from onnx_uprewrite.sites import GraphIndex, Refusal, Site, attributes, conv_weights
from onnx_uprewrite.weights import upsample_conv_axis, upsample_conv_weight

from .from_resize_conv import edge_padding, foldable, resize_axes, resize_taps

SOURCE = "concat"


def _concat(node: NodeProto, index: GraphIndex) -> NodeProto | None:
    producer = index.producer.get(node.input[0]) if node.input else None
    if producer is not None and producer.op_type == "Concat" and producer.domain in ("", "ai.onnx"):
        return producer
    return None


def _upsampled(concat: NodeProto, index: GraphIndex) -> list[tuple[int, NodeProto]]:
    """``(position, Resize/Upsample)`` for each Concat input an upsampling node produces."""
    found = []
    for i, name in enumerate(concat.input):
        producer = index.producer.get(name) if name else None
        if producer is not None and producer.op_type in ("Resize", "Upsample") and producer.domain in ("", "ai.onnx"):
            found.append((i, producer))
    return found


def matches(node: NodeProto, index: GraphIndex | None) -> bool:
    if index is None or node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        return False
    concat = _concat(node, index)
    return concat is not None and bool(_upsampled(concat, index))


def taps(node: NodeProto, index: GraphIndex) -> list[str]:
    """Every Concat input (their channel counts split the Conv) and what the Resizes read."""
    concat = _concat(node, index)
    found = [name for name in concat.input if name]
    for _, resize in _upsampled(concat, index):
        found += resize_taps(resize, index)
    return list(dict.fromkeys(found))


def _channels(index: GraphIndex, tensor: str, rank: int) -> int | None:
    shape = index.static_shapes.get(tensor) or index.assumed_shapes.get(tensor)
    if shape is None or len(shape) != rank + 2:
        return None
    return shape[1]


def channel_ranges(counts: list[int | None], total: int) -> list[tuple[int, int]] | str:
    """``[start, stop)`` of each Concat input in the Conv's input channels; one unknown count is
    what the others leave of ``total``.  A string says why they cannot be placed."""
    unknown = [i for i, c in enumerate(counts) if c is None]
    if len(unknown) > 1:
        return "unknown"
    known = sum(c for c in counts if c is not None)
    if unknown:
        if known >= total:
            return f"the known inputs have {known} channels, the Conv reads {total}"
        counts = [total - known if c is None else c for c in counts]
    elif known != total:
        return f"the inputs have {known} channels together, the Conv reads {total}"
    starts = np.cumsum([0] + counts[:-1])
    return [(int(a), int(a + c)) for a, c in zip(starts, counts)]


def parse(node: NodeProto, index: GraphIndex) -> Site | Refusal:
    name = node.name or node.output[0]
    concat = _concat(node, index)
    cname = concat.name or concat.output[0]

    def refuse(reason: str) -> Refusal:
        return Refusal(name, SOURCE, f"Conv '{name}' reading Concat '{cname}': {reason}")

    ups = _upsampled(concat, index)
    if len(ups) > 1:
        names = ", ".join(f"'{r.name or r.output[0]}'" for _, r in ups)
        return refuse(f"{len(ups)} of its inputs are upsampled ({names}); one site takes one upsampling")
    position, resize = ups[0]
    rname = resize.name or resize.output[0]
    try:
        weight, w_chain, bias, b_chain, geo = conv_weights(node, index)
    except ValueError as exc:
        return refuse(str(exc))
    rank = weight.ndim - 2
    axis = int(attributes(concat).get("axis", 1))
    if axis % (rank + 2) != 1:
        return refuse(f"attribute axis={axis} of the Concat joins along a non-channel axis; only a channel "
                      "Concat splits the Conv")
    if geo.group != 1:
        return refuse(f"attribute group={geo.group} of the Conv: its channel groups would straddle the Concat "
                      "inputs (only group-1 Convs are split)")
    try:
        interp, consts = resize_axes(resize, index, rank)
    except ValueError as exc:
        return refuse(f"{resize.op_type} '{rname}': {exc}")
    if len(interp) != rank:
        return refuse(f"the upsampling has {len(interp)} spatial axes, the Conv {rank}")
    if not foldable(interp, geo):
        return refuse(f"{resize.op_type} '{rname}' crops what the Conv pads would read (not foldable)")
    x = resize.input[0]
    counts = [_channels(index, x if i == position else t, rank) for i, t in enumerate(concat.input)]
    ranges = channel_ranges(counts, int(weight.shape[1]))
    if isinstance(ranges, str):
        if ranges == "unknown":
            missing = [t for t, c in zip(concat.input, counts) if c is None]
            return refuse(f"the channel counts of inputs {', '.join(map(repr, missing))} are unknown (pass --shape)")
        return refuse(ranges)
    if any(r[1] <= r[0] for r in ranges):
        return refuse("a Concat input has no channels")
    rest = [i for i in range(len(concat.input)) if i != position]
    own = ranges[position]
    v_a = weight[:, own[0]:own[1]]
    addend = None  # a Concat of the upsampled tensor alone is a copy: the site is all of the Conv
    if rest:
        v_b = np.concatenate([weight[:, ranges[i][0]:ranges[i][1]] for i in rest], axis=1)
        if not np.all(np.isfinite(v_b)):
            return refuse("the Conv weight has non-finite values (inf/NaN)")
        addend = Addend(
            inputs=tuple(concat.input[i] for i in rest),
            channels=tuple(ranges[i] for i in rest),
            weight=np.ascontiguousarray(v_b),
            pads=geo.pads_begin + geo.pads_end,
            dilations=geo.dilations,
        )
    return _site(node, index, resize, interp, consts, concat, v_a, own, w_chain + b_chain, bias, geo, addend)


def _site(node, index, resize, interp, consts, concat, v_a, own, chains, bias, geo, addend) -> Site:
    """The upsampled part as a canonical site (from_resize_conv.conv_site's geometry on ``V_a``)."""
    rank = v_a.ndim - 2
    x = resize.input[0]
    lengths = index.spatial_lengths(x, rank)
    axes = tuple(upsample_conv_axis(ia.axis(), k, d, geo.pads_begin[i], geo.pads_end[i])
                 for i, (ia, k, d) in enumerate(zip(interp, geo.kernel, geo.dilations)))
    pre_pad, padded = edge_padding(interp, lengths)
    c_up = [None if n is None else n * a.stride for n, a in zip(lengths, interp)]
    out = None if None in c_up else [n + b + e - (k - 1) * d for n, b, e, k, d in
                                     zip(c_up, geo.pads_begin, geo.pads_end, geo.kernel, geo.dilations)]
    rest_macs = addend.macs(out) if addend is not None else 0
    source_macs = None if out is None else int(v_a.size * np.prod(out))
    return Site(
        node=node.name or node.output[0],
        source=SOURCE,
        replaced_outputs=(node.output[0],),
        input=x,
        output=node.output[0],
        weight=upsample_conv_weight(v_a, 1, [a.taps for a in interp], geo.dilations),
        magnitude_weight=upsample_conv_weight(np.abs(np.asarray(v_a, np.float64)), 1,
                                              [np.abs(np.asarray(a.taps)) for a in interp], geo.dilations),
        bias=bias,
        group=1,
        axes=axes,
        input_lengths=padded,
        weight_tensors=chains + (resize.output[0], concat.output[0]) + tuple(consts),
        pre_pad=pre_pad,
        source_macs=source_macs,
        addend=addend,
        notes=() if addend is None else (
            f"Conv split by input channels: channels [{own[0]}, {own[1]}) read the upsampling (the site); "
            f"a Conv over the other {len(addend.inputs)} Concat input(s) ("
            f"{'?' if rest_macs is None else f'{rest_macs:,}'} MACs, the same in every form) is added; "
            "MACs count the upsampled part",),
    )
