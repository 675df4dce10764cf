"""wire.strip_weights and the lazy loading of a model file with its weights inside (model_io): the
file is parsed without its big initializers' bytes, which are read from the file when needed and
copied file to file when saved; a model saved inline again is the same model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnx_uprewrite import api
from onnx_uprewrite.errors import InputChanged, InvalidModelError
from onnx_uprewrite.model_io import is_embedded, is_lazy, load_model, save_model, tensor_array
from onnx_uprewrite.wire import GRAPH_FIELD, _fields, _key, _varint_bytes, strip_weights


def _refill(stripped: bytes, spans, source: bytes) -> onnx.ModelProto:
    """The stripped model with each span's bytes put back as the raw_data of its initializer."""
    model = onnx.ModelProto()
    model.ParseFromString(stripped)
    for span in spans:
        model.graph.initializer[span.index].raw_data = source[span.offset:span.offset + span.length]
    return model


def _big_model(cout: int = 64, extra=()) -> onnx.ModelProto:
    """Conv (1 MiB of weights) then ConvTranspose: one big initializer, two small ones."""
    rng = np.random.default_rng(3)
    k = numpy_helper.from_array((rng.standard_normal((cout, 64, 8, 8)) * 0.02).astype(np.float32), "K")
    w = numpy_helper.from_array((rng.standard_normal((cout, 4, 4, 4)) * 0.2).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B")
    nodes = [helper.make_node("Conv", ["x", "K"], ["c"], name="conv", pads=[4, 4, 3, 3]),
             helper.make_node("ConvTranspose", ["c", "W", "B"], ["y"], name="up", strides=[2, 2], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 6, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [k, w, b, *extra],
                              doc_string="a doc string")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="test_wire")
    helper.set_model_props(model, {"key": "value"})
    return model


def _run(model, x):
    data = model if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(str(data) if isinstance(data, Path) else data).run(None, {"x": x})[0]


X = np.random.default_rng(1).standard_normal((1, 64, 6, 5)).astype(np.float32)


# ----------------------------------------------------------------------------- strip_weights


def test_strip_and_refill_gives_the_same_model():
    model = _big_model()
    data = model.SerializeToString()
    stripped, spans, count = strip_weights(data, 1 << 16)
    assert [s.index for s in spans] == [0] and spans[0].length == 64 * 64 * 8 * 8 * 4 and count == 3
    assert len(stripped) < 20_000
    assert _refill(stripped, spans, data) == model


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x3a\xff\xff\xff\xff\x0f", b"\x0b\x0c", bytes(range(256))],
                         ids=["empty", "field-0", "graph-past-the-end", "group", "noise"])
def test_bytes_not_plainly_laid_out_give_none(data):
    assert strip_weights(data, 1) is None


def test_truncated_file_gives_none():
    data = _big_model().SerializeToString()
    for cut in (5, len(data) // 2, len(data) - 3):
        assert strip_weights(data[:cut], 1 << 16) is None


def test_a_repeated_graph_field_gives_none():
    """protobuf merges a repeated message field; the scan does not try to."""
    data = _big_model().SerializeToString()
    again = onnx.ModelProto(graph=onnx.GraphProto(name="more")).SerializeToString()
    assert strip_weights(data + again, 1 << 16) is None


def test_nothing_big_enough_gives_none():
    assert strip_weights(_big_model().SerializeToString(), 1 << 30) is None


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=0, max_size=6), min_bytes=st.integers(1, 400),
       typed=st.lists(st.booleans(), min_size=6, max_size=6), doc=st.text(max_size=20),
       nodes=st.integers(0, 4))
def test_strip_refill_property(sizes, min_bytes, typed, doc, nodes):
    """Any mix of raw and typed-field initializers, names, docs and nodes: stripping what is at least
    ``min_bytes`` and putting it back is the identity."""
    inits = []
    for i, n in enumerate(sizes):
        value = np.arange(n, dtype=np.float32) * (i + 1)
        t = numpy_helper.from_array(value, f"t{i}")
        if typed[i]:
            t = helper.make_tensor(f"t{i}", TensorProto.FLOAT, [n], value.tolist())
        t.doc_string = doc
        inits.append(t)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], [f"y{j}"], name=doc + str(j)) for j in range(nodes)],
                              doc, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], doc_string=doc)
    data = model.SerializeToString()
    found = strip_weights(data, min_bytes)
    expect = [i for i, (n, t) in enumerate(zip(sizes, typed)) if not t and n * 4 >= min_bytes and n]
    if not expect:
        assert found is None
        return
    stripped, spans, count = found
    assert [s.index for s in spans] == expect and count == len(sizes)
    assert _refill(stripped, spans, data) == model


