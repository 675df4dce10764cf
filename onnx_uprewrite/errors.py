"""Typed errors of the library; the CLI maps ``exit_code`` to the process exit status."""

from __future__ import annotations


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (names come from the model)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class UprewriteError(Exception):
    """Base class; ``exit_code`` is the documented CLI exit status for this kind of failure."""

    exit_code = 2

    def __init__(self, message: str = "", *args):
        super().__init__(one_line(message), *args)


class UsageError(UprewriteError):
    """Bad arguments: unknown node name, unresolvable symbolic dimension, bad --inputs file."""


class InvalidModelError(UprewriteError):
    """The model file cannot be read or is not a valid ONNX model."""


class InputChanged(InvalidModelError):
    """The input's external data changed while the run read it; nothing was written."""


class WriteError(UprewriteError):
    """The output cannot be written (permissions, read-only or full file system, file size limit,
    name too long); nothing was left behind and an earlier output is intact."""


class VerificationImpossible(UprewriteError):
    """onnxruntime cannot run the original model (or the inputs do not fit it)."""


class ResourceLimit(UprewriteError):
    """Verification would exceed the memory budget, or ran past the time budget; nothing was written."""


class VerificationFailed(UprewriteError):
    """The rewritten model does not match the original within tolerance; nothing was written."""

    exit_code = 1

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
