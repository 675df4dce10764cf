"""The house stays legible: no import cycle among the package's modules (imports inside functions
count), no function over 100 lines, convert at most 80, and the form registries come from passes/."""

from __future__ import annotations

import ast
from pathlib import Path

import onnx_uprewrite.passes as passes
from onnx_uprewrite import api, cli

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ((ROOT / "onnx_uprewrite", "onnx_uprewrite"), (ROOT / "passes", "onnx_uprewrite.passes"))


def _modules() -> dict[str, Path]:
    return {pkg if f.stem == "__init__" else f"{pkg}.{f.stem}": f for base, pkg in PACKAGES for f in base.glob("*.py")}


def _imports(name: str, path: Path, known) -> set[str]:
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rsplit(".", 1)[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            found.update(t for t in [target, *(f"{target}.{a.name}" for a in node.names)] if t in known)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
    found.discard(name)
    return found


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state, stack, cycles = {}, [], []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u)
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_functions_are_short():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                limit = 80 if (name, node.name) == ("onnx_uprewrite.api", "convert") else 100
                if lines > limit:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def test_registries_come_from_passes():
    assert api.FORMS == passes.FORMS == tuple(passes.EMITTERS)
    assert set(api.SOURCES) == {p.SOURCE for p in passes.PARSERS}
    assert api.TARGETS[:-1] == passes.FORMS and api.TARGETS[-1] == "fastest"
    assert set(api.SUBPIXEL_LAYOUTS) == set(passes.LAYOUTS)
    convert = cli.cli.commands["convert"]
    choices = {p.name: getattr(p.type, "choices", None) for p in convert.params}
    assert set(choices["sources"]) == set(passes.SOURCES)
    assert set(choices["d2s_mode"]) == set(passes.LAYOUTS)
    for form, emitter in passes.EMITTERS.items():
        assert emitter.FORM == form and emitter.IN_FORM_OPS
