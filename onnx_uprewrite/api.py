"""convert() / inspect() / verify(): load -> parse -> emit -> verify -> save.

The library never prints, exits or imports click; failures are typed errors (errors.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

from . import __version__, isolate
from .passes import EMITTERS, FORM_OPS, FORMS, LAYOUTS, OP_FORMS, PARSERS, SITE_OPS, SOURCES  # noqa: F401 (API)
from .budget import check_memory, default_memory_budget, guard_memory, release_memory
from .budget import time_budget as budget_time
from .compilers import check_compiler, parse_spec, runtime_timer
from .profile import Profile, load_profile
from .strategies import KEEP_SITE, REFUSE, Context, Decision, strategy_for
from .errors import (InvalidModelError, ResourceLimit, UprewriteError, UsageError, VerificationFailed,
                     VerificationImpossible, first_line, one_line)
from .model_io import check_data_file, check_sources, default_opset, has_external_data, load_model, output_files, save_model, validate_model
from .report import Comparison, Inspection, Report, SiteResult, Tolerance
from .site_check import (LOWER_BOUND_TEXT, compare_site, lower_bound_applies, magnitude_emission, magnitude_lower_bound,
                         outer_inputs, output_quantization, sites_model)
from .shapes import infer_static_shapes
from .sites import GraphIndex, Refusal, Site, priced
from .weights import axis_limit_problem
from .emit import attribute_problem, emit_site
from .surgery import Builder, Namer, drop_unused, op_census, splice
from .verify import (
    CHOSEN_SIZES, ShapeChoice, _first_line, check_shape_names, compare, derive_tolerance, feed_inputs, input_shapes,
    make_inputs, nonfinite_problem, normalize_shapes, run_original, run_rewritten, run_with_taps, session,
    shape_candidates, symbolic_dims_text,
)

#: what --to accepts: a form, or "fastest" (per site, the fastest exact form measured in onnxruntime)
TARGETS = FORMS + ("fastest",)
#: ``d2s_mode`` -> the sub-pixel emitter in that layout
SUBPIXEL_LAYOUTS = LAYOUTS


@dataclass
class ConvertResult:
    """What ``convert`` returns: the rewritten model, the report of the run, and the file written
    (None unless ``output=`` was given)."""

    model: onnx.ModelProto
    report: Report
    output: Path | None = None

    def to_dict(self) -> dict:
        """The report as JSON-ready data (the model itself is not included), with the output path."""
        return {**self.report.to_dict(), "output": None if self.output is None else str(self.output)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def graph(self):
        """The rewritten model as an ``onnx_graphsurgeon.Graph`` (for gs pipelines)."""
        import onnx_graphsurgeon as gs

        return gs.import_onnx(self.model)


#: keyword spellings of the CLI's options, accepted beside the API's own names
CLI_NAMES = {"shape": "shapes", "from_": "sources"}


def cli_names(function):
    """Accept the CLI's option names as keywords too: ``shape=`` (``--shape``) for ``shapes=``,
    ``from_=`` (``--from``) for ``sources=``."""
    @functools.wraps(function)
    def call(*args, **kwargs):
        for alias, name in CLI_NAMES.items():
            if alias in kwargs:
                if name in kwargs:
                    raise UsageError(f"{alias}= and {name}= are the same option: give one of them")
                kwargs[name] = kwargs.pop(alias)
        return function(*args, **kwargs)
    return call


def _is_gs_graph(model) -> bool:
    """An onnx_graphsurgeon Graph, recognised without importing onnx_graphsurgeon."""
    return type(model).__name__ == "Graph" and type(model).__module__.startswith("onnx_graphsurgeon")


def _from_gs_graph(graph) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    try:
        return gs.export_onnx(graph, do_type_check=False)
    except Exception as exc:
        raise InvalidModelError(f"onnx_graphsurgeon cannot export the graph: {first_line(exc)}") from None


def _open(model, label: str | None = None, lazy: bool = False) -> tuple[onnx.ModelProto, str, tuple[Path, bool] | None]:
    """(model, label, (path, external data files) or None for an in-memory model).  ``model``: a path,
    an ``onnx.ModelProto`` or an ``onnx_graphsurgeon.Graph``."""
    if _is_gs_graph(model):
        model = _from_gs_graph(model)
    if not isinstance(model, (onnx.ModelProto, str, os.PathLike)):
        raise UsageError(f"model: expected a path, an onnx.ModelProto or an onnx_graphsurgeon.Graph, got "
                         f"{type(model).__name__}")
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # never mutate the caller's model
        name = one_line(label or copy.graph.name or "<model>")
        validate_model(copy, name)
        if has_external_data(copy):
            raise UsageError(f"{name}: model has unloaded external data; pass a path or load it first")
        return copy, name, None
    path = Path(model)
    isolate.announce("model", path)  # for the message if onnx/onnxruntime crash the process
    loaded, external = load_model(path, lazy=lazy)
    return loaded, one_line(str(path)), (path, external)


def _announcing(progress):
    """``progress`` that also tells a supervising CLI parent the stage (isolate.announce)."""
    last = [None]

    def step(stage, done, total):
        if stage != last[0]:
            last[0] = stage
            isolate.announce("stage", stage)
        progress(stage, done, total)
    return step


def find_sites(
    model: onnx.ModelProto, shapes: dict | None = None, measured: dict | None = None
) -> tuple[list[Site], list[Refusal]]:
    """Every upsampling site of the main graph, parsed, plus refusals (subgraph sites included).

    ``measured`` holds tensor shapes observed in onnxruntime with the graph inputs at the
    ``shapes`` given (or as declared).  They override inferred shapes where the model declares
    static input shapes; otherwise they only serve sites that need a concrete length.
    """
    index = GraphIndex(model, infer_static_shapes(model))
    measured = measured or {}
    declared_static = all(
        d.HasField("dim_value") and d.dim_value > 0
        for vi in feed_inputs(model) for d in vi.type.tensor_type.shape.dim
    )  # --shape must then agree with the declared shape (make_inputs checks)
    if declared_static:
        index.static_shapes.update(measured)
    else:
        index.assumed_shapes = {**(infer_static_shapes(model, shapes) if shapes else {}), **measured}
    sites, refusals = [], []
    claimed: dict[str, str] = {}  # tensor -> site that removes its producer
    for node in model.graph.node:
        bad = attribute_problem(node, index.opset)
        if bad and node.op_type in SITE_OPS:
            refusals.append(Refusal(node.name or node.output[0], SITE_OPS[node.op_type],
                                    f"{node.op_type} '{node.name}': {bad}"))
            continue
        for parser in PARSERS:
            try:
                result = parser.parse(node, index) if parser.matches(node, index) else None
            except Exception as exc:  # a construct the parser did not foresee: refuse, never crash or guess
                result = Refusal(node.name or node.output[0], parser.SOURCE,
                                 f"{node.op_type} '{node.name}': not understood ({type(exc).__name__}: "
                                 f"{first_line(exc)}); left unchanged")
            if result is not None:
                if isinstance(result, Site) and (bad := axis_limit_problem(result.axes) or _non_finite(result)):
                    result = Refusal(result.node, result.source, f"{result.source} '{result.node}': {bad}")
                if isinstance(result, Site) and not declared_static and None in result.input_lengths:
                    result = _with_nominal_lengths(result, parser, node, index, index.assumed_shapes)
                if isinstance(result, Site):
                    result = _check_weight_origin(result, index)
                if isinstance(result, Site):
                    clash = sorted({claimed[t] for t in result.replaced_outputs if t in claimed})
                    if clash:
                        result = Refusal(result.node, result.source, f"{result.source} '{result.node}': "
                                         f"overlaps site {', '.join(clash)} (one node cannot be rewritten twice)")
                    else:
                        claimed.update((t, result.node) for t in result.replaced_outputs)
                (sites if isinstance(result, Site) else refusals).append(result)
                break
        for attr in node.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                refusals.extend(_subgraph_refusals(g, f"a subgraph of {node.op_type} '{node.name}'", model))
    for function in model.functions:
        body = onnx.helper.make_graph(list(function.node), function.name, [], [])
        refusals.extend(_subgraph_refusals(body, f"model-local function '{function.domain}.{function.name}'", model))
    return sites, refusals


def _with_nominal_lengths(site: Site, parser, node, index: GraphIndex, measured: dict) -> Site:
    """``site`` of a model with symbolic dims, with the lengths (and source MACs) that the parser reads
    when the measured shapes count as static: MAC counts and layout choices use them, the emission
    stays symbolic (sites.priced)."""
    if not measured:
        return site
    symbolic = index.static_shapes
    index.static_shapes = {**symbolic, **measured}
    try:
        costed = parser.parse(node, index)
    except Exception:  # costing is best effort: the symbolic parse stands
        costed = None
    finally:
        index.static_shapes = symbolic
    if not isinstance(costed, Site) or None in costed.input_lengths or costed.axes != site.axes:
        return site
    return dataclasses.replace(site, nominal_lengths=costed.input_lengths,
                               source_macs=site.source_macs if site.source_macs is not None else costed.source_macs)





def _non_finite(site: Site) -> str | None:
    """Weights with inf/NaN: the forms differ on them (a padding tap gives 0*inf = NaN where the
    source has none), so no rewrite is exact."""
    for what, values in (("weight", site.weight), ("bias", site.bias), ("bias", site.phase_bias)):
        if values is not None and np.issubdtype(values.dtype, np.floating):
            bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
            if bad:
                return (f"its {what} has {bad} non-finite values (inf/NaN); the forms differ on them "
                        "(0*inf = NaN), so no rewrite is exact")
    return None


def _check_weight_origin(site: Site, index: GraphIndex) -> Site | Refusal:
    """Say which weights were computed in the graph; refuse integer (QDQ) weights a parser could
    only turn into floats: the rewrite must keep a quantized model quantized."""
    kept = {q.node for q in (site.weight_quant, site.bias_quant) if q is not None}
    dq = next((n for n in index.dequantize_nodes(site.weight_tensors) if n not in kept), None)
    if dq is not None:
        return Refusal(site.node, site.source, f"{site.source} '{site.node}': weights come through DequantizeLinear "
                       f"'{dq}' and the {site.source} form cannot keep them quantized (the rewrite would change "
                       "their integer values)")
    folded = sorted({op for t in site.weight_tensors for op in index.folded.get(t, ())})
    if folded:
        site = dataclasses.replace(site, notes=site.notes + (
            f"weights computed in the graph by {', '.join(folded)} were evaluated as constants",))
    return site


#: op types that identify an upsampling site wherever they are: in a subgraph they are refused by
#: name even where no parser can read them there (outer-scope weights)
UPSAMPLING_OPS = frozenset(OP_FORMS)


def _subgraph_refusals(graph: onnx.GraphProto, where: str, model: onnx.ModelProto | None = None) -> list[Refusal]:
    """Upsampling nodes inside a subgraph or function body: left alone, each with the reason.  Every
    parser looks at the subgraph through its own GraphIndex (a Resize -> Conv in an If branch is found
    as in the main graph); an upsampling op no parser reads there is refused by name too."""
    index = _subgraph_index(graph, model)
    nodes = list(graph.node)
    matched = {}  # position -> source (positions: protobuf wrappers have no stable identity)
    for i, n in enumerate(nodes):
        matched[i] = next((p.SOURCE for p in PARSERS if _matches_quietly(p, n, index)), None)
    read_by_sites = {t for i, n in enumerate(nodes) if matched[i] for t in n.input}  # the Resize of a Resize -> Conv
    found, named = [], set()
    for i, node in enumerate(nodes):
        name = node.name or (node.output[0] if node.output else node.op_type)
        source = matched[i]
        if source is None and node.op_type in UPSAMPLING_OPS and node.domain in ("", "ai.onnx") \
                and not read_by_sites.intersection(node.output):
            source = OP_FORMS[node.op_type]
        if source is not None and name not in named:
            named.add(name)
            found.append(Refusal(name, source, f"{node.op_type} '{name}': inside {where}; "
                                 "subgraphs and functions are not rewritten (left unchanged)"))
        for attr in node.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                found.extend(_subgraph_refusals(g, where, model))
    return found


def _subgraph_index(graph: onnx.GraphProto, model: onnx.ModelProto | None) -> GraphIndex | None:
    """A GraphIndex of ``graph`` alone (the outer model's opsets), or None where it cannot be built."""
    sub = onnx.ModelProto()
    if model is not None:
        sub.ir_version = model.ir_version
        sub.opset_import.extend(model.opset_import)
    sub.graph.node.extend(graph.node)
    sub.graph.input.extend(graph.input)
    sub.graph.output.extend(graph.output)
    sub.graph.value_info.extend(graph.value_info)
    sub.graph.initializer.extend(graph.initializer)
    try:
        return GraphIndex(sub)
    except Exception:
        return None


def _matches_quietly(parser, node, index) -> bool:
    try:
        return bool(parser.matches(node, index))
    except Exception:  # outer-scope tensors the subgraph's index cannot see
        return False


@cli_names
@guard_memory
def convert(
    model,
    to: str = "subpixel",
    output: str | os.PathLike | None = None,
    only=None,
    sources=None,
    inputs: dict[str, np.ndarray] | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    verify: bool = True,
    seed: int = 0,
    also_writes=(),
    memory_budget: int | None = None,
    time_budget: float | None = None,
    progress=None,
    provider: str = "CPUExecutionProvider",
    profile=None,
    lazy_weights: bool = False,
    d2s_mode: str = "auto",
    runtime: str = "onnxruntime",
) -> ConvertResult:
    """Rewrite every upsampling site of ``model`` (a path, an ``onnx.ModelProto`` or an
    ``onnx_graphsurgeon.Graph``) into form ``to``; returns a ``ConvertResult`` (``.model``, ``.report``,
    ``.output``, ``.to_json()``, ``.graph()`` for onnx-graphsurgeon).

    >>> result = convert("models/dcgan_stack.onnx", to="convtranspose")
    >>> result.report.verification, len(result.report.rewritten)
    ('passed', 0)

    ``shapes`` maps input names to sizes, as tuples or as ``--shape`` strings (``"1x3x64x64"``,
    ``"1,3,64,64"``, ``"[1,3,64,64]"``); symbolic dims it does not cover get sizes chosen for the
    reference run (report.chosen_shapes).

    Verifies in onnxruntime unless ``verify=False`` and writes ``output`` only when given and
    verification passed.  ``only`` restricts to sites by node name, ``sources`` to sites by
    source form (``SOURCES``).  ``also_writes`` names other files the caller will write (a report):
    they are checked against the input and output files.  ``memory_budget`` (bytes; default half
    of physical memory) refuses a verification whose estimated memory exceeds it before anything
    runs; ``time_budget`` (seconds) stops verification that runs longer (budget.py).  ``progress``,
    if given, is called as ``progress(stage, done, total)`` as work advances (the CLI's progress
    line).  ``to="fastest"`` times, per site, the original and every exact form alone on the site's
    captured input with onnxruntime ``provider`` (or ``runtime="openvino"``, installed in its own venv:
    compilers.py) and keeps the fastest (fastest.py).  ``profile`` (a
    name, a file or a ``profile.Profile``; ``to`` is then ignored) rewrites only the sites the target
    cannot run, each into the cheapest exact form it can run, and checks the result (profile.py).
    ``lazy_weights`` (a path): big weights stay in the input's files (its external data, or the model
    file itself) and are read only when needed, then copied file to file when saved: memory holds
    them once, in onnxruntime (model_io.is_lazy); ``.model`` then refers to those files.  ``d2s_mode``: the sub-pixel layout (README, to_subpixel:
    ``auto``, ``transpose``, ``CRD``, ``DCR``).  Raises UsageError, InvalidModelError,
    VerificationImpossible, ResourceLimit or VerificationFailed (with ``.report``).
    """
    t0 = time.perf_counter()
    opts = _options(to, output, only, sources, inputs, shapes, atol, rtol, verify, seed, also_writes, memory_budget,
                    time_budget, provider, profile, lazy_weights, d2s_mode, runtime)
    model, label, src = _open(model, lazy=opts.lazy_weights)
    external = src is not None and bool(src[1])
    if opts.output is not None or opts.also_writes:
        check_output_path(opts.output, [src[0], *src[1]] if src else [], external, list(opts.also_writes))
    report = Report(model=label, target=opts.strategy.target, versions=_versions())
    report.ops_before = op_census(model)
    report.timings["load_s"] = time.perf_counter() - t0
    stages, deadline = _Stages(report.timings, progress), budget_time(opts.time_budget)
    with stages("reference_run", "running the original model"):
        ref = _reference(model, opts, report, deadline, label)
    with stages("rewrite"):
        ctx = Context(model, Namer(model), default_opset(model), opts.budget, ref.measured, ref.captured, deadline)
        rewrite = _decide_sites(model, opts, ref, ctx, report, stages.step, label)
    site_failure = _check_sites(model, rewrite, ref, opts, ctx.opset, report, stages, deadline, label)
    rewrite.release(ref)  # what only the per-site checks read: the whole-model check runs without it
    with stages("splice"):
        _apply(model, rewrite, opts, ref, report)
    _check_model(model, rewrite, ref, opts, report, stages, deadline, label, site_failure)
    del ctx, ref, rewrite  # activations and parsed weights: the save needs the model only
    release_memory()
    if opts.output is not None:
        with stages("save", "saving"):
            report.written = [str(p) for p in save_model(model, opts.output, external=external)]
    report.timings["total_s"] = time.perf_counter() - t0
    return ConvertResult(model=model, report=report, output=opts.output)


@dataclass(frozen=True)
class Options:
    """The checked choices of one convert call (its parameters; ``strategy`` decides each site)."""

    strategy: object  # strategies.FixedForm, Fastest or ForProfile
    output: Path | None
    only: frozenset | None
    sources: frozenset | None
    inputs: dict | None
    shapes: dict | None
    atol: float | None
    rtol: float | None
    verify: bool
    seed: int
    also_writes: tuple
    budget: int  # memory budget in bytes
    time_budget: float | None
    lazy_weights: bool


def _options(to, output, only, sources, inputs, shapes, atol, rtol, verify, seed, also_writes, memory_budget,
             time_budget, provider, profile, lazy_weights, d2s_mode, runtime="onnxruntime") -> Options:
    """convert's parameters, checked: UsageError names the option at fault."""
    if runtime != "onnxruntime" and to != "fastest":
        raise UsageError(f"--runtime {runtime}: only --to fastest times the forms (in onnxruntime by default)")
    timer = runtime_timer(runtime)
    if to not in TARGETS:
        raise UsageError(f"--to {to!r}: expected one of {', '.join(TARGETS)}")
    if d2s_mode not in SUBPIXEL_LAYOUTS:
        raise UsageError(f"--d2s-mode {d2s_mode!r}: expected one of {', '.join(SUBPIXEL_LAYOUTS)}")
    if provider not in onnxruntime.get_available_providers():
        raise UsageError(f"--provider {provider}: not available in this onnxruntime "
                         f"({', '.join(onnxruntime.get_available_providers())})")
    _check_numbers(atol, rtol, seed)
    unknown = sorted(set(sources or ()) - set(SOURCES))
    if unknown:
        raise UsageError(f"--from {', '.join(unknown)}: expected among {', '.join(SOURCES)}")
    if profile is not None and not isinstance(profile, Profile):
        profile = load_profile(profile)
    return Options(
        strategy=strategy_for(to, profile, provider, d2s_mode, timer), output=None if output is None else Path(output),
        only=frozenset(only) if only else None, sources=frozenset(sources) if sources else None, inputs=inputs,
        shapes=normalize_shapes(shapes), atol=atol, rtol=rtol, verify=bool(verify), seed=seed,
        also_writes=tuple(Path(p) for p in also_writes),
        budget=default_memory_budget() if memory_budget is None else int(memory_budget), time_budget=time_budget,
        lazy_weights=lazy_weights)


class _Stages:
    """Stage timings of one run (``timings["<stage>_s"]``) and the progress line (``step``)."""

    def __init__(self, timings: dict, progress=None):
        self.timings = timings
        self.step = _announcing(progress or (lambda stage, done, total: None))

    @contextlib.contextmanager
    def __call__(self, name: str, announce: str | None = None):
        if announce is not None:
            self.step(announce, 0, 1)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[f"{name}_s"] = time.perf_counter() - t


@dataclass
class _Reference:
    """The reference run of the original model, and the sizes it ran at."""

    feeds: dict | None
    outputs: dict | None
    captured: dict  # site inputs/outputs (and the feeds)
    measured: dict  # tensor -> shape: measured, or inferred where no run was needed
    shapes: dict | None  # the input shapes sites are read at: given, plus those chosen for symbolic dims
    second: tuple | str | None = None  # (feeds, outputs) at a second size, or why not


def _reference(model, opts: Options, report: Report, deadline, label: str) -> _Reference:
    """Run the original (or, where no check needs a run, take onnx shape inference): feeds, outputs,
    captured site tensors, and sizes chosen for symbolic dims (reported)."""
    required = opts.verify or opts.strategy.needs_run
    inferred = None if opts.verify or opts.strategy.wants_run else _inferred_shapes_suffice(model, opts.shapes)
    try:
        with deadline:
            if inferred is not None:  # --no-verify: onnx shape inference gives what the run would measure
                input_shapes(model, opts.shapes, opts.inputs)  # a --shape that disagrees with the model is an error
                report.notes.append("no reference run (--no-verify): site shapes from onnx shape inference, "
                                    "which agrees with onnxruntime for this model's ops")
                return _Reference(None, None, {}, {k: v for k, v in inferred.items() if None not in v}, opts.shapes)
            feeds, outputs, captured, choice = _measure(model, opts.inputs, opts.shapes, opts.seed, required=required,
                                                        budget=opts.budget)
            shapes = opts.shapes
            if choice is not None:
                report.chosen_shapes = {k: list(v) for k, v in choice.shapes.items()}
                report.shape_choice = choice.reason
                shapes = {**(shapes or {}), **choice.shapes}
            second = _second_size(model, feeds, opts.seed, opts.budget) if opts.verify else None
    except VerificationImpossible as exc:
        if opts.strategy.needs_run and not opts.verify:  # --no-verify does not help: the forms run in onnxruntime
            raise VerificationImpossible(f"{label}: --to fastest times the forms in onnxruntime, which cannot run "
                                         f"this model: {_reason(exc)}") from None
        raise VerificationImpossible(f"{label}: {exc}") from None
    except (UsageError, ResourceLimit) as exc:
        raise type(exc)(f"{label}: {exc}") from None
    return _Reference(feeds, outputs, captured, {k: tuple(v.shape) for k, v in captured.items()}, shapes, second)


@dataclass
class _Rewrite:
    """What the decided sites replace: emissions by site output, weights that may become unused, the
    summed terms of the rewritten sites (the tolerance), and per rewritten site what verification needs."""

    replacements: dict = dataclasses.field(default_factory=dict)
    candidates: set = dataclasses.field(default_factory=set)
    terms: int = 0
    done: list = dataclasses.field(default_factory=list)  # (site, emission, SiteResult)
    noise_sites: list = dataclasses.field(default_factory=list)  # (site output, rounding bound): _downstream_noise

    def release(self, ref: _Reference) -> None:
        """Keep of the per-site material only what the whole-model check reads (the sites' rounding
        bounds), and drop the captured activations: the peak memory of that check is then the model's."""
        self.noise_sites = _noise_sites(self.done, ref.captured)
        self.done = [(None, None, result) for _, _, result in self.done]
        ref.captured.clear()  # the dict strategies read too (Context.captured)
        release_memory()


def _selected_sites(model, opts: Options, ref: _Reference) -> tuple[list[Site], list[Refusal]]:
    """The sites and refusals of ``model`` that ``--only`` / ``--from`` select."""
    sites, refusals = find_sites(model, ref.shapes, ref.measured)
    if opts.only:
        known = {s.node for s in sites} | {r.node for r in refusals}
        missing = sorted(opts.only - known)
        if missing:
            raise UsageError(f"--only: no upsampling site named {', '.join(repr(m) for m in missing)} "
                             f"(sites: {', '.join(sorted(known)) or 'none'})")
        sites = [s for s in sites if s.node in opts.only]
        refusals = [r for r in refusals if r.node in opts.only]
    if opts.sources:
        sites = [s for s in sites if s.source in opts.sources]
        refusals = [r for r in refusals if r.source in opts.sources]
    return sites, refusals


def _decide_sites(model, opts: Options, ref: _Reference, ctx: Context, report: Report, step, label: str) -> _Rewrite:
    """Each selected site through the strategy: rewritten, kept or refused, each in the report."""
    sites, refusals = _selected_sites(model, opts, ref)
    rewrite = _Rewrite()
    for i, site in enumerate(sites):
        step("rewriting sites", i, len(sites))
        if opts.strategy.stage != "rewriting sites":
            step(opts.strategy.stage, i, len(sites))
        try:
            decision = opts.strategy.decide(site, ctx)
        except ResourceLimit as exc:
            raise ResourceLimit(f"{label}: {exc}") from None
        if decision.action == REFUSE:
            refusals.append(Refusal(site.node, site.source, decision.reason))
        elif decision.action == KEEP_SITE:
            report.sites.append(SiteResult(node=site.node, source=site.source, target=site.source, status="skipped",
                                           reason=decision.reason, params=site.params(),
                                           timings_ms=decision.timings_ms, chosen=decision.chosen))
        else:
            report.sites.append(_rewritten(site, decision, rewrite, opts.verify))
            sites[i] = None  # nothing but verification (rewrite.done) reads the parsed weights again
    _report_refusals(model, refusals, opts, report)
    return rewrite


def _rewritten(site: Site, decision: Decision, rewrite: _Rewrite, verify: bool) -> SiteResult:
    rewrite.replacements[site.output] = (site.replaced_outputs, decision.emission)
    rewrite.candidates.update(site.weight_tensors)
    rewrite.terms += site.terms_per_output
    result = SiteResult(
        node=site.node, source=site.source, target=decision.form, status="rewritten", form=decision.description,
        params=site.params(), macs_before=site.source_macs, macs_after=decision.macs,
        notes=list(site.notes) + ([decision.reason] if decision.reason else []),
        timings_ms=decision.timings_ms, chosen=decision.chosen)
    if verify:
        rewrite.done.append((site, decision.emission, result))
    return result


def _report_refusals(model, refusals: list[Refusal], opts: Options, report: Report) -> None:
    """Refusals into the report; a DepthToSpace / Resize / ConvTranspose no parser could read stays as it
    is under ``--to`` its own form: skipped, already in form."""
    ops = {n.name or (n.output[0] if n.output else ""): n.op_type for n in model.graph.node}
    form = opts.strategy.target if opts.strategy.keeps_unparsed_in_form else None
    for r in refusals:
        if form is not None and ops.get(r.node) in FORM_OPS.get(form, ()):
            report.sites.append(SiteResult(node=r.node, source=r.source, target=form, status="skipped",
                                           reason=f"already in form {form} (not parsed: {r.reason})"))
        else:
            report.sites.append(SiteResult(node=r.node, source=r.source, target=None, status="refused",
                                           reason=r.reason))


def _check_sites(model, rewrite: _Rewrite, ref: _Reference, opts: Options, opset: int, report: Report, stages,
                 deadline, label: str) -> str | None:
    """Per-site verification (site_check.py), before the splice; the failure text, or None.  Both checks
    run, so that the report has both, then either failure stops saving."""
    if not (opts.verify and rewrite.done):
        return None
    with stages("verify_sites"):
        try:
            with deadline:
                _verify_sites(model, rewrite.done, ref.feeds, ref.captured, opts.atol, opts.rtol, opset, opts.budget,
                              report, stages.step)
        except (ResourceLimit, VerificationImpossible) as exc:
            raise type(exc)(f"{label}: {exc}") from None
        except VerificationFailed:
            return report.verification  # "failed per site: ..."
    return None


def _apply(model, rewrite: _Rewrite, opts: Options, ref: _Reference, report: Report) -> None:
    """Splice the emissions in, drop what nothing reads any more, and let the strategy look at the result."""
    splice(model, rewrite.replacements)
    drop_unused(model, rewrite.candidates)
    if model.ir_version < 4:
        _list_initializers_as_inputs(model)
    report.ops_after = op_census(model)
    opts.strategy.finish(model, report, ref.measured)


def _check_model(model, rewrite: _Rewrite, ref: _Reference, opts: Options, report: Report, stages, deadline,
                 label: str, site_failure: str | None) -> None:
    """The whole rewritten model against the reference outputs (and at the second size); with nothing
    rewritten the model is unchanged and not compared with itself.  A failure while the input's external
    data changed under the run is InputChanged (exit 2): it says nothing about the rewrite."""
    try:
        _compare_model(model, rewrite, ref, opts, report, stages, deadline, label, site_failure)
    except VerificationFailed:
        check_sources(model)
        raise


def _compare_model(model, rewrite: _Rewrite, ref: _Reference, opts: Options, report: Report, stages, deadline,
                   label: str, site_failure: str | None) -> None:
    if not opts.verify:
        report.verification = "skipped (--no-verify): the rewritten model was NOT checked"
        return
    if not rewrite.done:
        report.verified, report.verification = True, "passed"
        report.tolerance = "none needed: nothing was rewritten, so the model is unchanged and was not compared with itself"
        return
    with stages("verify", "verifying the whole model"):
        try:
            check_memory(model, {k: v.shape for k, v in ref.feeds.items()}, set(), opts.budget,
                         "running the rewritten model")
            with deadline:
                _verify(ref.outputs, ref.feeds, model, report, opts.atol, opts.rtol, rewrite.terms, ref.second,
                        rewrite.noise_sites)
        except ResourceLimit as exc:
            raise ResourceLimit(f"{label}: {exc}") from None
        except VerificationFailed:
            if site_failure is None:
                raise
            site_failure += f"; whole model {report.verification}"
    if site_failure is not None:
        report.verified = False
        report.verification = site_failure
        raise VerificationFailed(f"{label}: verification {site_failure}; nothing written", report)



#: per-site verification runs up to this many sites (replacement and magnitude) in one onnxruntime
#: session, with at most this many bytes of their weights: creating a session costs a few ms, which
#: dominated with two sessions a site (488 MB, 240 sites: 480 sessions, 1.2 s)
SITES_PER_SESSION = 64
SESSION_WEIGHT_BYTES = 64 << 20


def _verify_sites(model, done, feeds, captured, atol, rtol, opset, budget, report, step=None) -> None:
    """Run each replacement alone on the activation that entered the site in the original model
    and compare with the site's original output (site_check.py); VerificationFailed names the
    sites that differ.  ``model`` is still the original here: what is not captured yet is tapped
    in one more run.  Sites run side by side in a few sessions (SITES_PER_SESSION); a session that
    fails is retried site by site, so that the failure names its site."""
    wanted = {t for site, emission, _ in done for t in [site.output, *outer_inputs(emission)]}
    initializers = {t.name for t in model.graph.initializer}
    missing = sorted(t for t in wanted if t not in captured and t not in initializers)
    if missing:
        check_memory(model, {k: v.shape for k, v in feeds.items()}, set(missing), budget,
                     "capturing the activations of the sites")
        captured = {**captured, **run_with_taps(model, feeds, missing)}
    namer = Namer(model)  # the magnitude models' names: unique beside the replacements' too
    for _, emission, _ in done:
        namer.taken.update(o for n in emission.nodes for o in (*n.output, n.name))
        namer.taken.update(t.name for t in emission.initializers)
    checks, deferred = [], {}  # checks: (site, emission, result, magnitude (emission, output) or None)
    for site, emission, result in done:
        magnitude = magnitude_emission(site, namer, opset) if site.input in captured and rtol is None else None
        if magnitude is not None and lower_bound_applies(site, captured[site.output],
                                                         output_quantization(site, emission)):
            deferred[id(result)] = magnitude  # run only if the lower bound of |W|*|x| is not enough
            magnitude = None
        checks.append((site, emission, result, magnitude))
    failures: list[str] = []
    retry = _check_site_batches(model, checks, captured, atol, rtol, deferred, failures, step)
    if retry:  # sites whose error the lower bound does not cover: now with their magnitude models
        _check_site_batches(model, retry, captured, atol, rtol, {}, failures, step)
    if failures:
        report.verification = "failed per site: " + "; ".join(failures)
        raise VerificationFailed(f"{report.model}: verification {report.verification}; nothing written", report)


def _check_site_batches(model, checks, captured, atol, rtol, deferred, failures, step) -> list:
    """Run ``checks`` in batches (_site_batches) and compare each replacement with the site's
    captured output; a failure is appended to ``failures``.  A site in ``deferred`` (its magnitude
    model not run) is compared against a lower bound of |W|*|x| first: where that is not enough, it
    is returned, with its magnitude model, to be checked again."""
    retry, finished = [], 0
    for batch in _site_batches(checks):
        if step is not None:
            step("verifying sites", finished, len(checks))
        finished += len(batch)
        outputs = _run_sites(model, batch, captured)
        # a batch that fails runs again site by site, so that the failure names its site
        groups = [(batch, outputs)] if not isinstance(outputs, str) or len(batch) == 1 else \
            [([check], _run_sites(model, [check], captured)) for check in batch]
        for group, got in groups:
            if isinstance(got, str):
                failures.append(f"site '{group[0][0].node}': onnxruntime cannot run its replacement: {got}")
                continue
            for site, emission, result, magnitude in group:
                quant, ref = output_quantization(site, emission), captured[site.output]
                if id(result) in deferred:
                    verdict = compare_site(site, ref, got[site.output], magnitude_lower_bound(site, ref),
                                           atol, rtol, quant, LOWER_BOUND_TEXT)
                    if not verdict.ok:
                        retry.append((site, emission, result, deferred[id(result)]))
                        continue
                else:
                    mag = got[magnitude[1]] if magnitude is not None else None
                    verdict = compare_site(site, ref, got[site.output], mag, atol, rtol, quant)
                result.max_abs_error, result.max_rel_error = verdict.max_abs_error, verdict.max_rel_error
                result.ratio, result.tolerance = verdict.ratio, verdict.tolerance
                if not verdict.ok:
                    failures.append(f"site '{site.node}' ({site.source} -> {result.target}): max abs error "
                                    f"{verdict.max_abs_error:.3g} is {verdict.ratio:.3g}x its tolerance "
                                    f"({verdict.tolerance})")
    return retry


def _site_batches(checks):
    """``checks`` in groups of at most SITES_PER_SESSION sites and SESSION_WEIGHT_BYTES of weights,
    none reading a tensor that another of its group produces (each must read the captured original)."""
    batches, current, size, produced, read = [], [], 0, set(), set()
    for check in checks:
        emissions = [check[1]] + ([check[3][0]] if check[3] is not None else [])
        nbytes = sum(len(t.raw_data) for e in emissions for t in e.initializers)
        reads = {n for e in emissions for n in outer_inputs(e)}
        makes = {o for e in emissions for n in e.nodes for o in n.output}
        if current and (len(current) >= SITES_PER_SESSION or size + nbytes > SESSION_WEIGHT_BYTES
                        or reads & produced or makes & read):
            batches.append(current)
            current, size, produced, read = [], 0, set(), set()
        current.append(check)
        size += nbytes
        produced |= makes
        read |= reads
    return batches + ([current] if current else [])


def _run_sites(model, batch, captured) -> dict[str, np.ndarray] | str:
    """The replacements (and magnitude models) of ``batch`` in one session, on the captured activations;
    onnxruntime's first line of error where it cannot run them."""
    emissions, outputs = [], []
    for site, emission, _, magnitude in batch:
        emissions.append(emission)
        outputs.append(site.output)
        if magnitude is not None:
            emissions.append(magnitude[0])
            outputs.append(magnitude[1])
    values = {n: captured[n] for e in emissions for n in outer_inputs(e) if n in captured}
    try:
        return run_rewritten(sites_model(model, emissions, values, outputs), values)
    except UprewriteError:
        raise
    except Exception as exc:
        return _first_line(exc)


def _list_initializers_as_inputs(model: onnx.ModelProto) -> None:
    """IR < 4 requires every initializer to be a graph input too: list the new weights as the old
    exporters did."""
    listed = {i.name for i in model.graph.input}
    for t in model.graph.initializer:
        if t.name not in listed:
            model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


def _inferred_shapes_suffice(model, shapes) -> dict | None:
    """Whether onnx shape inference gives every length an onnxruntime run would measure for the
    sites: each graph input has a static shape (declared or from ``shapes``), every node is one of
    TRUSTED_SHAPE_OPS (no ConvTranspose with auto_pad SAME or output_shape, where the two disagree,
    DESIGN.md §3; no Resize by sizes; no subgraphs), and inference, ignoring the shapes the graph outputs declare, gives
    a static shape to every tensor the parsers read.  Returns the inferred shapes then, else None."""
    for vi in feed_inputs(model):
        t = vi.type.tensor_type
        if shapes and vi.name in shapes:
            continue
        if not (vi.type.HasField("tensor_type") and t.HasField("shape")) or \
                not all(d.HasField("dim_value") and d.dim_value > 0 for d in t.shape.dim):
            return None
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in TRUSTED_SHAPE_OPS:
            return None
        attrs = {a.name: a for a in node.attribute}
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in attrs.values()):
            return None
        if node.op_type == "ConvTranspose" and (
                "output_shape" in attrs or ("auto_pad" in attrs and attrs["auto_pad"].s in (b"SAME_UPPER", b"SAME_LOWER"))):
            return None
        if "ceil_mode" in attrs and attrs["ceil_mode"].i:
            return None
        if node.op_type == "Resize" and (len(node.input) > 3 and node.input[3] or "axes" in attrs
                                         or "keep_aspect_ratio_policy" in attrs):
            return None  # sizes (and opset 18's axes / aspect policy): the lengths decide the scales
    static = infer_static_shapes(model, shapes, declared_outputs=False)
    ok = all(t in static and None not in static[t] for t in _site_taps(model, GraphIndex(model)))
    return static if ok else None


