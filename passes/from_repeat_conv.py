"""Parser: nearest upsampling written as ``Unsqueeze -> Tile -> Reshape`` per axis [-> ``Transpose``] -> ``Conv``.

Keras ``UpSampling2D`` (``repeat`` along H, then W) reaches ONNX through tf2onnx as, per axis a,
``Unsqueeze(axes=[a+1]) -> Tile(repeats s at a+1) -> Reshape(merge a, a+1)``, in NHWC, and a
``Transpose`` to NCHW before the Conv.  Each unit is ``x[j // s]`` along axis a (the Reshape must
merge the tiled axis into the one *before* it; merging into the one after would tile, not repeat,
and is not matched).  The chain is read from the shapes onnxruntime measured, then the site is
the same box-kernel transposed convolution as a nearest Resize + Conv (DESIGN.md R1), read
through the Transpose.  The repeat nodes stay while anything else reads them.
"""

from __future__ import annotations

from onnx import NodeProto

from onnx_uprewrite.sites import GraphIndex, NotConstant, Refusal, Site, attributes
from onnx_uprewrite.weights import InterpolationAxis

from .from_resize_conv import conv_site

SOURCE = "repeat"


def _op(index: GraphIndex, name: str, op_type: str) -> NodeProto | None:
    node = index.producer.get(name)
    if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx"):
        return node
    return None


def _units(tensor: str, index: GraphIndex) -> tuple[str, list[tuple[NodeProto, NodeProto, NodeProto]]]:
    """Walk back over Reshape(Tile(Unsqueeze(.))) units; returns (first input, units first to last)."""
    units = []
    while True:
        reshape = _op(index, tensor, "Reshape")
        tile = reshape and _op(index, reshape.input[0], "Tile")
        unsq = tile and _op(index, tile.input[0], "Unsqueeze")
        if unsq is None:
            return tensor, units[::-1]
        units.append((unsq, tile, reshape))
        tensor = unsq.input[0]


def _chain(node: NodeProto, index: GraphIndex | None):
    if index is None or node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or not node.input:
        return None
    transpose = _op(index, node.input[0], "Transpose")
    start, units = _units(transpose.input[0] if transpose else node.input[0], index)
    return (transpose, start, units) if units else None


def matches(node: NodeProto, index: GraphIndex | None) -> bool:
    return _chain(node, index) is not None


def taps(node: NodeProto, index: GraphIndex) -> list[str]:
    _, start, units = _chain(node, index)
    return [start] + [t.output[0] for u in units for t in (u[0], u[2])]


def _shape(index: GraphIndex, name: str):
    shape = index.static_shapes.get(name)
    if shape is None or None in shape:
        shape = index.assumed_shapes.get(name, shape)
    return None if shape is None or None in shape else tuple(shape)


def _repeat_axis(unit, index: GraphIndex) -> tuple[int, int, tuple[str, ...]]:
    """(axis of the unit's input, repeat count, constants); ValueError when the unit is not a repeat."""
    unsq, tile, reshape = unit
    x_shape, out_shape = _shape(index, unsq.input[0]), _shape(index, reshape.output[0])
    if x_shape is None or out_shape is None:
        raise ValueError("Unsqueeze-Tile-Reshape needs known tensor shapes (pass --shape, or let verification run)")
    consts = []
    if "axes" in attributes(unsq):
        axes = [int(a) for a in attributes(unsq)["axes"]]
    else:
        value, chain = index.constant(unsq.input[1])
        axes, consts = [int(a) for a in value.ravel()], list(chain)
    repeats, chain = index.constant(tile.input[1])
    consts += chain
    rank = len(x_shape) + 1
    if len(axes) != 1:
        raise ValueError(f"Unsqueeze axes {axes} insert more than one axis")
    u = axes[0] % rank
    reps = [int(r) for r in repeats.ravel()]
    s = reps[u] if len(reps) == rank else 0
    if u == 0 or s < 1 or any(r != 1 for i, r in enumerate(reps) if i != u):
        raise ValueError(f"Tile repeats {reps} after Unsqueeze axes {axes} are not a repeat of one axis")
    want = x_shape[:u - 1] + (x_shape[u - 1] * s,) + x_shape[u:]
    if out_shape != want:
        raise ValueError(f"Reshape to {list(out_shape)} does not merge the tiled axis into axis {u - 1} "
                         f"(a repeat gives {list(want)})")
    if len(reshape.input) > 1:
        consts += list(index.shape_computation(reshape.input[1]))
    return u - 1, s, tuple(consts)


def parse(node: NodeProto, index: GraphIndex) -> Site | Refusal:
    transpose, start, units = _chain(node, index)
    name = node.name or node.output[0]

    def refuse(reason: str) -> Refusal:
        return Refusal(name, SOURCE, f"Unsqueeze-Tile-Reshape upsampling + Conv '{name}': {reason}")

    repeats: dict[int, int] = {}
    tensors: list[str] = []
    try:
        for unit in units:
            axis, s, consts = _repeat_axis(unit, index)
            repeats[axis] = repeats.get(axis, 1) * s
            tensors += [t.output[0] for t in unit] + list(consts)
    except (ValueError, NotConstant) as exc:
        return refuse(str(exc))
    x_shape = _shape(index, start)
    if x_shape is None:
        return refuse(f"the shape of '{start}' is unknown")
    full = len(x_shape)
    perm = list(range(full))
    if transpose is not None:
        perm = [int(p) for p in attributes(transpose).get("perm", range(full - 1, -1, -1))]
        tensors.append(transpose.output[0])
    if sorted(perm) != list(range(full)) or any(perm.index(a) < 2 for a in repeats):
        return refuse(f"repeated axes {sorted(repeats)} are not spatial after Transpose perm={perm}")
    interp = [InterpolationAxis(repeats.get(perm[i], 1), (1.0,) * repeats.get(perm[i], 1), 0, 0, 0)
              for i in range(2, full)]
    lengths = tuple(x_shape[perm[i]] for i in range(2, full))
    pre_perm = tuple(perm) if perm != list(range(full)) else None
    return conv_site(node, index, SOURCE, interp, start, lengths, tuple(tensors), refuse, pre_perm)
