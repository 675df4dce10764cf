"""Parser: zero insertion -> ``Conv`` as one transposed convolution (DESIGN.md §2b, read backwards).

Inserting zeros so that ``z[j*s + r] = x[j]`` (zeros elsewhere, length ``s*L``) and convolving
with ``V`` (stride 1, dilation d, pads Pb/Pe) is the transposed convolution with ``W = flip(V)``,
in/out channels swapped per group (``transposed_to_conv_weight`` is its own inverse), stride s,
dilation d.  The phase r shifts z by r, so per axis the Conv pads act as ``B = Pb + r``,
``E = Pe - r`` on the phase-0 signal: ``pb = Keff-1-B``, ``e = B + E - (Keff-1)``.  Zero insertion
comes as

- the masked ``--to resize`` form (to_resize): ``Resize``/``Upsample`` nearest that is plain
  replication ``x[o // s]``, times a constant 0/1 mask keeping exactly one phase per period: a
  constant, or one period ``Tile``d [-> ``Slice``] as ``Builder.periodic`` writes it.  Site source
  ``resize`` (it is in that form: ``--to resize`` leaves it);
- ``Unsqueeze`` (or a ``Reshape`` inserting unit axes) -> ``Pad`` (zeros, on those unit axes) or
  ``Concat`` with zero tensors (``torch.stack([x, zeros])``: constants or ``ConstantOfShape`` 0) ->
  ``Reshape`` merging each padded axis into the axis before it, all axes at once or chained per
  axis (any run of Reshape/Unsqueeze/Squeeze/Flatten and such pads, read from the measured
  shapes).  Site source ``zeroinsert``.

A zero ``Pad`` right before the Conv adds to its pads; a ``Slice`` or a cropping (negative) ``Pad``
after it folds into the crop, and then an ``Add`` of a constant repeating with the stride (the
per-phase bias to_resize writes, or a per-channel bias) into the bias.  Anything else (another
mask, a Resize that is not plain replication, pads on a non-unit axis, a mask that would
broadcast the activation) is refused with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from onnx import NodeProto, numpy_helper

from onnx_uprewrite.sites import GraphIndex, NotConstant, Refusal, Site, attributes, conv_weights, text
from onnx_uprewrite.surgery import INT64_MAX
from onnx_uprewrite.weights import Axis, rearrange_quantized, transposed_to_conv_weight

from .from_resize_conv import resize_axes
from .from_subpixel import _apply_crop, _trailing_slice

SOURCE = "zeroinsert"
MASKED = "resize"  # the masked Resize spelling is the tool's resize form
RESHAPES = ("Reshape", "Unsqueeze", "Squeeze", "Flatten")
PADS = ("Pad", "Concat")  # a Concat with zero tensors pads too (torch.stack([x, zeros]))
#: the longest Reshape/Pad run read as zero insertion (per-axis chains of 3-D sites: 9 nodes)
MAX_CHAIN = 12


class _Refuse(Exception):
    """Not zero insertion, with the reason."""


@dataclass(frozen=True)
class _Insertion:
    """``z[j*s + r] = x[j]`` per spatial axis, found in the graph."""

    source: str
    label: str  # the nodes, for reasons
    input: str  # x
    strides: tuple[int, ...]
    phases: tuple[int, ...]
    tensors: tuple[str, ...]  # outputs and constants of the insertion nodes (dropped when unused)


def _op(index: GraphIndex, name: str, *op_types: str) -> NodeProto | None:
    node = index.producer.get(name)
    if node is not None and node.op_type in op_types and node.domain in ("", "ai.onnx"):
        return node
    return None


def _name(node: NodeProto) -> str:
    return node.name or node.output[0]


def _shape(index: GraphIndex, name: str) -> tuple[int, ...] | None:
    shape = index.static_shapes.get(name)
    if shape is None or None in shape:
        shape = index.assumed_shapes.get(name, shape)
    return None if shape is None or None in shape else tuple(shape)


# ---------------------------------------------------------------------------------------------
# where the zero-inserted signal comes from


def _conv_input(node: NodeProto, index: GraphIndex | None):
    """``(zero Pad before the Conv or None, tensor before it)`` of a default-domain Conv, or None."""
    if index is None or node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    pre = _op(index, node.input[0], "Pad")  # an insertion's own Pads are followed by a merging Reshape
    return pre, (pre.input[0] if pre is not None else node.input[0])


def _mask_parts(mul: NodeProto, index: GraphIndex) -> tuple[NodeProto, str] | None:
    """``(Resize/Upsample, mask tensor)`` of a Mul of an upsampled tensor by something else."""
    if len(mul.input) != 2 or attributes(mul).get("broadcast"):  # opset < 7 broadcasting: not ours
        return None
    for i in (0, 1):
        up = _op(index, mul.input[i], "Resize", "Upsample")
        if up is not None and not _op(index, mul.input[1 - i], "Resize", "Upsample"):
            return up, mul.input[1 - i]
    return None


def _periodic_constant(tensor: str, index: GraphIndex):
    """``(values, runtime lengths or None, tensors)`` of a constant (a mask, a bias), or of the period a
    ``Tile`` repeats (``Builder.periodic``: ``Tile(period, repeats) [-> Slice from 0]``); NotConstant
    when neither."""
    tensors: list[str] = []
    node = _op(index, tensor, "Slice")
    tile = node and _op(index, node.input[0], "Tile")
    if tile is not None:  # Builder.periodic drops the tiled positions past the end
        period, _ = index.constant(tile.input[0])
        crop = _trailing_slice(tile, index, period.ndim - 2) if period.ndim > 2 else None
        if crop is None or crop[0] is not node or any(start for start, _ in crop[1].values()):
            raise NotConstant(f"Slice '{_name(node)}' of the tiled mask does not keep it from position 0")
        tensors += [tensor, *crop[2]]
        tensor = node.input[0]
    tile = _op(index, tensor, "Tile")
    if tile is None:
        values, chain = index.constant(tensor)
        return values, values.shape, tuple(tensors) + chain
    period, chain = index.constant(tile.input[0])
    tensors += [tensor, *chain]
    try:
        repeats, rchain = index.constant(tile.input[1])
        lengths = tuple(int(n) * int(r) for n, r in zip(period.shape, repeats.ravel()))
        tensors += rchain
    except NotConstant:  # repeats from Shape(x) (a symbolic length): the Mul decides the extent
        lengths = None
        tensors += index.shape_computation(tile.input[1])
    return period, lengths, tuple(tensors)


def _is_zero_one_mask(values: np.ndarray) -> bool:
    return values.size > 1 and bool(np.all((values == 0) | (values == 1))) and bool(np.any(values == 0))


def mask_phases(mask: np.ndarray, strides) -> tuple[int, ...] | str:
    """Phase r per spatial axis of a 0/1 mask (spatial axes last, batch and channel axes before) that
    keeps exactly ``z[j*s + r]`` of every period; otherwise the reason it is not zero insertion."""
    rank = len(strides)
    if mask.ndim > rank + 2:
        return f"has rank {mask.ndim}, more than the activation's {rank + 2}"
    m = mask.reshape((1,) * (rank + 2 - mask.ndim) + mask.shape)
    lead = m.reshape((-1,) + m.shape[2:])
    if not np.array_equal(lead, np.broadcast_to(lead[:1], lead.shape)):
        return "differs across the batch or channel axis"
    m = lead[0]
    for i, (n, s) in enumerate(zip(m.shape, strides)):
        if n % s:
            return f"has length {n} on spatial axis {i}, not a multiple of the scale {s}"
    block = m[tuple(slice(0, s) for s in strides)]
    kept = np.argwhere(block != 0)
    if len(kept) != 1 or block[tuple(kept[0])] != 1:
        return f"keeps {len(kept)} of the {block.size} phases of a period, not exactly one"
    if not np.array_equal(m, np.tile(block, [n // s for n, s in zip(m.shape, strides)])):
        return f"does not repeat with period {list(strides)}"
    return tuple(int(v) for v in kept[0])


def _masked(mul: NodeProto, index: GraphIndex, rank: int, channels: int) -> _Insertion:
    """The masked Resize form ending at ``mul``; _Refuse says why it is not zero insertion."""
    up, mask = _mask_parts(mul, index)
    label = f"{up.op_type} '{_name(up)}' x mask Mul '{_name(mul)}'"
    try:
        interp, consts = resize_axes(up, index, rank)
    except (ValueError, NotConstant) as exc:
        raise _Refuse(f"{label}: {exc}") from None
    if any(a.taps != (1.0,) * a.stride or a.crop_begin or a.pad_begin or a.pad_end for a in interp):
        attrs = attributes(up)
        how = ", ".join(f"{k}={text(attrs[k])}" for k in ("mode", "coordinate_transformation_mode", "nearest_mode")
                        if k in attrs)
        raise _Refuse(f"{label}: the {up.op_type} is not plain replication x[o // s] ({how or 'defaults'}), so "
                      "the mask does not make zero insertion")
    strides = tuple(a.stride for a in interp)
    try:
        values, lengths, tensors = _periodic_constant(mask, index)
    except NotConstant as exc:
        raise _Refuse(f"{label}: the mask is not constant ({exc})") from None
    phases = mask_phases(values, strides)
    if isinstance(phases, str):
        raise _Refuse(f"{label}: the mask {phases}")
    problem = _broadcast_problem(lengths, strides, up, mul, index, channels)
    if problem:
        raise _Refuse(f"{label}: {problem}")
    return _Insertion(MASKED, label, up.input[0], strides, phases,
                      (up.output[0], mul.output[0]) + tuple(consts) + tuple(tensors))


def _broadcast_problem(lengths, strides, up, mul, index: GraphIndex, channels: int) -> str | None:
    """Why the Mul might broadcast the upsampled activation to a larger shape (then it is not the
    activation masked), or None.  An upsampled axis (s > 1, so s*L >= 2) must match the mask; any
    other axis where the mask may be longer than 1 needs the shapes to be known and equal."""
    full_rank = len(strides) + 2
    runtime = None if lengths is None else (1,) * (full_rank - len(lengths)) + tuple(lengths)
    x_shape = index.static_shapes.get(up.input[0]) or index.assumed_shapes.get(up.input[0]) or ()
    x_channels = x_shape[1] if len(x_shape) == full_rank else None

    def safe(i: int) -> bool:
        if runtime is not None and runtime[i] == 1:
            return True
        return (i == 1 and x_channels == channels) or (i >= 2 and strides[i - 2] > 1)

    if all(safe(i) for i in range(full_rank)):
        return None
    a, b = _shape(index, up.output[0]), _shape(index, mul.output[0])
    if a is not None and b is not None:
        return None if a == b else f"the Mul broadcasts the upsampled {list(a)} to {list(b)}"
    return "the mask may broadcast the activation to a larger shape (shapes unknown; pass --shape)"


def _zero_pads(pad: NodeProto, index: GraphIndex, full_rank: int) -> tuple[list[int], tuple[str, ...]]:
    """Begins and ends of a constant-zero Pad over all axes, and its constants; _Refuse says why not."""
    attrs = attributes(pad)
    label = f"Pad '{_name(pad)}'"
    mode = text(attrs.get("mode", "constant"))
    if mode != "constant":
        raise _Refuse(f"{label}: mode={mode!r} does not pad with zeros")
    consts: list[str] = []
    axes = None
    try:
        if index.opset < 11:
            pads, value = [int(v) for v in attrs.get("pads", attrs.get("paddings", []))], float(attrs.get("value", 0.0))
        else:
            names = list(pad.input) + [""] * 3
            raw, chain = index.constant(names[1])
            pads, value = [int(v) for v in raw.ravel()], 0.0
            consts += chain
            if names[2]:
                raw, chain = index.constant(names[2])
                value = float(raw.ravel()[0]) if raw.size else 0.0
                consts += chain
            if names[3]:
                raw, chain = index.constant(names[3])
                axes = [int(v) % full_rank for v in raw.ravel()]
                consts += chain
    except NotConstant as exc:
        raise _Refuse(f"{label}: {exc}") from None
    if value != 0:
        raise _Refuse(f"{label}: pads with {value:g}, not 0")
    if axes is not None and len(pads) == 2 * len(axes):
        full = [0] * (2 * full_rank)
        for i, ax in enumerate(axes):
            full[ax], full[full_rank + ax] = pads[i], pads[len(axes) + i]
        pads = full
    if len(pads) != 2 * full_rank:
        raise _Refuse(f"{label}: pads {pads} do not fit rank {full_rank}")
    return pads, tuple(consts)


def _chain(tensor: str, index: GraphIndex) -> tuple[str, list[NodeProto]] | None:
    """``(x, nodes first to last)``: the run of Reshape-like ops and Pads producing ``tensor`` (x: its
    first input), when it has a Pad and ends in a Reshape-like op; else None."""
    nodes: list[NodeProto] = []
    while len(nodes) < MAX_CHAIN:
        node = _op(index, tensor, *PADS, *RESHAPES)
        feed = node and _feed(node, index)
        if feed is None:
            break
        nodes.append(node)
        tensor = feed
    nodes.reverse()
    if not any(n.op_type in PADS for n in nodes) or nodes[-1].op_type in PADS:
        return None
    return tensor, nodes


def _feed(node: NodeProto, index: GraphIndex) -> str | None:
    """The activation a run node reads: its first input, or the one input of a Concat that is not zeros."""
    if node.op_type != "Concat":
        return node.input[0] if node.input else None
    live = [t for t in node.input if not _is_zeros(t, index)]
    return live[0] if len(live) == 1 and len(node.input) > 1 else None


def _is_zeros(name: str, index: GraphIndex) -> bool:
    """A tensor of zeros: ``ConstantOfShape`` with value 0 (``torch.zeros_like``), or a zero constant."""
    node = _op(index, name, "ConstantOfShape")
    if node is not None:
        value = attributes(node).get("value")
        return value is None or not np.any(numpy_helper.to_array(value))
    try:
        values, _ = index.constant(name)
    except NotConstant:
        return False
    return values.size > 0 and not np.any(values)


def _insertion_pads(node: NodeProto, index: GraphIndex, us: tuple[int, ...]) -> tuple[list[int], tuple[str, ...]]:
    """Begins and ends of zeros a Pad, or a Concat with zero tensors, puts around its input of shape
    ``us``; _Refuse says why not."""
    if node.op_type == "Pad":
        return _zero_pads(node, index, len(us))
    axis = int(attributes(node).get("axis", 0)) % len(us)
    feed = _feed(node, index)
    pads, tensors, before = [0] * (2 * len(us)), [], True
    for t in node.input:
        if t == feed and before:
            before = False
            continue
        shape = _shape(index, t)
        if shape is None and t in index.initializers:
            shape = tuple(index.initializers[t].dims)
        if shape is None or len(shape) != len(us):
            raise _Refuse(f"Concat '{_name(node)}': the shape of zeros '{t}' is unknown")
        pads[axis if before else len(us) + axis] += shape[axis]
        tensors += [t, *index.shape_computation(t)]
    return pads, tuple(tensors)


def _start(nodes: list[NodeProto], index: GraphIndex, full_rank: int) -> tuple[str, list[NodeProto]]:
    """Move the start of the run to the last tensor of the activation's rank before the first Pad."""
    first_pad = next(i for i, n in enumerate(nodes) if n.op_type in PADS)
    for i in range(first_pad, -1, -1):
        tensor = _feed(nodes[i], index)
        shape = _shape(index, tensor)
        if shape is not None and len(shape) == full_rank:
            return tensor, nodes[i:]
    raise _Refuse(f"no tensor of rank {full_rank} with a known shape before {nodes[first_pad].op_type} "
                  f"'{_name(nodes[first_pad])}' "
                  "(pass --shape, or let verification run)")


