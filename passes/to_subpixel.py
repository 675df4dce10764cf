"""Emitter: canonical site -> stride-1 ``Conv`` (one, or one per output phase) -> depth-to-space [-> ``Slice``].

Every output phase of a transposed convolution is an ordinary stride-1 convolution of the
low-resolution input with a sub-kernel of taps ``W[r + s*t]`` (DESIGN.md §2a).  Exact for every
attribute combination: the weights are rearranged, never combined.  Two ways to lay it out:

* one Conv for all S = prod(s) phases (min-align: phase offset ``a = pb mod s``), Cout*S output
  channels in CRD (``c*S + r``) or DCR (``r*C + c``) order, a depth-to-space, a Slice cropping
  ``[c*s + a, +Lout)``.  It computes ``ceil((Lout + a)/s)`` positions per phase and pads phases
  with fewer taps with zeros;
* one Conv per phase with exact pads (weights.plan_phase_axis; needs ``s | Lout - s*L``),
  concatenated phase-major (DCR) before the depth-to-space: no border positions, no zero taps, no
  Slice, but S Convs and a Concat.  prefer_phases picks it where it saves MACs on wide Convs
  (DCGAN's 256->128 k4 s2 p1 at 8x8: 1.27x fewer MACs, 0.84-0.9x the ConvTranspose's time).

Depth-to-space is ``DepthToSpace`` for 2-D square strides (CRD from opset 11; DCR at any opset),
else one single-axis Transpose per axis (static lengths), else one Reshape -> Transpose ->
Reshape.  onnxruntime runs the single-axis Transposes 2-2.5x faster than its DepthToSpace, so
``--d2s-mode transpose`` uses them everywhere.  A stride-1 site becomes a plain Conv (+ Slice).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from onnx_uprewrite.sites import Site, priced
from onnx_uprewrite.surgery import Builder
from onnx_uprewrite.weights import (PhaseAxis, phase_weight, plan_phase_axis, plan_subpixel_axis, subpixel_bias,
                                    subpixel_weight)

FORM = "subpixel"


@dataclass(frozen=True)
class Layout:
    """How the sub-pixel form is laid out (an emitter like the modules in EMITTERS).

    ``convs``: "one" (one Conv computes every phase, + Slice when the output is cropped), "phases"
    (one Conv per output phase with exact pads, + Concat; weights.plan_phase_axis) or "auto"
    ("phases" where prefer_phases predicts it faster).  ``shuffle``: "op" (DepthToSpace for 2-D
    square strides, else one Reshape-Transpose-Reshape), "transpose" (one single-axis Transpose per
    axis where lengths are static: what onnxruntime runs fastest, 2-2.5x faster than its
    DepthToSpace) or "auto" (DepthToSpace where one does it, the op compilers know; else
    "transpose").  ``order``: the channel order of the phases, "CRD" (``c*S + phase``,
    PixelShuffle's), "DCR" (``phase*C + c``, TensorFlow's) or "any" (DCR where the Transposes then
    stay 4-D, and always for the per-phase layout; else CRD).
    """

    convs: str = "auto"
    shuffle: str = "auto"
    order: str = "any"
    FORM = "subpixel"

    def emit(self, site: Site, b: Builder, opset: int) -> str:
        return emit(site, b, opset, layout=self)

    def macs(self, site: Site) -> int | None:
        return macs(site, self)

    def weight_count(self, site: Site) -> int:
        return weight_count(site, self)


#: ``uprewrite convert --d2s-mode``: the default; the same with Transposes everywhere (fastest in
#: onnxruntime); PixelShuffle's layout; TensorFlow's (for DCR-only targets: DepthToSpace DCR where
#: one does it, else the single-axis Transposes reading the Conv's phase-major channels)
AUTO = Layout()
TRANSPOSE = Layout("auto", "transpose", "any")
CRD = Layout("one", "op", "CRD")
DCR = Layout("auto", "auto", "DCR")
ONE_CONV_TRANSPOSE = Layout("one", "transpose", "any")  # also timed by --to fastest
PHASES = Layout("phases", "op", "any")  # per phase even where not predicted faster (benchmarks, tests)
LAYOUTS = {"auto": AUTO, "transpose": TRANSPOSE, "CRD": CRD, "DCR": DCR}
#: a node of this op type is in the sub-pixel form already (a DepthToSpace no parser could read stays)
IN_FORM_OPS = ("DepthToSpace",)


def variants(purpose: str, site: Site) -> list[tuple[str, object]]:
    """``(label, layout emitter)`` this form offers a strategy: under a ``"profile"`` each DepthToSpace
    order (compilers differ on them); for ``"fastest"`` the layouts whose speed differs in onnxruntime
    (also for sub-pixel sources: a re-layout)."""
    if purpose == "profile":
        return [(FORM, AUTO), (f"{FORM}/CRD", CRD), (f"{FORM}/DCR", DCR)]
    return [(FORM, AUTO), (f"{FORM}/transpose", TRANSPOSE), (f"{FORM}/CRD", CRD),
            (f"{FORM}/one Conv, transpose", ONE_CONV_TRANSPOSE)]


def _to_dcr(values: np.ndarray, channels: int, n_phase: int) -> np.ndarray:
    """Conv output channels in CRD order (``c*S + p``) -> DCR order (``p*C + c``), along axis 0."""
    return values.reshape(channels, n_phase, *values.shape[1:]).swapaxes(0, 1).reshape(values.shape)


def emit(site: Site, b: Builder, opset: int, layout: Layout = AUTO) -> str:
    """Append the sub-pixel form of ``site`` in ``layout`` to ``b``; returns a one-line description
    of it.  ValueError says why the layout is not possible for the site."""
    if uses_phases(site, layout):
        return _emit_phases(site, b, opset, layout)
    return _emit_one_conv(site, b, opset, layout)


def uses_phases(site: Site, layout: Layout) -> bool:
    """Whether ``layout`` emits one Conv per phase for ``site``."""
    if layout.convs == "auto":
        if layout.order == "DCR" and site.group > 1 and math.prod(a.stride for a in site.axes) > 1:
            return not isinstance(phase_plans(site), str)  # one grouped Conv cannot feed DCR; per phase can
        return layout.order != "CRD" and prefer_phases(site)
    return layout.convs == "phases"


def _emit_one_conv(site: Site, b: Builder, opset: int, layout: Layout) -> str:
    """One Conv computing every phase, then depth-to-space, then a crop.

    The Conv's output channels are in CRD order (PyTorch's PixelShuffle) or DCR order (TensorFlow's
    depth_to_space, the only one some compilers take): a permutation of the weights, so both are
    exact.  DCR needs group 1 (a grouped Conv keeps each group's channels together, which DCR's
    phase-major order splits)."""
    plans = tuple(plan_subpixel_axis(a) for a in site.axes)
    strides = tuple(a.stride for a in site.axes)
    n_phase = math.prod(strides)
    rank = site.rank
    c_out = site.out_channels
    # "any": DCR keeps the single-axis Transposes 4-D; DepthToSpace costs the same in both orders
    dcr = n_phase > 1 and (layout.order == "DCR" or (layout.order == "any" and site.group == 1
                                                     and _transposes(layout, strides, opset, "CRD")))
    if dcr and site.group != 1:
        raise ValueError(f"DepthToSpace DCR cannot follow a grouped Conv (group {site.group}): DCR's phase-major "
                         "channel order mixes the groups")
    order = (lambda v: _to_dcr(v, c_out, n_phase)) if dcr else (lambda v: v)
    weight = b.weight("weight", site.weight, site.weight_quant,
                      lambda w: order(subpixel_weight(w, site.group, plans)), 0, opset)
    inputs = [site.input, weight]
    if site.phase_bias is not None:  # [C, s...] by phase: already CRD order when flattened
        inputs.append(b.constant("bias", order(site.phase_bias.reshape(-1))))
    elif site.bias is not None:
        inputs.append(b.weight("bias", site.bias, site.bias_quant, lambda v: order(subpixel_bias(v, n_phase)), 0,
                               opset))
    crop = any(p.crop_start or p.crop_drop_end for p in plans)
    steps_after_conv = (n_phase > 1) + crop
    y = b.node(
        "Conv", inputs, "conv",
        output=site.output if steps_after_conv == 0 else None,
        kernel_shape=[p.kernel for p in plans],
        pads=[p.pad_begin for p in plans] + [p.pad_end for p in plans],
        dilations=[p.dilation for p in plans],
        strides=[1] * rank,
        group=site.group,
    )
    parts = [f"Conv {'x'.join(str(p.kernel) for p in plans)} -> {c_out * n_phase} ch"]
    if site.output_quant is not None and steps_after_conv and opset >= 10:
        # QDQ model: quantize the Conv output as the site output is quantized; exact, since
        # depth-to-space and Slice only move values and Q(DQ(Q(v))) == Q(v)
        y = b.quantize_dequantize(y, *site.output_quant)
        parts.append("Q/DQ")
    if n_phase > 1:
        q = [None if n is None else n + p.conv_extra for n, p in zip(site.input_lengths, plans)]
        y, what = _depth_to_space(b, y, c_out, strides, q, None if crop else site.output, dcr, opset, layout)
        parts.append(what)
    if crop:
        _crop(b, y, plans, site.output, opset)
        parts.append("Slice")
    return " + ".join(parts)


def _has_depth_to_space(strides, opset: int, mode: str) -> bool:
    """Whether one DepthToSpace does it: 2-D square strides; CRD from opset 11 (DCR is DepthToSpace-1's order)."""
    return len(strides) == 2 and strides[0] == strides[1] and (mode == "DCR" or opset >= 11)


def _transposes(layout: Layout, strides, opset: int, mode: str) -> bool:
    """Whether ``layout`` interleaves the phases with single-axis Transposes (static lengths permitting)."""
    return layout.shuffle == "transpose" or (layout.shuffle == "auto" and not _has_depth_to_space(strides, opset, mode))


def _depth_to_space(b: Builder, y: str, channels: int, strides, q, output, dcr: bool, opset: int,
                    layout: Layout) -> tuple[str, str]:
    """``[N, C*S, Q...]`` (phases in CRD or DCR order) -> ``[N, C, Q0*s0, ...]``: (tensor, description)."""
    mode = "DCR" if dcr else "CRD"
    steps = _single_axis_moves(channels, strides, q, dcr) if all(n is not None for n in q) else []
    if _transposes(layout, strides, opset, mode) and steps:  # no steps: one position, nothing to move
        y = _transpose_shuffle(b, y, channels, strides, q, output, steps)
        chain = "Reshape-Transpose-" * len(steps)
        return y, f"{mode} {chain}Reshape" + (f" ({len(steps)} single-axis moves)" if len(steps) > 1 else "")
    if _has_depth_to_space(strides, opset, mode):
        attrs = {"mode": mode} if opset >= 11 else {}
        return b.node("DepthToSpace", [y], "depth_to_space", output=output, blocksize=strides[0], **attrs), \
            f"DepthToSpace({strides[0]}, {mode})"
    return _shuffle(b, y, channels, strides, q, output, dcr), f"{mode} Reshape-Transpose-Reshape"


def _shuffle(b: Builder, y: str, channels: int, strides, q, output, dcr: bool = False) -> str:
    """``[N, C*S, Q...]`` -> ``[N, C, Q0*s0, ...]`` via Reshape -> Transpose -> Reshape; channels in CRD
    order (``c*S + phase``) or, with ``dcr``, in DCR order (``phase*C + c``)."""
    rank = len(strides)
    if dcr:  # [N, s..., C, Q...]
        perm = [0, 1 + rank] + [x for i in range(rank) for x in (2 + rank + i, 1 + i)]
        head_dims = [*strides, channels]
    else:  # [N, C, s..., Q...]
        perm = [0, 1] + [x for i in range(rank) for x in (2 + rank + i, 2 + i)]
        head_dims = [channels, *strides]
    if sum(v is None for v in q) <= 1:
        shape1 = [0, *head_dims, *(-1 if v is None else v for v in q)]
        shape2 = [0, channels, *(-1 if v is None else v * s for v, s in zip(q, strides))]
        s1 = b.constant("shape_split", np.array(shape1, dtype=np.int64))
        s2 = b.constant("shape_merge", np.array(shape2, dtype=np.int64))
    else:  # several symbolic spatial dims: build the shapes at run time
        shape = b.node("Shape", [y], "shape")
        batch = b.node("Gather", [shape, b.constant("batch_axis", np.array([0], dtype=np.int64))], "batch", axis=0)
        spatial = b.node(
            "Gather", [shape, b.constant("spatial_axes", np.arange(2, 2 + rank, dtype=np.int64))], "spatial", axis=0
        )
        head = b.constant("split_head", np.array(head_dims, dtype=np.int64))
        s1 = b.node("Concat", [batch, head, spatial], "shape_split", axis=0)
        scaled = b.node("Mul", [spatial, b.constant("strides", np.array(strides, dtype=np.int64))], "scaled")
        s2 = b.node("Concat", [batch, b.constant("channels", np.array([channels], dtype=np.int64)), scaled],
                    "shape_merge", axis=0)
    z = b.node("Reshape", [y, s1], "split_phases")
    z = b.node("Transpose", [z], "interleave", perm=perm)
    return b.node("Reshape", [z, s2], "merge_phases", output=output)


def _single_axis_moves(channels: int, strides, q, dcr: bool) -> list[tuple[list[int], list[int]]]:
    """The Reshape shapes (after N) and Transpose perms that interleave the phases one axis at a time.

    Axes after N are the phases s_i, the channels c and the lengths q_i; each step moves s_i to just
    after q_i (innermost axis first) as ``[N, A, s_i, B, D] -> [N, A, B, s_i, D]`` with unit A/D
    dropped, then s_i merges into q_i."""
    rank = len(strides)
    names = [f"s{i}" for i in range(rank)] + ["c"] if dcr else ["c"] + [f"s{i}" for i in range(rank)]
    names += [f"q{i}" for i in range(rank)]
    sizes = {**{f"s{i}": int(s) for i, s in enumerate(strides)}, "c": int(channels),
             **{f"q{i}": int(n) for i, n in enumerate(q)}}
    steps = []
    for i in reversed(range(rank)):
        src, dst = names.index(f"s{i}"), names.index(f"q{i}")
        a = math.prod(sizes[n] for n in names[:src])
        c = math.prod(sizes[n] for n in names[src + 1:dst + 1])
        d = math.prod(sizes[n] for n in names[dst + 1:])
        if strides[i] > 1 and c > 1:
            dims = ([a] if a > 1 else []) + [int(strides[i]), c] + ([d] if d > 1 else [])
            moved = 2 if a > 1 else 1  # position of s_i in [N, *dims]
            perm = list(range(len(dims) + 1))
            perm[moved], perm[moved + 1] = perm[moved + 1], perm[moved]
            steps.append((dims, perm))
        sizes[f"q{i}"] *= strides[i]
        names = names[:src] + names[src + 1:]
    return steps


def _transpose_shuffle(b: Builder, y: str, channels: int, strides, q, output, steps) -> str:
    """Depth-to-space as one Transpose per axis, each moving a single phase axis past a contiguous
    block (``steps`` of _single_axis_moves; static lengths ``q``): onnxruntime's fast path, 2-2.5x
    faster than its DepthToSpace and 4x faster than one 6-D Transpose
    (benchmarks/bench_subpixel_layouts.py), and 4-D throughout in DCR order for 2-D sites."""
    for i, (dims, perm) in enumerate(steps):
        z = b.node("Reshape", [y, b.constant(f"split_{i}", np.array([0, *dims], dtype=np.int64))], f"split_{i}")
        y = b.node("Transpose", [z], f"interleave_{i}", perm=perm)
    shape = np.array([0, channels, *(n * s for n, s in zip(q, strides))], dtype=np.int64)
    return b.node("Reshape", [y, b.constant("shape_merge", shape)], "merge_phases", output=output)


def phase_plans(site: Site) -> tuple[tuple[PhaseAxis, ...], ...] | str:
    """Per axis, the exact Conv of each output phase (weights.plan_phase_axis), or why the site has
    no per-phase layout."""
    if site.weight_quant is not None or site.bias_quant is not None or site.output_quant is not None:
        return "quantized sites keep the one-Conv layout"
    plans = []
    for i, axis in enumerate(site.axes):
        plan = plan_phase_axis(axis)
        if isinstance(plan, str):
            return f"spatial axis {i}: {plan}"
        plans.append(plan)
    return tuple(plans)


def _phases(plans):
    """Every output phase as ``(index tuple r, per-axis PhaseAxis)``, row-major (DCR order)."""
    for r in itertools.product(*[range(len(p)) for p in plans]):
        yield r, tuple(p[i] for p, i in zip(plans, r))


def _emit_phases(site: Site, b: Builder, opset: int, layout: Layout) -> str:
    """One stride-1 Conv per output phase with exact pads, concatenated phase-major (DCR order),
    then depth-to-space.  No border positions and no crop, and each phase reads only its own taps
    (no zero taps where the phases' kernels differ in length)."""
    plans = phase_plans(site)
    if isinstance(plans, str):
        raise ValueError(f"no per-phase layout: {plans}")
    if layout.order == "CRD":
        raise ValueError("the per-phase layout concatenates its phases in DCR order, not CRD")
    strides = tuple(a.stride for a in site.axes)
    n_phase, rank, c_out = math.prod(strides), site.rank, site.out_channels
    last = site.output if n_phase == 1 else None
    outs = []
    for r, phases in _phases(plans):
        tag = "phase" + "_".join(map(str, r))
        inputs = [site.input, b.constant(f"{tag}_weight", phase_weight(site.weight, site.group, phases))]
        if site.phase_bias is not None:  # indexed by the phase (o + pb) mod s of the uncropped result
            at = tuple((ri + a.crop_begin) % a.stride for ri, a in zip(r, site.axes))
            inputs.append(b.constant(f"{tag}_bias", site.phase_bias[(slice(None),) + at]))
        elif site.bias is not None:
            inputs.append(b.constant(f"{tag}_bias", site.bias))
        outs.append(b.node(
            "Conv", inputs, f"{tag}_conv", output=last,
            kernel_shape=[len(p.taps) for p in phases],
            pads=[p.pad_begin for p in phases] + [p.pad_end for p in phases],
            dilations=[p.dilation for p in phases],
            strides=[1] * rank,
            group=site.group,
        ))
    kernels = sorted({"x".join(str(len(p.taps)) for p in phases) for _, phases in _phases(plans)})
    parts = [f"{n_phase} Conv ({'/'.join(kernels)}) -> {c_out} ch"]
    if n_phase == 1:
        return parts[0]
    y = b.node("Concat", outs, "phases", axis=1)
    q = [None if n is None else n + a.extension // a.stride for n, a in zip(site.input_lengths, site.axes)]
    _, what = _depth_to_space(b, y, c_out, strides, q, site.output, True, opset, layout)
    return " + ".join(parts + ["Concat", what])


def phase_macs_and_weights(site: Site) -> tuple[int | None, int] | None:
    """``(MACs per sample or None when lengths are symbolic, weight elements)`` of the per-phase
    layout, None when the site has none."""
    plans = phase_plans(site)
    if isinstance(plans, str):
        return None
    taps = sum(math.prod(len(p.taps) for p in phases) for _, phases in _phases(plans))
    per_tap = site.out_channels * (site.in_channels // site.group)
    if any(n is None for n in site.input_lengths):
        return None, per_tap * taps
    positions = math.prod(n + a.extension // a.stride for n, a in zip(site.input_lengths, site.axes))
    return per_tap * taps * positions, per_tap * taps


#: per-phase Convs with fewer output channels than this run at a poor fraction of the one-Conv speed
#: in onnxruntime's CPU Conv (measured: 32->3 k4 s2 at 64x64, 3x slower; depthwise 64 channels: faster)
MIN_PHASE_CHANNELS = 16
#: 3-D sites keep one Conv: eight 3-D Convs and their Concat cost more than the border they save
#: (measured: 32->32 k4 s2 p1 at 8^3, 0.70 vs 0.64 of the ConvTranspose's time; 16^3: 0.56 vs 0.42)
MAX_PHASE_RANK = 2
#: the per-phase layout must save at least MIN_PHASE_SAVING * S^2 of the one-Conv MACs (S phases):
#: each extra Conv and the Concat cost more the more phases there are.  Fitted to
#: benchmarks/bench_subpixel_layouts.py: S=2 wins from about 1 % (1-D k4 s2 p1, L 64: 1.6 % saved,
#: 1.05 vs 1.15 of the ConvTranspose), S=4 from about 4 % (2-D k4 s2 p1 at 32x32: 6 %), S=9 loses
#: at 8 % (k6 s3 at 24x24) and wins at 44 % (k4 s3 op1), S=8 loses at 0.2 % (1-D k16 s8 p4)
MIN_PHASE_SAVING = 0.0025


def prefer_phases(site: Site) -> bool:
    """Whether the per-phase layout is predicted faster than the one-Conv layout: wide enough Convs
    and a real MAC saving (border positions on small maps, zero taps when the phases' kernels differ).
    Symbolic lengths are priced at the reference size (sites.priced)."""
    site = priced(site)
    cost = phase_macs_and_weights(site)
    if cost is None or math.prod(a.stride for a in site.axes) == 1 or site.rank > MAX_PHASE_RANK:
        return False
    if site.out_channels < MIN_PHASE_CHANNELS:
        return False
    phase_cost, phase_weights = cost
    one = _one_conv_macs(site)
    if phase_cost is None or one is None:  # symbolic lengths: compare the kernels alone
        phase_cost, one = phase_weights, _one_conv_weights(site)
    n_phase = math.prod(a.stride for a in site.axes)
    return phase_cost <= (1 - MIN_PHASE_SAVING * n_phase ** 2) * one


def _crop(b: Builder, y: str, plans, output: str, opset: int) -> str:
    axes = [2 + i for i, p in enumerate(plans) if p.crop_start or p.crop_drop_end]
    starts = [plans[a - 2].crop_start for a in axes]
    ends = [-plans[a - 2].crop_drop_end or None for a in axes]
    return b.slice(y, starts, ends, axes, opset, output=output)


def _one_conv_weights(site: Site) -> int:
    plans = [plan_subpixel_axis(a) for a in site.axes]
    n_phase = math.prod(a.stride for a in site.axes)
    return site.out_channels * n_phase * (site.in_channels // site.group) * math.prod(p.kernel for p in plans)


def _one_conv_macs(site: Site) -> int | None:
    if any(n is None for n in site.input_lengths):
        return None
    plans = [plan_subpixel_axis(a) for a in site.axes]
    positions = math.prod(n + p.conv_extra for n, p in zip(site.input_lengths, plans))
    return _one_conv_weights(site) * positions


def weight_count(site: Site, layout: Layout = AUTO) -> int:
    """Elements of the emitted Conv weights (every phase of every output channel); ValueError where
    ``layout`` asks for a per-phase layout that the site does not have."""
    if uses_phases(site, layout):
        cost = phase_macs_and_weights(site)
        if cost is None:
            raise ValueError(f"no per-phase layout: {phase_plans(site)}")
        return cost[1]
    return _one_conv_weights(site)


def macs(site: Site, layout: Layout = AUTO) -> int | None:
    """Multiply-accumulates per sample of the emitted Convs (None when input lengths are symbolic)."""
    if uses_phases(site, layout):
        cost = phase_macs_and_weights(site)
        return None if cost is None else cost[0]
    return _one_conv_macs(site)
