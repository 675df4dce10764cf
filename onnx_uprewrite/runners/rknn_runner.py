"""Run by ``uprewrite check --compiler rknn[:chip]`` with the Python of a venv that has
rknn-toolkit2 (not the project's): build the model for one chip and print, as one JSON line, each
layer of the build's "Network Layer Information Table" (op, NPU or CPU, full name) and the x86
simulator's outputs.  Needs only the toolkit and numpy.

    python rknn_runner.py MODEL INPUTS.npz CHIP WORKDIR
"""

import json
import os
import sys

import numpy as np
from runner_io import load_feeds

#: chips whose NPU runs int8 only: the build quantizes, calibrated on the given inputs
INT8_ONLY = ("rv1103", "rv1106", "rv1103b", "rv1106b")


def layers(log: str) -> list:
    """Each layer of the build log's "Network Layer Information Table" as {"id", "op", "where",
    "name"} (input/output operators left out)."""
    layers, table = [], False
    for line in log.splitlines():
        text = line.split("RKNN: ", 1)[-1]
        text = text.split("] ", 1)[-1] if text.startswith("[") else text
        if "Network Layer Information Table" in text:
            table = True
            continue
        parts = text.split()
        if table and len(parts) >= 5 and parts[0].isdigit() and parts[3] in ("NPU", "CPU"):
            if not parts[1].endswith(("InputOperator", "OutputOperator")):
                layers.append({"id": parts[0], "op": parts[1], "where": parts[3], "name": parts[-1]})
        elif table and layers and text.startswith("<<<"):  # the end of the pass that prints the table
            break
    return layers


def main(model, inputs, chip, work):
    feeds = load_feeds(inputs)
    os.chdir(work)  # the toolkit writes check*.onnx debug models into the current directory
    quantize = chip in INT8_ONLY
    if quantize:
        files = []
        for i, value in enumerate(feeds.values()):  # file names of our own: input names are tensor names
            np.save(f"input{i}.npy", value)
            files.append(f"input{i}.npy")
        with open("dataset.txt", "w") as fh:
            fh.write(" ".join(files) + "\n")
    saved = os.dup(1), os.dup(2)
    with open("build.log", "w") as log:  # the toolkit logs through fds 1/2
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            from rknn.api import RKNN

            rknn = RKNN(verbose=True)
            rknn.config(target_platform=chip)
            failed = None
            if rknn.load_onnx(model=model, inputs=list(feeds), input_size_list=[list(v.shape) for v in feeds.values()]):
                failed = "load_onnx"
            elif rknn.build(do_quantization=quantize, dataset="dataset.txt" if quantize else None):
                failed = "build"
            outputs = None
            if failed is None and not quantize and rknn.init_runtime() == 0:
                outputs = rknn.inference(inputs=list(feeds.values()), data_format="nchw")
        finally:
            sys.stdout.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
    log = open("build.log", errors="replace").read()
    from importlib.metadata import version

    result = {"versions": {"rknn-toolkit2": version("rknn-toolkit2")}, "layers": layers(log)}
    if failed:
        errors = [ln.split("RKNN: ", 1)[-1] for ln in log.splitlines() if "E RKNN" in ln or "Error" in ln]
        result.update(status="rejected", message=f"{failed} failed: {' | '.join(errors[-3:])[-400:]}")
    else:
        result.update(status="compiled", message="int8 (quantized on the given inputs)" if quantize else "fp16")
        if outputs is not None:
            np.savez(os.path.join(work, "outputs.npz"), *[np.asarray(o) for o in outputs])
            result["outputs"] = os.path.join(work, "outputs.npz")
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
