"""The ``uprewrite`` CLI contract (DESIGN.md §5): exit codes, one-line errors, nothing half-written.

Exit codes: 0 written, every selected site rewritten; 1 verification failed, nothing written;
2 usage error / invalid model / verification impossible, nothing written; 3 written and verified,
some sites refused.  Most tests use click's CliRunner in-process; a few run the real entry point
(``python -m onnx_uprewrite``) in a subprocess to check that no traceback reaches stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hostile import assert_clean_exit, assert_refused, error_line, graph_model, invoke, run_module, tree

IR_VERSION, OPSET = 8, 17

# ----------------------------------------------------------------------------- helpers


def run_model(model, feeds):
    """Outputs of ``model`` (ModelProto or path) in onnxruntime CPU."""
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_equivalent(a, b, feeds, atol=1e-4):
    ra, rb = run_model(a, feeds), run_model(b, feeds)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=0, atol=atol)


def x_feed(shape=(1, 3, 5, 6), seed=1):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def op_types(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def two_site_model(dynamic_second: bool = False) -> onnx.ModelProto:
    """``x -> ConvTranspose 'up1' (k4 s2 p1) -> ConvTranspose 'up2' (k3 s2 p1 op1) -> y``.

    With ``dynamic_second`` the weight of 'up2' is the graph input ``W2`` (not constant).
    """
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
    w2 = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "W1")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 6])]
    if dynamic_second:
        inputs.append(helper.make_tensor_value_info("W2", TensorProto.FLOAT, [4, 2, 3, 3]))
    else:
        inits.append(numpy_helper.from_array(w2, "W2"))
    nodes = [
        helper.make_node("ConvTranspose", ["x", "W1"], ["h"], name="up1", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["h", "W2"], ["y"], name="up2", strides=[2, 2], pads=[1, 1, 1, 1],
                         output_padding=[1, 1]),
    ]
    graph = helper.make_graph(nodes, "two", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    return helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)])


# ----------------------------------------------------------------------------- exit 0


def test_convert_default_output_beside_model(tmp_path, model_file):
    src = model_file()
    original = src.read_bytes()
    result = invoke("convert", src)
    assert_clean_exit(result, 0)
    out = tmp_path / "model.subpixel.onnx"
    assert out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.subpixel.onnx"]
    assert src.read_bytes() == original
    assert result.stderr == ""
    assert "1 rewritten to subpixel" in result.stdout and str(out) in result.stdout
    ops = op_types(out)
    assert "ConvTranspose" not in ops
    assert "Conv" in ops and "DepthToSpace" in ops
    saved = onnx.load(str(out))
    assert saved.ir_version == IR_VERSION
    assert [(o.domain, o.version) for o in saved.opset_import] == [("", OPSET)]
    assert_equivalent(src, out, x_feed())


def test_convert_default_output_name_without_onnx_suffix(tmp_path, model_file):
    src = model_file(name="net.bin")
    assert_clean_exit(invoke("convert", src), 0)
    assert (tmp_path / "net.bin.subpixel.onnx").is_file()


def test_convert_explicit_output_and_report(tmp_path, model_file):
    src = model_file()
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    result = invoke("convert", src, "-o", out, "--report", rep)
    assert_clean_exit(result, 0)
    assert out.is_file() and not (tmp_path / "model.subpixel.onnx").exists()
    report = json.loads(rep.read_text())
    assert report["model"] == str(src)
    assert report["target"] == "subpixel"
    assert [(s["node"], s["status"]) for s in report["sites"]] == [("up", "rewritten")]
    assert report["sites"][0]["params"]["strides"] == [2, 2]
    assert report["verified"] is True and report["verification"] == "passed"
    assert report["tolerance"] and "eps" in report["tolerance"]
    assert [o["name"] for o in report["outputs"]] == ["y"]
    assert report["outputs"][0]["ok"] is True
    assert report["outputs"][0]["max_abs_error"] <= report["outputs"][0]["tolerance"]
    assert report["summary"] == {"sites": 1, "rewritten": 1, "refused": 0}
    assert report["written"] == [str(out)]
    assert report["ops_before"] == {"ConvTranspose": 1}
    assert "ConvTranspose" not in report["ops_after"]
    assert report["second_size"] is None and report["outputs_second_size"] == [] and report["notes"] == []


def test_convert_quiet_prints_one_summary_line(tmp_path, model_file):
    result = invoke("convert", model_file(), "-q")
    assert_clean_exit(result, 0)
    assert result.stderr == "" and len(result.stdout.splitlines()) == 1
    assert "1 rewritten to subpixel, 0 refused, verified" in result.stdout
    assert (tmp_path / "model.subpixel.onnx").is_file()


def test_convert_only_restricts_to_that_node(tmp_path, model_file):
    src = model_file(two_site_model())
    rep = tmp_path / "r.json"
    result = invoke("convert", src, "--only", "up2", "--report", rep)
    assert_clean_exit(result, 0)
    out = tmp_path / "model.subpixel.onnx"
    nodes = onnx.load(str(out)).graph.node
    assert [n.name for n in nodes if n.op_type == "ConvTranspose"] == ["up1"]
    report = json.loads(rep.read_text())
    assert [(s["node"], s["status"]) for s in report["sites"]] == [("up2", "rewritten")]
    assert_equivalent(src, out, x_feed())


def test_convert_model_without_sites_is_written_unchanged(tmp_path, model_file):
    src = model_file(graph_model([helper.make_node("Relu", ["x"], ["y"], name="relu")]))
    result = invoke("convert", src)
    assert_clean_exit(result, 0)
    out = tmp_path / "model.subpixel.onnx"
    assert op_types(out) == ["Relu"]
    assert "0 upsampling site(s)" in result.stdout


def test_no_verify_writes_and_report_says_skipped(tmp_path, model_file):
    src = model_file()
    rep = tmp_path / "r.json"
    result = invoke("convert", src, "--no-verify", "--report", rep)
    assert_clean_exit(result, 0)
    assert (tmp_path / "model.subpixel.onnx").is_file()
    report = json.loads(rep.read_text())
    assert report["verified"] is False
    assert "skipped" in report["verification"] and "NOT" in report["verification"]
    assert report["outputs"] == []
    assert "skipped" in result.stdout


def test_shape_and_inputs_options_feed_verification(tmp_path, model_file, ct_model):
    src = model_file(ct_model(input_dims=["N", 3, "H", "W"]))
    npz = tmp_path / "in.npz"
    np.savez(npz, x=x_feed((2, 3, 4, 7))["x"])
    assert_clean_exit(invoke("convert", src, "--shape", "x=1x3x5x6", "-o", tmp_path / "a.onnx"), 0)
    assert_clean_exit(invoke("convert", src, "--inputs", npz, "-o", tmp_path / "b.onnx"), 0)
    assert_equivalent(src, tmp_path / "a.onnx", x_feed((2, 3, 7, 4)))


# ----------------------------------------------------------------------------- exit 3


def test_dynamic_weight_is_refused_with_reason_and_output_written(tmp_path, model_file):
    src = model_file(two_site_model(dynamic_second=True))
    original = src.read_bytes()
    rep = tmp_path / "r.json"
    result = invoke("convert", src, "--report", rep)
    assert_clean_exit(result, 3)
    assert src.read_bytes() == original
    refused = [ln for ln in result.stdout.splitlines() if "refused" in ln and "up2" in ln]
    assert refused, result.stdout
    assert "'up2'" in refused[0] and "not constant" in refused[0] and "W2" in refused[0]
    report = json.loads(rep.read_text())
    by_node = {s["node"]: s for s in report["sites"]}
    assert by_node["up1"]["status"] == "rewritten"
    assert by_node["up2"]["status"] == "refused"
    assert "up2" in by_node["up2"]["reason"] and "not constant" in by_node["up2"]["reason"]
    assert report["verified"] is True
    out = tmp_path / "model.subpixel.onnx"
    nodes = onnx.load(str(out)).graph.node
    assert [n.name for n in nodes if n.op_type == "ConvTranspose"] == ["up2"]
    feeds = {**x_feed(), "W2": np.random.default_rng(5).standard_normal((4, 2, 3, 3)).astype(np.float32)}
    assert_equivalent(src, out, feeds)


def test_only_refused_node_exits_3(tmp_path, model_file):
    src = model_file(two_site_model(dynamic_second=True))
    result = invoke("convert", src, "--only", "up2")
    assert_clean_exit(result, 3)
    assert op_types(tmp_path / "model.subpixel.onnx") == ["ConvTranspose", "ConvTranspose"]


# ----------------------------------------------------------------------------- exit 1


@pytest.fixture
def corrupt_emitter(monkeypatch):
    """Make the sub-pixel emitter write one wrong weight (off by 1e-2)."""
    from onnx_uprewrite.passes import to_subpixel

    real = to_subpixel.subpixel_weight

    def wrong(*args, **kwargs):
        v = np.array(real(*args, **kwargs), copy=True)
        v.flat[0] += 1e-2
        return v

    monkeypatch.setattr(to_subpixel, "subpixel_weight", wrong)


def test_verification_failure_exits_1_and_writes_nothing(tmp_path, model_file, corrupt_emitter):
    src = model_file()
    before = tree(tmp_path)
    result = invoke("convert", src)
    assert_clean_exit(result, 1)
    error_line(result.stderr, str(src), "failed per site", "site 'up' (convtranspose -> subpixel)",
                      "max abs error", "x its tolerance", "whole model failed", "output 'y'", "nothing written",
                      single=False)
    assert tree(tmp_path) == before


def test_verification_failure_still_writes_requested_report(tmp_path, model_file, corrupt_emitter):
    src = model_file()
    rep = tmp_path / "r.json"
    out = tmp_path / "out.onnx"
    result = invoke("convert", src, "-o", out, "--report", rep)
    assert_clean_exit(result, 1)
    assert not out.exists() and not (tmp_path / "model.subpixel.onnx").exists()
    report = json.loads(rep.read_text())
    assert report["verified"] is False
    assert report["verification"].startswith("failed")
    assert report["outputs"][0]["ok"] is False
    assert report["written"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "r.json"]


def test_no_verify_skips_the_check_that_would_fail(tmp_path, model_file, corrupt_emitter):
    result = invoke("convert", model_file(), "--no-verify")
    assert_clean_exit(result, 0)
    assert (tmp_path / "model.subpixel.onnx").is_file()


# ----------------------------------------------------------------------------- exit 2: usage errors


def test_unknown_only_name_exits_2(tmp_path, model_file):
    src = model_file()
    assert_refused(tmp_path, ["convert", src, "--only", "nope"], 2, "--only", "'nope'", "up")


def test_symbolic_input_dims_no_chosen_size_runs_exits_2(tmp_path, model_file, ct_model):
    """A symbolic channel dim: no tried size fits the weights; the message names the input, the dims and
    the sizes tried (a symbolic batch alone is chosen and converts: test_shape_choice.py)."""
    src = model_file(ct_model(input_dims=["N", "C", 5, 6]))
    assert_refused(tmp_path, ["convert", src], 2, "input 'x'", "dims 0 ('N'), 1 ('C')", "x=1x64x5x6",
                   "--shape x=")


@pytest.mark.parametrize("value", ["1x3x5x6", "x=", "x=1xAx5x6", "x=1x-3x5x6", "=1x3"])
def test_bad_shape_syntax_exits_2(tmp_path, model_file, value):
    src = model_file()
    assert_refused(tmp_path, ["convert", src, "--shape", value], 2, "--shape", repr(value))


def test_shape_for_unknown_input_exits_2(tmp_path, model_file):
    src = model_file()
    assert_refused(tmp_path, ["convert", src, "--shape", "foo=1x3x5x6"], 2, "'foo'", "inputs: x")


def test_shape_disagreeing_with_declared_dims_exits_2(tmp_path, model_file):
    src = model_file()
    assert_refused(tmp_path, ["convert", src, "--shape", "x=1x3x9x6"], 2, "'x'", "dimension 2")


def test_unreadable_inputs_file_exits_2(tmp_path, model_file):
    src = model_file()
    npz = tmp_path / "in.npz"
    npz.write_bytes(b"not a zip archive")
    assert_refused(tmp_path, ["convert", src, "--inputs", npz], 2, "--inputs", str(npz))
    missing = tmp_path / "missing.npz"
    assert_refused(tmp_path, ["convert", src, "--inputs", missing], 2, "--inputs", str(missing))


def test_inputs_with_wrong_dtype_exits_2(tmp_path, model_file):
    src = model_file()
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.zeros((1, 3, 5, 6), np.float64))
    assert_refused(tmp_path, ["convert", src, "--inputs", npz], 2, "'x'", "float64")


def test_unknown_target_form_is_a_click_usage_error(tmp_path, model_file):
    src = model_file()
    before = tree(tmp_path)
    result = invoke("convert", src, "--to", "bogus")
    assert result.exit_code == 2
    assert "Traceback" not in result.output and "bogus" in result.stderr
    assert tree(tmp_path) == before


@pytest.mark.parametrize("case", ["symbolic_dim", "unknown_shape_name", "ort_cannot_run"])
def test_input_and_runtime_errors_name_the_model(tmp_path, model_file, case, ct_model):
    if case == "symbolic_dim":
        src, extra = model_file(ct_model(input_dims=["N", "C", 5, 6])), []
    elif case == "unknown_shape_name":
        src, extra = model_file(), ["--shape", "foo=1x3x5x6"]
    else:
        m = ct_model()
        m.graph.node[0].output[0] = "h"
        m.graph.node.append(helper.make_node("Frobnicate", ["h"], ["y"], name="custom", domain="com.example"))
        m.opset_import.append(helper.make_opsetid("com.example", 1))
        src, extra = model_file(m), []
    assert_refused(tmp_path, ["convert", src, *extra], 2, str(src))


# ----------------------------------------------------------------------------- inspect / verify


def test_inspect_json_lists_sites_and_refusals(tmp_path, model_file):
    src = model_file(two_site_model(dynamic_second=True))
    result = invoke("inspect", src, "--json")
    assert_clean_exit(result, 0)
    info = json.loads(result.stdout)
    by_node = {s["node"]: s for s in info["sites"]}
    assert by_node["up1"]["refused"] is None and "subpixel" in by_node["up1"]["exact_forms"]
    assert by_node["up1"]["params"]["kernel"] == [4, 4]
    assert "not constant" in by_node["up2"]["refused"]
    text = invoke("inspect", src)
    assert_clean_exit(text, 0)
    assert "  up1 " in text.stdout and "convtranspose" in text.stdout and "refused" in text.stdout
    assert by_node["up1"]["checkerboard"]["risk"] is False and by_node["up1"]["weights"]["subpixel"] == 3 * 4 * 2 * 2 * 4
    assert by_node["up1"]["output_lengths"] == [10, 12]


def test_verify_equivalent_models_exit_0_and_different_exit_1(tmp_path, model_file, ct_model):
    a = model_file(name="a.onnx")
    assert_clean_exit(invoke("convert", a), 0)
    converted = tmp_path / "a.subpixel.onnx"
    same = invoke("verify", a, converted)
    assert_clean_exit(same, 0)
    assert "output 'y'" in same.stdout and ": ok" in same.stdout
    b = model_file(ct_model(seed=7), name="b.onnx")
    diff = invoke("verify", a, b)
    assert_clean_exit(diff, 1)
    assert "DIFFERENT" in diff.stdout


# ----------------------------------------------------------------------------- the real entry point


def test_module_help(tmp_path):
    proc = run_module("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for cmd in ("convert", "inspect", "verify"):
        assert cmd in proc.stdout
    assert "Traceback" not in proc.stderr
    sub = run_module("convert", "--help", cwd=tmp_path)
    assert sub.returncode == 0 and "--only" in sub.stdout and "--no-verify" in sub.stdout


def test_module_convert_then_verify(tmp_path, model_file, ct_model):
    model_file()
    proc = run_module("convert", "model.onnx", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "model.subpixel.onnx").is_file()
    ok = run_module("verify", "model.onnx", "model.subpixel.onnx", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    model_file(ct_model(seed=9), name="other.onnx")
    bad = run_module("verify", "model.onnx", "other.onnx", cwd=tmp_path)
    assert bad.returncode == 1 and "DIFFERENT" in bad.stdout
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("case", [
    ("garbage", lambda tmp: [tmp / "model.onnx"], 2, "model.onnx"),
    ("missing_arg", lambda tmp: [], 2, "MODEL"),
    ("dynamic_weight", lambda tmp: [tmp / "model.onnx"], 3, None),
    ("symbolic", lambda tmp: [tmp / "model.onnx"], 2, "'N'"),
], ids=lambda c: c[0])
def test_module_errors_have_no_traceback(tmp_path, case, ct_model):
    name, args, code, needle = case
    model = {
        "garbage": None,
        "missing_arg": ct_model(),
        "dynamic_weight": two_site_model(dynamic_second=True),
        "symbolic": ct_model(input_dims=["N", "C", 5, 6]),
    }[name]
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x00\xff garbage" * 10 if model is None else model.SerializeToString())
    original = path.read_bytes()
    proc = run_module("convert", *args(tmp_path), cwd=tmp_path)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert path.read_bytes() == original
    if code == 2:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        if name != "missing_arg":  # click's own usage message has several lines
            assert len(lines) == 1 and lines[0].startswith("uprewrite: error: "), proc.stderr
        assert needle in proc.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    else:
        assert (tmp_path / "model.subpixel.onnx").is_file()


# ----------------------------------------------------------------------------- regressions of bugs found by these tests


@pytest.mark.parametrize("how", ["shape", "inputs"])
def test_zero_size_verification_input_does_not_verify(tmp_path, model_file, ct_model, corrupt_emitter, how):
    src = model_file(ct_model(input_dims=["N", 3, "H", "W"]))
    if how == "shape":
        extra = ["--shape", "x=0x3x5x6"]
    else:
        npz = tmp_path / "in.npz"
        np.savez(npz, x=np.zeros((0, 3, 5, 6), np.float32))
        extra = ["--inputs", npz]
    before = tree(tmp_path)
    result = invoke("convert", src, *extra)
    assert result.exit_code in (1, 2), result.output  # anything but "written and verified"
    assert tree(tmp_path) == before


def test_module_runtime_failure_prints_one_line(tmp_path, ct_model):
    path = tmp_path / "model.onnx"
    path.write_bytes(ct_model(input_dims=["N", 3, "H", "W"]).SerializeToString())
    proc = run_module("convert", "model.onnx", "--shape", "x=1x3x0x6", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("uprewrite: error: "), proc.stderr


def test_from_restricts_rewriting_to_source_forms(tmp_path):
    src = Path(__file__).resolve().parent.parent / "models" / "exported" / "torch_upsample_nearest_conv_op17.onnx"
    out = tmp_path / "o.onnx"
    assert_clean_exit(invoke("convert", src, "-o", out, "--from", "convtranspose", "--report", tmp_path / "r.json"), 0)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["sites"] == [] and report["ops_after"] == report["ops_before"]
    assert_clean_exit(invoke("convert", src, "-o", out, "--from", "resize", "--report", tmp_path / "r.json"), 0)
    assert [s["status"] for s in json.loads((tmp_path / "r.json").read_text())["sites"]] == ["rewritten"]


def test_inspect_lists_exact_forms_with_what_they_would_be(model_file):
    result = invoke("inspect", model_file(), "--json")
    assert_clean_exit(result, 0)
    (site,) = json.loads(result.output)["sites"]
    assert site["exact_forms"] == ["convtranspose", "resize", "subpixel"]
    assert "masked" in site["forms"]["resize"] and "DepthToSpace" in site["forms"]["subpixel"]
    text = invoke("inspect", model_file()).output
    assert "resize masked" in text and "up -> subpixel: Conv 2x2" in text


def test_report_of_a_dynamic_model_has_the_second_size(tmp_path):
    src = Path(__file__).resolve().parent.parent / "models" / "exported" / "torch_dynamic_hw_op17.onnx"
    rep = tmp_path / "r.json"
    result = invoke("convert", src, "-o", tmp_path / "o.onnx", "--shape", "input=1x8x6x6", "--report", rep)
    assert result.exit_code == 0, result.output
    report = json.loads(rep.read_text())
    assert report["second_size"] == {"input": [2, 8, 12, 12]}
    assert [o["name"] for o in report["outputs_second_size"]] == ["output"]
    assert all(o["ok"] for o in report["outputs_second_size"])
    assert report["verification"] == "passed"


@pytest.mark.parametrize("kernel, stride, dilation, risk, taps", [
    (4, 2, 1, False, [2, 2]), (3, 2, 1, True, [2, 1]), (9, 3, 1, False, [3, 3, 3]), (2, 2, 2, True, [2, 0]),
    (3, 1, 1, False, [3]), (5, 4, 1, True, [2, 1, 1, 1]),
])
def test_inspect_checkerboard_risk_is_uneven_taps_per_phase(model_file, ct_model, kernel, stride, dilation, risk, taps):
    src = model_file(ct_model(kernel=(kernel, 4), strides=[stride, 2], dilations=[dilation, 1], pads=[0, 0, 0, 0]))
    (site,) = json.loads(invoke("inspect", src, "--json").output)["sites"]
    assert site["checkerboard"]["risk"] is risk and site["checkerboard"]["taps_per_phase"][0] == taps
    assert site["checkerboard"]["axes"] == ([0] if risk else [])


def test_verify_json(tmp_path, model_file, ct_model):
    a = model_file()
    b = tmp_path / "b.onnx"
    assert invoke("convert", a, "-o", b).exit_code == 0
    result = invoke("verify", a, b, "--json")
    assert_clean_exit(result, 0)
    info = json.loads(result.stdout)
    assert info["equivalent"] is True and info["outputs"][0]["name"] == "y" and info["outputs"][0]["ok"]
    other = model_file(ct_model(seed=9), name="other.onnx")
    result = invoke("verify", a, other, "--json")
    assert_clean_exit(result, 1)
    assert json.loads(result.stdout)["equivalent"] is False


def test_progress_line_only_on_a_terminal_and_cleared():
    import io

    from onnx_uprewrite import api
    from onnx_uprewrite.cli import ProgressLine

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    line = ProgressLine(stream)
    seen = []
    api.convert(two_site_model(), progress=lambda *a: (seen.append(a), line(*a)))
    line.clear()
    stages = [s for s, _, _ in seen]
    assert stages[0] == "running the original model" and "verifying sites" in stages and \
        stages[-1] == "verifying the whole model"
    assert "verifying sites 2/2" in stream.getvalue() and stream.getvalue().endswith("\r")
    assert ProgressLine.for_stderr() is None or sys.stderr.isatty()  # pytest's stderr is not a terminal


def test_no_verify_ignores_a_wrong_declared_output_shape(tmp_path):
    """Without a reference run the shapes come from onnx shape inference, which must not take the
    shape a graph output declares (onnxruntime only warns when it is wrong)."""
    import onnx_uprewrite as up

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Relu", ["x"], ["t"], name="relu"),
             helper.make_node("ConvTranspose", ["t", "W"], ["y"], name="ct", strides=[2, 2], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 2, 5, 5])],  # wrong
                              [numpy_helper.from_array(rng.standard_normal((2, 3, 4, 4)).astype(np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for mode in ("transpose", "auto"):
        result = up.convert(model, to="subpixel", d2s_mode=mode, verify=False)
        x = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
        sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                    for m in (model, result.model)]
        want, got = (s.run(["y"], {"x": x})[0] for s in sessions)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_no_verify_still_refuses_a_shape_that_disagrees_with_the_model(tmp_path):
    result = invoke("convert", Path(__file__).resolve().parent.parent / "models" / "dcgan_stack.onnx",
                    "-o", tmp_path / "o.onnx", "--no-verify", "--shape", "x=1x2x8x8")
    assert result.exit_code == 2 and "dimension 1 is 2, the model declares 64" in result.output
    assert not (tmp_path / "o.onnx").exists()


def test_api_names_survive_the_lazy_import():
    """``up.verify`` stays the function after convert() has imported the ``verify`` submodule."""
    import onnx_uprewrite as up

    up.convert(str(Path(__file__).resolve().parent.parent / "models" / "fsrcnn_k9s3.onnx"), verify=False)
    assert callable(up.verify) and up.verify.__module__ == "onnx_uprewrite.api"


@pytest.mark.parametrize("flags, needle", [(["--atol", "-1"], "--atol -1.0: expected a finite number >= 0"),
                                           (["--rtol", "nan"], "--rtol nan"),
                                           (["--provider", "NoSuchExecutionProvider"], "not available")])
def test_bad_numbers_and_providers_are_usage_errors(tmp_path, flags, needle):
    result = invoke("convert", Path(__file__).resolve().parent.parent / "models" / "fsrcnn_k9s3.onnx",
                    "-o", tmp_path / "o.onnx", *flags)
    assert result.exit_code == 2 and needle in result.output and not (tmp_path / "o.onnx").exists()


def test_quiet_still_prints_the_reason_of_each_refused_site(tmp_path):
    result = invoke("convert", Path(__file__).resolve().parent.parent / "models" / "fsrcnn_k9s3.onnx",
                    "-o", tmp_path / "o.onnx", "--profile", "tidl", "-q")
    assert result.exit_code == 3
    assert "uprewrite: refused: convtranspose 'deconv': no exact form that tidl runs" in result.output


# ----------------------------------------------------------------------------- machine output (--json)


def _schema_tables() -> dict[str, dict[str, str]]:
    """README's "Report schema" tables, in order: the report, a site, an output, the error object;
    each {field: type}."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("\n### Report schema\n", 1)[1].split("\n## ", 1)[0]
    tables, rows = [], None
    for line in section.splitlines():
        if line.startswith("| field |"):
            rows = {}
            tables.append(rows)
        elif line.startswith("| `") and rows is not None:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1]
    assert len(tables) == 4, "README 'Report schema': expected the report, site, output and error tables"
    return dict(zip(["report", "site", "output", "error"], tables))


