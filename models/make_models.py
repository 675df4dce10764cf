"""Regenerate the small example models shipped in this folder (deterministic, onnx.helper only).

    python models/make_models.py            # writes models/*.onnx and prints the files written

Every model is float32, IR version 8, opset 17, with seeded weights ``normal * 0.1``; the same
numpy/onnx versions give byte-identical files (tests/test_models.py checks this).  Each model is
run in onnxruntime before it is written, and its output shape checked against the shape worked
out by hand below (ConvTranspose: ``Lout = s*(L-1) + (K-1)*d + 1 + op - pb - pe``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).parent
IR_VERSION = 8
OPSET = 17
PRODUCER = "onnx-uprewrite models/make_models.py"
F32 = TensorProto.FLOAT


def _weights(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.1).astype(np.float32)


def _init(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(value, name)


def _model(name, nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializers))
    model = helper.make_model(
        graph,
        ir_version=IR_VERSION,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER,
    )
    return model


def _vi(name, shape):
    return helper.make_tensor_value_info(name, F32, shape)


# ---------------------------------------------------------------------------------------------
# builders: each returns (model, {input name: concrete shape to test with}, {output: shape})


def dcgan_stack():
    """DCGAN generator tail: ConvTranspose k4 s2 p1 64->32->16->3 with Relu between; 8x8 -> 64x64."""
    rng = np.random.default_rng(101)
    chans = [64, 32, 16, 3]
    nodes, inits = [], []
    x = "x"
    for i, (ci, co) in enumerate(zip(chans, chans[1:])):
        inits += [_init(f"deconv{i}.weight", _weights(rng, ci, co, 4, 4)), _init(f"deconv{i}.bias", _weights(rng, co))]
        last = i == len(chans) - 2
        y = "y" if last else f"deconv{i}_out"
        nodes.append(helper.make_node(
            "ConvTranspose", [x, f"deconv{i}.weight", f"deconv{i}.bias"], [y], name=f"deconv{i}",
            kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1],
        ))
        if not last:
            nodes.append(helper.make_node("Relu", [y], [f"relu{i}_out"], name=f"relu{i}"))
            x = f"relu{i}_out"
    model = _model("dcgan_stack", nodes, [_vi("x", [1, 64, 8, 8])], [_vi("y", [1, 3, 64, 64])], inits)
    return model, {"x": (1, 64, 8, 8)}, {"y": (1, 3, 64, 64)}


def unet_decoder_k2s2():
    """U-Net decoder: two (ConvTranspose k2 s2 -> Concat skip -> Conv3x3 p1 -> Relu) stages."""
    rng = np.random.default_rng(102)
    nodes, inits = [], []
    x = "x"
    stages = [(32, 16, 16), (16, 8, 32)]  # (in channels, out channels, output size)
    for i, (ci, co, size) in enumerate(stages):
        inits += [
            _init(f"up{i}.weight", _weights(rng, ci, co, 2, 2)),
            _init(f"up{i}.bias", _weights(rng, co)),
            _init(f"conv{i}.weight", _weights(rng, co, 2 * co, 3, 3)),
            _init(f"conv{i}.bias", _weights(rng, co)),
        ]
        out = "y" if i == len(stages) - 1 else f"relu{i}_out"
        nodes += [
            helper.make_node("ConvTranspose", [x, f"up{i}.weight", f"up{i}.bias"], [f"up{i}_out"], name=f"up{i}",
                             kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Concat", [f"up{i}_out", f"skip{i}"], [f"cat{i}_out"], name=f"cat{i}", axis=1),
            helper.make_node("Conv", [f"cat{i}_out", f"conv{i}.weight", f"conv{i}.bias"], [f"conv{i}_out"],
                             name=f"conv{i}", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"conv{i}_out"], [out], name=f"relu{i}"),
        ]
        x = out
    inputs = [_vi("x", [1, 32, 8, 8]), _vi("skip0", [1, 16, 16, 16]), _vi("skip1", [1, 8, 32, 32])]
    model = _model("unet_decoder_k2s2", nodes, inputs, [_vi("y", [1, 8, 32, 32])], inits)
    return model, {"x": (1, 32, 8, 8), "skip0": (1, 16, 16, 16), "skip1": (1, 8, 32, 32)}, {"y": (1, 8, 32, 32)}


def fsrcnn_k9s3():
    """FSRCNN-like x3 super-resolution: Conv 1->16 5x5 p2, Relu, ConvTranspose 16->1 k9 s3 p4 op2."""
    rng = np.random.default_rng(103)
    inits = [
        _init("feat.weight", _weights(rng, 16, 1, 5, 5)),
        _init("feat.bias", _weights(rng, 16)),
        _init("deconv.weight", _weights(rng, 16, 1, 9, 9)),
        _init("deconv.bias", _weights(rng, 1)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "feat.weight", "feat.bias"], ["feat_out"], name="feat",
                         kernel_shape=[5, 5], pads=[2, 2, 2, 2]),
        helper.make_node("Relu", ["feat_out"], ["relu_out"], name="relu"),
        helper.make_node("ConvTranspose", ["relu_out", "deconv.weight", "deconv.bias"], ["y"], name="deconv",
                         kernel_shape=[9, 9], strides=[3, 3], pads=[4, 4, 4, 4], output_padding=[2, 2]),
    ]
    # 3*15 + 9 + 2 - 8 = 48
    model = _model("fsrcnn_k9s3", nodes, [_vi("x", [1, 1, 16, 16])], [_vi("y", [1, 1, 48, 48])], inits)
    return model, {"x": (1, 1, 16, 16)}, {"y": (1, 1, 48, 48)}


def decoder_1d():
    """1-D audio decoder: ConvTranspose k16 s8 p4 32->16, Relu, ConvTranspose k16 s8 p4 16->8."""
    rng = np.random.default_rng(104)
    inits = [
        _init("up0.weight", _weights(rng, 32, 16, 16)),
        _init("up0.bias", _weights(rng, 16)),
        _init("up1.weight", _weights(rng, 16, 8, 16)),
        _init("up1.bias", _weights(rng, 8)),
    ]
    attrs = dict(kernel_shape=[16], strides=[8], pads=[4, 4])
    nodes = [
        helper.make_node("ConvTranspose", ["x", "up0.weight", "up0.bias"], ["up0_out"], name="up0", **attrs),
        helper.make_node("Relu", ["up0_out"], ["relu_out"], name="relu"),
        helper.make_node("ConvTranspose", ["relu_out", "up1.weight", "up1.bias"], ["y"], name="up1", **attrs),
    ]
    # 8*31 + 16 - 8 = 256; 8*255 + 16 - 8 = 2048
    model = _model("decoder_1d", nodes, [_vi("x", [1, 32, 32])], [_vi("y", [1, 8, 2048])], inits)
    return model, {"x": (1, 32, 32)}, {"y": (1, 8, 2048)}


def decoder_3d():
    """3-D volume decoder: ConvTranspose k3 s2 p1 op1 8->4, then k2 s2 4->2; 4^3 -> 16^3."""
    rng = np.random.default_rng(105)
    inits = [
        _init("up0.weight", _weights(rng, 8, 4, 3, 3, 3)),
        _init("up0.bias", _weights(rng, 4)),
        _init("up1.weight", _weights(rng, 4, 2, 2, 2, 2)),
        _init("up1.bias", _weights(rng, 2)),
    ]
    nodes = [
        helper.make_node("ConvTranspose", ["x", "up0.weight", "up0.bias"], ["up0_out"], name="up0",
                         kernel_shape=[3, 3, 3], strides=[2, 2, 2], pads=[1] * 6, output_padding=[1, 1, 1]),
        helper.make_node("ConvTranspose", ["up0_out", "up1.weight", "up1.bias"], ["y"], name="up1",
                         kernel_shape=[2, 2, 2], strides=[2, 2, 2]),
    ]
    # 2*3 + 3 + 1 - 2 = 8; 2*8 = 16
    model = _model("decoder_3d", nodes, [_vi("x", [1, 8, 4, 4, 4])], [_vi("y", [1, 2, 16, 16, 16])], inits)
    return model, {"x": (1, 8, 4, 4, 4)}, {"y": (1, 2, 16, 16, 16)}


def grouped_dilated():
    """Grouped dilated ConvTranspose (g4 d2 k3 s2 pads [1,2,1,2]) then depthwise k4 s2 SAME_UPPER; 8x8 -> 34x30."""
    rng = np.random.default_rng(106)
    inits = [
        _init("up0.weight", _weights(rng, 16, 4, 3, 3)),
        _init("up0.bias", _weights(rng, 16)),
        _init("up1.weight", _weights(rng, 16, 1, 4, 4)),
        _init("up1.bias", _weights(rng, 16)),
    ]
    nodes = [
        helper.make_node("ConvTranspose", ["x", "up0.weight", "up0.bias"], ["up0_out"], name="up0",
                         kernel_shape=[3, 3], strides=[2, 2], dilations=[2, 2], pads=[1, 2, 1, 2], group=4),
        helper.make_node("ConvTranspose", ["up0_out", "up1.weight", "up1.bias"], ["y"], name="up1",
                         kernel_shape=[4, 4], strides=[2, 2], auto_pad="SAME_UPPER", group=16),
    ]
    # pads [1,2,1,2] = H 1/1, W 2/2; Keff 5: H 2*7 + 5 - 2 = 17, W 2*7 + 5 - 4 = 15;
    # SAME_UPPER doubles: 34 x 30
    model = _model("grouped_dilated", nodes, [_vi("x", [1, 16, 8, 8])], [_vi("y", [1, 16, 34, 30])], inits)
    return model, {"x": (1, 16, 8, 8)}, {"y": (1, 16, 34, 30)}


def dynamic_batch():
    """One DCGAN ConvTranspose k4 s2 p1 16->8 with symbolic batch and spatial dims ['N',16,'H','W']."""
    rng = np.random.default_rng(107)
    inits = [_init("deconv.weight", _weights(rng, 16, 8, 4, 4)), _init("deconv.bias", _weights(rng, 8))]
    nodes = [helper.make_node("ConvTranspose", ["x", "deconv.weight", "deconv.bias"], ["y"], name="deconv",
                              kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1])]
    model = _model("dynamic_batch", nodes, [_vi("x", ["N", 16, "H", "W"])], [_vi("y", ["N", 8, "H2", "W2"])], inits)
    return model, {"x": (2, 16, 5, 7)}, {"y": (2, 8, 10, 14)}


def weights_as_input():
    """ConvTranspose whose weight W is a graph input (refused), then one with constant weights."""
    rng = np.random.default_rng(108)
    inits = [_init("up1.weight", _weights(rng, 4, 2, 4, 4)), _init("up1.bias", _weights(rng, 2))]
    nodes = [
        helper.make_node("ConvTranspose", ["x", "W"], ["up0_out"], name="up0_dynamic_weight",
                         kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["up0_out", "up1.weight", "up1.bias"], ["y"], name="up1",
                         kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1]),
    ]
    inputs = [_vi("x", [1, 4, 8, 8]), _vi("W", [4, 4, 4, 4])]
    model = _model("weights_as_input", nodes, inputs, [_vi("y", [1, 2, 32, 32])], inits)
    return model, {"x": (1, 4, 8, 8), "W": (4, 4, 4, 4)}, {"y": (1, 2, 32, 32)}


def output_shape_same():
    """ConvTranspose SAME_LOWER k3 s2 op1 (8x8 -> 16x16), a stride-2 Conv back to 8x8, then a
    ConvTranspose k3 s2 with output_shape [15, 17] (full size 17: crops 1/1 rows, no columns)."""
    rng = np.random.default_rng(109)
    inits = [
        _init("up0.weight", _weights(rng, 8, 8, 3, 3)),
        _init("up0.bias", _weights(rng, 8)),
        _init("down.weight", _weights(rng, 8, 8, 3, 3)),
        _init("down.bias", _weights(rng, 8)),
        _init("up1.weight", _weights(rng, 8, 4, 3, 3)),
        _init("up1.bias", _weights(rng, 4)),
    ]
    nodes = [
        helper.make_node("ConvTranspose", ["x", "up0.weight", "up0.bias"], ["up0_out"], name="up0",
                         kernel_shape=[3, 3], strides=[2, 2], output_padding=[1, 1], auto_pad="SAME_LOWER"),
        helper.make_node("Conv", ["up0_out", "down.weight", "down.bias"], ["down_out"], name="down",
                         kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["down_out"], ["relu_out"], name="relu"),
        helper.make_node("ConvTranspose", ["relu_out", "up1.weight", "up1.bias"], ["y"], name="up1",
                         kernel_shape=[3, 3], strides=[2, 2], output_shape=[15, 17]),
    ]
    # up0: SAME -> 2*8 = 16 (total pad 3-2+1 = 2, 1 at the start for SAME_LOWER); down: 8
    model = _model("output_shape_same", nodes, [_vi("x", [1, 8, 8, 8])], [_vi("y", [1, 4, 15, 17])], inits)
    return model, {"x": (1, 8, 8, 8)}, {"y": (1, 4, 15, 17)}


def constant_identity_weights():
    """ConvTranspose k4 s2 p1 8->4 whose W comes from a Constant through an Identity; bias initializer."""
    rng = np.random.default_rng(110)
    weight = _weights(rng, 8, 4, 4, 4)
    inits = [_init("deconv.bias", _weights(rng, 4))]
    nodes = [
        helper.make_node("Constant", [], ["w_const"], name="w_const", value=numpy_helper.from_array(weight, "w_value")),
        helper.make_node("Identity", ["w_const"], ["w_identity"], name="w_identity"),
        helper.make_node("ConvTranspose", ["x", "w_identity", "deconv.bias"], ["y"], name="deconv",
                         kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1]),
    ]
    model = _model("constant_identity_weights", nodes, [_vi("x", [1, 8, 8, 8])], [_vi("y", [1, 4, 16, 16])], inits)
    return model, {"x": (1, 8, 8, 8)}, {"y": (1, 4, 16, 16)}


BUILDERS = {
    "dcgan_stack.onnx": dcgan_stack,
    "unet_decoder_k2s2.onnx": unet_decoder_k2s2,
    "fsrcnn_k9s3.onnx": fsrcnn_k9s3,
    "decoder_1d.onnx": decoder_1d,
    "decoder_3d.onnx": decoder_3d,
    "grouped_dilated.onnx": grouped_dilated,
    "dynamic_batch.onnx": dynamic_batch,
    "weights_as_input.onnx": weights_as_input,
    "output_shape_same.onnx": output_shape_same,
    "constant_identity_weights.onnx": constant_identity_weights,
}


def check_in_onnxruntime(model: onnx.ModelProto, shapes: dict, expected: dict) -> None:
    """Run ``model`` on seeded inputs and check every output has the worked-out shape."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    outputs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    for name, shape in expected.items():
        got = outputs[name]
        if got.shape != tuple(shape) or not np.all(np.isfinite(got)):
            raise RuntimeError(f"{model.graph.name}: output {name} has shape {got.shape}, expected {shape}")


def build(name: str) -> onnx.ModelProto:
    model, _, _ = BUILDERS[name]()
    return model


def write_all(folder: str | Path = HERE, check: bool = True) -> list[Path]:
    """Build every model, check it in onnxruntime, write it into ``folder``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, builder in BUILDERS.items():
        model, shapes, expected = builder()
        onnx.checker.check_model(model)
        if check:
            check_in_onnxruntime(model, shapes, expected)
        path = folder / name
        path.write_bytes(model.SerializeToString())
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0]) if argv else HERE
    for path in write_all(folder):
        print(f"{path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
