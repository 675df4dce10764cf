"""How the form of each site is decided: one strategy per way of choosing.

``FixedForm`` (``--to FORM``), ``Fastest`` (``--to fastest``: time every exact form in onnxruntime) and
``ForProfile`` (``--profile``: the cheapest exact form a target runs).  ``decide`` returns a frozen
``Decision`` — emit (with the emission and its description), keep, or refuse — each with its reason;
``convert`` applies it.  The forms offered come from the emitters' ``variants`` (passes/__init__.py).

Layer: above emit / fastest / profile; below api.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx
from onnx import numpy_helper

from .emit import emit_site
from .errors import ResourceLimit
from .fastest import KEEP, original_emission
from .fastest import pick as pick_fastest
from .passes import EMITTERS, LAYOUTS, variants
from .profile import Profile, alias_through, check_model, model_constants, node_problems
from .sites import Site, priced
from .surgery import Builder, Emission, Namer

EMIT, KEEP_SITE, REFUSE = "emit", "keep", "refuse"


@dataclass(frozen=True)
class Decision:
    """What to do with one site, and why."""

    action: str  # EMIT, KEEP_SITE or REFUSE
    reason: str | None = None  # why kept or refused; for EMIT, why this form (a note), if the strategy says
    form: str | None = None  # EMIT: the form written
    emission: Emission | None = None
    description: str | None = None  # EMIT: what was written, in one line
    macs: int | None = None  # EMIT: MACs per sample of what was written, priced at the reference size
    timings_ms: dict | None = None  # Fastest: median ms of each candidate alone
    chosen: str | None = None  # Fastest: the candidate kept (a form, or form/layout)


@dataclass
class Context:
    """What strategies read about the run (one per convert)."""

    model: onnx.ModelProto
    namer: Namer
    opset: int
    budget: int | None
    measured: dict = field(default_factory=dict)  # tensor -> shape measured in the reference run
    captured: dict = field(default_factory=dict)  # tensor -> value captured in the reference run
    deadline: object = None  # budget.time_budget context (Fastest times runs under it)


def refuse(site: Site, why: str) -> Decision:
    return Decision(REFUSE, f"{site.source} '{site.node}': {why}")


def emit_each(site: Site, ctx: Context, candidates) -> tuple[list, list[str]]:
    """``([(label, emitter, builder, description)], [why each other candidate is not possible])`` for
    every ``(label, emitter)`` candidate; candidates that come out alike (layouts that coincide for this
    site) are kept once."""
    built, why_not, seen = [], [], set()
    for label, emitter in candidates:
        builder = Builder(ctx.namer, site.node)
        try:
            description = emit_site(site, emitter, builder, ctx.opset, ctx.budget)
        except (ValueError, OverflowError) as exc:  # OverflowError: sizes beyond int64
            why_not.append(f"{label}: {exc}")
            continue
        if description not in seen:
            seen.add(description)
            built.append((label, emitter, builder, description))
    return built, why_not


class FixedForm:
    """``--to FORM``: every site not in FORM is emitted in it (``emitter``: the form's emitter, or one of
    its layouts), or refused with the emitter's reason."""

    needs_run = wants_run = False  # a reference run only for verification
    keeps_unparsed_in_form = True  # a DepthToSpace/Resize/ConvTranspose no parser read is in FORM already
    stage = "rewriting sites"

    def __init__(self, form: str, emitter):
        self.form, self.emitter = form, emitter
        self.target = form

    def decide(self, site: Site, ctx: Context) -> Decision:
        if site.source == self.form:
            return Decision(KEEP_SITE, f"already in form {self.form}")
        builder = Builder(ctx.namer, site.node)
        try:
            description = emit_site(site, self.emitter, builder, ctx.opset, ctx.budget)
        except (ValueError, OverflowError) as exc:
            return refuse(site, str(exc))
        return Decision(EMIT, None, self.form, builder.emission, description, self.emitter.macs(priced(site)))

    def finish(self, model, report, measured) -> None:
        pass


