"""``--to fastest``: per site the form kept is never slower, in its own measurements, than another
candidate beyond the noise margin, and the original stays unless beaten by more than that margin.

Timings are real onnxruntime runs, so the tests assert the decision rule against the report's own
numbers, never a particular winner (which depends on the machine).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import onnx_uprewrite as up
from onnx_uprewrite import fastest
from onnx_uprewrite.cli import cli
from click.testing import CliRunner

MODELS = Path(__file__).resolve().parent.parent / "models"
EXPORTED = MODELS / "exported"


def _assert_rule(report):
    timed = [s for s in report.sites if s.timings_ms]
    assert timed, "no site was timed"
    for s in timed:
        ms = s.timings_ms
        assert fastest.KEEP in ms and len(ms) >= 2, ms
        chosen = s.chosen
        assert chosen in ms and (chosen == fastest.KEEP) == (s.status != "rewritten")
        assert chosen == fastest.KEEP or chosen.split("/")[0] == s.target
        best = min(ms.values())
        if chosen == fastest.KEEP:
            assert best >= ms[fastest.KEEP] * (1 - fastest.NOISE_MARGIN), ms
        else:
            assert ms[chosen] == best, ms
            assert ms[chosen] < ms[fastest.KEEP] * (1 - fastest.NOISE_MARGIN), ms


@pytest.mark.parametrize("name", [
    "torch_dcgan_op13.onnx", "torch_fsrcnn_op13.onnx", "torch_upsample_nearest_conv_op17.onnx",
    "torch_upsample_bilinear_conv_op17.onnx", "torch_pixelshuffle_op17.onnx", "torch_convtranspose1d_op13.onnx",
    "torch_unet_decoder_op17_qdq_pt.onnx", "keras_upsampling2d_conv.onnx",
])
def test_fastest_follows_its_own_measurements_and_verifies(name, tmp_path):
    path = EXPORTED / name
    npz = path.with_suffix(".npz")
    inputs = dict(np.load(npz)) if npz.exists() else None
    inputs = {k: v for k, v in inputs.items() if not k.startswith("out:")} if inputs else None
    out = tmp_path / "out.onnx"
    result = up.convert(str(path), to="fastest", output=out, inputs=inputs if inputs else None)
    assert result.report.verification == "passed"
    assert out.exists()
    _assert_rule(result.report)


def test_fastest_without_verification_still_times_on_real_shapes(tmp_path):
    result = up.convert(str(MODELS / "dcgan_stack.onnx"), to="fastest", verify=False)
    assert result.report.verification.startswith("skipped")
    _assert_rule(result.report)


def test_cli_fastest_prints_the_timings(tmp_path):
    out = tmp_path / "f.onnx"
    res = CliRunner().invoke(cli, ["convert", str(MODELS / "fsrcnn_k9s3.onnx"), "-o", str(out), "--to", "fastest",
                                   "--report", str(tmp_path / "r.json"), "-v"])
    assert res.exit_code in (0, 3), res.output
    assert "timed alone: " in res.output
    assert '"timings_ms"' in (tmp_path / "r.json").read_text()


@given(st.dictionaries(st.sampled_from(["subpixel", "resize", "convtranspose"]),
                       st.floats(1e-6, 1.0), min_size=1), st.floats(1e-6, 1.0))
def test_choose_never_picks_a_slower_form(others, original):
    medians = {fastest.KEEP: original, **others}
    form, why = fastest.choose(medians)
    assert why
    if form == fastest.KEEP:
        assert min(medians.values()) >= original * (1 - fastest.NOISE_MARGIN)
    else:
        assert medians[form] == min(medians.values())
        assert medians[form] < original * (1 - fastest.NOISE_MARGIN)


def test_unknown_target_is_a_usage_error():
    with pytest.raises(up.UsageError, match="fastest"):
        up.convert(str(MODELS / "fsrcnn_k9s3.onnx"), to="quickest")


def test_unavailable_provider_is_a_usage_error():
    with pytest.raises(up.UsageError, match="--provider NoSuchExecutionProvider: not available"):
        up.convert(str(MODELS / "fsrcnn_k9s3.onnx"), to="fastest", provider="NoSuchExecutionProvider")


@pytest.mark.parametrize("verify", [True, False])
def test_fastest_on_a_model_with_external_data(ext_model, tmp_path, verify):
    """The timing sessions read external data as verification does (torch's dynamo exporter writes it by
    default); CLI (lazy weights: absolute data paths) and API alike."""
    out = tmp_path / "out.onnx"
    args = ["convert", str(ext_model), "--to", "fastest", "-o", str(out), "-v"] + ([] if verify else ["--no-verify"])
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "timed alone" in result.output and out.exists()
    _assert_rule(up.convert(ext_model, to="fastest", lazy_weights=True, verify=verify).report)
