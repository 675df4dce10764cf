"""Input sizes for models with symbolic dims: --shape spellings, sizes chosen when none is given,
the second-size check, and MAC counts / layouts priced at the reference size."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import make_convtranspose_model
from onnx_uprewrite import api
from onnx_uprewrite.cli import cli
from onnx_uprewrite.errors import UsageError, VerificationImpossible
from onnx_uprewrite.verify import normalize_shapes, parse_shape_option, run_original


@pytest.mark.parametrize("text, expected", [
    ("x=1x3x64x64", {"x": (1, 3, 64, 64)}),
    ("x:1,3,64,64", {"x": (1, 3, 64, 64)}),
    ("x:[1,3,64,64]", {"x": (1, 3, 64, 64)}),
    ("x:[1, 3, 64, 64]", {"x": (1, 3, 64, 64)}),
    ("input_1:0:1,64,64,3", {"input_1:0": (1, 64, 64, 3)}),  # tf2onnx names end in :0
    ("input_1:0=1x64x64x3", {"input_1:0": (1, 64, 64, 3)}),
    ("mel:1,80,64", {"mel": (1, 80, 64)}),
])
def test_shape_spellings(text, expected):
    assert parse_shape_option([text]) == expected


@pytest.mark.parametrize("text", ["x", "x=", "=1x2", "x:1,0,3", "x=1x-2", "x:[1,2", "x:a,b", "x=1.5x2"])
def test_bad_shape_spellings_are_usage_errors(text):
    with pytest.raises(UsageError, match="--shape"):
        parse_shape_option([text])


def test_api_shapes_take_tuples_and_strings():
    assert normalize_shapes({"z": "1x64x16x16"}) == {"z": (1, 64, 16, 16)}
    assert normalize_shapes({"z": "[1,64,16,16]"}) == {"z": (1, 64, 16, 16)}
    assert normalize_shapes({"z": np.array([1, 2])}) == {"z": (1, 2)}
    assert normalize_shapes(["z:1,2"]) == {"z": (1, 2)}
    with pytest.raises(UsageError, match="'z'"):
        normalize_shapes({"z": "1xq"})


def symbolic_model(cin=16, cout=16, after=None, dims=("batch", None, "height", "width")):
    """ConvTranspose k4 s2 p1 on x[batch, cin, height, width]; ``after``: a constant Reshape target."""
    dims = [cin if d is None else d for d in dims]
    model = make_convtranspose_model(cin=cin, cout=cout, input_dims=dims)
    if after is not None:
        graph = model.graph
        graph.node[0].output[0] = "up_out"
        graph.initializer.append(numpy_helper.from_array(np.array(after, np.int64), "target"))
        graph.node.append(helper.make_node("Reshape", ["up_out", "target"], ["y"], name="fixed"))
    return model


def same_at(original, rewritten, shape, seed=3):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    a, b = run_original(original, {"x": x}), run_original(rewritten, {"x": x})
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("to", ["subpixel", "resize", "fastest"])
def test_symbolic_dims_get_chosen_sizes_and_stay_symbolic(to):
    model = symbolic_model()
    result = api.convert(model, to=to)
    report = result.report
    assert report.chosen_shapes == {"x": [1, 16, 64, 64]}
    assert "batch" in report.shape_choice and "height" in report.shape_choice
    if not report.rewritten:  # fastest may keep the site: nothing to verify
        return
    assert report.second_size == {"x": [2, 16, 128, 128]}
    assert report.verified and report.outputs_second_size
    dims = result.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]
    same_at(model, result.model, (3, 16, 5, 9))


def test_sizes_the_model_does_not_run_at_are_skipped():
    """Runs only at 128x128 (a Reshape to 256x256 after the x2 site): 64 and 32 fail, 128 is chosen; no
    second size runs, and the report says so."""
    model = symbolic_model(cout=4, after=[1, 4, 256, 256])
    report = api.convert(model, to="subpixel").report
    assert report.chosen_shapes == {"x": [1, 16, 128, 128]}
    assert "not: x=1x16x64x64" in report.shape_choice
    assert any(n.startswith("second input size not checked") for n in report.notes)


def test_no_size_that_runs_is_exit_2_naming_dims_and_sizes(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(symbolic_model(cout=4, after=[1, 4, 300, 300]), str(path))
    out = tmp_path / "o.onnx"
    result = CliRunner().invoke(cli, ["convert", str(path), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "input 'x' dims 0 ('batch'), 2 ('height'), 3 ('width')" in result.output
    assert "x=1x16x64x64" in result.output
    assert "--shape" in result.output and "Traceback" not in result.output
    assert not out.exists()
    with pytest.raises(VerificationImpossible):
        api.convert(symbolic_model(cout=4, after=[1, 4, 300, 300]))


def test_given_shape_overrides_the_choice():
    report = api.convert(symbolic_model(), shapes={"x": "2x16x8x8"}).report
    assert report.chosen_shapes is None
    assert report.outputs[0].shape == (2, 16, 16, 16)


def test_shared_symbol_names_get_one_size():
    """Two inputs that share the symbol 'height' get the same size; unnamed dims are their own."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, "height", "w1"])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 4, "height", None])
    graph = helper.make_graph(
        [helper.make_node("ConvTranspose", ["x", "W"], ["u"], name="up", strides=[2, 2], pads=[1, 1, 1, 1]),
         helper.make_node("ReduceMean", ["z"], ["m"], keepdims=1)],
        "g", [x, z], [helper.make_tensor_value_info("u", TensorProto.FLOAT, None),
                      helper.make_tensor_value_info("m", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.ones((4, 4, 4, 4), np.float32), "W")])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    report = api.convert(model).report
    assert report.chosen_shapes == {"x": [1, 4, 64, 64], "z": [1, 4, 64, 64]}


