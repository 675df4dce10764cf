"""Per-site verification: each rewritten site alone, on the activation that really enters it.

The original model runs once with the tensors entering and leaving every rewritten site as extra
outputs (most come free with the reference run's taps).  Each replacement then runs alone in
onnxruntime on its captured input and is compared with the captured original output, element by
element, against a tolerance derived from the magnitudes that the sum rounds:

    |rewritten_i - original_i| <= atol + 8 * eps * sqrt(T) * (|W| * |x| + |b|)_i  [+ one quantization step]

``|W| * |x|`` is the site's own transposed convolution with every weight and input value replaced
by its absolute value (computed in onnxruntime with the ConvTranspose emitter), ``T`` the products
summed per output (``Cin/group * prod(K)``) and eps that of the site's dtype: reordering a float
sum of T products changes it by about ``eps * sqrt(T)`` times the sum of their magnitudes.  With
``--rtol`` the user's ``atol + rtol * max|original|`` is used instead.  A failure names the site.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
from onnx import helper

from .emit import emit_site
from .passes import EMITTERS
from .sites import Site
from .surgery import Builder, Emission, Namer

#: safety factor over the random-walk estimate eps * sqrt(T), as for the whole-model tolerance
FACTOR = 8.0


def outer_inputs(emission: Emission) -> list[str]:
    """Tensors an emission reads that it neither produces nor holds as initializers."""
    produced = {o for n in emission.nodes for o in n.output}
    own = {t.name for t in emission.initializers}
    names = []
    for node in emission.nodes:
        for name in node.input:
            if name and name not in produced and name not in own and name not in names:
                names.append(name)
    return names


def site_model(model: onnx.ModelProto, emission: Emission, values: dict[str, np.ndarray],
               output: str) -> onnx.ModelProto:
    """A model of the emission alone: ``values`` become graph inputs, other outer names come from
    the model's initializers."""
    return sites_model(model, [emission], values, [output])


def sites_model(model: onnx.ModelProto, emissions: list[Emission], values: dict[str, np.ndarray],
                outputs: list[str]) -> onnx.ModelProto:
    """One model of several emissions side by side (their names are unique in ``model``, Namer):
    ``values`` they read become graph inputs, other outer names come from the model's initializers."""
    inits = {t.name: t for t in model.graph.initializer}
    sparse = {t.values.name: t for t in model.graph.sparse_initializer}
    inputs, extra, extra_sparse, seen = [], [], [], set()
    for emission in emissions:
        for name in outer_inputs(emission):
            if name in seen:
                continue
            seen.add(name)
            if name in values:
                v = values[name]
                inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape))
            elif name in inits:
                extra.append(inits[name])
            elif name in sparse:
                extra_sparse.append(sparse[name])
            else:
                raise KeyError(name)
    nodes = [n for e in emissions for n in e.nodes]
    own = [t for e in emissions for t in e.initializers]
    graph = helper.make_graph(nodes, "site", inputs, [onnx.ValueInfoProto(name=o) for o in outputs],
                              initializer=own + extra, sparse_initializer=extra_sparse)
    small = helper.make_model(graph, opset_imports=list(model.opset_import))
    small.ir_version = model.ir_version
    return small


def magnitude_emission(site: Site, namer: Namer, opset: int) -> tuple[Emission, str] | None:
    """``(emission, output)`` computing ``|W| * |x|`` of the site (without bias) in the sub-pixel form
    (its weights are W's taps rearranged, so |W|'s; onnxruntime's Conv runs it about twice as fast as
    its ConvTranspose) or else as a ConvTranspose; None when neither can express it (or the opset's
    Abs is one onnxruntime lacks: Abs-1, before opset 6)."""
    if opset < 6:
        return None
    output = namer(f"{site.node}/magnitude_out")
    weight = np.abs(site.weight if site.magnitude_weight is None else site.magnitude_weight).astype(site.weight.dtype)
    for form in _magnitude_forms(site):
        b = Builder(namer, f"{site.node}/magnitude")
        target = dataclasses.replace(
            site, input=b.node("Abs", [site.input], "abs"), output=output, magnitude_weight=None, bias=None,
            phase_bias=None, weight=weight, weight_quant=None, bias_quant=None, output_quant=None, requantize=None,
            addend=site.addend.magnitude() if site.addend is not None else None,
        )
        try:
            emit_site(target, EMITTERS[form], b, opset)
        except ValueError:
            continue
        return b.emission, output
    return None


