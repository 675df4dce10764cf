"""Real architectures at full size (random weights): conversion cost, exactness and latency (issue 20).

Needs an optional environment with the models' own libraries (never in CI; nothing is downloaded at
run time: every model is built from code or a config with random weights):

    python3 -m venv /tmp/realenv
    /tmp/realenv/bin/pip install torch==2.13.0 torchvision diffusers segmentation-models-pytorch \\
        ultralytics spandrel onnx onnxruntime onnxscript
    /tmp/realenv/bin/pip install -e .
    /tmp/realenv/bin/python benchmarks/bench_real.py [--only NAME ...] [--to FORM ...] [--no-latency]
        [--seconds 40] [--min-runs 7] [--out /tmp/uprewrite_real]

PyPI's torchvision wheels are built against the CUDA torch; beside the CPU torch the export child
defines the two op schemas torchvision's import needs (_torchvision_importable).

Models (NAME, input):
  sd-vae-dec   diffusers AutoencoderKL decoder (128/256/512/512 channels), latent 1x4x32x32 -> 1x3x256x256
  unet-r34     segmentation_models_pytorch Unet(resnet34), 1x3x256x256
  unetpp-r34   segmentation_models_pytorch UnetPlusPlus(resnet34), 1x3x256x256
  linknet-r34  segmentation_models_pytorch Linknet(resnet34), 1x3x256x256
  yolov8n-seg  ultralytics SegmentationModel("yolov8n-seg.yaml"), 1x3x320x320
  esrgan-x4    spandrel RRDBNet (64 filters, 23 blocks, x4), 1x3x64x64 -> 1x3x256x256
  lraspp-mnv3  torchvision lraspp_mobilenet_v3_large, 1x3x256x256 (bilinear F.interpolate(size=...))
  fcn-r50      torchvision fcn_resnet50, 1x3x256x256

Each model is exported (in a child process, so torch stays out of the timed one) with the
TorchScript exporter at opset 17, static shapes, and again with a dynamic batch dim; exports are
cached in --out.  Then, one model at a time:

- ``uprewrite convert --to T`` for every target, each in its own process: wall time and peak RSS
  from GNU ``/usr/bin/time`` (the process and the children it reaped, as ``time -v`` shows); the
  report gives the verification, the worst error / tolerance over the outputs and sites rewritten
  / refused.  The dynamic-batch copy is converted with --dyn-to (default fastest).
- one plain onnxruntime session + run of the original in a child: the floor to compare with.
- latency: the original and every rewritten model that changed, interleaved (A B C ... A B C ...)
  in one child process after a warm-up, at 1 thread and at all threads (onnxruntime's default);
  the ratio is the rewritten median over the original's (below 1: faster).  Compare within one run.

Columns: verified and err/tol (worst max|error| / tolerance over the outputs) from the report;
rw/ref/skip: sites rewritten / refused / skipped (already in the target form, or the
original was fastest); conv s and conv GB: wall time
and peak RSS of the conversion (imports included); lat 1t / lat all: latency ratios ("same": nothing
changed); MACs: Conv+ConvTranspose MACs of the whole rewritten model / the original's (the limit of
the latency ratio); site GMACs: the rewritten sites' before -> after; forms: what was emitted.

The refusal reasons are printed after the table, grouped, and the full JSON reports stay in --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

OPSET = 17
TARGETS = ("subpixel", "resize", "convtranspose", "fastest")
HERE = Path(__file__).resolve().parent


# ---- model builders (run only in the export child: they import torch and the model libraries) ----

def _sd_vae_decoder():
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=256,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, z):
            return self.vae.decode(z).sample

    return Decoder(), (1, 4, 32, 32)


def _smp(arch):
    def build():
        import segmentation_models_pytorch as smp

        return getattr(smp, arch)(encoder_name="resnet34", encoder_weights=None, classes=1), (1, 3, 256, 256)
    return build


def _yolov8n_seg():
    from ultralytics.nn.modules import Detect
    from ultralytics.nn.tasks import SegmentationModel

    model = SegmentationModel("yolov8n-seg.yaml", verbose=False)
    for m in model.modules():
        if isinstance(m, Detect):  # what ultralytics' own exporter sets: the inference outputs only
            m.export, m.format = True, "onnx"
    return model, (1, 3, 320, 320)


def _esrgan_x4():
    from spandrel.architectures.ESRGAN import ESRGAN as RRDBNet

    return RRDBNet(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4), (1, 3, 64, 64)


def _torchvision(name):
    def build():
        import torch
        from torchvision.models import segmentation

        net = getattr(segmentation, name)(weights=None, weights_backbone=None)

        class Out(torch.nn.Module):  # the dict of outputs -> its "out" tensor
            def __init__(self):
                super().__init__()
                self.net = net

            def forward(self, x):
                return self.net(x)["out"]

        return Out(), (1, 3, 256, 256)
    return build


MODELS = {
    "sd-vae-dec": _sd_vae_decoder,
    "unet-r34": _smp("Unet"),
    "unetpp-r34": _smp("UnetPlusPlus"),
    "linknet-r34": _smp("Linknet"),
    "yolov8n-seg": _yolov8n_seg,
    "esrgan-x4": _esrgan_x4,
    "lraspp-mnv3": _torchvision("lraspp_mobilenet_v3_large"),
    "fcn-r50": _torchvision("fcn_resnet50"),
}


def _torchvision_importable() -> None:
    """PyPI's torchvision wheels are built against CUDA torch: beside the CPU torch their C ops do not
    load, and ``import torchvision`` (which ultralytics, timm, spandrel and diffusers do) then fails
    registering fake kernels of torchvision::nms and ::qnms.  No model here runs those ops: define
    their schemas so that the import succeeds."""
    import importlib.util

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return
    try:
        torch.ops.load_library(next(Path(spec.origin).parent.glob("_C*.so")))
        return
    except (OSError, StopIteration):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_importable.lib = lib  # a Library unregisters its ops when collected


def export(name: str, out: Path) -> None:
    """Export MODELS[name] twice: static shapes and a dynamic batch dim (TorchScript exporter)."""
    import torch

    _torchvision_importable()
    torch.manual_seed(0)
    module, shape = MODELS[name]()
    module.eval()
    x = torch.randn(shape)
    with torch.no_grad():
        y = module(x)
    n_out = len(y) if isinstance(y, (tuple, list)) else 1
    outputs = [f"y{i}" for i in range(n_out)]
    for path, dynamic in ((out / f"{name}.onnx", None),
                          (out / f"{name}_dyn.onnx", {n: {0: "batch"} for n in ["x", *outputs]})):
        with torch.no_grad():
            torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=OPSET, input_names=["x"],
                              output_names=outputs, dynamic_axes=dynamic)


# ---- measurements in child processes ----

def _child(argv: list[str]) -> tuple[int, float, float, str]:
    """Run argv under GNU time; return its exit code, wall seconds, peak RSS in GB (the largest of
    it and the children it reaped) and the last line of its stderr.  Not os.wait4 on our own child:
    a child forked from this process starts with this process's high-water mark."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as stats:
        proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", stats.name, *argv],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wall, kb = stats.read().split()[-2:]
    last = proc.stderr.decode(errors="replace").strip().splitlines()[-1:]
    return proc.returncode, float(wall), int(kb) * 1024 / 1e9, "".join(last)


