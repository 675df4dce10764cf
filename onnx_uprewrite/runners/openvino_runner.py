"""Run by ``uprewrite check --compiler openvino[:device]`` with the Python of a venv that has
openvino: compile the model for one device (CPU by default), run it, print one JSON line.  OpenVINO
reports no per-op placement here: a model is compiled (and its outputs compared) or rejected.

    python openvino_runner.py MODEL INPUTS.npz DEVICE WORKDIR
"""

import json
import os
import sys

import numpy as np


def main(model, inputs, device, work):
    import openvino as ov

    feeds = dict(np.load(inputs))
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


if __name__ == "__main__":
    main(*sys.argv[1:5])
