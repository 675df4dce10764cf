"""ncnn through pnnx: pnnx ONNX -> .ncnn.param/.bin (fp32 weights), load and run with ncnn's Python
binding (fp16/bf16 off), compare with onnxruntime.

Install (its own venv, never the project's; pnnx pulls torch: about 5.6 GB, 3 minutes):
    python3.11 -m venv /tmp/cc-ncnn && /tmp/cc-ncnn/bin/pip install pnnx ncnn numpy onnx
Run:
    /tmp/cc-ncnn/bin/python benchmarks/compilers/ncnn_cc.py
A case is rejected when pnnx fails, or ncnn cannot load the layers pnnx wrote (load_param != 0:
"layer X not exists or registered"); pnnx's "ignore"/"todo" lines are kept as the message.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from harness import main

BIN = Path(sys.executable).parent


def versions():
    from importlib.metadata import version

    return {"pnnx": version("pnnx"), "ncnn": version("ncnn")}


def compile_case(path, x, work):
    shutil.copy(path, work / "m.onnx")
    shape = "[" + ",".join(map(str, x.shape)) + "]"
    proc = subprocess.run([str(BIN / "pnnx"), "m.onnx", f"inputshape={shape}", "fp16=0"], cwd=work,
                          capture_output=True, text=True, timeout=250)
    notes = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines()
             if ln.startswith(("ignore", "todo", "unsupported")) or "not supported" in ln]
    param, weights = work / "m.ncnn.param", work / "m.ncnn.bin"
    if proc.returncode or not param.is_file():
        raise RuntimeError(f"pnnx exit {proc.returncode}: {' | '.join(notes) or proc.stderr[-300:]}")
    import ncnn

    net = ncnn.Net()
    for flag in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage"):
        setattr(net.opt, flag, False)
    layers = [ln.split()[0] for ln in param.read_text().splitlines()[2:] if ln.strip()]
    if net.load_param(str(param)) != 0:
        raise RuntimeError(f"ncnn load_param failed (layers {sorted(set(layers))}); pnnx: {' | '.join(notes)}")
    net.load_model(str(weights))
    ex = net.create_extractor()
    ex.input("in0", ncnn.Mat(np.ascontiguousarray(x[0])))
    ret, out = ex.extract("out0")
    if ret != 0:
        raise RuntimeError(f"ncnn extract returned {ret}; pnnx: {' | '.join(notes)}")
    return {"status": "compiled", "message": " | ".join(notes)[:300], "output": np.array(out)[None],
            "layers": sorted(set(layers))}


if __name__ == "__main__":
    main("ncnn", compile_case, versions)
