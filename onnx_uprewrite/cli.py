"""``uprewrite``: parse arguments, call the API, print, map typed errors to exit codes.

Exit codes: 0 written, every selected site rewritten (or none to rewrite); 1 verification ran and
failed, nothing written; 2 usage error, unreadable/invalid model or verification impossible,
nothing written; 3 written and verified, but some sites were refused (each with its reason);
130 / 143 interrupted by SIGINT / SIGTERM, no partial output left (outputs appear by atomic rename).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import click
import numpy as np

from . import api, isolate
from ._argv import wants_json
from .budget import parse_size
from .errors import UprewriteError, UsageError, one_line
from .profile import builtin_names, check_model, load_profile
from .shapes import infer_static_shapes
from .report import _jsonable
from .verify import parse_shape_option

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_ERROR, EXIT_PARTIAL = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT / SIGTERM, as shells report them


def _fail(exc: UprewriteError, debug: bool, as_json: bool = False, file: str | None = None) -> None:
    """One ``uprewrite: error:`` line on stderr and the error's exit status; with ``as_json`` also
    ``{"error", "exit_code", "file", "report"}`` on stdout (the report of a failed verification, else null)."""
    report = getattr(exc, "report", None)
    if as_json:
        _json_error(str(exc), exc.exit_code, file, report)
    if debug:
        raise exc
    click.echo(f"uprewrite: error: {exc}", err=True)
    if report is not None and not as_json:
        click.echo(report.summary(verbose=True), err=True)
    sys.exit(exc.exit_code)


def _named_in(exc: Exception, *files) -> str | None:
    """The file an error is about, for ``--json``: of ``files``, the one its message names first
    (the longest at a tie: ``m.onnx.data`` over ``m.onnx``), else the first."""
    text = str(exc)
    named = [(text.find(str(f)), -len(str(f)), str(f)) for f in files if f is not None and str(f) in text]
    if named:
        return min(named)[2]
    return next((str(f) for f in files if f is not None), None)


def _json_error(message: str, code: int, file: str | None = None, report=None) -> None:
    click.echo(json.dumps({"error": message, "exit_code": code, "file": file,
                           "report": None if report is None else report.to_dict()}, indent=2, default=_jsonable))


def _load_npz(path: str | None) -> dict[str, np.ndarray] | None:
    if path is None:
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:
        raise UsageError(f"--inputs {path}: cannot read as .npz: {exc}") from None


def _size(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as exc:
        raise UsageError(f"--memory-budget {exc}") from None


def _memory_budget(what: str):
    return click.option("--memory-budget", metavar="SIZE",
                        help=f"{what} when estimated to need more memory than SIZE, e.g. 512M, 4G "
                             "[default: half of physical memory].")


def _time_budget(what: str):
    return click.option("--time-budget", type=click.FloatRange(min=0), metavar="SECONDS",
                        help=f"{what} after this many seconds of onnxruntime runs.")


def _complete_profile(ctx, param, incomplete: str):
    """Shell completion of --profile: built-in names (any case), then files."""
    from click.shell_completion import CompletionItem

    names = [CompletionItem(n) for n in builtin_names() if n.startswith(incomplete.lower())]
    return names + [CompletionItem(incomplete, type="file")]


def _epilog(examples: list[tuple[str, str]], codes: list[tuple[str, str]]) -> str:
    """Two examples and the exit codes, laid out as written (click's \\b: no rewrapping)."""
    lines = ["\b", "Examples:"] + [line for e, why in examples for line in (f"  {e}", f"      {why}")]
    lines += ["", "\b", "Exit codes:"] + [f"  {c:<8} {meaning}" for c, meaning in codes]
    return "\n".join(lines)


INTERRUPTED = ("130/143", "interrupted (SIGINT/SIGTERM); no partial output left")


@click.group(context_settings={"help_option_names": ["-h", "--help"]},
             epilog=_epilog([("uprewrite convert decoder.onnx", "every upsampling site to sub-pixel, verified"),
                             ("uprewrite inspect decoder.onnx", "the sites, their exact forms, refusals")],
                            [("0", "success"), ("1", "verification failed / models differ / target cannot run"),
                             ("2", "usage error, invalid model, verification impossible"),
                             ("3", "convert: written, some sites refused"), INTERRUPTED]))
@click.version_option(None, "-V", "--version", package_name="onnx-uprewrite")
def cli() -> None:
    """Rewrite ONNX upsampling layers between their exact equivalent forms, verified in onnxruntime."""


@cli.command(epilog=_epilog(
    [("uprewrite convert decoder.onnx", "writes decoder.subpixel.onnx, verified"),
     ("uprewrite convert decoder.onnx --profile tidl --json > report.json", "only what TIDL cannot run")],
    [("0", "written; every selected site rewritten (or none to rewrite)"),
     ("1", "verification failed; nothing written"),
     ("2", "usage error, invalid model, verification impossible or over budget; nothing written"),
     ("3", "written and verified, but some sites refused (reasons on stderr)"), INTERRUPTED]))
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output file [default: <stem>.<form>.onnx beside MODEL].")
@click.option("--to", "to", default=None, type=click.Choice(api.TARGETS),
              help="Target form [default: subpixel]; 'fastest': per site, the exact form (or the original) that "
                   "runs fastest in onnxruntime on the site's real input.")
@click.option("--profile", "profile", metavar="NAME|FILE", shell_complete=_complete_profile,
              help="Target accelerator: rewrite only the sites it cannot run, each into the cheapest exact form "
                   f"it runs, and check the result (built-in, any case: {', '.join(builtin_names())}; or a "
                   "JSON/TOML file).")
@click.option("--d2s-mode", "d2s_mode", type=click.Choice(list(api.SUBPIXEL_LAYOUTS)), default="auto", show_default=True,
              help="Layout of the sub-pixel form. auto: one Conv per output phase where that saves MACs, then "
              "DepthToSpace (2-D square strides) or single-axis Transposes; transpose: Transposes everywhere "
              "(fastest in onnxruntime); CRD: one Conv + DepthToSpace CRD (PixelShuffle's order); DCR: "
              "DepthToSpace DCR (TensorFlow's order).")
@click.option("--provider", default="CPUExecutionProvider", show_default=True,
              help="onnxruntime execution provider that --to fastest times the forms with.")
@click.option("--runtime", default="onnxruntime", show_default=True, type=click.Choice(["onnxruntime", "openvino"]),
              help="The runtime --to fastest times the forms in: openvino (installed in its own venv, as for "
                   "check --compiler) ranks them differently from onnxruntime.")
@click.option("--only", multiple=True, metavar="NODE", help="Rewrite only these site nodes (repeatable).")
@click.option("--from", "sources", multiple=True, type=click.Choice(api.SOURCES),
              help="Rewrite only sites of these source forms (repeatable).")
@click.option("--inputs", "inputs_file", type=click.Path(), help=".npz with one array per graph input, for verification.")
@click.option("--shape", "shape", multiple=True, metavar="NAME=DIMS",
              help="Shape of a graph input: x=1x3x64x64, x:1,3,64,64 or x:[1,3,64,64] (repeatable). Symbolic dims "
                   "not given are chosen: batch 1, others the first of 64, 32, 128, 16, 256, 512, 1024, 4096 that runs.")
@click.option("--atol", type=float, help="Absolute tolerance [default: 0].")
@click.option("--rtol", type=float, help="Tolerance relative to max|reference| [default: 8*eps*sqrt(terms)].")
@click.option("--no-verify", is_flag=True, help="Skip onnxruntime verification (the report says so).")
@click.option("--report", "report_file", type=click.Path(path_type=Path, allow_dash=True), metavar="FILE",
              help="Also write the JSON report to FILE (also when verification fails); '-' is stdout, as --json.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the JSON report on stdout instead of the summary; a failure prints "
                   '{"error", "exit_code", "file", "report"} there too.')
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the random verification inputs.")
@_memory_budget("Refuse verification")
@_time_budget("Stop verification (exit 2, nothing written)")
@click.option("-q", "--quiet", is_flag=True,
              help="One summary line; each refused site's reason and every error on stderr.")
@click.option("-v", "--verbose", is_flag=True,
              help="Every site in detail: its per-site check, the forms timed, notes (default: a compact table).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def convert(model, output, to, profile, d2s_mode, provider, runtime, only, sources, inputs_file, shape, atol, rtol, no_verify, report_file,
            as_json, seed, memory_budget, time_budget, quiet, verbose, debug):
    """Rewrite every upsampling site of MODEL into the form --to, verify, save."""
    if report_file is not None and str(report_file) == "-":
        report_file, as_json = None, True
    progress = None if quiet else ProgressLine.for_stderr()
    try:
        if to is not None and profile is not None:
            raise UsageError("--to and --profile exclude each other: a profile picks each site's form")
        to = to or "subpixel"
        if output is None:
            suffix = (profile.lower() if profile.lower() in builtin_names() else Path(profile).stem) if profile else to
            output = model.with_name(f"{model.name[:-5] if model.name.endswith('.onnx') else model.name}.{suffix}.onnx")
        result = api.convert(
            model, to=to, output=output, only=list(only) or None, sources=list(sources) or None, inputs=_load_npz(inputs_file),
            shapes=parse_shape_option(shape), atol=atol, rtol=rtol, verify=not no_verify, seed=seed,
            also_writes=[report_file] if report_file is not None else [],
            memory_budget=_size(memory_budget), time_budget=time_budget,
            progress=_saving_completes(progress), provider=provider, runtime=runtime, profile=profile, lazy_weights=True,
            d2s_mode=d2s_mode,
        )
    except UprewriteError as exc:
        if progress is not None:
            progress.clear()
        if report_file is not None and getattr(exc, "report", None) is not None:
            _write_report(report_file, exc.report.to_json())
        _fail(exc, debug, as_json, _named_in(exc, model, output, report_file, inputs_file))
        return
    if progress is not None:
        progress.clear()
    report = result.report
    if report_file is not None:
        _write_report(report_file, report.to_json())
    if as_json:
        click.echo(report.to_json())
    if not (quiet or as_json):
        _echo_summary(report.summary(verbose))
    else:  # -q: one summary line; a refused site (exit 3) is an error, with its reason, on stderr
        if quiet and not as_json:
            click.echo(report.one_line())
        for site in report.refused:
            click.echo(f"uprewrite: refused: {one_line(site.reason)}", err=True)
        for violation in report.profile_violations:
            click.echo(f"uprewrite: profile violation: {one_line(violation)}", err=True)
    if isolate.held_signals():
        click.echo("uprewrite: note: the interrupt came while the output was being saved; the run completed",
                   err=True)
    sys.exit(EXIT_PARTIAL if report.refused or report.profile_violations else EXIT_OK)


#: status words coloured in the summary on a terminal (NO_COLOR turns colour off)
_COLOURS = {"rewritten": "green", "verified": "green", "skipped": "cyan", "refused": "yellow",
            "warning": "yellow", "profile": "yellow", "verification:": "red"}


def _echo_summary(text: str) -> None:
    """The summary on stdout, its status words coloured only on a terminal and without NO_COLOR."""
    colour = sys.stdout is not None and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    for line in text.splitlines():
        word = line.strip().split(" ", 1)[0] if line.startswith("  ") else ""
        if colour and word in _COLOURS:
            line = line.replace(word, click.style(word, fg=_COLOURS[word], bold=True), 1)
        click.echo(line, color=colour)


def _saving_completes(progress):
    """``progress`` for api.convert that, when saving begins, defers SIGINT/SIGTERM to the end of the
    run: the output then appears whole and the exit status says so (an interrupt after the rename
    would claim 'no partial output left' beside a complete output)."""
    def step(stage, done, total):
        if stage == "saving":
            isolate.hold_signals()
        if progress is not None:
            progress(stage, done, total)
    return step


class ProgressLine:
    """One self-overwriting status line on stderr, only when stderr is a terminal."""

    def __init__(self, stream):
        self.stream = stream
        self.width = 0
        self.start = time.monotonic()
        self.stage_start = (None, self.start)

    @classmethod
    def for_stderr(cls):
        stream = sys.stderr
        return cls(stream) if stream is not None and stream.isatty() else None

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if self.stage_start[0] != stage:
            self.stage_start = (stage, now)
        text = f"uprewrite: {stage}" + (f" {done + 1}/{total}" if total > 1 else "") + f" ... {now - self.start:.0f} s"
        spent = now - self.stage_start[1]
        if total > 1 and done > 0 and spent > 2:  # an estimate once there is something to go by
            text += f", about {spent / done * (total - done):.0f} s left in this stage"
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()
        self.width = len(text)

    def clear(self) -> None:
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


def _write_report(path: Path, text: str) -> None:
    try:
        path.write_text(text + "\n")
    except OSError as exc:
        click.echo(f"uprewrite: warning: cannot write report {path}: {exc.strerror or exc}", err=True)


@cli.command(epilog=_epilog(
    [("uprewrite inspect decoder.onnx", "a table: sites, parameters, exact forms and MACs, refusals"),
     ("uprewrite inspect decoder.onnx --shape x=1x3x256x256 --json", "the same as JSON, at that size")],
    [("0", "listed (refused sites too)"), ("2", "usage error, unreadable or invalid model"), INTERRUPTED]))
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--shape", "shape", multiple=True, metavar="NAME=DIMS", help="Shape of a graph input.")
@click.option("--json", "as_json", is_flag=True,
              help='Print the sites as JSON on stdout; a failure prints {"error", "exit_code", "file", "report"}.')
@_memory_budget("Skip the onnxruntime run that measures site shapes (onnx shape inference gives them then)")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def inspect(model, shape, as_json, memory_budget, debug):
    """List the upsampling sites of MODEL, their parameters, and the reasons for refusals."""
    try:
        info = api.inspect(model, shapes=parse_shape_option(shape), memory_budget=_size(memory_budget),
                           lazy_weights=True)
    except UprewriteError as exc:
        _fail(exc, debug, as_json, model)
        return
    if as_json:
        click.echo(info.to_json())
        return
    click.echo(inspect_table(info))


def inspect_table(info: dict) -> str:
    """The human form of ``api.inspect``: one row per site, then refusals and what each form would be."""
    rows = [("site", "source", "shape", "stride", "kernel", "dil", "group", "dtype", "exact forms (MACs/sample)",
             "checkerboard")]
    details = []
    for s in info["sites"]:
        if s["refused"]:
            continue
        p = s["params"]
        ins = "x".join("?" if n is None else str(n) for n in s["input_lengths"])
        outs = "x".join("?" if n is None else str(n) for n in s["output_lengths"])
        forms = ", ".join(
            f + (" masked" if "[masked" in s["forms"][f] else "")
            + (f" {s['macs'][f]:,}" if s["macs"].get(f) is not None else "")
            for f in s["exact_forms"])
        cb = s["checkerboard"]
        rows.append((s["node"], s["source"], f"{p['in_channels']}x{ins} -> {p['out_channels']}x{outs}",
                     _dims(p["strides"]), _dims(p["kernel"]), _dims(p["dilations"]), str(p["group"]), p["dtype"],
                     forms or "none", "yes " + "/".join(_dims(t) for t in cb["taps_per_phase"]) if cb["risk"] else "no"))
        for form, text in s["forms"].items():
            details.append(f"  {s['node']} -> {form}: {text}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{info['model']}: {len(info['sites'])} upsampling site(s)"]
    if info.get("chosen_shapes"):
        lines.append("  shapes: " + ", ".join(f"{k}={_dims(v)}" for k, v in info["chosen_shapes"].items())
                     + " (chosen; --shape overrides)")
    if len(rows) > 1:
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"  refused  {s['refused']}" for s in info["sites"] if s["refused"]]
    if details:
        lines += ["forms:"] + details
    return "\n".join(one_line(line) for line in lines)