def _group(before: tuple[int, ...], us: tuple[int, ...], padded: list[bool]) -> list[int] | None:
    """Which axis of ``before`` each axis of ``us`` (a row-major reshape of it) comes from: each
    ``before`` axis splits into one axis of its length plus unit axes; padded unit axes belong to
    the axis before them.  None when the reshape is anything else."""
    a, prod, out = 0, 1, []
    for j, n in enumerate(us):
        if n != 1:
            if prod == before[a]:
                a += 1
                while a < len(before) and before[a] == 1:
                    a += 1
                prod = 1
            if a >= len(before) or n != before[a]:
                return None
            prod = n
        elif not padded[j] and prod == before[a] and a + 1 < len(before) and before[a + 1] == 1:
            a += 1
        out.append(a)
    return out if all(before[b] == 1 for b in range(a + 1, len(before))) and prod == before[a] else None


def _padded(last: NodeProto, index: GraphIndex, rank: int) -> _Insertion:
    """The Unsqueeze/Reshape -> Pad -> Reshape spelling ending at ``last``; _Refuse says why it is not
    zero insertion."""
    full_rank = rank + 2
    x, nodes = _start(_chain(last.output[0], index)[1], index, full_rank)
    label = f"zero insertion {'-'.join(n.op_type for n in nodes)} ending at {last.op_type} '{_name(last)}'"
    shape = _shape(index, x)
    strides, phases = [1] * full_rank, [0] * full_rank
    tensors: list[str] = []
    for node in nodes:
        tensors.append(node.output[0])
        if node.op_type not in PADS:
            if len(node.input) > 1 and node.op_type == "Reshape":
                tensors += index.shape_computation(node.input[1])
            elif len(node.input) > 1 and node.input[1]:
                tensors.append(node.input[1])  # Unsqueeze/Squeeze axes
            continue
        what = f"{node.op_type} '{_name(node)}'"
        feed = _feed(node, index)
        us = _shape(index, feed)
        if us is None:
            raise _Refuse(f"{label}: the shape of '{feed}' is unknown (pass --shape, or let verification run)")
        pads, consts = _insertion_pads(node, index, us)
        tensors += consts
        if any(p < 0 for p in pads):
            raise _Refuse(f"{label}: {what} has negative pads {pads} (a crop drops samples)")
        padded = [pads[j] + pads[len(us) + j] > 0 for j in range(len(us))]
        if any(p and n != 1 for p, n in zip(padded, us)):
            raise _Refuse(f"{label}: {what} pads an axis longer than 1 of {list(us)} (zero padding, not insertion)")
        groups = _group(shape, us, padded)
        if groups is None:
            raise _Refuse(f"{label}: the reshape of {list(shape)} to {list(us)} before {what} is not an insertion "
                          "of unit axes")
        grown = list(shape)
        for a in range(full_rank):
            step, phase = 1, 0
            for j in (j for j in range(len(us)) if groups[j] == a and padded[j]):
                size = 1 + pads[j] + pads[len(us) + j]
                step, phase = step * size, phase * size + pads[j]
            grown[a] *= step
            strides[a], phases[a] = strides[a] * step, phases[a] * step + phase
        shape = tuple(grown)
    if strides[0] != 1 or strides[1] != 1:
        raise _Refuse(f"{label}: it inserts zeros along the batch or channel axis")
    out = _shape(index, last.output[0])
    if out is None or out != shape:
        raise _Refuse(f"{label}: it ends in shape {list(out) if out else 'unknown'}, zero insertion of '{x}' gives "
                      f"{list(shape)}")
    return _Insertion(SOURCE, label, x, tuple(strides[2:]), tuple(phases[2:]), tuple(dict.fromkeys(tensors)))


