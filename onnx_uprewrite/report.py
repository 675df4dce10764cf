"""The result of a run: sites, refusals, verification, op census, timings; JSON and text."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from .errors import one_line


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    derivation: str


@dataclass(frozen=True)
class OutputCheck:
    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_abs_reference: float
    tolerance: float
    rewritten_shape: tuple[int, ...] | None = None  # set when the shapes differ
    #: positions where the original is inf/NaN and the rewritten model gives something else: not
    #: counted in max_abs_error; such outputs cannot be compared (nonfinite_problem)
    nonfinite_mismatches: int = 0

    def describe(self) -> str:
        if self.rewritten_shape is not None or math.isinf(self.max_abs_error) and self.tolerance == 0:
            got = "missing" if self.rewritten_shape is None else list(self.rewritten_shape)
            return f"output '{self.name}' has shape {got}, the original {list(self.shape)}"
        return f"output '{self.name}' max abs error {self.max_abs_error:.3g} > tolerance {self.tolerance:.3g}"

    @property
    def ratio(self) -> float:
        if self.tolerance > 0:
            return self.max_abs_error / self.tolerance
        return 0.0 if self.max_abs_error == 0 else math.inf

    @property
    def ok(self) -> bool:
        return self.max_abs_error <= self.tolerance and not self.nonfinite_mismatches

    def to_dict(self) -> dict:
        """JSON-ready (an infinite error, a shape mismatch, is null)."""
        return {"name": self.name, "shape": list(self.shape), "max_abs_error": _finite(self.max_abs_error),
                "max_abs_reference": self.max_abs_reference, "tolerance": self.tolerance,
                "ratio": _finite(self.ratio), "ok": self.ok,
                "rewritten_shape": None if self.rewritten_shape is None else list(self.rewritten_shape)}


@dataclass
class SiteResult:
    node: str
    source: str
    target: str | None
    status: str  # "rewritten" | "refused" | "skipped" (already in the target form)
    reason: str | None = None
    form: str | None = None  # description of what was emitted
    params: dict | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    notes: list[str] = field(default_factory=list)
    # per-site verification (site_check.py): the replacement alone on the activation captured at the site
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    ratio: float | None = None  # max over elements of error / tolerance
    tolerance: str | None = None
    timings_ms: dict | None = None  # --to fastest: median ms of each candidate form alone ("original" included)
    chosen: str | None = None  # --to fastest: the key of timings_ms that was kept (a form, or form/layout)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("max_abs_error", "max_rel_error", "ratio"):
            if d[key] is not None:
                d[key] = _finite(d[key])
        return json.loads(json.dumps(d, default=_jsonable))  # numpy scalars in params become plain numbers

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


#: ``schema_version`` of Report.to_dict (README, "Report schema"): bumped when a field is removed or
#: changes meaning or type; new fields may appear without a bump
SCHEMA_VERSION = 1


@dataclass
class Report:
    model: str
    target: str
    sites: list[SiteResult] = field(default_factory=list)
    verified: bool = False
    verification: str = "not run"
    profile: str | None = None  # --profile: the target's name
    profile_violations: list[str] = field(default_factory=list)  # upsampling nodes it still cannot run
    tolerance: str | None = None
    outputs: list[OutputCheck] = field(default_factory=list)
    # input shapes the tool chose for symbolic dims no --shape/--inputs covered, and why those
    chosen_shapes: dict[str, list[int]] | None = None
    shape_choice: str | None = None
    # models with symbolic input dims are also checked at a second size (every symbolic dim doubled)
    second_size: dict[str, list[int]] | None = None
    outputs_second_size: list[OutputCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def rewritten(self) -> list[SiteResult]:
        return [s for s in self.sites if s.status == "rewritten"]

    @property
    def refused(self) -> list[SiteResult]:
        return [s for s in self.sites if s.status == "refused"]

    @property
    def worst_ratio(self) -> float | None:
        return max((o.ratio for o in self.outputs + self.outputs_second_size), default=None)

    def to_dict(self) -> dict:
        """JSON-ready: ``json.dumps`` takes it as is (numpy numbers become plain ones)."""
        d = {"schema_version": SCHEMA_VERSION, **asdict(self)}
        for key in ("outputs", "outputs_second_size"):
            d[key] = [o.to_dict() for o in getattr(self, key)]
        d["sites"] = [s.to_dict() for s in self.sites]
        d["summary"] = {"sites": len(self.sites), "rewritten": len(self.rewritten), "refused": len(self.refused)}
        return json.loads(json.dumps(d, default=_jsonable))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_jsonable)

    def summary(self, verbose: bool = False) -> str:
        """What a person reads after a run: a compact table by default (at most MAX_ROWS rows of each
        kind, changed ops only); ``verbose``: every site with its per-site check, timings and notes."""
        return self.details() if verbose else _compact(self)

    def one_line(self) -> str:
        """The whole run in one line (``-q``)."""
        check = ("verified" + (f" (worst {self.worst_ratio:.3f} of its tolerance)" if self.worst_ratio is not None
                               else "") if self.verified else f"verification {self.verification.split(':')[0]}")
        wrote = f", wrote {self.written[0]}" if self.written else ""
        return (f"{self.model}: {len(self.rewritten)} rewritten to {self.target}, {len(self.refused)} refused, "
                f"{check}{wrote}")

    def details(self) -> str:
        lines = [
            f"{self.model}: {len(self.sites)} upsampling site(s), {len(self.rewritten)} rewritten to "
            f"{self.target}, {len(self.refused)} refused"
        ]
        if self.chosen_shapes:
            lines.append("  shapes     " + ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in self.chosen_shapes.items())
                         + " (chosen; --shape overrides)")
        for s in self.rewritten:
            macs = ""
            if s.macs_before and s.macs_after:
                macs = f" (MACs {s.macs_before:,} -> {s.macs_after:,})"
            lines.append(f"  rewritten  {s.node}: {s.form}{macs}")
            if s.timings_ms:
                lines.append(f"             timed alone: {_timings(s.timings_ms)}")
            if s.ratio is not None:
                lines.append(f"             alone on its captured input: max abs error {s.max_abs_error:.3g}, "
                             f"{s.ratio:.3f} of its tolerance")
        for s in self.refused:
            lines.append(f"  refused    {s.reason}")
        for s in self.sites:
            if s.status == "skipped":
                lines.append(f"  skipped    {s.node}: {s.reason}")
                if s.timings_ms:
                    lines.append(f"             timed alone: {_timings(s.timings_ms)}")
        if self.profile is not None:
            if self.profile_violations:
                for v in self.profile_violations:
                    lines.append(f"  profile    {self.profile} cannot run {v}")
            else:
                lines.append(f"  profile    {self.profile} runs every upsampling node (ConvTranspose, Resize, "
                             "Upsample, DepthToSpace and the Conv of each pair)")
        lines.append(f"  ops before: {_census(self.ops_before)}")
        lines.append(f"  ops after:  {_census(self.ops_after)}")
        if self.verified:
            for o in self.outputs:
                lines.append(
                    f"  verified   output '{o.name}': max abs error {o.max_abs_error:.3g} <= tolerance "
                    f"{o.tolerance:.3g} ({o.ratio:.3f} of it)"
                )
            for o in self.outputs_second_size:
                lines.append(
                    f"  verified   output '{o.name}' {list(o.shape)} at the second input size: max abs error "
                    f"{o.max_abs_error:.3g} <= "
                    f"tolerance {o.tolerance:.3g} ({o.ratio:.3f} of it)"
                )
            lines.append(f"  tolerance  {self.tolerance}")
        else:
            lines.append(f"  verification: {self.verification}")
        for n in self.notes:
            lines.append(f"  note       {n}")
        for w in self.written:
            lines.append(f"  wrote      {w}")
        return "\n".join(one_line(line) for line in lines)  # names from the model may hold line breaks


#: the compact summary lists at most this many sites of each status (``-v`` lists every one)
MAX_ROWS = 20


def _compact(r: Report) -> str:
    lines = [f"{r.model}: {len(r.sites)} upsampling site(s), {len(r.rewritten)} rewritten to {r.target}, "
             f"{len(r.refused)} refused"]
    if r.chosen_shapes:
        lines.append("  shapes     " + ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in r.chosen_shapes.items())
                     + " (chosen; --shape overrides)")
    rows = [(s.node, f"{s.source} -> {s.target}", _macs(s), "-" if s.ratio is None else f"{s.ratio:.3f}",
             (s.form or "").split(" [masked:")[0] + (" [masked]" if "[masked" in (s.form or "") else ""))
            for s in r.rewritten]
    if rows:
        lines += _table(("site", "from -> to", "MACs before -> after", "error/tol", "form"), rows[:MAX_ROWS])
        lines += _more(len(rows), "rewritten")
    for s in r.rewritten:
        if s.form and "[masked" in s.form:
            lines.append(f"  warning    {s.node}: the masked form (zero insertion + Conv: about stride^rank x the "
                         f"MACs of the transposed convolution) was the only exact {s.target} form: "
                         f"{s.form.split('[masked: ', 1)[1].rstrip(']')}")
    skipped = [s for s in r.sites if s.status == "skipped"]
    lines += [f"  skipped    {s.node}: {s.reason}" for s in skipped[:MAX_ROWS]] + _more(len(skipped), "skipped")
    lines += [f"  refused    {s.reason}" for s in r.refused[:MAX_ROWS]] + _more(len(r.refused), "refused")
    if r.profile is not None:
        lines += [f"  profile    {r.profile} cannot run {v}" for v in r.profile_violations] or [
            f"  profile    {r.profile} runs every upsampling node"]
    changed = sorted(op for op in set(r.ops_before) | set(r.ops_after) if r.ops_before.get(op) != r.ops_after.get(op))
    if changed:
        same = len(set(r.ops_before) & set(r.ops_after)) - len(set(changed) & set(r.ops_before) & set(r.ops_after))
        lines += _table(("op", "before", "after"),
                        [(op, str(r.ops_before.get(op, 0)), str(r.ops_after.get(op, 0))) for op in changed])
        if same:
            lines.append(f"  ({same} other op type(s) unchanged)")
    lines += _verdict(r)
    lines += [f"  note       {n}" for n in r.notes]
    lines += [f"  wrote      {w}" for w in r.written]
    return "\n".join(lines)


def _macs(s: SiteResult) -> str:
    if not (s.macs_before and s.macs_after):
        return "-"
    return f"{_short(s.macs_before)} -> {_short(s.macs_after)}"


def _short(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _table(header, rows) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]


def _more(count: int, what: str) -> list[str]:
    return [f"  ... {count - MAX_ROWS} more {what} (-v lists each; --report FILE has them all)"] if count > MAX_ROWS \
        else []


def _verdict(r: Report) -> list[str]:
    if not r.verified:
        return [f"  verification: {r.verification}"]
    if not r.outputs:
        return [f"  verified   {r.tolerance}"]
    worst = max(r.outputs, key=lambda o: o.ratio)
    lines = [f"  verified   {len(r.outputs)} output(s): worst output '{worst.name}': max abs error "
             f"{worst.max_abs_error:.3g} <= tolerance {worst.tolerance:.3g} ({worst.ratio:.3f} of it)"]
    if r.outputs_second_size:
        second = max(r.outputs_second_size, key=lambda o: o.ratio)
        at = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in (r.second_size or {}).items())
        lines.append(f"  verified   at the second input size {at}: worst {second.ratio:.3f} of its tolerance")
    return lines + [f"  tolerance  {r.tolerance}"]


def _finite(x: float) -> float | None:
    """JSON has no infinity: an infinite error (shape mismatch, NaN where the original has none) is null."""
    return x if math.isfinite(x) else None


def _timings(ms: dict[str, float]) -> str:
    return ", ".join(f"{form} {t:.3f} ms" for form, t in sorted(ms.items(), key=lambda kv: kv[1]))


def _census(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "(none)"


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, float) and value != value:
        return None
    return str(value)


@dataclass
class Comparison:
    """The result of ``verify(a, b)``: each output compared, under ``tolerance``.

    ``checks, tol = comparison`` still unpacks (the tuple that ``verify`` returned before)."""

    a: str
    b: str
    outputs: list[OutputCheck]
    tolerance: Tolerance

    @property
    def equivalent(self) -> bool:
        return bool(self.outputs) and all(o.ok for o in self.outputs)

    def __iter__(self):
        return iter((self.outputs, self.tolerance))

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "equivalent": self.equivalent,
                "tolerance": {"atol": self.tolerance.atol, "rtol": self.tolerance.rtol,
                              "derivation": self.tolerance.derivation},
                "outputs": [o.to_dict() for o in self.outputs]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass
class Inspection:
    """The result of ``inspect(model)``: each site (canonical parameters, exact forms, MACs, or the
    reason it is refused), and the input sizes chosen for symbolic dims.

    ``inspection["sites"]`` still works (``inspect`` returned this dict before)."""

    model: str
    sites: list[dict]
    chosen_shapes: dict[str, list[int]] | None = None
    shape_choice: str | None = None

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=_jsonable))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __getitem__(self, key: str):
        return self.to_dict()[key] if key != "sites" else self.sites

    def get(self, key: str, default=None):
        return getattr(self, key, default)
