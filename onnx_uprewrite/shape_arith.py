"""The small shape computations exporters write for Resize ``sizes`` and ``scales``, evaluated.

``F.interpolate(x, size=skip.shape[2:])`` exports ``sizes = Concat(Slice(Shape(x), 0, 2),
Cast(Slice(Shape(skip), 2, 4)))``; ``recompute_scale_factor`` writes ``Cast(Floor(Mul(Cast(Shape(x)[2:]), 2.0)))``;
the old Upsample-9 exports ``scales = Concat([1, 1], Div(Floor(Mul(Cast(H), 2)), Cast(H)))``.  Each
element of such a tensor is tracked as an affine expression ``c + Σ k·dim(T, i)`` over tensor
lengths: a length that is static (``GraphIndex.static_shapes``) is its number, a symbolic one stays a
symbol.  On a static model the chain folds to numbers; on a symbolic one ``Mul(Shape(x)[2:], 2)``
stays ``2·dim(x, 2)``, twice the input's length at every input size.

A fixed whitelist of pure ops is evaluated; any other producer is read as a constant
(``GraphIndex.constant``) or blocks the chain with the reason.  Float arithmetic is followed only
where it is exact (constants computed in their dtype, symbols with small dyadic coefficients), and
Floor/Ceil/Cast-to-int only where the value is an integer at every size.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import onnx

from .sites import GraphIndex, NotConstant, attributes

Dim = tuple[str, int]  # (tensor, axis): the length of one axis of a tensor

_MAX_ELEMENTS = 64  # a shape computation: small vectors only
_MAX_NODES = 64
_MAX_LENGTH_BITS = 16  # float shape arithmetic is followed where exact for lengths below 2**16
_OPS = {"Identity", "Constant", "Shape", "Gather", "Slice", "Squeeze", "Unsqueeze", "Concat", "Reshape",
        "Cast", "Mul", "Div", "Add", "Sub", "Neg", "Floor", "Ceil"}


@dataclass(frozen=True)
class Affine:
    """``const + Σ coef·dim``, exact rational coefficients; no terms: a constant."""

    const: Fraction = Fraction(0)
    terms: tuple[tuple[Dim, Fraction], ...] = ()

    @staticmethod
    def of_dim(tensor: str, axis: int) -> Affine:
        return Affine(Fraction(0), (((tensor, axis), Fraction(1)),))

    @property
    def is_const(self) -> bool:
        return not self.terms

    def scaled(self, k: Fraction) -> Affine:
        return Affine(self.const * k, tuple((d, c * k) for d, c in self.terms if c * k))

    def plus(self, other: Affine) -> Affine:
        coefs = dict(self.terms)
        for d, c in other.terms:
            coefs[d] = coefs.get(d, Fraction(0)) + c
        return Affine(self.const + other.const, tuple(sorted((d, c) for d, c in coefs.items() if c)))

    def ratio(self, other: Affine) -> Fraction | None:
        """``r`` with ``self == r·other`` when ``other`` has terms, else None."""
        if other.is_const:
            return None
        dim, coef = other.terms[0]
        r = dict(self.terms).get(dim, Fraction(0)) / coef
        return r if other.scaled(r) == self else None

    def integral(self) -> bool:
        return self.const.denominator == 1 and all(c.denominator == 1 for _, c in self.terms)

    def describe(self) -> str:
        """E.g. ``2·dim 2 of 'x' - 1``."""
        parts = [(c, f"{'' if abs(c) == 1 else f'{abs(c)}·'}dim {a} of '{t}'") for (t, a), c in self.terms]
        if self.const or not parts:
            parts.append((self.const, str(abs(self.const))))
        text = "".join(f" {'-' if c < 0 else '+'} {p}" for c, p in parts)[3:]
        return ("-" if parts[0][0] < 0 else "") + text


@dataclass(frozen=True)
class Unknown:
    """An element the evaluation cannot follow, with the reason."""

    reason: str


Element = Affine | Unknown


@dataclass(frozen=True)
class Computed:
    """A tensor as elements (``values`` of dtype object) plus every tensor the computation read."""

    values: np.ndarray
    dtype: np.dtype
    tensors: tuple[str, ...]

    def flat(self) -> list[Element]:
        return list(self.values.ravel())


def evaluate(index: GraphIndex, name: str) -> Computed:
    """Evaluate tensor ``name``; NotConstant says why when the whole tensor cannot be followed."""
    ev = _Evaluator(index)
    try:
        values, dtype = ev.value(name)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError, ArithmeticError) as exc:  # malformed
        raise NotConstant(f"tensor '{name}' is computed by a malformed shape computation ({exc})") from None
    return Computed(values, dtype, tuple(dict.fromkeys(ev.tensors)))


#: ops whose output has their first input's shape (an activation, a cast, a quantization step)
_SAME_SHAPE = {"Identity", "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
               "Celu", "Gelu", "Mish", "Softplus", "Softsign", "Erf", "Exp", "Abs", "Neg", "Sqrt", "Cast", "Clip",
               "Dropout", "BatchNormalization", "InstanceNormalization", "LayerNormalization",
               "QuantizeLinear", "DequantizeLinear"}


def length_of(index: GraphIndex, tensor: str, axis: int) -> Dim:
    """``(tensor, axis)`` followed back through shape-preserving ops and Transposes to the tensor
    that first has that length, so that ``Shape(x_nhwc)[1]`` and dim 2 of ``Transpose(x_nhwc)``
    are the same symbol (tf2onnx resizes an NHWC tensor through such a Transpose)."""
    for _ in range(_MAX_NODES):
        node = index.producer.get(tensor)
        if node is None or node.domain not in ("", "ai.onnx") or not node.input or not node.input[0]:
            break
        if node.op_type == "Transpose":
            perm = attributes(node).get("perm")
            if perm is None or not 0 <= axis < len(perm):
                break
            axis = int(perm[axis])
        elif node.op_type not in _SAME_SHAPE or node.output[0] != tensor:
            break
        tensor = node.input[0]
    return tensor, axis


def shape_reads(index: GraphIndex, name: str) -> list[str]:
    """The tensors whose shapes the computation of ``name`` reads (the inputs of its Shape nodes):
    a run that measures them lets a static model's chain fold where inference left lengths unknown."""
    reads, stack, seen = [], [name], set()
    while stack and len(seen) <= _MAX_NODES:
        tensor = stack.pop()
        node = index.producer.get(tensor)
        if tensor in seen or node is None or node.domain not in ("", "ai.onnx") or node.op_type not in _OPS:
            continue
        seen.add(tensor)
        if node.op_type == "Shape":
            reads.append(node.input[0])
        else:
            stack.extend(i for i in node.input if i)
    return list(dict.fromkeys(reads))


