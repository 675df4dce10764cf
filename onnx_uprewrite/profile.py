"""Accelerator profiles: what a target runs of ConvTranspose / Resize / DepthToSpace / Conv, and the
checker that says which nodes of a model it cannot run.

A profile is JSON (or TOML on Python >= 3.11): built-in ones live in ``onnx_uprewrite/profiles/``
with the vendor documentation they come from (``SOURCES.md``); ``--profile FILE`` reads a user's.
Schema (every key but ``name`` optional; an op absent from ``ops`` is run without limits)::

    {"name": "mytarget", "title": "...", "sources": [{"url": "...", "quote": "...", "supports": "..."}],
     "ops": {
       "ConvTranspose": {"supported": true, "strides": [2], "square_stride": true, "kernels": [2, 4],
                         "max_kernel": 31, "max_pad": 15, "dilation": false, "output_padding": false,
                         "output_shape": false, "auto_pad": false,
                         "groups": "1" | "depthwise" | "1_or_depthwise" | "any"},
       "Resize": {"supported": true, "modes": ["nearest", "linear"], "scales": [2, 4], "max_scale": 8},
       "DepthToSpace": {"supported": true, "modes": ["DCR"], "blocksizes": [2, 4, 8]},
       "Conv": {"supported": true, "max_kernel": 7, "strides": [1, 2], "dilation": true, "groups": "any"},
       "Reshape": {"max_rank": 5}, "Transpose": {"max_rank": 5}},
     "notes": ["..."]}

Lists are the allowed per-axis values (null or absent: any); ``max_*`` are inclusive bounds;
``dilation`` / ``output_padding`` / ``output_shape`` false forbid a non-default value; ``auto_pad``
false forbids SAME_UPPER / SAME_LOWER (pads the target must derive itself).  Resize
covers Upsample too; ``scales`` are the spatial factors (integers).  ``ranks`` (ConvTranspose, Conv,
Resize) are the allowed numbers of spatial axes (1, 2, 3); ``max_rank`` (Reshape, Transpose) bounds
the tensor rank, batch included.  Reshape and Transpose are checked only when a profile limits them,
and only in depth-to-space chains (shuffle_nodes).

Placement: every op may say what the target does with an instance that breaks its limits (or with
any instance, when ``supported`` is false), ``"violation"``: ``"rejected"`` (the default: the compiler
refuses the model), ``"cpu"`` (it compiles, but the op falls back to the host CPU: off the NPU) or
``"wrong"`` (it compiles and runs, but computes wrong values: measured, benchmarks/compilers).  A
Violation carries that ``kind``; a CPU fallback is a violation too, since the point of a profile is
to keep every upsampling op on the accelerator.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import UsageError, one_line
from .model_io import tensor_array

BUILTIN_DIR = Path(__file__).with_name("profiles")
CHECKED_OPS = ("ConvTranspose", "Resize", "Upsample", "DepthToSpace")
#: checked only when a profile limits them (the sub-pixel form's Reshape -> Transpose -> Reshape)
LAYOUT_OPS = ("Reshape", "Transpose")
#: what a target does with an op it cannot run as the profile's limits say
KINDS = ("rejected", "cpu", "wrong")
_KIND_TEXT = {"rejected": "", "cpu": "CPU fallback: ", "wrong": "wrong values: "}

_OP_KEYS = {
    "ConvTranspose": {"supported", "strides", "square_stride", "kernels", "max_kernel", "max_pad", "dilation",
                      "output_padding", "output_shape", "auto_pad", "groups", "ranks", "violation"},
    "Resize": {"supported", "modes", "scales", "max_scale", "ranks", "violation"},
    "DepthToSpace": {"supported", "modes", "blocksizes", "violation"},
    "Conv": {"supported", "max_kernel", "strides", "kernels", "max_pad", "dilation", "groups", "ranks", "violation"},
    "Reshape": {"supported", "max_rank", "violation"},
    "Transpose": {"supported", "max_rank", "violation"},
}
_GROUPS = ("1", "depthwise", "1_or_depthwise", "any")


@dataclass(frozen=True)
class Profile:
    name: str
    title: str = ""
    ops: dict = field(default_factory=dict)
    path: str = ""

    def limits(self, op: str) -> dict | None:
        return self.ops.get("Resize" if op == "Upsample" else op)

    def kind(self, op: str) -> str:
        """What the target does with an ``op`` it cannot run as the limits say (KINDS)."""
        return (self.limits(op) or {}).get("violation") or "rejected"


@dataclass(frozen=True)
class Violation:
    node: str
    op: str
    reason: str
    kind: str = "rejected"  # KINDS: "cpu" is a CPU fallback, "wrong" a measured miscompilation

    def __str__(self) -> str:
        return f"{self.op} '{self.node}': {self.reason}"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.json"))


def load_profile(spec: str | Path) -> Profile:
    """A built-in profile by name, or a JSON/TOML file; UsageError says what is wrong with it."""
    path = Path(spec)
    if not path.suffix and (BUILTIN_DIR / f"{str(spec).lower()}.json").is_file():  # names in any case
        path = BUILTIN_DIR / f"{str(spec).lower()}.json"
    if not path.is_file():
        raise UsageError(f"--profile {spec}: no such file and no built-in profile of that name "
                         f"(built-in: {', '.join(builtin_names())})")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".toml":
            if sys.version_info < (3, 11):
                raise UsageError(f"--profile {path}: TOML needs Python >= 3.11 (tomllib); use JSON")
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse problem is the user's file
        raise UsageError(f"--profile {path}: cannot read: {type(exc).__name__}: {exc}") from None
    return parse_profile(data, str(path))


def parse_profile(data, where: str = "profile") -> Profile:
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise UsageError(f"--profile {where}: expected an object with a string 'name'")
    unknown = set(data) - {"name", "title", "sources", "ops", "notes"}
    if unknown:
        raise UsageError(f"--profile {where}: unknown key(s) {', '.join(sorted(unknown))}")
    ops = data.get("ops", {})
    if not isinstance(ops, dict):
        raise UsageError(f"--profile {where}: 'ops' must be an object")
    for op, limits in ops.items():
        if op not in _OP_KEYS:
            raise UsageError(f"--profile {where}: op '{op}' is not one of {', '.join(_OP_KEYS)}")
        if not isinstance(limits, dict):
            raise UsageError(f"--profile {where}: ops.{op} must be an object")
        bad = set(limits) - _OP_KEYS[op]
        if bad:
            raise UsageError(f"--profile {where}: ops.{op}: unknown key(s) {', '.join(sorted(bad))}")
        for key, value in limits.items():
            _check_value(where, op, key, value)
    return Profile(name=one_line(data["name"]), title=one_line(str(data.get("title", ""))), ops=ops, path=where)


def _check_value(where, op, key, value):
    def fail(expected):
        raise UsageError(f"--profile {where}: ops.{op}.{key} = {value!r}: expected {expected}")

    if value is None:
        return
    if key in ("supported", "square_stride", "dilation", "output_padding", "output_shape", "auto_pad"):
        if not isinstance(value, bool):
            fail("true or false")
    elif key == "violation":
        if value not in KINDS:
            fail(" / ".join(KINDS))
    elif key in ("strides", "kernels", "scales", "blocksizes", "ranks"):
        if not (isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                for v in value)):
            fail("a list of positive integers or null")
    elif key in ("max_kernel", "max_pad", "max_scale", "max_rank"):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            fail("a non-negative integer or null")
    elif key == "modes":
        allowed = {"Resize": {"nearest", "linear", "cubic"}, "DepthToSpace": {"DCR", "CRD"}}[op]
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value) and set(value) <= allowed):
            fail(f"a list among {sorted(allowed)}")
    elif key == "groups" and value not in _GROUPS:
        fail(" / ".join(_GROUPS))


# ---------------------------------------------------------------------------------------------
# the checker


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _text(v):
    return v.decode() if isinstance(v, bytes) else v


def node_problems(node: onnx.NodeProto, profile: Profile, constants: dict[str, np.ndarray],
                  shapes: dict[str, tuple] | None = None) -> list[str]:
    """Why ``profile``'s target cannot run ``node`` (empty: it can).  ``constants`` holds the values
    of constant inputs (weights, Resize scales); ``shapes`` known tensor shapes.  Reasons of an op
    whose violation kind is not "rejected" start with "CPU fallback: " or "wrong values: "."""
    limits = profile.limits(node.op_type)
    if limits is None or node.domain not in ("", "ai.onnx"):
        return []
    prefix = _KIND_TEXT[profile.kind(node.op_type)]
    if limits.get("supported") is False:
        return [f"{prefix}{profile.name} does not run {node.op_type}"]
    check = {"ConvTranspose": _conv_problems, "Conv": _conv_problems, "Resize": _resize_problems,
             "Upsample": _resize_problems, "DepthToSpace": _d2s_problems, "Reshape": _layout_problems,
             "Transpose": _layout_problems}.get(node.op_type)
    if check is None:
        return []
    try:
        return [prefix + why for why in check(node, _attrs(node), limits, constants, shapes or {})]
    except Exception as exc:  # noqa: BLE001 - attributes of unexpected types, missing inputs: not checkable
        return [f"cannot be checked ({type(exc).__name__}: {one_line(str(exc))[:120]})"]


def _rank_problems(what: str, rank: int | None, limits) -> list[str]:
    allowed = limits.get("ranks")
    if allowed is None or rank is None or rank in allowed:
        return []
    return [f"{rank}-D {what} (spatial ranks allowed: {allowed})"]


def _layout_problems(node, a, limits, constants, shapes):
    """Reshape / Transpose: the tensor rank, from ``perm``, the constant target shape or ``shapes``."""
    if limits.get("max_rank") is None:
        return []
    if node.op_type == "Transpose":
        rank = len(a["perm"]) if "perm" in a else len(shapes.get(node.input[0]) or ()) or None
    else:
        target = constants.get(node.input[1]) if len(node.input) > 1 else None
        rank = int(target.size) if target is not None else len(shapes.get(node.output[0]) or ()) or None
    if rank is None:
        return ["its rank is not known, so it cannot be checked"]
    return [f"rank {rank} over {limits['max_rank']}"] if rank > limits["max_rank"] else []


def _allowed(what, values, allowed):
    if allowed is None:
        return None
    bad = [v for v in values if v not in allowed]
    return f"{what} {list(values)} not among {allowed}" if bad else None


def _conv_problems(node, a, limits, constants, shapes):
    out = []
    w = constants.get(node.input[1]) if len(node.input) > 1 else None
    kernel = a.get("kernel_shape") or (list(w.shape[2:]) if w is not None else None)
    rank = len(kernel) if kernel else (len(w.shape) - 2 if w is not None else None)
    strides = a.get("strides") or ([1] * rank if rank else [])
    out += _rank_problems(node.op_type, rank, limits)
    for why in (_allowed("strides", strides, limits.get("strides")),
                _allowed("kernel", kernel or [], limits.get("kernels"))):
        if why:
            out.append(why)
    if limits.get("square_stride") and len(set(strides)) > 1:
        out.append(f"strides {list(strides)} are not square")
    if limits.get("max_kernel") is not None and kernel and max(kernel) > limits["max_kernel"]:
        out.append(f"kernel {list(kernel)} over {limits['max_kernel']}")
    pads = a.get("pads") or []
    if limits.get("max_pad") is not None and pads and max(pads) > limits["max_pad"]:
        out.append(f"pads {list(pads)} over {limits['max_pad']}")
    if _text(a.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID") and limits.get("max_pad") is not None:
        out.append(f"auto_pad {_text(a['auto_pad'])} (pads not checked against {limits['max_pad']})")
    if limits.get("dilation") is False and any(d != 1 for d in a.get("dilations") or []):
        out.append(f"dilations {list(a['dilations'])}")
    if limits.get("output_padding") is False and any(p for p in a.get("output_padding") or []):
        out.append(f"output_padding {list(a['output_padding'])}")
    if limits.get("output_shape") is False and "output_shape" in a:
        out.append("the output_shape attribute")
    if limits.get("auto_pad") is False and _text(a.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
        out.append(f"auto_pad {_text(a['auto_pad'])} (implicit pads)")
    group = a.get("group", 1)
    rule = limits.get("groups") or "any"
    if rule != "any" and group != 1:
        channels = None
        if w is not None:  # depthwise: one input and one output channel per group
            cin = w.shape[0] if node.op_type == "ConvTranspose" else w.shape[1] * group
            per_out = w.shape[1] if node.op_type == "ConvTranspose" else w.shape[0] // group
            channels = (cin, per_out)
        depthwise = channels is not None and group == channels[0] and channels[1] == 1
        if rule == "1" or not depthwise:
            out.append(f"group {group}" + (" (not depthwise)" if rule != "1" else ""))
    return out


def _mode_problems(a, limits, default: str) -> list[str]:
    mode = _text(a.get("mode", default))
    return [f"mode {mode} not among {limits['modes']}"] if limits.get("modes") is not None and \
        mode not in limits["modes"] else []


def _resize_problems(node, a, limits, constants, shapes):
    out = _mode_problems(a, limits, "nearest")
    scales = _resize_scales(node, a, constants, shapes)
    if scales is None:
        if limits.get("scales") is not None or limits.get("max_scale") is not None:
            out.append("its scales are not constant, so they cannot be checked")
        return out
    spatial = scales[2:]
    out += _rank_problems("Resize", len(spatial), limits)
    if not all(math.isfinite(s) for s in spatial):
        out.append(f"scales {spatial} are not finite")
        return out
    if limits.get("scales") is not None and any(s != int(s) or int(s) not in limits["scales"] for s in spatial):
        out.append(f"scales {[float(s) for s in spatial]} not among {limits['scales']}")
    if limits.get("max_scale") is not None and any(s > limits["max_scale"] for s in spatial):
        out.append(f"scales {[float(s) for s in spatial]} over {limits['max_scale']}")
    return out


def _resize_scales(node, a, constants, shapes):
    """The scales of a Resize/Upsample, one per input axis, when constant (None otherwise)."""
    if node.op_type == "Upsample" and "scales" in a:
        return [float(s) for s in a["scales"]]
    names = list(node.input)
    # Upsample-9 and Resize-10: (X, scales); Resize-11+: (X, roi, scales, sizes)
    two = node.op_type == "Upsample" or len(names) == 2
    scales_name = names[1] if two and len(names) > 1 else (names[2] if len(names) > 2 else "")
    sizes_name = names[3] if not two and len(names) > 3 else ""
    axes = [int(x) for x in a["axes"]] if "axes" in a else None
    rank = len(shapes[names[0]]) if names and names[0] in shapes else None
    if scales_name and scales_name in constants and constants[scales_name].size:
        values = [float(s) for s in constants[scales_name].reshape(-1)]
    elif sizes_name and sizes_name in constants and names[0] in shapes:
        in_shape = shapes[names[0]]
        sizes = [int(v) for v in constants[sizes_name].reshape(-1)]
        picked = axes if axes is not None else list(range(len(in_shape)))
        if len(sizes) != len(picked) or any(in_shape[ax % len(in_shape)] in (None, 0) for ax in picked):
            return None
        values = [float(o) / float(in_shape[ax % len(in_shape)]) for o, ax in zip(sizes, picked)]
    else:
        return None
    if axes is not None:  # opset 18: values for these axes only
        if rank is None:
            return None
        full = [1.0] * rank
        for ax, v in zip(axes, values):
            full[ax % rank] = v
        values = full
    return values


def _d2s_problems(node, a, limits, constants, shapes):
    out = _mode_problems(a, limits, "DCR")
    block = a.get("blocksize")
    if limits.get("blocksizes") is not None and block not in limits["blocksizes"]:
        out.append(f"blocksize {block} not among {limits['blocksizes']}")
    return out


def model_constants(model: onnx.ModelProto, names: set[str]) -> dict[str, np.ndarray]:
    """The values of initializers and Constant outputs among ``names`` (external data loaded)."""
    values = {t.name: tensor_array(t) for t in model.graph.initializer if t.name in names}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in names and node.attribute \
                and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def upsampling_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """ConvTranspose, Resize, Upsample and DepthToSpace nodes of the main graph, and the Conv nodes
    that pair with them into an upsampling site (a Conv reading a Resize/Upsample output, or feeding
    a DepthToSpace or a Reshape/Transpose depth-to-space chain, directly or through a Concat)."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    feeds_d2s = {n.input[0] for n in model.graph.node if n.op_type == "DepthToSpace" and n.input}
    feeds_d2s |= {n.input[0] for n in shuffle_nodes(model) if n.input}  # the Reshape/Transpose layouts
    feeds_d2s |= {i for t in list(feeds_d2s) if (c := producer.get(t)) is not None and c.op_type == "Concat"
                  for i in c.input}  # per-phase Convs, concatenated (the sub-pixel emitter's layout)
    found = []
    for node in model.graph.node:
        if node.op_type in CHECKED_OPS:
            found.append(node)
        elif node.op_type == "Conv" and node.input:
            before = producer.get(node.input[0])
            if (before is not None and before.op_type in ("Resize", "Upsample")) or node.output[0] in feeds_d2s:
                found.append(node)
    return found


