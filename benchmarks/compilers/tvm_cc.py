"""Apache TVM (Relax): relax.frontend.onnx.from_onnx -> tvm.compile(target="llvm") -> Relax VM on the
CPU, compare with onnxruntime.

Install (its own venv, never the project's):
    python3.11 -m venv /tmp/cc-tvm && /tmp/cc-tvm/bin/pip install apache-tvm numpy onnx
Run:
    /tmp/cc-tvm/bin/python benchmarks/compilers/tvm_cc.py
No placement report (CPU target): a case is compiled, rejected (import or build error) or wrong.
"""

from harness import main


def versions():
    import tvm

    return {"apache-tvm": tvm.__version__}


def compile_case(path, x, work):
    import onnx
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(onnx.load(str(path)), shape_dict={"x": list(x.shape)}, keep_params_in_input=False)
    mod = relax.get_pipeline("zero")(mod)
    built = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(built, tvm.cpu())
    array = getattr(tvm.runtime, "tensor", None) or tvm.nd.array
    out = vm["main"](array(x))
    return {"status": "compiled", "message": "", "output": out.numpy()}


if __name__ == "__main__":
    main("tvm", compile_case, versions)
