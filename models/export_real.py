"""Export a small corpus of ONNX models the way real users do (torch.onnx / tf2onnx).

    /tmp/torchenv/bin/python models/export_real.py torch   # PyTorch models (TorchScript + dynamo)
    /tmp/torchenv/bin/python models/export_real.py torch-dynamic   # exports with dynamic axes
    /tmp/tfenv/bin/python    models/export_real.py keras   # Keras models through tf2onnx
    python models/export_real.py qdq                       # onnxruntime quantize_static of some of them
    python models/export_real.py census                    # print an op census of models/exported

Unlike models/make_models.py (hand-built with onnx.helper), these graphs are whatever the
exporters write: Constant nodes, Resize with exporter-chosen
attributes, Transposes around NHWC ops, and so on.  Weights are random and seeded.

For every model NAME this writes into models/exported/:
  NAME.onnx  the exported model (IR version capped at 10, checked with onnx.checker and
             loaded/run in onnxruntime)
  NAME.npz   one seeded input per graph input (key = ONNX input name) and the reference
             outputs computed by onnxruntime on the exported model (key = "out:<output name>")

The torch files are byte-identical from run to run; tf2onnx numbers its folded constants
(const_fold_opt__N) in an order that changes between runs, so keras_upsampling2d_conv.onnx can
differ in initializer names/order (not in values or outputs) each time it is regenerated.

Environments used to produce the committed files: torch 2.13.0+cpu, onnx 1.23.2,
onnxruntime 1.31.1, onnxscript 0.7.2 (torch); tensorflow-cpu 2.21.0, keras 3.15.1, tf2onnx 1.17.0,
onnx 1.23.2, onnxruntime 1.31.1 (keras).
"""

from __future__ import annotations

import io
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

OUT_DIR = Path(__file__).parent / "exported"
MAX_IR = 10
FAILED: list[tuple[str, str]] = []


# ---------------------------------------------------------------------------------------------
# common helpers


def _input_array(seed: int, shape) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(np.float32)


def finalize(name: str, model: onnx.ModelProto, inputs: list[np.ndarray], exporter: str,
             expected: list[np.ndarray]) -> None:
    """Cap the IR version, check, run in onnxruntime, compare with the framework's own outputs
    (``expected``), write NAME.onnx and NAME.npz."""
    import onnxruntime as ort

    if model.ir_version > MAX_IR:
        model.ir_version = MAX_IR
    onnx.checker.check_model(model, full_check=True)
    data = model.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    in_names = [i.name for i in sess.get_inputs()]
    if len(in_names) != len(inputs):
        raise RuntimeError(f"{name}: graph has inputs {in_names}, got {len(inputs)} arrays")
    feeds = dict(zip(in_names, inputs))
    outs = sess.run(None, feeds)
    if len(outs) != len(expected):
        raise RuntimeError(f"{name}: {len(outs)} ONNX outputs, framework gave {len(expected)}")
    max_diff = 0.0
    for got, want in zip(outs, expected):
        if got.shape != want.shape:
            raise RuntimeError(f"{name}: onnxruntime shape {got.shape} != framework {want.shape}")
        max_diff = max(max_diff, float(np.max(np.abs(got - want))))
    if max_diff > 1e-4:
        raise RuntimeError(f"{name}: onnxruntime differs from the framework by {max_diff:.3g}")
    arrays = dict(feeds)
    for meta, value in zip(sess.get_outputs(), outs):
        if not np.all(np.isfinite(value)):
            raise RuntimeError(f"{name}: non-finite output {meta.name}")
        arrays[f"out:{meta.name}"] = value
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / f"{name}.onnx").write_bytes(data)
    np.savez(OUT_DIR / f"{name}.npz", **arrays)
    print(f"wrote {name}.onnx ({len(data)} B, {exporter}, opset "
          f"{_opset(model)}, IR {model.ir_version}, max |ort-framework| {max_diff:.2g}): "
          f"{census(model)}")


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), -1)


def census(model: onnx.ModelProto) -> str:
    counts = Counter(n.op_type for n in model.graph.node)
    return ", ".join(f"{k}x{v}" for k, v in sorted(counts.items()))


