"""Run by ``uprewrite check --compiler openvino[:device]`` with the Python of a venv that has
openvino: compile the model for one device (CPU by default), run it, print one JSON line.  OpenVINO
reports no per-op placement here: a model is compiled (and its outputs compared) or rejected.

    python openvino_runner.py MODEL INPUTS.npz DEVICE WORKDIR
    python openvino_runner.py --time MANIFEST.json     # uprewrite convert --to fastest --runtime openvino

``--time``: the manifest names candidate models and their inputs ({"models": {form: [model, inputs]},
"runs", "seconds", "device"}); each is compiled for one thread, f32, latency, and the candidates run
interleaved; prints the median seconds per candidate.
"""

import json
import os
import statistics
import sys
import time

import numpy as np
from runner_io import load_feeds


def main(model, inputs, device, work):
    import openvino as ov

    feeds = load_feeds(inputs)
    result = {"versions": {"openvino": ov.__version__}, "layers": []}
    try:
        core = ov.Core()
        compiled = core.compile_model(core.read_model(model), device.upper(), {"INFERENCE_PRECISION_HINT": "f32"})
        got = compiled(feeds)
        outputs = [got[o] for o in compiled.outputs]
    except Exception as exc:  # noqa: BLE001 - the compiler's refusal, in its own words
        result.update(status="rejected", message=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:400]}")
    else:
        np.savez(os.path.join(work, "outputs.npz"), *[np.asarray(o) for o in outputs])
        result.update(status="compiled", message=f"{device.upper()}, f32", outputs=os.path.join(work, "outputs.npz"))
    print("RESULT " + json.dumps(result), flush=True)


def time_forms(manifest_path):
    import openvino as ov

    manifest = json.load(open(manifest_path))
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    runs, feeds, requests, failed = {}, {}, {}, {}
    for form, (model, inputs) in manifest["models"].items():
        try:
            compiled = core.compile_model(core.read_model(model), manifest.get("device", "CPU"), config)
            requests[form] = compiled.create_infer_request()
            feeds[form] = load_feeds(inputs)
            requests[form].infer(feeds[form])  # warm-up
        except Exception as exc:  # noqa: BLE001 - a form OpenVINO cannot run is not timed
            requests.pop(form, None)
            failed[form] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}"
            continue
        runs[form] = []
    start = time.perf_counter()
    for i in range(manifest["runs"]):
        for form, request in requests.items():
            t = time.perf_counter()
            request.infer(feeds[form])
            runs[form].append(time.perf_counter() - t)
        if i >= 2 and time.perf_counter() - start > manifest["seconds"]:
            break
    medians = {form: statistics.median(v) for form, v in runs.items()}
    print("RESULT " + json.dumps({"medians": medians, "failed": failed, "versions": {"openvino": ov.__version__}}),
          flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--time":
        time_forms(sys.argv[2])
    else:
        main(*sys.argv[1:5])
