"""Compilers in the loop: ``uprewrite check MODEL --compiler rknn:rk3588`` builds MODEL with a real
compiler, installed in its own venv (never this project's dependencies), reads where each layer
runs from the compiler's own report, and says which upsampling layers leave the NPU, whether the
compiler rejects the model, and whether its outputs match onnxruntime's.

Each compiler has a runner script (``runners/<name>_runner.py``: the compiler and numpy only) that the
venv's Python runs on the model and a file of inputs; it prints one ``RESULT {json}`` line
(``status``, ``message``, ``versions``, ``layers`` [{id, op, where, name}], ``outputs``).  The
Python comes from ``UPREWRITE_<NAME>_PYTHON``, else this Python when the compiler imports here,
else ``~/.cache/onnx-uprewrite/<name>/bin/python``, else the harness's ``/tmp/cc-<name>/bin/python``
(benchmarks/compilers).  Profiles (profile.py) predict from documents and measurements; this asks
the compiler itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .errors import UsageError
from .model_io import save_model, write_inline
from .profile import shuffle_nodes, upsampling_nodes

RUNNERS = Path(__file__).with_name("runners")
#: seconds a compiler may take on one model (onnx2tf + TensorFlow + Vela: about a minute)
TIMEOUT_S = 900


@dataclass(frozen=True)
class Compiler:
    name: str
    modules: tuple[str, ...]  # what its Python must import
    default_target: str
    targets: tuple[str, ...]  # the targets known here (first: the default)
    install: str
    #: a max abs error over this times max(1, max |onnxruntime output|) is a wrong result
    wrong_above: float
    numerics: str  # whose outputs are compared with onnxruntime's


def _install(name: str, packages: str) -> str:
    venv = f"~/.cache/onnx-uprewrite/{name}"
    return f"python3 -m venv {venv} && {venv}/bin/pip install {packages}"


COMPILERS = {c.name: c for c in (
    Compiler("rknn", ("rknn.api",), "rk3588",
             ("rk3588", "rk3576", "rk3566", "rk3568", "rk3562", "rv1106", "rv1103", "rv1106b", "rv1103b"),
             _install("rknn", "rknn-toolkit2 numpy onnx") + "  (Python 3.8-3.12; about 5.6 GB)", 2e-2,
             "the x86 simulator's outputs"),
    Compiler("vela", ("ethosu.vela", "onnx2tf", "tensorflow", "ai_edge_litert"), "ethos-u55-128",
             ("ethos-u55-128", "ethos-u55-256", "ethos-u55-64", "ethos-u55-32", "ethos-u65-256", "ethos-u65-512",
              "ethos-u85-256", "ethos-u85-512", "ethos-u85-128", "ethos-u85-1024", "ethos-u85-2048"),
             _install("vela", "onnx2tf tensorflow tf-keras ethos-u-vela onnx onnx-graphsurgeon sng4onnx psutil "
                              "numpy ai-edge-litert onnxruntime") + "  (about 2.6 GB)", 1e-3,
             "onnx2tf's float32 TFLite (no Ethos-U simulator here)"),
    Compiler("openvino", ("openvino",), "CPU", ("CPU", "GPU", "NPU"),
             _install("openvino", "openvino numpy"), 1e-3, "OpenVINO's outputs"),
)}


@dataclass
class Layer:
    id: str
    op: str  # the compiler's op type
    where: str  # NPU / CPU
    name: str  # the compiler's name for it
    node: str | None = None  # the ONNX node it comes from, where its name tells
    upsampling: bool = False  # from an upsampling node (or one of its form's Reshape/Transpose/Slice/Mul/Pad)


@dataclass
class CompilerCheck:
    """What one compiler did with one model."""

    model: str
    compiler: str
    target: str
    versions: dict
    status: str  # compiled / rejected / crashed
    message: str
    layers: list[Layer] = field(default_factory=list)
    max_abs_error: float | None = None  # against onnxruntime, on the same inputs
    error_limit: float | None = None
    shapes: dict = field(default_factory=dict)
    numerics: str = "the compiler's outputs"  # what was compared with onnxruntime

    @property
    def cpu_upsampling(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.upsampling and layer.where == "CPU"]

    @property
    def wrong(self) -> bool:
        return self.max_abs_error is not None and not self.max_abs_error <= self.error_limit

    @property
    def ok(self) -> bool:
        return self.status == "compiled" and not self.cpu_upsampling and not self.wrong

    def problems(self) -> list[str]:
        """One line per reason the check fails."""
        if self.status != "compiled":
            return [f"{self.compiler} {self.target} {self.status} the model: {self.message}"]
        found = [f"{layer.op} '{layer.name}' runs on the CPU" + (f" (ONNX node '{layer.node}')" if layer.node else "")
                 for layer in self.cpu_upsampling]
        if self.wrong:
            found.append(f"wrong values: {self.numerics} differ from onnxruntime's by up to "
                         f"{self.max_abs_error:.3g}, over {self.error_limit:.3g}")
        return found

    def to_dict(self) -> dict:
        return {"model": self.model, "compiler": self.compiler, "target": self.target, "versions": self.versions,
                "status": self.status, "message": self.message, "ok": self.ok, "shapes": self.shapes,
                "max_abs_error": self.max_abs_error, "error_limit": self.error_limit, "numerics": self.numerics,
                "problems": self.problems(), "layers": [vars(layer) for layer in self.layers]}


def parse_spec(spec: str) -> tuple[Compiler, str]:
    """``name[:target]`` -> (compiler, target); UsageError lists the choices."""
    name, _, target = spec.partition(":")
    compiler = COMPILERS.get(name.strip().lower())
    if compiler is None:
        raise UsageError(f"unknown compiler '{name}' (known: {', '.join(COMPILERS)}; e.g. rknn:rk3588)")
    target = target.strip() or compiler.default_target
    known = {t.lower(): t for t in compiler.targets}
    if target.lower() not in known:
        raise UsageError(f"unknown {compiler.name} target '{target}' (known: {', '.join(compiler.targets)})")
    return compiler, known[target.lower()]


def find_python(compiler: Compiler) -> str | None:
    """The Python that runs ``compiler`` (module docstring: where it is looked for), or None."""
    env = os.environ.get(f"UPREWRITE_{compiler.name.upper()}_PYTHON")
    for python in [env] if env else candidate_pythons(compiler):
        if python and Path(python).is_file() and _imports(python, compiler.modules):
            return python
    if env:
        raise UsageError(f"UPREWRITE_{compiler.name.upper()}_PYTHON={env}: that Python cannot import "
                         f"{', '.join(compiler.modules)}")
    return None


def candidate_pythons(compiler: Compiler) -> list[str]:
    """Where a Python with ``compiler`` is looked for when UPREWRITE_<NAME>_PYTHON is not set."""
    return [sys.executable, str(Path.home() / ".cache" / "onnx-uprewrite" / compiler.name / "bin" / "python"),
            f"/tmp/cc-{compiler.name}/bin/python"]


def _imports(python: str, modules: tuple[str, ...]) -> bool:
    probe = ("import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m.split('.')[0]) is None "
             f"for m in {list(modules)!r}))")
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def check_compiler(path: Path, model: onnx.ModelProto, label: str, compiler: Compiler, target: str,
                   feeds: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> CompilerCheck:
    """Build the model file ``path`` (``model`` parsed) with ``compiler`` for ``target`` on ``feeds``
    and compare its outputs with onnxruntime's ``reference``.  UsageError (with the install
    command) when the compiler is not installed."""
    python = find_python(compiler)
    if python is None:
        raise UsageError(f"{compiler.name} is not installed for uprewrite: {compiler.install}; or set "
                         f"UPREWRITE_{compiler.name.upper()}_PYTHON to a Python that has it")
    with tempfile.TemporaryDirectory(prefix="uprewrite-cc-") as work:
        save_feeds(Path(work) / "inputs.npz", feeds)
        copy = Path(work) / "model" / path.name  # onnx2tf simplifies its input in place: never give it MODEL
        copy.parent.mkdir()
        save_model(with_static_inputs(model, feeds), copy)
        result = _run_runner(python, compiler, str(copy), target, work)
        outputs = dict(np.load(result["outputs"])) if result.get("outputs") else None
        outputs = [outputs[f"arr_{i}"] for i in range(len(outputs))] if outputs else None
    check = CompilerCheck(model=label, compiler=compiler.name, target=target, versions=result.get("versions", {}),
                          status=result.get("status", "crashed"), message=result.get("message", ""),
                          shapes={k: list(v.shape) for k, v in feeds.items()}, numerics=compiler.numerics)
    check.layers = _attribute(model, [Layer(**layer) for layer in result.get("layers", [])])
    if outputs is not None:
        check.max_abs_error, check.error_limit = _compare(list(reference.values()), outputs, compiler.wrong_above)
    return check


def save_feeds(path: Path, feeds: dict[str, np.ndarray]) -> None:
    """``feeds`` as ``path`` (arrays ``arr_0``, ...) and ``path.json`` (their names, in order): input
    names are tensor names, not file or keyword names (runners read them with ``load_feeds``)."""
    np.savez(path, *feeds.values())
    Path(f"{path}.json").write_text(json.dumps(list(feeds)))


def with_static_inputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``model`` with the inputs' symbolic dims set to the sizes of ``feeds`` (the compilers fix
    them at build time, some to 1) and no declared intermediate or output shapes (each compiler
    infers them from the inputs)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in out.graph.input:
        if vi.name in feeds and vi.type.HasField("tensor_type"):
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for n in feeds[vi.name].shape:
                dims.add(dim_value=int(n))
    del out.graph.value_info[:]
    for vi in out.graph.output:
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")
    return out


def _run_runner(python: str, compiler: Compiler, model: str, target: str, work: str) -> dict:
    args = [python, str(RUNNERS / f"{compiler.name}_runner.py"), model, os.path.join(work, "inputs.npz"), target, work]
    try:
        code, out, err = run_group(args, work)
    except subprocess.TimeoutExpired:
        return {"status": "crashed", "message": f"timed out after {TIMEOUT_S} s"}
    except OSError as exc:
        return {"status": "crashed", "message": f"cannot run {python}: {exc}"}
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if not line:
        tail = [ln.strip() for ln in (err + out).splitlines() if ln.strip()][-2:]
        return {"status": "crashed", "message": f"exit {code}: {' | '.join(tail)[-300:]}"}
    return json.loads(line[-1][len("RESULT "):])


def run_group(args: list[str], cwd: str, timeout: float = TIMEOUT_S) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``args`` in a process group of its own: on timeout the whole
    group is killed (a runner's onnx2tf / vela children too) and TimeoutExpired raised; output that
    is not UTF-8 is decoded with replacements."""
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    except BaseException:  # an interrupt: the compiler goes too
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc.returncode, out, err


