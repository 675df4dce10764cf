"""Real exports with dynamic axes (models/export_real.py torch-dynamic: TorchScript dynamic_axes and
dynamo dynamic_shapes on batch, H/W and time) convert with no flags: sizes are chosen for the
symbolic dims, the rewrite is verified at two sizes, the output keeps its symbolic dims and matches
the outputs saved at export time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnx_uprewrite as up
from onnx_uprewrite.cli import cli
from onnx_uprewrite.verify import run_rewritten

EXPORTED = Path(__file__).resolve().parent.parent / "models" / "exported"
DYNAMIC = sorted(p.stem for p in EXPORTED.glob("dyn_*.onnx"))
TARGETS = ["subpixel", "resize", "convtranspose", "fastest"]


def _symbols(model):
    return [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input]


def test_dynamic_corpus_is_there():
    assert len(DYNAMIC) >= 10
    assert any("dynamo" in s for s in DYNAMIC) and any("vocoder" in s for s in DYNAMIC)


@pytest.mark.parametrize("to", TARGETS)
@pytest.mark.parametrize("stem", DYNAMIC)
def test_dynamic_export_converts_with_no_flags(stem, to):
    path = EXPORTED / f"{stem}.onnx"
    original = onnx.load(str(path))
    result = up.convert(path, to=to)
    report = result.report
    assert report.chosen_shapes and report.shape_choice
    assert not report.refused, [s.reason for s in report.refused]
    assert report.sites, "no site found"
    if report.rewritten:
        assert report.verified and report.outputs_second_size, report.notes
    assert _symbols(result.model) == _symbols(original)
    data = np.load(EXPORTED / f"{stem}.npz")
    inputs = {k: data[k] for k in data.files if not k.startswith("out:")}
    got = run_rewritten(result.model, inputs)
    for key in (k for k in data.files if k.startswith("out:")):
        ref = data[key]
        assert float(np.abs(got[key[4:]] - ref).max()) <= 1e-4 * max(1.0, float(np.abs(ref).max())), key


def test_cli_prints_the_chosen_shapes(tmp_path):
    out = tmp_path / "o.onnx"
    result = CliRunner().invoke(cli, ["convert", str(EXPORTED / "dyn_bt_vocoder_op17.onnx"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "mel=1x20x64 (chosen; --shape overrides)" in result.output
    result = CliRunner().invoke(cli, ["convert", str(EXPORTED / "dyn_bt_vocoder_op17.onnx"), "-o", str(out),
                                      "--shape", "mel:[1,20,32]"])
    assert result.exit_code == 0, result.output
    assert "(chosen;" not in result.output
