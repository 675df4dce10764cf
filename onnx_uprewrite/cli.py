"""``uprewrite``: parse arguments, call the API, print, map typed errors to exit codes.

Exit codes: 0 written, every selected site rewritten (or none to rewrite); 1 verification ran and
failed, nothing written; 2 usage error, unreadable/invalid model or verification impossible,
nothing written; 3 written and verified, but some sites were refused (each with its reason);
130 / 143 interrupted by SIGINT / SIGTERM, no partial output left (outputs appear by atomic rename).
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click
import numpy as np

from . import api
from .budget import parse_size
from .errors import UprewriteError, UsageError
from .verify import parse_shape_option

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_ERROR, EXIT_PARTIAL = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT / SIGTERM, as shells report them


def _fail(exc: UprewriteError, debug: bool) -> None:
    if debug:
        raise exc
    click.echo(f"uprewrite: error: {exc}", err=True)
    report = getattr(exc, "report", None)
    if report is not None:
        click.echo(report.summary(), err=True)
    sys.exit(exc.exit_code)


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


MEMORY_BUDGET = click.option(
    "--memory-budget", metavar="SIZE",
    help="Refuse verification estimated to need more memory, e.g. 4G [default: half of physical memory].")
TIME_BUDGET = click.option(
    "--time-budget", type=click.FloatRange(min=0), metavar="SECONDS",
    help="Stop verification (exit 2, nothing written) after this many seconds of onnxruntime runs.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnx-uprewrite")
def cli() -> None:
    """Rewrite ONNX upsampling layers between their exact equivalent forms, verified in onnxruntime."""


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output file [default: <stem>.<form>.onnx beside MODEL].")
@click.option("--to", "to", default="subpixel", show_default=True, type=click.Choice(api.FORMS), help="Target form.")
@click.option("--only", multiple=True, metavar="NODE", help="Rewrite only these site nodes (repeatable).")
@click.option("--from", "sources", multiple=True, type=click.Choice(api.SOURCES),
              help="Rewrite only sites of these source forms (repeatable).")
@click.option("--inputs", "inputs_file", type=click.Path(), help=".npz with one array per graph input, for verification.")
@click.option("--shape", "shape", multiple=True, metavar="NAME=DIMS", help="Shape of a graph input, e.g. x=1x3x64x64.")
@click.option("--atol", type=float, help="Absolute tolerance [default: 0].")
@click.option("--rtol", type=float, help="Tolerance relative to max|reference| [default: 8*eps*sqrt(terms)].")
@click.option("--no-verify", is_flag=True, help="Skip onnxruntime verification (the report says so).")
@click.option("--report", "report_file", type=click.Path(path_type=Path), help="Write the JSON report here.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random verification inputs.")
@MEMORY_BUDGET
@TIME_BUDGET
@click.option("-q", "--quiet", is_flag=True, help="Print errors only.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def convert(model, output, to, only, sources, inputs_file, shape, atol, rtol, no_verify, report_file, seed,
            memory_budget, time_budget, quiet, debug):
    """Rewrite every upsampling site of MODEL into the form --to, verify, save."""
    try:
        if output is None:
            output = model.with_name(f"{model.name[:-5] if model.name.endswith('.onnx') else model.name}.{to}.onnx")
        result = api.convert(
            model, to=to, output=output, only=list(only) or None, sources=list(sources) or None, inputs=_load_npz(inputs_file),
            shapes=parse_shape_option(shape), atol=atol, rtol=rtol, verify=not no_verify, seed=seed,
            also_writes=[report_file] if report_file is not None else [],
            memory_budget=_size(memory_budget), time_budget=time_budget,
        )
    except UprewriteError as exc:
        if report_file is not None and getattr(exc, "report", None) is not None:
            _write_report(report_file, exc.report.to_json())
        _fail(exc, debug)
        return
    report = result.report
    if report_file is not None:
        _write_report(report_file, report.to_json())
    if not quiet:
        click.echo(report.summary())
    sys.exit(EXIT_PARTIAL if report.refused else EXIT_OK)


def _write_report(path: Path, text: str) -> None:
    try:
        path.write_text(text + "\n")
    except OSError as exc:
        click.echo(f"uprewrite: warning: cannot write report {path}: {exc.strerror or exc}", err=True)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--shape", "shape", multiple=True, metavar="NAME=DIMS", help="Shape of a graph input.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@MEMORY_BUDGET
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def inspect(model, shape, as_json, memory_budget, debug):
    """List the upsampling sites of MODEL, their parameters, and the reasons for refusals."""
    try:
        info = api.inspect(model, shapes=parse_shape_option(shape), memory_budget=_size(memory_budget))
    except UprewriteError as exc:
        _fail(exc, debug)
        return
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['model']}: {len(info['sites'])} upsampling site(s)")
    for s in info["sites"]:
        if s["refused"]:
            click.echo(f"  refused  {s['refused']}")
            continue
        p = s["params"]
        macs = ", ".join(f"{k} {v:,}" for k, v in s["macs"].items() if v is not None) or "symbolic input size"
        forms = [f + (" (masked zero insertion)" if "[masked" in s["forms"][f] else "") for f in s["exact_forms"]]
        click.echo(
            f"  {s['node']} ({s['source']}): {p['rank']}-D {p['in_channels']}->{p['out_channels']} "
            f"stride {p['strides']} kernel {p['kernel']} dilation {p['dilations']} group {p['group']}; "
            f"exact forms: {', '.join(forms)}; MACs/sample: {macs}"
        )


@cli.command()
@click.argument("a", type=click.Path(dir_okay=True, path_type=Path))
@click.argument("b", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--inputs", "inputs_file", type=click.Path(), help=".npz with one array per graph input.")
@click.option("--shape", "shape", multiple=True, metavar="NAME=DIMS", help="Shape of a graph input.")
@click.option("--atol", type=float)
@click.option("--rtol", type=float)
@MEMORY_BUDGET
@TIME_BUDGET
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def verify(a, b, inputs_file, shape, atol, rtol, memory_budget, time_budget, debug):
    """Compare models A and B in onnxruntime on the same inputs (exit 1 when they differ)."""
    try:
        checks, tol = api.verify(a, b, inputs=_load_npz(inputs_file), shapes=parse_shape_option(shape),
                                 atol=atol, rtol=rtol, memory_budget=_size(memory_budget), time_budget=time_budget)
    except UprewriteError as exc:
        _fail(exc, debug)
        return
    for c in checks:
        verdict = "ok" if c.ok else "DIFFERENT"
        click.echo(f"output '{c.name}': max abs error {c.max_abs_error:.3g}, tolerance {c.tolerance:.3g}: {verdict}")
    click.echo(f"tolerance: {tol.derivation}")
    sys.exit(EXIT_OK if all(c.ok for c in checks) else EXIT_VERIFY_FAILED)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every ``finally`` (temp files) runs."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli(standalone_mode=False)
    except _Terminated:
        click.echo("uprewrite: terminated (SIGTERM); no partial output left", err=True)
        sys.exit(EXIT_TERMINATED)
    except click.exceptions.Abort:
        click.echo("uprewrite: interrupted; no partial output left", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_ERROR)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        click.echo("uprewrite: interrupted; no partial output left", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # a bug: still one line, never a half-written output
        click.echo(f"uprewrite: internal error: {type(exc).__name__}: {exc} (rerun with --debug)", err=True)
        if "--debug" in sys.argv:
            raise
        sys.exit(EXIT_ERROR)