def _compare(reference: list[np.ndarray], outputs: list[np.ndarray], wrong_above: float) -> tuple[float, float]:
    """(max abs error over the outputs, its limit); an output of another shape but the same size is
    compared as flat (a compiler that gives a 1-D result as N, C, L, 1), one of another size is
    infinitely wrong."""
    worst, limit = 0.0, wrong_above
    if len(reference) != len(outputs):
        return float("inf"), limit
    for ref, got in zip(reference, outputs):
        ref, got = np.asarray(ref, np.float64).reshape(-1), np.asarray(got, np.float64).reshape(-1)
        finite = np.abs(ref[np.isfinite(ref)])
        limit = max(limit, wrong_above * max(1.0, float(finite.max()) if finite.size else 0.0))
        if ref.size != got.size:
            return float("inf"), limit
        same = (ref == got) | (np.isnan(ref) & np.isnan(got))  # equal infinities and NaNs where onnxruntime's are
        with np.errstate(invalid="ignore"):
            err = np.where(same, 0.0, np.abs(ref - got))
        err[np.isnan(err)] = np.inf  # a NaN where onnxruntime has a number
        worst = max(worst, float(err.max()) if err.size else 0.0)
    return worst, limit


#: compiler op types that are an upsampling layer whatever their name (vendors' spellings)
_UPSAMPLING_OP = re.compile(r"convtranspose|deconv|transpose_conv|depth_?to_?space|pixel_?shuffle|resize|upsampl",
                            re.IGNORECASE)
