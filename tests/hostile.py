"""Shared checks of the CLI contract on bad input (DESIGN.md §5), for the ``test_hostile_*`` files.

Every refusal must: exit with its documented code through ``sys.exit`` (no escaping exception,
no traceback), print one ``uprewrite: error: ...`` line naming the file and the culprit, write
nothing and leave every input byte unchanged (``tree`` snapshots a folder before and after).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
from click.testing import CliRunner
from onnx import TensorProto, external_data_helper, helper

from onnx_uprewrite.cli import cli

IR_VERSION, OPSET = 8, 17
#: the external data file of ``conftest.ext_model``
DATA = "model.onnx.data"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def run_module(*args, cwd, **kwargs):
    """The real entry point in a fresh interpreter (the console script is not guaranteed in CI)."""
    return subprocess.run(
        [sys.executable, "-m", "onnx_uprewrite", *[str(a) for a in args]],
        capture_output=True, text=True, cwd=cwd, timeout=120, check=False, **kwargs,
    )


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def assert_clean_exit(result, code: int) -> None:
    """The expected exit status, reached through sys.exit, never through an escaping exception."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert "Traceback" not in result.stderr


def error_line(stderr: str, *needles: str, single: bool = True) -> str:
    """The ``uprewrite: error:`` line of stderr; checks it is alone (when ``single``) and names ``needles``."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines, "nothing on stderr"
    if single:
        assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    line = lines[0]
    assert line.startswith("uprewrite: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def assert_refused(root: Path, args, code: int, *needles: str, single: bool = True):
    """Run the CLI; assert exit ``code``, a one-line error naming ``needles``, and an untouched ``root``."""
    before = tree(root)
    result = invoke(*args)
    assert_clean_exit(result, code)
    line = error_line(result.stderr, *needles, single=single)
    assert "internal error" not in line
    assert tree(root) == before, "files were written or changed"
    return result, line


def graph_model(nodes, inputs=("x",), outputs=("y",), inits=(), opsets=(("", OPSET),)):
    """A float model from raw nodes, for the structurally broken cases."""
    graph = helper.make_graph(
        list(nodes), "g",
        [helper.make_tensor_value_info(i, TensorProto.FLOAT, [1, 3, 4, 4]) for i in inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializer=list(inits),
    )
    return helper.make_model(graph, ir_version=IR_VERSION,
                             opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


def save_external(model: onnx.ModelProto, path: Path, location: str = DATA) -> Path:
    """Save with every tensor in one external file ``location`` beside ``path``."""
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path


def relocate(path: Path, location: str) -> None:
    """Rewrite the external-data ``location`` of every tensor of the model file (data untouched)."""
    m = onnx.load(str(path), load_external_data=False)
    for t in external_data_helper._get_all_tensors(m):
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    path.write_bytes(m.SerializeToString())
