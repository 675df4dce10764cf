"""model_io: validated loading, external data confined to the model's folder, atomic saving.

Library-level checks of ``load_model`` / ``validate_model`` / ``save_model`` plus the external-data
paths through the CLI (exit 0 with ``<out>.data`` written beside the output, exit 2 before any
external byte is read when a location is unsafe or the data file is missing or short).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import external_data_helper, helper

from onnx_uprewrite import api
from onnx_uprewrite.cli import cli
from onnx_uprewrite.errors import InvalidModelError, UsageError
from onnx_uprewrite.model_io import (
    has_external_data,
    load_model,
    save_model,
    validate_model,
)

DATA = "model.onnx.data"


# ----------------------------------------------------------------------------- helpers


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def x_feed(cin=8, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((1, cin, 5, 6)).astype(np.float32)}


def run(path: Path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def save_external(model: onnx.ModelProto, path: Path, location: str = DATA) -> Path:
    """Save with every tensor in one external file ``location`` beside ``path``."""
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path


def relocate(path: Path, location: str) -> None:
    """Rewrite the external-data ``location`` of every tensor of the model file (data untouched)."""
    m = onnx.load(str(path), load_external_data=False)
    for t in external_data_helper._get_all_tensors(m):
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    path.write_bytes(m.SerializeToString())


@pytest.fixture
def ext_model(tmp_path, ct_model):
    """``tmp_path/m/model.onnx`` + ``model.onnx.data`` (8->8 channels, k4 s2 p1: weights 4 KiB)."""
    folder = tmp_path / "m"
    folder.mkdir()
    return save_external(ct_model(cin=8, cout=8), folder / "model.onnx")


@pytest.fixture
def no_external_reads(monkeypatch):
    """Fail if onnx is ever asked to read external data."""
    calls = []

    def forbidden(*args, **kwargs):
        calls.append(args)
        raise AssertionError("external data was read")

    monkeypatch.setattr(external_data_helper, "load_external_data_for_model", forbidden)
    return calls


def assert_exit_2(root: Path, args, *needles):
    before = tree(root)
    result = invoke(*args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("uprewrite: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert tree(root) == before, "files were written or changed"
    return lines[0]


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
    assert written == [out, tmp_path / "out.onnx.data"]
    assert m.SerializeToString() == snapshot  # the caller's proto is not turned into references
    refs = onnx.load(str(out), load_external_data=False)
    assert any(external_data_helper.uses_external_data(t) for t in refs.graph.initializer)
    assert {e.value for t in refs.graph.initializer for e in t.external_data if e.key == "location"} == {
        "out.onnx.data"}
    loaded = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    for t in m.graph.initializer:
        np.testing.assert_array_equal(loaded[t.name], onnx.numpy_helper.to_array(t))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]


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
    with pytest.raises(OSError):
        save_model(ct_model(), out)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- external data through the CLI


def test_cli_converts_external_data_model_and_keeps_external_data(ext_model):
    folder = ext_model.parent
    before = tree(folder)
    out = folder / "model.subpixel.onnx"
    rep = folder / "r.json"
    result = invoke("convert", ext_model, "--report", rep)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "Traceback" not in result.output
    data = folder / "model.subpixel.onnx.data"
    assert out.is_file() and data.is_file()
    assert json.loads(rep.read_text())["written"] == [str(out), str(data)]
    assert {k: v for k, v in tree(folder).items() if k in before} == before  # inputs untouched
    refs = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in refs.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.subpixel.onnx.data"}
    assert "ConvTranspose" not in [n.op_type for n in refs.graph.node]
    feeds = x_feed()
    for a, b in zip(run(ext_model, feeds), run(out, feeds)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def test_cli_external_data_relative_paths_from_another_cwd(ext_model, tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = invoke("convert", "../m/model.onnx", "-o", "../m/out.onnx")
    assert result.exit_code == 0, (result.output, result.exception)
    assert (tmp_path / "m" / "out.onnx.data").is_file()
    assert list((tmp_path / "elsewhere").iterdir()) == []
    run(tmp_path / "m" / "out.onnx", x_feed())


def test_missing_external_data_file(ext_model):
    (ext_model.parent / DATA).unlink()
    assert_exit_2(ext_model.parent, ["convert", ext_model], str(ext_model), "tensor 'W'", repr(DATA), "not found")


def test_external_location_outside_the_folder_is_refused_before_reading(ext_model, tmp_path, no_external_reads):
    # a perfectly readable data file sits at ../outside.bin: the location alone must be refused
    (tmp_path / "outside.bin").write_bytes((ext_model.parent / DATA).read_bytes())
    relocate(ext_model, "../outside.bin")
    assert_exit_2(tmp_path, ["convert", ext_model], str(ext_model), "'../outside.bin'", "outside")
    with pytest.raises(InvalidModelError, match="outside"):
        load_model(ext_model)
    assert no_external_reads == []


def test_external_location_absolute_is_refused_before_reading(ext_model, tmp_path, no_external_reads):
    target = ext_model.parent / DATA  # inside the folder, but spelled as an absolute path
    relocate(ext_model, str(target.resolve()))
    assert_exit_2(tmp_path, ["convert", ext_model], str(ext_model), "relative path")
    assert no_external_reads == []


def test_external_location_symlink_escaping_the_folder_is_refused(ext_model, tmp_path, no_external_reads):
    (tmp_path / "outside.bin").write_bytes((ext_model.parent / DATA).read_bytes())
    try:
        (ext_model.parent / "link.bin").symlink_to(tmp_path / "outside.bin")
    except OSError:
        pytest.skip("no symlinks here")
    relocate(ext_model, "link.bin")
    assert_exit_2(tmp_path, ["convert", ext_model], str(ext_model), "'link.bin'", "outside")
    assert no_external_reads == []


def test_external_data_file_shorter_than_offset_plus_length(ext_model, no_external_reads):
    data = ext_model.parent / DATA
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    assert_exit_2(ext_model.parent, ["convert", ext_model], str(ext_model), "offset+length")
    assert no_external_reads == []


@pytest.mark.parametrize("key, value, needle", [
    ("offset", "abc", "not integers"),
    ("length", "-5", "offset+length"),
    ("location", "", "relative path"),
])
def test_malformed_external_data_entries(ext_model, no_external_reads, key, value, needle):
    m = onnx.load(str(ext_model), load_external_data=False)
    t = m.graph.initializer[0]
    entries = {e.key: e.value for e in t.external_data}
    entries[key] = value
    del t.external_data[:]
    for k, v in entries.items():
        t.external_data.add(key=k, value=v)
    ext_model.write_bytes(m.SerializeToString())
    assert_exit_2(ext_model.parent, ["convert", ext_model], str(ext_model), f"tensor '{t.name}'", needle)
    assert no_external_reads == []


def test_inspect_of_external_model_with_missing_data_exits_2(ext_model):
    (ext_model.parent / DATA).unlink()
    assert_exit_2(ext_model.parent, ["inspect", ext_model], str(ext_model), "not found")


def test_output_equal_to_the_inputs_external_data_file_is_refused(ext_model):
    assert_exit_2(ext_model.parent, ["convert", ext_model, "-o", ext_model.parent / DATA], "overwrite")


def test_output_data_file_equal_to_the_inputs_data_file_is_refused(tmp_path, ct_model):
    src = save_external(ct_model(cin=8, cout=8), tmp_path / "a.onnx", location="b.onnx.data")
    assert_exit_2(tmp_path, ["convert", src, "-o", tmp_path / "b.onnx"], "b.onnx.data")
