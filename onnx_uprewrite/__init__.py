"""onnx-uprewrite: exact, verified rewrites between the equivalent forms of ONNX upsampling layers."""

__version__ = "0.1.0"

from .api import ConvertResult, convert, inspect, verify  # noqa: E402
from .errors import (  # noqa: E402
    InvalidModelError,
    UprewriteError,
    UsageError,
    VerificationFailed,
    VerificationImpossible,
)

__all__ = [
    "convert",
    "inspect",
    "verify",
    "ConvertResult",
    "UprewriteError",
    "UsageError",
    "InvalidModelError",
    "VerificationFailed",
    "VerificationImpossible",
]
