"""Pure numpy math of transposed convolution and its sub-pixel (polyphase) form.

Per spatial axis a transposed convolution with stride s, dilation d and kernel K computes the
uncropped signal ``F[o] = sum_{i,k : o = i*s + k*d} x[i] * W[k]`` and returns the crop
``y[o] = F[o + pb]`` for ``0 <= o < Lout`` (plus bias).  Every learned-upsampling form is
described by ``(W, bias, group)`` and, per axis, ``(s, d, K, pb, e)`` with ``e = Lout - s*L``
(``e`` is independent of the input length L for explicit pads and SAME/VALID; for
``output_shape`` it is resolved from a static L).

No onnx imports here: weights in, weights out, tested alone against the float64 references below.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Axis:
    """One spatial axis of a canonical transposed convolution."""

    stride: int
    dilation: int
    kernel: int
    crop_begin: int  # pb: F index of output position 0 (may be negative: leading zeros)
    extension: int  # e = Lout - stride * L

    @property
    def effective_kernel(self) -> int:
        return (self.kernel - 1) * self.dilation + 1

    def output_length(self, length: int) -> int:
        return self.stride * length + self.extension


#: the largest stride, dilation or scale factor a site may have: far beyond any real upsampling
#: (a ConvTranspose iSTFT's hop is a few hundred), and small enough that per-phase loops, phase
#: lists and the report stay bounded
MAX_FACTOR = 1 << 16


def axis_limit_problem(axes) -> str | None:
    """Why ``axes`` (canonical Axis) are beyond MAX_FACTOR, or None."""
    for i, a in enumerate(axes):
        for what, value in (("stride", a.stride), ("dilation", a.dilation)):
            if value > MAX_FACTOR:
                return f"spatial axis {i}: {what} {value} is over {MAX_FACTOR}, the largest this tool converts"
    return None


@dataclass(frozen=True)
class SubpixelAxis:
    """How one axis of a transposed convolution becomes a stride-1 Conv + depth-to-space + crop.

    Tap k of the transposed kernel lands in phase ``phase[k]`` at low-resolution kernel index
    ``tap[k]`` (indices into the compact kernel of length ``kernel``, which the Conv applies
    with ``dilation``).  The Conv output has ``L + conv_extra`` positions, the depth-to-space
    output ``stride * (L + conv_extra)``, of which ``[crop_start, len - crop_drop_end)`` is kept.
    """

    stride: int
    phase: tuple[int, ...]
    tap: tuple[int, ...]
    kernel: int
    dilation: int
    pad_begin: int
    pad_end: int
    crop_start: int
    crop_drop_end: int

    @property
    def effective_kernel(self) -> int:
        return (self.kernel - 1) * self.dilation + 1

    @property
    def conv_extra(self) -> int:
        return self.pad_begin + self.pad_end - self.effective_kernel + 1


@functools.lru_cache(maxsize=1024)  # a pure function of a frozen Axis; emitters ask several times a site
def plan_subpixel_axis(axis: Axis) -> SubpixelAxis:
    """Min-align polyphase decomposition of one axis (DESIGN.md §2a).

    With ``a = pb mod s`` and ``B = floor(pb / s)``, tap k (offset ``k*d``) belongs to phase
    ``r = k*d mod s`` and reads low-resolution input ``m - c - delta_k`` where
    ``delta_k = floor(k*d / s) - B``; the Conv kernel index is ``j = max(delta) - delta_k``.
    When s divides d the taps are evenly spaced by d/s, which the Conv expresses as dilation.
    """
    s, d, k_len = axis.stride, axis.dilation, axis.kernel
    pb, e = axis.crop_begin, axis.extension
    a, big_b = pb % s, pb // s
    offsets = [k * d for k in range(k_len)]
    phase = tuple(o % s for o in offsets)
    deltas = [o // s - big_b for o in offsets]
    top = max(deltas)  # Pb of DESIGN.md
    span = top - min(deltas)  # effective low-res kernel minus one
    if d % s == 0 and k_len > 1:
        conv_dilation = d // s
        tap = tuple(k_len - 1 - k for k in range(k_len))
        compact = k_len
    else:
        conv_dilation = 1
        tap = tuple(top - delta for delta in deltas)
        compact = span + 1
    pad_begin = max(top, 0)
    shift = max(-top, 0)  # low-res positions to drop at the start when Pb < 0
    crop_start = shift * s + a
    needed_extra = shift + _ceil_div(a + e, s)  # conv positions beyond L that the crop reads
    pad_end = max(needed_extra - pad_begin + span, 0)
    conv_extra = pad_begin + pad_end - span
    drop_end = s * conv_extra - crop_start - e
    return SubpixelAxis(s, phase, tap, compact, conv_dilation, pad_begin, pad_end, crop_start, drop_end)


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def subpixel_weight(weight: np.ndarray, group: int, plans: tuple[SubpixelAxis, ...]) -> np.ndarray:
    """ConvTranspose weight ``[Cin, Cout/g, K...]`` -> sub-pixel Conv weight ``[Cout*S, Cin/g, Ks...]``.

    Output channel order is CRD: ``c*S + phase`` with ``phase`` the row-major index of the
    per-axis phases, so the Conv of group g keeps its groups contiguous.  A pure rearrangement
    by indexing (no arithmetic, so inf/NaN weights and every dtype survive bit for bit):
    ``V[(g, c), (r0, r1, ...), ci, (j0, j1, ...)] = W[(g, ci), c, (k0, k1, ...)]``.
    """
    c_in, c_out_g = weight.shape[:2]
    rank = len(plans)
    cig = c_in // group
    w = weight.reshape((group, cig, c_out_g) + weight.shape[2:])
    out = np.zeros(
        (group, c_out_g) + tuple(p.stride for p in plans) + (cig,) + tuple(p.kernel for p in plans),
        dtype=weight.dtype,
    )
    grids = np.meshgrid(*[np.arange(len(p.phase)) for p in plans], indexing="ij")
    phase_idx = tuple(np.asarray(p.phase)[k] for p, k in zip(plans, grids))
    tap_idx = tuple(np.asarray(p.tap)[k] for p, k in zip(plans, grids))
    # advanced indices separated by a slice: numpy puts the broadcast (K...) dims first
    out[(slice(None), slice(None)) + phase_idx + (slice(None),) + tap_idx] = np.moveaxis(
        w, [1, 2], [2, 1]
    ).transpose(tuple(range(3, 3 + rank)) + (0, 1, 2))
    n_phase = math.prod(p.stride for p in plans)
    return out.reshape((group * c_out_g * n_phase, cig) + tuple(p.kernel for p in plans))


def subpixel_bias(bias: np.ndarray, n_phase: int) -> np.ndarray:
    """Each output channel's bias repeated for its ``n_phase`` CRD phases."""
    return np.repeat(bias, n_phase)


