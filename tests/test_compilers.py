"""``uprewrite check --compiler``: the compiler's own report read back onto the ONNX nodes.

The compilers are never installed by the project or CI: the parsing of their reports runs on
reports recorded from real builds (tests/data), and the end-to-end checks run where a compiler is
installed in its own venv (benchmarks/compilers/README.md) and are skipped elsewhere."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import onnx
import pytest

from hostile import assert_clean_exit, error_line, invoke
from onnx_uprewrite import api, compilers
from onnx_uprewrite.compilers import COMPILERS, Layer, find_python, parse_spec
from onnx_uprewrite.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).with_name("data")
FSRCNN = ROOT / "models" / "fsrcnn_k9s3.onnx"


def _runner(name: str):
    if str(compilers.RUNNERS) not in sys.path:  # as when run as a script: its folder first on the path
        sys.path.insert(0, str(compilers.RUNNERS))
    spec = importlib.util.spec_from_file_location(f"{name}_runner", compilers.RUNNERS / f"{name}_runner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- naming a compiler


@pytest.mark.parametrize("spec, name, target", [
    ("rknn", "rknn", "rk3588"), ("RKNN:RK3576", "rknn", "rk3576"), ("rknn:rv1106", "rknn", "rv1106"),
    ("vela", "vela", "ethos-u55-128"), ("vela:ethos-u85-256", "vela", "ethos-u85-256"),
    ("openvino", "openvino", "CPU"), ("openvino:cpu", "openvino", "CPU")])
def test_parse_spec(spec, name, target):
    compiler, got = parse_spec(spec)
    assert (compiler.name, got) == (name, target)


@pytest.mark.parametrize("spec, needle", [("tensorrt", "unknown compiler 'tensorrt' (known: rknn, vela, openvino"),
                                          ("rknn:rk9999", "unknown rknn target 'rk9999' (known: rk3588")])
def test_unknown_compiler_or_target_is_a_usage_error(spec, needle):
    with pytest.raises(UsageError, match=needle.replace("(", r"\(")):
        parse_spec(spec)


def test_a_compiler_not_installed_names_its_install_command(monkeypatch, tmp_path):
    monkeypatch.delenv("UPREWRITE_RKNN_PYTHON", raising=False)
    monkeypatch.setattr(compilers, "candidate_pythons", lambda compiler: [str(tmp_path / "no" / "python")])
    with pytest.raises(UsageError, match="rknn is not installed for uprewrite: python3 -m venv .*pip install "
                                         "rknn-toolkit2.*UPREWRITE_RKNN_PYTHON"):
        api.compile_check(str(FSRCNN), "rknn:rk3588")
    result = invoke("check", FSRCNN, "--compiler", "rknn")
    assert_clean_exit(result, 2)
    error_line(result.stderr, "rknn is not installed", "pip install rknn-toolkit2")


def test_a_python_without_the_compiler_is_refused(monkeypatch):
    monkeypatch.setenv("UPREWRITE_OPENVINO_PYTHON", sys.executable)
    if importlib.util.find_spec("openvino") is not None:
        pytest.skip("openvino is installed in the test environment")
    with pytest.raises(UsageError, match="UPREWRITE_OPENVINO_PYTHON=.*cannot import openvino"):
        find_python(COMPILERS["openvino"])


def test_check_needs_a_profile_or_a_compiler():
    result = invoke("check", FSRCNN)
    assert_clean_exit(result, 2)
    error_line(result.stderr, "--profile", "--compiler")


def test_compile_check_reads_a_file():
    with pytest.raises(UsageError, match="pass the model's path"):
        api.compile_check(onnx.load(FSRCNN), "openvino")


# ----------------------------------------------------------------------------- reports read back


def test_rknn_layer_table_is_read():
    layers = _runner("rknn").layers((DATA / "rknn_rk3588_fsrcnn.log").read_text())
    assert layers == [
        {"id": "1", "op": "ConvRelu", "where": "NPU", "name": "Conv:feat"},
        {"id": "2", "op": "exConvTransposePad", "where": "CPU", "name": "exConvTransposePad:relu_out_pad"},
        {"id": "3", "op": "Conv", "where": "NPU", "name": "Conv:deconv#1"}]


def test_vela_summary_is_read():
    layers, reasons = _runner("vela").layers((DATA / "vela_u55_fsrcnn.txt").read_text())
    assert [(la["op"], la["where"]) for la in layers] == [("TRANSPOSE_CONV", "CPU"), ("Conv2D", "NPU"),
                                                          ("Relu", "NPU"), ("MemoryCopy", "NPU")]
    assert "conv2d_transpose" in layers[0]["name"]
    assert reasons == ["TRANSPOSE_CONV: (Padding::VALID) Unsupported IFM/OFM shapes. ifm:(16,16) ofm:(56,56), "
                       "stride:(3,3), kernel:(9,9)"]


def test_rknn_layers_are_attributed_to_onnx_nodes():
    """The CPU layer RKNN names after the ConvTranspose's input tensor is the ConvTranspose's own pad:
    attributed to 'deconv', an upsampling layer on the CPU."""
    layers = [Layer(**la) for la in _runner("rknn").layers((DATA / "rknn_rk3588_fsrcnn.log").read_text())]
    got = compilers._attribute(onnx.load(FSRCNN), layers)
    assert [(la.node, la.upsampling) for la in got] == [("feat", False), ("deconv", True), ("deconv", True)]
    check = compilers.CompilerCheck(model="m", compiler="rknn", target="rk3588", versions={}, status="compiled",
                                    message="", layers=got, max_abs_error=1e-3, error_limit=2e-2)
    assert not check.ok
    assert check.problems() == ["exConvTransposePad 'exConvTransposePad:relu_out_pad' runs on the CPU "
                                "(ONNX node 'deconv')"]


def test_emitted_form_nodes_count_as_upsampling():
    """The masked Resize form: Resize, its phase mask (Mul) and the Conv after it."""
    model = api.convert(str(FSRCNN), profile="rk3588").model
    related = compilers.upsampling_related(model)
    assert {"deconv/resize", "deconv/zero_insert", "deconv/conv"} <= related
    assert "feat" not in related


def test_wrong_values_and_rejections_fail_the_check():
    base = dict(model="m", compiler="openvino", target="CPU", versions={}, message="")
    wrong = compilers.CompilerCheck(status="compiled", max_abs_error=0.5, error_limit=1e-3, **base)
    assert not wrong.ok and wrong.problems()[0].startswith("wrong values: the compiler's outputs differ")
    rejected = compilers.CompilerCheck(status="rejected", **{**base, "message": "Unsupported op"})
    assert not rejected.ok and rejected.problems() == ["openvino CPU rejected the model: Unsupported op"]
    fine = compilers.CompilerCheck(status="compiled", max_abs_error=1e-7, error_limit=1e-3, **base)
    assert fine.ok and fine.problems() == []


def test_outputs_of_another_size_or_count_or_nan_are_wrong():
    import numpy as np

    err, limit = compilers._compare([np.ones((1, 2, 3))], [np.ones((1, 2))], 1e-3)
    assert err == float("inf") and limit == 1e-3
    err, _ = compilers._compare([np.ones((1, 2, 3))], [np.ones((1, 2, 3, 1))], 1e-3)
    assert err == 0.0
    assert compilers._compare([np.ones(3)], [np.full(3, np.nan)], 1e-3)[0] == float("inf")
    assert compilers._compare([np.ones(3), np.ones(2)], [np.ones(3)], 1e-3)[0] == float("inf")
    assert compilers._compare([np.array([np.nan, np.inf, 1.0])], [np.array([np.nan, np.inf, 1.0])], 1e-3)[0] == 0.0


def test_inputs_named_like_keywords_or_paths_reach_the_runner(tmp_path):
    """Input names are tensor names: 'file', 'allow_pickle' or 'a/b' are not file or keyword names."""
    import numpy as np

    feeds = {"file": np.ones(2), "allow_pickle": np.zeros(3), "a/b": np.arange(4.0)}
    compilers.save_feeds(tmp_path / "in.npz", feeds)
    got = _runner("rknn").load_feeds(str(tmp_path / "in.npz"))
    assert list(got) == list(feeds) and all(np.array_equal(got[k], v) for k, v in feeds.items())


def test_a_runner_that_hangs_is_killed_with_its_children(tmp_path):
    import subprocess
    import time

    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
             "print('started', flush=True); time.sleep(60)"
    start = time.perf_counter()
    with pytest.raises(subprocess.TimeoutExpired):
        compilers.run_group([sys.executable, "-c", script], str(tmp_path), timeout=2)
    assert time.perf_counter() - start < 20


# ----------------------------------------------------------------------------- the compilers themselves


def _installed(name: str) -> bool:
    try:
        return find_python(COMPILERS[name]) is not None
    except UsageError:
        return False


@pytest.mark.skipif(not _installed("rknn"), reason="rknn-toolkit2 not installed (benchmarks/compilers/README.md)")
def test_rknn_rk3588_moves_fsrcnn_transposed_conv_to_the_cpu_and_the_profile_fixes_it(tmp_path):
    result = invoke("check", FSRCNN, "--compiler", "rknn:rk3588", "--json")
    assert_clean_exit(result, 1)
    doc = json.loads(result.stdout)["compiler"]
    assert doc["status"] == "compiled" and any("exConvTransposePad" in p for p in doc["problems"])
    out = tmp_path / "f.onnx"
    api.convert(str(FSRCNN), profile="rk3588", output=out)
    result = invoke("check", out, "--compiler", "rknn:rk3588", "--profile", "rk3588")
    assert_clean_exit(result, 0)
    assert "every upsampling layer compiles onto the NPU" in result.stdout


@pytest.mark.skipif(not _installed("openvino"), reason="openvino not installed (benchmarks/compilers/README.md)")
def test_openvino_compiles_and_matches():
    check = api.compile_check(str(FSRCNN), "openvino")
    assert check.ok and check.max_abs_error < 1e-5


@pytest.mark.skipif(not _installed("vela"), reason="onnx2tf + Vela not installed (benchmarks/compilers/README.md)")
def test_vela_u55_and_the_measured_profile(tmp_path):
    """U55 leaves FSRCNN's k9 s3 TRANSPOSE_CONV on the CPU; the ethos-u55 profile's form runs on the NPU.
    onnx2tf simplifies its input file in place: the check gives it a copy, MODEL is never written."""
    before = FSRCNN.read_bytes()
    result = invoke("check", FSRCNN, "--compiler", "vela:ethos-u55-128")
    assert_clean_exit(result, 1)
    assert "TRANSPOSE_CONV" in result.stdout and "runs on the CPU" in result.stdout
    assert FSRCNN.read_bytes() == before
    out = tmp_path / "f.onnx"
    api.convert(str(FSRCNN), profile="ethos-u55", output=out)
    assert api.compile_check(str(out), "vela:ethos-u55-128").ok


# ----------------------------------------------------------------------------- --to fastest --runtime openvino


def test_runtime_other_than_onnxruntime_needs_fastest():
    result = invoke("convert", FSRCNN, "--runtime", "openvino", "-o", "unused.onnx")
    assert_clean_exit(result, 2)
    error_line(result.stderr, "--runtime openvino: only --to fastest times the forms")


def test_runtime_not_installed_names_its_install_command(monkeypatch, tmp_path):
    monkeypatch.delenv("UPREWRITE_OPENVINO_PYTHON", raising=False)
    monkeypatch.setattr(compilers, "candidate_pythons", lambda compiler: [str(tmp_path / "none")])
    with pytest.raises(UsageError, match="--runtime openvino: openvino is not installed for uprewrite: .*pip install "
                                         "openvino"):
        api.convert(str(FSRCNN), to="fastest", runtime="openvino")
    with pytest.raises(UsageError, match="--runtime tensorrt: expected one of onnxruntime, openvino"):
        api.convert(str(FSRCNN), to="fastest", runtime="tensorrt")


@pytest.mark.skipif(not _installed("openvino"), reason="openvino not installed (benchmarks/compilers/README.md)")
def test_fastest_in_openvino(tmp_path):
    """FSRCNN's k9 s3 layer: a sub-pixel form is well under half the ConvTranspose's time in OpenVINO."""
    result = api.convert(str(FSRCNN), to="fastest", runtime="openvino", output=tmp_path / "f.onnx")
    site = result.report.sites[0]
    assert site.target == "subpixel" and "(timed in openvino)" in site.notes[0], site.notes
    assert set(site.timings_ms) >= {"original", "subpixel", "resize"}
