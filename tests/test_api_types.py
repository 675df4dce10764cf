"""The Python API a pipeline uses: typed, JSON-serialisable results, --shape strings as shapes, and
onnx-graphsurgeon Graphs in and out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest

import onnx_uprewrite as up
from conftest import make_convtranspose_model
from onnx_uprewrite.verify import run_original

MODELS = Path(__file__).resolve().parent.parent / "models"


def test_convert_result_is_typed_and_json(tmp_path):
    result = up.convert(MODELS / "dcgan_stack.onnx", output=tmp_path / "o.onnx")
    data = json.loads(result.to_json())
    assert data["output"] == str(tmp_path / "o.onnx") and data["verification"] == "passed"
    json.dumps(result.report.sites[0].to_dict())  # each site serialises alone too
    assert isinstance(result.report.sites[0].to_dict()["params"]["strides"][0], int)


def test_inspect_returns_an_inspection():
    info = up.inspect(MODELS / "dcgan_stack.onnx")
    assert isinstance(info, up.Inspection)
    assert info["sites"] is info.sites and info["model"] == info.model  # the dict access of before
    assert json.loads(info.to_json())["sites"][0]["node"] == "deconv0"


def test_verify_returns_a_comparison(tmp_path):
    out = tmp_path / "o.onnx"
    up.convert(MODELS / "dcgan_stack.onnx", output=out)
    same = up.verify(MODELS / "dcgan_stack.onnx", out)
    assert isinstance(same, up.Comparison) and same.equivalent
    checks, tol = same  # unpacks as the tuple it was
    assert checks == same.outputs and tol == same.tolerance
    assert json.loads(same.to_json())["equivalent"] is True
    other = up.verify(MODELS / "dcgan_stack.onnx", MODELS / "dcgan_stack.onnx", rtol=0, atol=0)
    assert other.equivalent  # identical models are equivalent even at zero tolerance


@pytest.mark.parametrize("shape", ["1x16x5x7", "1,16,5,7", "[1,16,5,7]", (1, 16, 5, 7)])
def test_shapes_take_the_cli_spellings(shape):
    report = up.convert(MODELS / "dynamic_batch.onnx", shapes={"x": shape}).report
    assert report.outputs[0].shape[0] == 1 and report.chosen_shapes is None


def test_graphsurgeon_graph_in_and_out():
    """export -> gs cleanup -> uprewrite -> gs Graph -> a file a TensorRT build takes."""
    model = make_convtranspose_model(cin=8, cout=8, spatial=(6, 6))
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    result = up.convert(graph, to="subpixel")
    assert result.report.verification == "passed"
    out_graph = result.graph()
    assert isinstance(out_graph, gs.Graph)
    assert {n.op for n in out_graph.nodes} >= {"Conv"} and "ConvTranspose" not in {n.op for n in out_graph.nodes}
    exported = gs.export_onnx(out_graph)
    x = np.random.default_rng(0).standard_normal((1, 8, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run_original(exported, {"x": x})["y"], run_original(model, {"x": x})["y"],
                               rtol=1e-4, atol=1e-5)
    assert up.inspect(graph).sites and up.verify(graph, exported).equivalent


def test_a_wrong_model_type_is_a_usage_error():
    with pytest.raises(up.UsageError, match="expected a path"):
        up.convert(42)


def test_keywords_take_the_cli_names_too():
    report = up.convert(MODELS / "dynamic_batch.onnx", shape={"x": "1x16x5x7"}, from_=["convtranspose"]).report
    assert report.outputs[0].shape[0] == 1 and report.rewritten
    with pytest.raises(up.UsageError, match="same option"):
        up.convert(MODELS / "dynamic_batch.onnx", shape={"x": "1x16x5x7"}, shapes={"x": "1x16x5x7"})
    assert up.inspect(MODELS / "dynamic_batch.onnx", shape={"x": (1, 16, 5, 7)}).sites
