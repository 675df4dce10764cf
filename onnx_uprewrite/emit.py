"""Emitting one site in a target form: the emitter's nodes, plus what every form shares (input layout
Transpose, edge padding, re-quantization, the addend of a split Conv), checked against old opsets.

Layer: passes' emitters are handed in; imports weights/graph/surgery helpers only (api, site_check,
fastest and profile use it).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from .addend import emit as emit_with_addend
from .budget import weights_over_budget
from .sites import Site
from .surgery import Builder


def attribute_problem(node: onnx.NodeProto, opset: int) -> str | None:
    """Why an attribute of a default-domain node does not fit its operator schema (unknown name or
    wrong type), or None.  Parsers then never see an attribute of an unexpected type."""
    if node.domain not in ("", "ai.onnx"):
        return None
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except Exception:
        return None
    for attr in node.attribute:
        spec = schema.attributes.get(attr.name)
        if spec is None:
            return f"attribute '{attr.name}' is not an attribute of {node.op_type}-{schema.since_version}"
        if attr.type != spec.type.value:
            got = onnx.AttributeProto.AttributeType.Name(attr.type)
            return (f"attribute '{attr.name}' has type {got}, the {node.op_type} schema requires "
                    f"{onnx.AttributeProto.AttributeType.Name(spec.type.value)}")
    return None


def emit_site(site: Site, emitter, b: Builder, opset: int, budget: int | None = None) -> str:
    """Emit ``site`` with ``emitter`` into ``b``, with its input layout, edge padding and re-quantization;
    returns the description of the form.  ValueError says why the form is not possible (including
    weights too big for the memory ``budget``, checked before any is computed)."""
    if site.addend is not None:  # a split Conv: the upsampled part in this form, plus the rest (addend.py)
        return emit_with_addend(site, lambda part: emit_site(part, emitter, b, opset, budget), b, opset)
    too_big = weights_over_budget(emitter.weight_count(site), budget)
    if too_big:
        raise ValueError(f"the {emitter.FORM} form {too_big}")
    target = prepared(site, b, opset)
    if site.requantize is not None:
        if opset < 10:
            raise ValueError(f"opset {opset} has no QuantizeLinear to re-apply the removed Q/DQ pair")
        target = dataclasses.replace(target, output=b.namer(f"{site.node}/before_requantize"))
    form = emitter.emit(target, b, opset)
    if opset < 7 and (old := legacy_opset_problem(b.emission.nodes, opset)):
        raise ValueError(old)
    if site.requantize is not None:
        b.quantize_dequantize(target.output, *site.requantize, output=site.output)
        form += " + QuantizeLinear/DequantizeLinear"
    if site.pre_pad:
        form = f"Pad(edge) + {form}"
    if site.pre_perm:
        form = f"Transpose{list(site.pre_perm)} + {form}"
    return form


#: element-wise ops whose versions before opset 7 broadcast only with the legacy ``broadcast`` attribute
LEGACY_BROADCAST_OPS = frozenset({"Add", "Sub", "Mul", "Div"})


def legacy_opset_problem(nodes, opset: int) -> str | None:
    """Why emitted ``nodes`` are not valid at an opset before 7 (an op the opset lacks, an attribute or
    input its version does not take, legacy broadcasting), or None: emitters write opset-7+ forms."""
    for node in nodes:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in LEGACY_BROADCAST_OPS:
            return (f"opset {opset}: {node.op_type} broadcasts only with the legacy 'broadcast' attribute before "
                    "opset 7; this form needs it")
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, "")
        except onnx.defs.SchemaError:
            return f"opset {opset} has no {node.op_type}"
        bad = attribute_problem(node, opset)
        if bad is None and not schema.min_input <= len(node.input) <= schema.max_input:
            bad = f"takes {schema.min_input} to {schema.max_input} inputs, this form gives it {len(node.input)}"
        if bad:
            return f"opset {opset}: {node.op_type}-{schema.since_version} {bad.replace(f'of {node.op_type}-', 'of version ')}"
    return None


def prepared(site: Site, b: Builder, opset: int) -> Site:
    """The site reading its input through ``Transpose`` (``pre_perm``) and ``Pad(edge)`` (``pre_pad``)."""
    if site.pre_perm:
        site = dataclasses.replace(site, input=b.node("Transpose", [site.input], "layout", perm=list(site.pre_perm)),
                                   pre_perm=None)
    if not site.pre_pad:
        return site
    rank = site.rank
    pads = [0, 0] + list(site.pre_pad[:rank]) + [0, 0] + list(site.pre_pad[rank:])
    if opset < 11:
        padded = b.node("Pad", [site.input], "edge_pad", mode="edge", pads=pads)
    else:
        padded = b.node("Pad", [site.input, b.constant("edge_pads", np.array(pads, dtype=np.int64))], "edge_pad",
                        mode="edge")
    return dataclasses.replace(site, input=padded)


