"""Hostile input, external data: nothing outside the model's folder is ever read.

A ``location`` that escapes the folder (``../``, an absolute path, a symlink pointing outside) is
refused before any external byte is read (``no_external_reads``); a missing data file or one
shorter than the declared offset+length, and malformed entries: exit 2, one line naming the tensor.
The good path: ``<out>.<8 hex>.data`` is written beside the output, a name new to each write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from hostile import DATA, assert_clean_exit, assert_refused, error_line, invoke, relocate, save_external, tree
from onnx_uprewrite.errors import InvalidModelError
from onnx_uprewrite.model_io import data_file_pattern, load_model


def x_feed(cin=8, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((1, cin, 5, 6)).astype(np.float32)}


def run(path: Path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_cli_converts_external_data_model_and_keeps_external_data(ext_model):
    folder = ext_model.parent
    before = tree(folder)
    out = folder / "model.subpixel.onnx"
    rep = folder / "r.json"
    result = invoke("convert", ext_model, "--report", rep)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "Traceback" not in result.output
    [data] = [p for p in folder.iterdir() if data_file_pattern(out.name).fullmatch(p.name)]
    assert out.is_file()
    assert json.loads(rep.read_text())["written"] == [str(out), str(data)]
    assert {k: v for k, v in tree(folder).items() if k in before} == before  # inputs untouched
    assert set(tree(folder)) == set(before) | {out.name, data.name, rep.name}
    refs = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in refs.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {data.name}
    assert "ConvTranspose" not in [n.op_type for n in refs.graph.node]
    feeds = x_feed()
    for a, b in zip(run(ext_model, feeds), run(out, feeds)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def test_cli_external_data_relative_paths_from_another_cwd(ext_model, tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = invoke("convert", "../m/model.onnx", "-o", "../m/out.onnx")
    assert result.exit_code == 0, (result.output, result.exception)
    assert len([p for p in (tmp_path / "m").iterdir() if data_file_pattern("out.onnx").fullmatch(p.name)]) == 1
    assert list((tmp_path / "elsewhere").iterdir()) == []
    run(tmp_path / "m" / "out.onnx", x_feed())


def test_missing_external_data_file(ext_model):
    (ext_model.parent / DATA).unlink()
    assert_refused(ext_model.parent, ["convert", ext_model], 2, str(ext_model), "tensor 'W'", repr(DATA), "not found")


def test_external_location_outside_the_folder_is_refused_before_reading(ext_model, tmp_path, no_external_reads):
    # a perfectly readable data file sits at ../outside.bin: the location alone must be refused
    (tmp_path / "outside.bin").write_bytes((ext_model.parent / DATA).read_bytes())
    relocate(ext_model, "../outside.bin")
    assert_refused(tmp_path, ["convert", ext_model], 2, str(ext_model), "'../outside.bin'", "outside")
    with pytest.raises(InvalidModelError, match="outside"):
        load_model(ext_model)
    assert no_external_reads == []


def test_external_location_absolute_is_refused_before_reading(ext_model, tmp_path, no_external_reads):
    target = ext_model.parent / DATA  # inside the folder, but spelled as an absolute path
    relocate(ext_model, str(target.resolve()))
    assert_refused(tmp_path, ["convert", ext_model], 2, str(ext_model), "relative path")
    assert no_external_reads == []


def test_external_location_symlink_escaping_the_folder_is_refused(ext_model, tmp_path, no_external_reads):
    (tmp_path / "outside.bin").write_bytes((ext_model.parent / DATA).read_bytes())
    try:
        (ext_model.parent / "link.bin").symlink_to(tmp_path / "outside.bin")
    except OSError:
        pytest.skip("no symlinks here")
    relocate(ext_model, "link.bin")
    assert_refused(tmp_path, ["convert", ext_model], 2, str(ext_model), "'link.bin'", "outside")
    assert no_external_reads == []


def test_external_data_file_shorter_than_offset_plus_length(ext_model, no_external_reads):
    data = ext_model.parent / DATA
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    assert_refused(ext_model.parent, ["convert", ext_model], 2, str(ext_model), "offset+length")
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
    assert_refused(ext_model.parent, ["convert", ext_model], 2, str(ext_model), f"tensor '{t.name}'", needle)
    assert no_external_reads == []


def test_inspect_of_external_model_with_missing_data_exits_2(ext_model):
    (ext_model.parent / DATA).unlink()
    assert_refused(ext_model.parent, ["inspect", ext_model], 2, str(ext_model), "not found")


def test_output_equal_to_the_inputs_external_data_file_is_refused(ext_model):
    assert_refused(ext_model.parent, ["convert", ext_model, "-o", ext_model.parent / DATA], 2, "overwrite")


def test_output_named_like_the_inputs_data_file_leaves_it_alone(tmp_path, ct_model):
    """``b.onnx.data`` (the input's data, and the data name of output ``b.onnx`` before names were
    unique to each write) is neither overwritten nor removed."""
    src = save_external(ct_model(cin=8, cout=8), tmp_path / "a.onnx", location="b.onnx.data")
    before = tree(tmp_path)
    result = invoke("convert", src, "-o", tmp_path / "b.onnx")
    assert result.exit_code == 0, (result.output, result.exception)
    assert {k: v for k, v in tree(tmp_path).items() if k in before} == before
    for x, y in zip(run(src, x_feed()), run(tmp_path / "b.onnx", x_feed())):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- an input that changes


def _two_weights_model(tmp_path):
    """Conv K then ConvTranspose W, both in ``in/m.onnx.data``: K is copied to the output file to
    file at save time (lazy), W is the site's weight, read early."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    w = numpy_helper.from_array((rng.standard_normal((8, 8, 4, 4)) * 0.2).astype(np.float32), "W")
    k = numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32), "K")
    nodes = [helper.make_node("Conv", ["x", "K"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["c", "W"], ["y"], name="up", strides=[2, 2], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (tmp_path / "in").mkdir()
    return save_external(model, tmp_path / "in" / "m.onnx", location="m.onnx.data")


def _span(src, name):
    m = onnx.load(str(src), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.name == name)
    info = {e.key: e.value for e in t.external_data}
    return int(info.get("offset", 0)), int(info["length"])


def _flip_byte(data: Path, offset: int, keep_times: bool = False):
    st = data.stat()
    with open(data, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x40]))
    if keep_times:  # mtime set back: ctime and the bytes still tell
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))