# ---------------------------------------------------------------------------------------------
# the parser interface


def _find(node: NodeProto, index: GraphIndex | None):
    """``(zero Pad before the Conv or None, Mul of the masked form or None, last node of a
    Reshape/Pad run or None)`` when ``node`` is a Conv after one of the two spellings, else None."""
    found = _conv_input(node, index)
    if found is None:
        return None
    pre, tensor = found
    mul = _op(index, tensor, "Mul")
    if mul is not None and index.opset >= 7 and _mask_parts(mul, index) is not None:
        try:
            values = _periodic_constant(_mask_parts(mul, index)[1], index)[0]
        except NotConstant:
            return None
        return (pre, mul, None) if _is_zero_one_mask(values) else None
    last = _op(index, tensor, *RESHAPES)
    chain = _chain(tensor, index) if last is not None else None
    if chain is not None and all(_pads_unit_axes(n, index) for n in chain[1] if n.op_type in PADS):
        return pre, None, last
    return None


def _pads_unit_axes(pad: NodeProto, index: GraphIndex) -> bool:
    """Whether a Pad (or zeros Concat) in a Reshape run may insert zeros: constant zeros, pads >= 0,
    and (where its input shape is known) only on axes of length 1.  Other runs are not sites."""
    feed = _feed(pad, index)
    shape = _shape(index, feed) or index.static_shapes.get(feed)
    if shape is None:
        return True  # parse decides on the measured shapes
    full_rank = len(shape)
    if pad.op_type == "Concat":
        return shape[int(attributes(pad).get("axis", 0)) % full_rank] in (1, None)
    try:
        pads, _ = _zero_pads(pad, index, full_rank)
    except _Refuse:
        return False
    return all(p >= 0 for p in pads) and any(pads) and all(
        n in (1, None) for j, n in enumerate(shape) if pads[j] or pads[full_rank + j])


