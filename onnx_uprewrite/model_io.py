"""Loading (validated, external data confined to the model's folder) and atomic saving."""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import re
import secrets
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet
from onnx import external_data_helper, helper, numpy_helper

from .errors import InputChanged, InvalidModelError, UsageError, WriteError
from .isolate import announce_temp
from .wire import GRAPH_FIELD, INITIALIZER_FIELD, RAW_DATA_FIELD, Span, length_field, strip_weights, unknown_field_bytes

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; saves are still atomic, not serialized
    fcntl = None

MIN_OPSET = 1
#: every external data file ``load_model`` accepted in this process: ``save_model`` never removes one
#: (an earlier output's data file may be the data of the model being converted: ``cp out.onnx in.onnx``)
INPUT_FILES: set[Path] = set()
# onnx refuses to serialize a ModelProto above 2 GiB; stay clearly below it
INLINE_LIMIT = 1_800_000_000


def load_model(path: str | os.PathLike, lazy: bool = False) -> tuple[onnx.ModelProto, list[Path]]:
    """Read and validate a model file; external data is read only from inside its folder.

    Returns the model with all weights loaded and the external data files it read.  With ``lazy``,
    main-graph initializers in external data stay there: their locations become the absolute,
    validated paths of their files (``is_lazy``), read only when a value is needed
    (``tensor_array``, ``tensor_memmap``) and copied file to file when saved (``write_external``,
    ``write_inline``).  So do the big initializers of a model file with its weights inside
    (``_parse_stripped``): the file itself is their data file (``is_embedded``), and the weights
    are never held twice, as bytes and as a parsed model.
    """
    path = Path(path)
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file")
    if path.is_dir():
        raise InvalidModelError(f"{path}: is a directory, not an ONNX model file")
    stripped = _parse_stripped(path) if lazy else None
    model = stripped[0] if stripped else _parse_file(path)
    validate_model(model, str(path))
    external: list[Path] = []
    if has_external_data(model):
        base = path.resolve().parent
        external = check_external_data(model, base, str(path))
        INPUT_FILES.update(external)
        try:
            if lazy:
                lazy_names = set()
                for t in model.graph.initializer:
                    if external_data_helper.uses_external_data(t) and t.data_type in NUMPY_RAW:
                        for e in t.external_data:
                            if e.key == "location":
                                e.value = str((base / e.value).resolve())
                        lazy_names.add(t.name)
                _record_sources([t for t in model.graph.initializer if t.name in lazy_names])
                for tensor in external_data_helper._get_all_tensors(model):
                    if external_data_helper.uses_external_data(tensor) and not (
                            tensor.name in lazy_names and is_lazy(tensor)):
                        external_data_helper.load_external_data_for_tensor(tensor, str(base))
            else:
                external_data_helper.load_external_data_for_model(model, str(base))
        except Exception as exc:  # onnx raises assorted errors for bad external data
            raise InvalidModelError(f"{path}: cannot read external data: {exc}") from None
    if stripped:
        _point_at_file(model, path, *stripped[1:])
    return model, external


def _parse_file(path: Path) -> onnx.ModelProto:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidModelError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not data:
        raise InvalidModelError(f"{path}: empty file")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidModelError(f"{path}: not an ONNX model (truncated or corrupt protobuf: {exc})") from None
    return model


