"""Tool speed at scale (issue 7): `uprewrite convert` on a model with many upsampling sites and
hundreds of MB of external-data weights, against plain onnx load+save and one onnxruntime run.

    python benchmarks/bench_scale.py [--sites 240 --mb 490] [--repeat 3] [--growth 30,60,120,240]
    python benchmarks/bench_scale.py --profile      # also cProfile api.convert(verify=False) in-process

The model (built here with numpy + onnx.helper, in a temporary folder under /tmp, removed at the
end) is a chain of N blocks, each ConvTranspose k4 s2 p1 C->C (the upsampling site) then Conv
k4 s2 p1 C->C bringing the resolution back down, input 1xCx8x8, all weights float32 in one
external data file.  C is chosen so that the weights hold about --mb MB.

Issue 7 targets:
  * `convert --no-verify` wall time within 1.5x of onnx.load + onnx.save_model (external data);
  * peak RSS of `convert` (whole process tree) within 1.0x of the model bytes (.onnx + data file);
  * `convert` with verification within 3x of one onnxruntime session creation + one run of the
    original model.

Each figure is the best of --repeat runs, each run in a fresh process.  `convert` runs as
`python -m onnx_uprewrite convert ...` (wall time includes interpreter start and imports); its peak
RSS is the largest ru_maxrss (RUSAGE_CHILDREN) of a fresh wrapper process per run, i.e. the
largest single process of the tree (the CLI forks a worker; onnx shape inference runs in a server
process); "tree" is the largest sum of VmRSS over the tree, sampled every 20 ms.  Load+save and
the onnxruntime reference time themselves inside a fresh process (imports excluded).  The growth
table keeps the per-site weight size fixed (--mb/--sites per site) and varies the site count.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

TARGET_SAVE_RATIO, TARGET_RSS_RATIO, TARGET_VERIFY_RATIO = 1.5, 1.0, 3.0
HW = 8  # input resolution; ConvTranspose doubles it, the Conv halves it again

# Runs argv (JSON in argv[1]) and prints wall time, ru_maxrss of its waited-for descendants and the
# largest sampled VmRSS sum of the process tree, as JSON on the last line of stdout.
WRAPPER = r"""
import json, os, resource, subprocess, sys, threading, time
cmd = json.loads(sys.argv[1])
peak = [0]
def tree(pid):
    out = [pid]
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                for c in fh.read().split():
                    out += tree(int(c))
    except OSError:
        pass
    return out
def rss(pid):
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
def sample(p):
    while p.poll() is None:
        peak[0] = max(peak[0], sum(rss(q) for q in tree(p.pid)))
        time.sleep(0.02)
