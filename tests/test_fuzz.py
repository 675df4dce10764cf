"""Property-based fuzzing: mutated valid models never escape as uncaught exceptions.

Small valid seed models of every source form (ConvTranspose 1-D/2-D/3-D with group, dilation,
output_padding, output_shape and auto_pad; Resize/Upsample nearest and linear + Conv; Conv +
DepthToSpace DCR/CRD; Conv + Reshape/Transpose/Reshape pixel shuffle; Keras-style repeats + Conv;
QDQ; subgraphs) get 1-3 random mutations each (attributes dropped or set to values of any type,
weights of other shapes/dtypes or fed as graph inputs, declared input shapes/dtypes, node
inputs/outputs, Resize constants, opset/IR versions, duplicated/unknown nodes, odd names, ...).

The contract (README "Exit codes"; tests/test_cli.py) for each mutated model:

* ``api.convert`` returns a result whose report says ``verification == "passed"`` (or, with
  ``verify=False``, starts with ``skipped``), or raises an ``UprewriteError`` with a non-empty,
  one-line message and ``exit_code`` 1 or 2; the caller's ModelProto is never modified, and an
  output file exists exactly when convert returned;
* ``api.inspect`` returns a dict or raises such an ``UprewriteError``;
* the ``uprewrite convert`` CLI exits 0-3 through ``sys.exit`` with no traceback, a first stderr
  line ``uprewrite: error: ...`` on exit 1/2 (exit 2: that line alone), an output file exactly on
  exit 0/3, and the input file unchanged.

Any other exception is a bug, and so are a crash (a signal in onnxruntime or onnx), an example
running past EXAMPLE_SECONDS and a memory blowup.  The checks call the library directly, in a forked
copy of the pytest process (``Worker``), so that such a crash fails one example, reported with its
mutations, instead of killing pytest; ``UPREWRITE_FUZZ_IN_PROCESS=1`` runs them in pytest itself.
``pytest -s tests/test_fuzz.py`` prints the outcome counts.  Hypothesis runs derandomized (the
same examples every run) without an example database.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
import select
import signal
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from onnx_uprewrite import api
from onnx_uprewrite import profile as pf
from onnx_uprewrite.cli import cli
from onnx_uprewrite.errors import UprewriteError

FORMS = ("subpixel", "resize", "convtranspose")
F32 = TensorProto.FLOAT
N_CONVERT, N_INSPECT, N_CLI = 2400, 500, 60  # 2,960 mutated models
EXAMPLE_SECONDS = 10  # one tiny model takes milliseconds; longer is a hang or an unbounded computation
#: run the checks in a forked worker (a crash in onnxruntime/onnx then fails one example instead of
#: killing pytest); UPREWRITE_FUZZ_IN_PROCESS=1 runs them in the pytest process itself (for --pdb)
ISOLATE = hasattr(os, "fork") and os.environ.get("UPREWRITE_FUZZ_IN_PROCESS") != "1"
#: the tool's memory guard (budget.py) for onnxruntime runs; no address-space rlimit (it makes
#: onnxruntime's thread pools fail to start)
FUZZ_MEMORY_BUDGET = 256 << 20
#: a worker whose resident memory grows past this is killed and the example fails (an unbounded
#: computation outside onnxruntime, e.g. a Resize scale of 2**40, would otherwise exhaust the machine)
WORKER_MAX_RSS = 2 << 30

OUTCOMES: collections.Counter = collections.Counter()

FUZZ_SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "print_blob": False,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                              HealthCheck.large_base_example, HealthCheck.function_scoped_fixture],
}


# ---------------------------------------------------------------------------------------------
# choices: from hypothesis (the tests) or from random.Random (ad-hoc exploration)


class Draw:
    """The mutators' source of choices: ``st.data()`` in the tests, or a ``random.Random``."""

    def __init__(self, data=None, rng=None):
        self._data, self._rng = data, rng

    def int(self, lo: int, hi: int) -> int:
        if self._data is not None:
            return self._data.draw(st.integers(lo, hi))
        return self._rng.randint(lo, hi)

    def choice(self, seq):
        seq = list(seq)
        return seq[self.int(0, len(seq) - 1)]

    def chance(self, percent: int) -> bool:
        """True with ``percent`` % probability (hypothesis: shrinks towards False, the common path)."""
        return self.int(0, 99) >= 100 - percent


# ---------------------------------------------------------------------------------------------
# seed models: tiny (channels <= 4, spatial <= 6), valid, each runs in onnxruntime


def _w(rng, *shape):
    return (rng.standard_normal(shape) * 0.5).astype(np.float32)


def _model(nodes, inputs, inits, opset=17, ir=8, outputs=("y",), name="fuzz"):
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info(n, F32, s) for n, s in inputs],
        [helper.make_tensor_value_info(o, F32, None) for o in outputs], inits)
    return helper.make_model(graph, ir_version=ir, opset_imports=[helper.make_opsetid("", opset)])


def _ct(x_shape, w_shape, bias=True, seed=0, opset=17, ir=8, **attrs):
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(_w(rng, *w_shape), "W")]
    ins = ["x", "W"]
    if bias:
        cout = w_shape[1] * attrs.get("group", 1)
        inits.append(numpy_helper.from_array(_w(rng, cout), "B"))
        ins.append("B")
    node = helper.make_node("ConvTranspose", ins, ["y"], name="up", **attrs)
    return _model([node], [("x", x_shape)], inits, opset=opset, ir=ir)


def seed_ct2d():
    return _ct([1, 2, 3, 4], (2, 3, 4, 4), strides=[2, 2], pads=[1, 1, 1, 1])


def seed_ct1d():
    return _ct([1, 2, 5], (2, 2, 3), kernel_shape=[3], strides=[2], pads=[1, 1], output_padding=[1])


def seed_ct3d():
    return _ct([1, 2, 2, 2, 2], (2, 2, 2, 2, 2), bias=False, kernel_shape=[2, 2, 2], strides=[2, 2, 2])


def seed_ct_group_dilated():
    return _ct([1, 4, 3, 3], (4, 1, 3, 3), strides=[2, 2], dilations=[2, 2], pads=[1, 2, 1, 2], group=4)


def seed_ct_output_shape():
    return _ct([1, 2, 3, 3], (2, 2, 3, 3), strides=[2, 2], output_shape=[6, 5])


def seed_ct_same():
    return _ct([1, 2, 3, 3], (2, 2, 4, 4), strides=[2, 2], auto_pad="SAME_UPPER")


def seed_ct_symbolic():
    return _ct(["N", 2, "H", "W"], (2, 2, 4, 4), strides=[2, 2], pads=[1, 1, 1, 1])


def seed_ct_opset9():
    return _ct([1, 2, 3, 3], (2, 2, 3, 3), opset=9, ir=4, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])


def seed_ct_chain():
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(_w(rng, 2, 3, 4, 4), "W1"), numpy_helper.from_array(_w(rng, 3), "B1"),
             numpy_helper.from_array(_w(rng, 3, 2, 3, 3), "W2")]
    nodes = [
        helper.make_node("ConvTranspose", ["x", "W1", "B1"], ["h"], name="up1", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("ConvTranspose", ["r", "W2"], ["y"], name="up2", strides=[2, 2], pads=[1, 1, 1, 1],
                         output_padding=[1, 1]),
    ]
    return _model(nodes, [("x", [1, 2, 2, 3])], inits)


def seed_ct_constant_weight():
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Constant", [], ["wc"], name="wconst",
                         value=numpy_helper.from_array(_w(rng, 2, 2, 4, 4), "v")),
        helper.make_node("Identity", ["wc"], ["wi"], name="wid"),
        helper.make_node("ConvTranspose", ["x", "wi", "B"], ["y"], name="up", kernel_shape=[4, 4], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
    ]
    return _model(nodes, [("x", [1, 2, 3, 3])], [numpy_helper.from_array(_w(rng, 2), "B")])


