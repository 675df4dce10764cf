"""The rest of a Conv split by input channels: ``Conv(Concat(up(x), skip…)) = Conv_a(up(x)) + Conv_b(skip…)``.

A group-1 Conv sums over its input channels, so it splits exactly along the channel ranges of a
channel Concat feeding it: the part reading the upsampled tensor becomes a canonical site
(passes/from_resize_concat_conv.py) and this module emits the other part, a Conv with the same
pads and dilations over the other Concat inputs, added into the site's output.  The bias is added
once, by that Conv (a Conv bias costs nothing there; the site's emitters would otherwise need an
Add for some forms).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Addend:
    """``Conv_b(Concat(inputs))``: the part of a split Conv that reads the non-upsampled Concat inputs."""

    inputs: tuple[str, ...]  # the other Concat inputs, in Concat order
    channels: tuple[tuple[int, int], ...]  # their [start, stop) in the split Conv's input channels
    weight: np.ndarray  # Conv_b [Cout, sum of their channels, Kc...]: the split Conv's slices, in order
    pads: tuple[int, ...]  # begins..., ends... (the split Conv's, resolved)
    dilations: tuple[int, ...]
    absolute: bool = False  # read |inputs| (the magnitude model of per-site verification)

    @property
    def terms(self) -> int:
        """Products each output sums."""
        return int(self.weight.shape[1] * math.prod(self.weight.shape[2:]))

    def magnitude(self) -> Addend:
        """``|W_b| * |inputs|``, for the per-site tolerance (site_check.magnitude_emission)."""
        weight = np.abs(self.weight).astype(self.weight.dtype)
        return dataclasses.replace(self, weight=weight, absolute=True)

    def macs(self, output_lengths) -> int | None:
        """MACs per sample of Conv_b, given the spatial lengths of its output."""
        if output_lengths is None or None in output_lengths:
            return None
        return int(self.weight.size * math.prod(output_lengths))


def emit(site, emit_part, b, opset: int) -> str:
    """Emit ``site`` (whose ``addend`` is set) into Builder ``b``: its upsampled part by
    ``emit_part(part site)`` (any target form, without the bias), then Conv_b with the bias and an
    Add writing ``site.output``.  Returns the description of the form."""
    addend = site.addend
    if opset < 7:
        raise ValueError(f"opset {opset}: the split Conv needs Add with broadcasting rules of opset 7")
    part = dataclasses.replace(site, output=b.namer(f"{site.node}/upsampled_part"), bias=None, bias_quant=None,
                               addend=None)
    form = emit_part(part)
    inputs = [b.node("Abs", [t], "abs") for t in addend.inputs] if addend.absolute else list(addend.inputs)
    rest = inputs[0] if len(inputs) == 1 else b.node("Concat", inputs, "rest", axis=1)
    conv_inputs = [rest, b.constant("rest_weight", addend.weight)]
    if site.bias is not None:
        conv_inputs.append(b.constant("bias", site.bias))
    kernel = list(addend.weight.shape[2:])
    rank = len(kernel)
    y = b.node("Conv", conv_inputs, "rest_conv", kernel_shape=kernel, pads=list(addend.pads),
               dilations=list(addend.dilations), strides=[1] * rank, group=1)
    b.node("Add", [part.output, y], "sum", output=site.output)
    what = "the other Concat input" if len(inputs) == 1 else f"Concat of the other {len(inputs)} inputs"
    return f"{form} + Conv {'x'.join(map(str, kernel))} on {what} + Add"