class _Evaluator:
    def __init__(self, index: GraphIndex):
        self.index = index
        self.memo: dict[str, tuple[np.ndarray, np.dtype] | None] = {}
        self.tensors: list[str] = []  # what the computation read (drop candidates), Shape inputs excluded
        self.nodes = 0

    def value(self, name: str) -> tuple[np.ndarray, np.dtype]:
        if name in self.memo and self.memo[name] is None:
            raise NotConstant(f"tensor '{name}' is part of a cycle")
        if name not in self.memo:
            self.memo[name] = None  # in progress
            values, dtype = self._compute(name)
            if not isinstance(values, np.ndarray):  # numpy returns a lone element for a scalar Gather
                boxed = np.empty((), dtype=object)
                boxed[()] = values
                values = boxed
            self.memo[name] = values, dtype
            self.tensors.append(name)
        return self.memo[name]

    def constant_input(self, node: onnx.NodeProto, i: int) -> np.ndarray | None:
        """Input ``i`` as integers (Slice starts, Gather indices, axes), None when absent."""
        if len(node.input) <= i or not node.input[i]:
            return None
        values, _ = self.value(node.input[i])
        out = []
        for v in values.ravel():
            if isinstance(v, Unknown) or not v.is_const or v.const.denominator != 1:
                raise NotConstant(f"input '{node.input[i]}' of {node.op_type} '{node.name}' is not a constant"
                                  + (f" ({v.reason})" if isinstance(v, Unknown) else ""))
            out.append(int(v.const))
        return np.array(out, np.int64).reshape(values.shape)

    def _compute(self, name: str) -> tuple[np.ndarray, np.dtype]:
        index = self.index
        node = index.producer.get(name)
        if name in index.initializers or node is None or node.domain not in ("", "ai.onnx") or node.op_type not in _OPS:
            value, chain = index.constant(name)  # NotConstant names the blocker
            self.tensors.extend(chain)
            return _from_array(value, name)
        self.nodes += 1
        if self.nodes > _MAX_NODES:
            raise NotConstant(f"tensor '{name}' is computed by more than {_MAX_NODES} nodes")
        op, attrs = node.op_type, attributes(node)
        opset = index.opset
        if op == "Constant":
            value, chain = index.constant(name)
            self.tensors.extend(chain)
            return _from_array(value, name)
        if op == "Shape":
            return self._shape(node, attrs), np.dtype(np.int64)
        x, dtype = self.value(node.input[0])
        if op == "Identity":
            return x, dtype
        if op == "Gather":
            indices = self.constant_input(node, 1)
            axis = int(attrs.get("axis", 0)) % max(x.ndim, 1)
            n = x.shape[axis]
            if np.any((indices < -n) | (indices >= n)):
                raise NotConstant(f"Gather '{node.name}' indices {indices.tolist()} are out of range")
            return np.take(x, np.where(indices < 0, indices + n, indices), axis=axis), dtype
        if op == "Slice":
            if opset < 10:
                starts, ends = attrs["starts"], attrs["ends"]
                axes, steps = attrs.get("axes", range(len(starts))), [1] * len(starts)
            else:
                starts, ends = self.constant_input(node, 1).tolist(), self.constant_input(node, 2).tolist()
                axes = self.constant_input(node, 3)
                axes = range(len(starts)) if axes is None else axes.tolist()
                steps = self.constant_input(node, 4)
                steps = [1] * len(starts) if steps is None else steps.tolist()
            cut = [slice(None)] * x.ndim
            for a, b, e, s in zip(axes, starts, ends, steps):
                if s == 0:
                    raise NotConstant(f"Slice '{node.name}' has step 0")
                cut[int(a) % x.ndim] = slice(int(b), int(e), int(s))  # Python clamps as ONNX does
            return x[tuple(cut)], dtype
        if op in ("Squeeze", "Unsqueeze"):
            axes = attrs.get("axes") if opset < 13 else self.constant_input(node, 1)
            axes = None if axes is None else [int(a) for a in np.ravel(axes)]
            if op == "Squeeze":
                axes = [a for a, n in enumerate(x.shape) if n == 1] if axes is None else [a % x.ndim for a in axes]
                return x.reshape([n for a, n in enumerate(x.shape) if a not in axes]), dtype
            if axes is None:
                raise NotConstant(f"Unsqueeze '{node.name}' has no axes")
            shape, rank = list(x.shape), x.ndim + len(axes)
            for a in sorted(a % rank for a in axes):
                shape.insert(a, 1)
            return x.reshape(shape), dtype
        if op == "Concat":
            parts = [self.value(i)[0] for i in node.input if i]
            axis = int(attrs.get("axis", 0))
            return _limit(np.concatenate(parts, axis=axis), name), dtype
        if op == "Reshape":
            shape = self.constant_input(node, 1).tolist()
            shape = [x.shape[i] if n == 0 and not int(attrs.get("allowzero", 0)) else n for i, n in enumerate(shape)]
            return x.reshape(shape), dtype
        if op == "Cast":
            to = _np_dtype(int(attrs["to"]), node)
            return _elementwise(lambda v: _cast(v, dtype, to), x), to
        if op in ("Floor", "Ceil", "Neg"):
            return _elementwise(lambda v: _unary(op, v, dtype), x), dtype
        y, _ = self.value(node.input[1])
        return _limit(_elementwise(lambda a, b: _binary(op, a, b, dtype), x, y), name), dtype

    def _shape(self, node: onnx.NodeProto, attrs: dict) -> np.ndarray:
        tensor = node.input[0]
        shape = self.index.static_shapes.get(tensor)
        if shape is None:
            raise NotConstant(f"the rank of '{tensor}' (read by Shape '{node.name}') is unknown")
        dims = np.empty(len(shape), dtype=object)
        for a, n in enumerate(shape):
            dims[a] = Affine(Fraction(n)) if n is not None else Affine.of_dim(*length_of(self.index, tensor, a))
        return dims[int(attrs.get("start", 0)):attrs.get("end", None)]