#: ops whose onnx shape inference gives the lengths onnxruntime computes (ConvTranspose without
#: auto_pad SAME or output_shape, pools without ceil_mode): --no-verify trusts inference for a model
#: made of these only; any other op costs the reference run
TRUSTED_SHAPE_OPS = frozenset("""
    Abs Add And AveragePool BatchNormalization Cast Ceil Clip Concat Constant ConstantOfShape Conv ConvTranspose
    DepthToSpace DequantizeLinear Div Dropout Elu Equal Erf Exp Expand Flatten Floor Gather Gelu Gemm
    GlobalAveragePool GlobalMaxPool Greater GroupNormalization HardSigmoid HardSwish Identity
    InstanceNormalization LayerNormalization LeakyRelu Less Log LogSoftmax MatMul Max MaxPool Min Mish Mul Neg
    Not Or Pad Pow PRelu QuantizeLinear Reciprocal Relu Reshape Resize Selu Shape Sigmoid Sign Sin Slice Softmax
    Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tanh Tile Transpose Unsqueeze Upsample Where
""".split())


def _site_taps(model, index) -> list[str]:
    """Tensors whose shapes the parsers read, and the matched nodes' outputs (what per-site
    verification compares)."""
    taps = set()
    for node in model.graph.node:
        if attribute_problem(node, index.opset):
            continue
        for parser in PARSERS:
            try:
                if parser.matches(node, index):
                    taps.update(t for t in [*parser.taps(node, index), *node.output] if t)
            except Exception:  # find_sites refuses such a node with the reason
                pass
    return sorted(taps)