#: a file at least this big, read lazily, is parsed without the raw_data of its initializers of
#: at least EMBEDDED_MIN_BYTES: these stay in the file, as lazy initializers (wire.strip_weights)
LAZY_FILE_MIN_BYTES, EMBEDDED_MIN_BYTES = 1 << 20, 1 << 16
#: marks a lazy initializer whose file is the model file itself: saved inline unless asked otherwise
_EMBEDDED_KEY = "uprewrite.embedded"
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _parse_stripped(path: Path) -> tuple[onnx.ModelProto, list[Span], tuple] | None:
    """The model in ``path`` parsed without its big initializers' bytes, where these lie in the
    file, and the file's identity then; None when the file is small or not plainly laid out (it is
    then parsed as a whole, which also gives the message for a corrupt one)."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if st.st_size < LAZY_FILE_MIN_BYTES:
                return None
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                found = strip_weights(buf, EMBEDDED_MIN_BYTES)
    except (OSError, ValueError):
        return None
    if found is None:
        return None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(found[0])
    except (DecodeError, RuntimeError, ValueError):
        return None
    if len(model.graph.initializer) != found[2]:  # the scan and protobuf disagree: trust protobuf
        return None
    return model, found[1], _identity(st)


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _point_at_file(model: onnx.ModelProto, path: Path, spans: list[Span], identity: tuple) -> None:
    """Make the stripped initializers lazy ones that live in the model file ``path`` itself; one whose
    bytes do not fit its type and shape gets them back (validation then speaks of it as usual).
    InputChanged if the file is not the one that was scanned."""
    location, lazy = str(path.resolve()), []
    with open(path, "rb") as fh:
        if _identity(os.fstat(fh.fileno())) != identity:
            raise InputChanged(f"{path}: {_CHANGED} (written to or replaced while it was read); nothing was written")
        for span in spans:
            t = model.graph.initializer[span.index]
            need = tensor_bytes(t.data_type, list(t.dims)) if t.data_type in NUMPY_RAW else None
            typed = any(len(getattr(t, f)) for f in _TYPED_FIELDS)  # raw_data and float_data both: malformed
            if need != span.length or typed or t.external_data or t.data_location == onnx.TensorProto.EXTERNAL:
                fh.seek(span.offset)
                t.raw_data = fh.read(span.length)
                continue
            embedded = "location set" if t.HasField("data_location") else "1"  # written back as it was
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(span.offset)), ("length", str(span.length)),
                               (_EMBEDDED_KEY, embedded)):
                t.external_data.add(key=key, value=value)
            lazy.append(t)
    _record_sources(lazy)


def is_embedded(t: onnx.TensorProto) -> bool:
    """A lazy initializer that lives in the model file it was loaded from (``_point_at_file``)."""
    return is_lazy(t) and any(e.key == _EMBEDDED_KEY for e in t.external_data)


def is_lazy(t: onnx.TensorProto) -> bool:
    """An initializer left in its external data file by ``load_model(lazy=True)``."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return False
    location = next((e.value for e in t.external_data if e.key == "location"), "")
    return os.path.isabs(location)


def _external_span(t: onnx.TensorProto) -> tuple[str, int, int]:
    info = {e.key: e.value for e in t.external_data}
    size = math.prod(t.dims) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return info["location"], int(info.get("offset", 0) or 0), int(info["length"]) if "length" in info else size


def tensor_memmap(t: onnx.TensorProto) -> np.ndarray:
    """A read-only memory map of a lazy initializer's values (nothing is read until used)."""
    location, offset, length = _external_span(t)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")
    shape = tuple(t.dims)
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(location, dtype=dtype, mode="r", offset=offset, shape=shape)


def tensor_raw(t: onnx.TensorProto) -> bytes:
    """A lazy initializer's bytes, read from its file; InputChanged if they are not the bytes that
    were there when the model was loaded (``_record_sources``)."""
    location, offset, length = _external_span(t)
    try:
        with open(location, "rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
    except FileNotFoundError:
        raise InputChanged(f"{location}: {_CHANGED} (the file was removed); nothing was written") from None
    except OSError as exc:
        raise InvalidModelError(f"{location}: cannot read: {exc.strerror or exc}") from None
    recorded = next((e.value for e in t.external_data if e.key == _CRC_KEY), None)
    if len(data) != length or (recorded is not None and f"{zlib.crc32(data):08x}" != recorded):
        raise InputChanged(f"{location}: {_CHANGED} (tensor '{t.name}' holds other bytes than when they were "
                           "read); nothing was written")
    return data


#: lazy initializers carry, beside their location, what their file and bytes were at load time
_CRC_KEY, _SOURCE_KEY = "uprewrite.crc32", "uprewrite.source"
_CHANGED = "the input's weights changed while it was being converted"
_CHUNK = 16 << 20


def _fingerprint(path: str) -> str:
    """What changes when a file is written to, truncated or replaced (ctime cannot be set back)."""
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _record_sources(lazy: list[onnx.TensorProto]) -> None:
    """Note on each lazy initializer its file's fingerprint and the CRC-32 of its bytes (one
    sequential pass per file, about 0.2 s per 500 MB), so that what is copied when saving, maybe
    minutes later, is checked against what this run read and verified (``tensor_raw``,
    ``check_sources``)."""
    by_file: dict[str, list[onnx.TensorProto]] = {}
    for t in lazy:
        by_file.setdefault(_external_span(t)[0], []).append(t)
    for location, tensors in by_file.items():
        stamp = _fingerprint(location)
        with open(location, "rb") as fh:
            for t in sorted(tensors, key=lambda t: _external_span(t)[1]):
                _, offset, length = _external_span(t)
                fh.seek(offset)
                crc, left = 0, length
                while left:
                    chunk = fh.read(min(left, _CHUNK))
                    if not chunk:
                        break
                    crc, left = zlib.crc32(chunk, crc), left - len(chunk)
                t.external_data.add(key=_CRC_KEY, value=f"{crc:08x}")
                t.external_data.add(key=_SOURCE_KEY, value=stamp)


def check_sources(model: onnx.ModelProto) -> None:
    """InputChanged if a file that lazy initializers of ``model`` live in was written to, truncated or
    replaced since it was loaded (its fingerprint differs)."""
    seen: set[tuple[str, str]] = set()
    for t in model.graph.initializer:
        if not is_lazy(t):
            continue
        info = {e.key: e.value for e in t.external_data}
        key = (info["location"], info.get(_SOURCE_KEY, ""))
        if not key[1] or key in seen:
            continue
        seen.add(key)
        try:
            same = _fingerprint(key[0]) == key[1]
        except OSError:
            same = False
        if not same:
            raise InputChanged(f"{key[0]}: {_CHANGED} (written to or replaced); nothing was written")


def tensor_array(t: onnx.TensorProto) -> np.ndarray:
    """The value of an initializer, lazy or not."""
    if not is_lazy(t):
        return numpy_helper.to_array(t)
    loaded = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, raw_data=tensor_raw(t))
    return numpy_helper.to_array(loaded)


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(external_data_helper.uses_external_data(t) for t in external_data_helper._get_all_tensors(model))