def _dims(values) -> str:
    return "x".join(str(v) for v in values)


@cli.command(epilog=_epilog(
    [("uprewrite verify decoder.onnx decoder.subpixel.onnx", "same outputs within the derived tolerance?"),
     ("uprewrite verify a.onnx b.onnx --inputs feeds.npz --atol 1e-5 --json", "on your inputs, as JSON")],
    [("0", "equivalent within tolerance"), ("1", "they differ (each output's error and tolerance printed)"),
     ("2", "usage error, unreadable model, onnxruntime cannot run one of them, over budget"), INTERRUPTED]))
@click.argument("a", type=click.Path(dir_okay=True, path_type=Path))
@click.argument("b", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--inputs", "inputs_file", type=click.Path(), help=".npz with one array per graph input.")
@click.option("--shape", "shape", multiple=True, metavar="NAME=DIMS", help="Shape of a graph input.")
@click.option("--atol", type=float, help="Absolute tolerance [default: 0].")
@click.option("--rtol", type=float,
              help="Tolerance relative to max|output of A| [default: 8*eps*sqrt(4096), eps of the output dtype].")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--json", "as_json", is_flag=True,
              help='Print the comparison as JSON on stdout; a failure prints {"error", "exit_code", "file", "report"}.')
@_memory_budget("Refuse the comparison")
@_time_budget("Stop comparing (exit 2)")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def verify(a, b, inputs_file, shape, atol, rtol, seed, as_json, memory_budget, time_budget, debug):
    """Compare models A and B in onnxruntime on the same inputs (exit 1 when they differ)."""
    try:
        checks, tol = api.verify(a, b, inputs=_load_npz(inputs_file), shapes=parse_shape_option(shape),
                                 atol=atol, rtol=rtol, seed=seed, memory_budget=_size(memory_budget),
                                 time_budget=time_budget)
    except UprewriteError as exc:
        _fail(exc, debug, as_json, _named_in(exc, a, b, inputs_file))
        return
    ok = all(c.ok for c in checks)
    if as_json:
        outputs = [{**{k: v for k, v in c.to_dict().items() if k != "rewritten_shape"},
                    "b_shape": c.to_dict()["rewritten_shape"]} for c in checks]  # b_shape: the key scripts read
        click.echo(json.dumps({"a": str(a), "b": str(b), "equivalent": ok, "tolerance": tol.derivation,
                               "outputs": outputs}, indent=2))
        sys.exit(EXIT_OK if ok else EXIT_VERIFY_FAILED)
    for c in checks:
        verdict = "ok" if c.ok else "DIFFERENT"
        click.echo(f"output '{one_line(c.name)}': max abs error {c.max_abs_error:.3g}, tolerance {c.tolerance:.3g}: {verdict}")
    click.echo(f"tolerance: {tol.derivation}")
    sys.exit(EXIT_OK if all(c.ok for c in checks) else EXIT_VERIFY_FAILED)


