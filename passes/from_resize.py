"""Parser: an integer-scale ``Resize``/``Upsample`` on its own, as an edge-padded depthwise transposed convolution.

Used for the Resizes whose following Conv cannot be folded in (``from_resize_conv``: a linear or
edge-clamped nearest Resize before a Conv with non-zero pads, DESIGN.md R3).  The Resize becomes
``Pad(edge)`` + a depthwise transposed convolution with the interpolation kernel
(weights.interpolation_axis), e.g. linear half_pixel x2: ``Pad(edge, 1)`` + triangle
``[1/4, 3/4, 3/4, 1/4]``, crop 3.  The Conv after it stays as it is.  Resizes that feed no Conv
are not learned-upsampling sites and are left alone.
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto

from onnx_uprewrite.sites import GraphIndex, Refusal, Site
from onnx_uprewrite.weights import interpolation_weight

from .from_resize_conv import edge_padding, merges, resize_axes, resize_taps

SOURCE = "resize"
#: op types identifying this source: a bad attribute on one refuses the site outright
OWN_OPS = ("Resize", "Upsample")


def _convs(node: NodeProto, index: GraphIndex) -> list[NodeProto]:
    return [c for c in index.consumers.get(node.output[0], [])
            if c.op_type == "Conv" and c.domain in ("", "ai.onnx") and c.input and c.input[0] == node.output[0]]


def matches(node: NodeProto, index: GraphIndex | None) -> bool:
    if index is None or node.op_type not in ("Resize", "Upsample") or node.domain not in ("", "ai.onnx"):
        return False
    return any(merges(c, node, index) is False for c in _convs(node, index))


def taps(node: NodeProto, index: GraphIndex) -> list[str]:
    return resize_taps(node, index)


def parse(node: NodeProto, index: GraphIndex) -> Site | Refusal:
    name = node.name or node.output[0]
    conv = next(c for c in _convs(node, index) if merges(c, node, index) is False)
    weight, _ = index.constant(conv.input[1])  # merges() read it: constant, rank >= 1
    rank = weight.ndim - 2
    axes, consts = resize_axes(node, index, rank)
    shape = index.static_shapes.get(node.input[0]) or index.assumed_shapes.get(node.input[0])
    if shape is None or len(shape) != rank + 2 or shape[1] is None:
        return Refusal(name, SOURCE, f"{node.op_type} '{name}': the channel count of input '{node.input[0]}' is "
                       "unknown (a depthwise kernel needs it; pass --shape)")
    lengths = index.spatial_lengths(node.input[0], rank)
    pre_pad, padded = edge_padding(axes, lengths)
    return Site(
        node=name,
        source=SOURCE,
        replaced_outputs=(node.output[0],),
        input=node.input[0],
        output=node.output[0],
        weight=interpolation_weight(axes, int(shape[1]), weight.dtype),
        bias=None,
        group=int(shape[1]),
        axes=tuple(a.axis() for a in axes),
        input_lengths=padded,
        weight_tensors=consts,
        pre_pad=pre_pad,
        notes=("interpolation as a depthwise transposed convolution; the Conv after it is kept",),
        source_macs=_interpolation_macs(axes, int(shape[1]), lengths),
    )


def _interpolation_macs(axes, channels: int, lengths) -> int | None:
    """Multiply-adds per sample of the interpolation: nonzero taps per output phase, times outputs."""
    if None in lengths:
        return None
    per_output = 1
    for a in axes:
        per_output *= max(1, sum(1 for t in a.taps if t) // a.stride)
    return channels * per_output * int(np.prod([n * a.stride for n, a in zip(lengths, axes)]))