def check_external_data(model: onnx.ModelProto, base: Path, label: str) -> list[Path]:
    """Every external-data location must be a relative path to a file inside ``base``, long enough.

    Returns the distinct files referenced.
    """
    base = base.resolve()
    files: list[Path] = []
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        where = f"{label}: tensor '{tensor.name}' external data location {location!r}"
        if not location or os.path.isabs(location):
            raise InvalidModelError(f"{where} must be a relative path inside the model's folder")
        target = (base / location).resolve()
        if base != target and base not in target.parents:
            raise InvalidModelError(f"{where} points outside the model's folder")
        if not target.is_file():
            raise InvalidModelError(f"{where}: file not found")
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise InvalidModelError(f"{where}: offset/length are not integers") from None
        size = target.stat().st_size
        if offset < 0 or offset > size or (length is not None and (length < 0 or offset + length > size)):
            raise InvalidModelError(f"{where}: file has {size} bytes, fewer than offset+length requires")
        if tensor.data_type in NUMPY_RAW:
            need = math.prod(tensor.dims) * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
            if (length if length is not None else size - offset) < need or (length is not None and length != need):
                raise InvalidModelError(f"{where}: holds {length if length is not None else size - offset} bytes "
                                        f"for a tensor of {need} bytes (shape {list(tensor.dims)})")
        if target not in files:
            files.append(target)
    return files


def validate_model(model: onnx.ModelProto, label: str) -> None:
    """Structural checks onnxruntime would also need; not onnx.checker (DESIGN.md §3)."""
    if not model.HasField("graph") or model.ir_version <= 0:
        raise InvalidModelError(f"{label}: not an ONNX model (no graph or no IR version)")
    domains = ["" if o.domain == "ai.onnx" else o.domain for o in model.opset_import]
    twice = sorted({d for d in domains if domains.count(d) > 1})
    if twice:
        raise InvalidModelError(f"{label}: opset of domain '{twice[0] or 'ai.onnx'}' is imported more than once")
    opset = default_opset(model)
    if opset is None:
        raise InvalidModelError(f"{label}: model imports no default-domain (ai.onnx) opset")
    if opset < MIN_OPSET:
        raise InvalidModelError(f"{label}: opset {opset} is older than the supported minimum {MIN_OPSET}")
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise InvalidModelError(f"{label}: opset {opset} is newer than the installed onnx {onnx.__version__} "
                                f"knows (at most {newest})")
    if model.ir_version > onnx.IR_VERSION:
        raise InvalidModelError(f"{label}: IR version {model.ir_version} is newer than the installed onnx "
                                f"{onnx.__version__} knows (at most {onnx.IR_VERSION})")
    graph = model.graph
    sparse = [t.values.name for t in graph.sparse_initializer]
    for t in graph.sparse_initializer:
        _check_sparse(t, label)
    for kind, names in (("graph input", [i.name for i in graph.input]),
                        ("initializer", [t.name for t in graph.initializer] + sparse)):
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise InvalidModelError(f"{label}: {kind} '{name}' is declared twice")
            seen.add(name)
    if not graph.output:
        raise InvalidModelError(f"{label}: graph has no outputs")
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | set(sparse)
    produced: dict[str, str] = {}
    for node in graph.node:
        for out in node.output:
            if not out:
                continue
            if out in produced or out in available:
                raise InvalidModelError(f"{label}: tensor '{out}' is produced twice (node '{node.name}')")
            produced[out] = node.name
    known = available | set(produced)
    for node in graph.node:
        for name in node.input:
            if name and name not in known:
                raise InvalidModelError(
                    f"{label}: node '{node.name}' ({node.op_type}) reads tensor '{name}' that nothing produces"
                )
    for out in graph.output:
        if out.name not in known:
            raise InvalidModelError(f"{label}: graph output '{out.name}' is produced by no node")
    _check_acyclic(graph, available, label)
    _check_crashing_attributes(graph, label)


