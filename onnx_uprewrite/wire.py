"""Where a model file's big initializers keep their bytes, read from the protobuf wire format.

A model file with its weights inside (no external data) is parsed without them: ``strip_weights``
returns the file's bytes minus the ``raw_data`` of each big main-graph initializer, and where each
removed span lies in the file.  ``model_io.load_model`` parses that small copy and points each
stripped initializer at its span of the file itself, as it points a lazy external-data initializer
at its data file: the weights are then read (or memory-mapped) only when needed, never held twice.

Pure byte arithmetic over ``ModelProto.graph`` (field 7), ``GraphProto.initializer`` (field 5) and
``TensorProto.raw_data`` (field 9).  Anything unusual (a repeated graph or raw_data field, a length
past the end, a group) gives None: the caller then parses the file as a whole, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

#: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data
GRAPH_FIELD, INITIALIZER_FIELD, RAW_DATA_FIELD = 7, 5, 9
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


class _Malformed(Exception):
    pass


@dataclass(frozen=True)
class Span:
    """``length`` bytes at ``offset`` of the file: the raw_data of main-graph initializer ``index``."""

    index: int
    offset: int
    length: int


def strip_weights(buf, min_bytes: int) -> tuple[bytes, list[Span], int] | None:
    """(``buf`` without the raw_data of every main-graph initializer of at least ``min_bytes``
    bytes, the spans removed, the number of initializers seen) or None when nothing is that big or
    the bytes are not plainly laid out.
    ``buf``: the file's bytes, e.g. an ``mmap`` (indexing gives ints, slicing copies)."""
    try:
        return _strip(buf, len(buf), min_bytes)
    except _Malformed:
        return None


def _strip(buf, size: int, min_bytes: int) -> tuple[bytes, list[Span], int] | None:
    graphs = [f for f in _fields(buf, 0, size) if f[0] == GRAPH_FIELD]
    if len(graphs) != 1 or graphs[0][1] != _LENGTH:
        return None
    _, _, graph_tag, graph_start, graph_end = graphs[0]
    pieces, spans, index = [], [], 0
    for number, wire, tag, start, end in _fields(buf, graph_start, graph_end):
        if number == INITIALIZER_FIELD and wire != _LENGTH:  # an unknown field to protobuf: not counted there
            raise _Malformed
        if number != INITIALIZER_FIELD or end - start < min_bytes:  # too small to strip
            pieces.append(buf[tag:end])
            if number == INITIALIZER_FIELD:
                index += 1
            continue
        raw = [f for f in _fields(buf, start, end) if f[0] == RAW_DATA_FIELD]
        if len(raw) == 1 and raw[0][1] == _LENGTH and raw[0][4] - raw[0][3] >= min_bytes:
            _, _, raw_tag, raw_start, raw_end = raw[0]
            body = buf[start:raw_tag] + buf[raw_end:end]
            pieces.append(_key(INITIALIZER_FIELD) + _varint_bytes(len(body)) + body)
            spans.append(Span(index, raw_start, raw_end - raw_start))
        else:
            pieces.append(buf[tag:end])
        index += 1
    if not spans:
        return None
    graph = b"".join(pieces)
    stripped = buf[:graph_tag] + _key(GRAPH_FIELD) + _varint_bytes(len(graph)) + graph + buf[graph_end:size]
    return stripped, spans, index


def _fields(buf, start: int, end: int):
    """(field number, wire type, where its tag starts, where its value starts, where it ends) of each
    field of the message in ``buf[start:end]``."""
    i = start
    while i < end:
        tag = i
        key, i = _read_varint(buf, i, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, stop = _read_varint(buf, i, end)
        elif wire == _FIXED64:
            stop = i + 8
        elif wire == _FIXED32:
            stop = i + 4
        elif wire == _LENGTH:
            length, i = _read_varint(buf, i, end)
            stop = i + length
        else:  # groups (3, 4) are not in onnx.proto; 6, 7 are invalid
            raise _Malformed
        if number == 0 or stop > end:
            raise _Malformed
        yield number, wire, tag, i, stop
        i = stop


def _read_varint(buf, i: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= end or shift > 63:
            raise _Malformed
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, wire: int = _LENGTH) -> bytes:
    return _varint_bytes(number << 3 | wire)


def unknown_field_bytes(fields) -> bytes:
    """The wire bytes of ``google.protobuf.unknown_fields.UnknownFieldSet`` entries (groups: none, as
    onnx.proto has none), for MergeFromString into a message built field by field."""
    out = bytearray()
    for f in fields:
        out += _key(f.field_number, f.wire_type)
        if f.wire_type == _VARINT:
            out += _varint_bytes(f.data)
        elif f.wire_type == _FIXED64:
            out += int(f.data).to_bytes(8, "little")
        elif f.wire_type == _FIXED32:
            out += int(f.data).to_bytes(4, "little")
        elif f.wire_type == _LENGTH:
            out += _varint_bytes(len(f.data)) + bytes(f.data)
    return bytes(out)


def length_field(number: int, length: int) -> bytes:
    """The tag and length prefix of a length-delimited field ``number`` holding ``length`` bytes."""
    return _key(number) + _varint_bytes(length)