def _conforms(value, types: str, tables, where: str) -> None:
    """``value`` has one of ``types`` ("string or null", "array of site", ...), recursively."""
    failures = []
    for t in types.split(" or "):
        try:
            if _is_type(value, t.strip(), tables, where):
                return
        except AssertionError as exc:
            failures.append(str(exc))
    raise AssertionError(f"{where}: {value!r:.200} is not {types}" + "".join(f"; {f}" for f in failures))


def _is_type(value, t: str, tables, where: str) -> bool:
    if t == "null":
        return value is None
    if t in ("integer", "number"):
        kinds = int if t == "integer" else (int, float)
        return isinstance(value, kinds) and not isinstance(value, bool)
    if t in ("string", "boolean", "object"):
        return isinstance(value, {"string": str, "boolean": bool, "object": dict}[t])
    if t.startswith("array of "):
        if not isinstance(value, list):
            return False
        for i, item in enumerate(value):
            _conforms(item, t[len("array of "):], tables, f"{where}[{i}]")
        return True
    assert t in tables, f"README 'Report schema': unknown type {t!r}"
    _conforms_to_table(value, tables[t], tables, where)
    return True


def _conforms_to_table(value, table: dict[str, str], tables, where: str) -> None:
    assert isinstance(value, dict), f"{where}: not an object"
    undocumented, missing = set(value) - set(table), set(table) - set(value)
    assert not undocumented, f"{where}: fields {sorted(undocumented)} are not in README 'Report schema'"
    assert not missing, f"{where}: documented fields {sorted(missing)} are missing"
    for key, types in table.items():
        _conforms(value[key], types, tables, f"{where}.{key}")


