"""onnx shape inference on a weightless copy of a model: static shapes and element types.

Layer: reads graphs only (imports isolate for the crash-safe inference server); nothing above it.
"""

from __future__ import annotations

import hashlib
import math

import onnx

from . import isolate
from .isolate import NativeCrash


def static_dims(vi: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim)


def infer_static_shapes(
    model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]] | None = None, declared_outputs: bool = True
) -> dict[str, tuple[int | None, ...]]:
    """Static tensor shapes from onnx shape inference, run on a weightless copy of the graph.

    Weights are replaced by shape-only graph inputs, so inference never serializes them
    (DESIGN.md §3: inference on a loaded model copies every weight).  Inference problems are
    not fatal: a missing shape only means a site must use its symbolic form.  ``overrides``
    (from --shape) replace the declared shapes of graph inputs.
    """
    return {name: dims for name, (_, dims) in infer_static_typed(model, overrides, declared_outputs).items()}


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference (not strict) in a server process (isolate.infer_shapes): onnx's C++ aborts
    the process on some malformed models (e.g. a Slice of a tensor with a negative inferred length)."""
    typed = onnx.ModelProto()
    typed.ParseFromString(isolate.infer_shapes(model.SerializeToString()))
    return typed


def infer_static_typed(
    model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]] | None = None, declared_outputs: bool = True
) -> dict[str, tuple[int, tuple[int | None, ...]]]:
    """``infer_static_shapes`` with each tensor's element type: ``name -> (elem_type, dims)``.
    ``declared_outputs=False`` drops the shapes the graph outputs declare (non-strict inference
    keeps a declared shape that is wrong, which onnxruntime only warns about)."""
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    g = skeleton.graph
    src = model.graph
    g.node.extend(src.node)
    for vi in src.input:
        if overrides and vi.name in overrides:
            vi = onnx.helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, list(overrides[vi.name]))
        g.input.append(vi)
    if declared_outputs:
        g.output.extend(src.output)
    else:
        for vi in src.output:
            elem = vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0
            g.output.append(onnx.helper.make_tensor_value_info(vi.name, elem, None) if elem else onnx.ValueInfoProto(name=vi.name))
    input_names = {i.name for i in src.input}
    for t in src.initializer:
        if t.name in input_names:
            continue
        if t.data_type == onnx.TensorProto.INT64 and len(t.dims) <= 1 and math.prod(t.dims) <= 16 and not (
            t.data_location == onnx.TensorProto.EXTERNAL
        ):  # small shape-like constants (Reshape shapes, scales' kin) stay: inference needs their values
            g.initializer.append(t)
        else:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for t in src.sparse_initializer:  # typed like the dense ones (their values are not needed)
        g.input.append(onnx.helper.make_tensor_value_info(t.values.name, t.values.data_type, list(t.dims)))
    data = skeleton.SerializeToString()
    key = hashlib.sha1(data).digest()
    if key in _CACHE:  # one run infers the same weightless graph several times (sites, memory estimates)
        return dict(_CACHE[key])
    try:
        inferred = onnx.ModelProto()
        inferred.ParseFromString(isolate.infer_shapes(data))
    except NativeCrash:
        raise
    except Exception:  # inference is advisory; ORT verification is the judge
        return {}
    shapes = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = static_dims(vi)
        if dims is not None:
            shapes[vi.name] = (vi.type.tensor_type.elem_type, dims)
    _CACHE[key] = shapes
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    return dict(shapes)


#: inferred shapes by the digest of the weightless graph they were inferred from (content, not identity)
_CACHE: dict[bytes, dict] = {}
_CACHE_SIZE = 4
