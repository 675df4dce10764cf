"""IREE: iree-import-onnx -> iree-compile (llvm-cpu) -> run with iree.runtime, compare with onnxruntime.

Install (its own venv, never the project's):
    python3.11 -m venv /tmp/cc-iree && /tmp/cc-iree/bin/pip install iree-base-compiler iree-base-runtime numpy onnx
Run:
    /tmp/cc-iree/bin/python benchmarks/compilers/iree_cc.py
No placement report (CPU target): a case is compiled, rejected (import or compile error) or wrong.
"""

import subprocess
import sys
from pathlib import Path

from harness import main

BIN = Path(sys.executable).parent


def versions():
    from importlib.metadata import version

    return {"iree-base-compiler": version("iree-base-compiler"), "iree-base-runtime": version("iree-base-runtime")}


def _run(step, *args):
    proc = subprocess.run([str(BIN / step), *map(str, args)], capture_output=True, text=True, timeout=250)
    if proc.returncode:  # the first "error:" line is the compiler's reason; the rest is IR
        text = proc.stderr or proc.stdout
        errors = [ln.strip() for ln in text.splitlines() if "error:" in ln]
        raise RuntimeError(f"{step} exit {proc.returncode}: {(errors[0] if errors else text[-400:])[:400]}")


def compile_case(path, x, work):
    _run("iree-import-onnx", path, "-o", work / "m.mlir")
    _run("iree-compile", "--iree-hal-target-backends=llvm-cpu", "--iree-llvmcpu-target-cpu=host",
         work / "m.mlir", "-o", work / "m.vmfb")
    import iree.runtime as rt

    module = rt.load_vm_flatbuffer_file(str(work / "m.vmfb"), driver="local-sync")
    fn = module[[n for n in module.vm_module.function_names if not n.startswith("__") and "$async" not in n][0]]
    return {"status": "compiled", "message": "", "output": fn(x).to_host()}


if __name__ == "__main__":
    main("iree", compile_case, versions)