def matches(node: NodeProto, index: GraphIndex | None) -> bool:
    return _find(node, index) is not None


def taps(node: NodeProto, index: GraphIndex) -> list[str]:
    pre, mul, last = _find(node, index)
    if mul is not None:
        up, _ = _mask_parts(mul, index)
        return [up.input[0], up.output[0], mul.output[0]] + _tail(node, index)
    x, nodes = _chain(last.output[0], index)
    feeds = [_feed(n, index) for n in nodes]
    zeros = [t for n in nodes if n.op_type == "Concat" for t in n.input if t in index.producer]
    return [x, *feeds, *zeros, last.output[0]] + _tail(node, index)


def _tail(conv: NodeProto, index: GraphIndex) -> list[str]:
    """Outputs of the (at most two) nodes that alone read the Conv output in turn: a crop, a bias Add."""
    out, tensor = [], conv.output[0]
    for _ in range(2):
        readers = index.consumers.get(tensor, [])
        if len(readers) != 1 or not readers[0].output:
            break
        tensor = readers[0].output[0]
        out.append(tensor)
    return out


def parse(node: NodeProto, index: GraphIndex) -> Site | Refusal:
    pre, mul, last = _find(node, index)
    name = _name(node)
    source = MASKED if mul is not None else SOURCE
    try:
        weight, w_chain, bias, b_chain, geo = conv_weights(node, index)
    except ValueError as exc:
        return Refusal(name, source, f"zero insertion + Conv '{name}': {exc}")
    rank, group = weight.ndim - 2, geo.group
    try:  # W is a pure rearrangement of V: integer (QDQ) weights stay integer
        weight_quant = index.quantized(node.input[1])
        bias_quant = index.quantized(node.input[2]) if bias is not None else None
        if weight_quant is not None:
            weight_quant = rearrange_quantized(weight_quant, lambda v: transposed_to_conv_weight(v, group), 1)
    except (NotConstant, ValueError) as exc:
        return Refusal(name, source, f"zero insertion + Conv '{name}': quantized weights: {exc}")
    try:
        channels = weight.shape[1] * group
        found = _masked(mul, index, rank, channels) if mul is not None else _padded(last, index, rank)
        if len(found.strides) != rank:
            raise _Refuse(f"{found.label}: it has {len(found.strides)} spatial axes, the Conv {rank}")
        begins, ends, tensors = list(geo.pads_begin), list(geo.pads_end), list(found.tensors)
        if pre is not None:
            pads, consts = _zero_pads(pre, index, rank + 2)
            if any(pads[i] or pads[rank + 2 + i] for i in (0, 1)):
                raise _Refuse(f"Pad '{_name(pre)}' before the Conv pads the batch or channel axis")
            begins = [b + p for b, p in zip(begins, pads[2:rank + 2])]
            ends = [e + p for e, p in zip(ends, pads[rank + 4:])]
            tensors += [pre.output[0], *consts]
    except _Refuse as exc:
        return Refusal(name, source, f"Conv '{name}' after {exc}")
    axes = [_axis(s, r, k, d, b, e) for s, r, k, d, b, e in
            zip(found.strides, found.phases, geo.kernel, geo.dilations, begins, ends)]
    lengths = index.spatial_lengths(found.input, rank)
    up_lengths = [None if n is None else n * s for n, s in zip(lengths, found.strides)]
    conv_out = [None if n is None else n + b + e - (k - 1) * d
                for n, b, e, k, d in zip(up_lengths, begins, ends, geo.kernel, geo.dilations)]
    replaced, output = [node.output[0]], node.output[0]
    crop = _crop_after(node, index, rank)
    if crop is not None:
        cropped = [_apply_crop(a, *crop[1].get(i, (0, INT64_MAX)), n) for i, (a, n) in enumerate(zip(axes, lengths))]
        if all(c is not None for c in cropped):
            axes, output = cropped, crop[0].output[0]
            replaced.append(output)
            tensors += crop[2]
    out_channels = weight.shape[0]
    added = None if bias_quant is not None else _bias_after(output, index, axes, out_channels)
    if added is not None:  # Conv [-> crop] -> Add(periodic constant): a per-phase bias
        add, phase_bias, consts = added
        if bias is not None:
            phase_bias = phase_bias + bias.reshape((-1,) + (1,) * rank)
        bias, phase_bias = _plain_if_uniform(phase_bias)
        output = add.output[0]
        replaced.append(output)
        tensors += consts
    else:
        phase_bias = None
    source_macs = None if None in conv_out else \
        int(weight.shape[0] * weight.shape[1] * math.prod(geo.kernel) * math.prod(conv_out))
    return Site(
        node=name,
        source=found.source,
        replaced_outputs=tuple(replaced),
        input=found.input,
        output=output,
        weight=transposed_to_conv_weight(weight, group),
        bias=bias,
        phase_bias=phase_bias,
        group=group,
        axes=tuple(axes),
        input_lengths=lengths,
        weight_tensors=w_chain + b_chain + tuple(dict.fromkeys(tensors)),
        notes=(f"read as zero insertion: {found.label}",),
        source_macs=source_macs,
        weight_quant=weight_quant,
        bias_quant=bias_quant,
    )