def _measure(model, inputs, shapes, seed, required: bool, budget: int | None = None):
    """One onnxruntime run of the original: ``(feeds, reference outputs, captured tensors, ShapeChoice
    or None)``, the captured tensors being the true shapes and values of site inputs and outputs.

    onnx shape inference disagrees with onnxruntime after some ConvTranspose attribute
    combinations (DESIGN.md §3), and a wrong length would give a later site wrong crops or
    reshapes, so site input shapes are measured.  Symbolic input dims that ``shapes`` / ``inputs``
    do not cover get sizes chosen here (verify.shape_candidates): the first that runs.  Without
    verification the run is best effort.
    """
    taps = _site_taps(model, GraphIndex(model))
    candidates, symbols = shape_candidates(model, shapes, inputs)
    tried, fallback = [], None
    for attempt in candidates:
        if fallback is not None and _elements(attempt) <= _elements(fallback[4]):
            continue  # after a size whose site inputs are shorter than their kernels: only larger ones
        try:
            check_memory(model, input_shapes(model, attempt, inputs), set(taps), budget, "running the original model",
                         compared=required)
            feeds = make_inputs(model, attempt, inputs, seed)
            outputs = run_with_taps(model, feeds, taps)
        except (VerificationImpossible, ResourceLimit) as exc:
            if not symbols:
                if required:
                    raise
                return None, None, {}, None
            tried.append(f"{_shape_text(attempt, shapes, inputs)}: {_reason(exc)}")
            continue
        except UprewriteError:
            if required:
                raise
            return None, None, {}, None
        declared = {o.name for o in model.graph.output}
        reference = {k: v for k, v in outputs.items() if k in declared}
        captured = {**{k: v for k, v in outputs.items() if k in taps}, **feeds}
        choice = None
        if symbols:
            short = _short_site_inputs(model, captured)
            if short and fallback is None:  # prefer a size at which every site input spans its kernel
                fallback = (feeds, reference, captured, tried[:], attempt)
                tried.append(f"{_shape_text(attempt, shapes, inputs)}: runs, but {short}")
                continue
            chosen = {k: tuple(v) for k, v in attempt.items() if k not in (shapes or {})}
            choice = ShapeChoice(chosen, symbols, tuple(tried))
        return feeds, reference, captured, choice
    if fallback is not None:  # no larger size runs: the one that ran, with its short site inputs
        feeds, reference, captured, before, attempt = fallback
        chosen = {k: tuple(v) for k, v in attempt.items() if k not in (shapes or {})}
        return feeds, reference, captured, ShapeChoice(chosen, symbols, tuple(before))
    message = (f"{symbolic_dims_text(model, shapes, inputs)} symbolic: onnxruntime runs the original model at none "
               f"of the sizes tried ({'; '.join(tried)}); pass --shape NAME=DIMS, e.g. --shape "
               f"{_example_shape(model, shapes, inputs)}")
    if required:
        raise VerificationImpossible(message)
    return None, None, {}, None


