"""onnx-uprewrite: exact, verified rewrites between the equivalent forms of ONNX upsampling layers.

Three calls, each taking a path, an ``onnx.ModelProto`` or an ``onnx_graphsurgeon.Graph``:

    import onnx_uprewrite as up

    result = up.convert("model.onnx", to="subpixel", output="model.subpixel.onnx")
    result.report.verification          # 'passed'; result.model is the rewritten ModelProto
    result.to_json()                    # the report; result.graph() gives an onnx_graphsurgeon Graph

    info = up.inspect("model.onnx")     # Inspection: info.sites, each with exact forms and MACs
    same = up.verify("a.onnx", "b.onnx")  # Comparison: same.equivalent, same.outputs, same.tolerance

Errors are typed (``up.UsageError``, ``up.InvalidModelError``, ``up.VerificationFailed``, ...), each
with the CLI's exit code in ``exit_code``.
"""

__version__ = "0.1.0"


class _SourcePassesFinder:
    """Make ``onnx_uprewrite.passes`` importable from a source checkout.

    Installed (``pip install .`` or ``-e .``), setuptools maps the top-level ``passes/`` folder to
    ``onnx_uprewrite.passes``.  When Python finds this package in the current directory instead
    (``python -m onnx_uprewrite`` or ``python -c 'import onnx_uprewrite'`` at the repository
    root), that mapping is absent: this finder, consulted after the regular ones, serves
    ``passes/`` under that name (on first import, so importing this package stays light).
    """

    name = f"{__name__}.passes"

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != cls.name:
            return None
        import importlib.util
        from pathlib import Path

        folder = Path(__file__).resolve().parent.parent / "passes"
        if not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def _attach_source_passes() -> None:
    import sys

    if not any(isinstance(f, type) and f.__name__ == "_SourcePassesFinder" for f in sys.meta_path):
        sys.meta_path.append(_SourcePassesFinder)


_attach_source_passes()

# The API loads on first use (PEP 562), so that ``onnx_uprewrite._entry`` can handle signals before
# onnx and onnxruntime are imported.
_LAZY = {
    "convert": "api", "inspect": "api", "verify": "api", "compile_check": "api", "ConvertResult": "api",
    "CompilerCheck": "compilers",
    "Inspection": "report", "Comparison": "report", "Report": "report", "SiteResult": "report",
    "UprewriteError": "errors", "UsageError": "errors", "InvalidModelError": "errors",
    "VerificationFailed": "errors", "VerificationImpossible": "errors", "ResourceLimit": "errors",
    "WriteError": "errors", "InputChanged": "errors",
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = list(_LAZY)