def _axis(stride: int, phase: int, kernel: int, dilation: int, pad_begin: int, pad_end: int) -> Axis:
    """Zero insertion (stride, phase) + stride-1 Conv(kernel, dilation, pads) as one axis."""
    span = (kernel - 1) * dilation
    begin, end = pad_begin + phase, pad_end - phase
    return Axis(stride, dilation, kernel, span - begin, begin + end - span)


def _crop_after(conv: NodeProto, index: GraphIndex, rank: int):
    """``(node, {axis: (start, end)}, constants)`` of a Slice, or a Pad with only negative
    (cropping) pads, that alone reads the Conv output; None otherwise."""
    found = _trailing_slice(conv, index, rank)
    if found is not None:
        return found
    readers = index.consumers.get(conv.output[0], [])
    if len(readers) != 1 or conv.output[0] in index.graph_outputs or readers[0].op_type != "Pad" \
            or readers[0].input[0] != conv.output[0]:
        return None
    try:
        pads, consts = _zero_pads(readers[0], index, rank + 2)
    except _Refuse:
        return None
    if any(p > 0 for p in pads) or any(pads[i] or pads[rank + 2 + i] for i in (0, 1)):
        return None
    crops = {i: (-pads[2 + i], pads[rank + 4 + i] or INT64_MAX) for i in range(rank)}
    return readers[0], crops, consts