def convert(model: Path, to: str, out: Path) -> dict:
    stem = model.stem
    output, report = out / f"{stem}.{to}.onnx", out / f"{stem}.{to}.report.json"
    output.unlink(missing_ok=True)
    report.unlink(missing_ok=True)
    cli = Path(sys.executable).parent / "uprewrite"
    argv = [str(cli), "convert", str(model), "--to", to, "-o", str(output), "--report", str(report)]
    rc, wall, rss, err = _child(argv)
    rep = json.loads(report.read_text()) if report.exists() else {}
    return dict(to=to, rc=rc, wall=wall, rss=rss, report=rep, output=output if output.exists() else None, error=err)


_PLAIN = """
import sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
feeds = {i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
         for i in s.get_inputs()}
s.run(None, feeds)
"""


def plain_run(model: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one plain onnxruntime session + run (imports included)."""
    rc, wall, rss, err = _child([sys.executable, "-c", _PLAIN, str(model)])
    if rc:
        raise RuntimeError(f"plain onnxruntime run of {model} failed (exit {rc}): {err}")
    return wall, rss


# ---- latency, interleaved in a child process ----

def latencies(paths: list[Path], threads: int, seconds: float, min_runs: int) -> dict:
    """Median seconds per run of each model, interleaved, and the number of runs (enough to fill
    about ``seconds``, at least ``min_runs``); in a child process, so that this one stays small."""
    argv = [sys.executable, __file__, "--threads", str(threads), "--seconds", str(seconds),
            "--min-runs", str(min_runs), "--latency", *map(str, paths)]
    return json.loads(subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True).stdout)


def _interleaved(paths: list[str], threads: int, seconds: float, min_runs: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    from bench_latency import interleaved

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads  # 0: onnxruntime's default, all physical cores
    opts.inter_op_num_threads = 1 if threads == 1 else 0
    sessions = [ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"]) for p in paths]
    rng = np.random.default_rng(1)
    feeds = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in sessions[0].get_inputs()}
    t = time.perf_counter()
    for s in sessions:
        s.run(None, feeds)
    rounds = max(min_runs, min(40, int(seconds / (time.perf_counter() - t))))
    return dict(medians=interleaved(sessions, feeds, rounds), runs=rounds)


# ---- report digest ----

def worst_ratio(report: dict) -> str:
    """Worst error / tolerance over the outputs (both sizes when a second was checked)."""
    checks = report.get("outputs", []) + report.get("outputs_second_size", [])
    ratios = [c["max_abs_error"] / c["tolerance"] for c in checks if c.get("tolerance")]
    return f"{max(ratios):.2g}" if ratios else "-"


def short(reason: str, width: int = 150) -> str:
    return textwrap.shorten(reason, width, placeholder=" ...")


def site_counts(report: dict) -> tuple[int, int, int]:
    status = Counter(s["status"] for s in report.get("sites", []))
    return status["rewritten"], status["refused"], status["skipped"]


def chosen(report: dict) -> str:
    forms = Counter(s.get("chosen") or s.get("target") for s in report.get("sites", []) if s["status"] == "rewritten")
    return " ".join(f"{f} x{n}" for f, n in sorted(forms.items())) or "-"


def site_macs(report: dict) -> str:
    """GMACs of the rewritten sites before -> after."""
    sites = [s for s in report.get("sites", []) if s["status"] == "rewritten" and s.get("macs_before")]
    if not sites:
        return "-"
    return (f"{sum(s['macs_before'] for s in sites) / 1e9:.2f}->"
            f"{sum(s['macs_after'] or 0 for s in sites) / 1e9:.2f}")


def model_macs(path: Path) -> int | None:
    """MACs of every Conv and ConvTranspose: weight size (Cin/g per output channel, or Cout/g per input
    channel) times positions.  Shapes from onnx inference with data propagation (the exports compute
    Reshape and Resize sizes from shapes), else from one onnxruntime run that outputs the tensors
    inference left unknown (YOLO's Split -> Slice); None if even that fails."""
    import onnx

    model = onnx.load(str(path))
    typed = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*typed.graph.input, *typed.graph.value_info, *typed.graph.output]}
    weights = {t.name: math.prod(t.dims) for t in model.graph.initializer}
    convs = [(n, n.output[0] if n.op_type == "Conv" else n.input[0])
             for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    unknown = [t for _, t in convs if not all(shapes.get(t, [0]))]
    if unknown:
        try:
            shapes.update(_run_shapes(model, unknown))
        except Exception:  # noqa: BLE001 - a column of the table, not the benchmark
            return None
    if any(n.input[1] not in weights for n, _ in convs):
        return None
    return sum(weights[n.input[1]] * math.prod(shapes[t][2:]) for n, t in convs)


def _run_shapes(model, names: list[str]) -> dict[str, list[int]]:
    import numpy as np
    import onnx
    import onnxruntime as ort

    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in outputs)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
             for i in sess.get_inputs()}
    return {n: list(v.shape) for n, v in zip([o.name for o in sess.get_outputs()], sess.run(None, feeds))}


