"""The pure numpy math: golden seed cases and property tests against direct float64 references."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_uprewrite.weights import (
    Axis,
    conv_transpose_reference,
    conv_reference,
    crd_to_dcr_permutation,
    merge_phase_convs,
    phase_reference,
    plan_phase_axis,
    plan_subpixel_axis,
    subpixel_reference,
    subpixel_weight,
)


def test_seed_1d():
    """Input [2, 3], kernel [1, 2, 3], stride 2 -> [2, 4, 9, 6, 9]."""
    x = np.array([[[2.0, 3.0]]])
    w = np.array([[[1.0, 2.0, 3.0]]])
    axes = (Axis(2, 1, 3, 0, 1),)
    for f in (conv_transpose_reference, subpixel_reference):
        np.testing.assert_array_equal(f(x, w, None, axes)[0, 0], [2, 4, 9, 6, 9])


def test_seed_2d_padding_0_and_1():
    x = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    w = np.array([[[[1.0, 1, 1], [0, 0, 0], [-1, -1, -1]]]])
    full = [[1, 1, 3, 2, 2], [0, 0, 0, 0, 0], [2, 2, 4, 2, 2], [0, 0, 0, 0, 0], [-3, -3, -7, -4, -4]]
    cropped = [[0, 0, 0], [2, 4, 2], [0, 0, 0]]
    for axes, want in (((Axis(2, 1, 3, 0, 1),) * 2, full), ((Axis(2, 1, 3, 1, -1),) * 2, cropped)):
        for f in (conv_transpose_reference, subpixel_reference):
            np.testing.assert_array_equal(f(x, w, None, axes)[0, 0], want)


def test_design_example_k4_s2_p1_plan():
    """k4 s2 p1 -> Conv 2 taps, pads 1/1, crop starting at 1, 2H outputs."""
    plan = plan_subpixel_axis(Axis(stride=2, dilation=1, kernel=4, crop_begin=1, extension=0))
    assert (plan.kernel, plan.pad_begin, plan.pad_end, plan.crop_start) == (2, 1, 1, 1)
    length = 7
    assert 2 * (length + plan.conv_extra) - plan.crop_start - plan.crop_drop_end == 2 * length


def test_d1_weight_formula_from_design():
    """For d=1: V[c*S + r, :, Ks-1-t] = W[:, c, r + s*t]."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2, 7))
    plan = plan_subpixel_axis(Axis(3, 1, 7, 0, 0))
    v = subpixel_weight(w, 1, (plan,))
    ks = plan.kernel
    assert ks == math.ceil(7 / 3)
    for c in range(2):
        for r in range(3):
            for t in range(ks):
                k = r + 3 * t
                expect = w[:, c, k] if k < 7 else np.zeros(3)
                np.testing.assert_array_equal(v[c * 3 + r, :, ks - 1 - t], expect)


def test_weight_rearrangement_is_bit_exact_copy():
    w = np.array([[[np.inf, np.nan, -0.0, 1e-45]]], dtype=np.float32)
    v = subpixel_weight(w, 1, (plan_subpixel_axis(Axis(2, 1, 4, 0, 0)),))
    assert v.dtype == np.float32
    assert sorted(v.ravel().view(np.uint32).tolist()) == sorted(
        w.ravel().view(np.uint32).tolist() + [0] * (v.size - w.size)
    )


def test_crd_to_dcr_permutation():
    crd = np.array([f"c{c}p{p}" for c in range(3) for p in range(4)])
    dcr = crd[crd_to_dcr_permutation(3, 4)]
    assert list(dcr[:4]) == ["c0p0", "c1p0", "c2p0", "c0p1"]


axis_strategy = st.builds(
    Axis,
    stride=st.integers(1, 4),
    dilation=st.integers(1, 3),
    kernel=st.integers(1, 6),
    crop_begin=st.integers(-3, 8),
    extension=st.integers(-8, 8),
)


@settings(max_examples=300, deadline=None)
@given(
    axes=st.lists(axis_strategy, min_size=1, max_size=3),
    lengths=st.lists(st.integers(1, 4), min_size=3, max_size=3),
    group=st.integers(1, 3),
    cig=st.integers(1, 2),
    cog=st.integers(1, 2),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_subpixel_equals_transposed_convolution(axes, lengths, group, cig, cog, bias, seed):
    """Any crop (negative, beyond the full output) and any extension: exact in float64."""
    axes = tuple(axes)
    lengths = tuple(lengths[: len(axes)])
    if any(a.output_length(n) < 1 for a, n in zip(axes, lengths)):
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, group * cig) + lengths)
    w = rng.standard_normal((group * cig, cog) + tuple(a.kernel for a in axes))
    b = rng.standard_normal(group * cog) if bias else None
    ref = conv_transpose_reference(x, w, b, axes, group)
    got = subpixel_reference(x, w, b, axes, group)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 * max(1.0, np.abs(ref).max()))