def test_convert_json_validates_against_the_documented_schema(tmp_path, model_file):
    """Two runs fill every kind of field: --to fastest with a refused site (timings_ms, reasons,
    exit 3), and symbolic dims (chosen_shapes, second_size)."""
    tables = _schema_tables()
    result = invoke("convert", model_file(two_site_model(dynamic_second=True)), "-o", tmp_path / "a.onnx",
                    "--to", "fastest", "--json")
    assert_clean_exit(result, 3)
    report = json.loads(result.stdout)  # the whole of stdout: nothing else is printed there
    _conforms_to_table(report, tables["report"], tables, "report")
    assert report["schema_version"] == 1
    assert [s["status"] for s in report["sites"]] in (["rewritten", "refused"], ["skipped", "refused"])
    assert isinstance(report["sites"][0]["timings_ms"], dict)
    error_line(result.stderr.replace("uprewrite: refused: ", "uprewrite: error: "), "up2")  # -q's line, alone

    src = Path(__file__).resolve().parent.parent / "models" / "exported" / "torch_dynamic_hw_op17.onnx"
    result = invoke("convert", src, "-o", tmp_path / "b.onnx", "--json")
    assert_clean_exit(result, 0)
    report = json.loads(result.stdout)
    _conforms_to_table(report, tables["report"], tables, "report")
    assert report["chosen_shapes"] and report["second_size"] and report["outputs_second_size"]
    assert result.stderr == ""