HEADER = (f"{'model':12s} {'--to':16s} {'verified':8s} {'err/tol':>7s} {'rw/ref/skip':>11s} {'conv s':>6s} "
          f"{'conv GB':>7s} {'lat 1t':>6s} {'lat all':>7s} {'MACs':>5s} {'site GMACs':>11s}  forms")


def row(name: str, to: str, res: dict, lat=("-", "-"), mac_ratio: str = "-") -> str:
    rep = res["report"]
    verified = rep.get("verification", f"exit {res['rc']}")
    counts = "/".join(map(str, site_counts(rep)))
    return (f"{name:12s} {to:16s} {verified:8s} {worst_ratio(rep):>7s} {counts:>11s} {res['wall']:6.1f} "
            f"{res['rss']:7.2f} {lat[0]:>6s} {lat[1]:>7s} {mac_ratio:>5s} {site_macs(rep):>11s}  {chosen(rep)}")


def _parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=[], help="these models (default: all)")
    parser.add_argument("--to", nargs="*", default=list(TARGETS), help="targets of the static export")
    parser.add_argument("--dyn-to", nargs="*", default=["fastest"], help="targets of the dynamic-batch export")
    parser.add_argument("--seconds", type=float, default=40.0, help="latency budget per model and thread setting")
    parser.add_argument("--min-runs", type=int, default=7, help="at least this many interleaved runs")
    parser.add_argument("--no-latency", action="store_true", help="conversions only")
    parser.add_argument("--out", type=Path, default=Path("/tmp/uprewrite_real"))
    parser.add_argument("--reexport", action="store_true", help="export again even when cached")
    parser.add_argument("--export", help=argparse.SUPPRESS)  # the children: export this model,
    parser.add_argument("--latency", nargs="+", help=argparse.SUPPRESS)  # or time these models
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    return parser.parse_args()


