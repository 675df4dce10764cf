"""Per-site verification (site_check.py): every replacement runs alone on the activation that
really entered its site, against a per-element tolerance from |W|*|x|; a broken replacement is
caught, named, and nothing is written.  Also float16 models, verified with float16's epsilon.
"""

from __future__ import annotations

import json
import random

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnx_uprewrite as up
from hostile import assert_clean_exit, error_line, invoke, tree
from onnx_uprewrite.site_check import compare_site, fake_quantize
from sweep import batch_model, random_config
from test_cli import two_site_model

TARGETS = ("subpixel", "resize", "convtranspose")


@pytest.fixture
def perturb_site(emission_hook):
    """Add ``delta`` to the first element of the largest weight emitted for one site (conftest.emission_hook)."""
    def install(node: str, delta: float):
        def hook(site, emission):
            if site.node != node:
                return
            big = max(emission.initializers, key=lambda t: np.prod(t.dims))
            w = numpy_helper.to_array(big).copy()
            w.flat[0] += delta
            big.CopyFrom(numpy_helper.from_array(w, big.name))
        emission_hook(hook)
    return install


@pytest.mark.parametrize("to", ["subpixel", "resize"])
def test_one_perturbed_weight_is_caught_and_named_and_nothing_written(tmp_path, perturb_site, to):
    src, out, rep = tmp_path / "model.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    src.write_bytes(two_site_model().SerializeToString())
    perturb_site("up2", 1e-3)
    before = tree(tmp_path)
    result = invoke("convert", src, "-o", out, "--to", to, "--report", rep)
    assert_clean_exit(result, 1)
    line = error_line(result.stderr, str(src), "failed per site", f"site 'up2' (convtranspose -> {to})",
                      "x its tolerance", "nothing written", single=False)
    assert "site 'up1'" not in line
    assert not out.exists()
    assert {k: v for k, v in tree(tmp_path).items() if k != "r.json"} == before
    report = json.loads(rep.read_text())
    sites = {s["node"]: s for s in report["sites"]}
    assert sites["up2"]["ratio"] > 1 and sites["up1"]["ratio"] < 1
    assert report["verified"] is False and report["written"] == []


def test_perturbation_below_the_tolerance_passes_and_is_reported(tmp_path, perturb_site):
    """A change far below float rounding of the sums is not an error: the check is not over-strict."""
    perturb_site("up2", 1e-9)
    result = up.convert(two_site_model(), to="subpixel")
    sites = {s.node: s for s in result.report.sites}
    assert result.report.verified and all(s.ratio < 1 for s in sites.values())


def test_report_has_per_site_errors_and_tolerance(tmp_path):
    src, rep = tmp_path / "model.onnx", tmp_path / "r.json"
    src.write_bytes(two_site_model().SerializeToString())
    result = invoke("convert", src, "--report", rep, "-v")
    assert_clean_exit(result, 0)
    for site in json.loads(rep.read_text())["sites"]:
        assert site["status"] == "rewritten"
        assert 0 <= site["ratio"] < 1 and site["max_abs_error"] >= 0 and site["max_rel_error"] >= 0
        assert "|W|*|x|" in site["tolerance"] and "T=" in site["tolerance"]
    assert "alone on its captured input" in result.stdout


@pytest.mark.parametrize("seed", range(3))
def test_per_site_ratios_of_a_random_sweep_are_well_below_one(seed):
    rng = random.Random(seed)
    configs = [random_config(rng, allow_symbolic=False) for _ in range(40)]
    model, _, _ = batch_model(configs, 17, seed)
    for to in ("subpixel", "resize"):
        report = up.convert(model, to=to).report
        ratios = [s.ratio for s in report.sites if s.status == "rewritten"]
        assert ratios and max(ratios) < 0.5, (to, max(ratios))