def test_report_dash_is_stdout_and_writes_no_file(tmp_path, model_file):
    src = model_file()
    result = invoke("convert", src, "-o", tmp_path / "out.onnx", "--report", "-")
    assert_clean_exit(result, 0)
    assert json.loads(result.stdout)["summary"] == {"sites": 1, "rewritten": 1, "refused": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "out.onnx"]


def _assert_json_error(result, code: int, file, *needles: str) -> dict:
    """stdout is exactly the documented error object; stderr still its one line."""
    tables = _schema_tables()
    assert_clean_exit(result, code)
    obj = json.loads(result.stdout)
    _conforms_to_table(obj, tables["error"], tables, "error")
    assert obj["exit_code"] == code and obj["file"] == (None if file is None else str(file))
    line = error_line(result.stderr, *needles, single=code != 1)
    assert line == f"uprewrite: error: {obj['error']}"
    return obj


def test_json_failure_of_each_command_prints_the_error_object(tmp_path, model_file):
    src, missing = model_file(), tmp_path / "nope.onnx"
    _assert_json_error(invoke("convert", missing, "--json"), 2, missing, "nope.onnx")
    _assert_json_error(invoke("convert", src, "-o", tmp_path / "no" / "o.onnx", "--json"), 2, tmp_path / "no" / "o.onnx")
    _assert_json_error(invoke("inspect", missing, "--json"), 2, missing)
    _assert_json_error(invoke("verify", src, missing, "--json"), 2, missing)
    _assert_json_error(invoke("check", src, "--profile", "nosuch", "--json"), 2, "nosuch", "--profile nosuch")
    assert invoke("convert", missing).stdout == ""  # without --json, nothing on stdout