def _exported(name: str, args) -> bool:
    static, dyn = args.out / f"{name}.onnx", args.out / f"{name}_dyn.onnx"
    if static.exists() and dyn.exists() and not args.reexport:
        return True
    t = time.perf_counter()
    if subprocess.run([sys.executable, __file__, "--export", name, "--out", str(args.out)]).returncode:
        return False
    print(f"# {name}: exported in {time.perf_counter() - t:.0f} s", flush=True)
    return True


def _latency_ratios(name: str, static: Path, changed: list[dict], args) -> dict[str, list[str]]:
    """{target: [ratio at 1 thread, ratio at all threads]} for the conversions that changed the model."""
    ratios = {}
    for threads in (1, 0):
        timed = latencies([static] + [r["output"] for r in changed], threads, args.seconds, args.min_runs)
        medians = timed["medians"]
        for r, m in zip(changed, medians[1:]):
            ratios.setdefault(r["to"], []).append(f"{m / medians[0]:.2f}")
        print(f"# {name}: original {medians[0] * 1e3:.0f} ms at {threads or 'all'} thread(s), "
              f"median of {timed['runs']}", flush=True)
    return ratios


def bench_model(name: str, args, emit) -> list[dict]:
    """Plain run, conversions, latency and MACs of one model; emit(line) each table row; returns the
    conversions' results."""
    static, dyn = args.out / f"{name}.onnx", args.out / f"{name}_dyn.onnx"
    plain_s, plain_gb = plain_run(static)
    emit(f"{name:12s} {'(plain ort run)':16s} {'':8s} {'':>7s} {'':>11s} {plain_s:6.1f} {plain_gb:7.2f}"
         f"   ({static.stat().st_size / 1e6:.0f} MB model)")
    results = [convert(static, to, args.out) for to in args.to]
    changed = [r for r in results if r["output"] and site_counts(r["report"])[0]]
    lat = _latency_ratios(name, static, changed, args) if changed and not args.no_latency else {}
    base = model_macs(static)
    for r in results:
        after = model_macs(r["output"]) if r in changed else None
        unchanged = ("same", "same") if r["output"] and r not in changed else ("-", "-")
        emit(row(name, r["to"], r, lat.get(r["to"], unchanged), f"{after / base:.2f}" if base and after else "-"))
    for to in args.dyn_to:
        results.append(convert(dyn, to, args.out))
        emit(row(name, f"{to} (dyn N)", results[-1]))
    return results


def main():
    args = _parse_args()
    if args.latency:
        print(json.dumps(_interleaved(args.latency, args.threads, args.seconds, args.min_runs)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.export:
        export(args.export, args.out)
        return

    import onnxruntime as ort

    import onnx_uprewrite

    print(f"{time.strftime('%Y-%m-%d')}, onnxruntime {ort.__version__}, onnx-uprewrite {onnx_uprewrite.__version__}, "
          f"{_versions()}, {os.cpu_count()} CPUs")
    lines, refusals = [HEADER], Counter()

    def emit(line):
        lines.append(line)
        print(line, flush=True)

    for name in args.only or MODELS:
        if not _exported(name, args):
            emit(f"{name:12s} export failed")
            continue
        for r in bench_model(name, args, emit):
            for site in r["report"].get("sites", []):
                if site["status"] == "refused":
                    refusals[(name, short(site.get("reason") or ""))] += 1
            if not r["report"]:
                refusals[(name, short(f"--to {r['to']}: exit {r['rc']}, no report: {r['error']}"))] += 1
    print("\n" + "\n".join(lines))
    if refusals:
        print("\nrefused sites (model: count over all conversions, reason):")
        for (name, reason), n in sorted(refusals.items()):
            print(f"  {name}: {n}x {reason}")
    print(f"\nreports: {args.out}/<model>.<target>.report.json")


def _versions() -> str:
    from importlib import metadata

    found = []
    for pkg in ("onnx", "torch", "diffusers", "segmentation-models-pytorch", "ultralytics", "spandrel", "torchvision"):
        try:
            found.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


if __name__ == "__main__":
    main()