def attempt(name: str, fn) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - record and keep exporting the rest
        line = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        FAILED.append((name, line))
        print(f"FAILED {name}: {line}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# PyTorch


def torch_models() -> None:
    import torch
    from torch import nn

    torch.set_grad_enabled(False)

    def export_ts(name, module, shapes, opset, seed, *, dynamic_axes=None, input_names=None,
                  output_names=None, constant_folding=True, training=None):
        torch.manual_seed(seed)
        module.eval()
        arrays = [_input_array(seed + 1000 + i, s) for i, s in enumerate(shapes)]
        args = tuple(torch.from_numpy(a) for a in arrays)
        buf = io.BytesIO()
        kwargs = {}
        if training is not None:
            kwargs["training"] = training
        torch.onnx.export(
            module, args, buf, dynamo=False, opset_version=opset,
            do_constant_folding=constant_folding,
            input_names=input_names or [f"input{i}" if len(shapes) > 1 else "input"
                                        for i in range(len(shapes))],
            output_names=output_names or ["output"],
            dynamic_axes=dynamic_axes, **kwargs,
        )
        model = onnx.load_from_string(buf.getvalue())
        finalize(name, model, arrays, f"torch {torch.__version__} TorchScript",
                 _torch_outputs(module, args))

    def export_dynamo(name, module, shapes, opset, seed):
        torch.manual_seed(seed)
        module.eval()
        arrays = [_input_array(seed + 1000 + i, s) for i, s in enumerate(shapes)]
        args = tuple(torch.from_numpy(a) for a in arrays)
        prog = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                 input_names=["input"], output_names=["output"])
        model = prog.model_proto
        finalize(name, model, arrays, f"torch {torch.__version__} dynamo",
                 _torch_outputs(module, args))

    def _torch_outputs(module, args):
        out = module(*args)
        return [t.numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]

    def seeded(seed, builder):
        torch.manual_seed(seed)
        return builder()

    # 1. nearest Upsample + Conv --------------------------------------------------------------
    def nearest_conv():
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                             nn.Conv2d(8, 8, 3, padding=1))

    for op in (9, 11, 17):
        attempt(f"torch_upsample_nearest_conv_op{op}", lambda op=op: export_ts(
            f"torch_upsample_nearest_conv_op{op}", seeded(1, nearest_conv), [(1, 8, 8, 8)], op, 1))

    # 2. bilinear Upsample + Conv -------------------------------------------------------------
    def bilinear_conv(padding=1):
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                             nn.Conv2d(8, 8, 3, padding=padding))

    for op in (11, 17):
        attempt(f"torch_upsample_bilinear_conv_op{op}", lambda op=op: export_ts(
            f"torch_upsample_bilinear_conv_op{op}", seeded(2, bilinear_conv), [(1, 8, 8, 8)], op, 2))
    attempt("torch_upsample_bilinear_conv_valid_op17", lambda: export_ts(
        "torch_upsample_bilinear_conv_valid_op17", seeded(3, lambda: bilinear_conv(0)),
        [(1, 8, 8, 8)], 17, 3))

    # 3. ESPCN-like PixelShuffle --------------------------------------------------------------
    def espcn(r=2):
        return nn.Sequential(nn.Conv2d(3, 16, 5, padding=2), nn.Tanh(),
                             nn.Conv2d(16, 3 * r * r, 3, padding=1), nn.PixelShuffle(r))

    for op in (9, 11, 17):
        attempt(f"torch_pixelshuffle_op{op}", lambda op=op: export_ts(
            f"torch_pixelshuffle_op{op}", seeded(4, espcn), [(1, 3, 8, 8)], op, 4))
    attempt("torch_pixelshuffle_r3_op17", lambda: export_ts(
        "torch_pixelshuffle_r3_op17", seeded(5, lambda: espcn(3)), [(1, 3, 8, 8)], 17, 5))

    # 4. DCGAN generator tail with BatchNorm ------------------------------------------------------
    def dcgan():
        m = nn.Sequential(nn.ConvTranspose2d(16, 8, 4, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.ConvTranspose2d(8, 3, 4, 2, 1), nn.Tanh())
        bn = m[1]
        bn.running_mean.copy_(torch.randn(8) * 0.2)
        bn.running_var.copy_(torch.rand(8) + 0.5)
        bn.weight.data.copy_(torch.rand(8) + 0.5)
        bn.bias.data.copy_(torch.randn(8) * 0.1)
        return m

    attempt("torch_dcgan_op13", lambda: export_ts(
        "torch_dcgan_op13", seeded(6, dcgan), [(1, 16, 4, 4)], 13, 6,
        training=torch.onnx.TrainingMode.EVAL))

    # 5. UNet decoder step with skip input ----------------------------------------------------
    class UNetUp(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
            self.conv = nn.Conv2d(16, 8, 3, padding=1)

        def forward(self, x, skip):
            return self.conv(torch.cat([self.up(x), skip], dim=1))

    attempt("torch_unet_decoder_op17", lambda: export_ts(
        "torch_unet_decoder_op17", seeded(7, UNetUp), [(1, 16, 8, 8), (1, 8, 16, 16)], 17, 7,
        input_names=["x", "skip"]))

    # 6-9. plain ConvTranspose variants ----------------------------------------------------------
    attempt("torch_fsrcnn_op13", lambda: export_ts(
        "torch_fsrcnn_op13",
        seeded(8, lambda: nn.ConvTranspose2d(8, 1, 9, stride=3, padding=4, output_padding=2)),
        [(1, 8, 8, 8)], 13, 8))
    attempt("torch_convtranspose1d_op13", lambda: export_ts(
        "torch_convtranspose1d_op13",
        seeded(9, lambda: nn.ConvTranspose1d(8, 4, 16, stride=8, padding=4)),
        [(1, 8, 32)], 13, 9))
    attempt("torch_convtranspose3d_op13", lambda: export_ts(
        "torch_convtranspose3d_op13",
        seeded(10, lambda: nn.ConvTranspose3d(4, 2, 3, stride=2, padding=1, output_padding=1)),
        [(1, 4, 4, 4, 4)], 13, 10))
    attempt("torch_grouped_dilated_op13", lambda: export_ts(
        "torch_grouped_dilated_op13",
        seeded(11, lambda: nn.ConvTranspose2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=4,
                                              output_padding=1)),
        [(1, 8, 8, 8)], 13, 11))

    # 10. dynamic batch/H/W ---------------------------------------------------------------------
    def dynamic():
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                             nn.Conv2d(8, 8, 3, padding=1),
                             nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1))

    dyn = {"input": {0: "batch", 2: "height", 3: "width"},
           "output": {0: "batch", 2: "out_height", 3: "out_width"}}
    attempt("torch_dynamic_hw_op17", lambda: export_ts(
        "torch_dynamic_hw_op17", seeded(12, dynamic), [(2, 8, 8, 8)], 17, 12, dynamic_axes=dyn))

    # 11. dynamo exporter ------------------------------------------------------------------------
    attempt("torch_nearest_conv_dynamo_op18", lambda: export_dynamo(
        "torch_nearest_conv_dynamo_op18", seeded(13, nearest_conv), [(1, 8, 8, 8)], 18, 13))
    attempt("torch_pixelshuffle_dynamo_op18", lambda: export_dynamo(
        "torch_pixelshuffle_dynamo_op18", seeded(14, espcn), [(1, 3, 8, 8)], 18, 14))

    # 12. weight-normed ConvTranspose, weight computed in-graph ----------------------------------
    def weightnorm():
        from torch.nn.utils.parametrizations import weight_norm
        return weight_norm(nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1))

    attempt("torch_weightnorm_convtranspose_op13", lambda: export_ts(
        "torch_weightnorm_convtranspose_op13", seeded(15, weightnorm), [(1, 8, 8, 8)], 13, 15,
        constant_folding=False))


