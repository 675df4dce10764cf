"""Whole-model tolerance after deep networks: an exact rewrite followed by many layers passes (the
tolerance grows by the measured downstream noise floor), a wrong model still fails."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import make_convtranspose_model
import onnx_uprewrite as up
from onnx_uprewrite import api
from onnx_uprewrite.errors import VerificationFailed
from onnx_uprewrite.report import Report
from onnx_uprewrite.verify import derive_tolerance, run_original


def deep(layers: int, act: str, c: int = 8, gain: float = 1.5) -> onnx.ModelProto:
    """ConvTranspose site -> ``layers`` x (Conv3x3 + act), weights scaled by ``gain`` (error amplifying)."""
    m = make_convtranspose_model(cin=c, cout=c, spatial=(8, 8))
    g = m.graph
    g.node[0].output[0] = "t0"
    rng = np.random.default_rng(5)
    prev = "t0"
    for i in range(layers):
        w = (rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c) * gain).astype(np.float32)
        g.initializer.append(numpy_helper.from_array(w, f"w{i}"))
        g.node.append(helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        out = "y" if i == layers - 1 else f"a{i}"
        g.node.append(helper.make_node(act, [f"c{i}"], [out]))
        prev = out
    return m


@pytest.mark.parametrize("layers, act", [(60, "Tanh"), (120, "Relu")])
@pytest.mark.parametrize("to", ["subpixel", "resize"])
def test_exact_rewrite_before_a_deep_network_passes(layers, act, to):
    report = up.convert(deep(layers, act), to=to).report
    assert report.verified and report.verification == "passed"
    assert report.sites[0].ratio < 1
    out = report.outputs[0]
    assert out.max_abs_error <= out.tolerance


def test_noise_floor_is_only_added_where_needed():
    report = up.convert(deep(2, "Relu", gain=1.0)).report
    assert "noise floor" not in report.tolerance


def test_a_wrong_model_still_fails_after_the_noise_floor():
    """Feed the check a model whose last layer differs: errors of the order of the output stay far
    above the tolerance grown by the downstream noise floor."""
    original = deep(60, "Tanh")
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 8)).astype(np.float32)
    reference = run_original(original, {"x": x})
    wrong = onnx.ModelProto()
    wrong.CopyFrom(original)
    w = wrong.graph.initializer[-1]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.1, w.name))
    bound = derive_tolerance(np.float32, 32, None, None).rtol * 10.0
    tol = derive_tolerance(np.float32, 128, None, None)
    nodes_before = len(wrong.graph.node)
    with pytest.raises(VerificationFailed):
        api._check(wrong, {"x": x}, reference, tol, Report(model="m", target="subpixel"), {}, [("t0", bound)])
    assert len(wrong.graph.node) == nodes_before  # the perturbation is undone
    assert not any("noisy" in i for n in wrong.graph.node for i in n.input)


def test_user_tolerance_is_not_grown():
    with pytest.raises(VerificationFailed):
        up.convert(deep(60, "Tanh"), rtol=1e-9, atol=0)


def test_verify_uses_the_same_rule_as_convert(tmp_path):
    """`uprewrite verify A B` of an exact rewrite before 60 layers says equivalent, as convert did; a B
    whose last layer differs is not."""
    original = deep(60, "Tanh")
    rewritten = up.convert(original).model
    same = up.verify(original, rewritten)
    assert same.equivalent, same.to_dict()
    wrong = onnx.ModelProto()
    wrong.CopyFrom(rewritten)
    w = next(t for t in wrong.graph.initializer if t.name == "w59")
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.1, w.name))
    assert not up.verify(original, wrong).equivalent


def test_verify_chooses_sizes_for_symbolic_dims():
    model = deep(2, "Relu")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_param, dims[2].dim_param, dims[3].dim_param = "n", "h", "w"
    same = up.verify(model, up.convert(model).model)
    assert same.equivalent and same.outputs[0].shape == (1, 8, 128, 128)