#: the forms that compute a magnitude model, fastest first: each rearranges W's taps without sums
MAGNITUDE_FORMS = ("subpixel", "convtranspose")


def _magnitude_forms(site: Site) -> list[str]:
    """MAGNITUDE_FORMS, the sub-pixel form last where it has more weights than the ConvTranspose
    (a kernel shorter than the stride: phases padded with zeros, up to stride^rank times the MACs)."""
    counts = {form: EMITTERS[form].weight_count(site) for form in MAGNITUDE_FORMS}
    if any(c is None for c in counts.values()):
        return list(MAGNITUDE_FORMS)
    heavier = {form: counts[form] > counts["convtranspose"] for form in MAGNITUDE_FORMS}
    return sorted(MAGNITUDE_FORMS, key=lambda form: (heavier[form], MAGNITUDE_FORMS.index(form)))


#: how the report names the lower bound of |W|*|x| that ``magnitude_lower_bound`` computes
LOWER_BOUND_TEXT = "max(|ref|/(1+g)-|b|, 0), a lower bound of |W|*|x|"


#: sites with outputs this big are compared against ``magnitude_lower_bound`` first: their magnitude
#: model costs as much as the replacement itself (the SD VAE decoder: 0.45 s of a 6 s convert); smaller
#: ones run it at once, so that their error/tol is against |W|*|x| itself
LOWER_BOUND_FROM_ELEMENTS = 1 << 20


def lower_bound_applies(site: Site, ref: np.ndarray, quant) -> bool:
    """Whether the site's check tries ``magnitude_lower_bound`` first: a big output
    (LOWER_BOUND_FROM_ELEMENTS), and a bound that holds: not for quantized outputs (a step off),
    integer outputs, or sums of so many terms that ``(T+1)*eps >= 1/2``."""
    if quant is not None or site.requantize is not None or not np.issubdtype(ref.dtype, np.floating):
        return False
    small_sum = (site.terms_per_output + 1) * float(np.finfo(ref.dtype).eps) < 0.5
    return ref.size >= LOWER_BOUND_FROM_ELEMENTS and small_sum


@dataclasses.dataclass(frozen=True)
class LowerBound:
    """|W|*|x| >= max(|ref| * scale - |b|, 0) at every element (``magnitude_lower_bound``), computed
    from the reference chunk by chunk in compare_site."""

    scale: float


def magnitude_lower_bound(site: Site, ref: np.ndarray) -> LowerBound:
    """A lower bound of |W|*|x| at every element of the site's original output ``ref``, from ``ref``
    alone (where ``lower_bound_applies``): ``ref`` is a sum of T products and the bias, rounded, so
    ``|ref| <= (|W|*|x| + |b|) * (1 + g)`` with ``g = n*eps/(1-n*eps)``, n = T+1 (Higham's gamma),
    and ``|W|*|x| >= max(|ref| / (1 + g) - |b|, 0)``.  A per-site check that passes with it passes
    with |W|*|x| itself (its tolerance is no larger), so the magnitude model need not run."""
    product = (site.terms_per_output + 1) * float(np.finfo(ref.dtype).eps)
    return LowerBound(1.0 / (1.0 + product / (1.0 - product)))


def bias_magnitude(site: Site) -> float:
    values = [np.abs(v).max() for v in (site.bias, site.phase_bias) if v is not None and np.size(v)]
    return float(max(values)) if values else 0.0


def fake_quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """DequantizeLinear(QuantizeLinear(x)) per tensor, as onnxruntime computes it (round half to even,
    saturate to the zero point's integer type)."""
    zp = np.asarray(zero_point)
    info = np.iinfo(zp.dtype) if np.issubdtype(zp.dtype, np.integer) else np.iinfo(np.uint8)
    s = float(np.asarray(scale).reshape(-1)[0])
    z = float(zp.reshape(-1)[0]) if zp.size else 0.0
    q = np.clip(np.rint(x.astype(np.float64) / s) + z, info.min, info.max)
    return ((q - z) * s).astype(x.dtype)


