"""Hostile input, safe writing: outputs appear whole (temp file beside them + atomic rename) or not at all.

An output that would overwrite the input (or its external data, or an unrelated ``<out>.data``), a
missing output folder or a folder given as output: exit 2, nothing written.  A failure or an
interrupt (SIGINT, SIGTERM) at any moment leaves no partial file, no temp folder and no data file
without its model; the input bytes never change.
"""

from __future__ import annotations

import signal
import sys
import time

import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from hostile import assert_refused, tree
from onnx_uprewrite import model_io
from onnx_uprewrite.model_io import save_model


def test_output_equal_to_input_exits_2(tmp_path, model_file, monkeypatch):
    src = model_file()
    assert_refused(tmp_path, ["convert", src, "-o", src], 2, str(src), "overwrite")
    # the same file spelled differently
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert_refused(tmp_path, ["convert", src, "-o", "../model.onnx"], 2, "../model.onnx", "overwrite")


def test_output_folder_missing_exits_2(tmp_path, model_file):
    src = model_file()
    out = tmp_path / "nope" / "out.onnx"
    assert_refused(tmp_path, ["convert", src, "-o", out], 2, str(out), "does not exist")


def test_output_is_an_existing_directory_exits_2(tmp_path, model_file):
    src = model_file()
    (tmp_path / "outdir").mkdir()
    assert_refused(tmp_path, ["convert", src, "-o", tmp_path / "outdir"], 2, "outdir")


def test_report_path_equal_to_input_never_overwrites_it(tmp_path, model_file):
    src = model_file()
    assert_refused(tmp_path, ["convert", src, "-o", tmp_path / "out.onnx", "--report", src], 2, str(src))


def test_report_path_equal_to_output_is_refused(tmp_path, model_file):
    src = model_file()
    out = tmp_path / "out.onnx"
    assert_refused(tmp_path, ["convert", src, "-o", out, "--report", out], 2, str(out))


def test_unrelated_data_file_beside_the_output_is_never_overwritten(tmp_path, model_file, ct_model):
    """An external-data model writes ``<out>.data``: someone else's file of that name is refused."""
    src = tmp_path / "m" / "model.onnx"
    src.parent.mkdir()
    onnx.save_model(ct_model(cin=8, cout=8), str(src), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    (tmp_path / "m" / "out.onnx.data").write_bytes(b"someone else's data")
    assert_refused(tmp_path, ["convert", src, "-o", tmp_path / "m" / "out.onnx"], 2, "out.onnx.data",
                   "already exists")


def test_previous_output_pair_is_replaced(tmp_path, ct_model):
    """A data file that belongs to an existing output of that name is ours to replace."""
    out = tmp_path / "out.onnx"
    save_model(ct_model(cin=8, cout=8), out, external=True)
    save_model(ct_model(cin=8, cout=8, seed=5), out, external=True)
    loaded = onnx.load(str(out))
    assert numpy_helper.to_array(loaded.graph.initializer[0]).tobytes() == numpy_helper.to_array(
        ct_model(cin=8, cout=8, seed=5).graph.initializer[0]).tobytes()


@pytest.mark.parametrize("failing_call", [1, 2])
def test_failure_between_renames_leaves_no_data_without_its_model(tmp_path, ct_model, monkeypatch, failing_call):
    """Data is renamed into place first, the model last: a failure at either step leaves neither."""
    real_replace, calls = model_io.os.replace, []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == failing_call:
            raise KeyboardInterrupt  # what SIGINT raises; SIGTERM raises a BaseException the same way
        return real_replace(src, dst)

    monkeypatch.setattr(model_io.os, "replace", flaky_replace)
    with pytest.raises(KeyboardInterrupt):
        save_model(ct_model(cin=8, cout=8), tmp_path / "out.onnx", external=True)
    assert list(tmp_path.iterdir()) == []


def _slow_model(tmp_path, ct_model):
    """A model whose verification takes a few seconds, so that signals land in the middle of it."""
    path = tmp_path / "model.onnx"
    path.write_bytes(ct_model(cin=64, cout=64, kernel=(4, 4), spatial=(320, 320)).SerializeToString())
    return path


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_leaves_no_partial_output(tmp_path, ct_model, sig, code):
    import subprocess

    src = _slow_model(tmp_path, ct_model)
    before = tree(tmp_path)
    outcomes = set()
    for delay in (0.05, 0.3, 1.0, 3.0):  # the first ones land in the imports of onnx/onnxruntime
        proc = subprocess.Popen([sys.executable, "-m", "onnx_uprewrite", "convert", src, "-o", tmp_path / "out.onnx"],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert "Traceback" not in err
        out = tmp_path / "out.onnx"
        if proc.returncode == 0:  # finished before the signal: then the output is whole
            ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            out.unlink()
        else:
            assert proc.returncode == code, (proc.returncode, err)
            assert err.strip().splitlines()[-1].startswith("uprewrite: "), err
            assert "no partial output" in err
        outcomes.add(proc.returncode)
        assert tree(tmp_path) == before, "a partial file, a temp folder or a changed input was left"
    assert code in outcomes, "no run was interrupted; make the model slower"