def _from_array(value: np.ndarray, name: str) -> tuple[np.ndarray, np.dtype]:
    if value.size > _MAX_ELEMENTS:
        raise NotConstant(f"tensor '{name}' has {value.size} elements, not a shape computation")
    if not (np.issubdtype(value.dtype, np.integer) or value.dtype in (np.float16, np.float32, np.float64)):
        raise NotConstant(f"tensor '{name}' has dtype {value.dtype}")
    out = np.empty(value.shape, dtype=object)
    for i, v in np.ndenumerate(value):
        out[i] = Affine(Fraction(v.item()))
    return out, value.dtype


def _limit(values: np.ndarray, name: str) -> np.ndarray:
    if values.size > _MAX_ELEMENTS:
        raise NotConstant(f"tensor '{name}' has {values.size} elements, not a shape computation")
    return values


def _np_dtype(to: int, node: onnx.NodeProto) -> np.dtype:
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(to))
    except Exception:
        dtype = np.dtype(object)
    if not (np.issubdtype(dtype, np.integer) or dtype in (np.float16, np.float32, np.float64)):
        raise NotConstant(f"Cast '{node.name}' to {onnx.TensorProto.DataType.Name(to)} is not a shape computation")
    return dtype


def _elementwise(fn, *arrays) -> np.ndarray:
    shape = np.broadcast_shapes(*(a.shape for a in arrays))
    return np.asarray(np.frompyfunc(fn, len(arrays), 1)(*arrays), dtype=object).reshape(shape)


