"""Packaging: passes/ is importable as onnx_uprewrite.passes, installed or from the source root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_from_repository_root_finds_passes():
    code = "import onnx_uprewrite.passes as p; print(sorted(p.EMITTERS), p.PARSERS[0].SOURCE)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == "['convtranspose', 'resize', 'subpixel'] convtranspose"


def test_no_top_level_passes_module_is_installed(tmp_path):
    code = "import importlib.util as u; print(u.find_spec('passes') is None)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_python_dash_m_from_root_converts(tmp_path):
    out = tmp_path / "o.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnx_uprewrite", "convert", "models/fsrcnn_k9s3.onnx", "-o", str(out),
                           "-q"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