@settings(max_examples=200, deadline=None)
@given(axis=axis_strategy)
def test_plan_invariants(axis):
    plan = plan_subpixel_axis(axis)
    assert plan.pad_begin >= 0 and plan.pad_end >= 0
    assert plan.crop_start >= 0 and plan.crop_drop_end >= 0
    assert 0 <= plan.crop_start - (plan.crop_start // axis.stride) * axis.stride < axis.stride
    # every tap lands once: (phase, tap) pairs are distinct and inside the compact kernel
    pairs = set(zip(plan.phase, plan.tap))
    assert len(pairs) == axis.kernel
    assert all(0 <= t < plan.kernel for t in plan.tap)


@settings(max_examples=300, deadline=None)
@given(
    axes=st.lists(axis_strategy, min_size=1, max_size=3),
    lengths=st.lists(st.integers(1, 5), min_size=3, max_size=3),
    group=st.integers(1, 2),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_phase_layout_matches_reference(axes, lengths, group, bias, seed):
    """Wherever plan_phase_axis gives a plan, one exact Conv per phase is the transposed convolution."""
    axes = tuple(axes)
    lengths = tuple(lengths[: len(axes)])
    if any(a.output_length(n) < 1 for a, n in zip(axes, lengths)):
        return
    plans = [plan_phase_axis(a) for a in axes]
    if any(isinstance(p, str) for p in plans):
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, group * 2) + lengths)
    w = rng.standard_normal((group * 2, 3) + tuple(a.kernel for a in axes))
    b = rng.standard_normal(group * 3) if bias else None
    ref = conv_transpose_reference(x, w, b, axes, group)
    got = phase_reference(x, w, b, axes, group)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 * max(1.0, np.abs(ref).max()))


@settings(max_examples=300, deadline=None)
@given(axis=axis_strategy)
def test_phase_plan_reads_every_tap_once_or_says_why(axis):
    """Each tap goes to exactly one phase; no plan only for the three documented reasons."""
    plan = plan_phase_axis(axis)
    if isinstance(plan, str):
        assert any(w in plan for w in ("phases differ in length", "reads no tap", "beyond the kernel")), plan
        return
    assert len(plan) == axis.stride
    taps = [k for p in plan for k in p.taps]
    assert sorted(taps) == list(range(axis.kernel))
    assert all(p.pad_begin >= 0 and p.pad_end >= 0 and p.dilation >= 1 for p in plan)


def test_phase_plan_of_k4_s2_p1():
    """DCGAN's k4 s2 p1: phase 0 reads taps 3, 1 over [m-1, m]; phase 1 taps 2, 0 over [m, m+1]."""
    even, odd = plan_phase_axis(Axis(stride=2, dilation=1, kernel=4, crop_begin=1, extension=0))
    assert (even.taps, even.pad_begin, even.pad_end) == ((3, 1), 1, 0)
    assert (odd.taps, odd.pad_begin, odd.pad_end) == ((2, 0), 0, 1)


@settings(max_examples=200, deadline=None)
@given(
    n_parts=st.integers(1, 4),
    kernels=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3)), min_size=4, max_size=4),
    dilations=st.lists(st.tuples(st.integers(1, 2), st.integers(1, 2)), min_size=4, max_size=4),
    begins=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=4, max_size=4),
    extra=st.tuples(st.integers(-1, 2), st.integers(-1, 2)),
    group=st.integers(1, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_merged_convs_are_the_concatenation(n_parts, kernels, dilations, begins, extra, group, seed):
    """Convs of one input, concatenated == one Conv with the union of their taps (same output lengths)."""
    rng = np.random.default_rng(seed)
    parts = []
    for k, d, b in list(zip(kernels, dilations, begins))[:n_parts]:
        end = tuple(extra[i] + (k[i] - 1) * d[i] - b[i] for i in range(2))
        if any(e < 0 for e in end):
            return
        w = rng.standard_normal((2 * group, 2, *k))
        parts.append((w, rng.standard_normal(2 * group) if seed % 2 else None, group, d, b, end))
    x = rng.standard_normal((1, 2 * group, 5, 4))
    if any(5 + extra[0] < 1 or 4 + extra[1] < 1 for _ in parts):
        return
    want = np.concatenate([conv_reference(x, w, b, pb, pe, d, g) for w, b, g, d, pb, pe in parts], axis=1)
    weight, bias, g, kernel, pads_begin, pads_end = merge_phase_convs(parts)
    assert weight.shape[2:] == kernel and (g == group if n_parts == 1 else g == 1)
    got = conv_reference(x, weight, bias, pads_begin, pads_end, (1, 1), g)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * max(1.0, np.abs(want).max()))