@cli.command(epilog=_epilog(
    [("uprewrite check decoder.onnx --profile tidl", "does TIDL run every upsampling node?"),
     ("uprewrite check out.onnx --compiler rknn:rk3588", "ask the RKNN compiler itself (installed in its own venv)")],
    [("0", "the target runs every upsampling node (on the NPU, with onnxruntime's values: --compiler)"),
     ("1", "it does not (each node and the reason printed)"),
     ("2", "usage error (unknown profile or compiler, compiler not installed: the install command is printed), "
           "unreadable or invalid model"), INTERRUPTED]))
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--profile", "profile", default=None, metavar="NAME|FILE", shell_complete=_complete_profile,
              help="Built-in profile name (any case: tidl, ethos-u, rknn, ...) or a JSON/TOML profile file.")
@click.option("--compiler", "compiler", default=None, metavar="NAME[:TARGET]",
              help="Build MODEL with a real compiler: rknn[:rk3588|rk3576|rv1106...], vela[:ethos-u55-128|"
                   "ethos-u85-256...], openvino[:CPU]; report where each upsampling layer runs, from the "
                   "compiler's own report, and compare its outputs with onnxruntime's. The compiler lives in "
                   "its own venv: UPREWRITE_<NAME>_PYTHON, or ~/.cache/onnx-uprewrite/<name>/bin/python.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=DIMS",
              help="Input shape for the --compiler build, e.g. x=1x3x64x64 (symbolic dims: chosen as convert does).")