def _in_dtype(value: Fraction, dtype: np.dtype) -> Fraction:
    """The number as ``dtype`` computes it (rounded to float32, wrapped to int64, ...)."""
    if np.issubdtype(dtype, np.integer):
        return Fraction(int(np.array(int(value)).astype(dtype)))
    return Fraction(np.array(float(value), dtype).item())


def _exact_symbolic(v: Affine, dtype: np.dtype) -> Element:
    """A symbolic value in a float dtype, kept only while it is exact: with every length below
    ``2**16``, ``value·D`` (D the largest denominator, a power of two) must fit the mantissa; then
    each float operation on it returns the rational result."""
    if v.is_const or np.issubdtype(dtype, np.integer):
        return v
    coefs = [v.const] + [c for _, c in v.terms]
    den = max(c.denominator for c in coefs)
    bound = den * (abs(v.const) + sum(abs(c) for _, c in v.terms) * 2 ** _MAX_LENGTH_BITS)
    if den & (den - 1) or bound >= 2 ** (np.finfo(dtype).nmant + 1):
        return Unknown(f"float arithmetic on {v.describe()} may round")
    return v


def _cast(v: Element, src: np.dtype, to: np.dtype) -> Element:
    if isinstance(v, Unknown):
        return v
    if v.is_const:
        value = np.array(int(v.const) if np.issubdtype(src, np.integer) else float(v.const), src).astype(to)
        return Affine(Fraction(value.item()))
    if np.issubdtype(to, np.integer) and not v.integral():
        return Unknown(f"Cast to an integer truncates {v.describe()}, which is not an integer at every size")
    return _exact_symbolic(v, to)


def _unary(op: str, v: Element, dtype: np.dtype) -> Element:
    if isinstance(v, Unknown):
        return v
    if op == "Neg":
        return v.scaled(Fraction(-1)) if not v.is_const else Affine(_in_dtype(-v.const, dtype))
    if v.is_const:
        return Affine(Fraction(np.floor(float(v.const)) if op == "Floor" else np.ceil(float(v.const))))
    if v.integral():
        return v  # an integer at every size (lengths are integers)
    return Unknown(f"{op} of {v.describe()}, which is not an integer at every size")


def _binary(op: str, a: Element, b: Element, dtype: np.dtype) -> Element:
    if isinstance(a, Unknown):
        return a
    if isinstance(b, Unknown):
        return b
    integer = np.issubdtype(dtype, np.integer)
    if a.is_const and b.is_const:
        if op == "Div" and b.const == 0:
            return Unknown("division by zero")
        if integer:
            x, y = int(a.const), int(b.const)
            r = {"Mul": x * y, "Add": x + y, "Sub": x - y}.get(op)
            if r is None:  # integer Div truncates toward zero
                r = abs(x) // abs(y) * (1 if (x < 0) == (y < 0) else -1)
            return Affine(_in_dtype(Fraction(r), dtype))
        x, y = np.array(float(a.const), dtype), np.array(float(b.const), dtype)
        r = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Div": np.divide}[op](x, y)
        return Affine(Fraction(np.asarray(r, dtype).item()))
    if op in ("Add", "Sub"):
        result = a.plus(b if op == "Add" else b.scaled(Fraction(-1)))
    elif op == "Mul":
        if not (a.is_const or b.is_const):
            return Unknown(f"a product of lengths ({a.describe()}) · ({b.describe()})")
        result = a.scaled(b.const) if b.is_const else b.scaled(a.const)
    else:  # Div
        if b.is_const:
            if b.const == 0:
                return Unknown("division by zero")
            result = a.scaled(1 / b.const)
            if integer and not result.integral():
                return Unknown(f"integer division of {a.describe()} by {b.const} rounds")
        else:
            r = a.ratio(b)
            if r is None:
                return Unknown(f"a quotient of lengths ({a.describe()}) / ({b.describe()})")
            # exact operands: the quotient is r as the dtype rounds it (truncated for integers)
            return Affine(Fraction(int(r)) if integer else _in_dtype(r, dtype))
    return _exact_symbolic(result, dtype)
