"""Parser: sub-pixel ``Conv`` -> depth-to-space [-> ``Slice``] as a transposed convolution (R2).

A stride-1 Conv producing ``C*S`` channels followed by a depth-to-space by ``s`` is a
transposed convolution with ``K = s*(dc*(Ks-1) + 1)`` and ``W[ci, c, s*dc*(Ks-1-j) + r] =
V[channel(c, r), ci, j]`` (DESIGN.md R2).  Depth-to-space comes as

- ``DepthToSpace`` in DCR (the default when ``mode`` is absent) or CRD mode, or
- the pixel shuffle of older exporters, ``Reshape -> Transpose -> Reshape`` of any rank, with the
  channel axis split as ``(C, s0, s1, ...)``, ``(s0, s1, ..., C)`` or any other order that the
  Transpose interleaves into ``[N, C, Q0, s0, Q1, s1, ...]``, and longer chains of Reshape,
  Unsqueeze, Squeeze, Flatten and Transpose (PyTorch's opset-9 PixelShuffle is
  ``Unsqueeze -> Reshape[0,-1,r,r,0,0] -> Transpose -> Reshape[0,0,-1,1,0,0] -> Reshape[0,0,0,0,-1,1]
  -> Squeeze``; our emitter's single-axis moves).  A chain is traced symbolically (_SymbolicTrace):
  every axis is a list of pieces of the Conv output's axes, symbolic lengths stay whole, a 0 copies
  an axis, a -1 takes what the others leave, a shape computed from the chain's own tensors
  (Shape -> Gather -> Mul -> Concat) is followed; the chain is read only where this proves it a
  depth-to-space at every input size, and refused naming the node where the proof stops.  A model
  with static shapes falls back to the shapes onnxruntime measured when a shape cannot be followed.

A ``Slice`` of the spatial axes that follows (the crop our own sub-pixel emitter writes) is folded
into the crop.  So is a crop between the Conv and the depth-to-space (Real-CUGAN's fast variant:
``Conv -> Pad(negative pads) -> PixelShuffle``, or a constant ``Slice``): dropping c low-resolution
positions drops c*s high-resolution ones, so ``pb += s*c`` and the output shrinks by s*c.  A Pad
with positive pads (constant 0) is read where the positions it adds lie outside the transposed
convolution's support and the Conv has no bias; crops of the batch or channel axis are refused.

A Conv bias that differs across the phases of a channel becomes a per-phase bias
(emitted as an ``Add`` of a periodic constant where the target form has no per-phase bias).
All-zero kernel borders are trimmed, so ConvTranspose -> sub-pixel -> ConvTranspose returns the
original kernel.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
from onnx import NodeProto

from onnx_uprewrite import shape_arith
from onnx_uprewrite.shape_arith import Unknown
from onnx_uprewrite.sites import (
    ConvGeometry, GraphIndex, NotConstant, Refusal, Site, attributes, conv_weights, text,
)
from onnx_uprewrite.surgery import INT64_MAX
from onnx_uprewrite.weights import (
    Axis, depth_to_space_map, merge_phase_convs, rearrange_quantized, split_phase_bias, subpixel_conv_axis, subpixel_conv_weight,
)

SOURCE = "subpixel"


@dataclass(frozen=True)
class _Shuffle:
    """A depth-to-space found in the graph."""

    conv: NodeProto
    nodes: tuple[NodeProto, ...]  # depth-to-space nodes, first to last
    strides: tuple[int, ...] | None  # None: not yet known (shapes missing)
    order: tuple | None  # split order of the channel axis, e.g. ("c", 0, 1)
    consts: tuple[str, ...]  # shape constants read by the nodes
    problem: str | None = None
    channel_map: np.ndarray | None = None  # [C, S] Conv channel of (c, phase), when not given by ``order``
    notes: tuple[str, ...] = ()

    def channels(self, c_conv: int) -> np.ndarray:
        """``channel_map[c, phase]``: the Conv channel that depth-to-space sends to channel c, phase."""
        if self.channel_map is not None:
            return self.channel_map
        return depth_to_space_map(c_conv // math.prod(self.strides), self.strides, self.order)


@dataclass(frozen=True)
class _Start:
    """What feeds the depth-to-space: one Conv, or the per-phase Convs of one input concatenated
    along channels (our emitter's per-phase layout), read as one Conv with the union of their taps."""

    convs: tuple[NodeProto, ...]
    concat: NodeProto | None = None
    crop: NodeProto | None = None  # a Pad or Slice between the Conv(s) and the depth-to-space

    @property
    def input(self) -> str:
        return self.convs[0].input[0]

    @property
    def output(self) -> str:
        return self.nodes[-1].output[0]

    @property
    def nodes(self) -> tuple[NodeProto, ...]:
        return self.convs + tuple(n for n in (self.concat, self.crop) if n is not None)


def _op(index: GraphIndex, name: str, op_type: str) -> NodeProto | None:
    node = index.producer.get(name)
    if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx"):
        return node
    return None


def _conv_before(index: GraphIndex, tensor: str):
    """``(_Start, (Q, DQ) or (), (scale, zero point) or None)`` when ``tensor`` is a Conv output (or
    Convs concatenated, _phase_convs), or one read back through a per-tensor QuantizeLinear ->
    DequantizeLinear pair (QDQ models: quantizing commutes with depth-to-space, which only moves values),
    or one of these cropped by a Pad or Slice (_fold_low_res_crop reads it or says why not)."""
    crop = next((n for n in (_op(index, tensor, "Pad"), _op(index, tensor, "Slice"))
                 if n is not None and n.input and n.input[0]), None)
    if crop is None:
        return _uncropped_conv_before(index, tensor)
    found = _uncropped_conv_before(index, crop.input[0])
    return None if found is None else (replace(found[0], crop=crop),) + found[1:]


def _uncropped_conv_before(index: GraphIndex, tensor: str):
    conv = _op(index, tensor, "Conv")
    if conv is not None:
        return _Start((conv,)), (), None
    concat = _op(index, tensor, "Concat")
    if concat is not None:
        convs = _phase_convs(index, concat)
        return (_Start(convs, concat), (), None) if convs else None
    pair = index.qdq_pair_before(tensor)
    conv = pair and _op(index, pair[0][0].input[0], "Conv")
    return (_Start((conv,)), pair[0], pair[1]) if conv is not None else None


def _phase_convs(index: GraphIndex, concat: NodeProto) -> tuple[NodeProto, ...] | None:
    """The Convs of a channel Concat (axis 1) when every input is a Conv of one same tensor."""
    axis = attributes(concat).get("axis")
    if axis is None or int(axis) != 1 or len(concat.input) < 2:
        return None
    convs = tuple(_op(index, t, "Conv") for t in concat.input)
    if any(c is None for c in convs) or len({c.input[0] for c in convs}) != 1:
        return None
    return convs


#: ops a depth-to-space chain is written with: regroupings of the row-major order, and Transposes
_REGROUP = ("Reshape", "Unsqueeze", "Squeeze", "Flatten")
_CHAIN_OPS = _REGROUP + ("Transpose",)
#: the longest chain read as a depth-to-space: a 3-D one as single-axis moves (our emitter's
#: Transposes) is 7 nodes, PyTorch's opset-9 PixelShuffle (Unsqueeze ... Squeeze) 6
MAX_CHAIN = 9


def _chain_op(index: GraphIndex, name: str) -> NodeProto | None:
    node = index.producer.get(name)
    if node is not None and node.op_type in _CHAIN_OPS and node.domain in ("", "ai.onnx") and node.input \
            and node.input[0]:
        return node
    return None


def _chain(node: NodeProto, index: GraphIndex | None):
    """``(Conv, depth-to-space nodes, Q/DQ nodes, their (scale, zero point))`` when ``node`` ends a
    depth-to-space fed by a Conv: a DepthToSpace, or a chain of Reshape / Unsqueeze / Squeeze /
    Flatten / Transpose nodes that starts and ends with a regrouping and moves axes in between."""
    if index is None or node.domain not in ("", "ai.onnx") or not node.input:
        return None
    if node.op_type == "DepthToSpace":
        found = _conv_before(index, node.input[0])
        return (found[0], (node,), found[1], found[2]) if found is not None else None
    if node.op_type in _REGROUP and node.input[0]:
        nodes = (node,)
        while len(nodes) < MAX_CHAIN:
            prev = _chain_op(index, nodes[0].input[0])
            if prev is None:
                return None
            nodes = (prev,) + nodes
            if prev.op_type in _REGROUP:
                found = _conv_before(index, prev.input[0])
                if found is not None:
                    moved = any(n.op_type == "Transpose" for n in nodes)
                    return (found[0], nodes, found[1], found[2]) if moved else None
    return None


def matches(node: NodeProto, index: GraphIndex | None) -> bool:
    return _chain(node, index) is not None


def taps(node: NodeProto, index: GraphIndex) -> list[str]:
    start, nodes, qdq, _ = _chain(node, index)
    return [start.input] + [n.output[0] for n in qdq + nodes] + [n.output[0] for n in start.nodes]


def _shape(index: GraphIndex, name: str):
    shape = index.static_shapes.get(name)
    if shape is None or None in shape:
        shape = index.assumed_shapes.get(name, shape)
    return shape


#: the largest Conv output (elements) whose Reshape/Transpose chain is traced element by element
#: (about 5 index arrays of this size are alive at once)
MAX_TRACED = 1 << 22


def _traced_shuffle(conv, nodes: tuple[NodeProto, ...], index: GraphIndex, rank: int) -> _Shuffle:
    """A longer Reshape/Transpose chain (single-axis moves, our emitter's): run it on the indices of
    the Conv output and read the channel map off the result, which must be a depth-to-space
    ``y[n, c, ..., q*s + r, ...] = x[n, channel_map[c, r], ..., q, ...]``."""
    consts = _chain_consts(nodes, index)
    shapes = [_shape(index, nodes[0].input[0])] + [_shape(index, n.output[0]) for n in nodes]
    if any(s is None or None in s for s in shapes):
        return _Shuffle(conv, nodes, None, None, consts,
                        "a Reshape-Transpose chain needs known tensor shapes to be read as a pixel shuffle "
                        "(pass --shape, or let verification run)")
    conv_shape, out = tuple(int(v) for v in shapes[0]), tuple(int(v) for v in shapes[-1])
    problem = f"Reshape-Transpose chain {list(conv_shape)} -> {list(out)} is not a pixel shuffle"
    if len(conv_shape) != rank + 2 or len(out) != rank + 2 or out[0] != conv_shape[0] or \
            math.prod(conv_shape) != math.prod(out):
        return _Shuffle(conv, nodes, None, None, consts, problem)
    if math.prod(conv_shape) > MAX_TRACED:
        return _Shuffle(conv, nodes, None, None, consts, f"Reshape-Transpose chain on {math.prod(conv_shape):,} "
                        f"elements: more than {MAX_TRACED:,} to trace as a pixel shuffle")
    q = conv_shape[2:]
    if any(o % n for o, n in zip(out[2:], q)):
        return _Shuffle(conv, nodes, None, None, consts, problem)
    strides = tuple(o // n for o, n in zip(out[2:], q))
    if out[1] * math.prod(strides) != conv_shape[1]:
        return _Shuffle(conv, nodes, None, None, consts, problem)
    batch_problem = _batch_problem(nodes, shapes, index, traced=True)
    if batch_problem:
        return _Shuffle(conv, nodes, None, None, consts, f"{problem[:-len('is not a pixel shuffle')]}cannot be read "
                        f"as a pixel shuffle at every input size ({batch_problem})")
    t = np.arange(math.prod(conv_shape), dtype=np.int64).reshape(conv_shape)
    for n, shape in zip(nodes, shapes[1:]):
        if n.op_type != "Transpose":  # Reshape, Unsqueeze, Squeeze, Flatten: the measured shape
            if math.prod(shape) != t.size:
                return _Shuffle(conv, nodes, None, None, consts, problem)
            t = t.reshape([int(v) for v in shape])
        else:
            perm = [int(p) for p in attributes(n).get("perm", range(t.ndim - 1, -1, -1))]
            if sorted(perm) != list(range(t.ndim)):
                return _Shuffle(conv, nodes, None, None, consts, problem)
            t = t.transpose(perm)
    if t.shape != out:
        return _Shuffle(conv, nodes, None, None, consts, problem)
    n_idx, k, *pos = np.unravel_index(t, conv_shape)
    split = (out[0], out[1]) + tuple(v for n, s in zip(q, strides) for v in (n, s))
    expected_q = [np.arange(n).reshape((1,) * (2 + 2 * i) + (n, 1) + (1,) * (2 * (rank - i - 1)))
                  for i, n in enumerate(q)]
    batch = np.arange(out[0]).reshape((-1,) + (1,) * (1 + 2 * rank))
    k = k.reshape(split)
    if not (np.array_equal(n_idx.reshape(split), np.broadcast_to(batch, split))
            and all(np.array_equal(p.reshape(split), np.broadcast_to(e, split)) for p, e in zip(pos, expected_q))):
        return _Shuffle(conv, nodes, None, None, consts, problem)
    first = k[(slice(0, 1), slice(None)) + (slice(0, 1), slice(None)) * rank]
    if not np.array_equal(k, np.broadcast_to(first, split)):
        return _Shuffle(conv, nodes, None, None, consts, problem)
    channel_map = first.reshape(out[1], -1)
    return _Shuffle(conv, nodes, strides, None, consts, channel_map=channel_map)


def _batch_problem(nodes: tuple[NodeProto, ...], shapes, index: GraphIndex, traced: bool) -> str | None:
    """Why the chain may be another rearrangement at another input size than the one read, or None.

    Every tensor keeps the batch as axis 0 and no Transpose moves it.  Unless the Conv input's
    shape is static (the original then runs at that shape only), a constant Reshape shape must copy
    the batch (first entry 0: a -1 there would absorb a change of any other length).  A traced
    chain (_traced_shuffle) is read at one size only, so it also needs static spatial lengths and
    constant shapes with every other entry fixed."""
    batch = int(shapes[0][0])
    static = index.static_shapes.get(nodes[0].input[0])
    fixed = static is not None and len(static) > 0 and None not in static
    if traced and not fixed and (static is None or None in static[1:]):
        return "a Reshape-Transpose chain is traced at one size, and the Conv's spatial lengths are symbolic"
    for n, shape in zip(nodes, shapes[1:]):
        name = n.name or n.output[0]
        if int(shape[0]) != batch:
            return f"'{n.output[0]}' has {shape[0]} on the batch axis"
        if n.op_type == "Transpose":
            perm = [int(p) for p in attributes(n).get("perm", range(len(shape) - 1, -1, -1))]
            if not perm or perm[0] != 0:
                return f"Transpose '{name}' moves the batch axis"
        elif n.op_type == "Reshape" and not fixed:
            if len(n.input) < 2:  # Reshape-1 (opset < 5): a shape attribute
                entries = [int(v) for v in attributes(n).get("shape", [])]
            else:
                try:
                    value, _ = index.constant(n.input[1])
                except NotConstant:
                    if traced:
                        return f"Reshape '{name}' takes a shape computed at run time"
                    continue  # computed from the tensors' own Shape (exporters, our emitter): as read
                entries = [int(v) for v in np.asarray(value).reshape(-1)]
            if not entries or entries[0] != 0:
                return f"Reshape '{name}' shape {entries} does not copy the batch (first entry 0)"
            if traced and any(v <= 0 for v in entries[1:]):
                return f"Reshape '{name}' shape {entries} leaves an axis to the input size"
    return None


def _shuffle(conv, nodes: tuple[NodeProto, ...], index: GraphIndex, rank: int) -> _Shuffle:
    """The depth-to-space ``nodes`` perform, or why they are not read as one.  A chain is traced
    symbolically (_SymbolicTrace), which proves it for every input size; where it cannot follow a
    computed shape and the Conv output's shape is static, the shapes measured at that one size decide."""
    if len(nodes) == 1:
        return _depth_to_space(conv, nodes, rank)
    consts = _chain_consts(nodes, index)
    try:
        strides, channel_map, notes = _SymbolicTrace(index, conv, nodes, rank).depth_to_space()
        return _Shuffle(conv, nodes, strides, None, consts, channel_map=channel_map, notes=notes)
    except _NotAShuffle as exc:
        return _Shuffle(conv, nodes, None, None, consts, f"the chain is not a pixel shuffle ({exc})")
    except _Unproven as exc:
        static = index.static_shapes.get(nodes[0].input[0])
        if static is None or None in static:
            return _Shuffle(conv, nodes, None, None, consts, "the chain cannot be read as a pixel shuffle at every "
                            f"input size: {exc}")
    found = _pixel_shuffle(conv, nodes, index, rank) if [n.op_type for n in nodes] == RTR else None
    if found is None or (found.problem or "").endswith("is not a pixel shuffle"):
        found = _traced_shuffle(conv, nodes, index, rank)
    return found


RTR = ["Reshape", "Transpose", "Reshape"]


def _chain_text(nodes: tuple[NodeProto, ...]) -> str:
    return "-".join(n.op_type for n in nodes)


def _chain_consts(nodes: tuple[NodeProto, ...], index: GraphIndex) -> tuple[str, ...]:
    """The shape and axes inputs of the chain's nodes, with their small computations (drop candidates)."""
    return tuple(t for n in nodes if n.op_type in ("Reshape", "Unsqueeze", "Squeeze") and len(n.input) > 1
                 and n.input[1] for t in index.shape_computation(n.input[1]))


# ----------------------------------------------------------------------------------------------
# symbolic trace of a Reshape / Unsqueeze / Squeeze / Flatten / Transpose chain


class _NotAShuffle(Exception):
    """The chain is traced and is another rearrangement than a depth-to-space."""


class _Unproven(Exception):
    """The trace cannot follow the chain at every input size (the reason names the node)."""


#: ``(origin axis of the chain input, length or symbol name, stride)``: a run of the origin axis'
#: index, ``index = Σ digit·stride`` over its pieces; a symbolic length is never split
_Piece = tuple


class _SymbolicTrace:
    """Follows the chain on the axes of its input ``[N, K, L...]``, each tensor axis a list of pieces
    of input axes in row-major order.  Static lengths are numbers (split as the chain needs); the
    others are symbols (N, H, W, ...), so a Reshape reads them as a 0 (copy), a -1 (what the others
    leave, when that is a product of whole pieces) or a length computed from the shapes of the
    chain's tensors (shape_arith).  A constant Reshape that fixes a symbolic length (the only one
    left unmatched) pins it: the original runs at that length only.  What the trace cannot follow
    at every size raises _Unproven; a traced chain that ends as another rearrangement, _NotAShuffle."""

    def __init__(self, index: GraphIndex, start: _Start, nodes: tuple[NodeProto, ...], rank: int):
        self.index, self.nodes, self.rank = index, nodes, rank
        name = nodes[0].input[0]
        shape = index.static_shapes.get(name)
        if shape is None or len(shape) != rank + 2:
            shape = (None,) * (rank + 2)
        if shape[1] is None:
            try:
                shape = (shape[0], sum(index.constant(c.input[1])[0].shape[0] for c in start.convs)) + tuple(shape[2:])
            except (NotConstant, IndexError):
                raise _Unproven(f"the channel count of '{name}' is unknown") from None
        if any(n is not None and n < 1 for n in shape):
            raise _Unproven(f"'{name}' has shape {list(shape)}: an empty tensor")
        spatial = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}.get(rank, tuple(f"L{i}" for i in range(rank)))
        self.names = ("N", None) + spatial
        self.full = [int(n) if n is not None else self.names[a] for a, n in enumerate(shape)]
        self.tensors = {name: [self._whole(a) for a in range(rank + 2)]}
        self.pins: dict[str, int] = {}

    def _whole(self, origin: int) -> list:
        size = self.full[origin]
        return [] if size == 1 else [(origin, size, 1)]

    # sizes: (sorted symbol names, known factor)
    @staticmethod
    def _size(axis) -> tuple[tuple[str, ...], int]:
        syms = tuple(sorted(p[1] for p in axis if isinstance(p[1], str)))
        return syms, math.prod(p[1] for p in axis if not isinstance(p[1], str))

    def _text(self, size) -> str:
        syms, known = size
        syms = sorted(syms, key=lambda s: (s not in self.names, self.names.index(s) if s in self.names else 0, s))
        return "·".join(([str(known)] if known != 1 or not syms else []) + syms)

    def _shape_text(self, axes) -> str:
        return "[" + ", ".join(self._text(self._size(a)) for a in axes) + "]"

    def depth_to_space(self):
        """``(strides, channel_map, notes)`` when the chain is a depth-to-space of its input."""
        axes = self.tensors[self.nodes[0].input[0]]
        for node in self.nodes:
            what = f"{node.op_type} '{node.name or node.output[0]}'"
            axes = getattr(self, "_" + node.op_type.lower())(node, axes, what)
            self.tensors[node.output[0]] = axes
        notes = tuple(f"{_chain_text(self.nodes)} fixes {sym} = {v}: the original runs at that length only"
                      for sym, v in self.pins.items())
        return self._read(axes) + (notes,)

    # one method per op: the axes of the output
    def _transpose(self, node, axes, what):
        perm = [int(p) for p in attributes(node).get("perm", range(len(axes) - 1, -1, -1))]
        if sorted(perm) != list(range(len(axes))):
            raise _NotAShuffle(f"{what} perm={perm} does not fit a rank-{len(axes)} tensor")
        return [axes[p] for p in perm]

    def _axes_of(self, node, what) -> list[int] | None:
        if len(node.input) > 1 and node.input[1]:
            try:
                value, _ = self.index.constant(node.input[1])
            except NotConstant as exc:
                raise _Unproven(f"{what} axes are computed at run time ({exc})") from None
            return [int(v) for v in np.asarray(value).ravel()]
        found = attributes(node).get("axes")
        return None if found is None else [int(v) for v in found]

    def _unsqueeze(self, node, axes, what):
        new = self._axes_of(node, what) or []
        rank = len(axes) + len(new)
        at = sorted({a % rank for a in new if -rank <= a < rank})
        if not new or len(at) != len(new):
            raise _NotAShuffle(f"{what} axes {new} do not fit a rank-{len(axes)} tensor")
        out = list(axes)
        for a in at:
            out.insert(a, [])
        return out

    def _squeeze(self, node, axes, what):
        gone = self._axes_of(node, what)
        if gone is None:
            unsure = [a for a, ax in enumerate(axes) if ax and self._size(ax)[1] == 1]
            if unsure:
                raise _Unproven(f"{what} has no axes: whether it removes axis {unsure[0]} "
                                f"({self._text(self._size(axes[unsure[0]]))}) depends on the input size")
            return [ax for ax in axes if ax]
        if not all(-len(axes) <= a < len(axes) for a in gone):
            raise _NotAShuffle(f"{what} axes {gone} do not fit a rank-{len(axes)} tensor")
        gone = {a % len(axes) for a in gone}
        for a in sorted(gone):
            if axes[a]:
                raise _Unproven(f"{what} removes axis {a}, of length {self._text(self._size(axes[a]))}")
        return [ax for a, ax in enumerate(axes) if a not in gone]

    def _flatten(self, node, axes, what):
        axis = int(attributes(node).get("axis", 1))
        if not -len(axes) <= axis <= len(axes):
            raise _NotAShuffle(f"{what} axis={axis} does not fit a rank-{len(axes)} tensor")
        axis += len(axes) if axis < 0 else 0
        return [[p for ax in axes[:axis] for p in ax], [p for ax in axes[axis:] for p in ax]]

    def _reshape(self, node, axes, what):
        attrs = attributes(node)
        entries = self._reshape_entries(node, what)
        what += " shape [" + ", ".join(str(e) if isinstance(e, int) else self._text(e) for e in entries) + "]"
        targets = []
        for i, e in enumerate(entries):
            if isinstance(e, tuple):
                targets.append(e)
            elif e == 0:
                if int(attrs.get("allowzero", 0)):
                    raise _NotAShuffle(f"{what} has a zero length (allowzero=1)")
                if i >= len(axes):
                    raise _NotAShuffle(f"{what} copies axis {i} of a rank-{len(axes)} tensor")
                targets.append(self._size(axes[i]))
            elif e == -1:
                targets.append(None)
            elif e > 0:
                targets.append(((), e))
            else:
                raise _NotAShuffle(f"{what} has the entry {e}")
        total = self._size([p for ax in axes for p in ax])
        if targets.count(None) > 1:
            raise _NotAShuffle(f"{what} has more than one -1")
        if None in targets:
            rest = self._product(t for t in targets if t is not None)
            left = _without(total[0], rest[0])
            if left is None or total[1] % rest[1]:
                raise _Unproven(f"{what}: the -1 is ({self._text(total)}) / ({self._text(rest)}), not a product "
                                "of the input's lengths")
            targets[targets.index(None)] = (left, total[1] // rest[1])
        else:
            self._balance(total, self._product(targets), what)
            axes = self.tensors[node.input[0]]  # pins applied
            targets = [(tuple(sorted(s for s in syms if s not in self.pins)),
                        known * math.prod(self.pins[s] for s in syms if s in self.pins)) for syms, known in targets]
        return self._regroup(axes, targets, what)

    @staticmethod
    def _product(sizes) -> tuple[tuple[str, ...], int]:
        syms, known = [], 1
        for s, k in sizes:
            syms += s
            known *= k
        return tuple(sorted(syms)), known

    def _reshape_entries(self, node, what) -> list:
        """Each entry: an int (0 and -1 as Reshape reads them), or ``(symbols, known)`` for a length
        computed from a chain tensor's shape."""
        if len(node.input) < 2 or not node.input[1]:  # Reshape-1: a shape attribute
            return [int(v) for v in attributes(node).get("shape", [])]
        try:
            computed = shape_arith.evaluate(self.index, node.input[1])
        except NotConstant as exc:
            raise _Unproven(f"{what} takes a shape that cannot be followed ({exc})") from None
        if computed.values.ndim != 1:
            raise _NotAShuffle(f"{what} takes a shape of rank {computed.values.ndim}")
        entries = []
        for v in computed.flat():
            if isinstance(v, Unknown):
                raise _Unproven(f"{what} takes a shape computed at run time ({v.reason})")
            if v.is_const and v.const.denominator == 1:
                entries.append(int(v.const))
                continue
            if v.const or len(v.terms) != 1 or v.terms[0][1].denominator != 1 or v.terms[0][1] < 1:
                raise _Unproven(f"{what} takes a length computed as {v.describe()}")
            (tensor, axis), coef = v.terms[0]
            axes = self.tensors.get(tensor)
            if axes is None or axis >= len(axes):
                raise _Unproven(f"{what} takes a length of '{tensor}', which is not in the chain")
            syms, known = self._size(axes[axis])
            entries.append((syms, known * int(coef)))
        return entries

    def _balance(self, total, out, what) -> None:
        """A Reshape without -1 must keep the element count: lengths fixed by it are pinned."""
        left_in = tuple((Counter(total[0]) - Counter(out[0])).elements())
        left_out = tuple((Counter(out[0]) - Counter(total[0])).elements())
        mismatch = f"{what} holds {self._text(out)} elements where the input has {self._text(total)}"
        if left_out:
            raise _Unproven(mismatch)
        if not left_in:
            if total[1] != out[1]:
                raise _NotAShuffle(mismatch)
            return
        if out[1] % total[1]:
            raise _NotAShuffle(mismatch)
        ratio, distinct = out[1] // total[1], sorted(set(left_in))
        if ratio == 1:
            pins = {s: 1 for s in distinct}
        elif len(distinct) == 1:
            root = round(ratio ** (1 / len(left_in)))
            root = next((r for r in (root - 1, root, root + 1) if r > 0 and r ** len(left_in) == ratio), None)
            if root is None:
                raise _NotAShuffle(mismatch)
            pins = {distinct[0]: root}
        else:
            raise _Unproven(f"{mismatch}: it fixes only the product {self._text((tuple(left_in), 1))}")
        self.pins.update(pins)
        for name, axes in self.tensors.items():
            self.tensors[name] = [[q for p in ax for q in self._pinned(p)] for ax in axes]
        for origin, size in enumerate(self.full):
            if size in pins:
                self.full[origin] = pins[size]

    def _pinned(self, piece) -> list:
        origin, size, stride = piece
        if isinstance(size, str) and size in self.pins:
            return [] if self.pins[size] == 1 else [(origin, self.pins[size], stride)]
        return [piece]

    def _regroup(self, axes, targets, what) -> list:
        """Row-major regrouping of the pieces into axes of the target sizes; a number piece is split
        where an axis boundary falls inside it."""
        pending = [p for ax in axes for p in ax]
        regroup = f"{what} reads {self._shape_text(axes)} as [{', '.join(self._text(t) for t in targets)}]"
        out = []
        for syms, known in targets:
            need, axis = list(syms), []
            while need or known > 1:
                if not pending:
                    raise _NotAShuffle(f"{what}: the lengths do not add up")
                origin, size, stride = pending.pop(0)
                if isinstance(size, str):
                    if size not in need:
                        raise _Unproven(f"{regroup}, which moves {size} into another axis at other sizes")
                    need.remove(size)
                    axis.append((origin, size, stride))
                elif known % size == 0:
                    known //= size
                    axis.append((origin, size, stride))
                elif not need and size % known == 0:
                    axis.append((origin, known, stride * (size // known)))
                    pending.insert(0, (origin, size // known, stride))
                    known = 1
                else:
                    raise _Unproven(f"{regroup}, which splits a length {size} unevenly")
            out.append(axis)
        if pending:
            raise _NotAShuffle(f"{what}: the lengths do not add up")
        return out

    def _read(self, axes):
        """``(strides, channel_map)`` when ``axes`` are ``[N, C, L0*s0, ...]`` with each output axis the
        whole input axis (outer) then pieces of the channels (the phase); _NotAShuffle otherwise."""
        rank = self.rank
        shown = self._shape_text(axes)
        if len(axes) != rank + 2:
            raise _NotAShuffle(f"it ends as {shown}, rank {len(axes)}")
        merged = [_merged(ax) for ax in axes]
        if merged[0] != self._whole(0):
            raise _NotAShuffle(f"it ends as {shown}, and axis 0 is not the batch")
        if any(p[0] != 1 for p in merged[1]):
            raise _NotAShuffle(f"it ends as {shown}, and axis 1 is not made of channels only")
        phases = []
        for i in range(rank):
            whole = self._whole(2 + i)
            ax = merged[2 + i]
            if ax[:len(whole)] != whole or any(p[0] != 1 for p in ax[len(whole):]):
                raise _NotAShuffle(f"it ends as {shown}, and axis {2 + i} is not spatial axis {i} "
                                   "followed by channel phases")
            phases.append(ax[len(whole):])
        strides = tuple(math.prod(p[1] for p in ph) for ph in phases)
        parts = [merged[1]] + phases
        channels = math.prod(p[1] for p in merged[1])
        grid = np.zeros([channels, *strides], np.int64)
        for i, pieces in enumerate(parts):
            digits = np.zeros([1], np.int64)
            for _, size, stride in pieces:
                digits = (digits[:, None] + stride * np.arange(size)[None, :]).ravel()
            grid += digits.reshape([-1 if j == i else 1 for j in range(rank + 1)])
        return strides, grid.reshape(channels, -1)


def _merged(axis: list) -> list:
    """Adjacent pieces of one origin that together are one run of its index, as one piece."""
    out = []
    for piece in axis:
        if out and out[-1][0] == piece[0] and not isinstance(piece[1], str) and not isinstance(out[-1][1], str) \
                and out[-1][2] == piece[1] * piece[2]:
            out[-1] = (piece[0], out[-1][1] * piece[1], piece[2])
        else:
            out.append(piece)
    return out


def _without(syms: tuple[str, ...], remove: tuple[str, ...]) -> tuple[str, ...] | None:
    """The multiset ``syms`` less ``remove``; None when ``remove`` is not part of it."""
    left = list(syms)
    for s in remove:
        if s not in left:
            return None
        left.remove(s)
    return tuple(left)


def _depth_to_space(conv, nodes: tuple[NodeProto, ...], rank: int) -> _Shuffle:
    if len(nodes) == 1:
        attrs = attributes(nodes[0])
        block = int(attrs.get("blocksize", 0))
        mode = text(attrs.get("mode", "DCR"))
        if rank != 2 or block < 1 or mode not in ("DCR", "CRD"):
            return _Shuffle(conv, nodes, None, None, (), f"DepthToSpace mode={mode!r} blocksize={block} "
                            f"on a rank-{rank} Conv is not a depth-to-space this parser knows")
        order = ("c", 0, 1) if mode == "CRD" else (0, 1, "c")
        return _Shuffle(conv, nodes, (block, block), order, ())


def _pixel_shuffle(conv, nodes: tuple[NodeProto, ...], index: GraphIndex, rank: int) -> _Shuffle:
    """Reshape -> one Transpose -> Reshape splitting the channel axis as ``[N, factors..., Q...]``."""
    split, transpose, merge = nodes
    consts = tuple(t for n in (split, merge) if len(n.input) > 1 for t in index.shape_computation(n.input[1]))
    shapes = [_shape(index, t) for t in (split.input[0], split.output[0], merge.output[0])]
    if any(s is None or None in s for s in shapes):
        return _Shuffle(conv, nodes, None, None, consts,
                        "Reshape-Transpose-Reshape needs known tensor shapes to be read as a pixel shuffle "
                        "(pass --shape, or let verification run)")
    conv_shape, a, out = shapes
    perm = [int(p) for p in attributes(transpose).get("perm", range(len(a) - 1, -1, -1))]
    m = rank + 1
    problem = (f"Reshape {list(conv_shape)} -> {list(a)} -> Transpose perm={perm} -> Reshape {list(out)} "
               "is not a pixel shuffle")
    if (len(conv_shape) != rank + 2 or len(a) != 1 + m + rank  # [N, m channel factors, Q...]
            or len(perm) != len(a) or sorted(perm) != list(range(len(a)))):
        return _Shuffle(conv, nodes, None, None, consts, problem)
    q = tuple(conv_shape[2:])
    if a[0] != conv_shape[0] or tuple(a[1 + m:]) != q or math.prod(a[1:1 + m]) != conv_shape[1]:
        return _Shuffle(conv, nodes, None, None, consts, problem)
    if perm[0] != 0 or any(perm[2 + 2 * i] != 1 + m + i for i in range(rank)):
        return _Shuffle(conv, nodes, None, None, consts, problem)
    middle = [perm[1]] + [perm[3 + 2 * i] for i in range(rank)]
    if sorted(middle) != list(range(1, 1 + m)):
        return _Shuffle(conv, nodes, None, None, consts, problem)
    order = tuple("c" if p == perm[1] else middle.index(p) - 1 for p in range(1, 1 + m))
    strides = tuple(int(a[perm[3 + 2 * i]]) for i in range(rank))
    channels = int(a[perm[1]])
    if tuple(out) != (a[0], channels) + tuple(n * s for n, s in zip(q, strides)):
        return _Shuffle(conv, nodes, None, None, consts, problem)
    batch_problem = _batch_problem(nodes, [conv_shape, a, [a[p] for p in perm], out], index, traced=False)
    if batch_problem:
        return _Shuffle(conv, nodes, None, None, consts, f"{problem[:-len('is not a pixel shuffle')]}is a pixel "
                        f"shuffle at this size only ({batch_problem})")
    return _Shuffle(conv, nodes, strides, order, consts)


def _slice_bounds(node: NodeProto, index: GraphIndex):
    """``(starts, ends, axes, steps, constant tensors)`` of a Slice; NotConstant when they are computed."""
    if index.opset < 10:
        attrs = attributes(node)
        starts, ends = [int(v) for v in attrs.get("starts", [])], [int(v) for v in attrs.get("ends", [])]
        return starts, ends, [int(v) for v in attrs.get("axes", range(len(starts)))], [1] * len(starts), ()
    names = list(node.input) + [""] * 5
    values, consts = [], []
    for name in names[1:5]:
        if not name:
            values.append(None)
            continue
        value, chain = index.constant(name)
        values.append([int(v) for v in np.asarray(value).ravel()])
        consts += chain
    starts, ends, axes, steps = values
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    return starts, ends, axes, steps, tuple(consts)


def _trailing_slice(last: NodeProto, index: GraphIndex, rank: int):
    """``(Slice node, {axis: (start, end)}, constants)`` for a crop of spatial axes after ``last``, or None."""
    readers = index.consumers.get(last.output[0], [])
    if len(readers) != 1 or last.output[0] in index.graph_outputs:
        return None
    node = readers[0]
    if node.op_type != "Slice" or node.domain not in ("", "ai.onnx") or node.input[0] != last.output[0]:
        return None
    try:
        starts, ends, axes, steps, consts = _slice_bounds(node, index)
    except NotConstant:
        return None
    full = rank + 2
    crops = {}
    for st, en, ax, sp in zip(starts, ends, axes, steps):
        ax = int(ax) % full
        if sp != 1 or ax < 2 or ax - 2 in crops:
            return None
        crops[ax - 2] = (int(st), int(en))
    return node, crops, tuple(consts)


#: Slice ends at or past this are "to the end" (exporters write INT32_MAX or INT64_MAX)
SLICE_TO_END = (1 << 31) - 1
_AXIS_NAMES = ("batch", "channel")
#: Pad modes: with negative pads only, each is the same crop (checked in onnxruntime)
PAD_MODES = ("constant", "reflect", "edge", "wrap")


def _fold_low_res_crop(node: NodeProto, index: GraphIndex, axes: list[Axis], lengths, bias) -> tuple[list[Axis], tuple]:
    """``(axes, constant tensors)``: ``axes`` (the Conv -> depth-to-space geometry) with the Pad or
    Slice ``node`` of the Conv output folded in.  Dropping c low-resolution positions drops c*s
    high-resolution ones; ValueError says why the crop cannot be read."""
    what = f"{node.op_type} '{node.name or node.output[0]}'"
    full = len(axes) + 2
    try:
        if node.op_type == "Slice":
            starts, ends, crop_axes, steps, consts = _slice_bounds(node, index)
        else:
            pads, mode, value, consts = _pad_amounts(node, index, full)
    except NotConstant as exc:
        raise ValueError(f"{what} is not constant: {exc}") from None
    except (ValueError, TypeError) as exc:  # malformed pads or fill value
        raise ValueError(f"{what}: {exc}") from None
    if node.op_type == "Slice":
        return _fold_slice(what, zip(starts, ends, crop_axes, steps), list(axes), lengths), consts
    return _fold_pad(what, pads, mode, value, list(axes), lengths, bias), consts


def _fold_slice(what: str, bounds, axes: list[Axis], lengths) -> list[Axis]:
    full = len(axes) + 2
    for start, end, ax, step in bounds:
        ax = ax % full
        if step != 1:
            raise ValueError(f"{what} has step {step} on axis {ax}: a strided crop is not a sub-pixel Conv output")
        if ax < 2:
            if start == 0 and end >= SLICE_TO_END:
                continue
            raise ValueError(f"{what} crops the {_AXIS_NAMES[ax]} axis ([{start}:{end}]): only crops of the "
                             "spatial axes are read")
        i, s = ax - 2, axes[ax - 2].stride
        cropped = _apply_crop(axes[i], s * start, s * end, lengths[i])
        if cropped is None:
            why = "nothing left" if lengths[i] is not None else "needs the static length of the axis (it is symbolic)"
            raise ValueError(f"{what} [{start}:{end}] on spatial axis {i}: {why}")
        axes[i] = cropped
    return axes


def _fold_pad(what: str, pads, mode: str, value: float, axes: list[Axis], lengths, bias) -> list[Axis]:
    """Negative pads crop (any mode); zeros added are exact only where the transposed convolution is
    zero too: outside its support ``[0, (L-1)s + K)`` (Conv pads reaching the kernel's span), no bias."""
    if mode not in PAD_MODES:
        raise ValueError(f"{what} has mode={mode!r}, not one of {', '.join(PAD_MODES)}")
    for ax in (0, 1):
        if pads[ax] != (0, 0):
            raise ValueError(f"{what} pads the {_AXIS_NAMES[ax]} axis by {list(pads[ax])}: only crops of the "
                             "spatial axes are read")
    for i, (before, after) in enumerate(pads[2:]):
        a, s = axes[i], axes[i].stride
        if before > 0 or after > 0:
            if mode != "constant" or value != 0:
                raise ValueError(f"{what} pads spatial axis {i} by {[before, after]} with mode={mode!r} "
                                 f"value={value}: only zero padding is a crop of the transposed convolution")
            if bias is not None and np.any(bias != 0):
                raise ValueError(f"{what} zero-pads spatial axis {i} after a Conv with a bias: the transposed "
                                 "convolution would have its bias there")
            if before > 0 and a.crop_begin > 0 or after > 0 and a.crop_begin + a.extension < a.effective_kernel - s:
                raise ValueError(f"{what} zero-pads spatial axis {i} by {[before, after]} where the Conv output "
                                 "is not zero (its pads do not reach the kernel's span)")
        axes[i] = Axis(s, a.dilation, a.kernel, a.crop_begin - s * before, a.extension + s * (before + after))
        if lengths[i] is not None and axes[i].output_length(lengths[i]) < 1:
            raise ValueError(f"{what} pads spatial axis {i} by {[before, after]}: nothing left")
    return axes


def _pad_amounts(node: NodeProto, index: GraphIndex, full: int):
    """``([(begin, end)] per axis, mode, constant value, constant tensors)`` of a Pad (attribute or
    input forms, opset-18 axes); NotConstant when they are computed, ValueError when malformed."""
    attrs = attributes(node)
    mode = text(attrs.get("mode", "constant"))
    consts: tuple = ()
    names = list(node.input) + [""] * 3
    if names[1]:  # Pad-11+: pads, constant_value and axes are inputs
        value, chain = index.constant(names[1])
        amounts, consts = [int(v) for v in np.asarray(value).ravel()], chain
        fill = 0.0
        if names[2]:
            fill_value, chain = index.constant(names[2])
            fill, consts = float(np.asarray(fill_value).ravel()[0]) if np.asarray(fill_value).size else 0.0, \
                consts + chain
        pad_axes = list(range(full))
        if names[3]:
            axes_value, chain = index.constant(names[3])
            pad_axes, consts = [int(v) % full for v in np.asarray(axes_value).ravel()], consts + chain
    else:  # Pad-1/2: attributes
        amounts = [int(v) for v in attrs.get("pads", attrs.get("paddings", []))]
        fill = float(attrs.get("value", 0.0))
        pad_axes = list(range(full))
    if len(amounts) != 2 * len(pad_axes):
        raise ValueError(f"pads {amounts} do not match {len(pad_axes)} axes")
    pads = [(0, 0)] * full
    for k, ax in enumerate(pad_axes):
        pads[ax] = (amounts[k], amounts[k + len(pad_axes)])
    return pads, mode, fill, consts


def _apply_crop(axis: Axis, start: int, end: int, length: int | None) -> Axis | None:
    """Fold ``Slice[start:end]`` of this axis' output into the canonical crop (None: cannot)."""
    out = None if length is None else axis.output_length(length)
    if start < 0:
        if out is None:
            return None
        start = max(out + start, 0)
    if out is not None:
        start = min(start, out)
        stop = min(end, out) if end >= 0 else max(out + end, 0)
        if stop <= start:
            return None
        return Axis(axis.stride, axis.dilation, axis.kernel, axis.crop_begin + start,
                    axis.extension - (out - stop) - start)
    if end >= INT64_MAX // 2:
        end = 0
    if end > 0:
        return None  # an absolute end needs a static length
    return Axis(axis.stride, axis.dilation, axis.kernel, axis.crop_begin + start, axis.extension + end - start)


def _trim_zero_borders(weight: np.ndarray, axes: list[Axis], phase_bias: np.ndarray | None = None):
    """Drop all-zero kernel slabs at both ends of each axis (leading ones move the crop, and with it
    the phase ``(o + pb) mod s`` that indexes ``phase_bias``, which is rolled to match), and give a
    kernel whose nonzero taps sit on a regular grid its dilation back (ConvTranspose round trips).
    Returns ``(weight, axes, phase_bias)``."""
    for i, a in enumerate(axes):
        w = np.moveaxis(weight, 2 + i, 0)
        nonzero = [t for t in range(w.shape[0]) if np.any(w[t] != 0)]
        if not nonzero:
            continue
        lo, hi = nonzero[0], nonzero[-1] + 1
        w = w[lo:hi]
        shift = lo * a.dilation
        a = Axis(a.stride, a.dilation, hi - lo, a.crop_begin - shift, a.extension)
        if phase_bias is not None and shift % a.stride:  # phase'[p] = phase[(p + shift) mod s]
            phase_bias = np.roll(phase_bias, -shift, axis=1 + i)
        if a.dilation == 1 and hi - lo > 2:
            offsets = [t - lo for t in nonzero]
            for d in range(hi - lo - 1, 1, -1):
                if (hi - lo - 1) % d == 0 and all(t % d == 0 for t in offsets):
                    w = w[::d]
                    a = Axis(a.stride, d, w.shape[0], a.crop_begin, a.extension)
                    break
        weight = np.moveaxis(w, 0, 2 + i)
        axes[i] = a
    return np.ascontiguousarray(weight), axes, phase_bias


def _shape_readers(tensor: str, nodes: tuple[NodeProto, ...], index: GraphIndex) -> int:
    """Readers of ``tensor`` that are ``Shape`` nodes feeding only the shape inputs of the shuffle's
    Reshapes (the run-time shapes our emitter and exporters build for symbolic dims).  They go with
    the site: their outputs are among its constants, which are dropped once nothing reads them."""
    ours = {n.output[0] for n in nodes}
    private = {t for n in nodes if n.op_type == "Reshape" and len(n.input) > 1
               for t in index.shape_computation(n.input[1])}

    def feeds_only_the_shuffle(reader: NodeProto) -> bool:
        stack, seen = [o for o in reader.output if o], set()
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            if t not in private or t in index.graph_outputs:
                return False
            for c in index.consumers.get(t, []):
                if c.output[0] not in ours:
                    stack.extend(o for o in c.output if o)
        return True

    return sum(r.op_type == "Shape" and r.domain in ("", "ai.onnx") and feeds_only_the_shuffle(r)
               for r in index.consumers.get(tensor, []))


def _longer_chain_ends(node: NodeProto, index: GraphIndex) -> list[NodeProto]:
    """The regroupings that would end a longer chain through ``node`` (its output read only by a
    chain op, repeated)."""
    ends, cur = [], node
    for _ in range(MAX_CHAIN):
        readers = index.consumers.get(cur.output[0], [])
        if len(readers) != 1 or cur.output[0] in index.graph_outputs or readers[0].op_type not in _CHAIN_OPS \
                or readers[0].domain not in ("", "ai.onnx") or readers[0].input[0] != cur.output[0]:
            break
        cur = readers[0]
        if cur.op_type in _REGROUP and _chain(cur, index) is not None:
            ends.append(cur)
    return ends


def _conv_rank(start: _Start, index: GraphIndex) -> int | None:
    shape = index.static_shapes.get(start.output)
    if shape is not None:
        return len(shape) - 2
    try:
        return index.constant(start.convs[0].input[1])[0].ndim - 2
    except NotConstant:
        return None


def _is_shuffle(start: _Start, nodes: tuple[NodeProto, ...], index: GraphIndex) -> bool:
    rank = _conv_rank(start, index)
    return rank is not None and _shuffle(start, nodes, index, rank).problem is None


def _ends_a_longer_shuffle(node: NodeProto, index: GraphIndex) -> bool:
    """Whether ``node`` is inside a longer depth-to-space chain (which the chain's last node parses)."""
    for end in _longer_chain_ends(node, index):
        start, nodes = _chain(end, index)[:2]
        if _is_shuffle(start, nodes, index):
            return True
    return False


def _ends_after_a_shuffle(node: NodeProto, index: GraphIndex) -> bool:
    """Whether a shorter chain within ``node``'s is a depth-to-space (that one is the site; what
    follows it is another rearrangement, not part of it)."""
    start, nodes = _chain(node, index)[:2]
    return any(nodes[k - 1].op_type in _REGROUP and any(n.op_type == "Transpose" for n in nodes[:k])
               and _is_shuffle(start, nodes[:k], index) for k in range(2, len(nodes)))


def _start_weights(start: _Start, index: GraphIndex):
    """``conv_weights`` of the Conv feeding the depth-to-space; for per-phase Convs, of the one Conv
    with the union of their taps (weights.merge_phase_convs; group 1 where they are grouped).  Last:
    the source's products per output position (its MACs per position)."""
    if start.concat is None:
        weight, w_chain, bias, b_chain, geo = conv_weights(start.convs[0], index)
        return weight, w_chain, bias, b_chain, geo, weight.size
    parts, chains = [], ()
    for conv in start.convs:
        if index.quantized(conv.input[1]) is not None:
            raise ValueError(f"per-phase Conv '{conv.name}' has quantized weights (they are not merged)")
        weight, w_chain, bias, b_chain, geo = conv_weights(conv, index)
        parts.append((weight, bias, geo))
        chains += w_chain + b_chain
    try:
        weight, bias, group, kernel, pads_begin, pads_end = merge_phase_convs(
            [(w, b, g.group, g.dilations, g.pads_begin, g.pads_end) for w, b, g in parts])
    except ValueError as exc:
        raise ValueError(f"Concat '{start.concat.name}' of Convs: {exc}") from None
    geo = ConvGeometry(group, kernel, (1,) * len(kernel), pads_begin, pads_end)
    return weight, chains, bias, (), geo, sum(w.size for w, _, _ in parts)


def parse(node: NodeProto, index: GraphIndex) -> Site | Refusal | None:
    """The site ending at ``node``; None where ``node`` is inside a longer chain that is a
    depth-to-space, or that is not one (its last node then says why, once), and where a chain that
    is not one continues a shorter one that is (that one is the site)."""
    longer = node.op_type in _REGROUP and _longer_chain_ends(node, index)
    if longer and _ends_a_longer_shuffle(node, index):
        return None
    result = _parse(node, index)
    if isinstance(result, Refusal) and (longer or _ends_after_a_shuffle(node, index)):
        return None
    return result


def _parse(node: NodeProto, index: GraphIndex) -> Site | Refusal:
    head, nodes, qdq, requantize = _chain(node, index)
    conv = head.convs[0]
    name = node.name or node.output[0]
    cname = conv.name or conv.output[0]
    what = f"{len(head.convs)} Convs + Concat '{head.concat.name}'" if head.concat is not None else f"Conv '{cname}'"
    if head.crop is not None:
        what += f" + {head.crop.op_type} '{head.crop.name or head.crop.output[0]}'"
    label = f"{what} + {_chain_text(nodes)} '{name}'"

    def refuse(reason: str) -> Refusal:
        return Refusal(name, SOURCE, f"{label}: {reason}")

    for inner in head.nodes + qdq + nodes[:-1]:
        if index.uses(inner.output[0]) - _shape_readers(inner.output[0], nodes, index) != 1:
            return refuse(f"tensor '{inner.output[0]}' is also read elsewhere, so it cannot be removed")
    try:
        weight, w_chain, bias, b_chain, geo, source_taps = _start_weights(head, index)
    except ValueError as exc:
        return refuse(str(exc))
    rank = weight.ndim - 2
    shuffle = _shuffle(head, nodes, index, rank)
    if shuffle.problem:
        return refuse(shuffle.problem)
    strides, n_phase = shuffle.strides, math.prod(shuffle.strides)
    c_conv = weight.shape[0]
    if c_conv % n_phase:
        return refuse(f"Conv has {c_conv} output channels, not a multiple of {n_phase} phases")
    if bias is not None and bias.shape != (c_conv,):
        return refuse(f"Conv bias shape {list(bias.shape)} is not [{c_conv}]")
    channel_map = shuffle.channels(c_conv)
    w, group = subpixel_conv_weight(weight, geo.group, strides, geo.dilations, channel_map)
    plain_bias, phase_bias = (None, None) if bias is None else split_phase_bias(bias, channel_map, strides)
    try:
        weight_quant, bias_quant = (None, None) if head.concat is not None else \
            _quantized(conv, index, geo.group, strides, geo.dilations, channel_map)
    except (NotConstant, ValueError) as exc:
        return refuse(f"quantized weights: {exc}")
    if bias_quant is not None and phase_bias is not None:
        return refuse("the quantized Conv bias differs across the phases of a channel (a per-phase Add "
                      "would need a float bias)")
    axes = [subpixel_conv_axis(s, k, d, b, e) for s, k, d, b, e in
            zip(strides, geo.kernel, geo.dilations, geo.pads_begin, geo.pads_end)]
    lengths = index.spatial_lengths(head.input, rank)
    replaced = [n.output[0] for n in head.nodes] + [n.output[0] for n in qdq + nodes]
    consts = list(shuffle.consts)
    if head.crop is not None:
        try:
            axes, crop_consts = _fold_low_res_crop(head.crop, index, axes, lengths, bias)
        except ValueError as exc:
            return refuse(str(exc))
        consts += crop_consts
    crop = _trailing_slice(nodes[-1], index, rank)
    if crop is not None:
        cropped = list(axes)
        for i, (begin, end) in crop[1].items():
            cropped[i] = _apply_crop(axes[i], begin, end, lengths[i])
            if cropped[i] is None:
                break
        else:
            axes = cropped
            replaced.append(crop[0].output[0])
            consts += crop[2]
    q = [None if n is None else n + b + e - d * (k - 1) for n, b, e, d, k in
         zip(lengths, geo.pads_begin, geo.pads_end, geo.dilations, geo.kernel)]
    source_macs = None if None in q else source_taps * math.prod(q)
    if weight_quant is None:  # integer weights keep their layout: trimming is value-dependent
        w, axes, phase_bias = _trim_zero_borders(w, axes, phase_bias)
    notes = shuffle.notes
    if group != geo.group:
        notes += (f"the depth-to-space order mixes Conv groups: dense ConvTranspose kernel (group 1, was {geo.group})",)
    return Site(
        node=name,
        source=SOURCE,
        replaced_outputs=tuple(replaced),
        input=head.input,
        output=replaced[-1],
        weight=w,
        bias=plain_bias,
        group=group,
        axes=tuple(axes),
        input_lengths=lengths,
        weight_tensors=w_chain + b_chain + tuple(consts),
        notes=notes,
        phase_bias=phase_bias,
        source_macs=source_macs,
        weight_quant=weight_quant,
        bias_quant=bias_quant,
        requantize=requantize,
    )


def _quantized(conv: NodeProto, index: GraphIndex, group: int, strides, dilations, channel_map):
    """The Conv's DequantizeLinear weight and bias rearranged like the float ones (R2 is a pure
    rearrangement); ValueError when a per-channel scale cannot follow (one ConvTranspose output
    channel gathers S Conv channels, so per-channel scales must agree across phases)."""
    weight_quant = index.quantized(conv.input[1])
    bias_quant = index.quantized(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    if weight_quant is not None:
        weight_quant = rearrange_quantized(
            weight_quant, lambda v: subpixel_conv_weight(v, group, strides, dilations, channel_map)[0], 1)
    if bias_quant is not None:
        bias_quant = rearrange_quantized(bias_quant, lambda v: v[channel_map[:, 0]], 0)
    return weight_quant, bias_quant