@click.option("--json", "as_json", is_flag=True,
              help='Print the verdict as JSON on stdout; a failure prints {"error", "exit_code", "file", "report"}.')
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def check(model, profile, compiler, shapes, as_json, debug):
    """Check that the target of --profile (or the compiler of --compiler) runs every upsampling node of
    MODEL (exit 1 when not)."""
    try:
        if profile is None and compiler is None:
            raise UsageError("give --profile NAME|FILE, --compiler NAME[:TARGET], or both")
        prof = load_profile(profile) if profile is not None else None
        violations, label = [], None
        if prof is not None:  # (compile_check reads the model itself)
            loaded, label, _ = api._open(model)
            violations = check_model(loaded, prof, infer_static_shapes(loaded))
        built = api.compile_check(model, compiler, shapes=parse_shape_option(shapes)) if compiler else None
        label = label or built.model
    except UprewriteError as exc:
        _fail(exc, debug, as_json, _named_in(exc, model, profile or compiler))
        return
    ok = not violations and (built is None or built.ok)
    if as_json:
        doc = {"model": label, "ok": ok}
        if prof is not None:
            doc.update(profile=prof.name, violations=[{"node": v.node, "op": v.op, "reason": v.reason,
                                                       "kind": v.kind} for v in violations])
        if built is not None:
            doc["compiler"] = built.to_dict()
        click.echo(json.dumps(doc, indent=2))
    else:
        if prof is not None:
            for v in violations:
                click.echo(one_line(f"{label}: {prof.name} cannot run {v}"))
            if not violations:
                click.echo(f"{label}: {prof.name} runs every upsampling node")
        if built is not None:
            _echo_compiler_check(built)
    sys.exit(EXIT_OK if ok else EXIT_VERIFY_FAILED)


