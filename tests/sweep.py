"""Random ConvTranspose configurations and batched onnxruntime checks, shared by the sweep tests.

Many independent sites go into one model (one graph input and output each), so a batch of a
hundred configurations costs two onnxruntime sessions instead of two hundred.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_uprewrite.sites import Site
from onnx_uprewrite.surgery import Builder, Namer
from onnx_uprewrite.verify import session
from onnx_uprewrite.weights import Axis, conv_transpose_reference, phase_pattern

EPS32 = float(np.finfo(np.float32).eps)
IR = {7: 3, 8: 3, 9: 4, 10: 5, 11: 6, 12: 7, 13: 8, 17: 8, 19: 9}
AUTO_PADS = ("NOTSET", "NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


@dataclass
class Config:
    rank: int
    lengths: tuple[int, ...]
    strides: tuple[int, ...]
    kernel: tuple[int, ...]
    dilations: tuple[int, ...]
    group: int
    c_in: int
    c_out: int
    pads: tuple[int, ...] | None
    output_padding: tuple[int, ...]
    auto_pad: str
    output_shape: tuple[int, ...] | None
    bias: bool
    batch: int
    symbolic: bool

    def attrs(self) -> dict:
        a = dict(strides=list(self.strides), dilations=list(self.dilations), group=self.group)
        if any(self.output_padding):
            a["output_padding"] = list(self.output_padding)
        if self.auto_pad != "NOTSET":
            a["auto_pad"] = self.auto_pad
        if self.pads is not None:
            a["pads"] = list(self.pads)
        if self.output_shape is not None:
            a["output_shape"] = list(self.output_shape)
        if random.Random(hash(self.kernel)).random() < 0.5:
            a["kernel_shape"] = list(self.kernel)
        return a


def random_config(rng: random.Random, allow_symbolic: bool = True) -> Config:
    rank = rng.choices([1, 2, 3], weights=[3, 5, 2])[0]
    equal = rng.random() < 0.6
    s0 = rng.randint(1, 4)
    strides = tuple(s0 if equal else rng.randint(1, 4) for _ in range(rank))
    kernel = tuple(rng.randint(1, 6 if rank < 3 else 4) for _ in range(rank))
    dilations = tuple(1 if rng.random() < 0.6 else rng.randint(2, 3) for _ in range(rank))
    output_padding = tuple(
        rng.randint(0, s - 1) if rng.random() < 0.4 else 0 for s in strides
    )
    lengths = tuple(rng.randint(1, 5 if rank < 3 else 3) for _ in range(rank))
    g = rng.choice([1, 1, 1, 2, 3, "dw"])
    if g == "dw":
        group = rng.randint(2, 4)
        c_in, c_out = group, group * rng.choice([1, 1, 2])
    else:
        group = g
        c_in, c_out = group * rng.randint(1, 3), group * rng.randint(1, 3)
    auto_pad = rng.choice(AUTO_PADS)
    keff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    full = [(n - 1) * s + ke + op for n, s, ke, op in zip(lengths, strides, keff, output_padding)]
    pads, output_shape = None, None
    symbolic = allow_symbolic and rng.random() < 0.25
    if auto_pad == "NOTSET":
        if rng.random() < 0.15 and not symbolic:
            # output_shape: any length onnxruntime accepts (see passes/from_convtranspose.py)
            output_shape = tuple(
                rng.choice([o for o in range(1, f + s) if _os_ok(n, s, ke, op, o)] or [f])
                for f, n, s, ke, op in zip(full, lengths, strides, keff, output_padding)
            )
            if rng.random() < 0.3:
                auto_pad = rng.choice(["SAME_UPPER", "SAME_LOWER"])
        elif rng.random() < 0.85:
            pads = []
            for f in full:
                pb = rng.randint(0, min(f - 1, 6))
                pe = rng.randint(0, min(f - 1 - pb, 6))
                pads.append((pb, pe))
            pads = tuple(p[0] for p in pads) + tuple(p[1] for p in pads)
    return Config(rank, lengths, strides, kernel, dilations, group, c_in, c_out, pads, output_padding,
                  auto_pad, output_shape, rng.random() < 0.6, rng.randint(1, 2), symbolic)


def _os_ok(length, stride, keff, op, out) -> bool:
    total = max(0, stride * (length - 1) + keff + op - out)
    return (out + total - keff) // stride + 1 == length


def batch_model(configs: list[Config], opset: int, seed: int) -> tuple[onnx.ModelProto, dict, list[int]]:
    """One model with one ConvTranspose per config; returns (model, feeds, terms per output)."""
    rng = np.random.default_rng(seed)
    nodes, inits, inputs, outputs, feeds, terms = [], [], [], [], {}, []
    for i, c in enumerate(configs):
        w = rng.standard_normal((c.c_in, c.c_out // c.group) + c.kernel).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        ins = [f"x{i}", f"w{i}"]
        if c.bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(c.c_out).astype(np.float32), f"b{i}"))
            ins.append(f"b{i}")
        nodes.append(helper.make_node("ConvTranspose", ins, [f"y{i}"], name=f"ct{i}", **c.attrs()))
        shape = [c.batch, c.c_in, *c.lengths]
        declared = ["N", c.c_in, *(f"L{i}_{a}" for a in range(c.rank))] if c.symbolic else shape
        inputs.append(helper.make_tensor_value_info(f"x{i}", onnx.TensorProto.FLOAT, declared))
        outputs.append(helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, None))
        feeds[f"x{i}"] = rng.standard_normal(shape).astype(np.float32)
        terms.append((c.c_in // c.group) * math.prod(c.kernel))
    graph = helper.make_graph(nodes, "sweep", inputs, outputs, inits)
    ir = 8 if opset >= 13 else 7 if opset >= 12 else 6 if opset >= 11 else 5 if opset >= 10 else 4
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
    return model, feeds, terms


# ---------------------------------------------------------------------------------------------
# random canonical sites, emitted by one emitter and checked against the float64 reference


def random_site(rng: random.Random, i: int, phase_bias: float = 0.0) -> tuple[Site, tuple[int, ...], bool]:
    """A random canonical site, the input shape to run it at, and whether to declare it symbolic."""
    rank = rng.choices([1, 2, 3], weights=[3, 5, 2])[0]
    axes, lengths = [], []
    for _ in range(rank):
        s = rng.randint(1, 4)
        d = 1 if rng.random() < 0.6 else rng.randint(2, 3)
        k = rng.randint(1, 6)
        pb, e = rng.randint(-3, 8), rng.randint(-8, 8)
        n = rng.randint(1, 5 if rank < 3 else 3)
        n = max(n, -((e - 1) // s))  # smallest L with s*L + e >= 1
        axes.append(Axis(s, d, k, pb, e))
        lengths.append(n)
    g = rng.choice([1, 1, 1, 2, 3, "dw"])
    if g == "dw":
        group = rng.randint(2, 4)
        c_in, c_out = group, group * rng.choice([1, 1, 2])
    else:
        group, c_in, c_out = g, g * rng.randint(1, 3), g * rng.randint(1, 3)
    nrng = np.random.default_rng(rng.getrandbits(32))
    weight = nrng.standard_normal((c_in, c_out // group) + tuple(a.kernel for a in axes)).astype(np.float32)
    bias = nrng.standard_normal(c_out).astype(np.float32) if rng.random() < 0.6 else None
    symbolic = rng.random() < 0.25
    phase = None
    if rng.random() < phase_bias:  # a per-phase bias instead (sub-pixel Convs with per-channel biases)
        bias, phase = None, nrng.standard_normal((c_out,) + tuple(a.stride for a in axes)).astype(np.float32)
    site = make_site(weight, bias, group, axes, None if symbolic else lengths, i, phase)
    shape = (rng.randint(1, 2), c_in, *lengths)
    return site, shape, symbolic


def make_site(weight, bias, group, axes, lengths, i=0, phase_bias=None) -> Site:
    rank = len(axes)
    return Site(
        node=f"ct{i}", source="convtranspose", replaced_outputs=(f"y{i}",), input=f"x{i}", output=f"y{i}",
        weight=weight, bias=bias, group=group, axes=tuple(axes),
        input_lengths=tuple(lengths) if lengths is not None else (None,) * rank, weight_tensors=(),
        phase_bias=phase_bias,
    )


def emit_model(sites, declared_shapes, opset: int, emitter) -> onnx.ModelProto:
    """One graph with every site emitted by ``emitter`` (graph inputs ``x{i}``, outputs ``y{i}``)."""
    namer = Namer(onnx.ModelProto())
    nodes, inits, inputs, outputs = [], [], [], []
    for i, site in enumerate(sites):
        b = Builder(namer, site.node)
        emitter.emit(site, b, opset)
        nodes += b.emission.nodes
        inits += b.emission.initializers
        inputs.append(helper.make_tensor_value_info(site.input, onnx.TensorProto.FLOAT, declared_shapes[i]))
        outputs.append(helper.make_tensor_value_info(site.output, onnx.TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "emitted", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR[opset])


def run_model(model: onnx.ModelProto, feeds: dict) -> dict:
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def site_reference(site: Site, x: np.ndarray) -> np.ndarray:
    """float64 result of a canonical site, per-phase bias included."""
    ref = conv_transpose_reference(x, site.weight, site.bias, site.axes, site.group)
    if site.phase_bias is not None:
        pattern = phase_pattern(site.phase_bias.astype(np.float64), site.axes)
        reps = [-(-n // a.stride) for n, a in zip(ref.shape[2:], site.axes)]
        tiled = np.tile(pattern, [1] + reps)[(slice(None),) + tuple(slice(0, n) for n in ref.shape[2:])]
        ref = ref + tiled[None]
    return ref


def check_site(site: Site, x: np.ndarray, got: np.ndarray) -> float:
    """Error over tolerance; asserts shape and tolerance."""
    ref = site_reference(site, x)
    assert got.shape == ref.shape, (site.params(), got.shape, ref.shape)
    terms = (site.in_channels // site.group) * math.prod(a.kernel for a in site.axes)
    tol = 8 * EPS32 * math.sqrt(terms) * max(float(np.abs(ref).max()), 1e-30)
    err = float(np.abs(got.astype(np.float64) - ref).max())
    assert err <= tol, (site.params(), site.input_lengths, x.shape, err, tol)
    return err / tol
