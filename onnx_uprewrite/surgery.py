"""Graph surgery on the ModelProto: splice replacements in place, drop orphaned weights.

Each site's nodes are replaced, at the position of the node they replace, by the emitted nodes,
whose last node writes the site's original output tensor.  Order stays topological without a
re-sort, every other node, name and initializer is untouched (external-data references
included), and nothing is copied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .weights import rearrange_quantized

INT64_MAX = np.iinfo(np.int64).max
#: periodic tensors (per-phase bias, zero-insertion mask) up to this many elements are written as
#: constants; larger ones, and those of symbolic size, are built at run time by Tile
PERIODIC_CONSTANT_MAX = 1 << 18


@dataclass
class Emission:
    """Nodes and initializers that replace one site."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    form: str = ""  # which target form was emitted, e.g. "subpixel(DepthToSpace CRD)"


class Namer:
    """Fresh tensor and node names derived from a site's node name, unique in the model."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.taken = {t.name for t in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
        for node in g.node:
            self.taken.update(node.output)
            self.taken.add(node.name)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name = f"{base}_{i}"
            i += 1
        self.taken.add(name)
        return name


class Builder:
    """Emits nodes and constant initializers for one site, with names under ``prefix``."""

    def __init__(self, namer: Namer, prefix: str):
        self.namer = namer
        self.prefix = prefix
        self.emission = Emission()

    def constant(self, suffix: str, value: np.ndarray) -> str:
        name = self.namer(f"{self.prefix}/{suffix}")
        self.emission.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, suffix: str, value: np.ndarray, quant, transform, channel_axis: int | None, opset: int) -> str:
        """``transform(value)`` as a constant or, for a weight read through DequantizeLinear (``quant``),
        the rearranged integers + scale + zero point through a new DequantizeLinear.

        ValueError when ``transform`` changes integer values (only rearrangements keep a QDQ
        weight exact) or a per-channel scale needs an opset without per-channel DequantizeLinear.
        """
        if quant is None:
            return self.constant(suffix, transform(value))
        q = rearrange_quantized(quant, transform, channel_axis)
        if opset < 10 or (q.axis is not None and opset < 13):
            raise ValueError(f"opset {opset} has no {'per-channel ' if q.axis is not None else ''}DequantizeLinear")
        inputs = [self.constant(f"{suffix}_quantized", q.values), self.constant(f"{suffix}_scale", q.scale)]
        if q.zero_point is not None:
            inputs.append(self.constant(f"{suffix}_zero_point", q.zero_point))
        attrs = {"axis": q.axis} if q.axis is not None else {}
        return self.node("DequantizeLinear", inputs, f"{suffix}_dequantize", **attrs)

    def quantize_dequantize(self, x: str, scale: np.ndarray, zero_point: np.ndarray, output: str | None = None) -> str:
        """``DequantizeLinear(QuantizeLinear(x))`` with one per-tensor scale and zero point."""
        s, z = self.constant("requant_scale", scale), self.constant("requant_zero_point", zero_point)
        q = self.node("QuantizeLinear", [x, s, z], "quantize")
        return self.node("DequantizeLinear", [q, s, z], "dequantize", output=output)

    def slice(self, x: str, starts, ends, axes, opset: int, output: str | None = None) -> str:
        """Slice ``x``; ends are python-style (negative counts from the end, None means to the end)."""
        ends = [INT64_MAX if e is None else e for e in ends]
        if opset < 10:
            return self.node("Slice", [x], "crop", output=output, starts=list(starts), ends=ends, axes=list(axes))
        consts = [self.constant(f"crop_{k}", np.array(v, dtype=np.int64))
                  for k, v in (("starts", starts), ("ends", ends), ("axes", axes))]
        return self.node("Slice", [x, *consts], "crop", output=output)

    def periodic(self, pattern: np.ndarray, like: str, strides, extensions, lengths, opset: int) -> str:
        """A ``[1, C, s*L + e, ...]`` tensor repeating ``pattern [C, s...]`` with period s per axis.

        A constant when every length is static and it is small; otherwise built at run time:
        ``L`` are the spatial lengths of tensor ``like`` (None where symbolic: then the repeat
        counts are computed from its shape at run time).  Tile by ``q = L + ceil(e/s)`` (so
        ``q*s >= s*L + e``), then a Slice drops the ``s*ceil(e/s) - e`` extra positions.
        """
        rank = len(strides)
        extra = [-(-e // s) for s, e in zip(strides, extensions)]
        static = all(n is not None for n in lengths)
        if static:
            periods = [n + x for n, x in zip(lengths, extra)]
            out = [s * n + e for s, n, e in zip(strides, lengths, extensions)]
            if pattern.shape[0] * math.prod(out) <= PERIODIC_CONSTANT_MAX:  # a plain constant: portable
                full = np.tile(pattern, [1] + periods)
                return self.constant("periodic", full[(None, slice(None)) + tuple(slice(0, o) for o in out)])
        tiles = self.constant("period", pattern[None])
        if static:
            repeats = self.constant("repeats", np.array([1, 1] + periods, np.int64))
        else:
            shape = self.node("Shape", [like], "shape")
            index = self.constant("spatial_axes", np.arange(2, 2 + rank, dtype=np.int64))
            spatial = self.node("Gather", [shape, index], "spatial", axis=0)
            if any(extra):
                spatial = self.node("Add", [spatial, self.constant("extra", np.array(extra, np.int64))], "periods")
            repeats = self.node("Concat", [self.constant("ones", np.ones(2, np.int64)), spatial], "repeats", axis=0)
        y = self.node("Tile", [tiles, repeats], "tile")
        drop = [s * x - e for s, x, e in zip(strides, extra, extensions)]
        axes = [2 + i for i, d in enumerate(drop) if d]
        if axes:
            y = self.slice(y, [0] * len(axes), [-drop[a - 2] for a in axes], axes, opset)
        return y

    def node(self, op: str, inputs: list[str], suffix: str, output: str | None = None, **attrs) -> str:
        out = output if output is not None else self.namer(f"{self.prefix}/{suffix}_out")
        self.emission.nodes.append(
            helper.make_node(op, inputs, [out], name=self.namer(f"{self.prefix}/{suffix}"), **attrs)
        )
        return out


def splice(model: onnx.ModelProto, replacements: dict[str, tuple[tuple[str, ...], Emission]]) -> None:
    """Replace nodes in place; the emissions' initializers move into the model (their lists are emptied).

    ``replacements`` maps the first output of a site's last node to (first outputs of every node
    the site removes, emission).  Emitted nodes go where the site's last node was.
    """
    removed = {out for outs, _ in replacements.values() for out in outs}
    new_nodes = []
    for node in model.graph.node:
        key = node.output[0] if node.output else None
        if key in replacements:
            new_nodes.extend(replacements[key][1].nodes)
        elif key not in removed:
            new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    for _, emission in replacements.values():  # copied into the model (protobuf copies): free each as it goes
        model.graph.initializer.extend(emission.initializers)
        emission.initializers.clear()


def drop_unused(model: onnx.ModelProto, candidates: set[str]) -> None:
    """Remove initializers and nodes producing only ``candidates`` that nothing reads any more.

    Only tensors that fed rewritten sites (weights, their Constant/Identity chains, an upsampling
    node and its scales) are candidates: unrelated dead code is not ours to drop.
    """
    graph = model.graph
    while True:
        used = used_names(graph)
        dead_nodes = [
            n for n in graph.node
            if n.output and all(o in candidates and o not in used for o in n.output if o)
        ]
        if not dead_nodes:
            break
        for n in dead_nodes:
            graph.node.remove(n)
    used = used_names(graph)
    inputs = {i.name for i in graph.input}
    drop = [i for i, t in enumerate(graph.initializer) if t.name in candidates and t.name not in used]
    if drop:
        dropped = {graph.initializer[i].name for i in drop}
        for i in reversed(drop):  # in place: re-adding the kept ones would copy every weight
            del graph.initializer[i]
        # IR < 4 lists initializers as graph inputs too: drop those entries with them
        stale = [i for i in graph.input if i.name in dropped and i.name in inputs]
        for i in stale:
            graph.input.remove(i)


def used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor a node of ``graph`` or of its subgraphs reads, and the graph's outputs."""
    used = {o.name for o in graph.output}
    stack = [graph]
    while stack:
        g = stack.pop()
        for node in g.node:
            used.update(i for i in node.input if i)
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)
    return used


def op_census(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
