"""Models that make onnx or onnxruntime kill the process (SIGABRT, SIGFPE) instead of raising.

Known ones are refused before any native code sees them (model_io: group < 1, blocksize out of
range, a Resize whose scales do not match its input's rank); onnx shape inference runs in a server
process (isolate.infer_shapes); and the CLI runs in a forked child (isolate.supervise), so that an unknown
crash still ends in one ``uprewrite: error:`` line, exit 2, no output and no temp folder.
Everything here is real: the crashes are onnx's and onnxruntime's own.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import onnx
from onnx import TensorProto, helper, numpy_helper

from hostile import IR_VERSION, OPSET, assert_refused, error_line, graph_model, run_module, tree
from onnx_uprewrite import api, isolate
from onnx_uprewrite.errors import InvalidModelError
from onnx_uprewrite.isolate import NativeCrash

pytestmark = pytest.mark.skipif(not isolate.can_fork(), reason="process isolation needs fork (Linux)")


def _resize_after_unsqueeze():
    """Unsqueeze by axes from a graph input makes a rank no inference can know; Resize's 4 scales on
    the resulting rank-5 tensor make onnxruntime call std::terminate (SIGABRT)."""
    nodes = [helper.make_node("Unsqueeze", ["x", "ax"], ["u"], name="unsq"),
             helper.make_node("Resize", ["u", "", "sc"], ["y"], name="rs", mode="nearest")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 2, 4, 4)),
                     helper.make_tensor_value_info("ax", TensorProto.INT64, (1,))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def test_an_onnxruntime_crash_is_one_error_line(tmp_path):
    src = tmp_path / "crash.onnx"
    src.write_bytes(_resize_after_unsqueeze().SerializeToString())
    before = tree(tmp_path)
    result = run_module("convert", src, "-o", tmp_path / "out.onnx", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    line = error_line(result.stderr, str(src), "crashed (SIGABRT", "running the original model",
                      "nothing was written")
    assert "terminate called" in line  # onnxruntime's own last words, kept on the one line
    assert tree(tmp_path) == before  # no output, no temp folder, input unchanged

    result = run_module("convert", src, "-o", tmp_path / "out.onnx", "--json", cwd=tmp_path)
    assert result.returncode == 2
    assert json.loads(result.stdout) == {"error": line[len("uprewrite: error: "):], "exit_code": 2,
                                         "file": str(src), "report": None}


def test_crash_in_the_child_removes_its_announced_temp_folders(tmp_path):
    script = tmp_path / "crash_after_temp.py"
    script.write_text(
        "import os, sys, tempfile\n"
        "from onnx_uprewrite import isolate\n"
        "def run():\n"
        f"    isolate.announce('temp', tempfile.mkdtemp(prefix='.uprewrite-', dir={str(tmp_path)!r}))\n"
        "    isolate.announce('model', 'm.onnx')\n"
        "    os.abort()\n"
        "sys.exit(isolate.supervise(run))\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    error_line(result.stderr, "m.onnx: ", "crashed (SIGABRT)")
    assert not list(tmp_path.glob(".uprewrite-*"))


def test_inference_server_answers_fails_and_restarts_after_a_crash():
    model = graph_model([helper.make_node("Relu", ["x"], ["y"])])
    typed = onnx.ModelProto()
    typed.ParseFromString(isolate.infer_shapes(model.SerializeToString()))
    assert typed.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    with pytest.raises(ValueError, match="DecodeError|Error parsing"):
        isolate.infer_shapes(b"\xff not a model")
    with pytest.raises(NativeCrash, match=r"^onnx shape inference crashed \(SIGABRT: .*Assertion"):
        isolate.infer_shapes(_negative_length_slice().SerializeToString())
    assert isolate.infer_shapes(model.SerializeToString())  # a fresh server


def _negative_length_slice():
    """onnx's Slice inference asserts (std::clamp) on a negative length: declared here."""
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("st", [1]), ("en", [-1]), ("ax", [3]))]
    model = graph_model([helper.make_node("Slice", ["x", "st", "en", "ax"], ["y"])], inits=inits)
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = -3
    return model