def _check_sparse(t: onnx.SparseTensorProto, label: str) -> None:
    """A sparse initializer's layout, as onnx.checker states it: values [NNZ], int64 indices [NNZ]
    (linear) or [NNZ, rank], every index inside ``dims``; its data in the model file."""
    where = f"{label}: sparse initializer '{t.values.name}'"
    if any(p.data_location == onnx.TensorProto.EXTERNAL for p in (t.values, t.indices)):
        # onnx's loader and savers never move these: the file would be lost on save
        raise InvalidModelError(f"{where} keeps its data in an external file, which is not supported")
    nnz = t.values.dims[0] if len(t.values.dims) == 1 else None
    rank, dims = len(t.dims), tuple(t.dims)
    if nnz is None or t.indices.data_type != onnx.TensorProto.INT64 or tuple(t.indices.dims) not in (
            (nnz,), (nnz, rank)) or any(d < 0 for d in dims):
        raise InvalidModelError(f"{where}: values {list(t.values.dims)}, indices {list(t.indices.dims)} "
                                f"do not describe a tensor of shape {list(dims)} (values [NNZ], int64 indices "
                                "[NNZ] or [NNZ, rank])")
    try:
        indices = numpy_helper.to_array(t.indices)
        numpy_helper.to_array(t.values)
    except (ValueError, TypeError) as exc:  # data that does not fill the declared dims
        raise InvalidModelError(f"{where}: unreadable data: {exc}") from None
    bounds = np.array(dims, np.int64) if indices.ndim == 2 else math.prod(dims)
    if indices.size and ((indices < 0).any() or (indices >= bounds).any()):
        raise InvalidModelError(f"{where}: an index lies outside its shape {list(dims)}")


#: INT attributes whose values onnxruntime does not check before it divides by them or multiplies
#: them, dying of SIGFPE (found by tests/test_fuzz.py): (ops, attribute, smallest, largest)
_CRASHING_INTS = (
    (("Conv", "ConvTranspose", "ConvInteger", "QLinearConv"), "group", 1, None),
    (("DepthToSpace", "SpaceToDepth"), "blocksize", 1, (1 << 31) - 1),
)


def _check_crashing_attributes(graph: onnx.GraphProto, label: str) -> None:
    """Attribute values that crash onnxruntime's process (SIGFPE) instead of raising an error, in
    ``graph`` and every subgraph of its nodes."""
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                _check_crashing_attributes(sub, label)
        if node.domain not in ("", "ai.onnx"):
            continue
        for ops, name, low, high in _CRASHING_INTS:
            if node.op_type not in ops:
                continue
            for attr in node.attribute:
                if attr.name == name and attr.type == onnx.AttributeProto.INT and not (
                    attr.i >= low and (high is None or attr.i <= high)
                ):
                    limit = f"at least {low}" if high is None else f"between {low} and {high}"
                    raise InvalidModelError(f"{label}: node '{node.name}' ({node.op_type}) has attribute "
                                            f"{name}={attr.i}; it must be {limit}")


