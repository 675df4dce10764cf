"""``--profile``: the checker (profile.node_problems / check_model), profile files, and conversion
that rewrites only what the target cannot run, into the cheapest exact form it runs, verified.

Built-in profiles each get a model that violates them (``VIOLATORS``), converted under the profile;
the result must pass ``check_model`` with the profile read back from its file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

import onnx_uprewrite as up
from onnx_uprewrite import profile as pf
from onnx_uprewrite.cli import cli
from onnx_uprewrite.errors import UsageError

EXPORTED = Path(__file__).resolve().parent.parent / "models" / "exported"


def _ct(x_shape=(1, 8, 6, 6), cout=4, kernel=4, stride=2, pad=1, group=1, dilation=1, output_padding=0,
        output_shape=None, seed=0):
    rng = np.random.default_rng(seed)
    rank = len(x_shape) - 2
    w = rng.standard_normal((x_shape[1], cout // group) + (kernel,) * rank).astype(np.float32) * 0.2
    b = rng.standard_normal(cout).astype(np.float32)
    attrs = dict(strides=[stride] * rank, pads=[pad] * 2 * rank, group=group, dilations=[dilation] * rank)
    if output_padding:
        attrs["output_padding"] = [output_padding] * rank
    if output_shape:
        attrs["output_shape"] = output_shape
        del attrs["pads"]
    node = helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"], name="up", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, list(x_shape))],
                              [helper.make_tensor_value_info("y", 1, None)],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _resize_conv(scale=2, mode="nearest", channels=4, size=6):
    rng = np.random.default_rng(1)
    ctm = "asymmetric" if mode == "nearest" else "half_pixel"
    nodes = [helper.make_node("Resize", ["x", "", "sc"], ["u"], name="rs", mode=mode,
                              coordinate_transformation_mode=ctm, nearest_mode="floor"),
             helper.make_node("Conv", ["u", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, channels, size, size])],
                              [helper.make_tensor_value_info("y", 1, None)],
                              [numpy_helper.from_array(np.array([1, 1, scale, scale], np.float32), "sc"),
                               numpy_helper.from_array(rng.standard_normal((channels, channels, 3, 3))
                                                       .astype(np.float32), "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _profile(**ops):
    return pf.parse_profile({"name": "test", "ops": ops})


def _convert_under(model, profile):
    result = up.convert(model, profile=profile)
    assert result.report.verification == "passed"
    assert pf.check_model(result.model, profile if isinstance(profile, pf.Profile) else pf.load_profile(profile)) == []
    assert result.report.profile_violations == []
    return result


# ---------------------------------------------------------------------------------------------
# the checker


def _problems(model, profile):
    return [str(v) for v in pf.check_model(model, profile)]


def test_checker_names_each_limit():
    prof = _profile(ConvTranspose={"strides": [2], "kernels": [2, 4, 8], "max_pad": 1, "dilation": False,
                                   "output_padding": False, "groups": "1"})
    assert _problems(_ct(), prof) == []
    assert "strides [3, 3] not among [2]" in _problems(_ct(stride=3, kernel=4), prof)[0]
    assert "kernel [3, 3] not among [2, 4, 8]" in _problems(_ct(kernel=3), prof)[0]
    assert "pads [2, 2, 2, 2] over 1" in _problems(_ct(pad=2), prof)[0]
    assert "dilations [2, 2]" in _problems(_ct(dilation=2), prof)[0]
    assert "output_padding [1, 1]" in _problems(_ct(output_padding=1), prof)[0]
    assert "group 2" in _problems(_ct(group=2), prof)[0]


def test_checker_depthwise_groups():
    prof = _profile(ConvTranspose={"groups": "1_or_depthwise"})
    assert _problems(_ct(x_shape=(1, 4, 5, 5), cout=4, group=4), prof) == []
    assert "not depthwise" in _problems(_ct(x_shape=(1, 8, 5, 5), cout=4, group=2), prof)[0]


def test_checker_resize_and_depth_to_space():
    prof = _profile(Resize={"modes": ["nearest"], "scales": [2, 4]}, DepthToSpace={"modes": ["DCR"], "blocksizes": [2]})
    assert _problems(_resize_conv(2), prof) == []
    assert "scales [3.0, 3.0] not among [2, 4]" in _problems(_resize_conv(3), prof)[0]
    assert "mode linear" in _problems(_resize_conv(2, "linear"), prof)[0]
    crd = onnx.load(EXPORTED / "torch_pixelshuffle_op17.onnx")
    assert any("mode CRD not among ['DCR']" in p for p in _problems(crd, prof))


def test_unsupported_op():
    prof = _profile(ConvTranspose={"supported": False})
    assert _problems(_ct(), prof) == ["ConvTranspose 'up': test does not run ConvTranspose"]


# ---------------------------------------------------------------------------------------------
# conversion


def test_only_what_the_target_cannot_run_is_rewritten():
    prof = _profile(ConvTranspose={"strides": [2], "kernels": [4]})
    result = _convert_under(_ct(), prof)
    (site,) = result.report.sites
    assert site.status == "skipped" and "runs it as it is" in site.reason


def test_no_convtranspose_target_gets_the_cheapest_form():
    result = _convert_under(_ct(), _profile(ConvTranspose={"supported": False}))
    (site,) = result.report.sites
    assert site.status == "rewritten" and site.target == "subpixel"  # fewer MACs than the masked Resize form
    assert "ConvTranspose" not in {n.op_type for n in result.model.graph.node}


def test_dcr_only_target_gets_a_permuted_conv():
    prof = _profile(ConvTranspose={"supported": False}, DepthToSpace={"modes": ["DCR"]})
    result = _convert_under(_ct(), prof)
    modes = [a.s for n in result.model.graph.node if n.op_type == "DepthToSpace" for a in n.attribute if a.name == "mode"]
    assert modes == [b"DCR"]


def test_crd_pixel_shuffle_becomes_dcr_or_convtranspose():
    model = onnx.load(EXPORTED / "torch_pixelshuffle_op17.onnx")
    x = dict(np.load(EXPORTED / "torch_pixelshuffle_op17.npz"))
    prof = _profile(DepthToSpace={"modes": ["DCR"]}, ConvTranspose={"supported": False})
    result = up.convert(model, profile=prof, inputs={k: v for k, v in x.items() if not k.startswith("out:")})
    assert result.report.verification == "passed"
    assert pf.check_model(result.model, prof) == []


def test_unsatisfiable_site_is_refused_with_each_reason(tmp_path):
    prof = {"name": "nothing", "ops": {"ConvTranspose": {"supported": False}, "Resize": {"supported": False},
                                       "DepthToSpace": {"supported": False}}}
    path = tmp_path / "nothing.json"
    path.write_text(json.dumps(prof))
    src = tmp_path / "m.onnx"
    onnx.save(_ct(), src)
    res = CliRunner().invoke(cli, ["convert", str(src), "-o", str(tmp_path / "o.onnx"), "--profile", str(path)])
    assert res.exit_code == 3, res.output
    assert "no exact form that nothing runs" in res.output
    assert "original: nothing does not run ConvTranspose" in res.output
    assert "nothing cannot run ConvTranspose 'up'" in res.output  # the checker's verdict on the result


@pytest.mark.parametrize("bad, needle", [
    ({"ops": {}}, "string 'name'"),
    ({"name": "x", "colour": 1}, "unknown key(s) colour"),
    ({"name": "x", "ops": {"Gemm": {}}}, "op 'Gemm'"),
    ({"name": "x", "ops": {"ConvTranspose": {"stride": [2]}}}, "unknown key(s) stride"),
    ({"name": "x", "ops": {"ConvTranspose": {"strides": 2}}}, "list of positive integers"),
    ({"name": "x", "ops": {"DepthToSpace": {"modes": ["dcr"]}}}, "among ['CRD', 'DCR']"),
    ({"name": "x", "ops": {"ConvTranspose": {"groups": 2}}}, "1 / depthwise"),
])
def test_bad_profile_files_are_usage_errors(tmp_path, bad, needle):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(UsageError, match=None) as info:
        pf.load_profile(path)
    assert needle in str(info.value)
    src = tmp_path / "m.onnx"
    onnx.save(_ct(), src)
    res = CliRunner().invoke(cli, ["convert", str(src), "-o", str(tmp_path / "o.onnx"), "--profile", str(path)])
    assert res.exit_code == 2 and needle in res.stderr and not (tmp_path / "o.onnx").exists()


def test_unknown_profile_name_lists_the_built_ins():
    with pytest.raises(UsageError, match="built-in: "):
        pf.load_profile("no-such-target")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_toml_profile(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('name = "toml-target"\n[ops.ConvTranspose]\nsupported = false\n')
    result = _convert_under(_ct(), pf.load_profile(path))
    assert result.report.sites[0].status == "rewritten"


# ---------------------------------------------------------------------------------------------
# built-in profiles: a model each violates, converted; the result passes the checker


def _nearest_conv(kernel, mode="nearest", scale=2, channels=4, size=6):
    rng = np.random.default_rng(3)
    ctm = "asymmetric" if mode == "nearest" else "half_pixel"
    nodes = [helper.make_node("Resize", ["x", "", "sc"], ["u"], name="rs", mode=mode,
                              coordinate_transformation_mode=ctm, nearest_mode="floor"),
             helper.make_node("Conv", ["u", "W"], ["y"], name="conv", pads=[kernel // 2] * 4)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, channels, size, size])],
                              [helper.make_tensor_value_info("y", 1, None)],
                              [numpy_helper.from_array(np.array([1, 1, scale, scale], np.float32), "sc"),
                               numpy_helper.from_array((rng.standard_normal((channels, channels, kernel, kernel))
                                                        * 0.1).astype(np.float32), "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


#: profile -> (model violating it, what must be gone or hold afterwards)
VIOLATORS = {
    "tidl": lambda: _ct(kernel=8, pad=3),  # kernels 2/3/4 only -> sub-pixel Conv 4x4 + DepthToSpace(2)
    "ethos-u": lambda: _ct(kernel=4, stride=4, pad=0),  # strides 1/2, no DepthToSpace -> Resize x4 + Conv
    "rknn": lambda: _ct(kernel=3, stride=3, pad=0),  # strides 2/4/8 -> sub-pixel (blocksize 3)
    "kl520": lambda: _ct(),  # no ConvTranspose -> sub-pixel CRD
    "kl720": lambda: _ct(kernel=3, stride=3, pad=0),  # stride 2 only, DepthToSpace 2 only -> Resize x3 + Conv
    "ax650": lambda: _ct(x_shape=(1, 8, 5, 5), output_shape=[10, 10]),  # no output_shape -> pads
    "ax650-dilated": lambda: _ct(dilation=2),  # no dilation, DepthToSpace DCR only -> sub-pixel DCR
    "vitis-dpu": lambda: _nearest_conv(17),  # Conv kernel <= 16 -> ConvTranspose 18x18
    "dla": lambda: _nearest_conv(3, mode="linear"),  # Resize nearest only -> ConvTranspose
    "mnn": lambda: _ct(x_shape=(1, 4, 4, 4, 4)),  # 3-D ConvTranspose computes wrong values -> sub-pixel
    "iree": lambda: _ct(cout=8, group=8),  # grouped ConvTranspose rejected, CRD wrong -> DCR per phase
    "rk3588": lambda: _ct(kernel=9, stride=3, pad=4, output_padding=2),  # FSRCNN: stride 3 and D2S 3 on the CPU
    "rk3576": lambda: up.convert(_ct(x_shape=(1, 4, 4, 4, 4)), to="subpixel", d2s_mode="CRD").model,  # rank-8 Transpose
    "ethos-u55": lambda: _ct(kernel=9, stride=3, pad=4, output_padding=2),  # FSRCNN -> Conv + DepthToSpace CRD
    "ethos-u85": lambda: _ct(kernel=3, stride=2, pad=1, output_padding=1),  # output_padding -> sub-pixel CRD
    "ncnn": lambda: up.convert(_ct(), to="subpixel", d2s_mode="DCR").model,  # no DCR layer -> CRD
    "rv1106": lambda: _nearest_conv(3, mode="linear"),  # int8 bilinear Resize wrong -> ConvTranspose
    "rk3566": lambda: _ct(kernel=9, stride=3, pad=4, output_padding=2),  # as rk3588
    "rk3562": lambda: up.convert(_ct(x_shape=(1, 4, 4, 4, 4)), to="subpixel", d2s_mode="CRD").model,  # as rk3576
}
#: measured profiles without a limit on upsampling: nothing to rewrite
NO_LIMITS = {"cv18xx", "openvino", "tvm"}


def test_every_built_in_profile_has_a_violating_model():
    assert set(pf.builtin_names()) - {v.split("-dilated")[0] for v in VIOLATORS} == NO_LIMITS


@pytest.mark.parametrize("case", sorted(VIOLATORS))
def test_built_in_profile_converts_its_violator(case):
    name = case.split("-dilated")[0]
    prof = pf.load_profile(name)
    model = VIOLATORS[case]()
    assert pf.check_model(model, prof), f"the test model does not violate {name}"
    result = _convert_under(model, name)
    assert result.report.sites and all(s.status == "rewritten" for s in result.report.sites)
    reread = pf.load_profile(pf.BUILTIN_DIR / f"{name}.json")  # the checker reads the file itself
    assert pf.check_model(result.model, reread) == []


def test_cv18xx_has_no_upsampling_limit_found_so_nothing_is_rewritten():
    """TPU-MLIR runs ConvTranspose, Resize and both DepthToSpace modes (profiles/SOURCES.md)."""
    result = _convert_under(_ct(), "cv18xx")
    assert result.report.sites[0].status == "skipped"


@pytest.mark.parametrize("name", sorted(NO_LIMITS))
def test_profile_without_limits_rewrites_nothing(name):
    result = _convert_under(_ct(), name)
    assert result.report.sites[0].status == "skipped"


def test_placement_kinds():
    """``violation`` says what the target does with an op beyond its limits: a CPU fallback and a
    measured miscompilation are violations of their own kind; the default is a rejection."""
    prof = pf.parse_profile({"name": "npu", "ops": {"ConvTranspose": {"strides": [2], "violation": "cpu"},
                                                     "DepthToSpace": {"modes": ["DCR"], "violation": "wrong"},
                                                     "Resize": {"scales": [2]}}})
    [v] = pf.check_model(_ct(kernel=3, stride=3, pad=0), prof)
    assert (v.kind, v.op) == ("cpu", "ConvTranspose") and str(v).startswith("ConvTranspose 'up': CPU fallback: strides")
    crd = up.convert(_ct(), to="subpixel", d2s_mode="CRD").model
    assert [(v.kind, v.op) for v in pf.check_model(crd, prof)] == [("wrong", "DepthToSpace")]
    [v] = pf.check_model(_ct(kernel=3, stride=3, pad=0), pf.parse_profile({"name": "r", "ops": {
        "ConvTranspose": {"strides": [2]}}}))
    assert v.kind == "rejected" and str(v) == "ConvTranspose 'up': strides [3, 3] not among [2]"


def test_ranks_and_layout_limits():
    prof = pf.parse_profile({"name": "t", "ops": {"ConvTranspose": {"ranks": [1, 2]},
                                                   "Reshape": {"max_rank": 5}, "Transpose": {"max_rank": 5}}})
    assert [v.reason for v in pf.check_model(_ct(x_shape=(1, 4, 4, 4, 4)), prof)] == \
        ["3-D ConvTranspose (spatial ranks allowed: [1, 2])"]
    crd3d = up.convert(_ct(x_shape=(1, 4, 4, 4, 4)), to="subpixel", d2s_mode="CRD").model
    assert sorted(v.reason for v in pf.check_model(crd3d, prof)) == ["rank 8 over 5"] * 2
    flatten = helper.make_node("Reshape", ["y", "flat"], ["z"], name="flatten")  # not upsampling: unchecked
    crd3d.graph.initializer.append(numpy_helper.from_array(np.array([1, -1, 1, 1, 1, 1], np.int64), "flat"))
    crd3d.graph.node.append(flatten)
    assert len(pf.check_model(crd3d, prof)) == 2
    assert pf.check_model(up.convert(_ct(x_shape=(1, 4, 4, 4, 4)), to="subpixel", d2s_mode="DCR").model, prof) == []
    for bad in ({"violation": "npu"}, {"ranks": [0]}, {"max_rank": -1}):
        with pytest.raises(UsageError):
            pf.parse_profile({"name": "t", "ops": {"Reshape" if "max_rank" in bad else "Resize": bad}})


def test_built_in_profiles_cite_their_sources():
    for name in pf.builtin_names():
        data = json.loads((pf.BUILTIN_DIR / f"{name}.json").read_text())
        assert data["sources"] and all(s.get("quote") for s in data["sources"]), name


# ---------------------------------------------------------------------------------------------
# regressions from review: odd profiles and odd nodes never escape as internal errors


def test_profile_modes_must_be_strings_and_names_one_line(tmp_path):
    with pytest.raises(UsageError, match="a list among"):
        pf.parse_profile({"name": "x", "ops": {"Resize": {"modes": [["nearest"]]}}})
    assert pf.parse_profile({"name": "acc\nuprewrite: ok"}).name == "acc\\nuprewrite: ok"


def test_unexpected_attribute_types_are_reported_not_raised():
    model = _ct()
    node = model.graph.node[0]
    for a in list(node.attribute):
        if a.name == "dilations":
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute("dilations", 2))
    (v,) = pf.check_model(model, _profile(ConvTranspose={"dilation": False}))
    assert "cannot be checked" in v.reason


def test_opset10_resize_reads_its_scales_from_input_1():
    model = _resize_conv(3)
    rs = model.graph.node[0]
    rs.input[:] = ["x", "sc"]
    for a in list(rs.attribute):
        if a.name != "mode":
            rs.attribute.remove(a)
    model.opset_import[0].version = 10
    assert "scales [3.0, 3.0] not among [2]" in str(pf.check_model(model, _profile(Resize={"scales": [2]}))[0])


def test_qdq_weights_are_seen_through_dequantize_linear():
    model = onnx.load(EXPORTED / "torch_unet_decoder_op17_qdq_pt.onnx")
    found = pf.check_model(model, _profile(ConvTranspose={"kernels": [3]}))
    assert found and all("kernel" in v.reason for v in found)


def test_checker_sees_the_per_phase_convs_behind_a_concat():
    """The sub-pixel form's per-phase layout (Conv x4 -> Concat -> DepthToSpace): each Conv is checked."""
    model = up.convert(_ct(x_shape=(1, 32, 8, 8), cout=32), to="subpixel").model
    assert [n.op_type for n in model.graph.node].count("Conv") == 4
    problems = _problems(model, _profile(Conv={"max_kernel": 1}))
    assert len(problems) == 4 and all("kernel" in p for p in problems), problems