def test_shape_inference_abort_is_refused_not_fatal():
    """onnx's Slice inference asserts (std::clamp) on a negative length: here a dilated Conv on a
    3x3 input; the convert runs in this very pytest process."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 2, 3, 3)).astype(np.float32), "W"),
             *(numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("st", [1]), ("en", [-1]), ("ax", [3])))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1], dilations=[5, 3]),
             helper.make_node("DepthToSpace", ["c"], ["d"], name="d2s", blocksize=2, mode="CRD"),
             helper.make_node("Slice", ["d", "st", "en", "ax"], ["y"], name="crop")]
    model = graph_model(nodes, inits=inits)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 3
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 3
    with pytest.raises(InvalidModelError, match="onnx shape inference crashed"):
        api.convert(model, to="convtranspose")


@pytest.mark.parametrize("op, blocksize", [("DepthToSpace", 2**32), ("DepthToSpace", 2**40), ("SpaceToDepth", 0)])
def test_blocksize_that_crashes_onnxruntime_is_refused(tmp_path, op, blocksize):
    model = graph_model([helper.make_node(op, ["x"], ["y"], name="b", blocksize=blocksize)])
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    assert_refused(tmp_path, ["convert", src, "-o", tmp_path / "o.onnx"], 2, str(src), f"blocksize={blocksize}")


def test_resize_scales_that_do_not_match_the_rank_are_refused(tmp_path):
    """Rank 5 from --shape, 4 scales: onnxruntime would abort; refused before it runs."""
    nodes = [helper.make_node("Resize", ["x", "", "sc"], ["y"], name="rs", mode="nearest")]
    model = graph_model(nodes, inits=[numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc")])
    model.graph.input[0].type.tensor_type.ClearField("shape")
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    assert_refused(tmp_path, ["convert", src, "-o", tmp_path / "o.onnx", "--shape", "x=1x2x2x2x2"], 2,
                   "'rs'", "4 values for an input of rank 5")


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_non_finite_weights_refuse_the_site(bad):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 2, 4, 4)).astype(np.float32)
    w[1, 0, 2, 3] = bad
    model = graph_model([helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="up", strides=[2, 2],
                                          pads=[1, 1, 1, 1])], inits=[numpy_helper.from_array(w, "W")])
    for d in (2, 3):
        model.graph.input[0].type.tensor_type.shape.dim[d].dim_value = 5
    result = api.convert(model, to="subpixel")
    (site,) = result.report.sites
    assert site.status == "refused" and "1 non-finite values" in site.reason
    assert result.report.verification == "passed"  # nothing rewritten: the model is unchanged


@pytest.mark.parametrize("attr, value", [("strides", [2**20, 2]), ("dilations", [1, 2**40])])
def test_factors_beyond_the_limit_are_refused_quickly(attr, value):
    rng = np.random.default_rng(2)
    attrs = {"strides": [2, 2], "dilations": [1, 1], attr: value}
    model = graph_model([helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="up", **attrs)],
                        inits=[numpy_helper.from_array(rng.standard_normal((2, 2, 3, 3)).astype(np.float32), "W")])
    info = api.inspect(model)  # no onnxruntime run: the limit alone keeps this bounded
    (site,) = info["sites"]
    assert "over 65536, the largest this tool converts" in site["refused"]


def test_an_opset_imported_twice_is_invalid(tmp_path):
    model = graph_model([helper.make_node("Relu", ["x"], ["y"])], opsets=(("", OPSET), ("ai.onnx", 13)))
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    assert_refused(tmp_path, ["convert", src, "-o", tmp_path / "o.onnx"], 2, str(src), "imported more than once")


def test_cli_with_stderr_closed_or_sigchld_ignored_still_works(tmp_path):
    """The supervised CLI runs in-process when fd 2 is closed; an inherited SIG_IGN for SIGCHLD does
    not turn a success into a 'crash'."""
    import os

    src = tmp_path / "m.onnx"
    onnx.save(_ct_model(), src)
    cmd = [sys.executable, "-m", "onnx_uprewrite", "convert", str(src), "-o", str(tmp_path / "a.onnx"), "-q"]
    closed = subprocess.run(cmd, stdout=subprocess.DEVNULL, preexec_fn=lambda: os.close(2), timeout=120, check=False)
    assert closed.returncode == 0 and (tmp_path / "a.onnx").exists()
    cmd[-2] = str(tmp_path / "b.onnx")
    ignored = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                             preexec_fn=lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN))
    assert ignored.returncode == 0, ignored.stderr
    assert (tmp_path / "b.onnx").exists()


def test_announced_paths_survive_any_characters():
    data = b""
    import json as _json

    for kind, value in (("temp", "/tmp/victim\u2028x"), ("model", "a\rb\x85c.onnx"), ("stage", "saving")):
        data += (_json.dumps([kind, value]) + "\n").encode("ascii")
    told = isolate._told(data)
    assert told == {"temp": ["/tmp/victim\u2028x"], "model": ["a\rb\x85c.onnx"], "stage": ["saving"]}


def _ct_model():
    rng = np.random.default_rng(3)
    node = helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="up", strides=[2, 2], pads=[1, 1, 1, 1])
    return graph_model([node], inits=[numpy_helper.from_array(rng.standard_normal((3, 2, 4, 4)).astype(np.float32), "W")])


def test_a_resize_roi_of_2_rank_values_is_not_taken_for_scales():
    """Resize-11+ reads (X, roi, scales, sizes); roi has 2*rank values and must not trip the
    scales-count check that guards onnxruntime's abort."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(np.zeros(8, np.float32), "roi"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc"),
             numpy_helper.from_array(rng.standard_normal((3, 3, 3, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("Resize", ["x", "roi", "sc"], ["u"], name="rs", mode="nearest",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
             helper.make_node("Conv", ["u", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    result = api.convert(graph_model(nodes, inits=inits), to="convtranspose")
    assert result.report.verification == "passed"
    assert [s.status for s in result.report.sites] == ["rewritten"]


def _supervise_script(tmp_path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "supervised.py"
    script.write_text("import os, signal, sys, time\nfrom onnx_uprewrite import isolate\n" + body)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False)


def test_interrupt_that_escapes_the_supervised_run_is_one_line_and_130(tmp_path):
    """A KeyboardInterrupt raised where the command cannot catch it (before its try, or out of an
    except clause) still ends in one line and 130, not a traceback and exit 1."""
    result = _supervise_script(tmp_path, "def run():\n    raise KeyboardInterrupt\nsys.exit(isolate.supervise(run))\n")
    assert result.returncode == 130, result.stderr
    assert result.stderr == "uprewrite: interrupted; no partial output left\n"


def test_signal_pending_when_the_child_starts_is_one_line_and_130(tmp_path):
    """The parent blocks SIGINT across the fork; one that arrives then is forwarded, and the child
    raises it once it has set up, before ``run``: one line, 130."""
    result = _supervise_script(tmp_path, (
        "def run():\n    time.sleep(30)\n"
        "real_fork = os.fork\n"
        "def fork():\n"
        "    pid = real_fork()\n"
        "    if pid:\n"
        "        os.kill(os.getpid(), signal.SIGINT)  # blocked here: forwarded once the parent unblocks\n"
        "    return pid\n"
        "os.fork = fork\n"
        "sys.exit(isolate.supervise(run))\n"))
    assert result.returncode == 130, result.stderr
    assert result.stderr == "uprewrite: interrupted; no partial output left\n"


def test_signal_after_the_child_finished_does_not_change_the_status(tmp_path):
    result = _supervise_script(tmp_path, (
        "status = isolate.supervise(lambda: 3)\n"
        "os.kill(os.getpid(), signal.SIGINT)\nos.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.05)\nsys.exit(status)\n"))
    assert (result.returncode, result.stderr) == (3, "")
