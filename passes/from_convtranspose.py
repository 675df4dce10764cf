"""Parser: ``ConvTranspose`` -> canonical site.

Padding attributes are resolved exactly as onnxruntime 1.31 computes them (DESIGN.md §3,
re-measured by tests/test_from_convtranspose.py), never from the spec text alone:

- explicit pads (NOTSET): ``pb = pads_begin``, ``Lout = s(L-1) + Keff + op - pb - pe``;
- VALID: ``pb = 0``, ``Lout = s(L-1) + Keff + op``;
- SAME_UPPER / SAME_LOWER: ``total = max(0, Keff - s + op)``, ``pb = floor(total/2)`` (UPPER)
  or ``ceil(total/2)`` (LOWER), ``Lout = s(L-1) + Keff + op - total`` (shorter than ``s*L``
  when ``Keff + op < s``);
- ``output_shape`` (pads ignored): ``total = max(0, s(L-1) + Keff + op - Lout)``, SAME_UPPER puts
  ``floor(total/2)`` first, NOTSET/SAME_LOWER/VALID ``ceil(total/2)``.  Needs a static L, and
  onnxruntime requires ``L == floor((Lout + total - Keff) / s) + 1``.
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto

from onnx_uprewrite.sites import GraphIndex, NotConstant, Refusal, Site, attributes
from onnx_uprewrite.weights import Axis

SOURCE = "convtranspose"
#: op types identifying this source: a bad attribute on one refuses the site outright
OWN_OPS = ("ConvTranspose",)
FLOAT_TYPES = ("float32", "float16", "float64", "bfloat16")


def matches(node: NodeProto, index: GraphIndex | None) -> bool:
    return node.op_type == "ConvTranspose" and node.domain in ("", "ai.onnx")


def taps(node: NodeProto, index: GraphIndex) -> list[str]:
    """Tensors whose run-time shapes the parser needs."""
    return [node.input[0]]


def resolve_axis(
    length: int | None,
    stride: int,
    kernel: int,
    dilation: int,
    output_padding: int,
    auto_pad: str,
    pad_begin: int,
    pad_end: int,
    output_size: int | None,
) -> tuple[int, int]:
    """``(pb, e)`` of one axis, with ``e = Lout - stride * L``; raises ValueError with a reason."""
    keff = (kernel - 1) * dilation + 1
    grow = keff - stride + output_padding  # full + op - s*L, independent of L
    if output_size is not None:
        if length is None:
            raise ValueError("output_shape needs a static input length (pass --shape)")
        total = max(0, stride * (length - 1) + keff + output_padding - output_size)
        if (output_size + total - keff) // stride + 1 != length:
            raise ValueError(
                f"output_shape {output_size} is inconsistent with input length {length} "
                "(onnxruntime rejects it at run time)"
            )
        pb = total // 2 if auto_pad == "SAME_UPPER" else -(-total // 2)
        return pb, output_size - stride * length
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        total = max(0, grow)
        pb = total // 2 if auto_pad == "SAME_UPPER" else -(-total // 2)
        return pb, grow - total
    if auto_pad == "VALID":
        return 0, grow
    return pad_begin, grow - pad_begin - pad_end


def parse(node: NodeProto, index: GraphIndex) -> Site | Refusal:
    name = node.name or node.output[0]

    def refuse(reason: str) -> Refusal:
        return Refusal(name, SOURCE, f"ConvTranspose '{name}': {reason}")

    try:
        weight, w_chain, bias, b_chain = index.weight_and_bias(node, "weight W", "bias B")
    except NotConstant as exc:
        return refuse(str(exc))
    try:
        weight_quant = index.quantized(node.input[1])
        bias_quant = index.quantized(node.input[2]) if bias is not None else None
    except NotConstant as exc:
        return refuse(str(exc))
    if weight.dtype.name not in FLOAT_TYPES and str(weight.dtype) != "bfloat16":
        return refuse(f"weight dtype {weight.dtype} is not a float type")
    rank = weight.ndim - 2
    if rank < 1:
        return refuse(f"weight has rank {weight.ndim}; expected at least 3")
    attrs = attributes(node)
    group = int(attrs.get("group", 1))
    kernel = tuple(int(k) for k in weight.shape[2:])
    if "kernel_shape" in attrs and tuple(attrs["kernel_shape"]) != kernel:
        return refuse(f"attribute kernel_shape {list(attrs['kernel_shape'])} disagrees with W shape {list(kernel)}")
    if group < 1 or weight.shape[0] % group:
        return refuse(f"attribute group={group} does not divide the {weight.shape[0]} input channels")
    if bias is not None and bias.shape != (weight.shape[1] * group,):
        return refuse(f"bias shape {list(bias.shape)} is not [{weight.shape[1] * group}]")

    geometry = _geometry(attrs, rank)
    if isinstance(geometry, str):
        return refuse(geometry)
    strides, dilations, output_padding, pads, auto_pad, output_shape = geometry

    lengths = index.spatial_lengths(node.input[0], rank)
    if output_shape is not None and None in lengths:
        return refuse("attribute output_shape fixes the output length whatever the input length, and the input "
                      "length is not static: the crop would depend on it, so no fixed rewrite is exact (declare a "
                      "static input shape in the model to rewrite at that size)")
    axes = []
    for i in range(rank):
        try:
            pb, e = resolve_axis(
                lengths[i], strides[i], kernel[i], dilations[i], output_padding[i], auto_pad,
                pads[i], pads[rank + i], None if output_shape is None else output_shape[i],
            )
        except ValueError as exc:
            return refuse(f"attribute output_shape: {exc}")
        axes.append(Axis(strides[i], dilations[i], kernel[i], pb, e))
        if lengths[i] is not None and axes[-1].output_length(lengths[i]) < 1:
            return refuse(f"spatial axis {i} would have output length {axes[-1].output_length(lengths[i])}")
    notes = []
    positions = None if None in lengths else int(np.prod(lengths))
    source_macs = None if positions is None else weight.shape[0] * weight.shape[1] * int(np.prod(kernel)) * positions
    if index.model.ir_version < 4 and any(t in index.graph_inputs for t in w_chain + b_chain):
        notes.append("weights are also listed as graph inputs (IR < 4 convention): treated as constant")
    replaced, output, tensors = (node.output[0],), node.output[0], w_chain + b_chain
    norm = _batch_norm_after(node, index, weight.shape[1] * group) if weight_quant is None else None
    if norm is not None:
        bn, params, p_chain = norm
        weight, bias = fold_batch_norm(weight, bias, group, *params)
        replaced, output, tensors = replaced + (bn.output[0],), bn.output[0], tensors + p_chain
        notes.append(f"BatchNormalization '{bn.name or bn.output[0]}' folded into the weights and bias")
    return Site(
        node=name,
        source=SOURCE,
        replaced_outputs=replaced,
        input=node.input[0],
        output=output,
        weight=weight,
        bias=bias,
        group=group,
        axes=tuple(axes),
        input_lengths=lengths,
        weight_tensors=tensors,
        notes=tuple(notes),
        source_macs=source_macs,
        weight_quant=weight_quant,
        bias_quant=bias_quant,
        output_quant=index.quantized_output(output) if weight_quant is not None else None,
    )



def _geometry(attrs: dict, rank: int) -> tuple | str:
    """``(strides, dilations, output_padding, pads, auto_pad, output_shape)`` of a ConvTranspose with
    ``rank`` spatial axes, defaults filled in and checked as onnxruntime checks them; a string says
    which attribute is out of range."""
    def per_axis(key, default):
        return [int(v) for v in attrs.get(key, [default] * rank)]

    strides, dilations, output_padding = per_axis("strides", 1), per_axis("dilations", 1), per_axis("output_padding", 0)
    pads = [int(v) for v in attrs.get("pads", [0] * (2 * rank))]
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    output_shape = attrs.get("output_shape")
    for key, value, want in (("strides", strides, rank), ("dilations", dilations, rank),
                             ("output_padding", output_padding, rank), ("pads", pads, 2 * rank)):
        if len(value) != want:
            return f"attribute {key} has {len(value)} values; expected {want}"
    if any(v < 1 for v in strides + dilations):
        return f"attributes strides={strides} dilations={dilations} must be positive"
    if any(p < 0 for p in pads):
        return f"attribute pads={pads} has negative values"
    if auto_pad not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
        return f"attribute auto_pad={auto_pad!r} is not one of NOTSET/SAME_UPPER/SAME_LOWER/VALID"
    if any(op < 0 or op >= s for op, s in zip(output_padding, strides)):
        # the spec allows op < max(stride, dilation); onnxruntime 1.31 rejects op >= stride at run time
        return (f"attribute output_padding={output_padding} must be in [0, stride={strides}) "
                "(onnxruntime rejects larger values)")
    if output_shape is not None:
        output_shape = [int(v) for v in output_shape]
        if len(output_shape) == rank + 2:
            output_shape = output_shape[2:]
        if len(output_shape) != rank:
            return f"attribute output_shape={output_shape} does not have {rank} spatial values"
        if any(v < 1 for v in output_shape):
            return f"attribute output_shape={output_shape} has non-positive values"
    return strides, dilations, output_padding, pads, auto_pad, output_shape


def _batch_norm_after(node: NodeProto, index: GraphIndex, channels: int):
    """``(bn node, (scale, B, mean, var, epsilon), constant chain)`` of an inference-mode
    BatchNormalization that is the only reader of the ConvTranspose output, or None."""
    out = node.output[0]
    readers = index.consumers.get(out, [])
    if index.uses(out) != 1 or len(readers) != 1:
        return None
    bn = readers[0]
    if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or list(bn.input[:1]) != [out]:
        return None
    if len(bn.input) != 5 or any(o and index.uses(o) for o in bn.output[1:]):
        return None  # training-mode outputs (running mean/var) are read: not an inference BN
    attrs = attributes(bn)
    if int(attrs.get("training_mode", 0)) or int(attrs.get("spatial", 1)) != 1 or int(attrs.get("is_test", 1)) != 1:
        return None
    try:
        values = [index.constant(t) for t in bn.input[1:]]
    except NotConstant:
        return None
    params = [np.asarray(v, dtype=np.float64).reshape(-1) for v, _ in values]
    if any(p.size != channels for p in params):
        return None
    chain = tuple(t for _, c in values for t in c)
    return bn, (*params, float(attrs.get("epsilon", 1e-5))), chain


def fold_batch_norm(weight, bias, group, scale, beta, mean, var, epsilon):
    """ConvTranspose ``(W [Cin, Cout/g, K...], b)`` followed by ``BatchNormalization`` -> one ConvTranspose.

    ``y = (x - mean) / sqrt(var + eps) * scale + beta`` per output channel ``o = g*Cout/g + c``,
    so ``W'[:, c] = W[:, c] * a[o]`` and ``b' = (b - mean) * a + beta`` with ``a = scale / sqrt(var + eps)``,
    computed in float64 and cast back (one rounding per value).
    """
    c_in, cog = weight.shape[:2]
    c_out = cog * group
    a = scale / np.sqrt(var + epsilon)
    w = weight.astype(np.float64).reshape((group, c_in // group, cog) + weight.shape[2:])
    w = w * a.reshape((group, 1, cog) + (1,) * (weight.ndim - 2))
    b = np.zeros(c_out) if bias is None else bias.astype(np.float64)
    return w.reshape(weight.shape).astype(weight.dtype), ((b - mean) * a + beta).astype(weight.dtype)
