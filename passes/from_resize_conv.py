"""Parser: ``Resize``/``Upsample`` (nearest or linear, integer scale) -> ``Conv`` as one transposed convolution.

An integer-scale Resize whose source coordinate advances by exactly 1 every s outputs is an
edge-padded depthwise transposed convolution (weights.interpolation_axis): nearest replication
``x[o // s]`` is a box kernel with no padding (R1); linear half_pixel is ``Pad(edge, 1)`` and a
triangle kernel (R3); nearest with half_pixel+floor, asymmetric+round, ... are shifted boxes with
edge padding.  A stride-1 Conv after it folds in (``W = taps ⊛ dilate_dc(flip V)``,
weights.upsample_conv_weight) when the Conv never reads what the upsampling's crop removed:
always for plain replication, otherwise only when the Conv has zero pads (DESIGN.md R3: a
zero-padded border cannot be folded).  Those Convs are left to ``from_resize``, which rewrites the
Resize alone.  Unsupported attributes (cubic, align_corners, tf_crop_and_resize, antialias,
non-integer scales, dynamic scales) are refused with the attribute that blocks them.  Scales and
sizes computed from ``Shape`` are read through shape_arith: numbers where the lengths are static,
``k·length`` of the Resize input's own symbolic length (scale k at every size), refused otherwise.

Each Conv reading the Resize is its own site; the Resize stays while anything else reads it.
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto

from onnx_uprewrite import shape_arith
from onnx_uprewrite.shape_arith import Affine, Unknown
from onnx_uprewrite.sites import GraphIndex, NotConstant, Refusal, Site, attributes, conv_geometry, conv_weights, text
from onnx_uprewrite.weights import MAX_FACTOR, InterpolationAxis, interpolation_axis, upsample_conv_axis, upsample_conv_weight

SOURCE = "resize"
def _upsampler(node: NodeProto, index: GraphIndex | None) -> NodeProto | None:
    if index is None or not node.input:
        return None
    tensor = node.input[0]
    pair = index.qdq_pair_before(tensor)
    if pair is not None:  # QDQ model: Resize -> QuantizeLinear -> DequantizeLinear -> Conv
        tensor = pair[0][0].input[0]
    producer = index.producer.get(tensor)
    if producer is not None and producer.op_type in ("Resize", "Upsample") and producer.domain in ("", "ai.onnx"):
        return producer
    return None


def matches(node: NodeProto, index: GraphIndex | None) -> bool:
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        return False
    resize = _upsampler(node, index)
    return resize is not None and merges(node, resize, index) is not False


def merges(conv: NodeProto, resize: NodeProto, index: GraphIndex) -> bool | None:
    """Whether the Conv folds into the upsampling; None when the Resize or the Conv is unsupported."""
    try:
        weight, _ = index.constant(conv.input[1]) if len(conv.input) > 1 else (None, ())
        if weight is None or weight.ndim < 3:
            return None
        geo = conv_geometry(conv, weight)
        axes, _ = resize_axes(resize, index, weight.ndim - 2)
    except (NotConstant, ValueError):
        return None
    return foldable(axes, geo)


def foldable(axes: list[InterpolationAxis], geo) -> bool:
    zero_pads = not any(geo.pads_begin) and not any(geo.pads_end)
    uncropped = all(
        a.pad_begin == 0 and a.pad_end == 0 and a.crop_begin == 0 and len(a.taps) == a.stride for a in axes
    )
    return zero_pads or uncropped


def edge_padding(interp: list[InterpolationAxis], lengths) -> tuple[tuple[int, ...] | None, tuple]:
    """``(Site.pre_pad or None, the input lengths after that edge padding)``."""
    pads = tuple(a.pad_begin for a in interp) + tuple(a.pad_end for a in interp)
    if not any(pads):
        return None, tuple(lengths)
    return pads, tuple(None if n is None else n + a.pad_begin + a.pad_end for n, a in zip(lengths, interp))


def taps(node: NodeProto, index: GraphIndex) -> list[str]:
    return resize_taps(_upsampler(node, index), index)


def resize_taps(resize: NodeProto, index: GraphIndex) -> list[str]:
    """The Resize input, and the tensors whose shapes its computed scales/sizes read."""
    return [resize.input[0], *(t for name in resize.input[1:] if name for t in shape_arith.shape_reads(index, name))]


def resize_axes(resize: NodeProto, index: GraphIndex, rank: int) -> tuple[list[InterpolationAxis], tuple[str, ...]]:
    """Per spatial axis, the Resize/Upsample as an edge-padded transposed convolution, and the
    constants it reads.  Raises ValueError with the blocking attribute."""
    attrs = attributes(resize)
    mode = text(attrs.get("mode", "nearest"))
    if mode not in ("nearest", "linear", "bilinear", "trilinear"):
        raise ValueError(f"attribute mode={mode!r} is not nearest or linear")
    mode = "nearest" if mode == "nearest" else "linear"
    opset = index.opset
    consts: list[str] = []
    ctm, nm = "asymmetric", "floor"  # Upsample and Resize-10: x[floor(o / s)] and its linear version
    if resize.op_type == "Resize" and opset >= 11:
        ctm = text(attrs.get("coordinate_transformation_mode", "half_pixel"))
        nm = text(attrs.get("nearest_mode", "round_prefer_floor"))
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
            value, chain = _computed(index, names[scale_input], "scales")
            consts += chain
            if value:
                scales = _constant_scales(value)
        if scales is None and resize.op_type == "Resize" and opset >= 11 and names[3]:
            value, chain = _computed(index, names[3], "sizes")
            consts += chain
            policy = text(attrs.get("keep_aspect_ratio_policy", "stretch"))
            if policy != "stretch":
                raise ValueError(f"attribute keep_aspect_ratio_policy={policy!r} with sizes is not supported")
            scales = _scales_from_sizes(resize, index, value, attrs, full_rank)
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
    if any(s > MAX_FACTOR for s in spatial):
        raise ValueError(f"scales {spatial} exceed {MAX_FACTOR}, the largest factor this tool converts")
    try:
        axes = [interpolation_axis(int(s), mode, ctm, nm) for s in spatial]
    except ValueError as exc:
        raise ValueError(f"attribute {exc}") from None
    return axes, tuple(consts)


def _computed(index: GraphIndex, name: str, what: str) -> tuple[list, tuple[str, ...]]:
    """``scales``/``sizes`` as shape_arith elements (constants, or multiples of symbolic lengths
    where exporters computed them from Shape), and the tensors of that computation."""
    try:
        computed = shape_arith.evaluate(index, name)
    except NotConstant as exc:
        raise ValueError(f"{what} are not constant: {exc}") from None
    return computed.flat(), computed.tensors


def _constant_scales(values: list) -> list[float]:
    for i, v in enumerate(values):
        if isinstance(v, Unknown):
            raise ValueError(f"scales are not constant: {v.reason}")
        if not v.is_const:
            raise ValueError(f"scales[{i}] = {v.describe()} changes with the input size (symbolic lengths)")
    return [float(v.const) for v in values]


def _scales_from_sizes(resize, index, sizes: list, attrs, full_rank) -> list[float]:
    """Integer scales ``sizes / input lengths``.  A size computed as ``k·dim a`` of the Resize's own
    input is scale k at every input size; a fixed size needs that input length to be static."""
    axes = [int(a) % full_rank for a in attrs.get("axes", range(full_rank))]
    if len(sizes) != len(axes):
        raise ValueError(f"sizes have {len(sizes)} values for {len(axes)} axes")
    x = resize.input[0]
    static = index.static_shapes.get(x)
    static = static if static is not None and len(static) == full_rank else None
    # where inference gave no shape at all, plain constant sizes use the --shape / measured one
    assumed = index.assumed_shapes.get(x) if static is None and all(
        isinstance(v, Affine) and v.is_const for v in sizes) else None
    shape = static or (assumed if assumed is not None and len(assumed) == full_rank else None)
    scales = [1.0] * full_rank
    for i, (a, size) in enumerate(zip(axes, sizes)):
        if isinstance(size, Unknown):
            raise ValueError(f"sizes are not constant: {size.reason}")
        if not size.is_const:
            own = shape_arith.length_of(index, x, a)
            scale = size.ratio(Affine.of_dim(*own))
            if scale is None or scale < 1 or scale.denominator != 1:
                alias = f" (dim {own[1]} of '{own[0]}')" if own != (x, a) else ""
                raise ValueError(f"sizes[{i}] = {size.describe()} is not an integer multiple of dim {a} of the "
                                 f"Resize input '{x}'{alias} at every input size")
            scales[a] = float(scale)
            continue
        if static is not None and static[a] is None:
            raise ValueError(f"sizes[{i}] = {size.const} is fixed while dim {a} of the Resize input '{x}' is "
                             "symbolic: the scale would change with the input size")
        if shape is None or shape[a] is None:
            raise ValueError("sizes need a static input shape (pass --shape)")
        if size.const % shape[a]:
            values = [v.describe() for v in sizes]
            raise ValueError(f"sizes [{', '.join(values)}] are not integer multiples of the input shape {list(shape)}")
        scales[a] = float(size.const / shape[a])
    return [scales[a] for a in axes] if "axes" in attrs else scales


def parse(node: NodeProto, index: GraphIndex) -> Site | Refusal:
    name = node.name or node.output[0]
    resize = _upsampler(node, index)
    rname = resize.name or resize.output[0]

    def refuse(reason: str) -> Refusal:
        return Refusal(name, SOURCE, f"{resize.op_type} '{rname}' + Conv '{name}': {reason}")

    if resize.output[0] != node.input[0]:
        return refuse("the upsampled activation is quantized (QuantizeLinear/DequantizeLinear between them); "
                      "one transposed convolution cannot keep that quantization step")
    try:
        weight, _ = index.constant(node.input[1]) if len(node.input) > 1 else (None, ())
        rank = weight.ndim - 2 if weight is not None else 0
        interp, consts = resize_axes(resize, index, rank)
    except NotConstant:
        interp, consts = None, ()
    except ValueError as exc:
        return refuse(str(exc))
    return conv_site(node, index, SOURCE, interp, resize.input[0], index.spatial_lengths(resize.input[0], rank),
                     (resize.output[0],) + consts, refuse)


def conv_site(node: NodeProto, index: GraphIndex, source: str, interp, x: str, lengths, tensors, refuse,
              pre_perm=None) -> Site | Refusal:
    """The canonical site of an upsampling (per-axis ``interp``) of ``x`` followed by Conv ``node``.

    ``lengths`` are the spatial input lengths (in the Conv's layout), ``tensors`` the upsampling's
    tensors to drop when unused; ``pre_perm`` a Transpose that brings ``x`` into the Conv's layout.
    """
    name = node.name or node.output[0]
    try:
        weight, w_chain, bias, b_chain, geo = conv_weights(node, index)
    except ValueError as exc:
        return refuse(str(exc))
    rank = weight.ndim - 2
    if interp is None or len(interp) != rank:
        return refuse(f"the upsampling has {0 if interp is None else len(interp)} spatial axes, the Conv {rank}")
    if not foldable(interp, geo):
        return refuse("the Conv pads would read what the upsampling crops (not foldable); the Resize is "
                      "rewritten alone")
    group, kernel, dilations = geo.group, geo.kernel, geo.dilations
    axes = tuple(
        upsample_conv_axis(ia.axis(), k, d, geo.pads_begin[i], geo.pads_end[i])
        for i, (ia, k, d) in enumerate(zip(interp, kernel, dilations))
    )
    pre_pad, padded = edge_padding(interp, lengths)
    c_up = [n * a.stride if n is not None else None for n, a in zip(lengths, interp)]
    source_macs = None if None in c_up else int(weight.shape[0] * weight.shape[1] * np.prod(kernel) * np.prod(
        [n + b + e - (k - 1) * d for n, b, e, k, d in zip(c_up, geo.pads_begin, geo.pads_end, kernel, dilations)]))
    return Site(
        node=name,
        source=source,
        replaced_outputs=(node.output[0],),
        input=x,
        output=node.output[0],
        weight=upsample_conv_weight(weight, group, [a.taps for a in interp], dilations),
        magnitude_weight=upsample_conv_weight(np.abs(np.asarray(weight, np.float64)), group,
                                              [np.abs(np.asarray(a.taps)) for a in interp], dilations),
        bias=bias,
        group=group,
        axes=axes,
        input_lengths=padded,
        weight_tensors=w_chain + b_chain + tuple(tensors),
        pre_pad=pre_pad,
        pre_perm=pre_perm,
        source_macs=source_macs,
    )
