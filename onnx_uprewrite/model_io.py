"""Loading (validated, external data confined to the model's folder) and atomic saving."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, helper, numpy_helper

from .errors import InvalidModelError, UsageError
from .isolate import announce_temp

MIN_OPSET = 1
# onnx refuses to serialize a ModelProto above 2 GiB; stay clearly below it
INLINE_LIMIT = 1_800_000_000


def load_model(path: str | os.PathLike, lazy: bool = False) -> tuple[onnx.ModelProto, list[Path]]:
    """Read and validate a model file; external data is read only from inside its folder.

    Returns the model with all weights loaded and the external data files it read.  With ``lazy``,
    main-graph initializers in external data stay there: their locations become the absolute,
    validated paths of their files (``is_lazy``), read only when a value is needed
    (``tensor_array``, ``tensor_memmap``) and copied file to file when saved (``write_external``).
    """
    path = Path(path)
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file")
    if path.is_dir():
        raise InvalidModelError(f"{path}: is a directory, not an ONNX model file")
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
    del data
    validate_model(model, str(path))
    external: list[Path] = []
    if has_external_data(model):
        base = path.resolve().parent
        external = check_external_data(model, base, str(path))
        try:
            if lazy:
                lazy_names = set()
                for t in model.graph.initializer:
                    if external_data_helper.uses_external_data(t) and t.data_type in NUMPY_RAW:
                        for e in t.external_data:
                            if e.key == "location":
                                e.value = str((base / e.value).resolve())
                        lazy_names.add(t.name)
                for tensor in external_data_helper._get_all_tensors(model):
                    if external_data_helper.uses_external_data(tensor) and not (
                            tensor.name in lazy_names and is_lazy(tensor)):
                        external_data_helper.load_external_data_for_tensor(tensor, str(base))
            else:
                external_data_helper.load_external_data_for_model(model, str(base))
        except Exception as exc:  # onnx raises assorted errors for bad external data
            raise InvalidModelError(f"{path}: cannot read external data: {exc}") from None
    return model, external


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
    """A lazy initializer's bytes, read from its file."""
    location, offset, length = _external_span(t)
    with open(location, "rb") as fh:
        fh.seek(offset)
        return fh.read(length)


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
    from .budget import weight_bytes

    weights = weight_bytes(model)
    if weights > INLINE_LIMIT:
        return True
    return weights > INLINE_LIMIT // 2 and model.ByteSize() > INLINE_LIMIT


def output_files(path: Path, external: bool) -> list[Path]:
    """The files ``save_model`` writes for ``path`` (the model and, with external data, its data)."""
    return [path, path.with_name(path.name + ".data")] if external else [path]


def check_data_file(path: Path) -> None:
    """The external data of output ``path`` goes to ``<name>.data``; refuse when that file exists
    but ``path`` does not (then it is not the data of a previous output: someone else's file)."""
    data = output_files(path, True)[1]
    if (data.exists() or data.is_symlink()) and not path.exists():
        raise UsageError(f"{path}: its external data would go to {data}, which already exists and is not the "
                         "data of an earlier output of that name; remove it or choose another output name")


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


def write_external(model: onnx.ModelProto, model_path: Path, data_path: Path, location: str) -> None:
    """Save ``model`` with its initializers of EXTERNAL_THRESHOLD bytes or more in ``data_path``
    (referenced as ``location``), one tensor at a time: the model is neither copied nor changed,
    unlike onnx.save_model(save_as_external_data=True), which needs a copy of every weight."""
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
    if offset == 0:
        data_path.unlink()
    with open(model_path, "wb") as fh:
        fh.write(out.SerializeToString())


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external: bool = False) -> list[Path]:
    """Write ``model`` atomically: everything goes to a temp folder beside ``path``, then renames.

    With ``external`` (or a model too big to serialize inline) the weights go to
    ``<name>.data`` beside the model.  Returns the files written.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{path}: output folder {parent} does not exist")
    if path.is_dir():
        raise UsageError(f"{path}: output is a directory; give a file name")
    external = external or any(is_lazy(t) for t in model.graph.initializer) or _likely_over_inline_limit(model)
    if external:
        check_data_file(path)
    tmp = Path(tempfile.mkdtemp(prefix=".uprewrite-", dir=parent))
    announce_temp(tmp)
    placed: Path | None = None  # a data file already renamed into place, removed again if the model is not
    try:
        written = []
        if external:
            data_name = output_files(path, True)[1].name
            write_external(model, tmp / path.name, tmp / data_name, data_name)
            if (tmp / data_name).exists():
                os.replace(tmp / data_name, parent / data_name)
                placed = parent / data_name
                written.append(placed)
        else:
            with open(tmp / path.name, "wb") as fh:
                fh.write(model.SerializeToString())
        os.replace(tmp / path.name, path)
        placed = None
        written.insert(0, path)
        return written
    finally:
        if placed is not None:  # interrupted between the two renames: no data file without its model
            placed.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
