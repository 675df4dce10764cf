"""model_io: validated loading, external data confined to the model's folder, atomic saving.

Library-level checks of ``load_model`` / ``validate_model`` / ``save_model``; the external-data
paths through the CLI are in ``test_hostile_external_data.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import external_data_helper, helper

from onnx_uprewrite import api
from onnx_uprewrite.errors import InvalidModelError, UsageError, WriteError
from onnx_uprewrite.model_io import (
    data_file_pattern,
    has_external_data,
    load_model,
    save_model,
    validate_model,
)

# ----------------------------------------------------------------------------- load_model / validate_model


def test_load_plain_model(tmp_path, ct_model):
    m = ct_model()
    path = tmp_path / "model.onnx"
    path.write_bytes(m.SerializeToString())
    loaded, external = load_model(path)
    assert external == []
    assert loaded == m


def test_load_external_model_reads_weights(ext_model, ct_model):
    loaded, external = load_model(ext_model)
    assert [p.name for p in external] == ["model.onnx.data"]
    assert not has_external_data(loaded)
    expected = {t.name: onnx.numpy_helper.to_array(t) for t in ct_model(cin=8, cout=8).graph.initializer}
    got = {t.name: onnx.numpy_helper.to_array(t) for t in loaded.graph.initializer}
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(value, got[name])


def test_load_external_model_from_another_working_directory(ext_model, tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded, external = load_model(Path("..") / "m" / "model.onnx")
    assert external and not has_external_data(loaded)


@pytest.mark.parametrize("mutate, needle", [
    (lambda m: setattr(m, "ir_version", 0), "no IR version"),
    (lambda m: m.ClearField("graph"), "no graph"),
    (lambda m: m.graph.ClearField("output"), "no outputs"),
    (lambda m: m.ClearField("opset_import"), "opset"),
    (lambda m: m.graph.node[0].input.__setitem__(0, "nowhere"), "'nowhere'"),
])
def test_validate_model_names_the_label(ct_model, mutate, needle):
    m = ct_model()
    mutate(m)
    with pytest.raises(InvalidModelError) as info:
        validate_model(m, "LABEL")
    assert str(info.value).startswith("LABEL: ") and needle in str(info.value)
    assert "\n" not in str(info.value)


def test_validate_accepts_ir3_weights_listed_as_inputs(ct_model):
    m = ct_model()
    m.ir_version = 3
    m.graph.input.extend([helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [3, 4, 4, 4]),
                          helper.make_tensor_value_info("B", onnx.TensorProto.FLOAT, [4])])
    validate_model(m, "m")  # initializer and input with the same name: not "produced twice"


def test_in_memory_convert_validates_and_never_mutates_the_caller(ct_model):
    m = ct_model()
    snapshot = m.SerializeToString()
    result = api.convert(m)
    assert m.SerializeToString() == snapshot
    assert "ConvTranspose" not in [n.op_type for n in result.model.graph.node]
    broken = ct_model()
    broken.graph.name = "my_graph"
    broken.graph.node[0].input[0] = "ghost"
    with pytest.raises(InvalidModelError, match="my_graph: .*'ghost'"):
        api.convert(broken)


def test_in_memory_model_with_unloaded_external_data_is_refused(ext_model):
    m = onnx.load(str(ext_model), load_external_data=False)
    with pytest.raises(UsageError, match="external data"):
        api.convert(m)


# ----------------------------------------------------------------------------- save_model


def test_save_model_inline_is_atomic_and_keeps_ir_and_opset(tmp_path, ct_model):
    m = ct_model()
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old contents")
    assert save_model(m, out) == [out]
    assert onnx.load(str(out)) == m
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]  # no temp folder left behind
    saved = onnx.load(str(out))
    assert saved.ir_version == 8 and [o.version for o in saved.opset_import] == [17]


def test_save_model_external_writes_data_beside(tmp_path, ct_model):
    m = ct_model(cin=8, cout=8)
    snapshot = m.SerializeToString()
    out = tmp_path / "out.onnx"
    written = save_model(m, out, external=True)
    assert written[0] == out and len(written) == 2 and data_file_pattern("out.onnx").fullmatch(written[1].name)
    assert written[1].parent == tmp_path
    assert m.SerializeToString() == snapshot  # the caller's proto is not turned into references
    refs = onnx.load(str(out), load_external_data=False)
    assert any(external_data_helper.uses_external_data(t) for t in refs.graph.initializer)
    assert {e.value for t in refs.graph.initializer for e in t.external_data if e.key == "location"} == {
        written[1].name}
    loaded = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    for t in m.graph.initializer:
        np.testing.assert_array_equal(loaded[t.name], onnx.numpy_helper.to_array(t))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", written[1].name]  # no lock, no temp


def test_save_model_to_missing_folder(tmp_path, ct_model):
    out = tmp_path / "nope" / "out.onnx"
    with pytest.raises(UsageError, match="does not exist"):
        save_model(ct_model(), out)
    assert list(tmp_path.iterdir()) == []


def test_save_model_failure_leaves_nothing(tmp_path, ct_model, monkeypatch):
    from onnx_uprewrite import model_io

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_io.os, "replace", broken_replace)
    out = tmp_path / "out.onnx"
    with pytest.raises(WriteError, match=f"^cannot write {out}: no space left on device$"):
        save_model(ct_model(), out)
    assert list(tmp_path.iterdir()) == []


def test_external_save_keeps_every_tensor_kind_and_leaves_the_model_alone(tmp_path):
    """write_external streams raw bytes tensor by tensor: typed fields (float16 in int32_data,
    bool), packed 4-bit raw data, strings and small tensors (inline) all read back equal."""
    from onnx import TensorProto, numpy_helper

    rng = np.random.default_rng(0)
    big = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "big")
    typed_f16 = TensorProto(name="f16", data_type=TensorProto.FLOAT16, dims=[40, 40])
    typed_f16.int32_data.extend(rng.standard_normal(1600).astype(np.float16).view(np.uint16).astype(np.int32))
    flags = helper.make_tensor("flags", TensorProto.BOOL, [2000], rng.random(2000) > 0.5)
    packed = helper.make_tensor("int4", TensorProto.INT4, [4000], rng.integers(-8, 8, 4000), raw=False)
    words = helper.make_tensor("words", TensorProto.STRING, [2], [b"a" * 600, b"b" * 600])
    small = numpy_helper.from_array(np.arange(4, dtype=np.float32), "small")
    inits = [big, typed_f16, flags, packed, words, small]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    before = model.SerializeToString()
    save_model(model, tmp_path / "m.onnx", external=True)
    assert model.SerializeToString() == before
    back = onnx.load(tmp_path / "m.onnx")
    stored = {t.name: t.data_location for t in onnx.load(tmp_path / "m.onnx", load_external_data=False).graph.initializer}
    assert stored["big"] == stored["f16"] == stored["flags"] == TensorProto.EXTERNAL
    assert stored["small"] == stored["words"] == TensorProto.DEFAULT
    for t, u in zip(inits, back.graph.initializer):
        assert t.name == u.name
        np.testing.assert_array_equal(numpy_helper.to_array(t), numpy_helper.to_array(u))


def test_lazy_weights_read_only_the_sites_and_save_a_self_contained_model(tmp_path):
    """load_model(lazy=True): external initializers stay in their file (absolute, validated
    locations); a site's weight is read on demand, an unrelated one never; the output has no
    reference to the input's file and computes the same."""
    from onnx import TensorProto, numpy_helper

    from onnx_uprewrite.model_io import is_lazy
    import onnxruntime as ort

    rng = np.random.default_rng(5)
    w = numpy_helper.from_array((rng.standard_normal((8, 8, 4, 4)) * 0.2).astype(np.float32), "W")
    k = numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32), "K")
    tiny = numpy_helper.from_array(np.arange(3, dtype=np.float32).reshape(1, 3, 1, 1) * 0, "tiny")
    nodes = [helper.make_node("Conv", ["x", "K"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["c", "W"], ["y"], name="up", strides=[2, 2], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, k, tiny])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    before = {p.name: p.read_bytes() for p in src.parent.iterdir()}
    loaded, files = load_model(src, lazy=True)
    assert all(is_lazy(t) for t in loaded.graph.initializer)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    result = api.convert(str(src), output=out, to="subpixel", lazy_weights=True)
    assert result.report.verification == "passed"
    assert is_lazy(next(t for t in result.model.graph.initializer if t.name == "K"))  # never loaded
    assert {p.name: p.read_bytes() for p in src.parent.iterdir()} == before
    refs = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in refs.graph.initializer for e in t.external_data if e.key == "location"}
    assert [p.name for p in out.parent.iterdir() if p != out] == list(locations)
    assert data_file_pattern("o.onnx").fullmatch(locations.pop())
    x = rng.standard_normal((1, 8, 5, 6)).astype(np.float32)
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_external_length_must_match_the_tensor(tmp_path, ct_model):
    """A declared length shorter than the tensor: refused at load (a lazy tensor is never read there)."""
    src = tmp_path / "m.onnx"
    onnx.save_model(ct_model(cin=8, cout=8), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.data", size_threshold=0)
    m = onnx.load(str(src), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "length":
                e.value = str(int(e.value) // 2)
    onnx.save_model(m, str(src))
    for lazy in (False, True):
        with pytest.raises(InvalidModelError, match="for a tensor of"):
            load_model(src, lazy=lazy)


def test_external_save_keeps_graph_metadata(tmp_path, ct_model):
    m = ct_model()
    m.graph.metadata_props.add(key="k", value="v")
    save_model(m, tmp_path / "o.onnx", external=True)
    assert [(p.key, p.value) for p in onnx.load(str(tmp_path / "o.onnx")).graph.metadata_props] == [("k", "v")]