def _elements(shapes: dict) -> int:
    return sum(math.prod(v) for v in shapes.values())


def _short_site_inputs(model, captured: dict) -> str | None:
    """Which captured input of a Conv / ConvTranspose is shorter than its kernel on some axis (a size
    that exercises only part of the kernel), or None."""
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose") or len(node.input) < 2:
            continue
        x, kernel = captured.get(node.input[0]), weights.get(node.input[1], ())[2:]
        if x is not None and kernel and len(x.shape) == len(kernel) + 2 and \
                any(n < k for n, k in zip(x.shape[2:], kernel)):
            return f"'{node.input[0]}' {list(x.shape[2:])} is shorter than the kernel {list(kernel)} of '{node.name}'"
    return None


def _example_shape(model, shapes, inputs) -> str:
    vi = next(vi for vi in feed_inputs(model) if vi.name not in (shapes or {}) and vi.name not in (inputs or {}))
    return f"{vi.name}=" + "x".join(str(d.dim_value) if d.HasField("dim_value") else f"<{d.dim_param or '?'}>"
                                    for d in vi.type.tensor_type.shape.dim)


def _shape_text(attempt, shapes, inputs) -> str:
    return ", ".join(f"{k}={_dims(v)}" for k, v in attempt.items() if k not in (shapes or {}) and k not in (inputs or {}))