def test_compare_site_quantized_output_is_compared_after_the_same_quantization():
    site = type("S", (), {"requantize": None, "terms_per_output": 4, "bias": None, "phase_bias": None})()
    scale, zp = np.array(0.1, np.float32), np.array(0, np.int8)
    ref = np.array([0.04, 0.26, 50.0], np.float32)  # 50 saturates at 127 steps
    got = fake_quantize(ref, scale, zp)
    check = compare_site(site, ref, got, None, None, None, (scale, zp))
    assert check.max_abs_error == 0 and "quantization step" in check.tolerance
    np.testing.assert_allclose(got, [0.0, 0.3, 12.7], rtol=1e-6)


# ----------------------------------------------------------------------------- float16


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights, inputs and outputs of a float32 ConvTranspose sweep model as float16."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    return m


@pytest.mark.parametrize("seed", range(2))
def test_float16_sweep_converts_to_every_form_and_verifies_with_the_float16_tolerance(seed):
    rng = random.Random(100 + seed)
    configs = [random_config(rng, allow_symbolic=False) for _ in range(30)]
    model = to_float16(batch_model(configs, 17, seed)[0])
    for to in TARGETS[:2]:
        result = up.convert(model, to=to)
        report = result.report
        assert report.verified and "float16" in report.tolerance, report.tolerance
        rewritten = [s for s in report.sites if s.status == "rewritten"]
        assert len(rewritten) == len(configs)
        assert all("float16" in s.tolerance for s in rewritten)
        assert max(s.ratio for s in rewritten) < 1
        scales = {n.input[i] for n in result.model.graph.node if n.op_type == "Resize" for i in (1, 2)
                  if len(n.input) > i}  # float32 by the Resize spec
        dtypes = {t.data_type for t in result.model.graph.initializer if t.data_type in (1, 10)
                  and t.name not in scales}
        assert dtypes == {TensorProto.FLOAT16}, "a float32 weight was written into a float16 model"
    back = up.convert(up.convert(model, to="subpixel").model, to="convtranspose").report
    assert back.verified


def test_float16_subpixel_and_resize_models_convert_back():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 3, 3, 3)) * 0.1).astype(np.float16)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("DepthToSpace", ["c"], ["y"], name="d2s", blocksize=2, mode="CRD")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    for to in ("convtranspose", "resize"):
        report = up.convert(model, to=to).report
        assert report.verified and report.rewritten and "float16" in report.tolerance


def test_bfloat16_model_is_refused_clearly_where_onnxruntime_cannot_run_it(tmp_path, ct_model):
    m = ct_model()
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        t.CopyFrom(helper.make_tensor(t.name, TensorProto.BFLOAT16, a.shape, a.flatten().tolist()))
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.BFLOAT16
    src = tmp_path / "model.onnx"
    src.write_bytes(m.SerializeToString())
    result = invoke("convert", src)
    assert_clean_exit(result, 2)
    error_line(result.stderr, "onnxruntime cannot run", "bfloat16", "--no-verify")