def _replace_file(data: Path, offset: int):
    raw = bytearray(data.read_bytes())
    raw[offset] ^= 0x40
    tmp = data.with_name("new.tmp")
    tmp.write_bytes(bytes(raw))
    os.replace(tmp, data)


def _truncate(data: Path, offset: int):
    os.truncate(data, offset + 1)


@pytest.mark.parametrize("change", [_flip_byte, lambda d, o: _flip_byte(d, o, keep_times=True), _replace_file,
                                    _truncate], ids=["written", "written-mtime-kept", "replaced", "truncated"])
@pytest.mark.parametrize("stage, verify", [("saving", True), ("running the original model", False)])
def test_input_data_changed_during_the_run_is_refused(tmp_path, change, stage, verify):
    """The weights copied file to file at save time are checked against what the run read: a data
    file written to, replaced or truncated mid-run is exit 2 'changed while it was being converted',
    and nothing is published (an earlier output stays whole)."""
    from onnx_uprewrite import api
    from onnx_uprewrite.errors import InputChanged

    src = _two_weights_model(tmp_path)
    data = src.parent / "m.onnx.data"
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    api.convert(str(src), output=out, lazy_weights=True)  # an earlier output
    before = tree(out.parent)
    offset, length = _span(src, "K")

    def progress(what, done, total):
        if what == stage:
            change(data, offset + length // 2)

    with pytest.raises(InputChanged, match="changed while it was being converted.*nothing was written"):
        api.convert(str(src), output=out, lazy_weights=True, verify=verify, progress=progress)
    assert tree(out.parent) == before


def test_input_data_changed_through_the_cli_is_one_line(tmp_path, monkeypatch):
    from onnx_uprewrite import api

    src = _two_weights_model(tmp_path)
    offset, length = _span(src, "K")
    real = api.save_model

    def save_after_a_change(model, path, **kwargs):
        _flip_byte(src.parent / "m.onnx.data", offset + 1)
        return real(model, path, **kwargs)

    monkeypatch.setattr(api, "save_model", save_after_a_change)
    before = set(tree(tmp_path))
    result = invoke("convert", src, "-o", tmp_path / "o.onnx")
    assert_clean_exit(result, 2)
    error_line(result.stderr, str(src.parent / "m.onnx.data"), "changed while it was being converted")
    assert set(tree(tmp_path)) == before


def test_untouched_input_is_not_reported_changed(tmp_path):
    """Reading (atime) and re-verifying the input does not count as a change."""
    from onnx_uprewrite import api

    src = _two_weights_model(tmp_path)
    for _ in range(2):
        result = api.convert(str(src), output=tmp_path / "o.onnx", lazy_weights=True)
        assert result.report.verification == "passed"
        run(src, x_feed())


def test_stale_temp_folder_of_a_killed_run_is_removed(ext_model):
    """SIGKILL of every process while saving leaves a ``.uprewrite-*`` folder: the next save into that
    folder removes it (no save can be running there: saves take turns on the folder's lock)."""
    stale = ext_model.parent / ".uprewrite-k1lled"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half a model")
    keep = ext_model.parent / ".uprewrite-file"
    keep.write_bytes(b"a file, not one of our folders")
    result = invoke("convert", ext_model, "-o", ext_model.parent / "o.onnx")
    assert result.exit_code == 0, (result.output, result.exception)
    assert not stale.exists() and keep.read_bytes() == b"a file, not one of our folders"


def test_input_data_changed_during_verification_is_input_changed_not_a_failure(tmp_path, emission_hook):
    """The data file changes after the sites were read: the whole-model check then differs, and the run
    says the input changed (exit 2), not that the rewrite is wrong (exit 1)."""
    import numpy as np
    from onnx import helper, numpy_helper

    import onnx_uprewrite as up
    from conftest import make_convtranspose_model

    model = make_convtranspose_model(cin=4, cout=4, spatial=(5, 5))
    model.graph.node[0].output[0] = "u"
    w2 = np.random.default_rng(3).standard_normal((4, 4, 3, 3)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(w2, "W2"))
    model.graph.node.append(helper.make_node("Conv", ["u", "W2"], ["y"], name="after", pads=[1, 1, 1, 1]))
    folder = tmp_path / "m"
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    data = folder / "model.onnx.data"

    def scribble(site, emission):
        blob = bytearray(data.read_bytes())
        blob[-64:] = bytes(64)  # W2 is written last: zero part of it
        data.write_bytes(bytes(blob))

    emission_hook(scribble)
    with pytest.raises(up.InputChanged, match="changed while it was being converted"):
        up.convert(path, lazy_weights=True, output=tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