def _reason(exc: Exception) -> str:
    """An error's message without the advice that does not apply to a size being tried."""
    return str(exc).split(" (use --no-verify")[0]


#: the second-size check of a model with symbolic input dims is skipped above this many input elements
SECOND_SIZE_MAX_ELEMENTS = 1 << 24


#: sizes tried for the second-size check after "every symbolic dim doubled" fails
SECOND_SIZE_TRIES = 3


def _second_size(model, feeds, seed, budget: int | None = None):
    """``(feeds, reference outputs)`` at a second input size for models with symbolic input dims,
    so the rewrite is checked not to depend on the size it was verified at: every symbolic dim
    doubled (a size the model's own divisibility constraints still accept), else batch-like leading
    dims doubled with the other symbolic dims at another of CHOSEN_SIZES; a string says why not."""
    if not feeds:
        return None
    attempts = _second_shapes(model, feeds)
    if not attempts:
        return None
    failed = []
    for shapes in attempts:
        at = ", ".join(f"{k}={_dims(s)}" for k, s in shapes.items())
        if sum(int(np.prod(s)) for s in shapes.values()) > SECOND_SIZE_MAX_ELEMENTS:
            failed.append(f"{at}: over 2^24 input elements")
            continue
        try:
            check_memory(model, shapes, set(), budget, "the second input size", compared=True)
        except ResourceLimit as exc:
            failed.append(f"{at}: {exc}")
            continue
        rng = np.random.default_rng(seed + 1)
        second = {k: rng.standard_normal(s).astype(feeds[k].dtype) if np.issubdtype(feeds[k].dtype, np.floating)
                  else np.zeros(s, feeds[k].dtype) for k, s in shapes.items()}
        try:
            return second, run_original(model, second)
        except VerificationImpossible:
            failed.append(f"{at}: the original model does not run")
    return "second input size not checked: " + "; ".join(failed)


