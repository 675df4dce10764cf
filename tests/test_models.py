"""End to end over the shipped example models (models/*.onnx): CLI and Python API.

Every shipped model is converted to the sub-pixel form; the written model must keep the input's IR
version and opset imports, contain no ConvTranspose except refused sites, and give the same
outputs as the original in onnxruntime on seeded random inputs (at the verified size and, for the
symbolic-shape model, at a second size).  models/make_models.py must regenerate the shipped files
byte for byte.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import onnx_uprewrite
from onnx_uprewrite.cli import cli

MODELS = Path(__file__).resolve().parent.parent / "models"
FORM_SUFFIXES = (".subpixel.onnx", ".resize.onnx", ".convtranspose.onnx")  # CLI default outputs


def shipped_models() -> list[Path]:
    return sorted(p for p in MODELS.glob("*.onnx") if not p.name.endswith(FORM_SUFFIXES))


# per model: sites rewritten, refused nodes, --shape options, and the input shapes to compare at
# (the first is the verified one; missing inputs take their declared static shape)
SPECS = {
    "constant_identity_weights": dict(rewritten=1),
    "dcgan_stack": dict(rewritten=3),
    "decoder_1d": dict(rewritten=2),
    "decoder_3d": dict(rewritten=2),
    "dynamic_batch": dict(
        rewritten=1, shapes={"x": (2, 16, 5, 7)}, run_shapes=[{"x": (2, 16, 5, 7)}, {"x": (1, 16, 9, 4)}]
    ),
    "fsrcnn_k9s3": dict(rewritten=1),
    "grouped_dilated": dict(rewritten=2),
    "output_shape_same": dict(rewritten=2),
    "unet_decoder_k2s2": dict(rewritten=2),
    "weights_as_input": dict(rewritten=1, refused={"up0_dynamic_weight": "W"}),
}


def model_params():
    params = []
    for path in shipped_models():
        params.append(pytest.param(path, id=path.stem))
    return params


def test_shipped_models_are_the_documented_set():
    assert {p.stem for p in shipped_models()} == set(SPECS)
    total = 0
    for path in shipped_models():
        size = path.stat().st_size
        assert size < 1_000_000, path
        total += size
        model = onnx.load(str(path))
        assert model.ir_version == 8
        assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert total < 3_000_000


# ---------------------------------------------------------------------------------------------
# helpers


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _feeds(model: onnx.ModelProto, shapes: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        shape = shapes.get(vi.name) or tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
        assert all(d > 0 for d in shape), f"input {vi.name} needs a concrete shape"
        feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def assert_same_outputs(original: onnx.ModelProto, rewritten: onnx.ModelProto, shapes: dict, seed: int) -> None:
    feeds = _feeds(original, shapes, seed)
    a, b = _session(original), _session(rewritten)
    names = [o.name for o in a.get_outputs()]
    assert [o.name for o in b.get_outputs()] == names
    for name, ref, got in zip(names, a.run(names, feeds), b.run(names, feeds)):
        assert got.shape == ref.shape, (name, got.shape, ref.shape)
        scale = max(1.0, float(np.abs(ref).max()))
        err = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max())
        assert err <= 1e-5 * scale, f"output {name}: max abs error {err:.3g} at shapes {shapes}"
        assert float(np.abs(ref).max()) > 0  # a nonzero signal, so the comparison means something


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def check_rewritten_model(original: onnx.ModelProto, out: onnx.ModelProto, spec: dict) -> None:
    assert out.ir_version == original.ir_version
    assert [(o.domain, o.version) for o in out.opset_import] == [
        (o.domain, o.version) for o in original.opset_import
    ]
    # graph interface unchanged, symbolic dims included (--shape must not be baked in)
    assert [onnx.helper.printable_value_info(i) for i in out.graph.input] == [
        onnx.helper.printable_value_info(i) for i in original.graph.input
    ]
    assert [o.name for o in out.graph.output] == [o.name for o in original.graph.output]
    refused = spec.get("refused", {})
    remaining = [n for n in out.graph.node if n.op_type == "ConvTranspose"]
    assert sorted(n.name for n in remaining) == sorted(refused)
    for n in remaining:  # the refused site is left exactly as it was, reading its graph-input weight
        assert n.input[1] == refused[n.name]
        assert n in list(original.graph.node)
    before, after = op_counts(original), op_counts(out)
    kept = [n for n in out.graph.node]
    for op in ("Relu", "Concat"):  # ops outside the sites are untouched (sites may add Concats of their own)
        assert all(n in kept for n in original.graph.node if n.op_type == op), op
        assert after.get(op, 0) >= before.get(op, 0), op
    assert after.get("Conv", 0) >= before.get("Conv", 0) + spec["rewritten"]
    # weights reached through Constant -> Identity are dropped with the site they fed
    assert after.get("Constant", 0) == 0 and after.get("Identity", 0) == 0
    names = {t.name for t in out.graph.initializer}
    assert len(names) == len(out.graph.initializer)
    used = {i for n in out.graph.node for i in n.input}
    assert names <= used, f"orphaned initializers: {sorted(names - used)}"


def run_shapes(spec: dict) -> list[dict]:
    return spec.get("run_shapes", [spec.get("shapes", {})])


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.mark.parametrize("path", model_params())
def test_cli_convert_shipped_model(path: Path, tmp_path: Path):
    spec = SPECS[path.stem]
    out = tmp_path / f"{path.stem}.out.onnx"
    report_file = tmp_path / "report.json"
    args = ["convert", str(path), "-o", str(out), "--report", str(report_file)]
    for name, dims in spec.get("shapes", {}).items():
        args += ["--shape", f"{name}={'x'.join(map(str, dims))}"]
    result = CliRunner().invoke(cli, args)
    refused = spec.get("refused", {})
    assert result.exit_code == (3 if refused else 0), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert out.is_file()

    report = json.loads(report_file.read_text())
    assert report["verified"] is True and report["verification"] == "passed"
    assert report["summary"] == {"sites": spec["rewritten"] + len(refused), "rewritten": spec["rewritten"],
                                 "refused": len(refused)}
    assert report["written"] == [str(out)]
    assert all(o["ok"] and o["max_abs_error"] <= o["tolerance"] for o in report["outputs"])
    for site in report["sites"]:
        if site["status"] == "refused":
            assert site["node"] in refused
            reason = site["reason"]
            assert site["node"] in reason and "not constant" in reason and "graph input" in reason, reason
            assert reason in result.output  # the refusal reason is printed too
        else:
            assert site["status"] == "rewritten" and site["target"] == "subpixel"

    original, rewritten = onnx.load(str(path)), onnx.load(str(out))
    check_rewritten_model(original, rewritten, spec)
    for i, shapes in enumerate(run_shapes(spec)):
        assert_same_outputs(original, rewritten, shapes, seed=100 + i)
    assert not list(tmp_path.glob(".uprewrite-*"))  # no temp folder left behind by the atomic save


def test_cli_chooses_sizes_for_dynamic_batch_without_shape(tmp_path: Path):
    """No --shape: the symbolic dims get sizes at which the model runs, printed, and stay symbolic."""
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(cli, ["convert", str(MODELS / "dynamic_batch.onnx"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "(chosen; --shape overrides)" in result.output
    assert "at the second input size" in result.output
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value")


def test_cli_only_selects_the_refused_site(tmp_path: Path):
    """--only with just the refused site: nothing rewritten, exit 3, model written unchanged in op terms."""
    path = MODELS / "weights_as_input.onnx"
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(cli, ["convert", str(path), "-o", str(out), "--only", "up0_dynamic_weight"])
    assert result.exit_code == 3, result.output
    assert op_counts(onnx.load(str(out))) == {"ConvTranspose": 2}


# ---------------------------------------------------------------------------------------------
# Python API


@pytest.mark.parametrize("path", model_params())
def test_api_convert_shipped_model(path: Path, tmp_path: Path):
    spec = SPECS[path.stem]
    original = onnx.load(str(path))
    pristine = original.SerializeToString()
    result = onnx_uprewrite.convert(original, to="subpixel", shapes=spec.get("shapes"))
    assert original.SerializeToString() == pristine  # the caller's ModelProto is not mutated
    assert result.output is None and not list(tmp_path.iterdir())  # nothing written unless asked
    report = result.report
    assert report.verified
    assert [s.node for s in report.refused] == list(spec.get("refused", {}))
    assert len(report.rewritten) == spec["rewritten"]
    for s in report.rewritten:
        assert s.source == "convtranspose" and s.target == "subpixel" and s.form
    check_rewritten_model(original, result.model, spec)
    for i, shapes in enumerate(run_shapes(spec)):
        assert_same_outputs(original, result.model, shapes, seed=200 + i)


def test_output_shape_after_same_site_uses_measured_length():
    """onnx shape inference says 9x9 before up1, onnxruntime 8x8: the measured length wins."""
    result = onnx_uprewrite.convert(str(MODELS / "output_shape_same.onnx"))
    assert result.report.verified and not result.report.refused
    assert result.report.outputs[0].shape == (1, 4, 15, 17)


# ---------------------------------------------------------------------------------------------
# make_models.py


def _load_make_models():
    spec = importlib.util.spec_from_file_location("make_models_under_test", MODELS / "make_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_models_is_deterministic(tmp_path: Path):
    make_models = _load_make_models()
    assert set(make_models.BUILDERS) == {p.name for p in shipped_models()}
    written = make_models.write_all(tmp_path)
    assert sorted(p.name for p in written) == sorted(make_models.BUILDERS)
    for path in written:
        assert path.parent == tmp_path
        assert path.read_bytes() == (MODELS / path.name).read_bytes(), f"{path.name} differs from the shipped file"
    # and a second build in the same process is identical too (no hidden global random state)
    for name in make_models.BUILDERS:
        assert make_models.build(name).SerializeToString() == (tmp_path / name).read_bytes()
