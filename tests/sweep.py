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