def _second_shapes(model, feeds) -> list[dict[str, tuple[int, ...]]]:
    """Second input sizes to try, in order (see _second_size); [] for a model without symbolic dims."""
    symbolic = {}
    for vi in feed_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        symbolic[vi.name] = [i for i in range(feeds[vi.name].ndim)
                             if not (i < len(dims) and dims[i].HasField("dim_value") and dims[i].dim_value > 0)]
    if not any(symbolic.values()):
        return []
    doubled = {k: tuple(n * 2 if i in symbolic[k] else n for i, n in enumerate(feeds[k].shape)) for k in symbolic}
    attempts = [doubled]
    current = {n for k in symbolic for i, n in enumerate(feeds[k].shape) if i in symbolic[k] and i > 0}
    for size in [v for v in CHOSEN_SIZES if v not in current][:SECOND_SIZE_TRIES]:
        other = {k: tuple((n * 2 if i == 0 else size) if i in symbolic[k] else n for i, n in enumerate(feeds[k].shape))
                 for k in symbolic}
        if other not in attempts:
            attempts.append(other)
    return attempts


def _dims(shape) -> str:
    return "x".join(str(n) for n in shape)


def _verify(reference, feeds, rewritten, report, atol, rtol, terms, second=None, noise_sites=None) -> None:
    """Whole-model check at the reference size (and the second size).  ``noise_sites``: ``(site output,
    rounding bound)`` of each rewritten site, for the downstream noise floor (_downstream_noise)."""
    dtype = next((r.dtype for r in reference.values() if np.issubdtype(r.dtype, np.floating)), np.float32)
    tol = derive_tolerance(dtype, terms, atol, rtol)
    steps = _quantization_steps(rewritten, reference)
    report.tolerance = tol.derivation + (
        f"; + one quantization step for outputs read through DequantizeLinear ({', '.join(sorted(steps))}): "
        "a value within float rounding of a half step may round either way" if steps else "")
    if atol is not None or rtol is not None:
        noise_sites = None  # the user's tolerance stands as given
    report.outputs = _check(rewritten, feeds, reference, tol, report, steps, noise_sites)
    if isinstance(second, tuple):
        report.second_size = {k: list(v.shape) for k, v in second[0].items()}
        report.outputs_second_size = _check(rewritten, second[0], second[1], tol, report, steps, noise_sites)
    elif isinstance(second, str):
        report.notes.append(second)
    report.verified = True
    report.verification = "passed"


