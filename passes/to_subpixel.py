"""Emitter: canonical site -> ``Conv`` (stride 1, Cout*S outputs) -> depth-to-space -> ``Slice``.

Every output phase of a transposed convolution is an ordinary stride-1 convolution of the
low-resolution input with a sub-kernel of taps ``W[r + s*t]`` (DESIGN.md §2a, min-align: phase
offset ``a = pb mod s``).  One Conv computes all S = prod(s) phases as CRD channels ``c*S + r``,
a depth-to-space interleaves them, a Slice crops ``[c*s + a, +Lout)``.  Exact for every
attribute combination: the weights are rearranged, never combined.

Depth-to-space is ``DepthToSpace(mode=CRD)`` for 2-D sites with equal strides at opset >= 11
(CRD keeps groups contiguous, so grouped sites stay grouped), otherwise Reshape -> Transpose ->
Reshape.  A stride-1 site becomes a plain Conv (+ Slice when it crops).
"""

from __future__ import annotations

import math

import numpy as np

from onnx_uprewrite.sites import Site
from onnx_uprewrite.surgery import Builder
from onnx_uprewrite.weights import plan_subpixel_axis, subpixel_bias, subpixel_weight

FORM = "subpixel"


def _to_dcr(values: np.ndarray, channels: int, n_phase: int) -> np.ndarray:
    """Conv output channels in CRD order (``c*S + p``) -> DCR order (``p*C + c``), along axis 0."""
    return values.reshape(channels, n_phase, *values.shape[1:]).swapaxes(0, 1).reshape(values.shape)


def emit(site: Site, b: Builder, opset: int, layout: str = "CRD") -> str:
    """Append the sub-pixel form of ``site`` to ``b``; returns a one-line description of it.

    ``layout`` is the DepthToSpace mode: CRD (PyTorch's PixelShuffle order) or DCR (TensorFlow's
    depth_to_space, the only one some compilers take): the Conv's output channels are permuted to
    match, so both are exact.  DCR needs 2-D square strides and group 1 (a grouped Conv keeps each
    group's channels together, which DCR's phase-major order splits)."""
    if opset < 7:
        raise ValueError(f"opset {opset} < 7 is not supported for emission")
    plans = tuple(plan_subpixel_axis(a) for a in site.axes)
    strides = tuple(a.stride for a in site.axes)
    n_phase = math.prod(strides)
    rank = site.rank
    c_out = site.out_channels
    dcr = layout == "DCR" and n_phase > 1
    if dcr and not (rank == 2 and strides[0] == strides[1] and opset >= 11):
        raise ValueError(f"DepthToSpace DCR needs 2-D square strides and opset >= 11 (strides {list(strides)}, "
                         f"opset {opset})")
    if dcr and site.group != 1:
        raise ValueError(f"DepthToSpace DCR cannot follow a grouped Conv (group {site.group}): DCR's phase-major "
                         "channel order mixes the groups")
    order = (lambda v: _to_dcr(v, c_out, n_phase)) if dcr else (lambda v: v)
    weight = b.weight("weight", site.weight, site.weight_quant,
                      lambda w: order(subpixel_weight(w, site.group, plans)), 0, opset)
    inputs = [site.input, weight]
    if site.phase_bias is not None:  # [C, s...] by phase: already CRD order when flattened
        inputs.append(b.constant("bias", order(site.phase_bias.reshape(-1))))
    elif site.bias is not None:
        inputs.append(b.weight("bias", site.bias, site.bias_quant, lambda v: order(subpixel_bias(v, n_phase)), 0,
                               opset))
    crop = any(p.crop_start or p.crop_drop_end for p in plans)
    steps_after_conv = (n_phase > 1) + crop
    y = b.node(
        "Conv", inputs, "conv",
        output=site.output if steps_after_conv == 0 else None,
        kernel_shape=[p.kernel for p in plans],
        pads=[p.pad_begin for p in plans] + [p.pad_end for p in plans],
        dilations=[p.dilation for p in plans],
        strides=[1] * rank,
        group=site.group,
    )
    parts = [f"Conv {'x'.join(str(p.kernel) for p in plans)} -> {c_out * n_phase} ch"]
    if site.output_quant is not None and steps_after_conv and opset >= 10:
        # QDQ model: quantize the Conv output as the site output is quantized; exact, since
        # depth-to-space and Slice only move values and Q(DQ(Q(v))) == Q(v)
        y = b.quantize_dequantize(y, *site.output_quant)
        parts.append("Q/DQ")
    if n_phase > 1:
        last = site.output if not crop else None
        if rank == 2 and strides[0] == strides[1] and opset >= 11:
            mode = "DCR" if dcr else "CRD"
            y = b.node("DepthToSpace", [y], "depth_to_space", output=last, blocksize=strides[0], mode=mode)
            parts.append(f"DepthToSpace({strides[0]}, {mode})")
        else:
            q = [None if n is None else n + p.conv_extra for n, p in zip(site.input_lengths, plans)]
            y = _shuffle(b, y, c_out, strides, q, last)
            parts.append("Reshape-Transpose-Reshape")
    if crop:
        _crop(b, y, plans, site.output, opset)
        parts.append("Slice")
    return " + ".join(parts)