def _echo_compiler_check(built) -> None:
    versions = ", ".join(f"{k} {v}" for k, v in built.versions.items())
    where = [layer.where for layer in built.layers]
    counts = f"; {len(where)} layer(s), {where.count('CPU')} on the CPU" if where else ""
    click.echo(one_line(f"{built.model}: {built.compiler} {built.target} ({versions}): {built.status}"
                        + (f" ({built.message})" if built.message else "") + counts))
    for layer in built.layers:
        if layer.upsampling or layer.where == "CPU":
            node = f"  <- '{layer.node}'" if layer.node else ""
            tag = "upsampling" if layer.upsampling else "other"
            click.echo(one_line(f"  {layer.where:4s} {layer.op:20s} {layer.name}{node}  [{tag}]"))
    if built.max_abs_error is not None:
        verdict = "wrong" if built.wrong else "ok"
        click.echo(f"  numerics   {built.numerics}: max abs error {built.max_abs_error:.3g} against onnxruntime "
                   f"(limit {built.error_limit:.3g}): {verdict}")
    problems = built.problems()
    click.echo(one_line(f"  verdict    {'; '.join(problems)}") if problems else
               "  verdict    every upsampling layer compiles" + (" onto the NPU" if where else ""))


def main() -> None:
    """The ``uprewrite`` entry point: the command runs in a forked child (isolate.supervise), so that
    onnx or onnxruntime crashing on a malformed model still ends in one error line and exit 2."""
    if isolate.can_fork():
        sys.exit(isolate.supervise(_main, on_error=_json_error if wants_json(sys.argv[1:]) else None))
    _main()