def test_composed_resize_conv_site_tolerance_counts_the_source_magnitudes():
    """nearest x(2,3) + Conv 4x5 with asymmetric pads: the composed kernel box ⊛ V cancels, so
    |box ⊛ V| * |x| underrates what the source rounds (box ⊛ |V|); the rewrite, more accurate than
    the original against float64, once failed its per-site check at 3.8x the tolerance."""
    w = np.random.default_rng(694).standard_normal((1, 1, 4, 5)).astype(np.float32)
    nodes = [helper.make_node("Resize", ["x", "", "sc"], ["u"], name="rs", mode="nearest",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
             helper.make_node("Conv", ["u", "w"], ["y"], name="conv", pads=[1, 1, 0, 3])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 1, 5, 3])],
                              [helper.make_tensor_value_info("y", 1, None)],
                              [numpy_helper.from_array(np.array([1, 1, 2, 3], np.float32), "sc"),
                               numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    for to in ("subpixel", "convtranspose"):
        result = up.convert(model, to=to)
        assert result.report.verification == "passed" and result.report.sites[0].ratio < 1


def test_adjacent_sites_are_checked_on_their_own_captured_inputs():
    """ConvTranspose -> ConvTranspose: the second site reads what the first produces, so the two run
    in separate per-site sessions, each on the original's activation; both are checked."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 4, 4, 4)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "W2")
    nodes = [helper.make_node("ConvTranspose", ["x", "W1"], ["m"], name="a", strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["m", "W2"], ["y"], name="b", strides=[2, 2])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w1, w2])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    from onnx_uprewrite import api

    assert len(api._site_batches([(s, e, None, None) for s, e in _emissions(model)])) == 2
    report = up.convert(model).report
    assert report.verified and all(s.ratio is not None and s.ratio < 1 for s in report.sites)


def _emissions(model):
    from onnx_uprewrite import api
    from onnx_uprewrite.passes import EMITTERS
    from onnx_uprewrite.surgery import Builder, Namer

    sites, _ = api.find_sites(model)
    namer, out = Namer(model), []
    for site in sites:
        b = Builder(namer, site.node)
        api.emit_site(site, EMITTERS["subpixel"], b, 17)
        out.append((site, b.emission))
    return out


# ----------------------------------------------------------------------------- big sites: a lower bound first


def _big_ct(seed=0, cin=16, cout=16, size=128, bias=True):
    """A ConvTranspose k4 s2 whose output has cout*(2*size)^2 >= LOWER_BOUND_FROM_ELEMENTS elements."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((cin, cout, 4, 4)) * 0.2).astype(np.float32), "W")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "B"))
    node = helper.make_node("ConvTranspose", ["x", "W"] + (["B"] if bias else []), ["y"], name="up", strides=[2, 2],
                            pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_big_site_passes_on_the_lower_bound_without_its_magnitude_model():
    from onnx_uprewrite.site_check import LOWER_BOUND_FROM_ELEMENTS

    assert 16 * 256 * 256 >= LOWER_BOUND_FROM_ELEMENTS
    report = up.convert(_big_ct(), to="subpixel").report
    site = report.sites[0]
    assert report.verification == "passed" and "a lower bound of |W|*|x|" in site.tolerance, site.tolerance
    assert 0 < site.ratio <= 1


def test_where_the_lower_bound_is_not_enough_the_magnitude_model_decides(monkeypatch):
    """A lower bound of zero (every error over it, no bias): the site is checked again with its magnitude
    model, against |W|*|x| itself, and passes."""
    from onnx_uprewrite import api

    from onnx_uprewrite.site_check import LowerBound

    monkeypatch.setattr(api, "magnitude_lower_bound", lambda site, ref: LowerBound(0.0))
    report = up.convert(_big_ct(bias=False), to="subpixel").report
    site = report.sites[0]
    assert report.verification == "passed"
    assert "(|W|*|x|+|b|) per element" in site.tolerance and site.ratio < 0.5, site.tolerance


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), cin=st.integers(1, 8), cout=st.integers(1, 6), bias=st.booleans())
def test_the_lower_bound_is_below_the_magnitude(seed, cin, cout, bias):
    """max(|ref| / (1 + g) - |b|, 0) <= |W| * |x| at every element, |W|*|x| computed in float64."""
    import onnxruntime as ort
    from onnx import numpy_helper

    from onnx_uprewrite.site_check import magnitude_lower_bound
    from onnx_uprewrite.weights import conv_transpose_reference

    from onnx_uprewrite import api

    model = _big_ct(seed, cin, cout, size=6, bias=bias)
    x = np.random.default_rng(seed).standard_normal((1, cin, 6, 6)).astype(np.float32) * 3
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    (site,), _ = api.find_sites(model)
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    mag = conv_transpose_reference(np.abs(x.astype(np.float64)), np.abs(w), None, site.axes, site.group)
    assert mag.shape == ref.shape
    bias = np.max(np.abs(numpy_helper.to_array(model.graph.initializer[1]))) if bias else 0.0
    scale = magnitude_lower_bound(site, ref).scale
    assert np.all(np.maximum(np.abs(ref.astype(np.float64)) * scale - bias, 0) <= mag)