def _quantization_steps(model, reference) -> dict[str, float]:
    """Scale of the per-tensor DequantizeLinear producing each graph output, where there is one.

    Only outputs that are themselves dequantized get the allowance: a rounding flip inside the
    model that later layers amplify is not excused."""
    index = GraphIndex(model)
    steps = {}
    for name in reference:
        node = index.producer.get(name)
        params = index.tensor_quant(node) if node is not None and node.op_type == "DequantizeLinear" else None
        if params is not None:
            steps[name] = float(abs(params[0]))
    return steps


def _check(rewritten, feeds, reference, tol, report, steps=None, noise_sites=None):
    """Run the rewritten model on ``feeds`` and compare; VerificationFailed names what differs.  Where
    an output differs by more than the tolerance but finitely, and ``noise_sites`` are given, the
    tolerance grows by NOISE_FLOOR_FACTOR times the downstream noise floor and the check is made again."""
    at = ", ".join(f"{k}={_dims(v.shape)}" for k, v in feeds.items())
    try:
        result = run_rewritten(rewritten, feeds)
    except UprewriteError:
        raise
    except Exception as exc:
        report.verification = (f"failed: onnxruntime cannot run the rewritten model at {at}: "
                               f"{first_line(exc)}")
        raise VerificationFailed(f"{report.model}: {report.verification}; nothing written", report) from None
    steps = steps or {}
    checks = compare(reference, result, tol, steps)
    bad = [o for o in checks if not o.ok]
    odd = nonfinite_problem(checks)
    if odd:
        report.outputs = report.outputs or checks
        raise VerificationImpossible(f"{report.model}: verification at {at} impossible: {odd}; nothing written")
    if bad and noise_sites and all(o.rewritten_shape is None and math.isfinite(o.max_abs_error) for o in bad):
        floor = _downstream_noise(rewritten, feeds, result, noise_sites)
        allowance = {k: steps.get(k, 0.0) + NOISE_FLOOR_FACTOR * floor.get(k, 0.0) for k in reference}
        checks = compare(reference, result, tol, allowance)
        bad = [o for o in checks if not o.ok]
        report.tolerance = (report.tolerance or "") + (
            f"; at {at}, + {NOISE_FLOOR_FACTOR:g}x the downstream noise floor (" +
            ", ".join(f"'{k}' {v:.3g}" for k, v in floor.items()) + "): the change of each output when every "
            "rewritten site's output is perturbed by up to its own rounding bound (the network after the sites "
            "amplifies rounding at the sites)")
    if bad:
        report.outputs = report.outputs or checks
        report.verification = f"failed at {at}: " + "; ".join(o.describe() for o in bad)
        raise VerificationFailed(f"{report.model}: verification {report.verification}; nothing written", report)
    return checks


#: the whole-model tolerance grows, where needed, by this many times the measured downstream noise
#: floor: the per-site checks bound each site's error by its rounding bound, the perturbation puts
#: errors of that bound at every element of every site output (uniform, independent), and the margin
#: covers errors correlated across elements; a wrong rewrite (a tap or crop off) gives errors of the
#: order of the output, orders of magnitude above it
NOISE_FLOOR_FACTOR = 4.0


def _noise_sites(done, captured) -> list[tuple[str, float]]:
    """``(site output, rounding bound)`` of each rewritten site: its own per-site rtol times the
    largest magnitude of its output in the reference run."""
    sites = []
    for site, _, _ in done:
        ref = captured.get(site.output)
        if ref is None or not np.issubdtype(ref.dtype, np.floating) or not ref.size:
            continue
        rtol = derive_tolerance(ref.dtype, site.terms_per_output, None, None).rtol
        sites.append((site.output, rtol * float(np.abs(ref).max())))  # abs and max are exact in any float type
    return sites


def _downstream_noise(model, feeds, result, noise_sites) -> dict[str, float]:
    """Max abs change of each graph output of ``model`` when each site output is perturbed by seeded
    uniform noise in ``[-bound, bound]`` (RandomUniformLike + Add in front of its readers): how much
    the network after the sites amplifies rounding errors of the size the per-site checks allow.
    ``model`` is restored before returning."""
    graph = model.graph
    namer = Namer(model)
    originals = list(graph.node)
    produced = {o for n in originals for o in n.output}
    noise_sites = [(tensor, bound) for tensor, bound in noise_sites if tensor in produced]
    added, readers, renamed = {}, [], {}
    try:
        for i, (tensor, bound) in enumerate(noise_sites):
            noise, noisy = namer(f"{tensor}/noise"), namer(f"{tensor}/noisy")
            renamed[tensor] = noisy
            added[tensor] = [
                onnx.helper.make_node("RandomUniformLike", [tensor], [noise], name=namer(f"{tensor}/noise_op"),
                                      low=-bound, high=bound, seed=float(i + 1)),
                onnx.helper.make_node("Add", [tensor, noise], [noisy], name=namer(f"{tensor}/noisy_op"))]
        for node in originals:
            for j, name in enumerate(node.input):
                if name in renamed:
                    readers.append((node, j, name))
                    node.input[j] = renamed[name]
        del graph.node[:]
        for node in originals:  # each perturbation right after the node producing its tensor
            graph.node.append(node)
            for out in node.output:
                graph.node.extend(added.get(out, ()))
        perturbed = run_rewritten(model, feeds)
    finally:
        for node, j, name in readers:
            node.input[j] = name
        del graph.node[:]
        graph.node.extend(originals)
    return {k: float(np.abs(perturbed[k].astype(np.float64) - v.astype(np.float64)).max()) if v.size else 0.0
            for k, v in result.items() if k in perturbed and np.issubdtype(v.dtype, np.floating)}


@cli_names
@guard_memory
def inspect(model, shapes: dict | None = None, memory_budget: int | None = None,
            lazy_weights: bool = False) -> Inspection:
    """Every site with its canonical parameters and MACs, and every refusal with its reason
    (``lazy_weights``: read only the sites' weights from external data, as convert can).

    >>> info = inspect("models/dcgan_stack.onnx")
    >>> [(s["node"], s["exact_forms"]) for s in info.sites][:1]
    [('deconv0', ['convtranspose', 'resize', 'subpixel'])]
    """
    model, label, _ = _open(model, lazy=lazy_weights)
    budget = default_memory_budget() if memory_budget is None else int(memory_budget)
    shapes = normalize_shapes(shapes)
    check_shape_names(model, shapes)
    measured, choice = {}, None
    if shape_candidates(model, shapes)[1]:  # symbolic dims: sizes chosen as convert chooses them
        _, _, captured, choice = _measure(model, None, shapes, 0, required=False, budget=budget)
        measured = {k: tuple(v.shape) for k, v in captured.items()}
        if choice is not None:
            shapes = {**(shapes or {}), **choice.shapes}
    sites, refusals = find_sites(model, shapes, measured)
    opset = default_opset(model) or 0
    return Inspection(
        model=label,
        chosen_shapes=None if choice is None else {k: list(v) for k, v in choice.shapes.items()},
        shape_choice=None if choice is None else choice.reason,
        sites=[
            {"node": s.node, "source": s.source, "params": s.params(),
             "input_lengths": list(s.input_lengths),
             "output_lengths": [None if n is None else a.output_length(n) for a, n in zip(s.axes, s.input_lengths)],
             "exact_forms": [f for f, text in forms.items() if not text.startswith("not possible")],
             "forms": forms,
             "macs": {s.source: s.source_macs,
                      **{form: e.macs(priced(s)) for form, e in EMITTERS.items()}},
             "weights": {form: e.weight_count(s) for form, e in EMITTERS.items()},
             "checkerboard": checkerboard(s),
             "refused": None, "notes": list(s.notes)}
            for s, forms in ((s, exact_forms(s, opset, budget)) for s in sites)
        ] + [
            {"node": r.node, "source": r.source, "params": None, "input_lengths": None, "output_lengths": None,
             "exact_forms": [], "forms": {}, "macs": {}, "weights": {}, "checkerboard": None,
             "refused": r.reason, "notes": []}
            for r in refusals
        ],
    )


