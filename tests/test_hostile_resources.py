"""Hostile input, resource guards: a verification that would not fit is refused before it runs.

Memory is estimated from shapes alone (``budget.check_memory``) before any input is allocated or
onnxruntime starts; a form whose weights would not fit is refused per site (``weights_over_budget``);
``--time-budget`` stops onnxruntime runs (its terminate flag).  All exit 2 with one line that names
the tensor or node and the budget; nothing is written and the input is unchanged.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from pathlib import Path

from hostile import assert_clean_exit, assert_refused, invoke
from onnx_uprewrite import api
from onnx_uprewrite.budget import check_memory, parse_size
from onnx_uprewrite.errors import ResourceLimit


def test_absurd_output_shape_is_refused_before_anything_runs(tmp_path, model_file, ct_model):
    src = model_file(ct_model(output_shape=[100000, 100000]))  # 149 GiB of float32 output
    assert_refused(tmp_path, ["convert", src], 2, str(src), "ConvTranspose 'up'", "[1, 4, 100000, 100000]",
                   "memory budget")


def test_absurd_strides_are_refused_before_anything_runs(tmp_path, model_file, ct_model):
    src = model_file(ct_model(strides=[1 << 20, 1 << 20]))
    assert_refused(tmp_path, ["convert", src], 2, str(src), "memory budget")


def test_huge_shape_option_is_refused_before_inputs_are_allocated(tmp_path, model_file, ct_model):
    src = model_file(ct_model(input_dims=["N", 3, "H", "W"]))
    assert_refused(tmp_path, ["convert", src, "--shape", "x=1x3x100000x100000"], 2, "x=1x3x100000x100000",
                   "memory budget")


def test_explicit_memory_budget_is_applied_to_the_whole_model(tmp_path, model_file):
    src = model_file()
    assert_refused(tmp_path, ["convert", src, "--memory-budget", "1K"], 2, "1.0 KiB", "--memory-budget")
    assert_refused(tmp_path, ["verify", src, src, "--memory-budget", "1K"], 2, "1.0 KiB")


@pytest.mark.parametrize("value", ["lots", "-5", "0", "1.5X"])
def test_bad_memory_budget_is_a_usage_error(tmp_path, model_file, value):
    src = model_file()
    assert_refused(tmp_path, ["convert", src, "--memory-budget", value], 2, "--memory-budget", repr(value))


def test_form_whose_weights_exceed_the_budget_is_refused_per_site(tmp_path, model_file, ct_model):
    """Stride 16 with a 4x4 kernel: the sub-pixel form needs 16*256*16 weights (1.5 MiB to compute),
    the original run needs far less; the site is refused with that reason, nothing else fails."""
    src = model_file(ct_model(cin=16, cout=16, spatial=(2, 2), strides=[16, 16], pads=[0, 0, 0, 0]))
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    result = invoke("convert", src, "-o", out, "--report", rep, "--memory-budget", "1M")
    assert_clean_exit(result, 3)
    site = json.loads(rep.read_text())["sites"][0]
    assert site["status"] == "refused" and "weight elements" in site["reason"] and "memory budget" in site["reason"]
    info = api.inspect(src, memory_budget=1 << 20)
    assert "subpixel" not in info["sites"][0]["exact_forms"] and "convtranspose" in info["sites"][0]["exact_forms"]


def test_time_budget_stops_verification(tmp_path, model_file, ct_model):
    src = model_file(ct_model(cin=32, cout=32, spatial=(128, 128)))
    assert_refused(tmp_path, ["convert", src, "--time-budget", "0"], 2, str(src), "time budget of 0 s")
    assert_refused(tmp_path, ["verify", src, src, "--time-budget", "0"], 2, "time budget")
    result = invoke("convert", src, "-o", tmp_path / "ok.onnx", "--time-budget", "600")
    assert_clean_exit(result, 0)


def test_time_budget_cancels_a_run_in_progress(ct_model):
    """A chain of 40 ConvTranspose/Conv pairs runs well past 50 ms; the terminate flag stops it between nodes."""
    from onnx import helper, numpy_helper

    from onnx_uprewrite.budget import time_budget
    from onnx_uprewrite.verify import run_original

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(40):
        inits += [numpy_helper.from_array(rng.standard_normal((16, 16, 4, 4)).astype(np.float32) * 0.05, f"Wt{i}"),
                  numpy_helper.from_array(rng.standard_normal((16, 16, 2, 2)).astype(np.float32) * 0.05, f"Wc{i}")]
        nodes += [helper.make_node("ConvTranspose", [x, f"Wt{i}"], [f"u{i}"], strides=[2, 2], pads=[1, 1, 1, 1]),
                  helper.make_node("Conv", [f"u{i}", f"Wc{i}"], [f"d{i}"], strides=[2, 2])]
        x = f"d{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", 1, [1, 16, 256, 256])],
                              [helper.make_tensor_value_info(x, 1, None)], initializer=inits)
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": rng.standard_normal((1, 16, 256, 256)).astype(np.float32)}
    with pytest.raises(ResourceLimit, match="time budget of 0.05 s"):
        with time_budget(0.05):
            run_original(model, feeds)


def test_memory_estimate_is_a_floor_of_what_the_run_holds(ct_model):
    m = ct_model(cin=8, cout=8, spatial=(64, 64))
    weights, out = 8 * 8 * 16 * 4 + 8 * 4, 8 * 128 * 128 * 4
    check_memory(m, {"x": (1, 8, 64, 64)}, set(), 2 * weights + 8 * 64 * 64 * 4 + out + 8 * 64 * 64 * 4, "run")
    with pytest.raises(ResourceLimit, match="ConvTranspose 'up' alone needs"):
        check_memory(m, {"x": (1, 8, 64, 64)}, set(), out, "run")


@pytest.mark.parametrize("text, value", [("512", 512), ("4K", 4096), ("2M", 2 << 20), ("1.5G", 3 << 29),
                                         ("3GiB", 3 << 30), ("1t", 1 << 40)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_running_out_of_memory_anywhere_is_a_resource_limit(tmp_path, monkeypatch):
    """numpy's MemoryError (e.g. the float64 copies of a comparison) and onnxruntime's bad_alloc are
    ResourceLimit (exit 2) naming the model, never an internal error."""
    import importlib

    import onnx_uprewrite as up

    verify = importlib.import_module("onnx_uprewrite.verify")  # the module: up.verify is the function
    src = tmp_path / "m.onnx"
    src.write_bytes((Path(__file__).resolve().parent.parent / "models" / "dcgan_stack.onnx").read_bytes())

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 6.25 GiB")

    with monkeypatch.context() as m:
        m.setattr(api, "compare", no_memory)
        with pytest.raises(up.ResourceLimit, match=r"m\.onnx: out of memory"):
            up.convert(str(src))

    def bad_alloc(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : std::bad_alloc")

    with monkeypatch.context() as m:
        m.setattr(verify, "_session", bad_alloc)
        with pytest.raises(up.ResourceLimit, match="onnxruntime out of memory"):
            up.convert(str(src))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