def output_quantization(site: Site, emission: Emission) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, zero point) the replacement's output goes through: a Q/DQ pair inside the source form
    (``requantize``, then the original output is quantized too), or the output's own Q/DQ that the
    emitter moved inside (``output_quant`` with a QuantizeLinear in the emission)."""
    if site.requantize is not None:
        return site.requantize
    if site.output_quant is not None and any(n.op_type == "QuantizeLinear" for n in emission.nodes):
        return site.output_quant
    return None


@dataclasses.dataclass
class SiteCheck:
    max_abs_error: float
    max_rel_error: float  # max abs error / max |original output|
    ratio: float  # max over elements of error / tolerance (<= 1 passes)
    tolerance: str  # how the tolerance was derived

    @property
    def ok(self) -> bool:
        return self.ratio <= 1.0


#: elements compared at a time (float64 working copies of 8 MiB each, whatever the tensor's size)
CHUNK = 1 << 20


def _finite_max(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size else 0.0


def compare_site(site: Site, ref: np.ndarray, got: np.ndarray, magnitude: np.ndarray | LowerBound | None,
                 atol: float | None, rtol: float | None, quant=None, magnitude_text: str = "|W|*|x|") -> SiteCheck:
    """``quant`` is ``output_quantization(site, emission)``: one step of it is allowed (a sum within
    rounding of a half step may round either way) and, where the original output is not quantized
    yet, it is quantized the same way first.  ``magnitude``: |W|*|x| per element, or a lower bound of
    it (``magnitude_lower_bound``, named by ``magnitude_text``)."""
    if quant is not None and site.requantize is None:
        ref = fake_quantize(ref, *quant)
    dtype = ref.dtype if np.issubdtype(ref.dtype, np.floating) else np.dtype(np.float32)
    eps = float(np.finfo(dtype).eps)
    terms = site.terms_per_output
    if got.shape != ref.shape:
        return SiteCheck(math.inf, math.inf, math.inf, f"shape {list(got.shape)} differs from {list(ref.shape)}")
    ref, got = ref.reshape(-1), got.reshape(-1)
    mags = magnitude.reshape(-1) if isinstance(magnitude, np.ndarray) else None
    max_ref = max((_finite_max(ref[i:i + CHUNK]) for i in range(0, ref.size, CHUNK)), default=0.0)
    step = float(np.max(np.abs(quant[0]))) if quant is not None else 0.0
    a = 0.0 if atol is None else float(atol)
    if rtol is not None or magnitude is None:
        rel = FACTOR * eps * math.sqrt(terms) if rtol is None else float(rtol)
        text = f"atol + rtol*max|ref|, rtol = {rel:.3g}" + (" (user)" if rtol is not None else
                                                           f" = 8*eps*sqrt(T) (eps={eps:.3g}, T={terms})")
    else:
        text = f"8*eps*sqrt(T)*({magnitude_text}+|b|) per element (eps={eps:.3g} {np.dtype(dtype).name}, T={terms})"
    if step:
        text += f" + one quantization step ({step:.3g})"
    max_err = max_ratio = 0.0
    bmag = bias_magnitude(site)
    for i in range(0, ref.size, CHUNK):  # float64 working copies of one chunk at a time: bounded memory
        r, g = ref[i:i + CHUNK].astype(np.float64), got[i:i + CHUNK].astype(np.float64)
        same = (np.isnan(r) & np.isnan(g)) | (np.isinf(r) & (r == g))
        err = np.where(same, 0.0, np.abs(r - g))
        err[np.isnan(err)] = np.inf
        if rtol is not None or magnitude is None:
            tol = a + rel * max_ref + step
        else:
            m = (np.maximum(np.abs(r) * magnitude.scale - bmag, 0) if mags is None
                 else mags[i:i + CHUNK].astype(np.float64))
            tol = a + FACTOR * eps * math.sqrt(terms) * (m + bmag) + step
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = np.where(err == 0, 0.0, err / tol)
        max_err = max(max_err, float(err.max()) if err.size else 0.0)
        max_ratio = max(max_ratio, float(np.nanmax(ratios)) if ratios.size else 0.0)
    return SiteCheck(
        max_abs_error=max_err,
        max_rel_error=max_err / max_ref if max_ref > 0 else (0.0 if max_err == 0 else math.inf),
        ratio=max_ratio,
        tolerance=text,
    )
