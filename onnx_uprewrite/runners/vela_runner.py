"""Run by ``uprewrite check --compiler vela[:accelerator]`` with the Python of a venv that has
onnx2tf, TensorFlow and ethos-u-vela: onnx2tf converts the model to TFLite (float32, and int8
calibrated on the given inputs), Vela compiles the int8 model for one Ethos-U configuration and
its report says which ops stay on the CPU.  Prints one JSON line: each TFLite op, NPU or CPU, the
reasons Vela gives, and the float32 TFLite's outputs (onnx2tf's conversion; there is no Ethos-U
simulator here, so the NPU's int8 numerics are not measured).

    python vela_runner.py MODEL INPUTS.npz ACCELERATOR WORKDIR
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from runner_io import load_feeds

BIN = Path(sys.executable).parent


def run_tool(args, cwd, what):
    """The output of a converter or compiler run; RuntimeError with its error lines if it fails."""
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    if proc.returncode:
        errors = [ln.strip() for ln in text.splitlines() if "rror" in ln]
        raise RuntimeError(f"{what} exit {proc.returncode}: {' | '.join(errors[-2:])[-400:] or text[-400:]}")
    return text


def layers(report: str):
    """Each op of Vela's network summary as {"id", "op", "where", "name"} (a CPU op is a
    "Passthrough" there: its TFLite type and output come from the warnings, in order) and the reasons."""
    warned = re.findall(r"Warning \(supported operators\) operator: (\w+), ofm: '([^']*)'", report)
    reasons = [f"{op}: {why.strip()}" for op, why in
               re.findall(r"operator: (\w+), ofm: '[^']*'\s*\nReason: ([^\n]*)", report)]
    layers, cpu_seen = [], 0
    for where, op, name in re.findall(r"^\s*(CPU|NPU): (\w+) = (.*?)(?: \(outputs .*)?$", report, flags=re.M):
        if where == "CPU" and op == "Passthrough" and cpu_seen < len(warned):
            (op, name), cpu_seen = warned[cpu_seen], cpu_seen + 1
        layers.append({"id": str(len(layers) + 1), "op": op, "where": where, "name": name.strip()})
    return layers, reasons


def _run_float32(path, feeds):
    """The float32 TFLite's outputs (NCHW again) on ``feeds``; its inputs are matched by name
    (onnx2tf names them serving_default_<name>:0), else taken in order."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    interp.allocate_tensors()
    details = interp.get_input_details()
    for i, (name, x) in enumerate(feeds.items()):
        clean = re.sub(r"\W", "_", name)
        match = next((d for d in details if d["name"] in (name, f"serving_default_{name}:0",
                                                           f"serving_default_{clean}:0")), details[i])
        interp.set_tensor(match["index"], np.moveaxis(x, 1, -1))
    interp.invoke()
    return [np.moveaxis(interp.get_tensor(d["index"]), -1, 1) for d in interp.get_output_details()]


def main(model, inputs, accelerator, work):
    from importlib.metadata import version

    feeds = load_feeds(inputs)
    result = {"versions": {n: version(n) for n in ("ethos-u-vela", "onnx2tf", "tensorflow")}, "layers": []}
    try:
        calibration = []
        for i, (name, x) in enumerate(feeds.items()):
            nhwc = np.moveaxis(x, 1, -1)
            np.save(os.path.join(work, f"calib{i}.npy"), np.concatenate([nhwc, nhwc * 0.5, -nhwc]))
            nest = x.ndim
            calibration += ["-cind", name, f"calib{i}.npy", "[" * nest + "0.0" + "]" * nest,
                            "[" * nest + "1.0" + "]" * nest]
        run_tool([str(BIN / "onnx2tf"), "-i", model, "-o", "tf", "-oiqt", *calibration, "-n"], work, "onnx2tf")
        tflites = {p.name: p for p in (Path(work) / "tf").glob("*.tflite")}
        float32 = next((p for n, p in tflites.items() if n.endswith("_float32.tflite")), None)
        int8 = next((p for n, p in tflites.items() if n.endswith("_full_integer_quant.tflite")), None)
        if float32 is None or int8 is None:
            raise RuntimeError(f"onnx2tf wrote no float32 / full-integer TFLite (wrote {sorted(tflites)})")
        report = run_tool([str(BIN / "vela"), str(int8), "--accelerator-config", accelerator, "--output-dir", "vela",
                       "--show-cpu-operations"], work, "vela")
        result["layers"], reasons = layers(report)
        outputs = _run_float32(float32, feeds)
    except Exception as exc:  # noqa: BLE001 - the converter's or compiler's refusal, in its own words
        result.update(status="rejected", message=f"{type(exc).__name__}: {exc}"[:500])
    else:
        np.savez(os.path.join(work, "outputs.npz"), *outputs)
        result.update(status="compiled", message=" | ".join(reasons)[:500], outputs=os.path.join(work, "outputs.npz"))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
