"""Hostile input, operators onnxruntime cannot run (custom domains, unknown functions).

Verification is then impossible: exit 2, one line saying so and suggesting ``--no-verify``, nothing
written.  With ``--no-verify`` the rewrite still happens (weights and shapes come from the model,
not from a run) and the report says the model was NOT checked (``verified: false``).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from hostile import assert_clean_exit, assert_refused, invoke


def _with_custom_op(ct_model, domain="com.example", op="Frobnicate"):
    m = ct_model()
    m.graph.node[0].output[0] = "h"
    m.graph.node.append(helper.make_node(op, ["h"], ["y"], name="custom", domain=domain))
    m.opset_import.append(helper.make_opsetid(domain, 1))
    return m


@pytest.mark.parametrize("domain, op", [("com.example", "Frobnicate"), ("local", "UndefinedFunction"),
                                        ("com.microsoft", "NoSuchContribOp")])
def test_op_onnxruntime_cannot_run_exits_2_and_suggests_no_verify(tmp_path, model_file, ct_model, domain, op):
    src = model_file(_with_custom_op(ct_model, domain, op))
    assert_refused(tmp_path, ["convert", src], 2, str(src), "onnxruntime cannot run", op, "--no-verify")
    assert_refused(tmp_path, ["verify", src, src], 2, "onnxruntime cannot run")


@pytest.mark.parametrize("to", ["subpixel", "resize"])
def test_no_verify_rewrites_and_marks_the_report_unverified(tmp_path, model_file, ct_model, to):
    model = _with_custom_op(ct_model)
    src = model_file(model)
    before = src.read_bytes()
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    result = invoke("convert", src, "-o", out, "--to", to, "--no-verify", "--report", rep)
    assert_clean_exit(result, 0)
    assert src.read_bytes() == before
    report = json.loads(rep.read_text())
    assert report["verified"] is False and "NOT checked" in report["verification"]
    assert "NOT checked" in result.stdout
    assert [s["status"] for s in report["sites"]] == ["rewritten"]
    saved = onnx.load(str(out))
    assert "ConvTranspose" not in [n.op_type for n in saved.graph.node]
    assert [n.op_type for n in saved.graph.node][-1] == "Frobnicate"
    # the rewritten part, cut before the custom op, matches the original's
    for m in (model, saved):
        m.graph.output[0].name = "h"
        del m.graph.node[-1]
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 5, 6)).astype(np.float32)}
    a, b = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            for m in (model, saved))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_model_local_function_is_run_by_onnxruntime(tmp_path, model_file, ct_model):
    """A custom-domain op defined as a model-local function is runnable: verification happens."""
    m = _with_custom_op(ct_model, "local", "Twice")
    m.functions.append(helper.make_function("local", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                                            [helper.make_opsetid("", 17)]))
    src = model_file(m)
    result = invoke("convert", src, "-o", tmp_path / "out.onnx")
    assert_clean_exit(result, 0)
    assert "verified   1 output(s): worst output 'y'" in result.stdout


def test_fastest_on_an_unrunnable_model_says_why_no_verify_does_not_help(tmp_path, model_file, ct_model):
    src = model_file(_with_custom_op(ct_model))
    _, line = assert_refused(tmp_path, ["convert", src, "--to", "fastest", "--no-verify"], 2, str(src),
                             "--to fastest times the forms in onnxruntime, which cannot run this model")
    assert "use --no-verify" not in line


def test_to_and_profile_exclude_each_other(tmp_path, model_file, ct_model):
    src = model_file(ct_model())
    assert_refused(tmp_path, ["convert", src, "--to", "resize", "--profile", "tidl"], 2, "exclude each other")
