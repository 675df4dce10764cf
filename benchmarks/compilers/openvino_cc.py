"""OpenVINO (CPU plugin): read the ONNX case, compile it, run it, compare with onnxruntime.

Install (its own venv, never the project's):
    python3.11 -m venv /tmp/cc-openvino && /tmp/cc-openvino/bin/pip install openvino numpy onnx
Run:
    /tmp/cc-openvino/bin/python benchmarks/compilers/openvino_cc.py
OpenVINO has no NPU placement report here (CPU plugin): a case is compiled, rejected or wrong.
"""

from harness import main


def versions():
    import openvino

    return {"openvino": openvino.__version__}


def compile_case(path, x, work):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    out = compiled([x])[compiled.output(0)]
    return {"status": "compiled", "message": "", "output": out}


if __name__ == "__main__":
    main("openvino", compile_case, versions)