def shuffle_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The Reshape and Transpose nodes of depth-to-space rearrangements: chains of them (with a
    Transpose) that read a Conv's output (or a Concat of Convs: the per-phase layout), like the
    sub-pixel form's Reshape -> Transpose -> Reshape; a model's other Reshapes (a classifier's
    flatten) are not upsampling and stay unchecked."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: dict[int, onnx.NodeProto] = {}
    for conv in (n for n in model.graph.node if n.op_type == "Conv" and n.output):
        chain, frontier = {}, [conv.output[0]]
        while frontier:
            for node in consumers.get(frontier.pop(), []):
                if node.op_type == "Concat" and node.output:  # the per-phase Convs' Concat
                    frontier.append(node.output[0])
                elif node.op_type in LAYOUT_OPS and node.output and id(node) not in chain:
                    chain[id(node)] = node
                    frontier.append(node.output[0])
        if any(n.op_type == "Transpose" for n in chain.values()):
            found.update(chain)
    return [n for n in model.graph.node if id(n) in found]


def alias_through(nodes, constants: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``constants`` plus the outputs of DequantizeLinear / Identity / Cast nodes reading one: a QDQ
    weight's shape (all the checks need) is that of its integers."""
    for node in nodes:
        if node.op_type in ("DequantizeLinear", "Identity", "Cast") and node.input and node.output \
                and node.input[0] in constants and node.output[0] not in constants:
            constants[node.output[0]] = constants[node.input[0]]
    return constants


def check_model(model: onnx.ModelProto, profile: Profile, shapes: dict | None = None) -> list[Violation]:
    """Every upsampling node of ``model``'s main graph (upsampling_nodes) that ``profile``'s target
    cannot run, with why."""
    nodes = upsampling_nodes(model)
    if any(profile.limits(op) is not None for op in LAYOUT_OPS):  # only where a profile limits them
        nodes += shuffle_nodes(model)
    wanted = {i for n in nodes for i in n.input}
    chain = [n for n in model.graph.node if n.op_type in ("DequantizeLinear", "Identity", "Cast")]
    wanted |= {n.input[0] for n in chain if n.input and n.output and n.output[0] in wanted}
    constants = alias_through(chain, model_constants(model, wanted))
    found = []
    for node in nodes:
        for why in node_problems(node, profile, constants, shapes):
            kind = profile.kind(node.op_type) if not why.startswith("cannot be checked") else "rejected"
            found.append(Violation(node.name or node.output[0], node.op_type, why, kind))
    return found
