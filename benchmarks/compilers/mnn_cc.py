"""MNN: mnnconvert ONNX -> .mnn, then run it with MNN's Interpreter (CPU), compare with onnxruntime.

Install (its own venv, never the project's):
    python3.11 -m venv /tmp/cc-mnn && /tmp/cc-mnn/bin/pip install MNN numpy onnx
Run:
    /tmp/cc-mnn/bin/python benchmarks/compilers/mnn_cc.py
mnnconvert tries to `pip install` a logging SDK on first use: this script puts a stub `pip` (exit 0)
first on PATH for the converter.  No placement report (CPU backend).
"""

import os
import subprocess
import sys
from pathlib import Path

from harness import main

BIN = Path(sys.executable).parent


def versions():
    import MNN

    return {"MNN": MNN.version()}


def compile_case(path, x, work):
    stub = work / "stub"
    stub.mkdir()
    (stub / "pip").write_text("#!/bin/sh\nexit 0\n")
    (stub / "pip").chmod(0o755)
    out_model = work / "m.mnn"
    proc = subprocess.run([str(BIN / "mnnconvert"), "-f", "ONNX", "--modelFile", str(path), "--MNNModel",
                           str(out_model), "--bizCode", "cc"], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{stub}:{os.environ['PATH']}"}, timeout=200)
    if proc.returncode or not out_model.is_file():
        raise RuntimeError(f"mnnconvert exit {proc.returncode}: {proc.stdout[-300:]} {proc.stderr[-300:]}")
    import MNN

    interp = MNN.Interpreter(str(out_model))
    session = interp.createSession({"numThread": 1, "precision": "high"})
    inp = interp.getSessionInput(session)
    interp.resizeTensor(inp, x.shape)
    interp.resizeSession(session)
    tmp = MNN.Tensor(x.shape, MNN.Halide_Type_Float, x.copy(), MNN.Tensor_DimensionType_Caffe)
    inp.copyFrom(tmp)
    interp.runSession(session)
    out = interp.getSessionOutput(session)
    shape = out.getShape()
    host = MNN.Tensor(shape, MNN.Halide_Type_Float, __import__("numpy").zeros(shape, "float32"),
                      MNN.Tensor_DimensionType_Caffe)
    out.copyToHostTensor(host)
    warn = [ln for ln in proc.stdout.splitlines() if "not support" in ln.lower() or "error" in ln.lower()]
    return {"status": "compiled", "message": " | ".join(warn)[:300], "output": host.getNumpyData().copy()}


if __name__ == "__main__":
    main("mnn", compile_case, versions)
