"""Finding upsampling sites in a graph and describing them as canonical transposed convolutions.

A :class:`Site` is a frozen value holding everything an emitter needs (weights in ConvTranspose
layout, per-axis geometry, tensor names); a :class:`Refusal` names the node and the reason it is
left alone.  Parsers live in ``onnx_uprewrite.passes``; this module holds what they share: the
read-only :class:`GraphIndex` (producers, consumers, constants, static shapes).
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .addend import Addend
from .errors import first_line, one_line
from .model_io import default_opset, tensor_array
from .shapes import infer_shapes, static_dims as _static_dims
from .surgery import training_names
from .weights import Axis, QuantizedWeight


@dataclass(frozen=True, eq=False)
class Site:
    """One learned-upsampling site as a canonical transposed convolution (DESIGN.md §1)."""

    node: str  # name of the node that identifies the site (for --only and reports)
    source: str  # source form, e.g. "convtranspose"
    replaced_outputs: tuple[str, ...]  # first output of each node the rewrite removes
    input: str  # activation tensor entering the site
    output: str  # tensor the site produces (kept as the output name of the replacement)
    weight: np.ndarray  # [Cin, Cout/g, K...]
    bias: np.ndarray | None
    group: int
    axes: tuple[Axis, ...]
    input_lengths: tuple[int | None, ...]  # static spatial input lengths where known
    weight_tensors: tuple[str, ...]  # constant tensors feeding the site (dropped when unused)
    notes: tuple[str, ...] = ()
    # bias that repeats with period s: [Cout, s0, s1, ...], indexed by the phase (o + pb) mod s of
    # the uncropped result (a sub-pixel Conv whose bias differs across phases); None: ``bias`` only
    phase_bias: np.ndarray | None = None
    # ``|W|`` for the per-site tolerance where ``weight`` sums several source weights (an upsampling
    # composed into a Conv): the source form rounds sums of |V| * |x| terms, which |sum V| underrates
    magnitude_weight: np.ndarray | None = None
    source_macs: int | None = None  # MACs of the source form where the canonical site can't tell
    # edge padding (begins..., ends...) of the input before the transposed convolution (Resize
    # coordinate clamping); ``input_lengths`` and ``axes`` then describe the padded input
    pre_pad: tuple[int, ...] | None = None
    # a Transpose bringing ``input`` into [N, C, spatial...] layout first (tf2onnx NHWC graphs)
    pre_perm: tuple[int, ...] | None = None
    # integer weight / bias read through DequantizeLinear (QDQ models), in ``weight`` / ``bias``
    # layout: emitters rearrange the integers and keep the DequantizeLinear
    weight_quant: QuantizedWeight | None = None
    bias_quant: QuantizedWeight | None = None
    # per-tensor (scale, zero point) of the QuantizeLinear reading the site's output (QDQ models):
    # the sub-pixel emitter quantizes its Conv output with it (exact: depth-to-space only moves values)
    output_quant: tuple[np.ndarray, np.ndarray] | None = None
    # a QuantizeLinear -> DequantizeLinear pair inside the source form (between a sub-pixel Conv and
    # its depth-to-space), removed with it: emitters re-apply it to the site's output
    requantize: tuple[np.ndarray, np.ndarray] | None = None
    # spatial input lengths at the reference size where ``input_lengths`` are symbolic: MAC counts and
    # layout choices use them (priced()), emitted graphs never do (they stay valid at every size)
    nominal_lengths: tuple[int | None, ...] | None = None
    # a Conv split by input channels (Resize -> Concat -> Conv): the part over the other Concat inputs,
    # emitted beside the site and added into its output (addend.py); the site is the upsampled part
    addend: Addend | None = None

    @property
    def rank(self) -> int:
        return len(self.axes)

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1] * self.group

    @property
    def in_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def terms_per_output(self) -> int:
        """Products summed per output value, the size that float rounding grows with."""
        taps = int(np.prod([a.kernel for a in self.axes]))  # upper bound: every tap overlaps
        return max(1, (self.in_channels // self.group) * taps) + (self.addend.terms if self.addend else 0)

    def params(self) -> dict:
        return {
            "rank": self.rank,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "group": self.group,
            "strides": [a.stride for a in self.axes],
            "kernel": [a.kernel for a in self.axes],
            "dilations": [a.dilation for a in self.axes],
            "crop_begin": [a.crop_begin for a in self.axes],
            "extension": [a.extension for a in self.axes],
            "bias": "per-phase" if self.phase_bias is not None else self.bias is not None,
            "edge_pad": list(self.pre_pad) if self.pre_pad else None,
            "dtype": str(self.weight.dtype),
        }


def priced(site: Site) -> Site:
    """``site`` with its nominal lengths (measured at the reference size) where its own are symbolic:
    for MAC counts and layout choices only, never for emission."""
    if site.nominal_lengths is None or None not in site.input_lengths:
        return site
    lengths = tuple(n if n is not None else m for n, m in zip(site.input_lengths, site.nominal_lengths))
    return dataclasses.replace(site, input_lengths=lengths, nominal_lengths=None)


@dataclass(frozen=True)
class Refusal:
    node: str
    source: str
    reason: str

    def __post_init__(self):  # one line wherever it is shown (JSON too), as error messages are
        object.__setattr__(self, "reason", one_line(self.reason))


class NotConstant(Exception):
    """A tensor expected to be constant is computed at run time (or fed as a graph input)."""


@dataclass
class GraphIndex:
    """Read-only lookups over a model's main graph, built once per run."""

    model: onnx.ModelProto
    static_shapes: dict[str, tuple[int | None, ...]] = field(default_factory=dict)
    # shapes under the user's --shape values: used only where a site needs a concrete length
    # (output_shape); emitted graphs otherwise stay as symbolic as the model declares
    assumed_shapes: dict[str, tuple[int | None, ...]] = field(default_factory=dict)

    def __post_init__(self):
        graph = self.model.graph
        self.opset = default_opset(self.model) or 0
        self.initializers = {t.name: t for t in graph.initializer}
        # sparse initializers are constants too (weights may live there): densified here, kept sparse in the model
        self.initializers.update((t.values.name, _densify(t)) for t in graph.sparse_initializer)
        # initializers that training_info updates or initializes are not constants: training changes them
        self.trained = {b.key: kind for info in self.model.training_info
                        for kind, bindings in (("initialization", info.initialization_binding),
                                               ("update", info.update_binding)) for b in bindings}
        self.folded: dict[str, list[str]] = {}  # tensor -> op types evaluated to fold it
        self._fold_cache: dict[str, tuple[np.ndarray, tuple[str, ...]]] = {}
        self.graph_inputs = {i.name for i in graph.input}
        # training_info's algorithm runs on top of this graph: what it reads is visible outside, like an output
        self.graph_outputs = {o.name for o in graph.output} | training_names(self.model)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for name in _node_input_names(node):
                self.consumers.setdefault(name, []).append(node)
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            shape = _static_dims(vi)
            if shape is not None and vi.name not in self.static_shapes:
                self.static_shapes[vi.name] = shape

    def constant(self, name: str) -> tuple[np.ndarray, tuple[str, ...]]:
        """Value of a constant tensor and the names of the tensors in its chain.

        Follows Identity nodes to an initializer or a Constant node; anything else raises
        NotConstant with the reason.
        """
        chain: list[str] = []
        seen = set()
        while True:
            if name in seen:
                raise NotConstant(f"tensor '{name}' is part of a cycle")
            seen.add(name)
            chain.append(name)
            if name in self.initializers:
                self._check_untrained(name, name)
                if name in self.graph_inputs and self.model.ir_version >= 4:
                    raise NotConstant(
                        f"tensor '{name}' is a graph input with a default initializer: "
                        "callers may override it"
                    )
                return tensor_array(self.initializers[name]), tuple(chain)
            node = self.producer.get(name)
            if node is None:
                what = "a graph input" if name in self.graph_inputs else "produced by no node"
                raise NotConstant(f"tensor '{name}' is {what}, not a constant")
            if node.op_type == "Identity" and node.domain in ("", "ai.onnx"):
                name = node.input[0]
                continue
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                return _constant_node_value(node), tuple(chain)
            value, folded = self._fold(name)
            return value, tuple(chain[:-1]) + folded

    def _check_untrained(self, name: str, initializer: str) -> None:
        if initializer in self.trained:
            via = "" if initializer == name else f" depends on '{initializer}', which"
            raise NotConstant(f"tensor '{name}'{via} is bound by the model's training_info "
                              f"({self.trained[initializer]}_binding): training would change a weight "
                              "the rewrite replaces")

    def _fold(self, name: str) -> tuple[np.ndarray, tuple[str, ...]]:
        """Evaluate the constant subgraph computing ``name`` in onnxruntime (weight norm, Cast,
        DequantizeLinear, ... written by exporters that did not fold constants).

        Every leaf must be a constant (an initializer callers cannot override, or a Constant
        node), every node a deterministic standard op without subgraphs; otherwise NotConstant
        names the tensor or node that blocks it.  Returns the value and every tensor involved
        (memoized: parsers ask for the same weight in ``matches`` and ``parse``).
        """
        if name in self._fold_cache:
            return self._fold_cache[name]
        nodes: dict[int, onnx.NodeProto] = {}
        leaves: dict[str, onnx.TensorProto] = {}
        stack, seen = [name], set()
        while stack:
            tensor = stack.pop()
            if tensor in seen or not tensor:
                continue
            seen.add(tensor)
            if tensor in self.initializers:
                self._check_untrained(name, tensor)
                if tensor in self.graph_inputs and self.model.ir_version >= 4:
                    raise NotConstant(f"tensor '{name}' depends on graph input '{tensor}' (an overridable initializer)")
                leaves[tensor] = self.initializers[tensor]
                continue
            node = self.producer.get(tensor)
            if node is None:
                what = "graph input" if tensor in self.graph_inputs else "tensor produced by no node"
                raise NotConstant(f"tensor '{name}' depends on {what} '{tensor}', not a constant")
            if node.domain not in ("", "ai.onnx") or node.op_type in _NOT_FOLDABLE or any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
            ):
                raise NotConstant(f"tensor '{name}' is computed by {node.op_type} node '{node.name}', "
                                  "which is not constant-foldable")
            nodes[id(node)] = node
            if len(nodes) > _FOLD_MAX_NODES:
                raise NotConstant(f"tensor '{name}' is computed by more than {_FOLD_MAX_NODES} nodes")
            stack.extend(node.input)
        order = [n for n in self.model.graph.node if id(n) in nodes]
        try:
            value = _evaluate(self.model, order, list(leaves.values()), name)
        except Exception as exc:  # noqa: BLE001 - any failure means: not a constant we can use
            first = first_line(exc)
            raise NotConstant(f"tensor '{name}' is computed by nodes onnxruntime cannot fold: {first}") from None
        ops = sorted({n.op_type for n in order})
        self.folded[name] = ops
        tensors = [o for n in order for o in n.output if o] + list(leaves)
        self._fold_cache[name] = value, tuple(dict.fromkeys([name, *tensors]))
        return self._fold_cache[name]

    def quantized(self, name: str) -> QuantizedWeight | None:
        """The integer tensor, scale and zero point of a weight read through ``DequantizeLinear``
        (possibly behind Identity nodes), or None; NotConstant if its inputs are not constant."""
        while True:
            node = self.producer.get(name)
            if node is None or node.domain not in ("", "ai.onnx") or name in self.initializers:
                return None
            if node.op_type == "Identity":
                name = node.input[0]
                continue
            if node.op_type != "DequantizeLinear":
                return None
            break
        attrs = attributes(node)
        if int(attrs.get("block_size", 0)):
            raise NotConstant(f"DequantizeLinear '{node.name}' uses block quantization (block_size)")
        values, _ = self.constant(node.input[0])
        scale, _ = self.constant(node.input[1])
        zero = self.constant(node.input[2])[0] if len(node.input) > 2 and node.input[2] else None
        if not np.issubdtype(values.dtype, np.integer):
            return None  # float8 and friends: folded like any other constant computation
        axis = int(attrs.get("axis", 1)) if scale.ndim == 1 and scale.size > 1 else None
        if axis is not None and axis < 0:
            axis += values.ndim
        return QuantizedWeight(values, scale, zero, axis, node.name or node.output[0])

    def weight_and_bias(self, node: onnx.NodeProto, weight_label: str, bias_label: str):
        """``(weight, weight chain, bias or None, bias chain)`` of a Conv-like node; NotConstant says why."""
        if len(node.input) < 2 or not node.input[1]:
            raise NotConstant(f"has no {weight_label} input")
        try:
            weight, w_chain = self.constant(node.input[1])
        except NotConstant as exc:
            raise NotConstant(f"{weight_label} is not constant: {exc}") from None
        bias, b_chain = None, ()
        if len(node.input) > 2 and node.input[2]:
            try:
                bias, b_chain = self.constant(node.input[2])
            except NotConstant as exc:
                raise NotConstant(f"{bias_label} is not constant: {exc}") from None
        return weight, w_chain, bias, b_chain

    def spatial_lengths(self, tensor: str, rank: int, assumed: bool = False) -> tuple[int | None, ...]:
        shape = self.static_shapes.get(tensor)
        if assumed and (shape is None or None in shape[2:]):
            shape = self.assumed_shapes.get(tensor, shape)
        if shape is None or len(shape) != rank + 2:
            return (None,) * rank
        return tuple(shape[2:])

    def shape_computation(self, name: str) -> tuple[str, ...]:
        """Tensors of the small shape computation (Shape -> Gather -> Concat ...) producing ``name``.

        They become drop candidates with the node reading them: removed only if nothing else reads
        them.  The walk stops at ``Shape`` (whose input is an activation) and at any other op.
        """
        found, stack = [], [name]
        while stack:
            tensor = stack.pop()
            if tensor in found or not tensor:
                continue
            found.append(tensor)
            node = self.producer.get(tensor)
            if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in _SHAPE_OPS:
                continue
            found.extend(o for o in node.output if o and o != tensor)
            if node.op_type != "Shape":
                stack.extend(node.input)
        return tuple(found)

    def tensor_quant(self, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
        """Constant per-tensor ``(scale, zero point)`` of a QuantizeLinear/DequantizeLinear, or None."""
        if node.domain not in ("", "ai.onnx") or len(node.input) < 3 or not node.input[2]:
            return None
        attrs = attributes(node)
        if int(attrs.get("block_size", 0)) or "output_dtype" in attrs:
            return None
        try:
            scale, _ = self.constant(node.input[1])
            zero, _ = self.constant(node.input[2])
        except NotConstant:
            return None
        if scale.size != 1 or zero.size != 1 or not np.issubdtype(zero.dtype, np.integer):
            return None
        return scale.reshape(()), zero.reshape(())

    def quantized_output(self, tensor: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-tensor ``(scale, zero point)`` when the only reader of ``tensor`` is a QuantizeLinear."""
        readers = self.consumers.get(tensor, [])
        if self.uses(tensor) != 1 or len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
            return None
        return self.tensor_quant(readers[0])

    def qdq_pair_before(self, tensor: str) -> tuple[tuple[onnx.NodeProto, onnx.NodeProto], tuple] | None:
        """``((Q, DQ), (scale, zero point))`` when ``tensor`` is ``DequantizeLinear(QuantizeLinear(t))``
        with equal per-tensor parameters and nothing else reads the quantized tensor."""
        dq = self.producer.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear" or not dq.input:
            return None
        q = self.producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or self.uses(dq.input[0]) != 1:
            return None
        a, b = self.tensor_quant(q), self.tensor_quant(dq)
        if a is None or b is None or not all(x.dtype == y.dtype and x == y for x, y in zip(a, b)):
            return None
        return (q, dq), a

    def dequantize_nodes(self, chain: tuple[str, ...]) -> list[str]:
        """Names of the DequantizeLinear nodes producing tensors of ``chain``."""
        nodes = (self.producer.get(t) for t in chain)
        return [n.name or n.output[0] for n in nodes if n is not None and n.op_type == "DequantizeLinear"]

    def uses(self, name: str) -> int:
        """How many node inputs (subgraphs included) and graph outputs read this tensor."""
        return len(self.consumers.get(name, ())) + (name in self.graph_outputs)


_FOLD_MAX_NODES = 64
#: ops never folded: random generators (a value that changes per run is not a weight) and
#: ops whose result is not a pure function of its inputs
_NOT_FOLDABLE = {
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "If", "Loop", "Scan",
}


def _evaluate(model: onnx.ModelProto, nodes: list[onnx.NodeProto], leaves: list[onnx.TensorProto], name: str):
    """Run ``nodes`` (a constant subgraph of ``model``) in onnxruntime and return tensor ``name``."""
    from .verify import session

    graph = onnx.helper.make_graph(nodes, "fold", [], [onnx.ValueInfoProto(name=name)], initializer=leaves)
    small = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
    small.ir_version = model.ir_version
    small.functions.extend(model.functions)
    typed = infer_shapes(small)
    known = {vi.name: vi for vi in list(typed.graph.value_info) + list(typed.graph.output)}
    out = known.get(name)
    if out is None or not out.type.tensor_type.elem_type:
        raise ValueError(f"cannot infer the type of '{name}'")
    del small.graph.output[:]
    small.graph.output.append(out)
    return session(small).run([name], {})[0]


_SHAPE_OPS = {
    "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Constant", "Identity", "Cast", "Slice", "Mul", "Div",
    "Add", "Sub", "Floor", "Ceil", "ConstantOfShape", "Range", "ReduceProd",
}


def _node_input_names(node: onnx.NodeProto):
    yield from (i for i in node.input if i)
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            yield from _outer_names(g)


def _outer_names(graph: onnx.GraphProto):
    """Names a subgraph reads (conservatively: every input name used anywhere inside it)."""
    for node in graph.node:
        yield from _node_input_names(node)


def _densify(sparse: onnx.SparseTensorProto) -> onnx.TensorProto:
    """The dense tensor of a sparse initializer (indices linear [NNZ] or coordinates [NNZ, rank])."""
    values, indices = tensor_array(sparse.values), tensor_array(sparse.indices).astype(np.int64)
    dense = np.zeros(math.prod(sparse.dims), dtype=values.dtype)
    if indices.ndim == 2:
        indices = np.ravel_multi_index(tuple(indices.T), tuple(sparse.dims)) if indices.size else indices.ravel()
    dense[indices] = values.ravel()
    return numpy_helper.from_array(dense.reshape(tuple(sparse.dims)), sparse.values.name)


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    raise NotConstant(f"Constant node '{node.name}' has no dense value attribute")


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def text(value) -> str:
    """A STRING attribute value as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class ConvGeometry:
    """Attributes of a stride-1 ``Conv`` resolved to explicit per-axis values."""

    group: int
    kernel: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]


def conv_weights(node: onnx.NodeProto, index: GraphIndex):
    """``(weight, weight chain, bias, bias chain, geometry)`` of a stride-1 float Conv that folds into
    an upsampling; ValueError gives the one-line reason it cannot."""
    try:
        weight, w_chain, bias, b_chain = index.weight_and_bias(node, "Conv weight", "Conv bias")
    except NotConstant as exc:
        raise ValueError(str(exc)) from None
    if not np.issubdtype(weight.dtype, np.floating):
        raise ValueError(f"Conv weight dtype {weight.dtype} is not a float type")
    if weight.ndim < 3:
        raise ValueError(f"Conv weight has rank {weight.ndim}")
    try:
        geo = conv_geometry(node, weight)
    except ValueError as exc:
        raise ValueError(f"Conv {exc}") from None
    return weight, w_chain, bias, b_chain, geo


def conv_geometry(node: onnx.NodeProto, weight: np.ndarray) -> ConvGeometry:
    """Resolve a Conv's padding attributes; ValueError names the attribute that blocks a rewrite.

    Only stride-1 Convs are accepted (the ones that fold into an upsampling).  SAME_UPPER puts
    the smaller half of ``(K-1)*d`` first, SAME_LOWER the larger; onnxruntime rejects SAME with
    dilation, so it is refused here too.
    """
    attrs = attributes(node)
    rank = weight.ndim - 2
    group = int(attrs.get("group", 1))
    kernel = tuple(int(k) for k in weight.shape[2:])
    if "kernel_shape" in attrs and tuple(attrs["kernel_shape"]) != kernel:
        raise ValueError(f"attribute kernel_shape {list(attrs['kernel_shape'])} disagrees with weight {list(kernel)}")
    strides = [int(v) for v in attrs.get("strides", [1] * rank)]
    if any(v != 1 for v in strides):
        raise ValueError(f"attribute strides={strides}: only stride-1 Convs fold into an upsampling")
    dilations = [int(v) for v in attrs.get("dilations", [1] * rank)]
    pads = [int(v) for v in attrs.get("pads", [0] * (2 * rank))]
    auto_pad = text(attrs.get("auto_pad", "NOTSET"))
    if len(dilations) != rank or len(pads) != 2 * rank or any(d < 1 for d in dilations) or any(p < 0 for p in pads):
        raise ValueError(f"attributes dilations={dilations} pads={pads} are invalid for rank {rank}")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if any(d != 1 for d in dilations):
            raise ValueError(f"attribute auto_pad={auto_pad} with dilations={dilations} (onnxruntime rejects it)")
        totals = [(k - 1) * d for k, d in zip(kernel, dilations)]
        begins = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in totals]
        pads = begins + [t - b for t, b in zip(totals, begins)]
    elif auto_pad == "VALID":
        pads = [0] * (2 * rank)
    elif auto_pad != "NOTSET":
        raise ValueError(f"attribute auto_pad={auto_pad!r} is not supported")
    if group < 1 or weight.shape[0] % group:
        raise ValueError(f"attribute group={group} does not divide the {weight.shape[0]} output channels")
    return ConvGeometry(group, kernel, tuple(dilations), tuple(pads[:rank]), tuple(pads[rank:]))