class Fastest:
    """``--to fastest``: the original and every exact form, timed alone on the site's captured input
    in onnxruntime ``provider`` (fastest.py); the fastest is kept."""

    needs_run = wants_run = True  # the forms are timed on captured activations
    keeps_unparsed_in_form = False
    stage = "timing the forms of sites"
    target = "fastest"

    def __init__(self, provider: str, timer=None):
        self.provider = provider
        self.timer = timer  # another runtime than onnxruntime (compilers.runtime_timer)

    def decide(self, site: Site, ctx: Context) -> Decision:
        if site.input not in ctx.captured:
            return refuse(site, "its input was not captured in the reference run, so its forms cannot be timed")
        emitted, why_not = emit_each(site, ctx, variants("fastest", site))
        built = {label: (emitter, builder, description) for label, emitter, builder, description in emitted}
        try:
            with ctx.deadline:
                choice = pick_fastest(ctx.model, site, ctx.captured,
                                      {label: b.emission for label, (_, b, _) in built.items()}, self.provider,
                                      timer=self.timer)
        except ResourceLimit as exc:
            raise ResourceLimit(f"timing the forms of '{site.node}': {exc}") from None
        except RuntimeError as exc:  # another runtime (self.timer) that fails
            if self.timer is None:
                raise
            return refuse(site, f"its forms cannot be timed: {exc}")
        why = choice.why + (f"; not timed: {'; '.join(why_not)}" if why_not else "")
        if choice.form == KEEP:
            return Decision(KEEP_SITE, f"fastest: {why}", timings_ms=choice.medians_ms, chosen=choice.form)
        emitter, builder, description = built[choice.form]
        return Decision(EMIT, f"fastest: {why}", choice.form.split("/")[0], builder.emission, description,
                        emitter.macs(priced(site)), choice.medians_ms, choice.form)

    def finish(self, model, report, measured) -> None:
        pass


class ForProfile:
    """``--profile``: a site the target runs as it is stays; others get the exact form with the fewest
    MACs (then nodes, then the source's own form) whose every node the target runs, or are refused
    with each form's reason (profile.py)."""

    needs_run, wants_run = False, True  # the profile's limits read measured lengths (best effort)
    keeps_unparsed_in_form = False
    stage = "rewriting sites"

    def __init__(self, profile: Profile):
        self.profile = profile
        self.target = f"profile {profile.name}"

    def decide(self, site: Site, ctx: Context) -> Decision:
        prof, model = self.profile, ctx.model
        original = original_emission(model, site)
        constants = alias_through(original.nodes, model_constants(model, {i for n in original.nodes for i in n.input}))
        problems = [p for n in original.nodes for p in node_problems(n, prof, constants, ctx.measured)]
        if not problems:
            return Decision(KEEP_SITE, f"{prof.name} runs it as it is")
        built, why_not = emit_each(site, ctx, variants("profile", site))
        why_not.insert(0, f"original: {problems[0]}")
        ok = []
        for label, emitter, builder, description in built:
            bad = self._problems(builder.emission, ctx)
            if bad:
                why_not.append(f"{label}: {bad[0]}")
                continue
            macs = emitter.macs(priced(site))
            form = label.split("/")[0]
            ok.append((math.inf if macs is None else macs, len(builder.emission.nodes), form != site.source, form,
                       builder, description, macs))
        if not ok:
            return refuse(site, f"no exact form that {prof.name} runs ({'; '.join(why_not)})")
        best, _, _, form, builder, description, macs = min(ok, key=lambda c: c[:3])  # ties: the source's own form
        cost = f"{best:,} MACs" if best != math.inf else "MACs unknown: symbolic lengths; fewest nodes"
        why = f"{prof.name} cannot run the original ({problems[0]}); {form} is the cheapest form it runs ({cost})"
        return Decision(EMIT, why, form, builder.emission, description, macs)

    def _problems(self, emission: Emission, ctx: Context) -> list:
        local = {t.name: numpy_helper.to_array(t) for t in emission.initializers}
        local.update(model_constants(ctx.model, {i for n in emission.nodes for i in n.input} - set(local)))
        alias_through(emission.nodes, local)
        return [p for n in emission.nodes for p in node_problems(n, self.profile, local, ctx.measured)]

    def finish(self, model, report, measured) -> None:
        report.profile = self.profile.name
        report.profile_violations = [str(v) for v in check_model(model, self.profile, measured)]


def strategy_for(to: str, profile: Profile | None, provider: str, d2s_mode: str, timer=None):
    """The strategy of a convert call (``to`` and ``d2s_mode`` already checked; ``timer``: the runtime
    that times --to fastest's forms when it is not onnxruntime)."""
    if profile is not None:
        return ForProfile(profile)
    if to == "fastest":
        return Fastest(provider, timer)
    emitter = LAYOUTS[d2s_mode] if hasattr(EMITTERS[to], "LAYOUTS") else EMITTERS[to]
    return FixedForm(to, emitter)


__all__ = ["Decision", "Context", "FixedForm", "Fastest", "ForProfile", "strategy_for", "EMIT", "KEEP_SITE",
           "REFUSE"]
