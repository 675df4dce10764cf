"""Emitter: canonical site -> one ``ConvTranspose`` with explicit pads (+ ``Pad``/``Slice``/``Add``).

Per axis onnxruntime 1.31 computes ``G[o] = F[o + pad_begin]`` for
``0 <= o < s(L-1) + Keff + op - pad_begin - pad_end`` (``F`` zero beyond the full result), and
requires ``pads >= 0`` and ``0 <= op < s``.  The site wants ``y[o] = F[o + pb]`` for
``0 <= o < s*L + e``, so with ``t = Keff - s - e - pb`` (independent of L):

- plain: ``pad_begin = pb``, ``pad_end = t, op = 0`` when ``t >= 0``, else ``pad_end = 0, op = -t``.
  Exact whenever ``pb >= 0`` and ``-t < s``.
- otherwise (leading zeros ``pb < 0``, or an output longer than the full result by ``s`` or more;
  DESIGN.md §2 last bullet): the ConvTranspose without bias and with pads clipped into range,
  then ``Pad`` (zeros) and/or ``Slice`` to the exact crop, then ``Add(bias[C, 1, ...])``.

Both are exact for every site: no weight is changed (``W[Cin, Cout/g, K...]`` goes in as-is) and
the extra nodes only move or insert zeros.  Pads and crops are constants, so symbolic input
lengths work; the clipped pads are also shrunk so that the ConvTranspose output is never empty
for the shortest input the site accepts.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

from onnx_uprewrite.sites import Site
from onnx_uprewrite.surgery import Builder
from onnx_uprewrite.weights import Axis, phase_pattern

FORM = "convtranspose"
#: nodes of this op type are in the transposed-convolution form already
IN_FORM_OPS = ("ConvTranspose",)


@dataclass(frozen=True)
class _AxisPlan:
    """ConvTranspose pads of one axis and the zero-padding/cropping of its output afterwards."""

    pad_begin: int
    pad_end: int
    output_padding: int
    zeros_begin: int = 0  # Pad after the ConvTranspose
    zeros_end: int = 0
    crop_begin: int = 0  # then Slice [crop_begin, len - crop_end)
    crop_end: int = 0

    @property
    def plain(self) -> bool:
        return not (self.zeros_begin or self.zeros_end or self.crop_begin or self.crop_end)


def _plan_axis(axis: Axis, length: int | None) -> _AxisPlan:
    """Pads reproducing ``y[o] = F[o + pb]``, ``0 <= o < s*L + e``; ``length`` None = symbolic."""
    s, keff, pb = axis.stride, axis.effective_kernel, axis.crop_begin
    t = keff - s - axis.extension - pb  # pad_end - output_padding that gives the wanted length
    if pb >= 0 and -t < s:
        return _AxisPlan(pb, max(t, 0), max(-t, 0))
    pad_begin, pad_end, op = max(pb, 0), max(t, 0), min(max(-t, 0), s - 1)
    # the shortest input with a non-empty output must still give the ConvTranspose >= 1 position
    shortest = length if length is not None else max(1, -((axis.extension - 1) // s))
    short = 1 - (s * (shortest - 1) + keff + op - pad_begin - pad_end)
    if short > 0:
        cut = min(short, pad_end)
        pad_end -= cut
        pad_begin -= short - cut  # cannot go below 0: with no pads the output is >= Keff >= 1
    begin = pb - pad_begin  # > 0: positions to drop, < 0: zeros to insert
    end = t + op - pad_end  # > 0: positions to drop at the end, < 0: zeros to append
    return _AxisPlan(pad_begin, pad_end, op, max(-begin, 0), max(-end, 0), max(begin, 0), max(end, 0))


def emit(site: Site, b: Builder, opset: int) -> str:
    """Append the ConvTranspose form of ``site`` to ``b``; returns a one-line description of it."""
    for i, (axis, n) in enumerate(zip(site.axes, site.input_lengths)):
        if n is not None and axis.output_length(n) < 1:
            raise ValueError(f"spatial axis {i} has output length {axis.output_length(n)} < 1")
    plans = [_plan_axis(a, n) for a, n in zip(site.axes, site.input_lengths)]
    plain = all(p.plain for p in plans) and site.phase_bias is None
    if not plain and opset < 7:
        raise ValueError(f"opset {opset} < 7: the Pad/Slice/Add(bias) fallback needs broadcasting Add")
    attrs = {
        "kernel_shape": [a.kernel for a in site.axes],
        "strides": [a.stride for a in site.axes],
        "dilations": [a.dilation for a in site.axes],
        "group": site.group,
        "pads": [p.pad_begin for p in plans] + [p.pad_end for p in plans],
    }
    if any(p.output_padding for p in plans):
        attrs["output_padding"] = [p.output_padding for p in plans]
    inputs = [site.input, b.weight("weight", site.weight, site.weight_quant, _same, 1, opset)]
    kernel = "x".join(str(a.kernel) for a in site.axes)
    head = f"ConvTranspose {kernel} pads {attrs['pads']}" + (
        f" output_padding {attrs['output_padding']}" if "output_padding" in attrs else ""
    )
    if plain:
        if site.bias is not None:
            inputs.append(b.weight("bias", site.bias, site.bias_quant, _same, 0, opset))
        b.node("ConvTranspose", inputs, "conv_transpose", output=site.output, **attrs)
        return head

    pad = any(p.zeros_begin or p.zeros_end for p in plans)
    crop = any(p.crop_begin or p.crop_end for p in plans)
    bias = site.bias is not None or site.phase_bias is not None
    y = b.node("ConvTranspose", inputs, "conv_transpose", **attrs)
    parts = [head + " (no bias)"]
    if pad:  # Pad before Slice: the Slice then never clamps, even when the output is all zeros
        last = site.output if not (crop or bias) else None
        y = _pad(b, y, plans, last, opset)
        parts.append("Pad")
    if crop:
        y = _slice(b, y, plans, None if bias else site.output, opset)
        parts.append("Slice")
    if bias:
        add_bias(b, y, site, site.output, opset)
        parts.append("Add(bias)" if site.phase_bias is None else "Add(per-phase bias, Tile)")
    return " + ".join(parts)


def _same(value: np.ndarray) -> np.ndarray:
    return value


def add_bias(b: Builder, y: str, site: Site, output: str | None, opset: int) -> str:
    """``y + bias``: a per-channel constant, or a periodic one built by Tile for a per-phase bias."""
    if site.phase_bias is None:
        shaped = b.weight("bias", site.bias, site.bias_quant, lambda v: v.reshape((-1,) + (1,) * site.rank), 0, opset)
    else:
        shaped = b.periodic(
            phase_pattern(site.phase_bias, site.axes), site.input, [a.stride for a in site.axes],
            [a.extension for a in site.axes], site.input_lengths, opset,
        )
    return b.node("Add", [y, shaped], "bias", output=output)


def _pad(b: Builder, y: str, plans, output: str | None, opset: int) -> str:
    pads = [0, 0] + [p.zeros_begin for p in plans] + [0, 0] + [p.zeros_end for p in plans]
    if opset < 11:
        return b.node("Pad", [y], "pad", output=output, pads=pads, mode="constant", value=0.0)
    return b.node("Pad", [y, b.constant("pads", np.array(pads, dtype=np.int64))], "pad", output=output,
                  mode="constant")


def _slice(b: Builder, y: str, plans, output: str | None, opset: int) -> str:
    axes = [2 + i for i, p in enumerate(plans) if p.crop_begin or p.crop_end]
    starts = [plans[a - 2].crop_begin for a in axes]
    ends = [-plans[a - 2].crop_end or None for a in axes]
    return b.slice(y, starts, ends, axes, opset, output=output)


def weight_count(site: Site) -> int:
    """Elements of the emitted ConvTranspose weight."""
    return site.in_channels * (site.out_channels // site.group) * math.prod(a.kernel for a in site.axes)


def macs(site: Site) -> int | None:
    """Multiply-accumulates per sample of the ConvTranspose (every input scatters every tap).

    onnxruntime computes every tap of the full result (GEMM, then col2im drops what the pads cut).
    """
    if any(n is None for n in site.input_lengths):
        return None
    taps = math.prod(a.kernel for a in site.axes)
    return site.in_channels * (site.out_channels // site.group) * taps * math.prod(site.input_lengths)


def variants(purpose: str, site: Site) -> list[tuple[str, object]]:
    """``(label, emitter)`` offered to a strategy: this form (not timed against itself by ``"fastest"``)."""
    return [] if purpose == "fastest" and site.source == FORM else [(FORM, sys.modules[__name__])]