# ---------------------------------------------------------------------------------------------
# PyTorch exports with dynamic axes, as real users export them (the most common export of all):
# batch only, batch + H/W, batch + time; TorchScript dynamic_axes and dynamo dynamic_shapes


def torch_dynamic_models() -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_grad_enabled(False)

    def export(name, module, shapes, opset, seed, axes, dynamo=False, input_names=None):
        """``axes``: per input, {dim: symbol name}."""
        torch.manual_seed(seed)
        module.eval()
        arrays = [_input_array(seed + 2000 + i, s) for i, s in enumerate(shapes)]
        args = tuple(torch.from_numpy(a) for a in arrays)
        names = input_names or (["input"] if len(shapes) == 1 else [f"input{i}" for i in range(len(shapes))])
        if dynamo:
            dims = {}
            dyn = {n: {d: dims.setdefault(sym, torch.export.Dim(sym, min=2 if d == 0 else 4, max=4096))
                       for d, sym in a.items()} for n, a in zip(names, axes)}
            prog = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=names,
                                     output_names=["output"], dynamic_shapes=tuple(dyn.values()))
            model = prog.model_proto
            exporter = f"torch {torch.__version__} dynamo"
        else:
            buf = io.BytesIO()
            torch.onnx.export(module, args, buf, dynamo=False, opset_version=opset, input_names=names,
                              output_names=["output"], dynamic_axes=dict(zip(names, axes)))
            model = onnx.load_from_string(buf.getvalue())
            exporter = f"torch {torch.__version__} TorchScript"
        out = module(*args)
        finalize(name, model, arrays, exporter, [t.numpy() for t in (out if isinstance(out, tuple) else (out,))])

    def seeded(seed, builder):
        torch.manual_seed(seed)
        return builder()

    class DCGAN(nn.Sequential):
        def __init__(self):
            super().__init__(nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.ConvTranspose2d(16, 3, 4, 2, 1), nn.Tanh())
            bn = self[1]
            bn.running_mean.copy_(torch.randn(16) * 0.2)
            bn.running_var.copy_(torch.rand(16) + 0.5)

    class Espcn(nn.Sequential):
        def __init__(self, r=2):
            super().__init__(nn.Conv2d(3, 16, 5, padding=2), nn.Tanh(), nn.Conv2d(16, 3 * r * r, 3, padding=1),
                             nn.PixelShuffle(r))

    class Decoder(nn.Module):
        """A VAE-decoder-like stack: nearest x2 + Conv3x3, twice, then a bilinear x2 + Conv."""

        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(16, 16, 3, padding=1)
            self.c2 = nn.Conv2d(16, 8, 3, padding=1)
            self.c3 = nn.Conv2d(8, 3, 3, padding=1)

        def forward(self, x):
            x = F.silu(self.c1(F.interpolate(x, scale_factor=2.0, mode="nearest")))
            x = F.silu(self.c2(F.interpolate(x, scale_factor=2.0, mode="nearest")))
            return self.c3(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))

    class HeadStep(nn.Module):
        """torchvision-head style: upsample to another tensor's size (F.interpolate(size=skip.shape[2:]),
        x2 here), then a Conv; the skip is added after."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(16, 8, 3, padding=1)

        def forward(self, x, skip):
            return self.conv(F.interpolate(x, size=skip.shape[2:], mode="nearest")) + skip

    class UNetStep(nn.Module):
        """smp-style: upsample to the skip's size, concat, conv (the Resize -> Concat -> Conv idiom)."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(24, 8, 3, padding=1)

        def forward(self, x, skip):
            x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
            return self.conv(torch.cat([x, skip], dim=1))

    class Vocoder(nn.Module):
        """HiFi-GAN-like: ConvTranspose1d stages on a mel input with a dynamic time axis."""

        def __init__(self):
            super().__init__()
            self.pre = nn.Conv1d(20, 32, 7, padding=3)
            self.up1 = nn.ConvTranspose1d(32, 16, 16, 8, padding=4)
            self.up2 = nn.ConvTranspose1d(16, 8, 4, 2, padding=1)
            self.post = nn.Conv1d(8, 1, 7, padding=3)

        def forward(self, mel):
            x = F.leaky_relu(self.pre(mel), 0.1)
            x = F.leaky_relu(self.up1(x), 0.1)
            return torch.tanh(self.post(F.leaky_relu(self.up2(x), 0.1)))

    batch = [{0: "batch"}]
    bhw = [{0: "batch", 2: "height", 3: "width"}]
    for opset in (11, 17):
        attempt(f"dyn_batch_dcgan_op{opset}", lambda opset=opset: export(
            f"dyn_batch_dcgan_op{opset}", seeded(31, DCGAN), [(1, 32, 8, 8)], opset, 31, batch))
    attempt("dyn_bhw_espcn_op17", lambda: export("dyn_bhw_espcn_op17", seeded(32, Espcn), [(1, 3, 16, 16)], 17, 32, bhw))
    attempt("dyn_bhw_espcn_op9", lambda: export("dyn_bhw_espcn_op9", seeded(33, Espcn), [(1, 3, 16, 16)], 9, 33, bhw))
    attempt("dyn_bhw_decoder_op17", lambda: export(
        "dyn_bhw_decoder_op17", seeded(34, Decoder), [(1, 16, 8, 8)], 17, 34, bhw))
    attempt("dyn_batch_decoder_op13", lambda: export(
        "dyn_batch_decoder_op13", seeded(35, Decoder), [(1, 16, 8, 8)], 13, 35, batch))
    attempt("dyn_bt_vocoder_op17", lambda: export(
        "dyn_bt_vocoder_op17", seeded(36, Vocoder), [(1, 20, 16)], 17, 36, [{0: "batch", 2: "frames"}],
        input_names=["mel"]))
    attempt("static_head_interpolate_size_op17", lambda: export(
        "static_head_interpolate_size_op17", seeded(37, HeadStep), [(1, 16, 8, 8), (1, 8, 16, 16)], 17, 37,
        [{}, {}], input_names=["x", "skip"]))
    attempt("static_unet_interpolate_size_op17", lambda: export(
        "static_unet_interpolate_size_op17", seeded(41, UNetStep), [(1, 16, 8, 8), (1, 8, 16, 16)], 17, 41,
        [{}, {}], input_names=["x", "skip"]))
    attempt("dyn_bhw_decoder_dynamo_op18", lambda: export(
        "dyn_bhw_decoder_dynamo_op18", seeded(38, Decoder), [(2, 16, 8, 8)], 18, 38, bhw, dynamo=True))
    attempt("dyn_batch_dcgan_dynamo_op18", lambda: export(
        "dyn_batch_dcgan_dynamo_op18", seeded(39, DCGAN), [(2, 32, 8, 8)], 18, 39, batch, dynamo=True))
    attempt("dyn_bt_vocoder_dynamo_op18", lambda: export(
        "dyn_bt_vocoder_dynamo_op18", seeded(40, Vocoder), [(2, 20, 16)], 18, 40, [{0: "batch", 2: "frames"}],
        dynamo=True, input_names=["mel"]))