t = time.perf_counter()
p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
th = threading.Thread(target=sample, args=(p,), daemon=True)
th.start()
out, err = p.communicate()
wall = time.perf_counter() - t
th.join()
ru = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
sys.stderr.write(err.decode(errors="replace")[-3000:])
print(json.dumps({"rc": p.returncode, "wall": wall, "maxrss": ru, "tree": peak[0]}))
"""

# onnx.load + onnx.save_model (external data), timed inside the process; argv: model, output.
LOAD_SAVE = r"""
import json, resource, sys, time
from pathlib import Path
import onnx
src, dst = sys.argv[1], Path(sys.argv[2])
t = time.perf_counter()
m = onnx.load(src)
onnx.save_model(m, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                location=dst.name + ".data", size_threshold=1024)
wall = time.perf_counter() - t
print(json.dumps({"wall": wall, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

# one onnxruntime session creation + one run (default options, CPU), timed inside the process.
ORT_RUN = r"""
import json, resource, sys, time
import numpy as np, onnxruntime as ort
path, c, hw = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
x = np.random.default_rng(0).standard_normal((1, c, hw, hw)).astype(np.float32)
t = time.perf_counter()
s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
t1 = time.perf_counter()
s.run(None, {"x": x})
t2 = time.perf_counter()
print(json.dumps({"wall": t2 - t, "session": t1 - t, "run": t2 - t1,
                  "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def channels_for(sites: int, mb: float) -> int:
    """C such that ``sites`` blocks of ConvTranspose + Conv (both C x C x 4 x 4, with bias) hold ~mb MB."""
    per_site = mb * 1e6 / sites
    return max(1, round(math.sqrt(per_site / (2 * 16 * 4))))


def build(folder: Path, sites: int, c: int, seed: int = 0) -> Path:
    """Chain of ``sites`` x (ConvTranspose k4s2p1 C->C, Conv k4s2p1 C->C), saved with one data file."""
    rng = np.random.default_rng(seed)
    # variance-preserving scales: a k4 s2 p1 ConvTranspose output sums 2x2 taps per input channel,
    # the k4 s2 p1 Conv 4x4, so activations neither vanish nor overflow along the chain
    up_std, down_std = 1 / math.sqrt(4 * c), 1 / math.sqrt(16 * c)
    nodes, inits, prev = [], [], "x"
    for i in range(sites):
        w = rng.standard_normal((c, c, 4, 4), dtype=np.float32) * np.float32(up_std)
        inits += [numpy_helper.from_array(w, f"up{i}.W"),
                  numpy_helper.from_array(rng.standard_normal(c, dtype=np.float32) * np.float32(0.1), f"up{i}.B")]
        nodes.append(helper.make_node("ConvTranspose", [prev, f"up{i}.W", f"up{i}.B"], [f"u{i}"], name=f"up{i}",
                                      kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1]))
        w = rng.standard_normal((c, c, 4, 4), dtype=np.float32) * np.float32(down_std)
        inits += [numpy_helper.from_array(w, f"down{i}.W"),
                  numpy_helper.from_array(rng.standard_normal(c, dtype=np.float32) * np.float32(0.1), f"down{i}.B")]
        nodes.append(helper.make_node("Conv", [f"u{i}", f"down{i}.W", f"down{i}.B"], [f"d{i}"], name=f"down{i}",
                                      kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1]))
        prev = f"d{i}"
    graph = helper.make_graph(nodes, "scale", [helper.make_tensor_value_info("x", 1, [1, c, HW, HW])],
                              [helper.make_tensor_value_info(prev, 1, [1, c, HW, HW])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return path


def _data_files(path: Path) -> list[Path]:
    """``<name>.data`` (onnx's own naming) and ``<name>.<hash>.data`` (uprewrite's per-write names)."""
    return [p for p in path.parent.glob(path.name + ".*data") if p.is_file()]


def model_bytes(path: Path) -> int:
    return path.stat().st_size + sum(p.stat().st_size for p in _data_files(path))


def remove_output(out: Path) -> None:
    for p in [out, *_data_files(out)]:
        p.unlink(missing_ok=True)


def run_json(argv: list[str]) -> dict:
    proc = subprocess.run(argv, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}... exit {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_save(path: Path, repeat: int) -> dict:
    best = None
    for i in range(repeat):
        out = path.with_name(f"baseline{i}.onnx")
        r = run_json([sys.executable, "-c", LOAD_SAVE, str(path), str(out)])
        remove_output(out)
        best = r if best is None or r["wall"] < best["wall"] else best
    return best


def uprewrite(path: Path, repeat: int, verify: bool) -> dict:
    """Best-of-``repeat`` wall time of the CLI, the largest peak RSS seen and the best run's report timings."""
    best, maxrss, tree = None, 0, 0
    for i in range(repeat):
        out = path.with_name(f"out{i}.onnx")
        report = path.with_name(f"report{i}.json")
        cmd = [sys.executable, "-m", "onnx_uprewrite", "convert", str(path), "-o", str(out), "--to", "subpixel",
               "--report", str(report), "-q"] + ([] if verify else ["--no-verify"])
        r = run_json([sys.executable, "-c", WRAPPER, json.dumps(cmd)])
        if r["rc"] != 0:
            raise RuntimeError(f"convert exit {r['rc']}")
        r["out_bytes"] = model_bytes(out) if out.exists() else 0
        r["timings"] = json.loads(report.read_text()).get("timings", {})
        remove_output(out)
        report.unlink(missing_ok=True)
        maxrss, tree = max(maxrss, r["maxrss"]), max(tree, r["tree"])
        best = r if best is None or r["wall"] < best["wall"] else best
    return dict(best, maxrss=maxrss, tree=tree)


def ort_reference(path: Path, c: int, repeat: int) -> dict:
    best = None
    for _ in range(repeat):
        r = run_json([sys.executable, "-c", ORT_RUN, str(path), str(c), str(HW)])
        best = r if best is None or r["wall"] < best["wall"] else best
    return best


def fmt_timings(t: dict) -> str:
    return ", ".join(f"{k[:-2]} {v:.2f}" for k, v in t.items())


def profile(path: Path, top: int) -> None:
    """cProfile of api.convert(path, output, to="subpixel", verify=False) in this process."""
    from onnx_uprewrite import api

    out = path.with_name("profiled.onnx")
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    api.convert(str(path), output=str(out), to="subpixel", verify=False)
    prof.disable()
    print(f"\ncProfile: api.convert(verify=False) in-process, {time.perf_counter() - t:.2f} s under the profiler; "
          f"top {top} by cumulative time")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(top)
    remove_output(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=240, help="upsampling sites in the main model")
    parser.add_argument("--mb", type=float, default=490, help="MB of float32 weights in the main model")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (best is kept)")
    parser.add_argument("--growth", default="30,60,120,240",
                        help="site counts of the growth table (same per-site size); empty to skip")
    parser.add_argument("--growth-repeat", type=int, default=None, help="runs per growth figure [--repeat]")
    parser.add_argument("--profile", action="store_true", help="also cProfile convert(verify=False) in-process")
    parser.add_argument("--top", type=int, default=25, help="functions listed by --profile")
    args = parser.parse_args()
    growth_repeat = args.growth_repeat or args.repeat
    c = channels_for(args.sites, args.mb)

    import onnxruntime as ort

    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs; best of {args.repeat}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_", dir="/tmp"))
    try:
        t = time.perf_counter()
        path = build(tmp, args.sites, c)
        size = model_bytes(path)
        print(f"model: {args.sites} blocks ConvTranspose k4s2p1 + Conv k4s2p1, C={c}, input 1x{c}x{HW}x{HW}, "
              f"{size / 1e6:.1f} MB (.onnx {path.stat().st_size / 1e3:.1f} kB + data), "
              f"built in {time.perf_counter() - t:.1f} s\n")

        base = load_save(path, args.repeat)
        conv = uprewrite(path, args.repeat, verify=False)
        ver = uprewrite(path, args.repeat, verify=True)
        ref = ort_reference(path, c, args.repeat)

        rows = [
            ("onnx.load + save_model (external)", base["wall"],
             f"peak RSS {base['maxrss'] / 1e6:.0f} MB = {base['maxrss'] / size:.2f}x model"),
            ("convert --no-verify", conv["wall"],
             f"{conv['wall'] / base['wall']:.2f}x load+save (target <= {TARGET_SAVE_RATIO})"),
            ("  peak RSS (largest process)", None,
             f"{conv['maxrss'] / 1e6:.0f} MB = {conv['maxrss'] / size:.2f}x model (target <= {TARGET_RSS_RATIO})"),
            ("  peak RSS (tree sum, sampled)", None, f"{conv['tree'] / 1e6:.0f} MB = {conv['tree'] / size:.2f}x model"),
            ("ort session + 1 run (original)", ref["wall"],
             f"session {ref['session']:.2f} + run {ref['run']:.2f}; peak RSS {ref['maxrss'] / 1e6:.0f} MB"),
            ("convert (verified)", ver["wall"],
             f"{ver['wall'] / ref['wall']:.2f}x ort session+run (target <= {TARGET_VERIFY_RATIO})"),
            ("  peak RSS (largest process)", None,
             f"{ver['maxrss'] / 1e6:.0f} MB = {ver['maxrss'] / size:.2f}x model"),
            ("  peak RSS (tree sum, sampled)", None, f"{ver['tree'] / 1e6:.0f} MB = {ver['tree'] / size:.2f}x model"),
        ]
        print(f"{'measure':36s} {'seconds':>8s}  notes")
        for name, secs, note in rows:
            print(f"{name:36s} {'' if secs is None else f'{secs:8.2f}':>8s}  {note}")
        print(f"\noutput model: {conv['out_bytes'] / 1e6:.1f} MB")
        print(f"report timings, convert --no-verify (s): {fmt_timings(conv['timings'])}")
        print(f"report timings, convert verified   (s): {fmt_timings(ver['timings'])}")

        if args.profile:
            profile(path, args.top)

        counts = [int(s) for s in args.growth.split(",") if s.strip()]
        if counts:
            per_site = args.mb / args.sites
            print(f"\ngrowth: C={c} fixed ({per_site:.2f} MB per site), best of {growth_repeat}")
            print(f"{'sites':>6s} {'MB':>7s} {'load+save s':>12s} {'convert --no-verify s':>22s} {'ratio':>6s} "
                  f"{'s/site':>7s} {'peak RSS/model':>15s}")
            for n in counts:
                if n == args.sites:
                    b, r, sz = base, conv, size
                    if growth_repeat != args.repeat:
                        b, r = load_save(path, growth_repeat), uprewrite(path, growth_repeat, verify=False)
                else:
                    sub = tmp / f"g{n}"
                    sub.mkdir()
                    p = build(sub, n, c)
                    sz = model_bytes(p)
                    b, r = load_save(p, growth_repeat), uprewrite(p, growth_repeat, verify=False)
                    shutil.rmtree(sub)
                print(f"{n:6d} {sz / 1e6:7.1f} {b['wall']:12.2f} {r['wall']:22.2f} {r['wall'] / b['wall']:6.2f} "
                      f"{r['wall'] / n:7.3f} {r['maxrss'] / sz:15.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
