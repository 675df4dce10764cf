"""onnxruntime sessions, verification inputs, and comparison with a stated tolerance.

Tolerance (per graph output):  ``|rewritten - original| <= atol + rtol * max|original|``.
A rewrite only reorders the float sums inside each site, so the rounding error of one output
value is bounded by about ``eps * sqrt(T)`` times its magnitude for T summed products
(random-walk rounding; the worst case is ``eps * T``).  Default: ``rtol = 8 * eps * sqrt(T)``
with eps of the output dtype and T the total terms per output over the rewritten sites
(``Cin/group * prod(K)`` each), and ``atol = 0``; both can be overridden.  A wrong tap or a wrong
crop gives errors of the order of the output itself, far above this.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from .budget import onnxruntime_allocations, run_session
from .errors import UprewriteError, UsageError, VerificationImpossible
from .model_io import NUMPY_RAW, external_ref, is_lazy, shell, tensor_bytes, tensor_memmap, tensor_raw
from .report import OutputCheck, Tolerance
from .surgery import used_names

ort.set_default_logger_severity(4)  # onnxruntime's own error lines would bypass our one-line messages


def nonfinite_problem(checks: list[OutputCheck]) -> str | None:
    """Why outputs that agree wherever the original is finite still cannot be compared: the original
    gives inf/NaN and the rewritten model other values there (onnxruntime fuses nodes differently
    around them; inf - inf has no rounding error to bound)."""
    odd = [c for c in checks if c.nonfinite_mismatches and c.max_abs_error <= c.tolerance
           and c.rewritten_shape is None]
    if not odd or any(not c.ok for c in checks if c not in odd):
        return None
    return "; ".join(f"output '{c.name}' of the original is inf/NaN at {c.nonfinite_mismatches} positions where "
                     "the rewritten model gives other values" for c in odd) + (
        ": non-finite values cannot be compared; give --inputs on which the model is finite, or use --no-verify")


def derive_tolerance(dtype: np.dtype, terms: int, atol: float | None, rtol: float | None) -> Tolerance:
    eps = float(np.finfo(dtype).eps) if np.issubdtype(dtype, np.floating) else 0.0
    derived = 8.0 * eps * math.sqrt(max(terms, 1))
    text = f"atol + rtol*max|ref|, rtol = 8*eps*sqrt(T) = {derived:.3g} (eps={eps:.3g} {np.dtype(dtype).name}, T={terms})"
    if rtol is not None or atol is not None:
        text += "; overridden by the user"
    return Tolerance(atol=0.0 if atol is None else float(atol), rtol=derived if rtol is None else float(rtol),
                     derivation=text)


#: initializers at least this big reach onnxruntime as OrtValues (add_external_initializers), not
#: serialized into the model bytes: no 2 GiB protobuf limit, no copy of every weight into bytes
EXTERNAL_MIN_BYTES = 1 << 16


def split_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str], list[np.ndarray]]:
    """``model`` without the data of its big initializers (declared external, at a location that is
    never read) + their names and values, for ``add_external_initializers``."""
    skeleton = shell(model)
    src, g = model.graph, skeleton.graph
    names, values = [], []
    read = used_names(src)
    inputs = {i.name for i in src.input}
    for t in src.initializer:
        size = tensor_bytes(t.data_type, list(t.dims))
        lazy = is_lazy(t)
        if t.name not in read:  # onnxruntime drops unread initializers: one it cannot find fails the session
            if t.name in inputs and lazy:  # IR < 4: also a graph input, which must keep its default value
                g.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims, raw_data=tensor_raw(t))
            elif t.name in inputs:
                g.initializer.append(t)
            continue
        if lazy and t.data_type in NUMPY_RAW and size:  # straight from its file, never read here
            names.append(t.name)
            values.append(tensor_memmap(t))
            external_ref(g, t, _NEVER_READ, 0, size)
            continue
        if lazy:
            g.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims, raw_data=tensor_raw(t))
            continue
        if (t.data_type not in NUMPY_RAW or size is None or size < EXTERNAL_MIN_BYTES
                or t.data_location == onnx.TensorProto.EXTERNAL):
            g.initializer.append(t)
            continue
        external_ref(g, t, _NEVER_READ, 0, size)
        names.append(t.name)
        values.append(np.ascontiguousarray(numpy_helper.to_array(t)))
    return skeleton, names, values


#: the location of initializers whose data reaches onnxruntime through add_external_initializers
_NEVER_READ = "uprewrite-never-read.bin"


def session(model: onnx.ModelProto | bytes, provider: str = "CPUExecutionProvider",
            threads: int | None = None, optimize: bool = False) -> ort.InferenceSession:
    """An onnxruntime session of ``model`` (weights held in memory or referenced in external data
    files by absolute path, model_io.is_lazy, both work); an allocation failure is a ResourceLimit.
    ``threads``: intra/inter-op threads (timing runs use 1); ``optimize``: every graph optimization,
    as deployments run (timing), else the basic level (verification)."""
    with onnxruntime_allocations():
        return _session(model, provider, threads, optimize)


#: graphs with more nodes than this are verified without graph optimizations: onnxruntime's
#: optimizers make session creation superlinear in nodes (20,000 nodes: 2.5 s basic, 1.4 s none),
#: and both runs of a comparison use the same level, so it does not change what is compared
UNOPTIMIZED_FROM_NODES = 2000


def verification_level(model: onnx.ModelProto | bytes) -> ort.GraphOptimizationLevel:
    """The graph optimization level of verification sessions: basic (constant folding, so graph-computed
    weights are computed once), none for big graphs (UNOPTIMIZED_FROM_NODES)."""
    big = isinstance(model, onnx.ModelProto) and len(model.graph.node) > UNOPTIMIZED_FROM_NODES
    return ort.GraphOptimizationLevel.ORT_DISABLE_ALL if big else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def _session(model: onnx.ModelProto | bytes, provider: str = "CPUExecutionProvider", threads: int | None = None,
             optimize: bool = False) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = verification_level(model)
    if threads is not None:
        opts.intra_op_num_threads = opts.inter_op_num_threads = threads
    opts.log_severity_level = 4
    # verification runs once: without the arena (it grows in doublings, far above what a run needs);
    # timing runs (optimize) keep it, as deployments run
    opts.enable_cpu_mem_arena = optimize
    if isinstance(model, bytes):
        return ort.InferenceSession(model, opts, providers=[provider])
    skeleton, names, values = split_weights(model)
    keep = [ort.OrtValue.ortvalue_from_numpy(v) for v in values]
    if names:
        opts.add_external_initializers(names, keep)
    sess = ort.InferenceSession(skeleton.SerializeToString(), opts, providers=[provider])
    sess._uprewrite_weights = (values, keep)  # onnxruntime reads them for the session's lifetime
    return sess


def feed_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs a caller must feed (IR < 4 lists initializers as inputs too)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def parse_shape_option(items) -> dict[str, tuple[int, ...]]:
    """``--shape`` values in the spellings users know -> ``{"x": (1, 3, 64, 64)}``:
    ``x=1x3x64x64`` (this tool), ``x:1,3,64,64`` (onnxsim, onnxslim, trtexec) and ``x:[1,3,64,64]``
    (polygraphy).  The name is everything before the last ``=`` (or, without one, the last ``:``),
    so tf2onnx names such as ``input_1:0`` work: ``input_1:0:1,64,64,3``."""
    shapes = {}
    for item in items or ():
        name, shape = _parse_one_shape(str(item))
        shapes[name] = shape
    return shapes


def _parse_one_shape(item: str) -> tuple[str, tuple[int, ...]]:
    sep = "=" if "=" in item else ":"
    name, found, dims = item.rpartition(sep)
    shape = parse_dims(dims) if found and name else None
    if shape is None:
        raise UsageError(f"--shape {item!r}: expected NAME=DIMS (or NAME:D1,D2,...) with positive sizes, like "
                         "input=1x3x64x64 or input:1,3,64,64")
    return name, shape


def parse_dims(text: str) -> tuple[int, ...] | None:
    """``1x3x64x64``, ``1,3,64,64`` or ``[1,3,64,64]`` -> ``(1, 3, 64, 64)``; None if it is not that."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    parts = re.split(r"\s*[x,]\s*", text.lower()) if text else []
    if not parts or not all(re.fullmatch(r"[0-9]+", p) for p in parts):
        return None
    shape = tuple(int(p) for p in parts)
    return shape if all(d >= 1 for d in shape) else None