# ---------------------------------------------------------------------------------------------
# Keras through tf2onnx (opset 13, NHWC input 1x8x8x4)


def keras_models() -> None:
    import tensorflow as tf
    import tf2onnx

    keras = tf.keras

    def build(seed, layers_fn, shape):
        tf.keras.utils.set_random_seed(seed)
        inp = keras.Input(shape=shape[1:], batch_size=shape[0], name="input")
        out = layers_fn(inp)
        return keras.Model(inp, out)

    def export(name, seed, layers_fn, opset=13, shape=(1, 8, 8, 4), run_shape=None):
        """``shape`` is the declared input shape (None: symbolic), ``run_shape`` the one exported with."""
        model = build(seed, layers_fn, shape)
        run_shape = run_shape or shape
        arr = _input_array(seed + 1000, run_shape)
        spec = (tf.TensorSpec(shape, tf.float32, name="input"),)

        @tf.function(input_signature=spec)
        def fn(x):
            return model(x, training=False)

        proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=opset)
        expected = [np.asarray(fn(tf.constant(arr)))]
        finalize(name, proto, [arr], f"tf {tf.__version__} / tf2onnx {tf2onnx.__version__}",
                 expected)

    L = keras.layers
    attempt("keras_upsampling2d_conv", lambda: export(
        "keras_upsampling2d_conv", 21,
        lambda x: L.Conv2D(8, 3, padding="same")(L.UpSampling2D(2)(x))))
    attempt("keras_conv2dtranspose_same", lambda: export(
        "keras_conv2dtranspose_same", 22,
        lambda x: L.Conv2DTranspose(8, 4, strides=2, padding="same")(x)))
    attempt("keras_depth_to_space", lambda: export(
        "keras_depth_to_space", 23,
        lambda x: L.Lambda(lambda t: tf.nn.depth_to_space(t, 2))(
            L.Conv2D(12, 3, padding="same")(x))))
    attempt("keras_upsampling2d_bilinear_conv", lambda: export(
        "keras_upsampling2d_bilinear_conv", 24,
        lambda x: L.Conv2D(8, 3, padding="same")(L.UpSampling2D(2, interpolation="bilinear")(x))))
    attempt("keras_conv2dtranspose_valid_op17", lambda: export(
        "keras_conv2dtranspose_valid_op17", 25,
        lambda x: L.Conv2DTranspose(6, 3, strides=2, padding="valid")(x), opset=17))
    attempt("keras_conv1dtranspose_op17", lambda: export(
        "keras_conv1dtranspose_op17", 26,
        lambda x: L.Conv1DTranspose(6, 5, strides=2, padding="same")(x), opset=17, shape=(1, 16, 4)))
    attempt("keras_conv2dtranspose_same_dynamic_op17", lambda: export(
        "keras_conv2dtranspose_same_dynamic_op17", 27,
        lambda x: L.Conv2DTranspose(6, 3, strides=2, padding="same")(x), opset=17,
        shape=(None, None, None, 4), run_shape=(1, 8, 8, 4)))