def test_shape_prices_macs_and_layout_as_a_static_export_would():
    """The per-phase layout and MAC counts of a static export also for the symbolic one (priced at the
    chosen or given size), while the emitted graph stays symbolic."""
    for size, shapes in ((16, {"x": (1, 32, 16, 16)}), (64, None)):
        static = api.convert(make_convtranspose_model(cin=32, cout=32, spatial=(size, size))).report.sites[0]
        result = api.convert(symbolic_model(cin=32, cout=32), shapes=shapes)
        site = result.report.sites[0]
        assert site.form == static.form
        assert (site.macs_before, site.macs_after) == (static.macs_before, static.macs_after)
        assert site.macs_before and site.macs_after
        assert result.model.graph.input[0].type.tensor_type.shape.dim[2].dim_param == "height"
    assert "4 Conv" in api.convert(symbolic_model(cin=32, cout=32), shapes={"x": (1, 32, 16, 16)}).report.sites[0].form


def test_inspect_uses_the_same_choice_and_refuses_unknown_names():
    info = api.inspect(symbolic_model())
    assert info["chosen_shapes"] == {"x": [1, 16, 64, 64]}
    assert info["sites"][0]["macs"]["subpixel"]
    with pytest.raises(UsageError, match="no graph input named 'q'"):
        api.inspect(symbolic_model(), shapes={"q": (1, 2)})


def test_a_size_whose_site_inputs_span_their_kernels_is_preferred():
    """Five stride-2 Convs then a k4 ConvTranspose: at 64 the site's input is 2x2, shorter than its
    kernel; 128 gives 4x4 and is chosen, and the report says why 64 was passed over."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(5):
        inits.append(numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), f"d{i}"))
        nodes.append(helper.make_node("Conv", [prev, f"d{i}"], [f"c{i}"], strides=[2, 2], pads=[1, 1, 1, 1]))
        prev = f"c{i}"
    inits.append(numpy_helper.from_array(rng.standard_normal((4, 4, 4, 4)).astype(np.float32), "W"))
    nodes.append(helper.make_node("ConvTranspose", [prev, "W"], ["y"], name="up", strides=[2, 2], pads=[1, 1, 1, 1]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    report = api.convert(model).report
    assert report.chosen_shapes == {"x": [1, 4, 128, 128]}
    assert "shorter than the kernel" in report.shape_choice
