"""The catalogue of rewrites: one module per source parser (``from_*``) and target emitter (``to_*``).

Explicit, ordered registries; ``onnx_uprewrite.api`` runs every parser over the graph and
hands each site to the emitter of the requested form.
"""

from . import from_convtranspose, from_repeat_conv, from_resize, from_resize_concat_conv, from_resize_conv, from_subpixel, from_zero_insertion, to_convtranspose, to_resize, to_subpixel

#: parsers, tried in order on every node; each has ``SOURCE`` (its form), ``matches(node, index)``,
#: ``taps(node, index)`` (tensors whose measured shapes it needs), ``parse(node, index)`` (a Site, with
#: its source-form MACs in ``source_macs``, or a Refusal)
PARSERS = (from_convtranspose, from_zero_insertion, from_resize_conv, from_resize, from_repeat_conv, from_subpixel,
           from_resize_concat_conv)

#: emitters by target form; each has ``emit(site, builder, opset)``, ``macs(site)`` and
#: ``weight_count(site)`` (elements of the weights it would write, computed without writing them)
EMITTERS = {to_subpixel.FORM: to_subpixel, to_resize.FORM: to_resize, to_convtranspose.FORM: to_convtranspose}

__all__ = ["PARSERS", "EMITTERS"]