#: ops of an upsampling form that are not upsampling ops themselves: the crop, the phase mask, the
#: edge pad, the per-phase Concat
_FORM_GLUE = ("Slice", "Mul", "Pad", "Concat", "Add")


def upsampling_related(model: onnx.ModelProto, upsampling=None, shuffles=None) -> set[str]:
    """Names and output tensors of the nodes of ``model`` that are upsampling layers or part of one's
    form (profile.upsampling_nodes, shuffle_nodes, and the glue ops next to them; ``upsampling`` /
    ``shuffles``: those lists, where the caller has them)."""
    upsampling = upsampling_nodes(model) if upsampling is None else upsampling
    shuffles = shuffle_nodes(model) if shuffles is None else shuffles
    core = {id(n): n for n in upsampling + shuffles}
    outputs = {o for n in core.values() for o in n.output}
    inputs = {i for n in core.values() for i in n.input}
    glue = [n for n in model.graph.node if n.op_type in _FORM_GLUE and id(n) not in core
            and (set(n.input) & outputs or set(n.output) & inputs)]
    glue_out = {o for n in glue for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.input and n.input[0] in glue_out]  # after a mask
    return {name for n in [*core.values(), *glue, *convs] for name in (n.name, *n.output) if name}


def _attribute(model: onnx.ModelProto, layers: list[Layer]) -> list[Layer]:
    """Each layer with the ONNX node its name points to (the name after the compiler's ``Op:`` prefix,
    without a ``#n`` or ``_pad``-like suffix, as a node or output name) and whether it is upsampling."""
    by_name = {n.name: n for n in model.graph.node if n.name}
    by_output = {o: n for n in model.graph.node for o in n.output if o}
    core, chains = upsampling_nodes(model), shuffle_nodes(model)
    related = upsampling_related(model, core, chains)
    for layer in layers:
        base = re.sub(r"#\d+$", "", layer.name.split(":", 1)[-1])
        upsampling_op = bool(_UPSAMPLING_OP.search(layer.op))
        for name in (base, re.sub(r"_[a-z0-9]+$", "", base)):
            node = by_name.get(name) or by_output.get(name)
            if node is None:
                continue
            reader = next((n for n in core if name in n.input), None) if name in by_output else None
            if upsampling_op and reader is not None and node not in core:
                node = reader  # a compiler's own pad/reshape for the upsampling node reading this tensor
            layer.node = node.name or node.output[0]
            layer.upsampling = name in related or layer.node in related
            break
        if upsampling_op:
            layer.upsampling = True
        elif layer.node is None and chains and layer.op.upper() in ("RESHAPE", "TRANSPOSE"):
            layer.upsampling = True  # a sub-pixel form's Reshape/Transpose, by its type alone
    return layers