def check_resize_ranks(model: onnx.ModelProto, typed: dict) -> None:
    """onnxruntime aborts (std::terminate) on a Resize/Upsample whose constant ``scales`` or ``sizes``
    count differs from its input's rank; ``typed`` (name -> (elem_type, dims)) gives the ranks
    known before a run, --shape included."""
    constants = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                constants[node.output[0]] = attr.t
    for node in model.graph.node:
        if node.op_type not in ("Resize", "Upsample") or node.domain not in ("", "ai.onnx") or not node.input:
            continue
        if any(a.name == "axes" for a in node.attribute) or node.input[0] not in typed:
            continue
        rank = len(typed[node.input[0]][1])
        # Upsample and Resize-10: (X, scales); Resize-11+: (X, roi, scales, sizes), roi has 2*rank values
        counted = node.input[1:2] if node.op_type == "Upsample" or len(node.input) == 2 else node.input[2:4]
        for name in counted:
            t = constants.get(name)
            if t is None or len(t.dims) != 1 or t.dims[0] in (0, rank):
                continue
            if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64):
                continue  # roi, or a mistyped input onnxruntime rejects itself
            raise InvalidModelError(f"node '{node.name}' ({node.op_type}): input '{name}' has {t.dims[0]} "
                                    f"values for an input of rank {rank}; they must match")


def _check_acyclic(graph: onnx.GraphProto, available: set[str], label: str) -> None:
    """Kahn's algorithm over tensor dependencies: linear in nodes + edges."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    waiting = [0] * len(graph.node)
    readers: dict[int, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in {x for x in node.input if x and x not in available and x in producer}:
            waiting[i] += 1
            readers.setdefault(producer[name], []).append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for j in readers.get(i, ()):
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.append(j)
    if done < len(graph.node):
        stuck = graph.node[next(i for i, w in enumerate(waiting) if w)]
        raise InvalidModelError(f"{label}: graph has a cycle through node '{stuck.name}' ({stuck.op_type})")


def _likely_over_inline_limit(model: onnx.ModelProto) -> bool:
    """Whether the model may not serialize inline (protobuf's 2 GiB): its weights' bytes from their
    shapes (cheap), and ByteSize only near the limit."""
    weights = weight_bytes(model)
    if weights > INLINE_LIMIT:
        return True
    return weights > INLINE_LIMIT // 2 and model.ByteSize() > INLINE_LIMIT


def default_opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


#: numpy's bytes of these types are their ONNX raw_data (not so for 4-bit or 8-bit float types)
NUMPY_RAW = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
              onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
              onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}
EXTERNAL_THRESHOLD = 1024  # bytes: smaller initializers stay in the model file
ALIGN_THRESHOLD, ALIGNMENT = 1 << 20, 4096  # big tensors start at page offsets (onnxruntime can mmap them)


def shell(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its main-graph initializers (cheap: no weight is copied); every
    other field, known to this onnx or not, is kept."""
    out = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            _copy_field(out, fd, value)
    for fd, value in model.graph.ListFields():
        if fd.name != "initializer":
            _copy_field(out.graph, fd, value)
    out.graph.SetInParent()
    out.MergeFromString(unknown_field_bytes(UnknownFieldSet(model)))  # fields of a newer onnx.proto
    out.graph.MergeFromString(unknown_field_bytes(UnknownFieldSet(model.graph)))
    return out


def _copy_field(dst, fd, value) -> None:
    if hasattr(value, "ListFields"):  # a singular message
        getattr(dst, fd.name).CopyFrom(value)
    elif hasattr(value, "extend"):  # a repeated field
        getattr(dst, fd.name).extend(value)
    else:
        setattr(dst, fd.name, value)


def external_ref(graph: onnx.GraphProto, t: onnx.TensorProto, location: str, offset: int,
                 length: int) -> onnx.TensorProto:
    """Append to ``graph`` an initializer like ``t`` whose data is ``length`` bytes at ``offset`` of ``location``."""
    ref = graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims,
                                data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        ref.external_data.add(key=key, value=value)
    return ref


def write_external(model: onnx.ModelProto, model_path: Path, data_path: Path, location: str) -> bool:
    """Save ``model`` with its initializers of EXTERNAL_THRESHOLD bytes or more in ``data_path``
    (referenced as ``location``), one tensor at a time: the model is neither copied nor changed,
    unlike onnx.save_model(save_as_external_data=True), which needs a copy of every weight.  Lazy
    initializers are copied from their file and checked against what was read when the model was
    loaded (InputChanged).  Both files are fsynced; returns whether the data file was needed (it
    is removed if not)."""
    out = shell(model)
    offset = 0
    with open(data_path, "wb") as fh:
        for t in model.graph.initializer:
            raw = None
            if is_lazy(t):
                raw = tensor_raw(t)
            elif t.data_location != onnx.TensorProto.EXTERNAL:
                if t.HasField("raw_data"):
                    raw = t.raw_data
                elif t.data_type in NUMPY_RAW:
                    raw = numpy_helper.to_array(t).tobytes()
            if raw is None or len(raw) < EXTERNAL_THRESHOLD:
                if is_lazy(t):  # small: inline, never a reference to the input's file
                    out.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims,
                                              doc_string=t.doc_string, raw_data=raw)
                else:
                    out.graph.initializer.append(t)
                continue
            if len(raw) >= ALIGN_THRESHOLD and offset % ALIGNMENT:
                pad = ALIGNMENT - offset % ALIGNMENT
                fh.write(b"\0" * pad)
                offset += pad
            fh.write(raw)
            ref = external_ref(out.graph, t, location, offset, len(raw))
            ref.doc_string = t.doc_string
            ref.metadata_props.extend(t.metadata_props)
            offset += len(raw)
            del raw
        check_sources(model)  # the bytes copied are those read at load: the file was not touched since
        if offset:
            fh.flush()
            os.fsync(fh.fileno())
    if offset == 0:
        data_path.unlink()
    _write_synced(model_path, out.SerializeToString())
    return offset > 0


