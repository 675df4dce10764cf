"""What every compiler script shares: run each case of the matrix in its own process (a compiler
that segfaults or hangs costs one case), compare with onnxruntime's output, write JSON.

A script defines ``compile_case(onnx_path, x, workdir) -> dict`` and ``versions() -> dict`` and
calls ``main(name, compile_case, versions)``.  ``compile_case`` returns
``{"status": "compiled" | "rejected", "message": str, "output": ndarray | None, "placement": {...}}``
(``placement``: op or layer name -> "NPU" / "CPU", where the compiler reports it) or raises: an
exception is a rejection carrying the compiler's own message.  Runs with only numpy (and the
compiler) installed: no onnxruntime, no onnx-uprewrite.

    python benchmarks/compilers/<compiler>_cc.py [--matrix /tmp/cc-matrix] [--only SUBSTR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
#: the runner scripts of ``uprewrite check --compiler`` (the compiler and numpy only): the compiler
#: scripts read the compilers' reports with the same code
sys.path.insert(0, str(HERE.resolve().parent.parent / "onnx_uprewrite" / "runners"))
#: float32 compilers: a max abs error over WRONG_ABOVE * max(1, max |output|) is a wrong result
#: (onnxruntime vs itself in another form: ~5e-6; a mis-laid channel: ~0.1-1)
WRONG_ABOVE = 1e-3
TIMEOUT_S = 300


def _tail(text: str, n: int = 400) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-4:])[-n:]


def _one(compile_case, case: str, matrix: Path, wrong_above: float) -> dict:
    stem = case.replace("/", "-")
    data = np.load(matrix / f"{stem}.npz")
    with tempfile.TemporaryDirectory(prefix="cc-") as work:
        t0 = time.perf_counter()
        try:
            got = compile_case(matrix / f"{stem}.onnx", data["x"], Path(work))
        except Exception as exc:  # noqa: BLE001 - the compiler's refusal, in its own words
            return {"status": "rejected", "message": _tail(f"{type(exc).__name__}: {exc}"),
                    "seconds": round(time.perf_counter() - t0, 2), "trace": _tail(traceback.format_exc(), 600)}
    out = got.pop("output", None)
    got["seconds"] = round(time.perf_counter() - t0, 2)
    if out is not None:
        out = np.asarray(out, np.float32)
        ref = data["y"]
        if out.shape != ref.shape and out.size == ref.size:  # e.g. a 1-D result given as (N, C, L, 1)
            note = f"output shape {list(out.shape)} read as {list(ref.shape)}"
            got["message"] = f"{got.get('message', '')} {note}".strip()
            out = out.reshape(ref.shape)
        if out.shape != ref.shape:
            got.update(status="wrong", max_abs_err=None,
                       message=f"output shape {list(out.shape)}, expected {list(ref.shape)}")
        else:
            err = float(np.max(np.abs(out - ref)))
            got["max_abs_err"] = err
            if not err <= wrong_above * max(1.0, float(np.abs(ref).max())):
                got["status"] = "wrong"
                top = float(np.abs(ref).max())
                got["message"] = f"max abs error {err:.3g} vs onnxruntime (outputs up to {top:.3g})"
    return got


def main(name: str, compile_case, versions, wrong_above: float = WRONG_ABOVE) -> None:
    """``wrong_above``: the relative error that makes a result wrong (fp16 compilers need more)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--matrix", default="/tmp/cc-matrix", type=Path)
    ap.add_argument("--only", default="")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=HERE / "results" / f"{name}.json", type=Path)
    args = ap.parse_args()
    args.matrix = args.matrix.resolve()  # a script may chdir into a case's work directory
    if args.one:  # the child: one case, one JSON line
        print("RESULT " + json.dumps(_one(compile_case, args.one, args.matrix, wrong_above)), flush=True)
        return
    cases = [c["id"] for c in json.loads((args.matrix / "cases.json").read_text()) if args.only in c["id"]]
    results, t0 = {}, time.perf_counter()
    for case in cases:
        try:
            proc = subprocess.run([sys.executable, __import__("__main__").__file__, "--one", case,
                                   "--matrix", str(args.matrix)], capture_output=True, text=True,
                                  timeout=TIMEOUT_S, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if line:
                result = json.loads(line[-1][7:])
            else:
                result = {"status": "crashed", "message": f"exit {proc.returncode}: "
                          + _tail(proc.stderr + proc.stdout)}
            result["log_tail"] = _tail(proc.stdout + proc.stderr, 300) if result["status"] != "compiled" else ""
        except subprocess.TimeoutExpired:
            result = {"status": "crashed", "message": f"timed out after {TIMEOUT_S} s"}
        results[case] = result
        print(f"{case:38s} {result['status']:9s} {result.get('max_abs_err', '')!s:10.10s} "
              f"{result.get('message', '')[:110]}", flush=True)
    doc = {"compiler": name, "versions": versions(), "date": datetime.date.today().isoformat(),
           "python": sys.version.split()[0], "seconds": round(time.perf_counter() - t0, 1),
           "wrong_above": wrong_above, "results": results}
    if args.only:  # a partial run updates the cases it ran
        old = json.loads(args.out.read_text()) if args.out.is_file() else {"results": {}}
        doc["results"] = {**old["results"], **results}
        doc["seconds"] = old.get("seconds", doc["seconds"])  # the full run's time
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{len(results)} cases, {doc['seconds']} s -> {args.out}")
