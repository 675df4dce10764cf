"""``--to fastest``: per site, time every exact form in onnxruntime on the site's real input and keep
the fastest; the original form stays unless a candidate is faster by more than the noise margin.

Each candidate runs alone (a model of just that site, site_check.site_model) on the activation
captured at the site in the reference run, so the shapes are the real ones.  Each candidate is timed
interleaved with the original (A B C A B C ..., or A B A B ... one candidate at a time for big
sites: TOGETHER_BYTES) in one process with one thread each, and compared by its median relative to
the original's in the same round: interleaving spreads drifts of the machine over them alike.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from .budget import run_session
from .site_check import outer_inputs, site_model
from .sites import Site
from .surgery import Emission
from .verify import session as verify_session

#: the form "keep": the site's original nodes
KEEP = "original"
#: a candidate replaces the original only when its median is below (1 - NOISE_MARGIN) x the original's
NOISE_MARGIN = 0.03
DEFAULT_RUNS = 15
#: stop timing a site after this many seconds of runs (all candidates together), keeping >= 3 runs each
SITE_SECONDS = 2.0


@dataclass
class Choice:
    form: str  # KEEP or a target form
    medians_ms: dict[str, float]  # every candidate timed (KEEP included)
    why: str


def original_emission(model: onnx.ModelProto, site: Site) -> Emission:
    """The nodes the rewrite of ``site`` removes, plus the constant producers they read (Constant,
    DequantizeLinear of a weight, ...), in graph order."""
    nodes = list(model.graph.node)  # held: a protobuf wrapper's id() is only stable while it lives
    producer = {o: n for n in nodes for o in n.output if o}
    order = {id(n): i for i, n in enumerate(nodes)}
    chosen = {id(n): n for n in nodes if n.output and n.output[0] in site.replaced_outputs}
    initializers = {t.name for t in model.graph.initializer}
    inputs = {site.input, *(site.addend.inputs if site.addend is not None else ())}  # the site reads these
    pending = True
    while pending:
        pending = False
        for name in outer_inputs(Emission(nodes=list(chosen.values()))):
            node = producer.get(name)
            if name not in inputs and name not in initializers and node is not None and id(node) not in chosen:
                chosen[id(node)] = node
                pending = True
    return Emission(nodes=sorted(chosen.values(), key=lambda n: order[id(n)]))


def timing_session(model: onnx.ModelProto, provider: str) -> ort.InferenceSession:
    """A one-thread, fully optimized session (as deployments run) of a site model; weights the site
    model refers to in the input's external data are read as verification reads them."""
    return verify_session(model, provider, threads=1, optimize=True)


def time_interleaved(sessions: dict[str, ort.InferenceSession], feeds: dict[str, dict[str, np.ndarray]],
                     runs: int, seconds: float = SITE_SECONDS) -> dict[str, float]:
    """Median seconds per candidate, runs interleaved; stops early after ``seconds`` (>= 3 runs)."""
    for name, s in sessions.items():  # warm-up: allocations, kernel selection
        run_session(s, None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    start = time.perf_counter()
    for i in range(runs):
        for name, s in sessions.items():
            t = time.perf_counter()
            run_session(s, None, feeds[name])  # honours --time-budget
            times[name].append(time.perf_counter() - t)
        if i >= 2 and time.perf_counter() - start > seconds:
            break
    return {name: statistics.median(v) for name, v in times.items()}


def choose(medians: dict[str, float], margin: float = NOISE_MARGIN) -> tuple[str, str]:
    """``(form, why)``: the fastest candidate if it beats the original by more than ``margin``."""
    base = medians[KEEP]
    best = min(medians, key=medians.get)
    if best == KEEP:
        return KEEP, "the original form is the fastest"
    if medians[best] >= base * (1 - margin):
        return KEEP, (f"{best} is {medians[best] / base:.3f}x the original, within the {margin:.0%} noise "
                      "margin: kept")
    return best, f"{best} is {medians[best] / base:.3f}x the original"


#: a site whose candidates' outputs add up to more than this is timed one candidate at a time (each
#: interleaved with the original, two sessions alive); smaller ones all together (fewer runs)
TOGETHER_BYTES = 64 << 20  # outputs only: a Conv's im2col or a ConvTranspose's col2im buffer is several times more


def pick(model: onnx.ModelProto, site: Site, captured: dict[str, np.ndarray], emissions: dict[str, Emission],
         provider: str, runs: int = DEFAULT_RUNS, timer=None) -> Choice:
    """Time the original and every emission of ``site`` on the activations ``captured`` at the site.

    Small sites: every candidate interleaved with the original in one round.  Big ones (a site's
    forms at full resolution can each hold hundreds of MB): one candidate at a time, interleaved with
    the original, its median taken as its ratio to the original's in that pairing times the original's
    overall median.  ``timer`` (compilers.OpenVinoTimer): another runtime times the candidates, all
    in one round, instead of onnxruntime."""
    candidates = {KEEP: original_emission(model, site), **emissions}
    feeds = {form: {n: captured[n] for n in outer_inputs(e) if n in captured} for form, e in candidates.items()}
    if timer is not None:
        models = {f: site_model(model, e, feeds[f], site.output) for f, e in candidates.items()}
        medians, failed = timer.time(models, feeds, runs, SITE_SECONDS)
        if KEEP not in medians:
            raise RuntimeError(f"{timer.name} cannot run the original site: {failed.get(KEEP, '?')}")
        form, why = choose(medians)
        why += f" (timed in {timer.name}" + "".join(f"; {f} not: {m}" for f, m in failed.items()) + ")"
        return Choice(form, {k: v * 1e3 for k, v in medians.items()}, why)
    out = captured.get(site.output)
    rounds = [list(emissions)] if out is None or out.nbytes * len(candidates) <= TOGETHER_BYTES else \
        [[form] for form in emissions]
    base = timing_session(site_model(model, candidates[KEEP], feeds[KEEP], site.output), provider)
    medians, base_medians = {}, []
    for forms in rounds or [[]]:
        sessions = {KEEP: base, **{f: timing_session(site_model(model, candidates[f], feeds[f], site.output), provider)
                                   for f in forms}}
        timed = time_interleaved(sessions, {f: feeds[f] for f in sessions}, runs, SITE_SECONDS / max(1, len(rounds)))
        base_medians.append(timed[KEEP])
        medians.update({f: timed[f] / timed[KEEP] for f in forms})  # relative to the original, for now
        del sessions
    base_s = statistics.median(base_medians)
    medians = {KEEP: base_s, **{f: ratio * base_s for f, ratio in medians.items()}}
    form, why = choose(medians)
    return Choice(form, {k: v * 1e3 for k, v in medians.items()}, why)
