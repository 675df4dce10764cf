"""The compiler matrix: small ONNX models of every upsampling form the tool reads or emits.

    python benchmarks/compilers/matrix.py [OUT]      # default OUT: /tmp/cc-matrix
    python benchmarks/compilers/matrix.py --shipped PROFILE [OUT]   # models/*.onnx + convert --profile

Each *layer* (a hand-built ConvTranspose, or a nearest/linear Resize + Conv, seeded weights) is
written as it is (form ``source``) and converted by ``onnx_uprewrite.api.convert`` into each exact
form (``subpixel/CRD``, ``subpixel/DCR``, ``subpixel/transpose``, ``subpixel/phases``, ``resize``,
``convtranspose``); forms that come out identical to another are kept once.  OUT gets
``<case>.onnx`` and ``<case>.npz`` (input ``x`` and onnxruntime's output ``y``; a ``/`` in a case
id becomes ``-``) and ``cases.json`` (per case: layer, form, op census, the DepthToSpace nodes).
The compiler scripts read only OUT, so their venvs need no onnxruntime and no onnx-uprewrite.  ``build_cases(reference=False)`` (the
CI test) rebuilds the models without running anything.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_uprewrite import api
from onnx_uprewrite.surgery import op_census
from onnx_uprewrite.passes import EMITTERS, to_subpixel

OPSET = 13  # the newest opset every compiler here reads; CRD DepthToSpace needs >= 11
IR_VERSION = 7
F32 = TensorProto.FLOAT
#: form name -> convert() arguments; "subpixel/phases" is the per-phase layout (one Conv per phase +
#: Concat + DepthToSpace), which --d2s-mode auto picks only where it predicts it faster
FORMS = {
    "subpixel/CRD": dict(to="subpixel", d2s_mode="CRD"),
    "subpixel/DCR": dict(to="subpixel", d2s_mode="DCR"),
    "subpixel/transpose": dict(to="subpixel", d2s_mode="transpose"),
    "subpixel/phases": dict(to="subpixel", d2s_mode="phases"),
    "resize": dict(to="resize"),
    "convtranspose": dict(to="convtranspose"),
}


@dataclass(frozen=True)
class Layer:
    """One upsampling layer: ``kind`` convtranspose (K, s, pad each side, output_padding, group,
    dilation) or resize_conv (Resize x s, nearest asymmetric/floor or linear half_pixel, then a KxK Conv
    with pads K//2: the linear one the tool reads as Pad(edge) + a depthwise ConvTranspose, DESIGN R3)."""

    name: str
    kind: str
    rank: int
    cin: int
    cout: int
    length: int
    k: int = 1
    s: int = 2
    pad: int = 0
    op: int = 0
    group: int = 1
    dil: int = 1
    mode: str = "nearest"


LAYERS = (
    Layer("k4s2p1", "convtranspose", 2, 8, 4, 8, k=4, s=2, pad=1),
    Layer("k4s2p1_c2", "convtranspose", 2, 8, 2, 8, k=4, s=2, pad=1),
    Layer("k2s2", "convtranspose", 2, 8, 4, 8, k=2, s=2),
    Layer("k3s2p1op1", "convtranspose", 2, 8, 4, 8, k=3, s=2, pad=1, op=1),
    Layer("k9s3p4op2", "convtranspose", 2, 8, 3, 8, k=9, s=3, pad=4, op=2),
    Layer("k9s3p4op2_c4", "convtranspose", 2, 8, 4, 8, k=9, s=3, pad=4, op=2),
    Layer("k8s4p2", "convtranspose", 2, 8, 4, 6, k=8, s=4, pad=2),
    Layer("k16s8p4", "convtranspose", 2, 4, 4, 4, k=16, s=8, pad=4),
    Layer("dw_k4s2p1", "convtranspose", 2, 8, 8, 8, k=4, s=2, pad=1, group=8),
    Layer("dil2_k3s2p2op1", "convtranspose", 2, 8, 4, 8, k=3, s=2, pad=2, op=1, dil=2),
    Layer("g2dil2_k3s2p2op1", "convtranspose", 2, 8, 8, 8, k=3, s=2, pad=2, op=1, group=2, dil=2),
    Layer("1d_k4s2p1", "convtranspose", 1, 8, 4, 16, k=4, s=2, pad=1),
    Layer("3d_k4s2p1", "convtranspose", 3, 4, 4, 4, k=4, s=2, pad=1),
    Layer("3d_k3s2p1op1", "convtranspose", 3, 8, 4, 4, k=3, s=2, pad=1, op=1),
    Layer("nearest2_conv3", "resize_conv", 2, 8, 4, 8, k=3, s=2),
    Layer("nearest3_conv3", "resize_conv", 2, 8, 4, 8, k=3, s=3),
    Layer("linear2_conv3", "resize_conv", 2, 4, 4, 8, k=3, s=2, mode="linear"),
)


def _vi(name, shape):
    return helper.make_tensor_value_info(name, F32, shape)


def _model(layer: Layer, nodes, out_len: int, inits) -> onnx.ModelProto:
    spatial = [layer.length] * layer.rank
    graph = helper.make_graph(nodes, layer.name, [_vi("x", [1, layer.cin, *spatial])],
                              [_vi("y", [1, layer.cout, *[out_len] * layer.rank])], initializer=inits)
    return helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)],
                             producer_name="onnx-uprewrite benchmarks/compilers/matrix.py")


def _weights(rng, *shape):
    return (rng.standard_normal(shape) * 0.1).astype(np.float32)