def seed_ct_batchnorm():
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(_w(rng, 2, 2, 2, 2), "W"),
             numpy_helper.from_array(_w(rng, 2), "g"), numpy_helper.from_array(_w(rng, 2), "b"),
             numpy_helper.from_array(_w(rng, 2), "m"), numpy_helper.from_array(np.abs(_w(rng, 2)) + 0.5, "v")]
    nodes = [helper.make_node("ConvTranspose", ["x", "W"], ["h"], name="up", strides=[2, 2]),
             helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["y"], name="bn", epsilon=1e-5)]
    return _model(nodes, [("x", [1, 2, 3, 3])], inits)


def seed_ct_qdq():
    rng = np.random.default_rng(4)
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
        numpy_helper.from_array(np.array(128, np.uint8), "xz"),
        numpy_helper.from_array(rng.integers(-127, 128, (2, 2, 4, 4)).astype(np.int8), "wq"),
        numpy_helper.from_array(np.array(0.01, np.float32), "ws"), numpy_helper.from_array(np.array(0, np.int8), "wz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="qx"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dqx"),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="dqw"),
        helper.make_node("ConvTranspose", ["xd", "w"], ["y"], name="up", strides=[2, 2], pads=[1, 1, 1, 1]),
    ]
    return _model(nodes, [("x", [1, 2, 3, 3])], inits, opset=13)


def seed_ct_in_subgraph():
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(_w(rng, 2, 2, 2, 2), "W"), numpy_helper.from_array(np.array(True), "cond")]

    def branch(name):
        node = helper.make_node("ConvTranspose", ["x", "W"], [f"{name}_y"], name=f"{name}_up", strides=[2, 2])
        return helper.make_graph([node], name, [], [helper.make_tensor_value_info(f"{name}_y", F32, None)])

    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then"), else_branch=branch("else"))]
    return _model(nodes, [("x", [1, 2, 2, 2])], inits)


def _resize_conv(mode="nearest", ctm="asymmetric", nearest="floor", conv_pads=(1, 1, 1, 1), sizes=False,
                 opset=17, ir=8, seed=6):
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(_w(rng, 3, 2, 3, 3), "Wc"), numpy_helper.from_array(_w(rng, 3), "Bc")]
    if opset < 11:
        inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
        op = "Upsample" if opset < 10 else "Resize"
        resize = helper.make_node(op, ["x", "scales"], ["u"], name="rs", mode=mode)
    else:
        roi = ""
        if opset < 13:
            inits.append(numpy_helper.from_array(np.zeros(0, np.float32), "roi"))
            roi = "roi"
        if sizes:
            inits.append(numpy_helper.from_array(np.array([1, 2, 6, 6], np.int64), "sizes"))
            ins = ["x", roi, "", "sizes"]
        else:
            inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
            ins = ["x", roi, "scales"]
        resize = helper.make_node("Resize", ins, ["u"], name="rs", mode=mode, coordinate_transformation_mode=ctm,
                                  nearest_mode=nearest)
    conv = helper.make_node("Conv", ["u", "Wc", "Bc"], ["y"], name="conv", kernel_shape=[3, 3], pads=list(conv_pads))
    return _model([resize, conv], [("x", [1, 2, 3, 3])], inits, opset=opset, ir=ir)


def seed_resize_nearest():
    return _resize_conv()


def seed_resize_nearest_half_pixel():
    return _resize_conv(ctm="half_pixel", nearest="round_prefer_ceil", conv_pads=(0, 0, 0, 0))


def seed_resize_linear_merged():
    return _resize_conv(mode="linear", ctm="half_pixel", conv_pads=(0, 0, 0, 0))


def seed_resize_linear_standalone():
    return _resize_conv(mode="linear", ctm="half_pixel", conv_pads=(1, 1, 1, 1))


def seed_resize_sizes():
    return _resize_conv(sizes=True)


def seed_resize_opset11():
    return _resize_conv(opset=11, ir=6)


def seed_upsample_opset9():
    return _resize_conv(opset=9, ir=4)


