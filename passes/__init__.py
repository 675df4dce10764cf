"""The catalogue of rewrites: one module per source parser (``from_*``) and target emitter (``to_*``).

Explicit, ordered registries; ``onnx_uprewrite.api`` runs every parser over the graph and
hands each site to the emitter of the requested form.
"""

from typing import Protocol

from onnx import NodeProto

from onnx_uprewrite.sites import GraphIndex, Refusal, Site
from onnx_uprewrite.surgery import Builder

from . import from_convtranspose, from_repeat_conv, from_resize, from_resize_concat_conv, from_resize_conv, from_subpixel, from_zero_insertion, to_convtranspose, to_resize, to_subpixel

#: parsers, tried in order on every node (the Parser protocol below)
PARSERS = (from_convtranspose, from_zero_insertion, from_resize_conv, from_resize, from_repeat_conv, from_subpixel,
           from_resize_concat_conv)

#: emitters by target form (the Emitter protocol below)
EMITTERS = {to_subpixel.FORM: to_subpixel, to_resize.FORM: to_resize, to_convtranspose.FORM: to_convtranspose}

# Everything below is derived from the two registries: a new form is one module plus one line above.

#: target forms (``--to``)
FORMS = tuple(EMITTERS)
#: source forms (``--from``), in parser order
SOURCES = tuple(dict.fromkeys(p.SOURCE for p in PARSERS))
#: op types that mark a node as being in each form already
FORM_OPS = {form: tuple(e.IN_FORM_OPS) for form, e in EMITTERS.items()}
#: op type -> form, for the ops that mark a form (an upsampling op wherever it is, subgraphs too)
OP_FORMS = {op: form for form, ops in FORM_OPS.items() for op in ops}
#: op type -> source, for ops that identify a parser's site: a bad attribute there refuses the site
SITE_OPS = {op: p.SOURCE for p in PARSERS for op in getattr(p, "OWN_OPS", ())}
#: named layouts of the forms that have them (``--d2s-mode``: the sub-pixel form's)
LAYOUTS = {name: layout for e in EMITTERS.values() for name, layout in getattr(e, "LAYOUTS", {}).items()}


def variants(purpose: str, site) -> list[tuple[str, object]]:
    """Every ``(label, emitter)`` the emitters offer a strategy for ``site``: ``purpose`` is
    ``"profile"`` (forms a target may run) or ``"fastest"`` (forms worth timing); labels are
    ``form`` or ``form/layout``."""
    return [v for _, e in sorted(EMITTERS.items()) for v in e.variants(purpose, site)]


class Parser(Protocol):
    """A source form.  ``matches`` is cheap and never raises for nodes of other shapes; ``index`` is
    None only where no graph can be indexed.  ``taps`` names the tensors whose run-time shapes the
    parse needs (measured in onnxruntime before ``parse``).  ``parse`` returns the canonical Site (with
    the source form's MACs in ``source_macs`` where the Site's own count would differ) or a Refusal
    naming the node and the blocking attribute; it never returns None for a matched node."""

    SOURCE: str

    def matches(self, node: NodeProto, index: GraphIndex | None) -> bool: ...
    def taps(self, node: NodeProto, index: GraphIndex) -> list[str]: ...
    def parse(self, node: NodeProto, index: GraphIndex) -> Site | Refusal: ...


class Emitter(Protocol):
    """A target form.  ``emit`` appends the form of ``site`` to the builder and returns a one-line
    description, or raises ValueError saying why the form is not possible for this site (never an
    approximation).  ``macs`` is per sample, None where input lengths are symbolic; ``weight_count``
    counts the weight elements it would write, computed without writing them.  ``IN_FORM_OPS`` mark a
    node as already in this form; ``variants`` lists the layouts a strategy may choose among."""

    FORM: str
    IN_FORM_OPS: tuple[str, ...]

    def emit(self, site: Site, b: Builder, opset: int) -> str: ...
    def macs(self, site: Site) -> int | None: ...
    def weight_count(self, site: Site) -> int: ...
    def variants(self, purpose: str, site: Site) -> list[tuple[str, object]]: ...


__all__ = ["PARSERS", "EMITTERS", "FORMS", "SOURCES", "FORM_OPS", "OP_FORMS", "SITE_OPS", "LAYOUTS", "variants", "Parser", "Emitter"]
