"""Parser: ``Resize``/``Upsample`` (nearest, integer scale) -> ``Conv`` as a transposed convolution (R1).

Nearest upsampling by s replicates ``x[o // s]``; a stride-1 Conv after it sums, per output, the
kernel taps that read each low-resolution pixel, so the pair is a transposed convolution with
``W = box_s ⊛ dilate_dc(flip V)``, ``K = (Kc-1)dc + s``, crop ``pb = (Kc-1)dc - Pb``
(DESIGN.md R1).  Exact only when the Resize really is replication for integer s (DESIGN.md §3):
Upsample-7/9 and Resize-10 nearest; Resize-11+ nearest with half_pixel / pytorch_half_pixel /
half_pixel_symmetric and round_prefer_floor / round_prefer_ceil, asymmetric and floor, or
tf_half_pixel_for_nn and floor.  Everything else is refused with the attribute that blocks it.

Each Conv reading the Resize is its own site; the Resize stays while anything else reads it.
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto

from onnx_uprewrite.sites import GraphIndex, NotConstant, Refusal, Site, attributes, conv_geometry, text
from onnx_uprewrite.weights import nearest_conv_axis, nearest_conv_weight

SOURCE = "resize"
REPLICATING = {
    ("half_pixel", "round_prefer_floor"), ("half_pixel", "round_prefer_ceil"),
    ("pytorch_half_pixel", "round_prefer_floor"), ("pytorch_half_pixel", "round_prefer_ceil"),
    ("half_pixel_symmetric", "round_prefer_floor"), ("half_pixel_symmetric", "round_prefer_ceil"),
    ("asymmetric", "floor"), ("tf_half_pixel_for_nn", "floor"),
}


def _upsampler(node: NodeProto, index: GraphIndex | None) -> NodeProto | None:
    if index is None or not node.input:
        return None
    producer = index.producer.get(node.input[0])
    if producer is not None and producer.op_type in ("Resize", "Upsample") and producer.domain in ("", "ai.onnx"):
        return producer
    return None


def matches(node: NodeProto, index: GraphIndex | None) -> bool:
    return node.op_type == "Conv" and node.domain in ("", "ai.onnx") and _upsampler(node, index) is not None


def taps(node: NodeProto, index: GraphIndex) -> list[str]:
    return [_upsampler(node, index).input[0]]


def nearest_scales(resize: NodeProto, index: GraphIndex, rank: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Integer spatial scales of a replicating nearest Resize/Upsample and the constants it reads.

    Raises ValueError with the blocking attribute when the node is not exact replication.
    """
    attrs = attributes(resize)
    mode = text(attrs.get("mode", "nearest"))
    if mode != "nearest":
        raise ValueError(f"attribute mode={mode!r} is not nearest")
    opset = index.opset
    consts: list[str] = []
    if resize.op_type == "Resize" and opset >= 11:
        ctm = text(attrs.get("coordinate_transformation_mode", "half_pixel"))
        nm = text(attrs.get("nearest_mode", "round_prefer_floor"))
        if (ctm, nm) not in REPLICATING:
            raise ValueError(
                f"attributes coordinate_transformation_mode={ctm!r} with nearest_mode={nm!r} are not "
                "plain replication x[o // s]"
            )
        if int(attrs.get("antialias", 0)):
            raise ValueError("attribute antialias=1 is not supported")
    full_rank = rank + 2
    scales = None
    if resize.op_type == "Upsample" and "scales" in attrs:
        scales = [float(v) for v in attrs["scales"]]
    else:
        scale_input = 1 if (resize.op_type == "Upsample" or opset < 11) else 2
        names = list(resize.input) + [""] * 4
        if names[scale_input]:
            value, chain = _constant(index, names[scale_input], "scales")
            consts += chain
            if value.size:
                scales = [float(v) for v in value.ravel()]
        if scales is None and resize.op_type == "Resize" and opset >= 11 and names[3]:
            value, chain = _constant(index, names[3], "sizes")
            consts += chain
            policy = text(attrs.get("keep_aspect_ratio_policy", "stretch"))
            if policy != "stretch":
                raise ValueError(f"attribute keep_aspect_ratio_policy={policy!r} with sizes is not supported")
            scales = _scales_from_sizes(resize, index, [int(v) for v in value.ravel()], attrs, full_rank)
        if opset >= 11 and names[1]:
            consts.append(names[1])  # roi: unused by these modes, dropped with the Resize
    if scales is None:
        raise ValueError("has neither constant scales nor sizes")
    if "axes" in attrs:
        full = [1.0] * full_rank
        for ax, sc in zip(attrs["axes"], scales):
            full[int(ax) % full_rank] = sc
        scales = full
    if len(scales) != full_rank:
        raise ValueError(f"scales {scales} do not have {full_rank} values")
    if scales[0] != 1 or scales[1] != 1:
        raise ValueError(f"scales {scales} resize the batch or channel axis")
    spatial = scales[2:]
    if any(s < 1 or s != int(s) for s in spatial):
        raise ValueError(f"scales {spatial} are not positive integers")
    return tuple(int(s) for s in spatial), tuple(consts)


