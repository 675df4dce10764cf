"""Emitter: canonical site -> ``Resize``(nearest, integer scale) [x phase mask] -> ``Conv`` [-> ``Slice``].

Nearest upsampling ``u[t] = x[t // s]`` is a transposed convolution with a box kernel, so a
stride-1 Conv after it computes the transposed convolution with ``W = box_s ⊛ G`` (DESIGN.md
§2c).  When the site's dense (dilation-expanded) kernel factors that way on every axis, the Conv
takes ``flip(G)`` (``Kg = Keff - s + 1`` taps) with channels swapped per group.  Otherwise the
emitter writes the always-exact masked form (DESIGN.md §2b): nearest upsampling times a constant
0/1 phase mask is zero insertion, and a Conv with ``flip(W)`` and the site's dilation then
computes the transposed convolution directly (about S times the MACs: a fallback, and the
report says so).

A box-factored 1x1 Conv without pads (``G`` of size 1 on every axis, e.g. nearest x s + pointwise
Conv) commutes with nearest replication: ``Conv1x1(up(x)) = up(Conv1x1(x))`` for any group, so it
runs first, at the input resolution (s^d fewer MACs), and the Resize follows.

Per axis, with kernel length Kc and dilation dc of the emitted Conv (``Kc_eff = (Kc-1)*dc + 1``),
the Conv pads are ``Pb = Kc_eff - 1 - pb`` and ``Pe = e + pb``; negative pads become a Slice.
The upsampling is Upsample-7/9, Resize-10, or Resize-11+ with ``asymmetric`` + ``floor`` (plain
replication, DESIGN.md §3).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

from onnx_uprewrite.sites import Site
from onnx_uprewrite.surgery import Builder
from onnx_uprewrite.weights import dilate_kernel, factor_box, transposed_to_conv_weight

from .to_convtranspose import add_bias

FORM = "resize"
#: nodes of these op types are in the resize form already
IN_FORM_OPS = ("Resize", "Upsample")


@dataclass(frozen=True)
class _ConvPlan:
    weight: np.ndarray  # Conv weight [Cout, Cin/g, Kc...]
    transform: object  # site.weight -> weight
    dilations: tuple[int, ...]
    masked: bool
    why_masked: str


#: dilated kernels with more taps than this are not tried for box factoring (which would need the
#: dense kernel in memory); they take the masked form
MAX_DENSE_TAPS = 1 << 16


def _plan(site: Site) -> _ConvPlan:
    strides = [a.stride for a in site.axes]
    dense_taps = math.prod(a.effective_kernel for a in site.axes)
    if dense_taps > MAX_DENSE_TAPS and dense_taps > math.prod(a.kernel for a in site.axes):
        factor, why = None, f"box factoring not tried: the dilated kernel would have {dense_taps:,} taps"
    elif site.weight_quant is not None:
        factor, why = None, "integer weights (QDQ): a box-factored kernel would change their values"
    elif np.issubdtype(site.weight.dtype, np.floating):
        eps = float(np.finfo(site.weight.dtype).eps)
        dense = dilate_kernel(site.weight, [a.dilation for a in site.axes])
        factor, why = factor_box(dense, strides, rtol=4 * eps * max(strides))
    else:
        factor, why = None, f"weight dtype {site.weight.dtype} is not a float type"
    if factor is not None:
        return _ConvPlan(transposed_to_conv_weight(factor, site.group), None, (1,) * site.rank, False, "")

    def flipped(w):
        return transposed_to_conv_weight(w, site.group)
    return _ConvPlan(flipped(site.weight), flipped, tuple(a.dilation for a in site.axes), True, why)


def emit(site: Site, b: Builder, opset: int) -> str:
    """Append the Resize + Conv form of ``site`` to ``b``; returns a one-line description of it."""
    if opset < 7:
        raise ValueError(f"opset {opset} < 7 has no Upsample with integer scales")
    plan = _plan(site)
    strides = [a.stride for a in site.axes]
    kernel = plan.weight.shape[2:]
    pads_begin, pads_end, crops = _conv_pads(site, kernel, plan.dilations)
    commuted = _commutes(plan, pads_begin, pads_end)
    upsample = f"{'Resize' if opset >= 10 else 'Upsample'}(nearest, x{'x'.join(map(str, strides))})"
    parts = [] if commuted else [upsample]
    upsampled = site.input if commuted else _upsample(b, site.input, strides, site.rank, opset)
    if plan.masked:
        pattern = np.zeros([1] + strides, dtype=site.weight.dtype)
        pattern[(0,) + (0,) * site.rank] = 1
        mask = b.periodic(pattern, site.input, strides, [0] * site.rank, site.input_lengths, opset)
        upsampled = b.node("Mul", [upsampled, mask], "zero_insert")
        parts.append("phase mask (zero insertion)")
    crop = any(c != (0, 0) for c in crops)
    phase_bias = site.phase_bias is not None
    if plan.transform is None:
        weight = b.constant("weight", plan.weight)
    else:  # the masked kernel only moves entries: a QDQ weight stays integer
        weight = b.weight("weight", site.weight, site.weight_quant, plan.transform, 0, opset)
    inputs = [upsampled, weight]
    if site.bias is not None and not phase_bias:
        inputs.append(b.weight("bias", site.bias, site.bias_quant, lambda v: v, 0, opset))
    last = site.output if not (crop or phase_bias or commuted) else None
    y = b.node("Conv", inputs, "conv", output=last, kernel_shape=list(kernel), pads=pads_begin + pads_end,
               dilations=list(plan.dilations), strides=[1] * site.rank, group=site.group)
    parts.append(f"Conv {'x'.join(map(str, kernel))}" + ("" if all(d == 1 for d in plan.dilations)
                                                        else f" dilations {list(plan.dilations)}"))
    if commuted:  # a pointwise Conv commutes with nearest replication: run it at the low resolution
        y = _upsample(b, y, strides, site.rank, opset, output=None if (crop or phase_bias) else site.output)
        parts.append(upsample)
    if crop:
        axes = [2 + i for i, c in enumerate(crops) if c != (0, 0)]
        y = b.slice(y, [crops[a - 2][0] for a in axes], [-crops[a - 2][1] or None for a in axes], axes, opset,
                    output=None if phase_bias else site.output)
        parts.append("Slice")
    if phase_bias:
        add_bias(b, y, site, site.output, opset)
        parts.append("Add(per-phase bias, Tile)")
    text = " + ".join(parts)
    if commuted:
        return f"{text} [box-factored kernel, pointwise: the Conv runs before the upsampling]"
    return f"{text} [masked: {plan.why_masked}]" if plan.masked else f"{text} [box-factored kernel]"


def _conv_pads(site: Site, kernel, dilations) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Pads (begin, end) of the Conv on the upsampled input and the crops (begin, end) after it."""
    pads_begin, pads_end, crops = [], [], []
    for a, n, k, dc in zip(site.axes, site.input_lengths, kernel, dilations):
        span = (k - 1) * dc
        pb, pe = span - a.crop_begin, a.extension + a.crop_begin
        begin, end = max(pb, 0), max(pe, 0)
        # the Conv must produce >= 1 position for the shortest input: pad more, crop it again
        shortest = n if n is not None else max(1, -((a.extension - 1) // a.stride))
        short = 1 - (a.stride * shortest + begin + end - span)
        end += max(short, 0)
        crops.append((begin - pb, end - pe))
        pads_begin.append(begin)
        pads_end.append(end)
    return pads_begin, pads_end, crops


def commutes(site: Site) -> bool:
    """Whether this form of ``site`` runs its Conv before the upsampling (``_commutes``): then it differs
    from a Resize + Conv source, and --to fastest times it for those too."""
    plan = _plan(site)
    return _commutes(plan, *_conv_pads(site, plan.weight.shape[2:], plan.dilations)[:2])


def _commutes(plan: _ConvPlan, pads_begin, pads_end) -> bool:
    """A box-factored 1x1 Conv without pads: ``Conv1x1(up(x)) = up(Conv1x1(x))``, exact for any group
    (each output reads one position), with s^d fewer MACs.  Pads would put zeros (bias) between
    replicated values, so they keep the Conv after the upsampling."""
    return (not plan.masked and all(k == 1 for k in plan.weight.shape[2:])
            and not any(pads_begin) and not any(pads_end))


def _upsample(b: Builder, x: str, strides, rank: int, opset: int, output: str | None = None) -> str:
    scales = np.array([1.0, 1.0] + [float(s) for s in strides], dtype=np.float32)
    if opset < 9:
        return b.node("Upsample", [x], "upsample", output=output, mode="nearest", scales=scales.tolist())
    if opset == 9:
        return b.node("Upsample", [x, b.constant("scales", scales)], "upsample", output=output, mode="nearest")
    if opset == 10:
        return b.node("Resize", [x, b.constant("scales", scales)], "resize", output=output, mode="nearest")
    roi = "" if opset >= 13 else b.constant("roi", np.zeros(0, dtype=np.float32))  # required before 13
    return b.node("Resize", [x, roi, b.constant("scales", scales)], "resize", output=output, mode="nearest",
                  coordinate_transformation_mode="asymmetric", nearest_mode="floor")


def weight_count(site: Site) -> int:
    """Elements of the emitted Conv weight (at most the transposed kernel; the box-factored one is
    smaller) plus the one-period phase mask of the masked form."""
    return (site.out_channels * (site.in_channels // site.group) * math.prod(a.kernel for a in site.axes)
            + math.prod(a.stride for a in site.axes))


def macs(site: Site) -> int | None:
    """MACs per sample of the Conv the emitter writes: at the upsampled resolution, or at the input
    resolution where a pointwise Conv commutes with the upsampling (``_commutes``)."""
    if any(n is None for n in site.input_lengths):
        return None
    plan = _plan(site)
    kernel = plan.weight.shape[2:]
    taps = math.prod(kernel)
    if _commutes(plan, *_conv_pads(site, kernel, plan.dilations)[:2]):
        positions = math.prod(site.input_lengths)
    else:
        positions = math.prod(a.output_length(n) for a, n in zip(site.axes, site.input_lengths))
    return site.out_channels * (site.in_channels // site.group) * taps * positions


def variants(purpose: str, site: Site) -> list[tuple[str, object]]:
    """``(label, emitter)`` offered to a strategy: this form; for ``"fastest"`` not for a resize source
    unless the pointwise Conv can run before the upsampling (commutes: then it is a real alternative)."""
    if purpose == "fastest" and site.source == FORM and not commutes(site):
        return []
    return [(FORM, sys.modules[__name__])]