RUNTIMES = ("onnxruntime", "openvino")


class OpenVinoTimer:
    """Times the forms of a site in OpenVINO (``convert --to fastest --runtime openvino``), whose
    ranking of the forms differs from onnxruntime's: each candidate compiled for one thread, f32, the
    candidates run interleaved, in the openvino venv (runners/openvino_runner.py --time)."""

    name = "openvino"

    def __init__(self, python: str):
        self.python = python

    def time(self, models: dict[str, onnx.ModelProto], feeds: dict[str, dict], runs: int,
             seconds: float) -> tuple[dict[str, float], dict[str, str]]:
        """(median seconds per form, why each form OpenVINO cannot run was not timed); RuntimeError
        with OpenVINO's last line where the runner fails as a whole."""
        with tempfile.TemporaryDirectory(prefix="uprewrite-ov-") as work:
            manifest = {"runs": runs, "seconds": seconds, "device": "CPU", "models": {}}
            for i, (form, model) in enumerate(models.items()):
                path, inputs = Path(work) / f"{i}.onnx", Path(work) / f"{i}.npz"
                write_inline(model, path)  # weights still in the input's file are copied in
                save_feeds(inputs, feeds[form])
                manifest["models"][form] = [str(path), str(inputs)]
            (Path(work) / "manifest.json").write_text(json.dumps(manifest))
            try:
                _, out, err = run_group([self.python, str(RUNNERS / "openvino_runner.py"), "--time",
                                         str(Path(work) / "manifest.json")], work)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"OpenVINO timing took over {TIMEOUT_S} s") from None
            except OSError as exc:
                raise RuntimeError(f"cannot run {self.python}: {exc}") from None
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        try:
            result = json.loads(line[-1][len("RESULT "):])
            return dict(result["medians"]), dict(result.get("failed", {}))
        except (IndexError, ValueError, KeyError, TypeError):
            tail = [ln.strip() for ln in (err + out).splitlines() if ln.strip()][-1:]
            raise RuntimeError(f"OpenVINO cannot run the forms: {' '.join(tail)[-300:]}") from None


def runtime_timer(runtime: str):
    """None for onnxruntime (fastest.py times in-process), else the timer of ``runtime``; UsageError
    for an unknown runtime, or one that is not installed (with its install command)."""
    if runtime not in RUNTIMES:
        raise UsageError(f"--runtime {runtime}: expected one of {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime":
        return None
    compiler = COMPILERS[runtime]
    python = find_python(compiler)
    if python is None:
        raise UsageError(f"--runtime {runtime}: {compiler.name} is not installed for uprewrite: {compiler.install}; "
                         f"or set UPREWRITE_{compiler.name.upper()}_PYTHON to a Python that has it")
    return OpenVinoTimer(python)