def _constant(index: GraphIndex, name: str, what: str):
    try:
        return index.constant(name)
    except NotConstant as exc:
        raise ValueError(f"{what} are not constant: {exc}") from None


def _scales_from_sizes(resize, index, sizes, attrs, full_rank) -> list[float]:
    axes = [int(a) % full_rank for a in attrs.get("axes", range(full_rank))]
    shape = index.static_shapes.get(resize.input[0]) or index.assumed_shapes.get(resize.input[0])
    if shape is None or len(shape) != full_rank or any(shape[a] is None for a in axes):
        raise ValueError("sizes need a static input shape (pass --shape)")
    scales = [1.0] * full_rank
    for a, size in zip(axes, sizes):
        if size % shape[a]:
            raise ValueError(f"sizes {sizes} are not integer multiples of the input shape {list(shape)}")
        scales[a] = size / shape[a]
    return [scales[a] for a in axes] if "axes" in attrs else scales


def parse(node: NodeProto, index: GraphIndex) -> Site | Refusal:
    name = node.name or node.output[0]
    resize = _upsampler(node, index)
    rname = resize.name or resize.output[0]

    def refuse(reason: str) -> Refusal:
        return Refusal(name, SOURCE, f"{resize.op_type} '{rname}' + Conv '{name}': {reason}")

    try:
        weight, w_chain, bias, b_chain = index.weight_and_bias(node, "Conv weight", "Conv bias")
    except NotConstant as exc:
        return refuse(str(exc))
    if not np.issubdtype(weight.dtype, np.floating):
        return refuse(f"Conv weight dtype {weight.dtype} is not a float type")
    rank = weight.ndim - 2
    if rank < 1:
        return refuse(f"Conv weight has rank {weight.ndim}")
    try:
        strides, consts = nearest_scales(resize, index, rank)
    except ValueError as exc:
        return refuse(str(exc))
    try:
        geo = conv_geometry(node, weight)
    except ValueError as exc:
        return refuse(f"Conv {exc}")
    group, kernel, dilations = geo.group, geo.kernel, geo.dilations
    axes = tuple(
        nearest_conv_axis(s, k, d, geo.pads_begin[i], geo.pads_end[i])
        for i, (s, k, d) in enumerate(zip(strides, kernel, dilations))
    )
    lengths = index.spatial_lengths(resize.input[0], rank)
    return Site(
        node=name,
        source=SOURCE,
        replaced_outputs=(node.output[0],),
        input=resize.input[0],
        output=node.output[0],
        weight=nearest_conv_weight(weight, group, strides, dilations),
        bias=bias,
        group=group,
        axes=axes,
        input_lengths=lengths,
        weight_tensors=w_chain + b_chain + (resize.output[0],) + consts,
    )


def macs(site: Site) -> int | None:
    """MACs per sample of the Conv at the upsampled resolution."""
    if any(n is None for n in site.input_lengths):
        return None
    kc = [a.kernel - a.stride + 1 for a in site.axes]  # (Kc-1)*dc + 1: exact for dc=1, a bound otherwise
    positions = int(np.prod([a.output_length(n) for a, n in zip(site.axes, site.input_lengths)]))
    return site.out_channels * (site.in_channels // site.group) * int(np.prod(kc)) * positions
