"""onnx-uprewrite: exact, verified rewrites between the equivalent forms of ONNX upsampling layers."""

__version__ = "0.1.0"


def _attach_source_passes() -> None:
    """Make ``onnx_uprewrite.passes`` importable from a source checkout.

    Installed (``pip install .`` or ``-e .``), setuptools maps the top-level ``passes/`` folder to
    ``onnx_uprewrite.passes``.  When Python finds this package in the current directory instead
    (``python -m onnx_uprewrite`` or ``python -c 'import onnx_uprewrite'`` at the repository
    root), that mapping is absent, so load ``passes/`` under the same name here.
    """
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    try:
        importlib.import_module(f"{__name__}.passes")
        return
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.passes":
            raise
    folder = Path(__file__).resolve().parent.parent / "passes"
    spec = importlib.util.spec_from_file_location(
        f"{__name__}.passes", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_attach_source_passes()

from .api import ConvertResult, convert, inspect, verify  # noqa: E402
from .errors import (  # noqa: E402
    InvalidModelError,
    ResourceLimit,
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
    "ResourceLimit",
]