def write_inline(model: onnx.ModelProto, path: Path) -> None:
    """Save ``model`` as one file, fsynced.  Lazy initializers are copied from their file one at a
    time into the bytes protobuf would write for them (their data as raw_data): the model is neither
    copied nor changed, and the bytes copied are checked against those read at load (InputChanged)."""
    if not any(is_lazy(t) for t in model.graph.initializer):
        _write_synced(path, model.SerializeToString())
        return
    out = shell(model)
    graph = out.graph.SerializeToString()
    out.ClearField("graph")
    parts = [_inline_parts(t) for t in model.graph.initializer]
    size = len(graph) + sum(len(prefix) + body for prefix, _, body, _ in parts)
    with open(path, "wb") as fh:
        fh.write(out.SerializeToString())
        fh.write(length_field(GRAPH_FIELD, size))
        fh.write(graph)
        for prefix, head, _, lazy in parts:
            fh.write(prefix + head)
            if lazy is not None:
                raw = tensor_raw(lazy)
                fh.write(length_field(RAW_DATA_FIELD, len(raw)))
                fh.write(raw)
                del raw
        check_sources(model)
        fh.flush()
        os.fsync(fh.fileno())


def _inline_parts(t: onnx.TensorProto) -> tuple[bytes, bytes, int, onnx.TensorProto | None]:
    """(the initializer field's tag and length, the tensor's bytes but a lazy one's data, the
    tensor's length in all, the lazy tensor whose data follows or None)."""
    if not is_lazy(t):
        head = t.SerializeToString()
        return length_field(INITIALIZER_FIELD, len(head)), head, len(head), None
    plain = onnx.TensorProto()
    plain.CopyFrom(t)
    plain.ClearField("external_data")
    plain.ClearField("data_location")
    if any(e.key == _EMBEDDED_KEY and e.value == "location set" for e in t.external_data):
        plain.data_location = onnx.TensorProto.DEFAULT
    head, length = plain.SerializeToString(), _external_span(t)[2]
    body = len(head) + len(length_field(RAW_DATA_FIELD, length)) + length
    return length_field(INITIALIZER_FIELD, body), head, body, t


# ----------------------------------------------------------------------------- saving
#
# A model with external data is a pair of files, and two files cannot be replaced together.  So the
# data file gets a name new to each write, ``<name>.<8 hex>.data``, and is written and fsynced first;
# the model that refers to it replaces ``<name>`` last, in one rename: a reader of ``<name>`` sees the
# old pair or the new pair whatever happens when, SIGKILL and power loss included.  The old pair's
# data file is removed after.  Saves into one folder take turns on a lock file there, which also
# holds a note of the files in flight: the next save cleans up after one that was killed (its
# unique data file, or the previous one it had not removed yet, and its temp folder).

TEMP_PREFIX = ".uprewrite-"
LOCK_NAME = ".uprewrite.lock"
_TOKEN_HEX = 8


def data_file_pattern(name: str) -> re.Pattern:
    """Names of the external data files ``save_model`` writes for an output called ``name``."""
    return re.compile(re.escape(name) + r"\.[0-9a-f]{%d}\.data" % _TOKEN_HEX)


def output_files(path: Path, external: bool) -> list[Path]:
    """The files ``save_model`` replaces: the model only, since a data file gets a name that is new
    to each write (``data_file_pattern``) and so never overwrites anything."""
    return [path]


