"""Resource guards: refuse, before onnxruntime runs, a verification that would exhaust memory, and
stop one that runs past its time budget.

Memory estimate (bytes) of one onnxruntime run, from shapes alone (no tensor is allocated):
``2 * weights + inputs + max(outputs kept, activations of the busiest node)``.  Weights are
counted twice (the model proto and onnxruntime's copy); every requested output (graph outputs and
tapped site inputs) is alive when the run returns; a node's activation inputs and outputs are
alive while it runs.  onnxruntime needs at least this much, so refusing above the budget never
refuses a run that would have fitted (up to the weights' second copy).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import re
import threading
import time

import onnx

from .errors import ResourceLimit
from .model_io import check_resize_ranks, tensor_bytes, weight_bytes  # noqa: F401 (byte counting lives in model_io)

#: default memory budget: this fraction of physical memory
DEFAULT_MEMORY_FRACTION = 0.5


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def default_memory_budget() -> int:
    total = physical_memory()
    return int(total * DEFAULT_MEMORY_FRACTION) if total else 8 << 30


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``"512M"``, ``"2G"``, ``"1.5GiB"``, ``"1000000"`` -> bytes; ValueError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", str(text).upper())
    if not m:
        raise ValueError(f"{text!r}: expected a size like 512M, 2G or a number of bytes")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if value < 1:
        raise ValueError(f"{text!r}: the budget must be at least 1 byte")
    return int(value)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_memory(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]], kept: set[str],
                 budget: int | None, what: str, compared: bool = False) -> None:
    """Raise ResourceLimit when one run of ``model`` on inputs of ``input_shapes`` (keeping the
    tensors ``kept`` as outputs) needs more than ``budget`` bytes by the estimate above, and
    InvalidModelError for shapes that would crash onnxruntime (model_io.check_resize_ranks).
    ``compared``: the outputs are then also compared with another run's, which holds that run's
    outputs and three float64 working copies of each (verify.compare)."""
    from .shapes import infer_static_typed

    typed = infer_static_typed(model, input_shapes)
    check_resize_ranks(model, typed)  # onnxruntime would abort the process on them
    if budget is None:
        return
    weights = weight_bytes(model)
    inputs = sum(n for name, shape in input_shapes.items()
                 if (n := tensor_bytes(typed.get(name, (onnx.TensorProto.FLOAT, ()))[0], shape)) is not None)
    sizes = {name: n for name, (elem, dims) in typed.items() if (n := tensor_bytes(elem, dims)) is not None}
    initializers = {t.name for t in model.graph.initializer}
    outputs = sum(sizes.get(o, 0) for o in {o.name for o in model.graph.output} | set(kept))
    busiest, busiest_bytes = None, 0
    for node in model.graph.node:
        n = sum(sizes.get(t, 0) for t in {*node.input, *node.output} if t and t not in initializers)
        if n > busiest_bytes:
            busiest, busiest_bytes = node, n
    total = 2 * weights + inputs + max(outputs, busiest_bytes)
    if compared:
        elements = sum(math.prod(d if d else 1 for d in typed[o][1]) for o in {o.name for o in model.graph.output}
                       if o in typed and None not in typed[o][1])
        total += outputs + 3 * 8 * elements
    if total <= budget:
        return
    where = ""
    if busiest is not None:
        big = max((t for t in busiest.output if t in sizes), key=sizes.get, default=None)
        where = f"; {busiest.op_type} '{busiest.name}' alone needs {human(busiest_bytes)}" + (
            f" (its output '{big}' {list(typed[big][1])})" if big else "")
    at = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in input_shapes.items())
    raise ResourceLimit(
        f"{what} at {at} would need about {human(total)} (weights {human(weights)}{where}), over the memory "
        f"budget of {human(budget)} (--memory-budget); nothing was run"
    )


#: bytes held per weight element while a form's weights are computed: a float64 working copy, the
#: converted tensor and its serialized proto (8 + 8 + 8)
WEIGHT_WORKING_BYTES = 24


def weights_over_budget(count: int, budget: int | None) -> str | None:
    """Why weights of ``count`` elements cannot be computed within ``budget`` (None when they can)."""
    if budget is None or count * WEIGHT_WORKING_BYTES <= budget:
        return None
    return (f"needs {count:,} weight elements (about {human(count * WEIGHT_WORKING_BYTES)} to compute), "
            f"over the memory budget of {human(budget)} (--memory-budget)")


# ----------------------------------------------------------------------------- time budget

_DEADLINE: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar("deadline", default=None)


class time_budget(contextlib.AbstractContextManager):
    """onnxruntime runs inside ``with`` blocks of this object stop (``ResourceLimit``) once
    ``seconds`` have passed since it was created; reusable, so that the reference and the
    verification runs of one conversion share one budget."""

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else (time.monotonic() + float(seconds), float(seconds))
        self._tokens = []

    def __enter__(self):
        self._tokens.append(_DEADLINE.set(self.deadline))
        return self

    def __exit__(self, *exc):
        _DEADLINE.reset(self._tokens.pop())
        return None


#: what onnxruntime says when an allocation fails
_OUT_OF_MEMORY = ("bad_alloc", "Failed to allocate memory", "out of memory")


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (numpy's MemoryError, or onnxruntime's bad_alloc)."""
    return isinstance(exc, MemoryError) or any(m in str(exc) for m in _OUT_OF_MEMORY)


OUT_OF_MEMORY_HINT = ("out of memory: the tensors of this check do not fit; pass a smaller --shape or --inputs, "
                      "or --no-verify")


def guard_memory(function):
    """``function`` with an allocation failure anywhere in it raised as ResourceLimit (exit 2)."""
    import functools

    @functools.wraps(function)
    def guarded(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except MemoryError:
            model = args[0] if args else kwargs.get("model", kwargs.get("a"))
            label = f"{os.fspath(model)}: " if isinstance(model, (str, os.PathLike)) else ""
            raise ResourceLimit(f"{label}{OUT_OF_MEMORY_HINT}") from None
    return guarded


@contextlib.contextmanager
def onnxruntime_allocations():
    """Inside it, an allocation failure that onnxruntime raises is a ResourceLimit."""
    try:
        yield
    except ResourceLimit:
        raise
    except Exception as exc:
        if out_of_memory(exc):
            raise ResourceLimit(f"onnxruntime {OUT_OF_MEMORY_HINT}") from None
        raise


def run_session(sess, names, feeds):
    """``sess.run`` that is cancelled (onnxruntime's terminate flag) when the time budget runs out;
    an allocation failure inside onnxruntime is a ResourceLimit."""
    with onnxruntime_allocations():
        return _run_session(sess, names, feeds)


def _run_session(sess, names, feeds):
    deadline = _DEADLINE.get()
    if deadline is None:
        return sess.run(names, feeds)
    import onnxruntime as ort

    end, seconds = deadline
    left = end - time.monotonic()
    if left <= 0:
        raise ResourceLimit(f"verification ran past its time budget of {seconds:g} s (--time-budget)")
    options = ort.RunOptions()
    timer = threading.Timer(left, lambda: setattr(options, "terminate", True))
    timer.daemon = True
    timer.start()
    try:
        return sess.run(names, feeds, options)
    except Exception:
        if options.terminate:
            raise ResourceLimit(f"verification ran past its time budget of {seconds:g} s (--time-budget)") from None
        raise
    finally:
        timer.cancel()


def release_memory() -> None:
    """Hand memory that Python and onnxruntime freed back to the system (glibc keeps freed blocks for
    reuse; a big save that follows a verification would otherwise add to them): malloc_trim where
    the C library has it, nothing elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
