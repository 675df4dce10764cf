"""Sub-pixel layouts against the ConvTranspose, layer by layer: one Conv for every phase (+ depth-to-space
+ Slice) vs one Conv per phase with exact pads (+ Concat + depth-to-space DCR), each with DepthToSpace
("op") or single-axis Transposes, and what ``auto`` (to_subpixel.prefer_phases) picks.  The data
behind MIN_PHASE_CHANNELS and MIN_PHASE_SAVING, and behind ``--d2s-mode transpose``.

    python benchmarks/bench_subpixel_layouts.py [--runs 40]

1 thread, interleaved runs in one process, medians; ratios to the ConvTranspose (below 1: faster).
"""

from __future__ import annotations

import argparse

import numpy as np
from onnx import helper, numpy_helper

from bench_latency import interleaved, session
from onnx_uprewrite import api
from onnx_uprewrite.passes import to_subpixel

# (Cin, Cout, spatial, kernel, stride, pad, output_padding, group)
LAYERS = [
    (256, 128, (8, 8), 4, 2, 1, 0, 1),
    (128, 64, (16, 16), 4, 2, 1, 0, 1),
    (64, 32, (32, 32), 4, 2, 1, 0, 1),
    (32, 3, (64, 64), 4, 2, 1, 0, 1),
    (64, 64, (64, 64), 4, 2, 1, 0, 1),
    (32, 16, (32, 32), 4, 2, 1, 0, 1),
    (64, 32, (64, 64), 3, 2, 1, 1, 1),
    (128, 64, (32, 32), 2, 2, 0, 0, 1),
    (64, 64, (16, 16), 4, 2, 1, 0, 64),
    (32, 16, (24, 24), 6, 3, 0, 0, 1),
    (128, 64, (512,), 16, 8, 4, 0, 1),
    (64, 64, (128,), 4, 2, 1, 0, 1),
    (128, 64, (64,), 4, 2, 1, 0, 1),
    (64, 64, (256,), 3, 2, 1, 1, 1),
    (32, 32, (12, 12), 4, 3, 1, 1, 1),
    (32, 32, (8, 8, 8), 4, 2, 1, 0, 1),
    (16, 16, (16, 16, 16), 4, 2, 1, 0, 1),
]


def layer_model(cin, cout, spatial, k, s, p, op, g):
    rng = np.random.default_rng(0)
    rank = len(spatial)
    w = numpy_helper.from_array((rng.standard_normal((cin, cout // g) + (k,) * rank) * 0.05).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b")
    attrs = dict(strides=[s] * rank, pads=[p] * 2 * rank, group=g)
    if op:
        attrs["output_padding"] = [op] * rank
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="up", **attrs)
    graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("x", 1, [1, cin, *spatial])],
                              [helper.make_tensor_value_info("y", 1, None)], [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    layouts = {"one/op": to_subpixel.Layout("one", "op", "CRD"), "phases/op": to_subpixel.Layout("phases", "op"),
               "one/T": to_subpixel.Layout("one", "transpose"), "phases/T": to_subpixel.Layout("phases", "transpose")}
    api.SUBPIXEL_LAYOUTS.update(layouts)
    print("ratios to the ConvTranspose (CT); one = one Conv for every phase, phases = one Conv per phase; "
          "op = DepthToSpace (2-D square strides, else one Reshape-Transpose-Reshape), T = single-axis Transposes")
    print(f"{'layer':42s} {'CT ms':>8s} " + " ".join(f"{k:>9s}" for k in layouts) + "  auto picks")
    for layer in LAYERS:
        model = layer_model(*layer)
        x = np.random.default_rng(1).standard_normal([1, layer[0], *layer[2]]).astype(np.float32)
        forms = [model]
        for mode in layouts:
            try:
                forms.append(api.convert(model, to="subpixel", d2s_mode=mode, inputs={"x": x}).model)
            except Exception as exc:  # no per-phase layout for this layer
                forms.append(None)
                print(f"  ({mode}: {str(exc)[:150]})")
        live = [f for f in forms if f is not None]
        times = iter(interleaved([session(f, "CPUExecutionProvider") for f in live], {"x": x}, args.runs))
        t = [next(times) if f is not None else None for f in forms]
        pick = api.convert(model, to="subpixel", verify=False).report.sites[0].form
        cin, cout, spatial, k, s, p, op, g = layer
        name = f"{cin}->{cout} {'x'.join(map(str, spatial))} k{k}s{s}p{p}" + (f"op{op}" if op else "") + \
            (f"g{g}" if g > 1 else "")
        cells = ["-" if v is None else f"{v / t[0]:.2f}" for v in t[1:]]
        print(f"{name:42s} {t[0] * 1e3:8.3f} " + " ".join(f"{c:>9s}" for c in cells) + f"  {pick.split(' ->')[0]}",
              flush=True)


if __name__ == "__main__":
    main()
