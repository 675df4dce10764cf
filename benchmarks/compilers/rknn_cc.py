"""Rockchip RKNN (rknn-toolkit2): load_onnx -> build (fp16, no quantization) for one chip, read the
op placement (NPU / CPU) from the build's "Network Layer Information Table", run the x86
simulator, compare with onnxruntime (fp16 tolerance).

Install (its own venv, never the project's; it brings its own torch: about 5.5 GB, 3 minutes):
    python3.11 -m venv /tmp/cc-rknn && /tmp/cc-rknn/bin/pip install rknn-toolkit2 numpy onnx
Run, one chip a run (results/rknn-<chip>.json):
    RKNN_PLATFORM=rk3588 /tmp/cc-rknn/bin/python benchmarks/compilers/rknn_cc.py
rv1106/rv1103 build only int8: the build quantizes then, calibrated on the case's input, and the
simulator's int8 result is wrong above INT8_WRONG_ABOVE.
"""

import os
import sys

from harness import main
from rknn_runner import INT8_ONLY, layers

PLATFORM = os.environ.get("RKNN_PLATFORM", "rk3588")
#: fp16 on the NPU: 11-bit mantissa, sums of up to a few hundred terms
FP16_WRONG_ABOVE = 2e-2
#: int8 activations and weights, per-tensor: a few quantization steps of the output's range
INT8_WRONG_ABOVE = 0.1

QUANTIZE = PLATFORM in INT8_ONLY

def versions():
    from importlib.metadata import version

    return {"rknn-toolkit2": version("rknn-toolkit2"), "target_platform": PLATFORM}

def _placement(log: str) -> dict:
    """``{"<id> <OpType>": "NPU" | "CPU"}`` from the layer table (rknn_runner.layers)."""
    return {f"{la['id']} {la['op']}": la["where"] for la in layers(log)}

def compile_case(path, x, work):
    log_path = work / "build.log"
    os.chdir(work)  # the toolkit writes check*.onnx debug models into the current directory
    saved = os.dup(1), os.dup(2)
    sys.stdout.flush()
    with open(log_path, "w") as log:  # the toolkit logs through fds 1/2: capture them
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            from rknn.api import RKNN

            rknn = RKNN(verbose=True)
            rknn.config(target_platform=PLATFORM)
            if QUANTIZE:
                import numpy as np

                np.save(work / "x.npy", x)
                (work / "dataset.txt").write_text("x.npy\n")
            steps = [("load_onnx", lambda: rknn.load_onnx(model=str(path), inputs=["x"],
                                                          input_size_list=[list(x.shape)])),
                     ("build", lambda: rknn.build(do_quantization=QUANTIZE,
                                                  dataset="dataset.txt" if QUANTIZE else None)),
                     ("init_runtime", lambda: rknn.init_runtime())]
            failed = next((name for name, step in steps if step() != 0), None)
            out = None if failed else rknn.inference(inputs=[x], data_format="nchw")[0]
        finally:
            sys.stdout.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
    log = log_path.read_text(errors="replace")
    if failed:
        errors = [ln for ln in log.splitlines() if "E RKNN" in ln or "Error" in ln]
        raise RuntimeError(f"{failed} failed: {' | '.join(errors[-3:])[-400:]}")
    placement = _placement(log)
    cpu = sorted(op for op, where in placement.items() if where == "CPU")
    return {"status": "compiled", "message": f"CPU: {', '.join(cpu)}" if cpu else "", "output": out,
            "placement": placement}

if __name__ == "__main__":
    main(f"rknn-{PLATFORM}", compile_case, versions, wrong_above=INT8_WRONG_ABOVE if QUANTIZE else FP16_WRONG_ABOVE)
