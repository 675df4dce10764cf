"""Profiles never drift from measurements: every case that a real compiler compiled, rejected,
miscompiled or placed on the CPU (benchmarks/compilers/RESULTS.json, committed; no compiler is
installed here) must be what the compiler's profile predicts for the same model, rebuilt by
benchmarks/compilers/matrix.py.

Measured outcome: rejected/crashed -> "rejected"; ran with wrong values -> "wrong"; compiled with
an op placed on the CPU -> "cpu"; else "ok".  Vela: placement only (the numerics measured there are
onnx2tf's float32 conversion, not the NPU's); cases onnx2tf could not convert are skipped.  Predicted: the worst kind among check_model's
violations (rejected > wrong > cpu), "ok" when there are none.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from onnx_uprewrite import profile as pf

HERE = Path(__file__).resolve().parent.parent / "benchmarks" / "compilers"
RESULTS = json.loads((HERE / "RESULTS.json").read_text())
#: compiler (results/<name>.json) -> the profile derived from it
PROFILE_OF = {"openvino": "openvino", "mnn": "mnn", "iree": "iree", "ncnn": "ncnn", "tvm": "tvm",
              "rknn-rk3588": "rk3588", "rknn-rk3576": "rk3576", "vela-ethos-u55-128": "ethos-u55",
              "vela-ethos-u85-256": "ethos-u85", "rknn-rv1106": "rv1106",
              "rknn-rk3566": "rk3566", "rknn-rk3562": "rk3562"}
#: (compiler, case) -> (predicted, measured, why the profile knowingly differs: stricter than the compiler, or
#: another kind of violation where the language has one kind per op)
CONSERVATIVE = {
    ("iree", "k4s2p1_c2.subpixel/CRD"): ("wrong", "ok", "CRD is right only when C/(b*b) == b (here 8/4 == 2); "
                                         "the profile language cannot say that, so iree forbids CRD"),
    ("iree", "k9s3p4op2.subpixel/CRD"): ("wrong", "ok", "C/(b*b) == b (27/9 == 3): as above"),
    ("iree", "k8s4p2.subpixel/CRD"): ("wrong", "ok", "C/(b*b) == b (64/16 == 4): as above"),
    ("iree", "g2dil2_k3s2p2op1.source"): ("rejected", "ok", "only depthwise ConvTranspose fails; the profile "
                                          "language has no 'any group but depthwise', so iree allows group 1"),
    ("rknn-rk3588", "k2s2.subpixel/transpose"): ("cpu", "ok", "the Reshape/Transpose chains measured on the NPU "
                                                 "are the ones without a Slice after them; the profile language "
                                                 "cannot say that, so rk3588 marks them all CPU"),
    ("rknn-rk3588", "1d_k4s2p1.subpixel/phases"): ("cpu", "ok", "as above"),
    ("rknn-rk3588", "dil2_k3s2p2op1.subpixel/transpose"): ("cpu", "ok", "as above"),
    ("rknn-rk3588", "g2dil2_k3s2p2op1.subpixel/transpose"): ("cpu", "ok", "as above"),
}
CONSERVATIVE.update({
    ("rknn-rv1106", case): ("cpu", "ok", "rv1106 moves the 1-D CRD chain (a rank-4 Reshape) to the CPU but not the "
                            "2-D or 1-D per-phase ones (rank-4 Reshapes too); the profile language cannot tell them "
                            "apart, so Reshape max_rank is 3")
    for case in ("k4s2p1.subpixel/transpose", "k4s2p1_c2.subpixel/transpose", "k2s2.subpixel/transpose",
                 "k3s2p1op1.subpixel/transpose", "k9s3p4op2.subpixel/transpose", "k9s3p4op2_c4.subpixel/transpose",
                 "k8s4p2.subpixel/transpose", "k16s8p4.subpixel/transpose", "dil2_k3s2p2op1.subpixel/transpose",
                 "1d_k4s2p1.subpixel/phases", "3d_k4s2p1.subpixel/DCR", "nearest2_conv3.subpixel/transpose",
                 "nearest3_conv3.subpixel/transpose")})
CONSERVATIVE[("rknn-rv1106", "linear2_conv3.source")] = (
    "rejected", "wrong", "int8 bilinear Resize computes wrong values; one violation kind per op, and the 3-D Resize "
    "crashes the build: rejected")
CONSERVATIVE.update({
    (vela, "linear2_conv3.subpixel/transpose"): ("wrong", "ok", "onnx2tf converts this one Reshape/Transpose chain "
                                                 "right, 14 others wrong: the profile forbids them all")
    for vela in ("vela-ethos-u55-128", "vela-ethos-u85-256")})
CONSERVATIVE[("rknn-rk3566", "1d_k4s2p1.resize")] = (
    "rejected", "cpu", "1-D Resize falls back to the CPU, 3-D Resize crashes the build: one violation kind per op")
for _chip in ("rk3588", "rk3576", "rk3562", "rv1106"):
    CONSERVATIVE[(f"rknn-{_chip}", "3d_k4s2p1.source")] = (
        "cpu" if _chip == "rk3588" else "rejected", "ok",
        "a 3-D ConvTranspose with output_padding is rejected (3d_k3s2p1op1), one without builds; the profile language "
        "cannot tie output_padding to the rank: ConvTranspose ranks [1, 2]")
for _chip in ("rk3588", "rk3566"):
    CONSERVATIVE[(f"rknn-{_chip}", "3d_k3s2p1op1.source")] = (
        "cpu", "rejected", "ConvTranspose's violation kind is cpu (strides 3, 1-D/3-D on rk3566); this one is rejected: "
        "either way convert rewrites or refuses it")
CONSERVATIVE[("rknn-rv1106", "3d_k3s2p1op1.subpixel/DCR")] = ("cpu", "ok", "as 3d_k4s2p1.subpixel/DCR: Reshape max_rank 3")
#: (compiler, case) -> (predicted, measured, why): onnx2tf's mis-conversions that depend on a layer's
#: shapes, which no profile predicts (check --compiler vela compares onnx2tf's output on the real model)
UNPREDICTED = {
    (vela, case): (predicted_kind, "wrong", "onnx2tf mis-converts this layer (shape-dependent); the profile "
                                            "cannot predict it")
    for vela in ("vela-ethos-u55-128", "vela-ethos-u85-256")
    for case, predicted_kind in (("k2s2.subpixel/CRD", "ok"), ("k2s2.subpixel/DCR", "cpu"),
                                 ("k2s2.subpixel/phases", "cpu"), ("k3s2p1op1.subpixel/phases", "cpu"),
                                 ("k9s3p4op2.subpixel/phases", "cpu"), ("k9s3p4op2_c4.subpixel/phases", "cpu"),
                                 ("dil2_k3s2p2op1.subpixel/CRD", "ok"), ("dil2_k3s2p2op1.subpixel/DCR", "cpu"),
                                 ("g2dil2_k3s2p2op1.subpixel/CRD", "ok"), ("3d_k4s2p1.source", "cpu"),
                                 ("nearest3_conv3.subpixel/phases", "cpu"))}
_ORDER = ("ok", "cpu", "wrong", "rejected")


def _load_matrix():
    spec = importlib.util.spec_from_file_location("compilers_matrix", HERE / "matrix.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cases():
    matrix = _load_matrix()
    return {case: model for case, model in matrix.build_cases().items()}, matrix


def measured(result: dict, compiler: str = "") -> str | None:
    """The outcome; None where a Vela case never reached Vela (onnx2tf failed)."""
    if compiler.startswith("vela-"):
        # the numerics are onnx2tf's float32 TFLite (no Ethos-U simulator here): wrong values on the
        # path the profile models (onnx2tf, then Vela); Vela's own placement whenever it ran
        if "placement" not in result:
            return None if "onnx2tf" in result.get("message", "") else "rejected"
        if result["status"] == "wrong":
            return "wrong"
        return "cpu" if "CPU" in result["placement"].values() else "ok"
    if result["status"] in ("rejected", "crashed"):
        return "rejected"
    if result["status"] == "wrong":
        return "wrong"
    return "cpu" if "CPU" in (result.get("placement") or {}).values() else "ok"


def predicted(violations: list[pf.Violation]) -> str:
    return max((v.kind if v.kind != "rejected" else "rejected" for v in violations), key=_ORDER.index,
               default="ok")


def test_matrix_is_what_was_measured(cases):
    """The rebuilt models have the op census recorded with the measurements (an emitter change makes
    the committed results stale: rerun the harness)."""
    models, matrix = cases
    assert set(models) == set(RESULTS["cases"])
    for case, model in models.items():
        assert matrix.describe(case, model)["ops"] == RESULTS["cases"][case]["ops"], case


@pytest.mark.parametrize("compiler", sorted(c for c in RESULTS["compilers"] if c in PROFILE_OF))
def test_profile_predicts_every_measured_case(cases, compiler):
    models, _ = cases
    prof = pf.load_profile(PROFILE_OF[compiler])
    wrong, conservative = [], 0
    for case, row in RESULTS["cases"].items():
        result = row["results"].get(compiler)
        if result is None:
            continue
        want = measured(result, compiler)
        if want is None:
            continue
        violations = pf.check_model(models[case], prof)
        got = predicted(violations)
        known = CONSERVATIVE.get((compiler, case)) or UNPREDICTED.get((compiler, case))
        if known is not None:
            assert (got, want) == known[:2], f"{case}: no longer conservative as noted ({got} vs {want})"
            conservative += 1
        elif got != want:
            wrong.append(f"{case}: profile {prof.name} predicts {got} ({'; '.join(map(str, violations)) or '-'}), "
                         f"{compiler} measured {want} ({result.get('message', '')[:120]})")
    assert not wrong, "\n".join(wrong)
    assert conservative == sum(1 for c, _ in [*CONSERVATIVE, *UNPREDICTED] if c == compiler)


def test_every_profiled_compiler_was_measured():
    """A profile named in PROFILE_OF that exists must have its measurements committed."""
    for compiler, name in PROFILE_OF.items():
        if name in pf.builtin_names():
            assert compiler in RESULTS["compilers"], f"profile {name} has no measurements ({compiler})"
