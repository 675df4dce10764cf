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


class Namer:
    """Fresh tensor and node names derived from a site's node name, unique in the model."""

    def __init__(self, model: onnx.ModelProto):
        self.taken = model_names(model)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name = f"{base}_{i}"
            i += 1
        self.taken.add(name)
        return name


def model_names(model: onnx.ModelProto) -> set[str]:
    """Every name ``model`` uses anywhere.

    A new name must avoid more than the main graph's tensors: a value_info entry of the same
    name gives it a type (onnxruntime rejects the mismatch), a subgraph name would be shadowed
    by the new outer one, and function bodies and training_info (its graphs and bindings) share
    the model's namespace for the checker.
    """
    names: set[str] = set()
    graphs, nodes = [model.graph], []
    for info in model.training_info:
        graphs += [info.initialization, info.algorithm]
        for binding in (*info.initialization_binding, *info.update_binding):
            names.update((binding.key, binding.value))
    for function in model.functions:
        names.update((*function.input, *function.output))
        names.update(v.name for v in getattr(function, "value_info", ()))  # onnx >= 1.15
        nodes.extend(function.node)
    while graphs or nodes:
        if graphs:
            g = graphs.pop()
            names.update(v.name for v in (*g.input, *g.output, *g.value_info))
            names.update(t.name for t in g.initializer)
            names.update(s.values.name for s in g.sparse_initializer)
            nodes.extend(g.node)
            continue
        node = nodes.pop()
        names.add(node.name)
        names.update((*node.input, *node.output))
        for attr in node.attribute:
            if attr.HasField("g"):
                graphs.append(attr.g)
            graphs.extend(attr.graphs)
    names.discard("")
    return names


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
    the site removes, emission).  Emitted nodes go where the site's last node was; the value_info
    of the tensors that go with the removed nodes goes too.
    """
    removed = {out for outs, _ in replacements.values() for out in outs}
    new_nodes, gone = [], set()
    for node in model.graph.node:
        key = node.output[0] if node.output else None
        if key in replacements:
            new_nodes.extend(replacements[key][1].nodes)
        elif key not in removed:
            new_nodes.append(node)
            continue
        gone.update(node.output)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    for _, emission in replacements.values():  # copied into the model (protobuf copies): free each as it goes
        model.graph.initializer.extend(emission.initializers)
        emission.initializers.clear()
    for _, emission in replacements.values():  # the sites' outputs stay
        gone.difference_update(o for n in emission.nodes for o in n.output)
    _drop_value_info(model.graph, gone)


def drop_unused(model: onnx.ModelProto, candidates: set[str]) -> None:
    """Remove initializers (dense or sparse) and nodes producing only ``candidates`` that nothing
    reads any more.

    Only tensors that fed rewritten sites (weights, their Constant/Identity chains, an upsampling
    node and its scales) are candidates: unrelated dead code is not ours to drop.  Tensors that
    training_info reads or binds stay (its algorithm may read the main graph's initializers).
    """
    graph = model.graph
    gone: set[str] = set()
    trained = training_names(model)
    while True:
        used = used_names(graph) | trained
        dead_nodes = [
            n for n in graph.node
            if n.output and all(o in candidates and o not in used for o in n.output if o)
        ]
        if not dead_nodes:
            break
        for n in dead_nodes:
            gone.update(n.output)
            graph.node.remove(n)
    used = used_names(graph) | trained
    inputs = {i.name for i in graph.input}
    dropped = set()
    for field_name, name_of in (("initializer", lambda t: t.name), ("sparse_initializer", lambda t: t.values.name)):
        tensors = getattr(graph, field_name)
        drop = [i for i, t in enumerate(tensors) if name_of(t) in candidates and name_of(t) not in used]
        dropped.update(name_of(tensors[i]) for i in drop)
        for i in reversed(drop):  # in place: re-adding the kept ones would copy every weight
            del tensors[i]
    # IR < 4 lists initializers as graph inputs too: drop those entries with them
    stale = [i for i in graph.input if i.name in dropped and i.name in inputs]
    for i in stale:
        graph.input.remove(i)
    _drop_value_info(graph, gone | dropped)


def _drop_value_info(graph: onnx.GraphProto, gone: set[str]) -> None:
    """Drop the value_info entries of tensors that no longer exist: a later tensor of the same name
    (another tool's, or a model edited by hand) would inherit a stale type and shape."""
    stale = [i for i, v in enumerate(graph.value_info) if v.name in gone]
    for i in reversed(stale):
        del graph.value_info[i]


def training_names(model: onnx.ModelProto) -> set[str]:
    """Main-graph tensors that training_info binds (the initializers it updates) or its graphs read.

    The algorithm runs on the inference graph joined with its own, so it may read any tensor of
    it, and name tensors in string attributes too (Gradient's xs, y, zs): those count as read.
    """
    names: set[str] = set()
    for info in model.training_info:
        names.update(b.key for b in (*info.initialization_binding, *info.update_binding))
        for graph in (info.initialization, info.algorithm):
            names |= used_names(graph)
            stack = [graph]
            while stack:
                g = stack.pop()
                for node in g.node:
                    for attr in node.attribute:
                        names.update(s.decode("utf-8", "replace") for s in (attr.s, *attr.strings) if s)
                        stack.extend([attr.g] if attr.HasField("g") else [])
                        stack.extend(attr.graphs)
    return names


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
