"""Hostile input, malformed files: every one ends in exit 2 and one line naming the file and the culprit.

Covers what cannot be parsed (empty, random bytes, truncated protobuf, text, a directory, a missing
path, a protobuf that is not a model) and models that parse but are broken (tensors nobody
produces, cycles, duplicate names, missing or unknown opset imports and IR versions, declared
sizes that are not positive, weights whose stored data disagrees with their shape, attributes
onnxruntime rejects).  Each case asserts the exit code, the single ``uprewrite: error:`` line, no
traceback, nothing written and the input bytes unchanged (``hostile.assert_refused``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hostile import assert_refused, graph_model


def _mutated(mutate):
    """A writer of the default ConvTranspose model after ``mutate(model)``."""
    def make(path: Path, build):
        m = build()
        mutate(m)
        path.write_bytes(m.SerializeToString())
    return make


def _short_raw_data(m):
    w = m.graph.initializer[0]
    w.raw_data = w.raw_data[:-8]


def _short_float_data(m):
    w = m.graph.initializer[0]
    w.ClearField("raw_data")
    w.float_data.extend([1.0, 2.0, 3.0])


def _retype_input(elem_type):
    return lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type", elem_type)


def _declare_dim(value):
    return lambda m: m.graph.input[0].type.tensor_type.shape.dim[2].__setattr__("dim_value", value)


def _write(data: bytes):
    def make(path: Path, build):
        path.write_bytes(data)
    return make


def _model(model_fn):
    return lambda path, build: path.write_bytes(model_fn().SerializeToString())


def _truncated(path: Path, build):
    data = build().SerializeToString()
    path.write_bytes(data[: len(data) // 2])


BAD_FILES = {
    "missing": (lambda path, build: None, ["no such file"]),
    "directory": (lambda path, build: path.mkdir(), ["directory"]),
    "empty": (_write(b""), ["empty file"]),
    "random_bytes": (_write(np.random.default_rng(0).bytes(4096)), []),
    "truncated": (_truncated, []),
    "text": (_write(b"ir_version: 8\nthis is a text file, not a protobuf\n"), []),
    "tensor_proto": (_write(numpy_helper.from_array(np.ones((2, 3), np.float32), "t").SerializeToString()), []),
    # these parse as a ModelProto (protobuf skips unknown fields) but hold no graph
    "tensor_proto_unnamed": (_write(numpy_helper.from_array(np.ones((2, 3), np.float32)).SerializeToString()),
                             ["not an ONNX model"]),
    "graph_proto": (_write(helper.make_graph([], "g", [], []).SerializeToString()), ["not an ONNX model"]),
    "model_without_graph": (_write(onnx.ModelProto(ir_version=8).SerializeToString()), ["not an ONNX model"]),
    "unproduced_tensor": (
        _model(lambda: graph_model([helper.make_node("Add", ["x", "ghost"], ["y"], name="add")])),
        ["node 'add'", "'ghost'", "nothing produces"],
    ),
    "duplicate_producer": (
        _model(lambda: graph_model([helper.make_node("Relu", ["x"], ["y"], name="a"),
                                    helper.make_node("Sigmoid", ["x"], ["y"], name="b")])),
        ["'y'", "produced twice", "'b'"],
    ),
    "cycle": (
        _model(lambda: graph_model([helper.make_node("Add", ["x", "t2"], ["t1"], name="add"),
                                    helper.make_node("Relu", ["t1"], ["t2"], name="relu"),
                                    helper.make_node("Identity", ["t2"], ["y"], name="id")])),
        ["cycle"],
    ),
    "no_default_opset": (
        _model(lambda: graph_model([helper.make_node("Relu", ["x"], ["y"], name="r")],
                                   opsets=(("com.example", 1),))),
        ["opset"],
    ),
    "opset_too_old": (
        _model(lambda: graph_model([helper.make_node("Relu", ["x"], ["y"], name="r")], opsets=(("", 0),))),
        ["opset 0"],
    ),
    "output_produced_by_nobody": (
        _model(lambda: graph_model([helper.make_node("Relu", ["x"], ["t"], name="r")], outputs=("y",))),
        ["'y'"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_invalid_model_file_exits_2(tmp_path, case, ct_model):
    make, needles = BAD_FILES[case]
    path = tmp_path / "model.onnx"
    make(path, ct_model)
    assert_refused(tmp_path, ["convert", path], 2, str(path), *needles)


@pytest.mark.parametrize("case", ["missing", "truncated", "cycle"])
def test_inspect_and_verify_refuse_invalid_model_with_exit_2(tmp_path, model_file, case, ct_model):
    make, needles = BAD_FILES[case]
    good = model_file(name="good.onnx")
    bad = tmp_path / "model.onnx"
    make(bad, ct_model)
    assert_refused(tmp_path, ["inspect", bad], 2, str(bad), *needles)
    assert_refused(tmp_path, ["verify", good, bad], 2, str(bad), *needles)


BAD_MODELS = {
    "opset_too_new": (_mutated(lambda m: setattr(m.opset_import[0], "version", 99)), ["opset 99", "newer"]),
    "ir_version_too_new": (_mutated(lambda m: setattr(m, "ir_version", 99)), ["IR version 99"]),
    "duplicate_graph_input": (_mutated(lambda m: m.graph.input.append(m.graph.input[0])),
                              ["graph input 'x'", "twice"]),
    "duplicate_initializer": (_mutated(lambda m: m.graph.initializer.append(m.graph.initializer[0])),
                              ["initializer 'W'", "twice"]),
    "zero_declared_dim": (_mutated(_declare_dim(0)), ["input 'x'", "dimension 2", "declared as 0"]),
    "negative_declared_dim": (_mutated(_declare_dim(-3)), ["input 'x'", "dimension 2", "declared as -3"]),
    "undefined_input_type": (_mutated(_retype_input(TensorProto.UNDEFINED)), ["graph input 'x'", "element type"]),
    "string_input": (_mutated(_retype_input(TensorProto.STRING)), ["onnxruntime cannot run", "tensor(string)"]),
    "weight_raw_data_too_short": (_mutated(_short_raw_data), ["Initializer 'W'", "raw_data size"]),
    "weight_float_data_too_short": (_mutated(_short_float_data), ["Initializer 'W'", "count (3)"]),
    "weight_dtype_unknown": (_mutated(lambda m: setattr(m.graph.initializer[0], "data_type", 99)), ["'W'"]),
    "empty_op_type": (_mutated(lambda m: setattr(m.graph.node[0], "op_type", "")), ["onnxruntime cannot run"]),
    "unknown_default_domain_op": (_mutated(lambda m: setattr(m.graph.node[0], "op_type", "Frobnicate")),
                                  ["Frobnicate"]),
    "unknown_attribute": (_mutated(lambda m: m.graph.node[0].attribute.append(helper.make_attribute("bogus", 1))),
                          ["bogus"]),
    "weight_dtype_mismatch": (
        _mutated(lambda m: m.graph.initializer[0].CopyFrom(numpy_helper.from_array(
            numpy_helper.to_array(m.graph.initializer[0]).astype(np.float16), "W"))),
        ["float16"]),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_broken_model_exits_2_with_one_line(tmp_path, case, ct_model):
    make, needles = BAD_MODELS[case]
    path = tmp_path / "model.onnx"
    make(path, ct_model)
    _, line = assert_refused(tmp_path, ["convert", path], 2, str(path), *needles)
    assert ".cc:" not in line and "onnxruntime::" not in line  # no C++ source locations or signatures


def test_errors_of_onnxruntime_lose_their_source_location():
    from onnx_uprewrite.verify import _strip_source_location

    line = ("[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/onnxruntime/core/graph/model_load_utils.h:46 void "
            "onnxruntime::model_load_utils::ValidateOpsetForDomain(const std::unordered_map<std::string, int>&, "
            "const onnxruntime::logging::Logger&, bool, const std::string&, int) ONNX Runtime only *guarantees* "
            "support for models stamped with official released onnx opset versions.")
    assert _strip_source_location(line) == (
        "[ONNXRuntimeError] : 1 : FAIL : ONNX Runtime only *guarantees* support for models stamped with official "
        "released onnx opset versions.")
    assert _strip_source_location("plain message") == "plain message"


@pytest.mark.parametrize("cls, code", [("UsageError", 2), ("InvalidModelError", 2), ("VerificationImpossible", 2),
                                       ("ResourceLimit", 2), ("VerificationFailed", 1)])
def test_error_taxonomy_has_the_documented_exit_codes(cls, code):
    import onnx_uprewrite as up

    error = getattr(up, cls)
    assert issubclass(error, up.UprewriteError) and error.exit_code == code


def test_debug_shows_the_traceback_and_the_default_does_not(tmp_path):
    from hostile import run_module

    (tmp_path / "model.onnx").write_bytes(b"")
    quiet = run_module("convert", "model.onnx", cwd=tmp_path)
    loud = run_module("convert", "model.onnx", "--debug", cwd=tmp_path)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert loud.returncode == 2 and "Traceback" in loud.stderr and "InvalidModelError" in loud.stderr  # its own code


def test_group_zero_is_refused_before_onnxruntime_crashes_on_it(tmp_path, ct_model):
    """onnxruntime 1.31 dies of SIGFPE creating a session for a ConvTranspose with group=0."""
    path = tmp_path / "model.onnx"
    path.write_bytes(ct_model(group=0).SerializeToString())
    assert_refused(tmp_path, ["convert", path], 2, "node 'up'", "group=0")