def source_model(layer: Layer) -> onnx.ModelProto:
    rng = np.random.default_rng(sum(map(ord, layer.name)))
    n, L, s = layer.rank, layer.length, layer.s
    if layer.kind == "convtranspose":
        w = _weights(rng, layer.cin, layer.cout // layer.group, *[layer.k] * n)
        b = _weights(rng, layer.cout)
        node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], "up", kernel_shape=[layer.k] * n,
                                strides=[s] * n, pads=[layer.pad] * 2 * n, output_padding=[layer.op] * n,
                                dilations=[layer.dil] * n, group=layer.group)
        out = s * (L - 1) + (layer.k - 1) * layer.dil + 1 + layer.op - 2 * layer.pad
        return _model(layer, [node], out, [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    scales = numpy_helper.from_array(np.array([1, 1] + [s] * n, np.float32), "scales")
    roi = numpy_helper.from_array(np.zeros(0, np.float32), "roi")
    w = _weights(rng, layer.cout, layer.cin, *[layer.k] * n)
    b = _weights(rng, layer.cout)
    how = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor") \
        if layer.mode == "nearest" else dict(mode="linear", coordinate_transformation_mode="half_pixel")
    up = helper.make_node("Resize", ["x", "roi", "scales"], ["u"], "up", **how)
    conv = helper.make_node("Conv", ["u", "w", "b"], ["y"], "conv", kernel_shape=[layer.k] * n,
                            pads=[layer.k // 2] * 2 * n)
    return _model(layer, [up, conv], L * s, [roi, scales, numpy_helper.from_array(w, "w"),
                                             numpy_helper.from_array(b, "b")])


def _d2s_nodes(model: onnx.ModelProto) -> list[dict]:
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    found = []
    for node in model.graph.node:
        if node.op_type == "DepthToSpace":
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            mode = a.get("mode", b"DCR")
            found.append({"mode": mode.decode() if isinstance(mode, bytes) else mode,
                          "blocksize": a["blocksize"], "channels": (shapes.get(node.input[0]) or [0, 0])[1]})
    return found


def build_cases(reference: bool = False) -> dict[str, onnx.ModelProto]:
    """``{case id: model}``, ``<layer>.<form>``, each distinct model once (deterministic).  With
    ``reference`` convert() verifies every form in onnxruntime (slower)."""
    # the per-phase layout is not a --d2s-mode: lend it for this build only, in the table convert()
    # checks the name against and in the emitter's own (two dicts since passes/__init__ copies it)
    tables = [t for t in {id(t): t for t in (api.SUBPIXEL_LAYOUTS, EMITTERS["subpixel"].LAYOUTS)}.values()
              if "phases" not in t]
    for table in tables:
        table["phases"] = to_subpixel.PHASES
    try:
        cases, seen = {}, {}
        for layer in LAYERS:
            source = source_model(layer)
            cases[f"{layer.name}.source"] = source
            seen[source.graph.SerializeToString()] = f"{layer.name}.source"
            for form, kwargs in FORMS.items():
                try:
                    model = api.convert(source, verify=reference, **kwargs).model
                except Exception as exc:  # noqa: BLE001 - a form the tool cannot emit for this layer
                    print(f"  {layer.name}.{form}: not emitted ({type(exc).__name__}: {exc})", file=sys.stderr)
                    continue
                key = model.graph.SerializeToString()
                if key not in seen:
                    seen[key] = f"{layer.name}.{form}"
                    cases[f"{layer.name}.{form}"] = model
        return cases
    finally:
        for table in tables:
            del table["phases"]


def describe(case: str, model: onnx.ModelProto) -> dict:
    layer, form = case.split(".", 1)
    return {"id": case, "layer": layer, "form": form, "ops": op_census(model), "depth_to_space": _d2s_nodes(model)}


def stem(case: str) -> str:
    """The file name of a case (form names hold a '/')."""
    return case.replace("/", "-")


#: shipped models with one input named x (the compiler scripts feed "x")
SHIPPED = ("fsrcnn_k9s3", "dcgan_stack", "decoder_1d", "grouped_dilated")


def shipped_cases(profile: str) -> dict[str, onnx.ModelProto]:
    """``models/<name>.onnx`` as ``<name>.source`` and converted under ``profile`` as ``<name>.<profile>``."""
    models = Path(__file__).resolve().parents[2] / "models"
    cases = {}
    for name in SHIPPED:
        source = onnx.load(models / f"{name}.onnx")
        cases[f"{name}.source"] = source
        cases[f"{name}.{profile}"] = api.convert(source, profile=profile).model
    return cases


def main(out: Path, profile: str | None = None) -> None:
    import onnxruntime as ort

    out.mkdir(parents=True, exist_ok=True)
    cases = build_cases(reference=True) if profile is None else shipped_cases(profile)
    table = []
    for case, model in cases.items():
        onnx.save(model, out / f"{stem(case)}.onnx")
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        np.savez(out / f"{stem(case)}.npz", x=x, y=sess.run(None, {"x": x})[0])
        table.append(describe(case, model) if profile is None else {"id": case})
        print(f"{case:36s} {' '.join(f'{k}x{v}' for k, v in op_census(model).items())}")
    (out / "cases.json").write_text(json.dumps(table, indent=1))
    print(f"{len(table)} cases in {out}")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--shipped"]:  # --shipped PROFILE [OUT]: the shipped models and their conversion
        main(Path(args[2] if len(args) > 2 else f"/tmp/cc-shipped-{args[1]}"), profile=args[1])
    else:
        main(Path(args[0] if args else "/tmp/cc-matrix"))