def normalize_shapes(shapes) -> dict[str, tuple[int, ...]] | None:
    """The API's ``shapes``: a mapping of input name to a tuple of sizes or a ``--shape`` DIMS string
    (``"1x3x64x64"``, ``"1,3,64,64"``, ``"[1,3,64,64]"``), or a list of ``--shape`` strings."""
    if shapes is None:
        return None
    if isinstance(shapes, (list, tuple)):
        return parse_shape_option(shapes)
    out = {}
    for name, value in dict(shapes).items():
        shape = parse_dims(value) if isinstance(value, str) else _int_dims(value)
        if shape is None:
            raise UsageError(f"shape of input '{name}': {value!r} is not a list of positive sizes "
                             "(like (1, 3, 64, 64) or '1x3x64x64')")
        out[str(name)] = shape
    return out


def _int_dims(value) -> tuple[int, ...] | None:
    try:
        dims = tuple(value)
    except TypeError:
        return None
    if not dims or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in dims):
        return None
    return tuple(int(d) for d in dims)


def make_inputs(
    model: onnx.ModelProto,
    shapes: dict[str, tuple[int, ...]] | None = None,
    given: dict[str, np.ndarray] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Seeded random inputs (normal for floats, zeros otherwise), or the given arrays, checked."""
    resolved = input_shapes(model, shapes, given)
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in feed_inputs(model):
        if given and vi.name in given:
            feeds[vi.name] = np.asarray(given[vi.name])
            continue
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(resolved[vi.name]).astype(dtype)
        else:
            feeds[vi.name] = np.zeros(resolved[vi.name], dtype=dtype)
    return feeds


#: sizes tried, in this order, for the symbolic non-batch dims of inputs that neither ``--shape``
#: nor ``--inputs`` covers: small enough to run fast, large enough for real decoders (a U-Net with
#: five stride-2 stages needs multiples of 32; raw-audio codecs with hops of hundreds of samples the
#: last ones); the first at which the original runs (and every site input spans its kernel) is used
CHOSEN_SIZES = (64, 32, 128, 16, 256, 512, 1024, 4096)


@dataclass(frozen=True)
class ShapeChoice:
    """Input shapes the tool chose for symbolic dims (no ``--shape`` / ``--inputs`` covered them)."""

    shapes: dict  # every input whose shape was chosen -> its concrete shape
    symbols: tuple[str, ...]  # the symbolic dims chosen, by name ("batch", "height", "x[2]" when unnamed)
    tried: tuple[str, ...]  # sizes tried before this one, each with why it did not serve

    def describe(self) -> str:
        return ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in self.shapes.items())

    @property
    def reason(self) -> str:
        why = (f"symbolic dims {', '.join(self.symbols)} not covered by --shape or --inputs: batch-like leading "
               "dims 1, the others the first size of " + ", ".join(map(str, CHOSEN_SIZES)) +
               " at which onnxruntime runs the original model")
        return why + (f" (not: {'; '.join(self.tried)})" if self.tried else "")


def shape_candidates(
    model: onnx.ModelProto, shapes: dict | None = None, given: dict | None = None
) -> tuple[list[dict[str, tuple[int, ...]]], tuple[str, ...]]:
    """``(candidate --shape dicts, symbols)`` for inputs with symbolic dims that neither ``shapes``
    nor ``given`` covers: one candidate per CHOSEN_SIZES entry, every non-batch symbol at that size
    (one value per symbol name, shared across inputs), batch-like leading dims 1.  With nothing to
    choose: ``([shapes], ())``, and input_shapes reports any other problem as today."""
    shapes, given = dict(shapes or {}), dict(given or {})
    roles: dict[str, str] = {}
    layouts: dict[str, list] = {}
    for vi in feed_inputs(model):
        if vi.name in shapes or vi.name in given:
            continue
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not t.HasField("shape"):
            return [shapes], ()
        dims = []
        for i, d in enumerate(t.shape.dim):
            if d.HasField("dim_value"):
                if d.dim_value <= 0:
                    return [shapes], ()  # declared non-positive: input_shapes names it
                dims.append(d.dim_value)
                continue
            key = d.dim_param or f"{vi.name}[{i}]"
            roles.setdefault(key, "batch" if i == 0 and len(t.shape.dim) >= 2 else "size")
            dims.append(key)
        layouts[vi.name] = dims
    if not roles:
        return [shapes], ()
    candidates = []
    for size in CHOSEN_SIZES:
        values = {k: 1 if role == "batch" else size for k, role in roles.items()}
        chosen = {name: tuple(values[d] if isinstance(d, str) else d for d in dims) for name, dims in layouts.items()}
        candidates.append({**shapes, **chosen})
    return candidates, tuple(roles)


def symbolic_dims_text(model: onnx.ModelProto, shapes: dict | None = None, given: dict | None = None) -> str:
    """``input 'x' dims 0 ('N'), 2 ('height')``: the symbolic dims no ``shapes`` / ``given`` covers."""
    parts = []
    for vi in feed_inputs(model):
        if vi.name in (shapes or {}) or vi.name in (given or {}):
            continue
        dims = [f"{i} ('{d.dim_param}')" if d.dim_param else str(i)
                for i, d in enumerate(vi.type.tensor_type.shape.dim) if not d.HasField("dim_value")]
        if dims:
            parts.append(f"input '{vi.name}' dim{'s' if len(dims) > 1 else ''} {', '.join(dims)}")
    return "; ".join(parts)


def check_shape_names(model: onnx.ModelProto, shapes: dict | None) -> None:
    """UsageError for a ``--shape`` naming no graph input."""
    names = {i.name for i in feed_inputs(model)}
    for extra in sorted(set(shapes or ()) - names):
        raise UsageError(f"no graph input named '{extra}' (inputs: {', '.join(sorted(names))})")


def input_shapes(
    model: onnx.ModelProto,
    shapes: dict[str, tuple[int, ...]] | None = None,
    given: dict[str, np.ndarray] | None = None,
) -> dict[str, tuple[int, ...]]:
    """The concrete shape of every graph input: given arrays, then ``--shape``, then the declared
    shape; UsageError names the input when a shape is missing, symbolic or disagrees."""
    shapes = dict(shapes or {})
    given = dict(given or {})
    inputs = feed_inputs(model)
    names = {i.name for i in inputs}
    for extra in sorted((set(shapes) | set(given)) - names):
        raise UsageError(f"no graph input named '{extra}' (inputs: {', '.join(sorted(names))})")
    resolved = {}
    for vi in inputs:
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise VerificationImpossible(f"graph input '{vi.name}' is not a tensor; cannot build inputs for it")
        try:
            dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        except (KeyError, TypeError, ValueError):
            raise VerificationImpossible(f"graph input '{vi.name}' has element type {t.elem_type}, "
                                         "which numpy cannot hold; cannot build inputs for it") from None
        declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        if vi.name in given:
            arr = np.asarray(given[vi.name])
            if arr.dtype != dtype:
                raise UsageError(f"input '{vi.name}' has dtype {arr.dtype}, the model expects {np.dtype(dtype).name}")
            _check_shape(vi.name, arr.shape, declared)
            if arr.size == 0:
                raise UsageError(f"input '{vi.name}' is empty (shape {list(arr.shape)}): nothing to verify on")
            resolved[vi.name] = tuple(arr.shape)
            continue
        if vi.name in shapes:
            shape = shapes[vi.name]
            _check_shape(vi.name, shape, declared)
        else:
            if not t.HasField("shape"):
                raise UsageError(f"input '{vi.name}' has no declared shape; pass --shape {vi.name}=DIMS")
            for i, d in enumerate(declared):
                if isinstance(d, int) and t.shape.dim[i].HasField("dim_value") and d <= 0:
                    raise UsageError(f"input '{vi.name}' dimension {i} is declared as {d}, not a positive size; "
                                     f"pass --shape {vi.name}=DIMS with positive sizes")
                if not isinstance(d, int) or d <= 0:
                    label = f" ('{d}')" if isinstance(d, str) else ""
                    raise UsageError(
                        f"input '{vi.name}' dimension {i}{label} is symbolic; pass --shape {vi.name}="
                        + "x".join(str(x) if isinstance(x, int) and x > 0 else f"<{x or '?'}>" for x in declared)
                        + " with concrete sizes"
                    )
            shape = tuple(declared)
        resolved[vi.name] = tuple(int(d) for d in shape)
    return resolved


def _check_shape(name: str, shape, declared) -> None:
    if declared and len(shape) != len(declared):
        raise UsageError(f"input '{name}' has rank {len(shape)}, the model declares rank {len(declared)}")
    for i, (got, want) in enumerate(zip(shape, declared)):
        if isinstance(want, int) and want > 0 and got != want:
            raise UsageError(f"input '{name}' dimension {i} is {got}, the model declares {want}")


def run_with_taps(model: onnx.ModelProto, feeds: dict[str, np.ndarray], taps) -> dict[str, np.ndarray]:
    """Run the original model, also returning the intermediate tensors named in ``taps``."""
    declared = {o.name for o in model.graph.output}
    extra = [helper.make_empty_tensor_value_info(t) for t in taps if t not in declared]
    model.graph.output.extend(extra)
    try:
        return run_original(model, feeds)
    finally:
        for _ in extra:
            model.graph.output.pop()


def run_original(model: onnx.ModelProto | bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    try:
        sess = session(model)
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, run_session(sess, names, feeds)))
    except UprewriteError:
        raise
    except Exception as exc:
        raise VerificationImpossible(
            f"onnxruntime cannot run the original model: {_first_line(exc)} "
            "(use --no-verify to rewrite without verification)"
        ) from None


def run_rewritten(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, run_session(sess, names, feeds)))


def compare(reference: dict[str, np.ndarray], result: dict[str, np.ndarray], tol: Tolerance,
            steps: dict[str, float] | None = None) -> list[OutputCheck]:
    """Per-output checks; ``steps`` adds one quantization step to the tolerance of quantized outputs."""
    steps = steps or {}
    checks = []
    for name, ref in reference.items():
        got = result.get(name)
        if got is None or got.shape != ref.shape:
            checks.append(OutputCheck(name, tuple(ref.shape), math.inf, 0.0, 0.0,
                                      None if got is None else tuple(got.shape)))
            continue
        r = ref.astype(np.float64)
        g = got.astype(np.float64)
        finite_ref = np.isfinite(r)
        same = (np.isnan(r) & np.isnan(g)) | (np.isinf(r) & (r == g))
        with np.errstate(invalid="ignore"):
            diff = np.where(finite_ref, np.abs(r - g), 0.0)
        diff = np.where(np.isnan(diff), np.inf, diff)
        finite = np.abs(r[finite_ref])
        max_ref = float(finite.max()) if finite.size else 0.0
        max_err = float(diff.max()) if diff.size else 0.0
        checks.append(OutputCheck(name, tuple(ref.shape), max_err, max_ref,
                                  tol.atol + tol.rtol * max_ref + steps.get(name, 0.0),
                                  nonfinite_mismatches=int(np.count_nonzero(~finite_ref & ~same))))
    return checks


def _first_line(exc: Exception) -> str:
    """The first line of an onnxruntime error, without its source location and C++ signature."""
    text = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not text:
        return type(exc).__name__
    first = _strip_source_location(text[0])
    if first.endswith(("indices", ":")) and len(text) > 1:  # the detail is on the next line
        first += f" {text[1]}"
    return first


def _strip_source_location(line: str) -> str:
    """``... FAIL : /src/x.cc:46 void ns::f(const T&, U) message`` -> ``... FAIL : message``."""
    m = re.search(r"(?:/\S+|\w+\.(?:cc|h|cpp)):\d+ ", line)
    if not m:
        return line
    rest = line[m.end():]
    sig = re.match(r"[\w:<>,&*~\s]*?[\w>]\(", rest)  # a C++ signature: skip to its balanced ')'
    if sig:
        depth, i = 0, sig.end() - 1
        for i in range(sig.end() - 1, len(rest)):
            depth += {"(": 1, ")": -1}.get(rest[i], 0)
            if depth == 0:
                break
        rest = rest[i + 1:].lstrip()
    return (line[:m.start()] + rest).strip()