def check_data_file(path: Path) -> None:
    """Refuse early (before any verification) an output with external data whose folder cannot take
    it: a read-only file system, a folder without write permission, a name too long for its data
    file."""
    parent = path.parent
    if not parent.is_dir():
        return  # save_model says so
    try:
        if os.statvfs(parent).f_flag & os.ST_RDONLY:
            raise WriteError(f"cannot write {path}: read-only file system")
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WriteError(f"cannot write {path}: permission denied (folder {parent} is not writable)")
    data = f"{path.name}.{'x' * _TOKEN_HEX}.data"
    if limit is not None and len(os.fsencode(data)) > limit:
        raise WriteError(f"cannot write {path}: file name too long for its external data file ({data})")


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external: bool = False,
               keep=()) -> list[Path]:
    """Publish ``model`` at ``path`` atomically; returns the files written.

    With ``external`` (or a lazy model, or one too big to serialize inline) the weights go to a
    data file beside the model, named for this write (``data_file_pattern``); the data file of the
    model that ``path`` held before is removed, unless it is in ``keep`` or ``INPUT_FILES`` (an
    input's data) or a lazy initializer reads it.  A failure to write is a WriteError naming ``path``
    and the cause; nothing is left behind then and the earlier output is intact.
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{path}: output folder {parent} does not exist")
    if path.is_dir():
        raise UsageError(f"{path}: output is a directory; give a file name")
    if path.name == LOCK_NAME or path.name.startswith(TEMP_PREFIX):
        raise UsageError(f"{path}: names {LOCK_NAME} and {TEMP_PREFIX}* are uprewrite's own temporary files; "
                         "choose another output name")
    external = (external or any(is_lazy(t) and not is_embedded(t) for t in model.graph.initializer)
                or _likely_over_inline_limit(model))
    keep = {_resolved(Path(p)) for p in keep} | INPUT_FILES | {_resolved(Path(_external_span(t)[0]))
                                                               for t in model.graph.initializer if is_lazy(t)}
    try:
        with _FolderLock(parent) as lock:
            if lock.previous:
                _recover(parent, lock.previous, keep)
                lock.note(None)
            if lock.held:  # every save in this folder takes the lock first: no other one is running
                _remove_stale_temps(parent)
            return _publish(model, path, external, lock, keep)
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {_cause(exc, path)}") from None


def _publish(model: onnx.ModelProto, path: Path, external: bool, lock: _FolderLock, keep: set[Path]) -> list[Path]:
    parent = path.parent
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent))
    announce_temp(tmp)
    old = [p for p in _our_data_files(path) if _resolved(p) not in keep]
    new: Path | None = None  # set before each rename: a signal right after one must not go unnoticed
    model_inode = None
    try:
        model_tmp, data_tmp = tmp / "model.onnx", tmp / "weights.data"
        if external:
            name = _new_data_name(path)
            if write_external(model, model_tmp, data_tmp, name):
                new = parent / name
        else:
            write_inline(model, model_tmp)
        lock.note({"output": path.name, "new": new.name if new else None, "old": [p.name for p in old]})
        if new is not None:
            os.replace(data_tmp, new)
            _fsync_dir(parent)  # the data file's name is on disk before a model refers to it
        model_inode = os.stat(model_tmp).st_ino
        os.replace(model_tmp, path)
        _fsync_dir(parent)
    finally:
        published = model_inode is not None and _inode(path) == model_inode
        settled = True
        for stale in (old if published else [new] if new is not None else []):
            try:
                if os.path.lexists(stale):
                    stale.unlink()
            except OSError:
                settled = False  # the note stays: the next save retries
        if settled:
            lock.note(None)
        shutil.rmtree(tmp, ignore_errors=True)
    return [path, new] if new is not None else [path]


class _FolderLock:
    """``fcntl.flock`` on ``folder/.uprewrite.lock`` for the duration of a save.  The file also holds
    the note of the save in flight (``note``); ``previous`` is the note a killed save left.  The file
    is removed on release (a waiter that then holds a removed file's lock tries again)."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self.fd: int | None = None
        self.previous: dict | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def __enter__(self) -> _FolderLock:
        if fcntl is None:
            return self
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # waits for another save into this folder
                if _inode(self.path) == os.fstat(fd).st_ino:
                    self.fd, fd = fd, None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self.path.unlink(missing_ok=True)
                return self  # a file system without locks (some network mounts): atomic, not serialized
            finally:
                if fd is not None:
                    os.close(fd)
        try:
            self.previous = json.loads(os.pread(self.fd, 1 << 16, 0) or b"null")
        except ValueError:
            self.previous = None
        if not isinstance(self.previous, dict):
            self.previous = None
        return self

    def note(self, entry: dict | None) -> None:
        if self.fd is None:
            return
        data = json.dumps(entry).encode() if entry else b""
        os.ftruncate(self.fd, 0)
        if data:
            os.pwrite(self.fd, data, 0)
            os.fsync(self.fd)

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        try:
            if os.fstat(self.fd).st_size == 0:  # a note left means a cleanup to finish: keep the file
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None


def _recover(parent: Path, note: dict, keep: set[Path]) -> None:
    """Finish what a killed save into ``parent`` left (``note``: its output name, the data file it
    was placing, the previous one it was replacing): remove whichever of those the output's model
    does not refer to now."""
    name = note.get("output")
    if not isinstance(name, str) or os.sep in name or name in ("", ".", ".."):
        return
    pattern = data_file_pattern(name)
    names = [n for n in [note.get("new"), *(note.get("old") or [])] if isinstance(n, str) and pattern.fullmatch(n)]
    refs = _references(parent / name)
    if refs is None:
        return  # the output is not a model we can read: remove nothing
    for n in names:
        if n not in refs and _resolved(parent / n) not in keep:
            (parent / n).unlink(missing_ok=True)


def _remove_stale_temps(parent: Path) -> None:
    """Temp folders of saves into ``parent`` that were killed (SIGKILL: nothing could clean up)."""
    with os.scandir(parent) as entries:
        stale = [e.path for e in entries if e.name.startswith(TEMP_PREFIX) and e.is_dir(follow_symlinks=False)]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)


