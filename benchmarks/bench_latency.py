"""Rewritten / original onnxruntime latency of realistic decoders (issue 7's table).

    python benchmarks/bench_latency.py [--runs 30] [--provider CPUExecutionProvider] [--only NAME] [--to FORM[:D2S_MODE] ...]

Decoders (random weights; the latency does not depend on their values):
  dcgan     ConvTranspose k4 s2 p1 stack 256->128->64->32->3, 8x8 -> 128x128, ReLU between
  fsrcnn    Conv 5x5 1->32 + ConvTranspose k9 s3 p4 op2 32->3, 96x96 -> 288x288
  1d        ConvTranspose k16 s8 p4 stack 128->64->32, length 512 -> 32768
  nearest   Resize nearest x2 + Conv3x3 p1 64->64 (+ReLU), two blocks, 64x64 -> 256x256

Each model is converted (verified) to the forms that apply, then the original and the rewritten
model run interleaved (A B A B ...) in one process, 1 thread each, after a warm-up; the table shows
the medians and rewritten/original (below 1: the rewrite is faster).  Compare ratios within one
run: absolute numbers move between machines and with load.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import helper, numpy_helper

import onnx_uprewrite as up

OPSET = 17


def _model(nodes, x_shape, inits, name):
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", 1, list(x_shape))],
                              [helper.make_tensor_value_info(nodes[-1].output[0], 1, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


def _weight(rng, name, shape, scale=0.05):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def convtranspose_stack(name, x_shape, channels, kernel, stride, pads, output_padding=None, relu=True):
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    rank = len(x_shape) - 2
    for i, (cin, cout) in enumerate(zip(channels, channels[1:])):
        inits += [_weight(rng, f"w{i}", (cin, cout) + (kernel,) * rank), _weight(rng, f"b{i}", (cout,), 1.0)]
        attrs = dict(strides=[stride] * rank, pads=[pads] * (2 * rank))
        if output_padding:
            attrs["output_padding"] = [output_padding] * rank
        nodes.append(helper.make_node("ConvTranspose", [prev, f"w{i}", f"b{i}"], [f"u{i}"], name=f"up{i}", **attrs))
        prev = f"u{i}"
        if relu and i < len(channels) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    return _model(nodes, x_shape, inits, name)


def fsrcnn():
    rng = np.random.default_rng(0)
    inits = [_weight(rng, "w0", (32, 1, 5, 5)), _weight(rng, "b0", (32,), 1.0),
             _weight(rng, "w1", (32, 3, 9, 9)), _weight(rng, "b1", (3,), 1.0)]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c"], pads=[2, 2, 2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("ConvTranspose", ["r", "w1", "b1"], ["y"], name="deconv", strides=[3, 3],
                              pads=[4, 4, 4, 4], output_padding=[2, 2])]
    return _model(nodes, (1, 1, 96, 96), inits, "fsrcnn")


def nearest_decoder(blocks=2, channels=64, size=64):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    nodes, prev = [], "x"
    for i in range(blocks):
        inits += [_weight(rng, f"w{i}", (channels, channels, 3, 3)), _weight(rng, f"b{i}", (channels,), 1.0)]
        nodes += [helper.make_node("Resize", [prev, "", "scales"], [f"u{i}"], name=f"resize{i}", mode="nearest"),
                  helper.make_node("Conv", [f"u{i}", f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        prev = f"r{i}"
    return _model(nodes, (1, channels, size, size), inits, "nearest")


DECODERS = [
    ("dcgan 256-128-64-32-3 8x8", convtranspose_stack("dcgan", (1, 256, 8, 8), [256, 128, 64, 32, 3], 4, 2, 1),
     ("subpixel", "subpixel:transpose", "resize", "fastest")),
    ("fsrcnn k9s3p4op2 32->3 96x96", fsrcnn(), ("subpixel", "subpixel:transpose", "resize", "fastest")),
    ("1-D k16s8p4 128-64-32 L512", convtranspose_stack("1d", (1, 128, 512), [128, 64, 32], 16, 8, 4),
     ("subpixel", "fastest")),
    ("nearest x2+Conv3x3 64->64 64x64 (2 blocks)", nearest_decoder(),
     ("convtranspose", "subpixel", "subpixel:transpose", "fastest")),
]


def session(model, provider):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=[provider])


def interleaved(sessions, feeds, runs):
    for s in sessions:
        s.run(None, feeds)
    times = [[] for _ in sessions]
    for _ in range(runs):
        for s, acc in zip(sessions, times):
            t = time.perf_counter()
            s.run(None, feeds)
            acc.append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def arguments():
    """The options every decoder benchmark takes (also benchmarks/bench_decoders.py)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--provider", default="CPUExecutionProvider")
    parser.add_argument("--only", default="", help="run the decoders whose name contains this")
    parser.add_argument("--to", nargs="*", help="only these targets")
    return parser.parse_args()


def main():
    args = arguments()
    print(f"onnxruntime {ort.__version__}, {args.provider}, 1 thread, median of {args.runs} interleaved runs")
    print(f"{'decoder':44s} {'--to[:d2s-mode]':18s} {'original ms':>12s} {'rewritten ms':>13s} {'ratio':>6s}  forms chosen")
    for name, model, targets in DECODERS:
        if args.only not in name:
            continue
        targets = [t for t in targets if not args.to or t in args.to]
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        for to in targets:
            form, _, mode = to.partition(":")  # "subpixel:transpose": --to subpixel --d2s-mode transpose
            result = up.convert(model, to=form, inputs={"x": x}, provider=args.provider, d2s_mode=mode or "auto")
            t0, t1 = interleaved([session(model, args.provider), session(result.model, args.provider)],
                                 {"x": x}, args.runs)
            chosen = ", ".join(s.chosen or s.target if s.status == "rewritten" else "original"
                               for s in result.report.sites)
            print(f"{name:44s} {to:18s} {t0 * 1e3:12.3f} {t1 * 1e3:13.3f} {t1 / t0:6.2f}  {chosen}")


if __name__ == "__main__":
    main()
