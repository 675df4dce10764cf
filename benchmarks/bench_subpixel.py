"""Latency of rewritten forms relative to the original (sub-pixel vs ConvTranspose per layer, Resize+Conv,
bilinear, ESPCN and masked-Resize rewrites), and the tool's own wall time.

    python benchmarks/bench_subpixel.py [--runs 60]

onnxruntime CPU, 1 thread, original and rewritten runs interleaved in one process, median.
Prints the ratio rewritten/original per layer (below 1 = the rewrite is faster), then the wall
time of `convert` (verification included) on the largest shipped model and on a synthetic
many-site model.  Numbers move between machines and runs: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import helper, numpy_helper

import onnx_uprewrite as up

LAYERS = [
    # name, x shape, weight shape, attrs
    ("dcgan 256->128 8x8 k4s2p1", (1, 256, 8, 8), (256, 128, 4, 4), dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    ("dcgan 64->32 32x32 k4s2p1", (1, 64, 32, 32), (64, 32, 4, 4), dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    ("64->64 64x64 k4s2p1", (1, 64, 64, 64), (64, 64, 4, 4), dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    ("128->64 32x32 k2s2", (1, 128, 32, 32), (128, 64, 2, 2), dict(strides=[2, 2])),
    ("64->32 128x128 k3s2p1op1", (1, 64, 128, 128), (64, 32, 3, 3),
     dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])),
    ("fsrcnn 32->3 96x96 k9s3p4op2", (1, 32, 96, 96), (32, 3, 9, 9),
     dict(strides=[3, 3], pads=[4, 4, 4, 4], output_padding=[2, 2])),
    ("1-D 64->64 L4096 k16s8p4", (1, 64, 4096), (64, 64, 16), dict(strides=[8], pads=[4, 4])),
]


def one_layer(x_shape, w_shape, attrs, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(w_shape) * 0.05).astype(np.float32)
    b = rng.standard_normal(w_shape[1]).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"], name="up", **attrs)
    graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("x", 1, list(x_shape))],
                              [helper.make_tensor_value_info("y", 1, None)],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def nearest_conv(x_shape, seed=0, mode="nearest"):
    rng = np.random.default_rng(seed)
    c = x_shape[1]
    inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array((rng.standard_normal((c, c, 3, 3)) * 0.05).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "B")]
    ctm = "asymmetric" if mode == "nearest" else "half_pixel"
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["u"], mode=mode,
                              coordinate_transformation_mode=ctm, nearest_mode="floor"),
             helper.make_node("Conv", ["u", "W", "B"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "nc", [helper.make_tensor_value_info("x", 1, list(x_shape))],
                              [helper.make_tensor_value_info("y", 1, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def espcn_model(x_shape, seed=0):
    """PyTorch ESPCN tail: Conv3x3 p1 to 4*C channels -> DepthToSpace(2, CRD)."""
    rng = np.random.default_rng(seed)
    c = x_shape[1]
    inits = [numpy_helper.from_array((rng.standard_normal((4 * c, c, 3, 3)) * 0.05).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(4 * c).astype(np.float32), "B")]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("DepthToSpace", ["c"], ["y"], name="d2s", blocksize=2, mode="CRD")]
    graph = helper.make_graph(nodes, "espcn", [helper.make_tensor_value_info("x", 1, list(x_shape))],
                              [helper.make_tensor_value_info("y", 1, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def qdq_layer(model, x_shape, per_channel):
    """onnxruntime's quantize_static (QDQ, int8 weights, uint8 activations) of a float model."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(2)
            self.it = iter([{"x": rng.standard_normal(x_shape).astype(np.float32)} for _ in range(2)])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        onnx.save(model, src)
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        return onnx.load(dst)