def _subpixel(kind="DCR", crop=False, opset=17, seed=7):
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(_w(rng, 8, 2, 3, 3), "Wc"), numpy_helper.from_array(_w(rng, 8), "Bc")]
    nodes = [helper.make_node("Conv", ["x", "Wc", "Bc"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    out = "s" if crop else "y"
    if kind in ("DCR", "CRD"):
        nodes.append(helper.make_node("DepthToSpace", ["c"], [out], name="d2s", blocksize=2, mode=kind))
    else:  # Reshape -> Transpose -> Reshape, channel axis split as (c, s, s): CRD order
        inits += [numpy_helper.from_array(np.array([1, 2, 2, 2, 3, 3], np.int64), "split"),
                  numpy_helper.from_array(np.array([0, 2, 6, -1], np.int64), "merge")]
        nodes += [
            helper.make_node("Reshape", ["c", "split"], ["r"], name="split"),
            helper.make_node("Transpose", ["r"], ["t"], name="perm", perm=[0, 1, 4, 2, 5, 3]),
            helper.make_node("Reshape", ["t", "merge"], [out], name="merge"),
        ]
    if crop:
        inits += [numpy_helper.from_array(np.array([1, 0], np.int64), "starts"),
                  numpy_helper.from_array(np.array([-1, 5], np.int64), "ends"),
                  numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
        nodes.append(helper.make_node("Slice", [out, "starts", "ends", "axes"], ["y"], name="crop"))
    return _model(nodes, [("x", [1, 2, 3, 3])], inits, opset=opset)


def seed_d2s_dcr():
    return _subpixel("DCR")


def seed_d2s_crd_crop():
    return _subpixel("CRD", crop=True)


def seed_pixel_shuffle():
    return _subpixel("RTR")


def seed_repeat_conv():
    rng = np.random.default_rng(8)
    inits = [numpy_helper.from_array(np.array([3], np.int64), "uax"),
             numpy_helper.from_array(np.array([1, 1, 1, 2, 1], np.int64), "reps"),
             numpy_helper.from_array(np.array([1, 2, 6, 3], np.int64), "shape"),
             numpy_helper.from_array(_w(rng, 3, 2, 3, 3), "Wc")]
    nodes = [
        helper.make_node("Unsqueeze", ["x", "uax"], ["xu"], name="unsq"),
        helper.make_node("Tile", ["xu", "reps"], ["xt"], name="tile"),
        helper.make_node("Reshape", ["xt", "shape"], ["xr"], name="reshape"),
        helper.make_node("Conv", ["xr", "Wc"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    return _model(nodes, [("x", [1, 2, 3, 3])], inits, opset=13)


SEEDS = {f.__name__[5:]: f for f in [
    seed_ct2d, seed_ct1d, seed_ct3d, seed_ct_group_dilated, seed_ct_output_shape, seed_ct_same, seed_ct_symbolic,
    seed_ct_opset9, seed_ct_chain, seed_ct_constant_weight, seed_ct_batchnorm, seed_ct_qdq, seed_ct_in_subgraph,
    seed_resize_nearest, seed_resize_nearest_half_pixel, seed_resize_linear_merged, seed_resize_linear_standalone,
    seed_resize_sizes, seed_resize_opset11, seed_upsample_opset9, seed_d2s_dcr, seed_d2s_crd_crop,
    seed_pixel_shuffle, seed_repeat_conv,
]}
_SEED_BYTES = {name: f().SerializeToString() for name, f in SEEDS.items()}


def load_seed(name: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.ParseFromString(_SEED_BYTES[name])
    return model


# ---------------------------------------------------------------------------------------------
# values


HUGE = (2**40, 2**62, 2**63 - 1, -(2**63))  # far beyond any allocation: fails fast, never swaps
SMALL = (2, 1, 0, 3, -1, 4, 5, -2, 6)
ODD_NAMES = ("", "a\nb", "x", "W", "y", "ü\u00e9\u4e2d", "n" * 300, " ", "a'b\"c", "a\rb", "../x")
DTYPES = (TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT8, TensorProto.INT32, TensorProto.INT64,
          TensorProto.UINT8, TensorProto.BOOL, TensorProto.BFLOAT16, TensorProto.STRING, TensorProto.FLOAT8E4M3FN,
          TensorProto.UINT64, TensorProto.COMPLEX64, TensorProto.UNDEFINED, 99)

INT_LIST_ATTRS = {"strides", "pads", "kernel_shape", "dilations", "output_padding", "output_shape", "perm", "axes",
                  "starts", "ends"}
INT_ATTRS = {"group": (1, 2, 0, 3, 4, -1, 2**40), "blocksize": (2, 1, 0, 3, 4, -1, 2**40),
             "antialias": (0, 1, 2), "exclude_outside": (0, 1), "axis": (1, 0, -1, 2, 4, -5),
             "allowzero": (0, 1), "block_size": (0, 1, 2), "saturate": (0, 1), "training_mode": (0, 1),
             "keepdims": (0, 1)}
STR_ATTRS = {
    "auto_pad": ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID", "same_upper", "", "BOGUS"),
    "mode": ("nearest", "linear", "cubic", "DCR", "CRD", "bilinear", "NEAREST", "crd", "", "edge"),
    "coordinate_transformation_mode": ("half_pixel", "asymmetric", "pytorch_half_pixel", "align_corners",
                                       "tf_half_pixel_for_nn", "tf_crop_and_resize", "half_pixel_symmetric", "x"),
    "nearest_mode": ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil", "x"),
    "keep_aspect_ratio_policy": ("stretch", "not_larger", "not_smaller", "x"),
}
FLOAT_ATTRS = {"epsilon": (1e-5, 0.0, -1.0, float("nan"), 1e30), "momentum": (0.9, float("inf")),
               "cubic_coeff_a": (-0.75, -0.5, 0.0), "extrapolation_value": (0.0, float("nan"), 1.0),
               "scales": None}
OP_ATTRS = {
    "ConvTranspose": ("strides", "pads", "kernel_shape", "dilations", "group", "output_padding", "output_shape",
                      "auto_pad"),
    "Conv": ("strides", "pads", "kernel_shape", "dilations", "group", "auto_pad"),
    "Resize": ("mode", "coordinate_transformation_mode", "nearest_mode", "antialias", "exclude_outside", "axes",
               "keep_aspect_ratio_policy", "cubic_coeff_a", "extrapolation_value"),
    "Upsample": ("mode", "scales"),
    "DepthToSpace": ("blocksize", "mode"),
    "Transpose": ("perm",),
    "Reshape": ("allowzero",),
    "Slice": ("starts", "ends", "axes"),
    "BatchNormalization": ("epsilon", "momentum", "training_mode"),
    "QuantizeLinear": ("axis", "block_size", "saturate"),
    "DequantizeLinear": ("axis", "block_size"),
    "Unsqueeze": ("axes",),
}
SIBLING_OPS = {
    "ConvTranspose": ("Conv", "ConvTranspose"), "Conv": ("ConvTranspose", "ConvInteger", "Conv"),
    "Resize": ("Upsample", "Resize"), "Upsample": ("Resize",), "DepthToSpace": ("SpaceToDepth",),
    "Reshape": ("Flatten", "Expand"), "Transpose": ("Identity",), "Tile": ("Expand",), "Unsqueeze": ("Squeeze",),
    "Slice": ("Identity",), "Identity": ("Relu",), "DequantizeLinear": ("QuantizeLinear", "Identity"),
    "Relu": ("Sigmoid",), "BatchNormalization": ("InstanceNormalization",), "If": ("Loop",), "Constant": ("Identity",),
}


def small_int(d: Draw) -> int:
    return d.choice(HUGE) if d.chance(8) else d.choice(SMALL)


def int_list(d: Draw, rank: int) -> list[int]:
    n = d.choice((rank, 2 * rank, rank + 1, max(rank - 1, 0), 0, 3 * rank))
    return [small_int(d) for _ in range(n)]


def _ints_attribute(name: str, values: list[int]) -> AttributeProto:
    return helper.make_attribute(name, values, attr_type=AttributeProto.INTS)


def wild_attribute(d: Draw, name: str) -> AttributeProto:
    """An attribute ``name`` of a random type and value."""
    kind = d.choice(("int", "ints", "float", "floats", "string", "strings", "empty", "tensor", "graph", "bytes"))
    if kind == "int":
        return helper.make_attribute(name, small_int(d))
    if kind == "ints":
        return _ints_attribute(name, int_list(d, d.int(1, 4)))
    if kind == "float":
        return helper.make_attribute(name, d.choice((2.0, 0.5, -1.0, float("nan"), float("inf"), 1e30)))
    if kind == "floats":
        values = [d.choice((2.0, 1.0, 1.5, 0.0, -2.0, float("nan"))) for _ in range(d.int(1, 5))]
        return helper.make_attribute(name, values)
    if kind == "string":
        return helper.make_attribute(name, d.choice(("SAME_UPPER", "DCR", "CRD", "nearest", "", "x\ny", "2")))
    if kind == "strings":
        return helper.make_attribute(name, [b"a", b"NOTSET"])
    if kind == "bytes":
        return helper.make_attribute(name, b"\xff\xfe\x00")
    if kind == "empty":
        return helper.make_attribute(name, [], attr_type=d.choice((AttributeProto.INTS, AttributeProto.FLOATS,
                                                                   AttributeProto.STRINGS)))
    if kind == "tensor":
        return helper.make_attribute(name, numpy_helper.from_array(np.array([2, 2], np.int64), "t"))
    ident = helper.make_node("Identity", ["gin"], ["gout"])
    return helper.make_attribute(name, helper.make_graph(
        [ident], "sub", [helper.make_tensor_value_info("gin", F32, [1])],
        [helper.make_tensor_value_info("gout", F32, [1])]))


def plausible_attribute(d: Draw, name: str, rank: int) -> AttributeProto:
    """An attribute ``name`` of its usual type with an unusual (often invalid) value."""
    if name in INT_LIST_ATTRS:
        if name == "perm" and not d.chance(40):
            perm = list(range(d.choice((6, 4, 5, 3))))
            for i in range(len(perm) - 1, 0, -1):
                j = d.int(0, i)
                perm[i], perm[j] = perm[j], perm[i]
            return helper.make_attribute(name, perm)
        return _ints_attribute(name, int_list(d, rank))
    if name in INT_ATTRS:
        return helper.make_attribute(name, small_int(d) if d.chance(15) else d.choice(INT_ATTRS[name]))
    if name in STR_ATTRS:
        return helper.make_attribute(name, d.choice(STR_ATTRS[name]))
    if name == "scales":
        values = [d.choice((1.0, 2.0, 1.5, 3.0, 0.0, -2.0)) for _ in range(d.choice((4, 3, 5)))]
        return helper.make_attribute(name, values)
    if name in FLOAT_ATTRS:
        return helper.make_attribute(name, d.choice(FLOAT_ATTRS[name]))
    return wild_attribute(d, name)


def _rank_of(node: onnx.NodeProto) -> int:
    for a in node.attribute:
        if a.name in ("kernel_shape", "strides", "dilations") and a.ints:
            return len(a.ints)
    return 2


def _set_attribute(node: onnx.NodeProto, attr: AttributeProto, keep_old: bool = False) -> None:
    if not keep_old:
        kept = [a for a in node.attribute if a.name != attr.name]
        del node.attribute[:]
        node.attribute.extend(kept)
    node.attribute.append(attr)


# ---------------------------------------------------------------------------------------------
# mutators: each changes ``model`` in place and returns what it did


def _pick_node(model, d: Draw, ops=None):
    nodes = [n for n in model.graph.node if ops is None or n.op_type in ops]
    return d.choice(nodes) if nodes else None


def _tensor_names(model) -> list[str]:
    g = model.graph
    names = [i.name for i in g.input] + [t.name for t in g.initializer]
    names += [o for n in g.node for o in n.output if o]
    return list(dict.fromkeys(names))


def m_delete_attribute(model, d):
    node = _pick_node(model, d)
    if node is None or not node.attribute:
        return "delete attribute: none"
    attr = d.choice(node.attribute)
    node.attribute.remove(attr)
    return f"delete {node.name}.{attr.name}"


def m_wild_attribute(model, d):
    node = _pick_node(model, d)
    if node is None:
        return "wild attribute: no node"
    names = [a.name for a in node.attribute] + list(OP_ATTRS.get(node.op_type, ())) + ["bogus"]
    name = d.choice(names)
    attr = wild_attribute(d, name)
    keep = d.chance(10)
    _set_attribute(node, attr, keep_old=keep)
    return f"{node.name}.{name} = {helper.get_attribute_value(attr)!r}{' (duplicate)' if keep else ''}"


def m_plausible_attribute(model, d):
    node = _pick_node(model, d, tuple(OP_ATTRS))
    if node is None:
        return "plausible attribute: no node"
    name = d.choice([a.name for a in node.attribute if a.name in OP_ATTRS[node.op_type]] + list(OP_ATTRS[node.op_type]))
    attr = plausible_attribute(d, name, _rank_of(node))
    _set_attribute(node, attr)
    return f"{node.name}.{name} = {helper.get_attribute_value(attr)!r}"


def _array_like(d: Draw, old: np.ndarray) -> tuple[np.ndarray | TensorProto, str]:
    how = d.choice(("cast", "reshape", "empty", "scalar", "nonfinite", "huge", "swap", "drop_dim", "add_dim",
                    "exotic", "strings", "raw_truncated", "external", "zeros"))
    rng = np.random.default_rng(d.int(0, 3))
    if how == "cast":
        dtype = d.choice((np.float16, np.float64, np.int8, np.int32, np.int64, np.uint8, np.bool_, np.float32))
        return old.astype(dtype), f"cast to {np.dtype(dtype).name}"
    if how == "reshape":
        shape = tuple(d.int(0, 4) for _ in range(d.int(0, 5)))
        return rng.standard_normal(shape).astype(old.dtype if old.dtype != np.bool_ else np.float32), f"shape {shape}"
    if how == "empty":
        shape = d.choice(((0,), (old.shape[0] if old.ndim else 1, 0, *old.shape[2:]), (0, *old.shape[1:])))
        return np.zeros(shape, old.dtype), f"empty {shape}"
    if how == "scalar":
        return np.array(old.reshape(-1)[0] if old.size else 1, old.dtype), "scalar"
    if how == "nonfinite":
        if not np.issubdtype(old.dtype, np.floating) or not old.size:
            return old, "unchanged"
        new = old.copy()
        new.reshape(-1)[d.int(0, old.size - 1)] = d.choice((np.nan, np.inf, -np.inf))
        return new, "nan/inf element"
    if how == "huge":
        if not np.issubdtype(old.dtype, np.floating):
            return old, "unchanged"
        return (old * np.asarray(1e30, old.dtype)).astype(old.dtype), "scaled by 1e30"
    if how == "zeros":
        return np.zeros_like(old), "zeros"
    if how == "swap":
        if old.ndim >= 2:
            return np.ascontiguousarray(np.swapaxes(old, 0, 1)), "axes 0/1 swapped"
        return (old[::-1].copy() if old.ndim else old), "reversed"
    if how == "drop_dim":
        return (old[0].copy() if old.ndim and old.shape[0] else old), "leading dim dropped"
    if how == "add_dim":
        return old[None].copy(), "leading dim added"
    if how == "strings":
        return np.array([b"a"] * max(old.size, 1), dtype=object).reshape(old.shape if old.size else (1,)), "strings"
    if how == "exotic":
        dtype = d.choice((TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2, TensorProto.INT4))
        flat = old.astype(np.float32).reshape(-1) if old.dtype != object else np.zeros(1, np.float32)
        vals = [float(v) for v in flat] if dtype != TensorProto.INT4 else [int(max(-8, min(7, v))) for v in flat]
        return helper.make_tensor("t", dtype, list(old.shape), vals), f"dtype {TensorProto.DataType.Name(dtype)}"
    tensor = numpy_helper.from_array(np.ascontiguousarray(old), "t")
    if how == "raw_truncated":
        tensor.raw_data = tensor.raw_data[: len(tensor.raw_data) // 2]
        return tensor, "raw_data truncated"
    tensor.ClearField("raw_data")  # external data that was never loaded
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="weights.bin")
    return tensor, "external data"


def _to_array(t: TensorProto) -> np.ndarray | None:
    """The tensor's value, or None where an earlier mutation made it unreadable (external data, ...)."""
    if t.data_location == TensorProto.EXTERNAL:
        return None
    try:
        return numpy_helper.to_array(t)
    except Exception:  # noqa: BLE001 - truncated raw data, unknown dtype, ...
        return None


def m_initializer(model, d):
    inits = list(model.graph.initializer)
    if not inits:
        return "initializer: none"
    t = d.choice(inits)
    old = _to_array(t)
    if old is None or old.dtype == object:
        old = np.zeros((1,), np.float32)
    new, what = _array_like(d, old)
    if isinstance(new, TensorProto):
        new.name = t.name
        t.CopyFrom(new)
    else:
        t.CopyFrom(numpy_helper.from_array(new, t.name))
    return f"initializer {t.name}: {what}"


def m_constant_values(model, d):
    """Small int64/float constants (Resize scales/sizes, Reshape shapes, Slice starts, Tile repeats):
    other values of the same dtype, or one element more or fewer."""
    inits = [t for t in model.graph.initializer if t.data_type in (TensorProto.INT64, F32) and len(t.dims) == 1
             and t.dims[0] <= 8 and _to_array(t) is not None]
    if not inits:
        return "constant values: none"
    t = d.choice(inits)
    old = _to_array(t).reshape(-1)
    values = list(old)
    if t.data_type == TensorProto.INT64:
        pool = (1, 2, 0, -1, 3, 6, 4, 2**40, -(2**63), 5)
    else:
        pool = (1.0, 2.0, 0.0, 1.5, 3.0, -2.0, 0.5, float("nan"), float("inf"), 2.0**40, 1.0000001)
    n_changes = d.int(1, 3)
    for _ in range(n_changes):
        op = d.choice(("set", "set", "append", "pop"))
        if op == "set" and values:
            values[d.int(0, len(values) - 1)] = d.choice(pool)
        elif op == "append":
            values.append(d.choice(pool))
        elif values:
            values.pop()
    new = np.array(values, old.dtype)
    t.CopyFrom(numpy_helper.from_array(new, t.name))
    return f"constant {t.name} = {new.tolist()}"


def m_dynamic_weight(model, d):
    """An initializer becomes a graph input (weights fed at run time), or a graph input with a
    default (the initializer stays: callers may override it)."""
    inits = list(model.graph.initializer)
    if not inits:
        return "dynamic weight: none"
    t = d.choice(inits)
    vi = helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    model.graph.input.append(vi)
    if not d.chance(40):
        model.graph.initializer.remove(t)
        return f"{t.name} is a graph input"
    return f"{t.name} is a graph input with a default initializer"


def _feeds(model):
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def m_input_shape(model, d):
    inputs = _feeds(model) or list(model.graph.input)
    if not inputs:
        return "input shape: none"
    vi = d.choice(inputs)
    tt = vi.type.tensor_type
    dims = tt.shape.dim
    how = d.choice(("symbolic", "zero", "negative", "drop_dim", "add_dim", "no_shape", "unknown_dim", "other_value",
                    "huge", "scalar"))
    if how == "no_shape":
        tt.ClearField("shape")
    elif how == "scalar":
        del dims[:]
        tt.shape.SetInParent()
    elif how == "drop_dim" and len(dims):
        del dims[d.int(0, len(dims) - 1)]
    elif how == "add_dim":
        dims.add().dim_value = d.choice((1, 2, 3))
    elif len(dims):
        dim = dims[d.int(0, len(dims) - 1)]
        if how == "symbolic":
            dim.dim_param = d.choice(("N", "H", "W", "x", ""))
        elif how == "zero":
            dim.dim_value = 0
        elif how == "negative":
            dim.dim_value = -1
        elif how == "unknown_dim":
            dim.Clear()
        elif how == "huge":
            dim.dim_value = 2**62
        else:
            dim.dim_value = d.choice((1, 2, 3, 4, 5, 6))
    shown = [x.dim_value if x.HasField("dim_value") else x.dim_param or "?" for x in dims]
    return f"input {vi.name} shape: {how} -> {shown}"


def m_elem_type(model, d):
    vis = list(model.graph.input) + list(model.graph.output)
    if not vis:
        return "elem type: no graph inputs or outputs"
    vi = d.choice(vis)
    how = d.choice(("dtype", "dtype", "sequence", "optional", "no_type"))
    if how == "dtype":
        vi.type.tensor_type.elem_type = d.choice(DTYPES)
    elif how == "sequence":
        vi.type.CopyFrom(helper.make_sequence_type_proto(helper.make_tensor_type_proto(F32, [1, 2, 3, 3])))
    elif how == "optional":
        vi.type.CopyFrom(helper.make_optional_type_proto(helper.make_tensor_type_proto(F32, [1, 2, 3, 3])))
    else:
        vi.ClearField("type")
    return f"{vi.name} type: {how}"


def m_node_inputs(model, d):
    node = _pick_node(model, d)
    if node is None:
        return "node inputs: none"
    names = _tensor_names(model)
    how = d.choice(("empty", "other", "missing", "drop_last", "append", "swap", "clear"))
    i = d.int(0, max(len(node.input) - 1, 0))
    if how == "empty" and node.input:
        node.input[i] = ""
    elif how == "other" and node.input:
        node.input[i] = d.choice(names)
    elif how == "missing" and node.input:
        node.input[i] = "nonexistent"
    elif how == "drop_last" and node.input:
        del node.input[-1]
    elif how == "append":
        node.input.append(d.choice(names + [""]))
    elif how == "swap" and len(node.input) >= 2:
        j = d.int(0, len(node.input) - 1)
        node.input[i], node.input[j] = node.input[j], node.input[i]
    elif how == "clear":
        del node.input[:]
    return f"{node.name} inputs ({how}): {list(node.input)}"


def m_node_outputs(model, d):
    node = _pick_node(model, d)
    if node is None:
        return "node outputs: none"
    how = d.choice(("rename", "rename_everywhere", "empty", "append", "clear", "existing"))
    old = node.output[0] if node.output else ""
    if how == "rename" and node.output:
        node.output[0] = "renamed"
    elif how == "rename_everywhere" and node.output:
        new = d.choice(ODD_NAMES[1:])
        if new in _tensor_names(model):
            new = new + "_2"
        _rename_tensor(model, old, new)
    elif how == "empty" and node.output:
        node.output[0] = ""
    elif how == "append":
        node.output.append(d.choice(("extra", "")))
    elif how == "clear":
        del node.output[:]
    elif how == "existing" and node.output:
        node.output[0] = d.choice(_tensor_names(model))
    return f"{node.name} outputs ({how}): {list(node.output)}"


def _rename_tensor(model, old: str, new: str) -> None:
    g = model.graph
    for n in g.node:
        for i, v in enumerate(n.input):
            if v == old:
                n.input[i] = new
        for i, v in enumerate(n.output):
            if v == old:
                n.output[i] = new
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.name == old:
            vi.name = new
    for t in g.initializer:
        if t.name == old:
            t.name = new


def m_rename(model, d):
    """Odd node, tensor and graph names: empty, newline, unicode, very long, clashing."""
    what = d.choice(("node", "node", "tensor", "graph", "all_nodes_same"))
    name = d.choice(ODD_NAMES)
    if what == "graph":
        model.graph.name = name
    elif what == "all_nodes_same":
        for n in model.graph.node:
            n.name = name
    elif what == "node":
        node = _pick_node(model, d)
        if node is not None:
            node.name = name
    else:
        tensors = _tensor_names(model)
        old = d.choice(tensors) if tensors else ""
        if old and name and name not in tensors:
            _rename_tensor(model, old, name)
    return f"rename {what} -> {name!r}"


def m_graph_outputs(model, d):
    g = model.graph
    how = d.choice(("expose", "expose", "remove", "duplicate", "add_input", "shape"))
    if how == "expose":
        inner = [o for n in g.node for o in n.output if o and o not in {x.name for x in g.output}]
        if inner:
            name = d.choice(inner)
            g.output.append(helper.make_empty_tensor_value_info(name))
            return f"graph output + {name}"
    elif how == "remove" and g.output:
        del g.output[d.int(0, len(g.output) - 1)]
    elif how == "duplicate" and g.output:
        g.output.append(g.output[0])
    elif how == "add_input":
        g.input.append(helper.make_tensor_value_info("unused", F32, [1, 2]))
    elif how == "shape" and g.output:
        g.output[0].type.tensor_type.elem_type = F32
        g.output[0].type.tensor_type.shape.Clear()
        for v in (1, 1, 7, 7):
            g.output[0].type.tensor_type.shape.dim.add().dim_value = v
    return f"graph outputs: {how}"


def m_value_info(model, d):
    """A value_info for an intermediate tensor with a wrong shape or dtype (shape inference reads it)."""
    inner = [o for n in model.graph.node for o in n.output if o]
    if not inner:
        return "value_info: none"
    name = d.choice(inner)
    dims = [d.choice((1, 2, 3, 5, 0, "N")) for _ in range(d.int(0, 5))]
    vi = helper.make_tensor_value_info(name, d.choice((F32, F32, TensorProto.INT64, TensorProto.FLOAT16)), dims)
    model.graph.value_info.append(vi)
    return f"value_info {name}: {dims}"


def m_opset(model, d):
    how = d.choice(("version", "version", "version", "remove", "duplicate", "domain", "ai_onnx"))
    default = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if how == "version" and default:
        default[0].version = d.choice((1, 6, 7, 8, 9, 10, 11, 12, 13, 16, 17, 18, 19, 21, 22, 99, 0, -1))
    elif how == "remove":
        for o in default:
            model.opset_import.remove(o)
    elif how == "duplicate":
        model.opset_import.append(helper.make_opsetid("", d.choice((9, 13, 17))))
    elif how == "domain":
        model.opset_import.append(helper.make_opsetid(d.choice(("com.microsoft", "com.fuzz", "ai.onnx.ml")), 1))
    elif how == "ai_onnx" and default:
        default[0].domain = "ai.onnx"
    return f"opset: {how} -> {[(o.domain, o.version) for o in model.opset_import]}"


def m_ir_version(model, d):
    model.ir_version = d.choice((3, 4, 6, 7, 8, 9, 10, 11, 0, 1, 99, -1))
    return f"ir_version = {model.ir_version}"


def m_duplicate_node(model, d):
    node = _pick_node(model, d)
    if node is None:
        return "duplicate node: none"
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    if d.chance(50):
        del copy.output[:]
        copy.output.extend(f"{o}_dup" for o in node.output)
    model.graph.node.insert(d.int(0, len(model.graph.node)), copy)
    return f"duplicate {node.name} -> {list(copy.output)}"


def m_insert_node(model, d):
    """An unknown op, or an Identity/Relu/Cast spliced into an edge (breaking or stretching patterns)."""
    g = model.graph
    node = _pick_node(model, d)
    if node is None or not node.input or not node.input[0]:
        return "insert node: none"
    op = d.choice(("FooBar", "Identity", "Relu", "Cast", "Neg", "Identity", "Conv"))
    domain = d.choice(("", "", "com.fuzz", "com.microsoft"))
    src = node.input[0]
    attrs = {"to": d.choice((TensorProto.FLOAT16, F32, TensorProto.DOUBLE))} if op == "Cast" else {}
    new = helper.make_node(op, [src], [f"{src}_ins"], name=f"ins_{op}", domain=domain, **attrs)
    node.input[0] = f"{src}_ins"
    g.node.insert(list(g.node).index(node), new)
    return f"insert {domain}:{op} before {node.name}"


def m_change_node(model, d):
    node = _pick_node(model, d)
    if node is None:
        return "change node: none"
    how = d.choice(("op_type", "op_type", "domain", "remove", "doc"))
    if how == "op_type":
        node.op_type = d.choice(SIBLING_OPS.get(node.op_type, ("FooBar",)) + ("FooBar",))
    elif how == "domain":
        node.domain = d.choice(("ai.onnx", "com.microsoft", "com.fuzz", "ai.onnx.ml"))
    elif how == "remove":
        model.graph.node.remove(node)
    else:
        node.doc_string = "x\ny"
    return f"{node.name}: {how} -> {node.domain}:{node.op_type}"


def m_shuffle_nodes(model, d):
    nodes = list(model.graph.node)
    how = d.choice(("reverse", "rotate"))
    nodes = nodes[::-1] if how == "reverse" else nodes[1:] + nodes[:1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return f"nodes {how}d"


def m_misc(model, d):
    g = model.graph
    how = d.choice(("sparse_weight", "function", "metadata", "training", "no_graph", "clear_nodes"))
    if how == "sparse_weight" and g.initializer:
        t = d.choice(list(g.initializer))
        dense = _to_array(t)
        if dense is None or dense.dtype != np.float32:
            dense = np.zeros(list(t.dims), np.float32)
        flat = dense.reshape(-1)
        idx = np.nonzero(flat)[0].astype(np.int64)
        values = numpy_helper.from_array(flat[idx].astype(np.float32), t.name)
        sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(idx, ""), list(t.dims))
        g.initializer.remove(t)
        g.sparse_initializer.append(sparse)
    elif how == "function":
        fn = helper.make_function("com.fuzz", "ConvTranspose", ["a"], ["b"],
                                  [helper.make_node("Identity", ["a"], ["b"])], [helper.make_opsetid("", 17)])
        model.functions.append(fn)
        model.opset_import.append(helper.make_opsetid("com.fuzz", 1))
        node = _pick_node(model, d)
        if node is not None:
            node.domain = "com.fuzz"
    elif how == "metadata":
        helper.set_model_props(model, {"a": "b\nc"})
    elif how == "training":
        model.training_info.add().algorithm.CopyFrom(helper.make_graph([], "t", [], []))
    elif how == "no_graph":
        model.ClearField("graph")
    elif how == "clear_nodes":
        del g.node[:]
    return f"misc: {how}"


MUTATORS = (  # (mutator, weight); choice() shrinks towards the first
    (m_plausible_attribute, 22), (m_delete_attribute, 10), (m_wild_attribute, 10), (m_initializer, 12),
    (m_constant_values, 10), (m_dynamic_weight, 4), (m_input_shape, 8), (m_elem_type, 4), (m_node_inputs, 6),
    (m_node_outputs, 4), (m_rename, 3), (m_graph_outputs, 4), (m_value_info, 3), (m_opset, 6), (m_ir_version, 2),
    (m_duplicate_node, 2), (m_insert_node, 4), (m_change_node, 3), (m_shuffle_nodes, 1), (m_misc, 2),
)
_WEIGHTED = [m for m, w in MUTATORS for _ in range(w)]


def mutate(d: Draw) -> tuple[onnx.ModelProto, list[str]]:
    """A seed model with 1-3 mutations, and what was done (seed name first)."""
    seed = d.choice(sorted(SEEDS))
    model = load_seed(seed)
    log = [f"seed {seed}"]
    for _ in range(d.int(1, 3)):
        mutator = d.choice(_WEIGHTED)
        log.append(mutator(model, d))
    return model, log


def convert_options(model, d: Draw) -> dict:
    """Keyword arguments of api.convert: mostly defaults; at times --shape, --no-verify, --only, --from,
    --to fastest or a built-in --profile."""
    opts = {"to": d.choice(FORMS), "verify": not d.chance(25), "memory_budget": FUZZ_MEMORY_BUDGET}
    if d.chance(20):
        feeds = _feeds(model)
        name = "nope" if not feeds or d.chance(15) else feeds[0].name
        opts["shapes"] = {name: d.choice(((1, 2, 3, 4), (1, 2, 3, 3), (2, 2, 3, 3), (1, 2, 5), (1, 4, 3, 3),
                                          (1, 2, 2, 2, 2), (1, 2, 2, 3), (3,)))}
    if d.chance(5):
        names = [n.name for n in model.graph.node] or ["x"]
        opts["only"] = [d.choice(names + ["nope"])]
    if d.chance(5):
        opts["sources"] = [d.choice(api.SOURCES)]
    if d.chance(5):
        opts["to"] = "fastest"
    elif d.chance(8):
        opts["profile"] = d.choice(pf.builtin_names())
    return opts


# ---------------------------------------------------------------------------------------------
# the contract


class ExampleTimeout(BaseException):
    """An example ran past EXAMPLE_SECONDS.  A BaseException, so that no ``except Exception`` in the
    library can turn it into a refusal."""


@contextlib.contextmanager
def time_limit(seconds: float = EXAMPLE_SECONDS):
    """Raise ExampleTimeout in the main thread after ``seconds`` (SIGALRM; a no-op where unavailable)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise ExampleTimeout(f"example ran longer than {seconds} s (a hang or an unbounded computation)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_error(exc: UprewriteError) -> None:
    """The documented form of a refusal: a non-empty one-line message and exit code 1 or 2."""
    message = str(exc)
    assert message.strip(), f"{type(exc).__name__} with an empty message"
    assert "\n" not in message and "\r" not in message, f"{type(exc).__name__}: multi-line message {message!r}"
    assert exc.exit_code in (1, 2), (type(exc).__name__, exc.exit_code)


def check_convert(model: onnx.ModelProto, opts: dict, output: Path | None = None) -> str:
    """Run api.convert under the contract; returns the outcome label.  Any exception other than an
    UprewriteError propagates (the test fails)."""
    before = model.SerializeToString()
    refusal = None
    try:
        with time_limit():
            result = api.convert(model, output=output, **opts)
    except UprewriteError as exc:
        refusal = exc  # checked outside the handler: one bug, one failure, wherever it was raised
    assert model.SerializeToString() == before, "convert modified the caller's ModelProto"
    if refusal is not None:
        check_error(refusal)
        assert output is None or not output.exists(), "output written although convert raised"
        if os.environ.get("FUZZ_LOG_FAILED") and refusal.exit_code == 1:
            with open(os.environ["FUZZ_LOG_FAILED"], "a") as fh:
                fh.write(f"{opts} {refusal}\n")
            Path(os.environ["FUZZ_LOG_FAILED"] + ".onnx").write_bytes(before)
        return f"convert refused: exit {refusal.exit_code} {type(refusal).__name__}"
    report = result.report
    if opts.get("verify", True):
        assert report.verification == "passed", report.verification
    else:
        assert report.verification.startswith("skipped"), report.verification
    assert isinstance(result.model, onnx.ModelProto)
    result.model.SerializeToString()
    if output is not None:
        assert output.is_file(), "convert returned without writing the output"
        output.unlink()
    statuses = collections.Counter(s.status for s in report.sites)
    if not report.sites:
        kind = "no sites"
    elif statuses["refused"]:
        kind = "some sites refused" if statuses["rewritten"] else "all sites refused"
    else:
        kind = "rewritten" if statuses["rewritten"] else "already in form"
    return f"converted ({'verified' if opts.get('verify', True) else 'unverified'}): {kind}"


def check_inspect(model: onnx.ModelProto, shapes=None) -> str:
    refusal = None
    try:
        with time_limit():
            info = api.inspect(model, shapes=shapes)
    except UprewriteError as exc:
        refusal = exc
    if refusal is not None:
        check_error(refusal)
        return f"inspect refused: exit {refusal.exit_code} {type(refusal).__name__}"
    assert isinstance(info, api.Inspection) and isinstance(info["sites"], list)
    refused = sum(1 for s in info["sites"] if s["refused"])
    return f"inspect ok: {'no sites' if not info['sites'] else 'with refusals' if refused else 'all sites parse'}"


# ---------------------------------------------------------------------------------------------
# the worker: the checks run in a forked copy of this process


class Escape(AssertionError):
    """A check failed in the worker: an exception other than UprewriteError, a broken contract, a
    crash (a signal in onnxruntime or onnx) or a hang."""


_ESCAPES: dict[tuple[str, str], type] = {}


def _escape(kind: str, where: str, text: str) -> Escape:
    """One Escape subclass per (exception type, innermost library frame), so that hypothesis
    reports (and shrinks) each distinct bug on its own."""
    cls = _ESCAPES.get((kind, where))
    if cls is None:
        cls = _ESCAPES[(kind, where)] = type(f"Escaped{kind}", (Escape,), {"where": where})
    return cls(f"{kind} at {where}\n{text}")


def _describe(exc: BaseException) -> tuple[str, str, str]:
    """(exception type, innermost frame in the library, or in this file for a broken contract; traceback)."""
    frames = traceback.extract_tb(exc.__traceback__)
    library = (f"{os.sep}onnx_uprewrite{os.sep}", f"{os.sep}passes{os.sep}")
    ours = [f for f in frames if any(part in f.filename for part in library)]
    if isinstance(exc, AssertionError) or not ours:
        ours = [f for f in frames if f.filename == __file__] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    if isinstance(exc, ExampleTimeout):
        where = "time_limit"  # wherever the alarm happened to land: one bug
    return type(exc).__name__, where, "".join(traceback.format_exception(exc))[-6000:]


def _call(check: str, model_bytes: bytes, args: tuple) -> str:
    model = onnx.ModelProto()
    model.ParseFromString(model_bytes)
    return CHECKS[check](model, *args)


def _serve(recv, send) -> None:
    """The worker's loop: (check, model bytes, args) in, ("ok", label) or ("error", description) out."""
    while True:
        try:
            check, model_bytes, args = pickle.load(recv)
        except EOFError:
            return
        try:
            answer = ("ok", _call(check, model_bytes, args))
        except BaseException as exc:  # noqa: BLE001 - every escape is reported to the parent
            answer = ("error", _describe(exc))
        pickle.dump(answer, send)
        send.flush()


class Worker:
    """Runs the checks in a forked copy of the test process (``ISOLATE``) or in it (otherwise).

    A worker that dies (SIGFPE or abort in native code) or stops answering fails the example that
    killed it, with its mutations in the hypothesis report; the next example gets a fresh worker.
    """

    def __init__(self):
        self.pid = None

    def run(self, check: str, model: onnx.ModelProto, *args) -> str:
        if not ISOLATE:
            return CHECKS[check](model, *args)
        if self.pid is None:
            self._start()
        pickle.dump((check, model.SerializeToString(), args), self.send)
        self.send.flush()
        start = time.monotonic()
        while not select.select([self.recv], [], [], 0.05)[0]:
            rss = self._rss()
            if rss > WORKER_MAX_RSS:
                self.stop(kill=True)
                raise _escape("MemoryBlowup", f"check_{check}", f"the worker grew to {rss >> 20} MiB during "
                              f"check_{check} (limit {WORKER_MAX_RSS >> 20} MiB) and was killed")
            if time.monotonic() - start > EXAMPLE_SECONDS + 30:
                self.stop(kill=True)
                raise _escape("Hang", f"check_{check}",
                              f"no answer in {EXAMPLE_SECONDS + 30} s (stuck in native code?)")
        try:
            status, payload = pickle.load(self.recv)
        except (EOFError, pickle.UnpicklingError):
            died = self.stop()
            raise _escape(f"Crash{died}", f"check_{check}", f"the process died ({died}) during check_{check}; "
                          "its stack is in the captured stderr") from None
        if status == "ok":
            return payload
        self.stop()  # a fresh worker for the next example: no state left over from a failure
        raise _escape(*payload)

    def _rss(self) -> int:
        """Resident bytes of the worker (0 where /proc is not available)."""
        try:
            with open(f"/proc/{self.pid}/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def _start(self) -> None:
        to_worker_r, to_worker_w = os.pipe()
        to_parent_r, to_parent_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into pytest
            code = 0
            try:
                os.close(to_worker_w)
                os.close(to_parent_r)
                _serve(os.fdopen(to_worker_r, "rb"), os.fdopen(to_parent_w, "wb"))
            except BaseException:  # noqa: BLE001
                code = 70
            finally:
                os._exit(code)
        os.close(to_worker_r)
        os.close(to_parent_w)
        self.pid, self.send, self.recv = pid, os.fdopen(to_worker_w, "wb"), os.fdopen(to_parent_r, "rb")

    def stop(self, kill: bool = False) -> str:
        """End the worker (``kill``: at once); returns how it ended (signal name or exit status)."""
        if self.pid is None:
            return ""
        if kill:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
        for f in (self.send, self.recv):
            with contextlib.suppress(OSError):
                f.close()
        pid, self.pid = self.pid, None
        for _ in range(40):  # a worker that closed its pipe (it ended or crashed) exits at once
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            return signal.Signals(os.WTERMSIG(status)).name
        return f"exit {os.WEXITSTATUS(status)}"


# ---------------------------------------------------------------------------------------------
# regressions: the models this fuzzer found to escape, crash or hang, each checked on every run


def _node(model, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _attr(node_name: str, name: str, value, attr_type=None):
    def edit(model):
        _set_attribute(_node(model, node_name), helper.make_attribute(name, value, attr_type=attr_type))
    return edit


def _init_value(name: str, value: np.ndarray):
    def edit(model):
        t = next(t for t in model.graph.initializer if t.name == name)
        t.CopyFrom(numpy_helper.from_array(value, name))
    return edit


def _clear(node_name: str, field: str):
    def edit(model):
        del getattr(_node(model, node_name), field)[:]
    return edit


def _input_dim(axis: int, value: int):
    def edit(model):
        model.graph.input[0].type.tensor_type.shape.dim[axis].dim_value = value
    return edit


def _truncate(name: str):
    def edit(model):
        t = next(t for t in model.graph.initializer if t.name == name)
        t.raw_data = t.raw_data[:8]
    return edit


def _weight_as_input(name: str):
    def edit(model):
        t = next(t for t in model.graph.initializer if t.name == name)
        model.graph.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
        model.graph.initializer.remove(t)
    return edit


def _renamed_cycle(model):  # BatchNormalization 'a\rb' reading its own output
    bn = _node(model, "bn")
    bn.name, bn.input[0] = "a\rb", "y"


def _no_input_shape(model):
    model.graph.input[0].type.tensor_type.ClearField("shape")


def _graph_name(name: str):
    def edit(model):
        model.graph.name = name
    return edit


def _upsample_scales_attribute(model):  # opset-9 Upsample with an INT 'scales' attribute
    _set_attribute(_node(model, "rs"), helper.make_attribute("scales", -2))


_STRING_SCALE = np.array([b"a", b"b"], dtype=object)
NO_VERIFY = {"to": "resize", "verify": False}
#: (id, seed, edits, check, options): each must keep the contract
REGRESSIONS = [
    ("group=0 (SIGFPE in onnxruntime)", "ct2d", [_attr("up", "group", 0)], "convert", {"to": "subpixel"}),
    ("DepthToSpace blocksize=2**40 (SIGFPE in onnxruntime)", "d2s_dcr", [_attr("d2s", "blocksize", 2**40)],
     "convert", {"to": "convtranspose"}),
    ("Conv output length < 1 before Slice (abort in onnx shape inference)", "d2s_crd_crop",
     [_attr("conv", "dilations", [5, 3])], "convert", {"to": "subpixel"}),
    ("declared dim -1 before Slice (abort in onnx shape inference)", "d2s_crd_crop", [_input_dim(3, -1)],
     "convert", {"to": "subpixel", "verify": False}),
    ("Resize fed a rank-5 --shape (abort in onnxruntime)", "resize_linear_standalone", [_no_input_shape],
     "convert", {"to": "resize", "shapes": {"x": (1, 2, 2, 2, 2)}}),
    ("Resize scale 2**40 (unbounded interpolation kernel)", "resize_linear_standalone",
     [_init_value("scales", np.array([1, 1, 2, 2.0**40], np.float32))], "convert", NO_VERIFY),
    ("Resize scale inf", "upsample_opset9", [_init_value("scales", np.array([1, 1, 2, np.inf], np.float32))],
     "convert", {"to": "resize"}),
    ("inspect: dilation 2**40 (96 TiB kernel)", "ct_group_dilated", [_attr("up", "dilations", [1, 2**40])],
     "inspect", None),
    ("inspect: stride 2**40", "ct2d", [_attr("up", "strides", [2**40, 3])], "inspect", None),
    ("declared dim 2**62 at opset 9", "ct_opset9", [_input_dim(3, 2**62)], "convert", NO_VERIFY),
    ("graph name with a newline", "ct2d", [_graph_name("a\nb"), _attr("up", "group", 3)], "convert", {"to": "resize"}),
    ("node name with a carriage return, in a cycle", "ct_batchnorm", [_renamed_cycle], "convert", {"to": "subpixel"}),
    ("strides as a FLOAT attribute", "ct2d", [_attr("up", "strides", 2.0)], "convert", NO_VERIFY),
    ("Conv kernel_shape as a FLOAT attribute", "resize_nearest", [_attr("conv", "kernel_shape", 2.0)], "convert",
     NO_VERIFY),
    ("output_padding as STRINGS", "ct2d", [_attr("up", "output_padding", [b"a", b"b"])], "convert", NO_VERIFY),
    ("auto_pad not UTF-8", "ct2d", [_attr("up", "auto_pad", b"\xff")], "convert", NO_VERIFY),
    ("group=inf", "ct2d", [_attr("up", "group", float("inf"))], "convert", NO_VERIFY),
    ("blocksize as a TENSOR attribute", "d2s_dcr",
     [_attr("d2s", "blocksize", numpy_helper.from_array(np.array([2], np.int64)))], "convert", NO_VERIFY),
    ("Resize axes as a FLOAT attribute", "resize_linear_standalone", [_attr("rs", "axes", 2.0)], "convert",
     NO_VERIFY),
    ("Resize antialias as INTS", "resize_linear_standalone", [_attr("rs", "antialias", [1, 2])], "convert",
     NO_VERIFY),
    ("Upsample scales as an INT attribute", "upsample_opset9", [_upsample_scales_attribute], "convert", NO_VERIFY),
    ("ConvTranspose without inputs", "ct2d", [_clear("up", "input")], "convert", NO_VERIFY),
    ("Resize without inputs", "resize_nearest", [_clear("rs", "input")], "convert", NO_VERIFY),
    ("Resize without outputs", "resize_linear_standalone", [_clear("rs", "output"), _clear("conv", "input")],
     "convert", NO_VERIFY),
    ("sub-pixel Conv without inputs", "d2s_dcr", [_clear("conv", "input")], "convert", NO_VERIFY),
    ("Identity without inputs feeding a weight", "ct_constant_weight", [_clear("wid", "input")], "convert",
     NO_VERIFY),
    ("Resize + Conv with the Conv weight a graph input", "resize_linear_standalone", [_weight_as_input("Wc")],
     "convert", NO_VERIFY),
    ("weight with truncated raw_data", "ct2d", [_truncate("W")], "convert", NO_VERIFY),
    ("Constant value as a FLOAT attribute", "ct_constant_weight", [_attr("wconst", "value", 0.5)], "convert",
     NO_VERIFY),
    ("BatchNormalization scale of strings", "ct_batchnorm", [_init_value("g", _STRING_SCALE)], "convert", NO_VERIFY),
]


# ---------------------------------------------------------------------------------------------
# tests


@pytest.fixture(scope="module", autouse=True)
def outcome_summary():
    """Print the outcome counts (``pytest -s``)."""
    yield
    total = sum(OUTCOMES.values())
    print(f"\nfuzz outcomes ({total} mutated models):")
    for label, count in sorted(OUTCOMES.items()):
        print(f"  {count:6d}  {label}")


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.stop()


@pytest.mark.parametrize("seed", sorted(SEEDS))
def test_seed_models_convert(seed):
    """Every seed is valid and converts, verified, to every form (sites may be refused, with reasons)."""
    model = load_seed(seed)
    shapes = {"x": (1, 2, 3, 4)} if seed == "ct_symbolic" else None
    for to in FORMS:
        result = api.convert(model, to=to, shapes=shapes)
        assert result.report.verification == "passed"
        assert result.report.sites


@pytest.mark.parametrize("seed, edits, check, opts", [r[1:] for r in REGRESSIONS], ids=[r[0] for r in REGRESSIONS])
def test_regressions(seed, edits, check, opts, worker):
    """Models that escaped, crashed or hung before: each keeps the contract."""
    model = load_seed(seed)
    for edit in edits:
        edit(model)
    args = (opts, None) if check == "convert" else (None,)
    OUTCOMES[worker.run(check, model, *args)] += 1


@settings(max_examples=N_CONVERT, **FUZZ_SETTINGS)
@given(data=st.data())
def test_convert_mutated_models(data, out_dir, worker):
    d = Draw(data)
    model, log = mutate(d)
    opts = convert_options(model, d)
    output = out_dir / "out.onnx" if d.chance(10) else None
    note(f"mutations: {log}; options: {opts}; output: {output}")
    OUTCOMES[worker.run("convert", model, opts, output)] += 1


@settings(max_examples=N_INSPECT, **FUZZ_SETTINGS)
@given(data=st.data())
def test_inspect_mutated_models(data, worker):
    d = Draw(data)
    model, log = mutate(d)
    shapes = {"x": (1, 2, 3, 4)} if d.chance(20) else None
    note(f"mutations: {log}; shapes: {shapes}")
    OUTCOMES[worker.run("inspect", model, shapes)] += 1


@settings(max_examples=N_CLI, **FUZZ_SETTINGS)
@given(data=st.data())
def test_cli_mutated_models(data, out_dir, worker):
    d = Draw(data)
    model, log = mutate(d)
    to = d.choice(FORMS)
    extra = ["--no-verify"] if d.chance(20) else []
    note(f"mutations: {log}; --to {to} {extra}")
    OUTCOMES[worker.run("cli", model, ["--to", to, *extra], out_dir)] += 1


def check_cli(model: onnx.ModelProto, args: list[str], folder: Path) -> str:
    """``uprewrite convert MODEL -o OUT ARGS`` in-process under the CLI contract; returns the outcome label."""
    src, out = folder / "cli_in.onnx", folder / "cli_out.onnx"
    for p in (src, out):
        p.unlink(missing_ok=True)
    data = model.SerializeToString()
    src.write_bytes(data)
    with time_limit():
        result = CliRunner().invoke(cli, ["convert", str(src), "-o", str(out), "--memory-budget", "256M", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 1, 2, 3), (result.exit_code, result.output)
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    if result.exit_code in (1, 2):
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert lines and lines[0].startswith("uprewrite: error: "), result.stderr
        if result.exit_code == 2:
            assert len(lines) == 1, result.stderr
    assert out.exists() == (result.exit_code in (0, 3)), (result.exit_code, result.stderr)
    assert src.read_bytes() == data, "the input file changed"
    return f"cli exit {result.exit_code}"


CHECKS = {"convert": check_convert, "inspect": check_inspect, "cli": check_cli}