def _references(model_path: Path) -> set[str] | None:
    """External-data locations the model at ``model_path`` refers to (empty if there is no such
    file), or None when it cannot be read as a model."""
    try:
        data = model_path.read_bytes()
    except FileNotFoundError:
        return set()
    except OSError:
        return None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        return None
    return {e.value for t in external_data_helper._get_all_tensors(model)
            if external_data_helper.uses_external_data(t) for e in t.external_data if e.key == "location"}


def _our_data_files(path: Path) -> list[Path]:
    """The data files of the model now at ``path`` that ``save_model`` wrote (named for it)."""
    pattern = data_file_pattern(path.name)
    with os.scandir(path.parent) as entries:
        if not any(pattern.fullmatch(e.name) for e in entries):
            return []  # the usual case for a first save: the model is not even read
    return sorted(path.parent / n for n in (_references(path) or ()) if pattern.fullmatch(n))


def _new_data_name(path: Path) -> str:
    """A data file name for output ``path`` that no file has yet; ENAMETOOLONG before anything is
    written if the folder cannot take it."""
    length = len(os.fsencode(path.name)) + len(".data") + 1 + _TOKEN_HEX
    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = None
    if limit is not None and length > limit:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), f"{path.name}.{'x' * _TOKEN_HEX}.data")
    while True:
        name = f"{path.name}.{secrets.token_hex(_TOKEN_HEX // 2)}.data"
        if not os.path.lexists(path.parent / name):
            return name


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable against power loss; best effort (some file systems cannot
    fsync a folder, and a rename already done is not undone by a failure here)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path.absolute()


def _cause(exc: OSError, path: Path) -> str:
    """``no space left on device``: the OS's words for ``exc``, naming the file when it is not
    ``path`` or a temp file (a data file's name too long)."""
    text = exc.strerror or str(exc)
    text = text[:1].lower() + text[1:]
    named = exc.filename2 or exc.filename
    if named is not None and exc.errno == errno.ENAMETOOLONG:
        text += f" ({os.path.basename(os.fsdecode(named))})"
    return text


# ---------------------------------------------------------------------------------------------
# byte counting (budget.py and verify.py read it; it reads graphs only)


def tensor_bytes(elem_type: int, dims) -> int | None:
    """Bytes of a tensor of ``dims`` (None when a dim is unknown or the type has no fixed size)."""
    if any(d is None or d < 0 for d in dims) or elem_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return math.prod(int(d) for d in dims) * itemsize


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers, from their shapes (no data is read)."""
    total = 0
    for t in model.graph.initializer:
        n = tensor_bytes(t.data_type, list(t.dims))
        total += n if n is not None else t.ByteSize()
    return total
