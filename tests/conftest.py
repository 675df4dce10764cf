"""Shared test fixtures: small, seeded one-ConvTranspose models built with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import hostile
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
OPSET = 17


def make_convtranspose_model(
    *,
    cin: int = 3,
    cout: int = 4,
    kernel=(4, 4),
    spatial=(5, 6),
    batch=1,
    bias: bool = True,
    name: str = "up",
    seed: int = 0,
    input_dims=None,
    **attrs,
) -> onnx.ModelProto:
    """``x -> ConvTranspose(name, W, B, **attrs) -> y``; defaults to k4 s2 p1 (2-D).

    ``input_dims`` overrides the declared shape of ``x`` (strings are symbolic dims).
    """
    rank = len(kernel)
    attrs.setdefault("strides", [2] * rank)
    attrs.setdefault("pads", [1] * (2 * rank))
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((cin, cout, *kernel)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "B"))
        inputs.append("B")
    dims = list(input_dims) if input_dims is not None else [batch, cin, *spatial]
    graph = helper.make_graph(
        [helper.make_node("ConvTranspose", inputs, ["y"], name=name, **attrs)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    return helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)])


def run_model(model, feeds: dict) -> dict:
    """Every output of ``model`` (a ModelProto) on ``feeds`` in onnxruntime, by name."""
    from onnx_uprewrite.verify import run_rewritten

    return run_rewritten(model, feeds)


def node_attrs(node) -> dict:
    """A node's attributes as Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.fixture
def emission_hook(monkeypatch):
    """``install(hook)``: ``hook(site, emission)`` runs after each site is emitted, before anything is
    verified (tests perturb an emission through it to show that verification catches it)."""
    from onnx_uprewrite import api

    def install(hook):
        rewritten = api._rewritten

        def spy(site, decision, rewrite, verify):
            hook(site, decision.emission)
            return rewritten(site, decision, rewrite, verify)
        monkeypatch.setattr(api, "_rewritten", spy)
    return install


@pytest.fixture
def ct_model():
    """The model builder, as a fixture (``ct_model(cin=8, ...)``)."""
    return make_convtranspose_model


@pytest.fixture
def model_file(tmp_path):
    """Write a model (default: the default ConvTranspose model) to ``tmp_path/<name>``; returns the path."""

    def write(model: onnx.ModelProto | None = None, name: str = "model.onnx"):
        path = tmp_path / name
        path.write_bytes((model or make_convtranspose_model()).SerializeToString())
        return path

    return write


@pytest.fixture
def ext_model(tmp_path, ct_model):
    """``tmp_path/m/model.onnx`` + ``model.onnx.data`` (8->8 channels, k4 s2 p1: weights 4 KiB)."""
    folder = tmp_path / "m"
    folder.mkdir()
    return hostile.save_external(ct_model(cin=8, cout=8), folder / "model.onnx")


@pytest.fixture
def no_external_reads(monkeypatch):
    """Fail if onnx is ever asked to read external data."""
    calls = []

    def forbidden(*args, **kwargs):
        calls.append(args)
        raise AssertionError("external data was read")

    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_model", forbidden)
    return calls