def checkerboard(site: Site) -> dict:
    """Uneven overlap: where the (dilated) kernel length is not a multiple of the stride, output
    phases sum different numbers of taps, the cause of checkerboard artifacts (Odena et al. 2016)."""
    taps = [_taps_per_phase(a) for a in site.axes]
    uneven = [i for i, t in enumerate(taps) if len(set(t)) > 1]
    return {"risk": bool(uneven), "axes": uneven, "taps_per_phase": taps,
            "why": (f"axis {', '.join(map(str, uneven))}: output phases sum different numbers of kernel taps "
                    "(kernel not divisible by stride)") if uneven else None}


def _taps_per_phase(a) -> list[int]:
    counts = [0] * a.stride
    for k in range(a.kernel):
        counts[(k * a.dilation) % a.stride] += 1
    return counts


def exact_forms(site: Site, opset: int, budget: int | None = None) -> dict[str, str]:
    """Every target form the site can be emitted in exactly, with what it would be (or why not)."""
    forms = {}
    for form, emitter in sorted(EMITTERS.items()):
        b = Builder(Namer(onnx.ModelProto()), site.node)
        try:
            forms[form] = emit_site(site, emitter, b, opset, budget)
        except (ValueError, OverflowError) as exc:
            forms[form] = f"not possible: {exc}"
    return forms


@cli_names
@guard_memory
def compile_check(model, compiler: str, shapes=None, seed: int = 0):
    """Build ``model`` (a path: the compiler reads the file) with a real compiler, ``"name[:target]"``
    (compilers.COMPILERS: ``rknn:rk3588``, ``vela:ethos-u85-256``, ``openvino``), on the inputs
    convert would use, and compare its outputs with onnxruntime's: a ``compilers.CompilerCheck``
    (``.ok``, ``.problems()``, ``.layers`` with NPU/CPU placement).  UsageError when the compiler is
    not installed (the message gives the install command)."""
    spec = parse_spec(compiler)
    if not isinstance(model, (str, os.PathLike)):
        raise UsageError("compile_check: pass the model's path (the compiler reads the file)")
    loaded, label, _ = _open(model)
    feeds, ref, _, _ = _measure(loaded, None, normalize_shapes(shapes), seed, required=True,
                                budget=default_memory_budget())
    return check_compiler(Path(model), loaded, label, *spec, feeds, ref)


def verify(a, b, inputs=None, shapes=None, atol: float | None = None, rtol: float | None = None, seed: int = 0,
           memory_budget: int | None = None, time_budget: float | None = None):
    """Compare two models in onnxruntime on the same inputs: a ``Comparison`` (``.equivalent``,
    ``.outputs``, ``.tolerance``; ``checks, tol = verify(a, b)`` unpacks as before).

    >>> verify("models/dcgan_stack.onnx", "models/dcgan_stack.subpixel.onnx").equivalent
    True
    """
    _check_numbers(atol, rtol, seed)
    shapes = normalize_shapes(shapes)
    ma, la, _ = _open(a)
    mb, lb, _ = _open(b)
    budget = default_memory_budget() if memory_budget is None else int(memory_budget)
    with budget_time(time_budget):
        try:  # symbolic dims: the sizes convert would choose
            feeds, ref, captured, choice = _measure(ma, inputs, shapes, seed, required=True, budget=budget)
        except VerificationImpossible as exc:
            raise VerificationImpossible(f"{la}: {_reason(exc)}") from None
        except (UsageError, ResourceLimit) as exc:
            raise type(exc)(f"{la}: {exc}") from None
        check_memory(mb, {k: v.shape for k, v in feeds.items()}, set(), budget, f"{lb}: running the model")
        try:
            res = run_original(mb, feeds)
        except VerificationImpossible as exc:
            raise VerificationImpossible(f"{lb}: {_reason(exc)} (on the inputs of {la})") from None
    dtype = next((r.dtype for r in ref.values() if np.issubdtype(r.dtype, np.floating)), np.float32)
    tol = derive_tolerance(dtype, 1 << 12, atol, rtol)
    checks = compare(ref, res, tol)
    if atol is None and rtol is None and any(not c.ok and c.rewritten_shape is None and math.isfinite(c.max_abs_error)
                                             for c in checks):
        checks, tol = _with_noise_floor(ma, mb, feeds, ref, res, captured, choice, shapes, tol)
    return Comparison(la, lb, checks, tol)


def _with_noise_floor(ma, mb, feeds, ref, res, captured, choice, shapes, tol):
    """``verify``'s check again with the rule ``convert`` uses after deep networks: the tolerance grows by
    NOISE_FLOOR_FACTOR times the change of B's outputs when the outputs of A's upsampling sites (which a
    rewrite B keeps by name) are perturbed by their rounding bounds."""
    measured = {k: tuple(v.shape) for k, v in captured.items()}
    sites, _ = find_sites(ma, {**(shapes or {}), **(choice.shapes if choice else {})}, measured)
    noise_sites = _noise_sites([(s, None, None) for s in sites], captured)
    if not noise_sites:
        return compare(ref, res, tol), tol
    floor = _downstream_noise(mb, feeds, res, noise_sites)
    allowance = {k: NOISE_FLOOR_FACTOR * floor.get(k, 0.0) for k in ref}
    text = (f"{tol.derivation}; + {NOISE_FLOOR_FACTOR:g}x the downstream noise floor ("
            + ", ".join(f"'{k}' {v:.3g}" for k, v in floor.items()) + ") of the upsampling sites' rounding, as convert")
    return compare(ref, res, tol, allowance), Tolerance(tol.atol, tol.rtol, text)


def _check_numbers(atol, rtol, seed) -> None:
    """UsageError for a negative or non-finite tolerance, or a seed numpy cannot take."""
    for flag, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and not (math.isfinite(float(value)) and float(value) >= 0):
            raise UsageError(f"{flag} {value}: expected a finite number >= 0")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise UsageError(f"--seed {seed}: expected an integer >= 0")


def check_output_path(out_path: Path | None, inputs: list[Path], external: bool, extra: list[Path] = ()) -> None:
    """Refuse outputs that would overwrite an input file (the model or its external data) or each other."""
    outputs = output_files(out_path, external) if out_path is not None else []
    if out_path is not None and out_path.is_dir():
        raise UsageError(f"{out_path}: output is a directory; give a file name")
    if out_path is not None and external:
        check_data_file(out_path)
    for target in [*outputs, *extra]:
        for source in inputs:
            if _same_file(target, source):
                raise UsageError(f"{target}: writing it would overwrite the input file {source}")
    for target in extra:
        if target.is_dir():
            raise UsageError(f"{target}: is a directory; give a file name")
        for out in outputs:
            if _same_file(target, out):
                raise UsageError(f"{target}: the report would overwrite the output file {out}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _versions() -> dict[str, str]:
    return {"onnx_uprewrite": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


__all__ = ["convert", "inspect", "verify", "find_sites", "compile_check", "ConvertResult", "session"]


def _publish() -> None:
    """The package's API names point at these functions: importing the ``verify`` submodule (as this
    module does) sets ``onnx_uprewrite.verify`` to that module, which must not shadow ``verify()``."""
    import sys

    package = sys.modules[__package__]
    for name in ("convert", "inspect", "verify", "ConvertResult"):
        setattr(package, name, globals()[name])


_publish()