def _main() -> None:
    try:
        isolate.raise_on_signals()  # (already so in a supervised child) replaces _entry's exit-at-once
        isolate.warm_up()  # unsupervised: the shape-inference server imports onnx while the model loads
        cli(standalone_mode=False)
    except isolate.Terminated:
        _stop(isolate.stop_message(signal.SIGTERM), EXIT_TERMINATED)
    except click.exceptions.Abort:
        _stop(isolate.stop_message(signal.SIGINT), EXIT_INTERRUPTED)
    except click.ClickException as exc:
        if wants_json(sys.argv[1:]):
            _json_error(exc.format_message(), EXIT_ERROR)
        exc.show()
        sys.exit(EXIT_ERROR)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        _stop(isolate.stop_message(signal.SIGINT), EXIT_INTERRUPTED)
    except UprewriteError as exc:  # re-raised by --debug (after its JSON): the traceback, then its exit code
        traceback.print_exc()
        click.echo(f"uprewrite: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug: still one line, never a half-written output
        if "--debug" in sys.argv:
            click.echo(f"uprewrite: internal error: {type(exc).__name__}: {exc}", err=True)
            raise
        _stop(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug)", EXIT_ERROR)
    finally:  # the command has ended: a signal from now on must not change its status
        isolate.finished = True  # first, and no call before it (a call lets a pending handler run)
        isolate.ignore_signals()


def _stop(message: str, code: int) -> None:
    """End a run that did not finish: one line on stderr (and the JSON error object under --json)."""
    if wants_json(sys.argv[1:]):
        _json_error(message, code)
    click.echo(f"uprewrite: {message}", err=True)
    sys.exit(code)