def sess(model):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def interleaved(a, b, feeds, runs):
    for s in (a, b):
        s.run(None, feeds)
    ta, tb = [], []
    for _ in range(runs):
        for s, acc in ((a, ta), (b, tb)):
            t = time.perf_counter()
            s.run(None, feeds)
            acc.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=60)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, CPU, 1 thread, median of {args.runs} interleaved runs")
    print(f"{'layer':34s} {'ConvTranspose ms':>17s} {'sub-pixel ms':>13s} {'ratio':>6s}")
    for name, xs, ws, attrs in LAYERS:
        model = one_layer(xs, ws, attrs)
        rewritten = up.convert(model).model
        x = np.random.default_rng(1).standard_normal(xs).astype(np.float32)
        t0, t1 = interleaved(sess(model), sess(rewritten), {"x": x}, args.runs)
        print(f"{name:34s} {t0 * 1e3:17.3f} {t1 * 1e3:13.3f} {t1 / t0:6.2f}")

    print(f"\n{'nearest x2 + Conv3x3 p1, 64->64':34s} {'Resize+Conv ms':>17s} {'rewritten ms':>13s} {'ratio':>6s}")
    for size in (32, 64):
        model = nearest_conv((1, 64, size, size))
        x = np.random.default_rng(1).standard_normal((1, 64, size, size)).astype(np.float32)
        for form in ("convtranspose", "subpixel"):
            rewritten = up.convert(model, to=form).model
            t0, t1 = interleaved(sess(model), sess(rewritten), {"x": x}, args.runs)
            print(f"{f'{size}x{size} -> {form}':34s} {t0 * 1e3:17.3f} {t1 * 1e3:13.3f} {t1 / t0:6.2f}")

    print(f"\n{'other sources and targets':34s} {'original ms':>17s} {'rewritten ms':>13s} {'ratio':>6s}")
    espcn = espcn_model((1, 32, 64, 64))
    cases = [
        ("bilinear x2 + Conv3x3 64^2 -> subpixel", nearest_conv((1, 64, 64, 64), mode="linear"), "subpixel", (1, 64, 64, 64)),
        ("bilinear x2 + Conv3x3 64^2 -> convtr.", nearest_conv((1, 64, 64, 64), mode="linear"), "convtranspose",
         (1, 64, 64, 64)),
        ("ESPCN Conv3x3+D2S(2) 64^2 -> convtr.", espcn, "convtranspose", (1, 32, 64, 64)),
        ("k4s2p1 64->64 64^2 -> resize (masked)", one_layer(*LAYERS[2][1:]), "resize", (1, 64, 64, 64)),
    ]
    for name, model, form, xs in cases:
        rewritten = up.convert(model, to=form).model
        x = np.random.default_rng(1).standard_normal(xs).astype(np.float32)
        t0, t1 = interleaved(sess(model), sess(rewritten), {"x": x}, args.runs)
        print(f"{name:34s} {t0 * 1e3:17.3f} {t1 * 1e3:13.3f} {t1 / t0:6.2f}")

    print(f"\n{'QDQ (quantize_static, int8)':34s} {'ConvTranspose ms':>17s} {'sub-pixel ms':>13s} {'ratio':>6s}")
    for name, xs, ws, attrs in (LAYERS[1], LAYERS[2]):
        for per_channel in (False, True):
            model = qdq_layer(one_layer(xs, ws, attrs), xs, per_channel)
            x = np.random.default_rng(1).standard_normal(xs).astype(np.float32)
            rewritten = up.convert(model, inputs={"x": x}).model
            t0, t1 = interleaved(sess(model), sess(rewritten), {"x": x}, args.runs)
            label = f"{name.split(' ', 1)[-1]} {'per-ch' if per_channel else 'per-t'}"
            print(f"{label:34s} {t0 * 1e3:17.3f} {t1 * 1e3:13.3f} {t1 / t0:6.2f}")

    models = Path(__file__).resolve().parent.parent / "models"
    largest = max((p for p in models.glob("*.onnx") if p.stem.count(".") == 0), key=lambda p: p.stat().st_size)
    t = time.perf_counter()
    up.convert(str(largest))
    print(f"\nconvert {largest.name} ({largest.stat().st_size / 1e3:.0f} kB), verified: "
          f"{time.perf_counter() - t:.3f} s")
    many = _many_sites(120)
    t = time.perf_counter()
    r = up.convert(many)
    print(f"convert synthetic model with {len(r.report.rewritten)} sites "
          f"({many.ByteSize() / 1e6:.1f} MB), verified: {time.perf_counter() - t:.3f} s")


def _many_sites(n):
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    prev = "x"
    for i in range(n):
        inits.append(numpy_helper.from_array((rng.standard_normal((16, 16, 4, 4)) * 0.1).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("ConvTranspose", [prev, f"w{i}"], [f"u{i}"], name=f"up{i}",
                                      strides=[2, 2], pads=[1, 1, 1, 1]))
        inits.append(numpy_helper.from_array((rng.standard_normal((16, 16, 2, 2)) * 0.1).astype(np.float32), f"d{i}"))
        nodes.append(helper.make_node("Conv", [f"u{i}", f"d{i}"], [f"c{i}"], name=f"down{i}", strides=[2, 2]))
        prev = f"c{i}"
    graph = helper.make_graph(nodes, "many", [helper.make_tensor_value_info("x", 1, [1, 16, 16, 16])],
                              [helper.make_tensor_value_info(prev, 1, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


if __name__ == "__main__":
    main()
