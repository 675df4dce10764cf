"""Tool speed on graphs with many nodes (issue 17): `api.convert` with verification on chains of
5k / 10k / 20k nodes (one upsampling site every 20 nodes), against one plain onnxruntime session
creation + run of the original (default optimization level, as users run it).

    python benchmarks/bench_big_graph.py [--nodes 5000,10000,20000] [--to subpixel]

Each block is ConvTranspose k4 s2 p1 (C=4, the site), Conv k4 s2 p1 back down, and 18 cheap
element-wise nodes; input 1x4x8x8.  Times are in-process wall times (imports excluded), one run each.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

C = 4
PER_BLOCK = 20


def chain(nodes: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    graph_nodes, inits, prev = [], [], "x"
    for b in range(nodes // PER_BLOCK):
        for kind in ("up", "down"):
            w = rng.standard_normal((C, C, 4, 4)).astype(np.float32) * 0.1
            inits.append(numpy_helper.from_array(w, f"w{kind}{b}"))
        graph_nodes.append(helper.make_node("ConvTranspose", [prev, f"wup{b}"], [f"u{b}"], name=f"up{b}",
                                            strides=[2, 2], pads=[1, 1, 1, 1]))
        graph_nodes.append(helper.make_node("Conv", [f"u{b}", f"wdown{b}"], [f"d{b}_0"], name=f"down{b}",
                                            strides=[2, 2], pads=[1, 1, 1, 1]))
        for i in range(PER_BLOCK - 2):
            op = ("Relu", "Neg", "Abs")[i % 3]
            graph_nodes.append(helper.make_node(op, [f"d{b}_{i}"], [f"d{b}_{i + 1}"], name=f"e{b}_{i}"))
        prev = f"d{b}_{PER_BLOCK - 2}"
    graph_nodes.append(helper.make_node("Identity", [prev], ["y"], name="out"))
    graph = helper.make_graph(graph_nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


def plain_run(model: onnx.ModelProto) -> float:
    t = time.perf_counter()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    sess.run(None, {"x": np.zeros((1, C, 8, 8), np.float32)})
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", default="5000,10000,20000")
    parser.add_argument("--to", default="subpixel")
    args = parser.parse_args()
    import onnx_uprewrite as up

    print(f"{'nodes':>6} {'sites':>6} {'ort session+run s':>18} {'convert s':>10} {'ratio':>6}  stages")
    for n in (int(v) for v in args.nodes.split(",")):
        model = chain(n)
        base = plain_run(model)
        t = time.perf_counter()
        report = up.convert(model, to=args.to).report
        took = time.perf_counter() - t
        stages = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in report.timings.items() if k != "total_s" and v > 0.05)
        print(f"{len(model.graph.node):>6} {len(report.rewritten):>6} {base:>18.2f} {took:>10.2f} {took / base:>6.2f}  "
              f"{stages}", flush=True)


if __name__ == "__main__":
    main()