# ----------------------------------------------------------------------------- lazy loading of a whole file


def test_lazy_load_leaves_big_weights_in_the_file(tmp_path):
    model = _big_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    loaded, external = load_model(path, lazy=True)
    assert external == []
    embedded = [t.name for t in loaded.graph.initializer if is_embedded(t)]
    assert embedded == ["K"]
    assert loaded.ByteSize() < 20_000
    for t, want in zip(loaded.graph.initializer, model.graph.initializer):
        np.testing.assert_array_equal(tensor_array(t), numpy_helper.to_array(want))
    plain, _ = load_model(path)
    assert not any(is_lazy(t) for t in plain.graph.initializer) and plain == model


def test_small_file_is_parsed_whole(tmp_path):
    model = _big_model(cout=4)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    loaded, _ = load_model(path, lazy=True)
    assert loaded == model


def test_saved_inline_again_is_the_same_model(tmp_path):
    model = _big_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    loaded, _ = load_model(path, lazy=True)
    written = save_model(loaded, tmp_path / "again.onnx")
    assert written == [tmp_path / "again.onnx"]
    assert onnx.load(tmp_path / "again.onnx") == model


def test_saved_with_external_data_copies_from_the_model_file(tmp_path):
    model = _big_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    loaded, _ = load_model(path, lazy=True)
    written = save_model(loaded, tmp_path / "ext.onnx", external=True)
    assert len(written) == 2
    np.testing.assert_array_equal(_run(tmp_path / "ext.onnx", X), _run(model, X))


def test_bytes_that_do_not_fit_the_shape_are_refused_as_before(tmp_path):
    """A big initializer whose raw_data is shorter than its shape says is not made lazy: the message is
    the one a whole parse gives."""
    model = _big_model()
    model.graph.initializer[0].dims[0] = 65
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    loaded, _ = load_model(path, lazy=True)
    assert not any(is_lazy(t) for t in loaded.graph.initializer)
    messages = []
    for lazy in (False, True):
        with pytest.raises(Exception) as info:
            api.convert(str(path), output=tmp_path / "o.onnx", lazy_weights=lazy)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert not (tmp_path / "o.onnx").exists()


def test_truncated_big_file_is_refused_with_the_usual_message(tmp_path):
    data = _big_model().SerializeToString()
    path = tmp_path / "m.onnx"
    path.write_bytes(data[:len(data) - 1000])
    with pytest.raises(InvalidModelError, match="truncated or corrupt"):
        load_model(path, lazy=True)


# ----------------------------------------------------------------------------- convert


def test_convert_lazily_writes_one_file_with_the_same_model(tmp_path):
    model = _big_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    lazy = api.convert(str(path), output=tmp_path / "lazy.onnx", lazy_weights=True)
    whole = api.convert(str(path), output=tmp_path / "whole.onnx")
    assert lazy.report.written == [str(tmp_path / "lazy.onnx")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lazy.onnx", "m.onnx", "whole.onnx"]
    assert onnx.load(tmp_path / "lazy.onnx") == onnx.load(tmp_path / "whole.onnx")
    np.testing.assert_allclose(_run(tmp_path / "lazy.onnx", X), _run(model, X), rtol=1e-5, atol=1e-5)


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize("stage", ["running the original model", "saving"])
def test_model_file_changed_during_the_run_is_refused(tmp_path, stage):
    model = _big_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    data = path.read_bytes()
    offset = data.index(model.graph.initializer[0].raw_data[:64]) + 1000

    def progress(what, done, total):
        if what == stage:
            _flip(path, offset)

    with pytest.raises(InputChanged, match="changed while it was being converted"):
        api.convert(str(path), output=tmp_path / "o.onnx", lazy_weights=True, progress=progress)
    assert not (tmp_path / "o.onnx").exists()
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


@settings(max_examples=40, deadline=None)
@given(flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=4),
       in_raw=st.booleans())
