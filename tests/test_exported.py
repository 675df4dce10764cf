"""Models exported by the real exporters (PyTorch TorchScript and dynamo, Keras 3 via tf2onnx;
models/export_real.py) convert to every target form, verified in onnxruntime, and match the
reference outputs saved at export time; the op census afterwards has no source-form ops left."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_uprewrite as up
from onnx_uprewrite.api import FORM_OPS
from onnx_uprewrite.verify import run_rewritten

EXPORTED = Path(__file__).resolve().parent.parent / "models" / "exported"
MODELS = sorted(p.stem for p in EXPORTED.glob("*.onnx"))
# ops that must be gone after rewriting every site into the target form
GONE = {
    "subpixel": {"ConvTranspose", "Resize", "Upsample"},
    "convtranspose": {"DepthToSpace", "Resize", "Upsample"},
    "resize": {"ConvTranspose", "DepthToSpace"},
}
# sites refused on purpose, with the words their reason must contain
REFUSED = {
    # per-channel int8 Conv weights: the S phases of one output channel have S different scales,
    # one ConvTranspose channel can only have one
    "torch_pixelshuffle_op17_qdq_pc": "per-channel scales",
    # the int32 Conv bias differs across phases: a per-phase Add would need a float bias
    "torch_pixelshuffle_op17_qdq_pt": "differs across the phases",
    # Resize -> Q -> DQ -> Conv: one transposed convolution cannot keep the quantization step between
    "torch_upsample_nearest_conv_op17_qdq_pt": "upsampled activation is quantized",
}
# notes some sites must carry: graph-computed weights that were folded, BatchNorm folded
NOTES = {
    "torch_weightnorm_convtranspose_op13": "evaluated as constants",
    "torch_dcgan_op13": "BatchNormalization",
}


@functools.lru_cache(maxsize=None)
def _inspect(stem):
    inputs, _ = _load(stem)
    return up.inspect(EXPORTED / f"{stem}.onnx", shapes={k: v.shape for k, v in inputs.items()})


def _assert_inspect_agrees(stem, to, report):
    """``inspect`` lists exactly the sites ``convert`` found, and a form it calls exact converts and verifies."""
    listed = {s["node"]: s for s in _inspect(stem)["sites"]}
    assert set(listed) == {s.node for s in report.sites}
    for site in report.sites:
        info = listed[site.node]
        if site.status == "skipped":
            assert info["source"] == to
        elif site.status == "rewritten":
            assert to in info["exact_forms"], (site.node, info["forms"])
        else:
            assert info["refused"] or to not in info["exact_forms"], (site.node, info)


def _load(stem):
    data = np.load(EXPORTED / f"{stem}.npz")
    inputs = {k: data[k] for k in data.files if not k.startswith("out:")}
    outputs = {k[4:]: data[k] for k in data.files if k.startswith("out:")}
    return inputs, outputs


def _assert_still_quantized(model, no_float_constants):
    """Every Conv/ConvTranspose reads int8 weights through DequantizeLinear; for the sub-pixel form,
    no float tensor was added at all (the masked Resize form adds its 0/1 phase mask)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose"):
            dq = producer.get(node.input[1])
            assert dq is not None and dq.op_type == "DequantizeLinear", node.name
            assert inits[dq.input[0]].data_type == onnx.TensorProto.INT8, node.name
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 1]
    assert not (no_float_constants and floats), [t.name for t in floats]


def test_corpus_is_there():
    assert len(MODELS) >= 20
    assert {"torch_pixelshuffle_op9", "keras_upsampling2d_conv", "torch_upsample_bilinear_conv_op17"} <= set(MODELS)


@pytest.mark.parametrize("to", sorted(GONE))
@pytest.mark.parametrize("stem", MODELS)
def test_exported_model_converts_and_matches_reference(stem, to):
    inputs, outputs = _load(stem)
    shapes = {k: v.shape for k, v in inputs.items()}
    result = up.convert(EXPORTED / f"{stem}.onnx", to=to, inputs=inputs, shapes=shapes)
    report = result.report
    assert report.verified
    _assert_inspect_agrees(stem, to, report)
    if stem in REFUSED:  # refused, or left as it is where it already is in the form asked for
        unparsed = [s for s in report.sites if s.status == "refused" or "not parsed" in (s.reason or "")]
        assert unparsed and all(REFUSED[stem] in s.reason for s in unparsed)
        # left as it is where its identifying op is the form asked for (a DepthToSpace for subpixel, ...)
        ops = {n.name: n.op_type for n in onnx.load(str(EXPORTED / f"{stem}.onnx"), load_external_data=False).graph.node}
        assert all((s.status == "skipped") == (ops.get(s.node) in FORM_OPS.get(to, ())) for s in unparsed), \
            [(s.source, s.node, s.status) for s in unparsed]
        return
    assert not report.refused, [s.reason for s in report.refused]
    assert report.rewritten or all(s.status == "skipped" for s in report.sites)
    assert report.sites
    if stem in NOTES and to != "convtranspose":
        assert any(NOTES[stem] in note for s in report.sites for note in s.notes), [s.notes for s in report.sites]
    left = set(report.ops_after) & GONE[to]
    assert not left, (left, report.ops_after)
    if report.ops_before.get("Tile"):  # Keras repeats (Unsqueeze-Tile-Reshape) are gone
        assert report.ops_after.get("Tile", 0) < report.ops_before["Tile"], report.ops_after
    if "_qdq_" in stem:
        _assert_still_quantized(result.model, no_float_constants=to == "subpixel")
    got = run_rewritten(result.model, inputs)
    for name, ref in outputs.items():  # the outputs saved at export time, by the original model
        scale = max(float(np.abs(ref).max()), 1.0)
        assert float(np.abs(got[name] - ref).max()) <= 1e-4 * scale, name


@pytest.mark.parametrize("to", sorted(GONE))
def test_dynamic_model_stays_symbolic_and_matches_at_two_sizes(to):
    """Symbolic batch/H/W survive; verification itself also ran at a second size (dims doubled)."""
    stem = "torch_dynamic_hw_op17"
    inputs, _ = _load(stem)
    result = up.convert(EXPORTED / f"{stem}.onnx", to=to, inputs=inputs)
    report = result.report
    assert report.verified and report.second_size and report.outputs_second_size
    dims = result.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == [d.dim_param for d in
                                           onnx.load(EXPORTED / f"{stem}.onnx").graph.input[0].type.tensor_type.shape.dim]
    assert sum(bool(d.dim_param) for d in dims) == 3
    original = onnx.load(EXPORTED / f"{stem}.onnx")
    rng = np.random.default_rng(0)
    for shape in [(1, 8, 6, 10), (3, 8, 16, 4)]:
        x = {"input": rng.standard_normal(shape).astype(np.float32)}
        ref, got = run_rewritten(original, x), run_rewritten(result.model, x)
        for name in ref:
            assert got[name].shape == ref[name].shape
            assert float(np.abs(got[name] - ref[name]).max()) <= 1e-4 * max(1.0, float(np.abs(ref[name]).max()))
