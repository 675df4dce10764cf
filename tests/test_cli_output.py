"""What a person reads: a compact table by default (under 40 lines for 100 sites), every detail with
-v, one line with -q, a visible warning for a fallback form, colour only on a terminal without NO_COLOR."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from hostile import assert_clean_exit, invoke
from onnx_uprewrite import cli


def chain(sites: int, c: int = 2):
    """``sites`` x (ConvTranspose k4 s2 p1 -> Conv k4 s2 p1) on 1 x c x 4 x 4."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(sites):
        for kind in ("up", "down"):
            inits.append(numpy_helper.from_array(rng.standard_normal((c, c, 4, 4)).astype(np.float32) * 0.3,
                                                 f"w{kind}{i}"))
        nodes.append(helper.make_node("ConvTranspose", [prev, f"wup{i}"], [f"u{i}"], name=f"up{i}", strides=[2, 2],
                                      pads=[1, 1, 1, 1]))
        prev = "y" if i == sites - 1 else f"d{i}"
        nodes.append(helper.make_node("Conv", [f"u{i}", f"wdown{i}"], [prev], name=f"down{i}", strides=[2, 2],
                                      pads=[1, 1, 1, 1]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def hundred(tmp_path_factory):
    path = tmp_path_factory.mktemp("hundred") / "m.onnx"
    path.write_bytes(chain(100).SerializeToString())
    return path


def test_a_hundred_sites_fit_in_a_screen(hundred, tmp_path):
    result = invoke("convert", hundred, "-o", tmp_path / "o.onnx")
    assert_clean_exit(result, 0)
    lines = result.stdout.splitlines()
    assert len(lines) < 40, result.stdout
    assert "100 rewritten to subpixel" in lines[0]
    assert any("80 more rewritten" in line for line in lines)
    assert any(line.split()[:3] == ["op", "before", "after"] for line in lines)
    assert any(line.startswith("  verified") for line in lines)


def test_verbose_lists_every_site_in_detail(hundred, tmp_path):
    result = invoke("convert", hundred, "-o", tmp_path / "o.onnx", "-v")
    assert_clean_exit(result, 0)
    assert result.stdout.count("alone on its captured input") == 100


def test_a_fallback_form_is_a_visible_warning(tmp_path):
    from pathlib import Path

    model = Path(__file__).resolve().parent.parent / "models" / "fsrcnn_k9s3.onnx"
    result = invoke("convert", model, "--to", "resize", "-o", tmp_path / "o.onnx")
    assert_clean_exit(result, 0)
    warning = [line for line in result.stdout.splitlines() if line.startswith("  warning")]
    assert len(warning) == 1 and "masked form" in warning[0] and "deconv" in warning[0]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("no_color, coloured", [(None, True), ("1", False)])
def test_colour_only_on_a_terminal_without_no_color(monkeypatch, no_color, coloured):
    out = _Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)
    cli._echo_summary("m.onnx: 1 site\n  verified   1 output(s)\n  refused    x: why")
    assert ("\x1b[" in out.getvalue()) == coloured
    assert "verified" in out.getvalue() and "refused" in out.getvalue()


def test_not_a_terminal_no_colour(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.delenv("NO_COLOR", raising=False)
    cli._echo_summary("  verified   1 output(s)")
    assert "\x1b[" not in out.getvalue()


def test_progress_shows_elapsed_time_and_an_estimate(monkeypatch):
    out = io.StringIO()
    clock = iter([0.0, 0.0, 5.0, 5.0])
    monkeypatch.setattr(cli.time, "monotonic", lambda: next(clock))
    line = cli.ProgressLine(out)
    line("rewriting sites", 0, 10)
    line("rewriting sites", 5, 10)
    assert "5 s" in out.getvalue() and "about 5 s left" in out.getvalue()