# ---------------------------------------------------------------------------------------------
# onnxruntime's static quantizer (QDQ) on exported float models

#: float model -> per-channel variants to write (False: per-tensor, True: per-channel)
QDQ_SOURCES = {
    "torch_dcgan_op13": (False, True),
    "torch_unet_decoder_op17": (False, True),
    "torch_fsrcnn_op13": (False,),
    "torch_convtranspose1d_op13": (True,),
    "torch_grouped_dilated_op13": (False,),  # per channel: quantize_static fails on grouped ConvTranspose
    "torch_pixelshuffle_op17": (False, True),
    "torch_upsample_nearest_conv_op17": (False,),
}


def qdq_models() -> None:
    """``quantize_static`` (QDQ, int8 weights, uint8 activations) of some exported models,
    calibrated on their saved input and two seeded random ones."""
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self, feeds):
            self.samples = iter(feeds)

        def get_next(self):
            return next(self.samples, None)

    def export(stem, per_channel):
        name = f"{stem}_qdq_{'pc' if per_channel else 'pt'}"
        data = np.load(OUT_DIR / f"{stem}.npz")
        feeds = {k: data[k] for k in data.files if not k.startswith("out:")}
        samples = [feeds] + [{k: _input_array(50 + i, v.shape) for k, v in feeds.items()} for i in range(2)]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "q.onnx"
            quantize_static(str(OUT_DIR / f"{stem}.onnx"), str(out), Reader(samples), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8)
            model = onnx.load(out)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        expected = sess.run(None, feeds)  # the quantized model is its own reference
        finalize(name, model, list(feeds.values()), f"onnxruntime {ort.__version__} quantize_static", expected)

    for stem, variants in QDQ_SOURCES.items():
        for per_channel in variants:
            attempt(stem, lambda: export(stem, per_channel))


# ---------------------------------------------------------------------------------------------
# census of what is on disk


def print_census() -> None:
    from onnx import helper

    for path in sorted(OUT_DIR.glob("*.onnx")):
        m = onnx.load(path)
        print(f"{path.name}: {path.stat().st_size} B, opset {_opset(m)}, IR {m.ir_version}, "
              f"producer {m.producer_name} {m.producer_version}")
        print(f"  ops: {census(m)}")
        for n in m.graph.node:
            if n.op_type in ("Resize", "Upsample", "DepthToSpace", "SpaceToDepth"):
                attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
                attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
                print(f"  {n.op_type} {n.name}: inputs={list(n.input)} {attrs}")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("torch", "torch-dynamic", "keras", "qdq", "census"):
        print(__doc__)
        return 2
    if argv[1] == "torch":
        torch_models()
    elif argv[1] == "torch-dynamic":
        torch_dynamic_models()
    elif argv[1] == "keras":
        keras_models()
    elif argv[1] == "qdq":
        qdq_models()
    else:
        print_census()
        return 0
    if FAILED:
        print(f"{len(FAILED)} model(s) failed:", file=sys.stderr)
        for name, line in FAILED:
            print(f"  {name}: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