def test_json_verification_failure_carries_the_report(tmp_path, model_file, corrupt_emitter):
    tables = _schema_tables()
    obj = _assert_json_error(invoke("convert", model_file(), "--json"), 1, tmp_path / "model.onnx", "failed per site")
    _conforms_to_table(obj["report"], tables["report"], tables, "report")
    assert obj["report"]["verified"] is False and obj["report"]["written"] == []


def test_json_click_usage_error_in_the_real_entry_point(tmp_path, model_file):
    src = model_file()
    result = run_module("convert", src, "--to", "bogus", "--json", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    obj = json.loads(result.stdout)
    assert obj["exit_code"] == 2 and "bogus" in obj["error"] and obj["file"] is None


# ----------------------------------------------------------------------------- --help


def test_every_option_has_help_and_every_command_examples_and_exit_codes():
    import click
    from onnx_uprewrite.cli import cli

    for name, command in cli.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help and param.help.strip(), f"{name} {param.opts[0]} has no help"
        result = invoke(name, "--help")
        assert_clean_exit(result, 0)
        epilog = result.stdout.split("Examples:", 1)[1]
        examples, codes = epilog.split("Exit codes:")
        assert len([ln for ln in examples.splitlines() if ln.strip().startswith(f"uprewrite {name} ")]) == 2, name
        assert {"0", "2", "130/143"} <= {ln.split()[0] for ln in codes.splitlines() if ln.strip()}, name
    inspect_help = " ".join(invoke("inspect", "--help").stdout.split())
    assert "measures site shapes" in inspect_help and "half of physical memory" in inspect_help
    assert "verification" not in inspect_help.split("--memory-budget")[1].split("--debug")[0]
    assert "nothing written" not in " ".join(invoke("verify", "--help").stdout.split())


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version_flag(flag):
    from onnx_uprewrite import __version__

    result = invoke(flag)
    assert_clean_exit(result, 0)
    assert __version__ in result.stdout


def test_profile_names_in_any_case_and_their_completion(tmp_path, model_file):
    from click.testing import CliRunner
    from onnx_uprewrite.cli import cli

    src = model_file()
    result = invoke("check", src, "--profile", "TIDL")
    assert result.exit_code in (0, 1), result.output
    assert "tidl" in result.stdout.lower()
    assert_clean_exit(invoke("convert", src, "--profile", "Ethos-U", "-q"), 0)
    assert (tmp_path / "model.ethos-u.onnx").is_file()
    env = {"_UPREWRITE_COMPLETE": "bash_complete", "COMP_WORDS": "uprewrite check m --profile E", "COMP_CWORD": "4"}
    completed = CliRunner().invoke(cli, [], prog_name="uprewrite", env=env)
    assert completed.stdout.splitlines() == ["plain,ethos-u", "plain,ethos-u55", "plain,ethos-u85", "file,E"]  # names, then files