def _bias_after(tensor: str, index: GraphIndex, axes: list[Axis], channels: int):
    """``(Add, per-phase bias [C, s...], tensors)`` when the only reader of ``tensor`` adds a constant
    that repeats with the stride on every axis (to_convtranspose.add_bias writes a per-phase bias so,
    as a constant or a Tile of one period); None otherwise (the Add then stays as it is)."""
    readers = index.consumers.get(tensor, [])
    if len(readers) != 1 or tensor in index.graph_outputs:
        return None
    add = readers[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2 or \
            attributes(add).get("broadcast") or add.input[0] == add.input[1]:
        return None
    try:
        values, runtime, tensors = _periodic_constant(add.input[1] if add.input[0] == tensor else add.input[0], index)
    except NotConstant:
        return None
    rank = len(axes)
    if values.ndim > rank + 2 or not np.issubdtype(values.dtype, np.floating):
        return None
    v = values.reshape((1,) * (rank + 2 - values.ndim) + values.shape)
    if v.shape[0] != 1 or v.shape[1] not in (1, channels):
        return None
    grows = runtime is None or any(n != 1 for n in runtime[len(runtime) - rank:])
    a, b = _shape(index, tensor), _shape(index, add.output[0])
    if grows and (a is None or a != b):  # a longer constant could broadcast the output (measured shapes tell)
        return None
    period = _period(v[0], [x.stride for x in axes])
    if period is None:
        return None
    for i, x in enumerate(axes):  # phase_pattern: P[c, o mod s] = B[c, (o + pb) mod s]
        period = np.take(period, (np.arange(x.stride) - x.crop_begin) % x.stride, axis=1 + i)
    return add, np.broadcast_to(period, (channels,) + period.shape[1:]).copy(), tensors


def _period(values: np.ndarray, strides) -> np.ndarray | None:
    """``[C, s...]``, one period of ``values [C, n...]`` that repeats with period s on every axis
    (an axis of length 1 is constant along it); None when it does not repeat or shows less than a period."""
    for i, s in enumerate(strides):
        n = values.shape[1 + i]
        if n == 1:
            values = np.repeat(values, s, axis=1 + i)
            continue
        if n < s:
            return None
        first = np.take(values, np.arange(n) % s, axis=1 + i)
        if not np.array_equal(values, first):
            return None
        values = np.take(values, np.arange(s), axis=1 + i)
    return values


def _plain_if_uniform(phase_bias: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(bias, phase_bias)``: a per-phase bias equal across the phases is a plain per-channel bias."""
    first = phase_bias.reshape(phase_bias.shape[0], -1)[:, :1]
    if np.array_equal(phase_bias.reshape(phase_bias.shape[0], -1), np.broadcast_to(first, (first.shape[0],
                                                                                         phase_bias[0].size))):
        return first[:, 0].copy(), None
    return None, phase_bias