@dataclass(frozen=True)
class PhaseAxis:
    """Output phase r of one axis (outputs ``s*m + r``) as its own stride-1 Conv with exact pads.

    Conv kernel index j reads transposed-kernel tap ``taps[j]``, applied with ``dilation``; the
    Conv has ``L + extension/s`` outputs, exactly the phase's share of the output.
    """

    taps: tuple[int, ...]
    dilation: int
    pad_begin: int
    pad_end: int


@functools.lru_cache(maxsize=1024)  # a pure function of a frozen Axis; emitters ask several times a site
def plan_phase_axis(axis: Axis) -> tuple[PhaseAxis, ...] | str:
    """One exact stride-1 Conv per output phase of ``axis``, or why there is none.

    Output ``o = s*m + r`` is ``F[o + pb] = sum x[i]*W[k]`` over ``i*s + k*d = s*m + r + pb``, so
    phase r reads the taps k with ``k*d = r + pb (mod s)`` at low-resolution offsets
    ``delta_k = (r + pb - k*d)/s``.  Those are evenly spaced (by ``d/gcd(s, d)``, the Conv's
    dilation), so the phase is a Conv with pads ``-min delta`` and ``max delta + e/s``.  Needs
    ``s | e`` (every phase as long as the others, so that the phases concatenate), a tap in every
    phase and non-negative pads (no crop beyond the kernel's reach).
    """
    s, d, k_len, pb, e = axis.stride, axis.dilation, axis.kernel, axis.crop_begin, axis.extension
    if e % s:
        return f"output length is stride*L{e:+d}: its phases differ in length"
    out = []
    for r in range(s):
        found = sorted(((r + pb - k * d) // s, k) for k in range(k_len) if (r + pb - k * d) % s == 0)
        if not found:
            return f"output phase {r} reads no tap (effective kernel {axis.effective_kernel} < stride {s})"
        deltas = [delta for delta, _ in found]
        dilation = deltas[1] - deltas[0] if len(deltas) > 1 else 1
        pad_begin, pad_end = -deltas[0], deltas[-1] + e // s
        if pad_begin < 0 or pad_end < 0:
            return f"output phase {r} needs pads {pad_begin}/{pad_end}: the crop reaches beyond the kernel"
        out.append(PhaseAxis(tuple(k for _, k in found), dilation, pad_begin, pad_end))
    return tuple(out)


def phase_weight(weight: np.ndarray, group: int, phases: tuple[PhaseAxis, ...]) -> np.ndarray:
    """ConvTranspose weight ``[Cin, Cout/g, K...]`` -> the Conv weight ``[Cout, Cin/g, len(taps)...]`` of
    one output phase (one PhaseAxis per spatial axis): ``V[(g, c), ci, j...] = W[(g, ci), c, taps[j]...]``,
    a pure rearrangement."""
    c_in, c_out_g = weight.shape[:2]
    cig = c_in // group
    sub = weight[(slice(None), slice(None)) + np.ix_(*[np.asarray(p.taps) for p in phases])]
    sub = sub.reshape((group, cig, c_out_g) + sub.shape[2:]).swapaxes(1, 2)
    return sub.reshape((group * c_out_g, cig) + sub.shape[3:])


def crd_to_dcr_permutation(channels: int, n_phase: int) -> np.ndarray:
    """Index array p with ``dcr[i] = crd[p[i]]``: DCR order is ``phase*C + c``, CRD ``c*S + phase``."""
    return np.arange(channels * n_phase).reshape(channels, n_phase).T.reshape(-1)


# ---------------------------------------------------------------------------------------------
# float64 references (for tests and for per-site checks; slow and simple on purpose)


def conv_transpose_reference(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    axes: tuple[Axis, ...],
    group: int = 1,
) -> np.ndarray:
    """Direct float64 transposed convolution: scatter every input tap, then crop ``[pb, pb+Lout)``."""
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    n, c_in = x.shape[:2]
    lengths = x.shape[2:]
    c_out_g = weight.shape[1]
    full = [(ln - 1) * a.stride + a.effective_kernel for ln, a in zip(lengths, axes)]
    f = np.zeros((n, group * c_out_g) + tuple(full))
    cig = c_in // group
    for gi in range(group):
        xs = x[:, gi * cig : (gi + 1) * cig]
        ws = weight[gi * cig : (gi + 1) * cig]
        for kidx in np.ndindex(*weight.shape[2:]):
            contrib = np.einsum("ni...,io->no...", xs, ws[(slice(None), slice(None)) + kidx])
            sl = tuple(
                slice(k * a.dilation, k * a.dilation + (ln - 1) * a.stride + 1, a.stride)
                for k, a, ln in zip(kidx, axes, lengths)
            )
            f[(slice(None), slice(gi * c_out_g, (gi + 1) * c_out_g)) + sl] += contrib
    return _crop(f, axes, lengths, bias)


def _crop(f: np.ndarray, axes, lengths, bias) -> np.ndarray:
    out_len = [a.output_length(ln) for a, ln in zip(axes, lengths)]
    y = np.zeros(f.shape[:2] + tuple(out_len))
    src, dst = [], []
    for a, lo, lf in zip(axes, out_len, f.shape[2:]):
        begin, end = max(a.crop_begin, 0), min(a.crop_begin + lo, lf)
        src.append(slice(begin, max(end, begin)))
        dst.append(slice(begin - a.crop_begin, begin - a.crop_begin + max(end - begin, 0)))
    y[(slice(None), slice(None)) + tuple(dst)] = f[(slice(None), slice(None)) + tuple(src)]
    if bias is not None:
        y += np.asarray(bias, dtype=np.float64).reshape((1, -1) + (1,) * len(axes))
    return y


def conv_reference(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    pads_begin: tuple[int, ...],
    pads_end: tuple[int, ...],
    dilations: tuple[int, ...],
    group: int = 1,
) -> np.ndarray:
    """Direct float64 stride-1 Conv (cross-correlation) with zero padding."""
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    rank = x.ndim - 2
    pad = [(0, 0), (0, 0)] + list(zip(pads_begin, pads_end))
    xp = np.pad(x, pad)
    ks = weight.shape[2:]
    out_len = [xp.shape[2 + i] - (ks[i] - 1) * dilations[i] for i in range(rank)]
    c_out = weight.shape[0]
    cig, cog = weight.shape[1], c_out // group
    y = np.zeros((x.shape[0], c_out) + tuple(out_len))
    for gi in range(group):
        xs = xp[:, gi * cig : (gi + 1) * cig]
        ws = weight[gi * cog : (gi + 1) * cog]
        for kidx in np.ndindex(*ks):
            sl = tuple(slice(k * dl, k * dl + o) for k, dl, o in zip(kidx, dilations, out_len))
            y[:, gi * cog : (gi + 1) * cog] += np.einsum(
                "ni...,oi->no...", xs[(slice(None), slice(None)) + sl], ws[(slice(None), slice(None)) + kidx]
            )
    if bias is not None:
        y += np.asarray(bias, dtype=np.float64).reshape((1, -1) + (1,) * rank)
    return y


def depth_to_space_crd(y: np.ndarray, strides: tuple[int, ...]) -> np.ndarray:
    """Rearrange ``[N, C*S, Q...]`` (CRD channel order) into ``[N, C, Q0*s0, Q1*s1, ...]``."""
    n, cs = y.shape[:2]
    q = y.shape[2:]
    rank = len(strides)
    c = cs // math.prod(strides)
    z = y.reshape((n, c) + tuple(strides) + tuple(q))
    order = [0, 1] + [x for i in range(rank) for x in (2 + rank + i, 2 + i)]
    return z.transpose(order).reshape((n, c) + tuple(qi * si for qi, si in zip(q, strides)))


def subpixel_reference(x: np.ndarray, weight, bias, axes: tuple[Axis, ...], group: int = 1) -> np.ndarray:
    """The sub-pixel form computed with the float64 references: Conv -> depth-to-space -> crop."""
    plans = tuple(plan_subpixel_axis(a) for a in axes)
    n_phase = math.prod(a.stride for a in axes)
    v = subpixel_weight(np.asarray(weight, dtype=np.float64), group, plans)
    b = None if bias is None else subpixel_bias(np.asarray(bias, dtype=np.float64), n_phase)
    y = conv_reference(
        x, v, b, tuple(p.pad_begin for p in plans), tuple(p.pad_end for p in plans),
        tuple(p.dilation for p in plans), group,
    )
    z = depth_to_space_crd(y, tuple(a.stride for a in axes))
    sl = tuple(slice(p.crop_start, z.shape[2 + i] - p.crop_drop_end) for i, p in enumerate(plans))
    return z[(slice(None), slice(None)) + sl]


# ---------------------------------------------------------------------------------------------
# Resize(nearest, integer s) + Conv  ->  transposed convolution (DESIGN.md R1)


def phase_reference(x: np.ndarray, weight, bias, axes: tuple[Axis, ...], group: int = 1) -> np.ndarray:
    """The per-phase layout in float64: one Conv per output phase (plan_phase_axis, phase_weight),
    interleaved ``y[..., s*m + r, ...] = phase_r[..., m, ...]``.  Raises ValueError without a plan."""
    plans = [plan_phase_axis(a) for a in axes]
    bad = next((p for p in plans if isinstance(p, str)), None)
    if bad is not None:
        raise ValueError(bad)
    lengths = x.shape[2:]
    y = np.zeros(x.shape[:1] + (weight.shape[1] * group,) + tuple(a.output_length(n) for a, n in zip(axes, lengths)))
    for r in np.ndindex(*[a.stride for a in axes]):
        phases = tuple(p[i] for p, i in zip(plans, r))
        out = conv_reference(x, phase_weight(np.asarray(weight, np.float64), group, phases), bias,
                             tuple(p.pad_begin for p in phases), tuple(p.pad_end for p in phases),
                             tuple(p.dilation for p in phases), group)
        y[(slice(None), slice(None)) + tuple(slice(ri, None, a.stride) for ri, a in zip(r, axes))] = out
    return y


def upsample_conv_weight(conv_weight: np.ndarray, group: int, taps, dilations) -> np.ndarray:
    """Conv weight ``V`` after an upsampling with per-axis (depthwise, separable) kernel ``taps``.

    ``W[ci, co, k] = sum_j taps[k - j*dc] * flip(V)[co, ci, j]`` per axis, channels swapped per
    group; ``K = len(taps) + (Kc-1)*dc``.  Summed in float64 and rounded once to the weight dtype.
    """
    rank = conv_weight.ndim - 2
    v = np.asarray(conv_weight, dtype=np.float64)
    v = v[(slice(None), slice(None)) + (slice(None, None, -1),) * rank]
    for ax, (t, dc) in enumerate(zip(taps, dilations)):
        axis = 2 + ax
        kc = v.shape[axis]
        spread = np.zeros((kc, (kc - 1) * dc + len(t)))  # spread[j, j*dc + r] = taps[r]
        for j in range(kc):
            spread[j, j * dc:j * dc + len(t)] = t
        v = np.moveaxis(np.tensordot(v, spread, axes=([axis], [0])), -1, axis)
    c_out, cig = v.shape[:2]
    cog = c_out // group
    w = v.reshape((group, cog, cig) + v.shape[2:]).swapaxes(1, 2)
    return w.reshape((group * cig, cog) + v.shape[2:]).astype(conv_weight.dtype)


def upsample_conv_axis(up: Axis, kernel: int, dilation: int, pad_begin: int, pad_end: int) -> Axis:
    """An upsampling (transposed conv ``up``, dilation 1) followed by a stride-1 Conv, as one axis.

    Exact when the Conv never reads past the upsampled signal into values ``up`` cropped away:
    zero Conv pads, or ``up`` uncropped (``pb = 0`` and ``Lout`` = the full result).
    ``pb = pb_up - Pb + (Kc-1)*dc``, ``e = e_up + Pb + Pe - (Kc-1)*dc``, ``K = K_up + (Kc-1)*dc``.
    """
    span = (kernel - 1) * dilation
    return Axis(up.stride, 1, up.kernel + span, up.crop_begin - pad_begin + span, up.extension + pad_begin + pad_end - span)


# ---------------------------------------------------------------------------------------------
# sub-pixel Conv -> depth-to-space  ->  transposed convolution (DESIGN.md R2)


def subpixel_conv_axis(stride: int, kernel: int, dilation: int, pad_begin: int, pad_end: int) -> Axis:
    """Geometry of stride-1 Conv(Ks, dc, pads) -> depth-to-space(s) as a transposed convolution.

    Low-resolution output m, tap j reads ``x[m + j*dc - Pb]`` and lands at ``o = m*s + r``; with
    ``K = s*(dc*(Ks-1) + 1)`` and tap ``k = s*dc*(Ks-1-j) + r`` that is ``F[o + pb]`` for
    ``pb = s*(dc*(Ks-1) - Pb)``, over ``s*(L + Pb + Pe - dc*(Ks-1))`` outputs.
    """
    span = dilation * (kernel - 1)
    return Axis(stride, 1, stride * (span + 1), stride * (span - pad_begin), stride * (pad_begin + pad_end - span))


def subpixel_conv_weight(
    conv_weight: np.ndarray, group: int, strides, dilations, channel_map: np.ndarray
) -> tuple[np.ndarray, int]:
    """Conv weight ``V [C*S, Cin/g, Ks...]`` of a sub-pixel Conv -> ``(W [Cin, C/g', K...], g')``.

    ``channel_map[c, phase]`` is the Conv output channel that depth-to-space puts at output
    channel c and phase ``(r0, r1, ...)`` (row-major).  ``W[ci, c, s*dc*(Ks-1-j) + r] =
    V[channel_map[c, r], ci, j]``: a pure rearrangement (copies only).  When every output
    channel's phases come from one Conv group and the groups line up, the result keeps group g;
    otherwise it is a dense (group 1) kernel with zero blocks, which is just as exact.
    """
    c_conv, cig = conv_weight.shape[:2]
    ks = conv_weight.shape[2:]
    c, n_phase = channel_map.shape
    c_in = cig * group
    kernel = tuple(s * (d * (k - 1) + 1) for s, d, k in zip(strides, dilations, ks))
    conv_group = channel_map // (c_conv // group)  # [C, S]: the Conv group of each (c, phase)
    dense = np.zeros((c_in, c) + kernel, dtype=conv_weight.dtype)
    rows = conv_group[:, :, None] * cig + np.arange(cig)  # [C, S, cig]: input channels read
    cols = np.broadcast_to(np.arange(c)[:, None, None], rows.shape)
    phases = list(np.ndindex(*strides))
    for j in np.ndindex(*ks):
        for p, r in enumerate(phases):
            k = tuple(s * d * (kk - 1 - jj) + rr for s, d, kk, jj, rr in zip(strides, dilations, ks, j, r))
            values = conv_weight[(channel_map[:, p], slice(None)) + j]  # [C, cig]
            dense[(rows[:, p], cols[:, p]) + k] = values
    cog = c // group if c % group == 0 else 0
    aligned = cog and bool(np.all(conv_group == (np.arange(c) // cog)[:, None]))
    if group == 1 or not aligned:
        return dense, 1
    blocks = [dense[g * cig:(g + 1) * cig, g * cog:(g + 1) * cog] for g in range(group)]
    return np.concatenate(blocks, axis=0), group


def merge_phase_convs(parts) -> tuple[np.ndarray, np.ndarray | None, int, tuple, tuple, tuple]:
    """Stride-1 Convs of one input whose outputs are concatenated -> one Conv with the union of
    their taps: ``(weight, bias, group, kernel, pads_begin, pads_end)``, dilation 1.

    ``parts``: ``(weight [Cp, Cin/g, K...], bias or None, group, dilations, pads_begin, pads_end)``.
    Output m of part p reads ``x[m + j*d - pb]``; the union Conv spans the offsets
    ``[min(-pb), max((K-1)*d - pb)]`` and puts each part's taps at their offsets, zeros elsewhere.
    Exact when every part has as many outputs (``pb + pe - (K-1)*d`` equal), which a Concat needs
    anyway; ValueError otherwise.  Grouped parts become dense (group 1) unless there is one part.
    """
    rank = parts[0][0].ndim - 2
    groups = {g for _, _, g, _, _, _ in parts}
    if len(groups) != 1 or any(w.ndim != rank + 2 for w, *_ in parts):
        raise ValueError("the Convs differ in group or rank")
    group = groups.pop()
    c_in = parts[0][0].shape[1] * group
    if any(w.shape[1] * group != c_in for w, *_ in parts):
        raise ValueError("the Convs differ in input channels")
    lo, hi, extra = [], [], set()
    for i in range(rank):
        lo.append(min(-pb[i] for _, _, _, _, pb, _ in parts))
        hi.append(max((w.shape[2 + i] - 1) * d[i] - pb[i] for w, _, _, d, pb, _ in parts))
    for w, _, _, d, pb, pe in parts:
        extra.add(tuple(pb[i] + pe[i] - (w.shape[2 + i] - 1) * d[i] for i in range(rank)))
    if len(extra) != 1:
        raise ValueError("the Convs produce different output lengths")
    extra = extra.pop()
    kernel = tuple(h - lw + 1 for h, lw in zip(hi, lo))
    dense = group if len(parts) > 1 else 1  # a grouped part's block-diagonal weight, made dense
    out_group = 1 if len(parts) > 1 else group
    c_total = sum(w.shape[0] for w, *_ in parts)
    dtype = np.result_type(*[w.dtype for w, *_ in parts])
    merged = np.zeros((c_total, c_in // out_group) + kernel, dtype=dtype)
    row = 0
    for w, _, _, d, pb, _ in parts:
        cp, cig = w.shape[:2]
        cog = cp // group
        for k in np.ndindex(*w.shape[2:]):
            at = tuple(k[i] * d[i] - pb[i] - lo[i] for i in range(rank))
            for g in range(dense):
                rows = slice(row + g * cog, row + (g + 1) * cog) if dense > 1 else slice(row, row + cp)
                cols = slice(g * cig, (g + 1) * cig) if dense > 1 else slice(None)
                src = w[(slice(g * cog, (g + 1) * cog) if dense > 1 else slice(None), slice(None)) + k]
                merged[(rows, cols) + at] = src
        row += cp
    biases = [b for _, b, *_ in parts]
    bias = None
    if any(b is not None for b in biases):
        bias = np.concatenate([np.zeros(w.shape[0], dtype) if b is None else np.asarray(b)
                               for (w, *_), b in zip(parts, biases)])
    pads_begin = tuple(-v for v in lo)
    pads_end = tuple(e + h for e, h in zip(extra, hi))
    return merged, bias, out_group, kernel, pads_begin, pads_end


def depth_to_space_map(channels: int, strides, order: tuple[str, ...]) -> np.ndarray:
    """``channel_map[c, phase]`` of a depth-to-space whose channel axis splits as ``order``.

    ``order`` names the split factors of the channel axis, outermost first: "c" for the output
    channel and an axis index (0, 1, ...) for each stride, e.g. CRD 2-D is ``("c", 0, 1)`` and DCR
    ``(0, 1, "c")``.
    """
    sizes = [channels if f == "c" else strides[f] for f in order]
    ids = np.arange(math.prod(sizes)).reshape(sizes)
    perm = [order.index("c")] + [order.index(i) for i in range(len(strides))]
    return ids.transpose(perm).reshape(channels, -1)


def split_phase_bias(bias: np.ndarray, channel_map: np.ndarray, strides) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Conv bias of a sub-pixel Conv -> ``(per-channel bias, None)`` or ``(None, per-phase bias)``."""
    per_phase = bias[channel_map]  # [C, S]
    if np.all(per_phase == per_phase[:, :1]):
        return per_phase[:, 0].copy(), None
    return None, per_phase.reshape((channel_map.shape[0],) + tuple(strides))


def phase_pattern(phase_bias: np.ndarray, axes: tuple[Axis, ...]) -> np.ndarray:
    """Per-phase bias re-indexed by output position: ``P[c, o mod s] = B[c, (o + pb) mod s]``."""
    out = phase_bias
    for i, a in enumerate(axes):
        out = np.take(out, (np.arange(a.stride) + a.crop_begin) % a.stride, axis=1 + i)
    return out


# ---------------------------------------------------------------------------------------------
# transposed convolution  ->  (zero insertion | Resize nearest) + Conv (DESIGN.md §2b, §2c)


def dilate_kernel(weight: np.ndarray, dilations) -> np.ndarray:
    """``W[..., K...]`` with dilation d -> the dense kernel of length ``(K-1)*d + 1`` (zeros between)."""
    if all(d == 1 for d in dilations):
        return weight
    shape = weight.shape[:2] + tuple((k - 1) * d + 1 for k, d in zip(weight.shape[2:], dilations))
    out = np.zeros(shape, dtype=weight.dtype)
    out[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in dilations)] = weight
    return out


def transposed_to_conv_weight(weight: np.ndarray, group: int) -> np.ndarray:
    """``W [Cin, Cout/g, K...]`` -> Conv weight ``[Cout, Cin/g, K...]``: flip every spatial axis, swap
    in/out channels per group.  Copies only."""
    c_in, cog = weight.shape[:2]
    rank = weight.ndim - 2
    cig = c_in // group
    w = weight[(slice(None), slice(None)) + (slice(None, None, -1),) * rank]
    w = w.reshape((group, cig, cog) + weight.shape[2:]).swapaxes(1, 2)
    return np.ascontiguousarray(w.reshape((group * cog, cig) + weight.shape[2:]))


def factor_box(weight: np.ndarray, strides, rtol: float) -> tuple[np.ndarray | None, str]:
    """Factor a dense transposed kernel as ``box_s ⊛ G`` on every axis (DESIGN.md §2c).

    Returns ``(G [Cin, Cout/g, K - s + 1 ...] in the weight dtype, "")`` or ``(None, reason)``.
    Per axis ``G[k] = W[k] - W[k-1] + G[k-s]``, computed in float64; the factorization holds
    when ``box ⊛ G`` reproduces W within ``rtol * max|W|`` (float rounding of W itself), which
    needs the ``s`` phase sums of every axis to agree.
    """
    g = np.asarray(weight, dtype=np.float64)
    scale = float(np.max(np.abs(g))) if g.size else 0.0
    if not np.isfinite(scale):
        return None, "the kernel has non-finite values"
    for i, s in enumerate(strides):
        if s == 1:
            continue
        axis = 2 + i
        k = g.shape[axis]
        if k < s:
            return None, f"axis {i}: kernel extent {k} < stride {s}"
        w = np.moveaxis(g, axis, 0)
        out = np.zeros((k - s + 1,) + w.shape[1:])
        for t in range(k - s + 1):
            out[t] = w[t] - (w[t - 1] if t >= 1 else 0) + (out[t - s] if t >= s else 0)
        rebuilt = np.zeros_like(w)
        for r in range(s):
            rebuilt[r:r + k - s + 1] += out
        err = float(np.max(np.abs(rebuilt - w))) if w.size else 0.0
        if err > rtol * scale:
            return None, (f"axis {i}: the kernel is not box_{s} ⊛ G (its {s} phase sums differ; "
                          f"residual {err:.3g} vs max |W| {scale:.3g})")
        g = np.moveaxis(out, 0, axis)
    return g.astype(weight.dtype), ""


def box_conv_weight(weight: np.ndarray, strides) -> np.ndarray:
    """``box_s ⊛ G`` per axis in float64, rounded once (the inverse of :func:`factor_box`)."""
    w = np.asarray(weight, dtype=np.float64)
    for i, s in enumerate(strides):
        axis = 2 + i
        moved = np.moveaxis(w, axis, 0)
        out = np.zeros((moved.shape[0] + s - 1,) + moved.shape[1:])
        for r in range(s):
            out[r:r + moved.shape[0]] += moved
        w = np.moveaxis(out, 0, axis)
    return w.astype(weight.dtype)


# ---------------------------------------------------------------------------------------------
# Resize with an integer scale as an edge-padded depthwise transposed convolution (DESIGN.md R3)


@dataclass(frozen=True)
class InterpolationAxis:
    """One axis of an integer-scale Resize as ``Pad(edge) -> transposed conv -> crop``.

    Output ``o`` reads source coordinate ``c(o)`` with ``c(o + s) = c(o) + 1``, so the taps of
    phase ``r = o mod s`` sit at fixed offsets from ``o // s``: a transposed convolution with
    kernel ``taps`` (stride s) over the input edge-padded by ``pad_begin``/``pad_end``, cropped
    at ``crop_begin``, ``s*L`` outputs.  Edge padding is the spec's index clamping.
    """

    stride: int
    taps: tuple[float, ...]
    crop_begin: int
    pad_begin: int
    pad_end: int

    def axis(self) -> Axis:
        return Axis(self.stride, 1, len(self.taps), self.crop_begin, -self.stride * (self.pad_begin + self.pad_end))


def _source_coordinate(o: int, s: int, ctm: str) -> float:
    if ctm in ("half_pixel", "pytorch_half_pixel", "half_pixel_symmetric"):
        return (o + 0.5) / s - 0.5
    if ctm == "asymmetric":
        return o / s
    if ctm == "tf_half_pixel_for_nn":
        return (o + 0.5) / s
    raise ValueError(f"coordinate_transformation_mode={ctm!r} is not periodic for an integer scale")


def _round(c: float, nearest_mode: str) -> int:
    if nearest_mode == "floor":
        return math.floor(c)
    if nearest_mode == "ceil":
        return math.ceil(c)
    if nearest_mode == "round_prefer_floor":
        return math.ceil(c - 0.5)
    if nearest_mode == "round_prefer_ceil":
        return math.floor(c + 0.5)
    raise ValueError(f"nearest_mode={nearest_mode!r} is not supported")


def interpolation_axis(stride: int, mode: str, ctm: str, nearest_mode: str) -> InterpolationAxis:
    """Per-phase taps of an integer-scale nearest/linear Resize axis; ValueError says what blocks it.

    ``(r, delta, w)``: output ``m*s + r`` takes ``w * x[clamp(m + delta)]``.  With edge pads
    ``p_b = max(0, -min delta)``, ``p_e = max(0, max delta)`` the padded input is ``P[j] =
    x[clamp(j - p_b)]`` and tap ``(r, delta)`` lands at kernel index ``k = r + pb - (delta + p_b)*s``,
    ``pb`` chosen so that the smallest k is 0.
    """
    s = stride
    if s > MAX_FACTOR:
        raise ValueError(f"scale {s} is over {MAX_FACTOR}, the largest factor this tool converts")
    if s == 1:  # onnxruntime copies an axis with scale 1, whatever the coordinate mode
        return InterpolationAxis(1, (1.0,), 0, 0, 0)
    entries = []
    for r in range(s):
        c = _source_coordinate(r, s, ctm)
        if mode == "nearest":
            entries.append((r, _round(c, nearest_mode), 1.0))
        elif mode == "linear":
            i0 = math.floor(c)
            f = c - i0
            entries += [(r, d, w) for d, w in ((i0, 1.0 - f), (i0 + 1, f)) if w != 0.0]
        else:
            raise ValueError(f"mode={mode!r} is not nearest or linear")
    deltas = [d for _, d, _ in entries]
    pad_begin, pad_end = max(0, -min(deltas)), max(0, max(deltas))
    pb = -min(r - (d + pad_begin) * s for r, d, _ in entries)
    k_len = max(r + pb - (d + pad_begin) * s for r, d, _ in entries) + 1
    taps = [0.0] * k_len
    for r, d, w in entries:
        taps[r + pb - (d + pad_begin) * s] += w
    return InterpolationAxis(s, tuple(taps), pb, pad_begin, pad_end)


def interpolation_weight(axes: list[InterpolationAxis], channels: int, dtype) -> np.ndarray:
    """Depthwise transposed-conv weight ``[C, 1, K...]``: the outer product of the per-axis taps."""
    kernel = np.ones(())
    for a in axes:
        kernel = np.multiply.outer(kernel, np.asarray(a.taps, dtype=np.float64))
    return np.broadcast_to(kernel.astype(dtype), (channels, 1) + kernel.shape).copy()


# ---------------------------------------------------------------------------------------------
# quantized weights (QDQ models): rearrangements carry the integers, scales and zero points along


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A weight read through ``DequantizeLinear``: ``(values - zero_point) * scale``.

    ``axis`` is the per-channel axis of ``values`` (None: one scale for the whole tensor).
    """

    values: np.ndarray  # integer tensor
    scale: np.ndarray  # 0-d / 1-element (per tensor) or 1-D along ``axis``
    zero_point: np.ndarray | None
    axis: int | None
    node: str  # the DequantizeLinear node, for messages


def gather_map(transform, shape: tuple[int, ...]) -> np.ndarray | None:
    """Flat index map of a linear weight transform that only moves entries, or None.

    ``transform(w).flat[i] == w.flat[m[i]]`` for ``m[i] >= 0`` and ``0`` where ``m[i] == -1``.
    Found by transforming the numbers 1..N (exact in float64), confirmed on a random probe:
    any transform that adds, scales or mixes entries fails one of the two checks.
    """
    n = math.prod(shape)
    if n >= 1 << 52:
        return None
    ids = transform(np.arange(1, n + 1, dtype=np.float64).reshape(shape))
    flat = np.asarray(ids, dtype=np.float64).reshape(-1)
    m = np.rint(flat).astype(np.int64) - 1
    if not np.array_equal(flat, (m + 1).astype(np.float64)) or (m.size and (m.min() < -1 or m.max() >= n)):
        return None
    probe = np.random.default_rng(0).uniform(1.0, 2.0, size=shape)
    moved = np.asarray(transform(probe), dtype=np.float64).reshape(-1)
    expected = np.where(m >= 0, probe.reshape(-1)[np.maximum(m, 0)], 0.0)
    return m.reshape(ids.shape) if np.array_equal(moved, expected) else None


def rearrange_quantized(quant: QuantizedWeight, transform, channel_axis: int | None) -> QuantizedWeight:
    """Apply a pure rearrangement ``transform`` (float weight -> float weight) to a quantized weight.

    The integers move like the floats; entries the transform creates (structural zeros) get the
    zero point of their channel, so they dequantize to exactly 0.  A per-channel scale follows its
    channel to ``channel_axis`` of the result; ValueError when the transform mixes values (box
    factorization, kernel sums) or scatters one channel's entries across several result channels.
    """
    m = gather_map(transform, quant.values.shape)
    if m is None:
        raise ValueError(f"it changes the values of the int weights of DequantizeLinear '{quant.node}', "
                         "so the quantization would not be exact")
    values = quant.values.reshape(-1)[np.maximum(m, 0)]
    if quant.axis is None:
        zero_point = None if quant.zero_point is None else quant.zero_point.reshape(-1)[:1].reshape(())
        values = np.where(m >= 0, values, 0 if zero_point is None else zero_point).astype(quant.values.dtype)
        return QuantizedWeight(values, quant.scale.reshape(-1)[:1].reshape(()), zero_point, None, quant.node)
    if channel_axis is None:
        raise ValueError(f"DequantizeLinear '{quant.node}' is per channel and the target weight has no channel axis")
    source_channel = np.unravel_index(np.maximum(m, 0), quant.values.shape)[quant.axis]
    source_channel = np.where(m >= 0, source_channel, -1)
    moved = np.moveaxis(source_channel, channel_axis, 0).reshape(m.shape[channel_axis], -1)
    n_out = moved.shape[0]
    scale = np.ones(n_out, dtype=quant.scale.dtype)
    zp_src = quant.zero_point if quant.zero_point is not None else np.zeros(quant.scale.shape, quant.values.dtype)
    zero = np.zeros(n_out, dtype=zp_src.dtype)
    for j in range(n_out):
        chans = np.unique(moved[j][moved[j] >= 0])
        if len(chans) > 1:
            raise ValueError(f"per-channel scales of DequantizeLinear '{quant.node}' (axis {quant.axis}) do not "
                             f"map to one channel each of the target weight")
        if len(chans) == 1:
            scale[j], zero[j] = quant.scale[chans[0]], zp_src[chans[0]]
    fill = np.moveaxis(np.broadcast_to(zero.reshape((-1,) + (1,) * (m.ndim - 1)),
                                       (n_out,) + tuple(np.delete(m.shape, channel_axis))), 0, channel_axis)
    values = np.where(m >= 0, values, fill).astype(quant.values.dtype)
    return QuantizedWeight(values, scale, zero if quant.zero_point is not None or np.any(zero) else None,
                           channel_axis, quant.node)
