"""Arm Ethos-U through Vela: onnx2tf ONNX -> TFLite (float32 and full-integer int8, calibrated on
the case's input), then vela on the int8 model for one accelerator; Vela's own report names each
op it leaves on the CPU.  Numerics: the float32 TFLite (onnx2tf's conversion) against onnxruntime, so
"wrong" here means onnx2tf mis-converted the model; there is no Ethos-U simulator here, so the
NPU's int8 numerics are not measured.

Install (its own venv, never the project's; TensorFlow: about 2-3 GB):
    python3.11 -m venv /tmp/cc-vela && /tmp/cc-vela/bin/pip install onnx2tf tensorflow tf-keras \
        ethos-u-vela onnx onnx-graphsurgeon sng4onnx psutil numpy ai-edge-litert onnxruntime
Run, one accelerator a run (results/vela-<accelerator>.json):
    VELA_ACCELERATOR=ethos-u55-128 /tmp/cc-vela/bin/python benchmarks/compilers/vela_cc.py
"""

import os
import sys
from pathlib import Path

import numpy as np

from harness import main
from vela_runner import layers, run_tool

BIN = Path(sys.executable).parent
ACCELERATOR = os.environ.get("VELA_ACCELERATOR", "ethos-u55-128")


def versions():
    from importlib.metadata import version

    return {"ethos-u-vela": version("ethos-u-vela"), "onnx2tf": version("onnx2tf"),
            "tensorflow": version("tensorflow"), "accelerator": ACCELERATOR}


def _nhwc(x):
    return np.moveaxis(x, 1, -1)


def _placement(report: str) -> tuple[dict, list[str]]:
    """(``{"<n> <op>": "NPU" | "CPU"}`` from Vela's network summary, the reasons it gives for its CPU
    ops): vela_runner.layers, keyed as the results files have it."""
    found, reasons = layers(report)
    return {f"{la['id']} {la['op']}": la["where"] for la in found}, reasons


def compile_case(path, x, work):
    calib = work / "calib.npy"
    samples = np.concatenate([x, np.random.default_rng(1).standard_normal((7, *x.shape[1:])).astype(np.float32)])
    np.save(calib, _nhwc(samples))
    nest = x.ndim  # -cind mean and std: nested like the input (NHWC), broadcast
    run_tool([str(BIN / "onnx2tf"), "-i", str(path), "-o", "tf", "-oiqt", "-cind", "x", str(calib),
          "[" * nest + "0.0" + "]" * nest, "[" * nest + "1.0" + "]" * nest, "-n"], work, "onnx2tf")
    tflites = {p.name: p for p in (work / "tf").glob("*.tflite")}
    float32 = next((p for name, p in tflites.items() if name.endswith("_float32.tflite")), None)
    int8 = next((p for name, p in tflites.items() if name.endswith("_full_integer_quant.tflite")), None)
    if float32 is None or int8 is None:
        raise RuntimeError(f"onnx2tf wrote no float32 / full-integer TFLite (wrote {sorted(tflites)})")
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(float32))
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], _nhwc(x))
    interp.invoke()
    out = np.moveaxis(interp.get_tensor(interp.get_output_details()[0]["index"]), -1, 1)
    report = run_tool([str(BIN / "vela"), str(int8), "--accelerator-config", ACCELERATOR, "--output-dir", "vela",
                   "--show-cpu-operations"], work, "vela")
    placement, reasons = _placement(report)
    return {"status": "compiled", "message": " | ".join(reasons)[:400], "output": out, "placement": placement}


if __name__ == "__main__":
    main(f"vela-{ACCELERATOR}", compile_case, versions)