def _shuffle(b: Builder, y: str, channels: int, strides, q, output) -> str:
    """``[N, C*S, Q...]`` (CRD) -> ``[N, C, Q0*s0, ...]`` via Reshape -> Transpose -> Reshape."""
    rank = len(strides)
    perm = [0, 1] + [x for i in range(rank) for x in (2 + rank + i, 2 + i)]
    if sum(v is None for v in q) <= 1:
        shape1 = [0, channels, *strides, *(-1 if v is None else v for v in q)]
        shape2 = [0, channels, *(-1 if v is None else v * s for v, s in zip(q, strides))]
        s1 = b.constant("shape_split", np.array(shape1, dtype=np.int64))
        s2 = b.constant("shape_merge", np.array(shape2, dtype=np.int64))
    else:  # several symbolic spatial dims: build the shapes at run time
        shape = b.node("Shape", [y], "shape")
        batch = b.node("Gather", [shape, b.constant("batch_axis", np.array([0], dtype=np.int64))], "batch", axis=0)
        spatial = b.node(
            "Gather", [shape, b.constant("spatial_axes", np.arange(2, 2 + rank, dtype=np.int64))], "spatial", axis=0
        )
        head = b.constant("split_head", np.array([channels, *strides], dtype=np.int64))
        s1 = b.node("Concat", [batch, head, spatial], "shape_split", axis=0)
        scaled = b.node("Mul", [spatial, b.constant("strides", np.array(strides, dtype=np.int64))], "scaled")
        s2 = b.node("Concat", [batch, b.constant("channels", np.array([channels], dtype=np.int64)), scaled],
                    "shape_merge", axis=0)
    z = b.node("Reshape", [y, s1], "split_phases")
    z = b.node("Transpose", [z], "interleave", perm=perm)
    return b.node("Reshape", [z, s2], "merge_phases", output=output)


def _crop(b: Builder, y: str, plans, output: str, opset: int) -> str:
    axes = [2 + i for i, p in enumerate(plans) if p.crop_start or p.crop_drop_end]
    starts = [plans[a - 2].crop_start for a in axes]
    ends = [-plans[a - 2].crop_drop_end or None for a in axes]
    return b.slice(y, starts, ends, axes, opset, output=output)


class Layout:
    """The sub-pixel emitter with DepthToSpace in ``mode`` (an emitter like the modules in EMITTERS)."""

    FORM = FORM

    def __init__(self, mode: str):
        self.mode = mode

    def emit(self, site: Site, b: Builder, opset: int) -> str:
        return emit(site, b, opset, layout=self.mode)

    @staticmethod
    def macs(site: Site) -> int | None:
        return macs(site)

    @staticmethod
    def weight_count(site: Site) -> int:
        return weight_count(site)


#: the sub-pixel form with DepthToSpace DCR (for targets that run only DCR)
DCR = Layout("DCR")


def weight_count(site: Site) -> int:
    """Elements of the emitted Conv weight (every phase of every output channel)."""
    plans = [plan_subpixel_axis(a) for a in site.axes]
    n_phase = math.prod(a.stride for a in site.axes)
    return site.out_channels * n_phase * (site.in_channels // site.group) * math.prod(p.kernel for p in plans)


def macs(site: Site) -> int | None:
    """Multiply-accumulates per sample of the emitted Conv (None when input lengths are symbolic)."""
    if any(n is None for n in site.input_lengths):
        return None
    plans = [plan_subpixel_axis(a) for a in site.axes]
    positions = math.prod(n + p.conv_extra for n, p in zip(site.input_lengths, plans))
    taps = math.prod(p.kernel for p in plans)
    n_phase = math.prod(a.stride for a in site.axes)
    return site.out_channels * n_phase * (site.in_channels // site.group) * taps * positions
