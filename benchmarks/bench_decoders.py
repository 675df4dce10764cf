"""Rewritten / original onnxruntime latency of skip-connection decoders (issue 20): Resize -> Concat -> Conv.

    python benchmarks/bench_decoders.py [--runs 30] [--provider CPUExecutionProvider] [--only NAME] [--to FORM ...]

Decoders (random weights; the latency does not depend on their values):
  unet   4 stages 256->128->64->32->16 channels, input 1x256x16x16 -> 16x256x256: per stage nearest x2 ->
         Concat(skip with the stage's output channels) -> Conv3x3 p1 -> ReLU -> Conv3x3 p1 -> ReLU (smp Unet)
  neck   YOLO-like top-down neck, 2 stages 256->128->64, input 1x256x20x20: nearest x2 -> Concat(skip) ->
         Conv1x1 -> SiLU -> Conv3x3 p1 -> SiLU (the pointwise Conv commutes with the upsampling)

Each decoder is converted (verified) to every target and ``fastest``; then the original and the
rewritten model run interleaved (A B A B ...) in one process, 1 thread each, after a warm-up.  The
table shows the medians and rewritten/original (below 1: the rewrite is faster) and the MACs of the
Convs of each model (the physical limit of the ratio).  Compare ratios within one run.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

import onnx_uprewrite as up
from bench_latency import arguments, interleaved, session

OPSET = 17


def _weight(rng, name, shape, scale=0.05):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def skip_decoder(name, x_shape, channels, first_kernel, act):
    """``x`` then per stage: up x2 -> Concat(skip_i) -> Conv(first_kernel) -> act -> Conv3x3 -> act."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    inputs = [helper.make_tensor_value_info("x", 1, list(x_shape))]
    nodes, prev, size = [], "x", x_shape[2]

    def activation(t, out):
        if act == "relu":
            return [helper.make_node("Relu", [t], [out])]
        return [helper.make_node("Sigmoid", [t], [f"{out}_s"]), helper.make_node("Mul", [t, f"{out}_s"], [out])]

    for i, (cin, cout) in enumerate(zip(channels, channels[1:])):
        size *= 2
        inputs.append(helper.make_tensor_value_info(f"skip{i}", 1, [1, cout, size, size]))
        k = first_kernel
        inits += [_weight(rng, f"w{i}a", (cout, cin + cout, k, k)), _weight(rng, f"b{i}a", (cout,), 1.0),
                  _weight(rng, f"w{i}b", (cout, cout, 3, 3)), _weight(rng, f"b{i}b", (cout,), 1.0)]
        nodes += [helper.make_node("Resize", [prev, "", "scales"], [f"u{i}"], name=f"resize{i}", mode="nearest"),
                  helper.make_node("Concat", [f"u{i}", f"skip{i}"], [f"cat{i}"], name=f"cat{i}", axis=1),
                  helper.make_node("Conv", [f"cat{i}", f"w{i}a", f"b{i}a"], [f"c{i}a"], name=f"conv{i}a",
                                   pads=[k // 2] * 4)]
        nodes += activation(f"c{i}a", f"a{i}a")
        nodes.append(helper.make_node("Conv", [f"a{i}a", f"w{i}b", f"b{i}b"], [f"c{i}b"], name=f"conv{i}b",
                                      pads=[1, 1, 1, 1]))
        nodes += activation(f"c{i}b", f"a{i}b")
        prev = f"a{i}b"
    graph = helper.make_graph(nodes, name, inputs, [helper.make_tensor_value_info(prev, 1, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


DECODERS = [
    ("unet 256-128-64-32-16 16x16 (3x3)", skip_decoder("unet", (1, 256, 16, 16), [256, 128, 64, 32, 16], 3, "relu")),
    ("neck 256-128-64 20x20 (1x1 first)", skip_decoder("neck", (1, 256, 20, 20), [256, 128, 64], 1, "silu")),
]
TARGETS = ("subpixel", "subpixel:transpose", "convtranspose", "resize", "fastest")


def conv_macs(model) -> int:
    """MACs of every Conv and ConvTranspose of ``model`` (shapes from onnx shape inference, which needs
    the Resize scales: these small models are inferred whole): the weight size (which counts Cin/g per
    output channel, or Cout/g per input channel) times the positions."""
    typed = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*typed.graph.input, *typed.graph.value_info, *typed.graph.output]}
    weights = {t.name: math.prod(t.dims) for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose"):
            positions = shapes[node.output[0] if node.op_type == "Conv" else node.input[0]][2:]
            total += weights[node.input[1]] * math.prod(positions)
    return total


def main():
    args = arguments()
    import onnxruntime as ort
    print(f"onnxruntime {ort.__version__}, {args.provider}, 1 thread, median of {args.runs} interleaved runs")
    print(f"{'decoder':36s} {'--to[:d2s-mode]':18s} {'original ms':>12s} {'rewritten ms':>13s} {'ratio':>6s} "
          f"{'MAC ratio':>9s}  forms chosen")
    for name, model in DECODERS:
        if args.only not in name:
            continue
        rng = np.random.default_rng(1)
        feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
                 for i in model.graph.input}
        base_macs = conv_macs(model)
        for to in [t for t in TARGETS if not args.to or t in args.to]:
            form, _, mode = to.partition(":")
            result = up.convert(model, to=form, inputs=feeds, provider=args.provider, d2s_mode=mode or "auto")
            assert result.report.verification == "passed", result.report.verification
            t0, t1 = interleaved([session(model, args.provider), session(result.model, args.provider)], feeds,
                                 args.runs)
            chosen = ", ".join(s.chosen or s.target if s.status == "rewritten" else "original"
                               for s in result.report.sites)
            print(f"{name:36s} {to:18s} {t0 * 1e3:12.3f} {t1 * 1e3:13.3f} {t1 / t0:6.2f} "
                  f"{conv_macs(result.model) / base_macs:9.2f}  {chosen}", flush=True)


if __name__ == "__main__":
    main()
