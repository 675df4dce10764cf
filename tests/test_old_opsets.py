"""Opsets 1-6 (IR 3 files of the old PyTorch exporter): parsed, emitted with the op versions those
opsets define, verified in onnxruntime; a form that needs an op the opset lacks is refused per site."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from conftest import make_convtranspose_model
from onnx_uprewrite import api
from onnx_uprewrite.cli import cli
from onnx_uprewrite.verify import run_original

BACKEND = Path(onnx.__file__).parent / "backend" / "test" / "data"
SHIPPED = ["pytorch-converted/test_ConvTranspose2d", "pytorch-converted/test_ConvTranspose2d_no_bias",
           "pytorch-operator/test_operator_convtranspose"]


def old_model(opset: int, **kw) -> onnx.ModelProto:
    """The conftest ConvTranspose model stamped IR 3 / ``opset``, initializers listed as inputs too."""
    m = make_convtranspose_model(**kw)
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    m.ir_version = 3
    m.opset_import[0].version = opset
    return m


@pytest.mark.parametrize("path", SHIPPED)
@pytest.mark.parametrize("to", ["subpixel", "convtranspose", "fastest"])
def test_shipped_old_exports_convert(path, to, tmp_path):
    out = tmp_path / "o.onnx"
    result = CliRunner().invoke(cli, ["convert", str(BACKEND / path / "model.onnx"), "--to", to, "-o", str(out)])
    assert result.exit_code == 0, result.output
    written = onnx.load(str(out))
    assert written.ir_version == 3 and written.opset_import[0].version <= 6
    inputs = {i.name for i in written.graph.input}
    assert all(t.name in inputs for t in written.graph.initializer)  # the IR 3 convention is kept


@pytest.mark.parametrize("path", SHIPPED[:1])
def test_resize_form_is_refused_per_site_where_the_opset_has_no_upsample(path, tmp_path):
    result = CliRunner().invoke(cli, ["convert", str(BACKEND / path / "model.onnx"), "--to", "resize",
                                      "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 3, result.output
    assert "opset 6" in result.output and "Upsample" in result.output


CASES = list(itertools.product(
    [1, 6],  # opset
    [dict(kernel=(4, 4), strides=[2, 2], pads=[1, 1, 1, 1]),
     dict(kernel=(3, 3), strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
     dict(kernel=(9, 9), strides=[3, 3], pads=[4, 4, 4, 4], output_padding=[2, 2]),
     dict(kernel=(3, 2), strides=[3, 2], pads=[0, 1, 2, 0]),
     dict(kernel=(5,), spatial=(7,), strides=[4], pads=[1, 2]),
     dict(kernel=(4, 4), strides=[2, 2], pads=[1, 1, 1, 1], cin=4, cout=1, group=4, bias=False),
     dict(kernel=(3, 3), strides=[2, 2], pads=[0, 0, 0, 0], dilations=[2, 2]),
     dict(kernel=(2, 2), strides=[2, 2], pads=[3, 3, 3, 3])],  # pads beyond the kernel: a fallback form
    ["subpixel", "convtranspose", "resize"],
))


@pytest.mark.parametrize("opset, attrs, to", CASES)
def test_old_opset_sweep_is_exact_or_refused_with_the_opset(opset, attrs, to):
    model = old_model(opset, **attrs)
    x = np.random.default_rng(1).standard_normal(
        [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)
    if to == "convtranspose":  # round trip: the sub-pixel form of the site back to a ConvTranspose
        model = api.convert(model, to="subpixel").model
    result = api.convert(model, to=to)
    report = result.report
    for site in report.sites:
        assert site.status in ("rewritten", "refused") or site.reason.startswith("already in form")
        if site.status == "refused":
            assert f"opset {opset}" in site.reason, site.reason
    if report.rewritten:
        assert report.verified
        np.testing.assert_allclose(run_original(result.model, {"x": x})["y"], run_original(model, {"x": x})["y"],
                                   rtol=1e-4, atol=1e-5)
        assert result.model.opset_import[0].version == opset and result.model.ir_version == 3