def test_a_damaged_big_file_loads_lazily_as_it_loads_whole(tmp_path_factory, flips, in_raw):
    """Bytes changed anywhere (in the structure, or inside a big tensor's data): the lazy load raises
    the same error as the whole load, or gives the same model."""
    model = _big_model()
    data = bytearray(model.SerializeToString())
    start = data.index(model.graph.initializer[0].raw_data[:64])
    lo, hi = (start, start + 64 * 64 * 8 * 8 * 4) if in_raw else (0, len(data))
    for where, value in flips:
        i = lo + int(where * (hi - lo - 1))
        if in_raw or not start <= i < start + 64 * 64 * 8 * 8 * 4:
            data[i] ^= value
    path = tmp_path_factory.mktemp("damaged") / "m.onnx"
    path.write_bytes(bytes(data))
    outcomes = []
    for lazy in (False, True):
        try:
            loaded, _ = load_model(path, lazy=lazy)
        except InvalidModelError as exc:
            outcomes.append(("error", str(exc)))
        else:
            outcomes.append(("model", [(t.name, tensor_array(t).tobytes()) for t in loaded.graph.initializer],
                             [n.SerializeToString() for n in loaded.graph.node]))
    assert outcomes[0] == outcomes[1]


def test_an_initializer_field_of_another_wire_type_is_not_plainly_laid_out(tmp_path):
    """protobuf keeps a field 5 that is not length-delimited as an unknown field, not an initializer:
    counting it would point every later stripped initializer at the next one's bytes."""
    n = 300_000
    a, b, c = (numpy_helper.from_array(np.full((n,), v, np.float32), name) for name, v in (("A", 1), ("B", 2),
                                                                                            ("C", 3)))
    graph = helper.make_graph([helper.make_node("Add", ["A", "C"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])], [a])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
    _, _, tag, start, end = [f for f in _fields(data, 0, len(data)) if f[0] == GRAPH_FIELD][0]
    extra = b"".join(_key(5) + _varint_bytes(len(t.SerializeToString())) + t.SerializeToString() for t in (b, c))
    body = data[start:end] + _key(5, 0) + _varint_bytes(7) + extra
    data = data[:tag] + _key(GRAPH_FIELD) + _varint_bytes(len(body)) + body + data[end:]
    assert strip_weights(data, 1 << 16) is None
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    lazy, _ = load_model(path, lazy=True)
    assert [tensor_array(t)[0] for t in lazy.graph.initializer] == [1, 2, 3]


def test_unknown_fields_survive_a_lazy_convert(tmp_path):
    """Fields of a newer onnx.proto (unknown here) are kept as a whole parse keeps them."""
    data = _big_model().SerializeToString() + _key(1000) + _varint_bytes(3) + b"new"
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    api.convert(str(path), output=tmp_path / "lazy.onnx", lazy_weights=True)
    api.convert(str(path), output=tmp_path / "whole.onnx")
    assert onnx.load(tmp_path / "lazy.onnx") == onnx.load(tmp_path / "whole.onnx")
    assert b"\x03new" in (tmp_path / "lazy.onnx").read_bytes()


def test_an_explicit_default_data_location_is_written_back(tmp_path):
    model = _big_model()
    model.graph.initializer[0].data_location = TensorProto.DEFAULT
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    loaded, _ = load_model(path, lazy=True)
    save_model(loaded, tmp_path / "again.onnx")
    assert onnx.load(tmp_path / "again.onnx") == model


def test_a_file_replaced_between_scan_and_read_is_refused(tmp_path, monkeypatch):
    from onnx_uprewrite import model_io

    model = _big_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    real = model_io._point_at_file

    def replace_first(*args):
        other = tmp_path / "other.onnx"
        onnx.save(_big_model(cout=65), other)
        os.replace(other, path)
        return real(*args)

    monkeypatch.setattr(model_io, "_point_at_file", replace_first)
    with pytest.raises(InputChanged, match="written to or replaced while it was read"):
        load_model(path, lazy=True)
