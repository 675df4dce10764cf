"""Names the rewrite generates never collide with names the model already uses anywhere (value_info,
If/Loop bodies, function bodies, training_info, sparse initializers); sparse initializers are read
as weights and kept otherwise; training_info stays consistent; refusal lines stay one line.

Every converted model really loads and runs in onnxruntime and is compared with the original.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hostile import assert_clean_exit, invoke
from onnx_uprewrite.api import convert

IR_VERSION, OPSET = 8, 17
TARGETS = ("subpixel", "resize", "convtranspose")
RNG = np.random.default_rng(17)
W = RNG.standard_normal((3, 4, 4, 4)).astype(np.float32)  # ConvTranspose k4 s2 p1, 3 -> 4 channels
B = RNG.standard_normal(4).astype(np.float32)
V = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)  # Conv 3x3 p1 after a nearest x2 Resize
X = RNG.standard_normal((1, 3, 5, 6)).astype(np.float32)
EPS32 = float(np.finfo(np.float32).eps)


def _site(target: str, weight: str = "W") -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """x -> one upsampling site named 'up' -> 'h' (4 channels, 10x12), in a form other than ``target``;
    the weight initializer (named ``weight``) is returned apart so that callers can make it sparse."""
    if target != "convtranspose":
        node = helper.make_node("ConvTranspose", ["x", weight, "B"], ["h"], name="up", strides=[2, 2],
                                pads=[1, 1, 1, 1])
        return [node], [numpy_helper.from_array(W, weight), numpy_helper.from_array(B, "B")]
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["r"], name="up_resize", mode="nearest",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
             helper.make_node("Conv", ["r", weight, "B"], ["h"], name="up", pads=[1, 1, 1, 1])]
    return nodes, [numpy_helper.from_array(V, weight), numpy_helper.from_array(B, "B"), scales]


def _model(nodes, inits, outputs=("y",), **kwargs) -> onnx.ModelProto:
    kwargs.setdefault("opset_imports", [helper.make_opsetid("", OPSET)])
    functions = kwargs.pop("functions", [])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 6])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              initializer=inits, sparse_initializer=kwargs.pop("sparse", []))
    return helper.make_model(graph, ir_version=IR_VERSION, functions=functions, **kwargs)


def _plain(target: str) -> onnx.ModelProto:
    nodes, inits = _site(target)
    return _model(nodes + [helper.make_node("Relu", ["h"], ["y"], name="relu")], inits)


def generated_names(target: str) -> list[str]:
    """Node and tensor names the rewrite of the plain model creates (e.g. 'up/conv', 'up/conv_out')."""
    before = _plain(target)
    after = convert(before, to=target, verify=False).model
    old = {n.name for n in before.graph.node} | {o for n in before.graph.node for o in n.output} \
        | {t.name for t in before.graph.initializer}
    new = [t.name for t in after.graph.initializer] + [o for n in after.graph.node for o in n.output] \
        + [n.name for n in after.graph.node]  # an initializer's name first: the sparse case plants it
    names = [n for n in dict.fromkeys(new) if n and n not in old]
    assert names and all(n.startswith("up/") for n in names), names
    return names


def _chain(names, first: str, prefix: str = "") -> tuple[list[onnx.NodeProto], str]:
    """Neg nodes from ``first`` through tensors called ``names`` (node names too): every name used twice."""
    nodes, last = [], first
    for name in names:
        nodes.append(helper.make_node("Neg", [last], [prefix + name], name=prefix + name))
        last = prefix + name
    return nodes, last


def _body(name, names, first, inputs=()):
    nodes, last = _chain(names, first)
    nodes.append(helper.make_node("Identity", [last], [f"{name}_out"], name=f"{name}_identity"))
    outputs = [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)]
    if inputs:  # a Loop body: carries the condition through
        nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"], name=f"{name}_cond"))
        outputs.insert(0, helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []))
    return helper.make_graph(nodes, name, list(inputs), outputs)


def collision_model(target: str, where: str) -> onnx.ModelProto:
    """The plain site, then the generated names planted ``where``: each use runs in onnxruntime."""
    names = generated_names(target)
    nodes, inits = _site(target)
    extra = {}
    tail = [helper.make_node("Relu", ["h"], ["y"], name="relu")]
    if where == "value_info":  # typed as int64 vectors: a float tensor of that name contradicts them
        extra["value_info"] = [helper.make_tensor_value_info(n, TensorProto.INT64, [3]) for n in names]
    elif where == "if_body":
        inits.append(numpy_helper.from_array(np.array(True), "cond"))
        tail.append(helper.make_node("If", ["cond"], ["z"], name="branch",
                                     then_branch=_body("then", names, "h"), else_branch=_body("else", [], "h")))
    elif where == "loop_body":
        inits += [numpy_helper.from_array(np.array(2, np.int64), "trips"), numpy_helper.from_array(np.array(True), "go")]
        loop_inputs = [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                       helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])]
        tail.append(helper.make_node("Loop", ["trips", "go"], ["z"], name="loop",
                                     body=_body("body", names, "h", loop_inputs)))
    elif where == "function":
        body, last = _chain(names, "fx")
        function = helper.make_function("local", "Negs", ["fx"], [last], body,
                                        [helper.make_opsetid("", OPSET)])
        extra["functions"] = [function]
        extra["opset_imports"] = [helper.make_opsetid("", OPSET), helper.make_opsetid("local", 1)]
        tail.append(helper.make_node("Negs", ["h"], ["z"], name="negs", domain="local"))
    elif where == "training_info":  # the algorithm updates an unrelated initializer through the names
        inits.append(numpy_helper.from_array(np.float32(2.0), "gain"))
        tail.append(helper.make_node("Mul", ["h", "gain"], ["z"], name="gain_mul"))
        algorithm, last = _chain(names, "gain")
        info = onnx.TrainingInfoProto()
        info.algorithm.CopyFrom(helper.make_graph(algorithm, "step", [],
                                                  [helper.make_tensor_value_info(last, TensorProto.FLOAT, [])]))
        info.update_binding.add(key="gain", value=last)
        extra["training_info"] = [info]
    elif where == "sparse_initializer":  # a real tensor of the main graph, read after the site
        sparse = [helper.make_sparse_tensor(numpy_helper.from_array(np.array([1.5], np.float32), names[0]),
                                            numpy_helper.from_array(np.array([1], np.int64), f"{names[0]}_idx"),
                                            [1, 4, 1, 1])]
        extra["sparse"] = sparse
        tail.append(helper.make_node("Add", ["h", names[0]], ["z"], name="sparse_add"))
    else:
        raise ValueError(where)
    training = extra.pop("training_info", [])
    value_info = extra.pop("value_info", [])
    model = _model(nodes + tail, inits, ("y", "z") if len(tail) > 1 else ("y",), **extra)
    model.graph.value_info.extend(value_info)
    model.training_info.extend(training)
    return model


def run(model: onnx.ModelProto, feeds=None) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds or {"x": X})


def assert_same_function(original: onnx.ModelProto, rewritten: onnx.ModelProto) -> None:
    # one reordered sum of at most 3*4*4 = 48 products per output, magnitudes ~ 10: 1e-5 relative is ~ 80 eps
    for a, b in zip(run(original), run(rewritten), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * max(1.0, float(np.abs(a).max())))


PLACES = ("value_info", "if_body", "loop_body", "function", "training_info", "sparse_initializer")


@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_generated_names_avoid_every_name_of_the_model(target, where, verify):
    model = collision_model(target, where)
    result = convert(model, to=target, verify=verify)
    assert [s.status for s in result.report.sites] == ["rewritten"], result.report.summary()
    rewritten = result.model
    op = {"subpixel": "DepthToSpace", "resize": "Resize", "convtranspose": "ConvTranspose"}[target]
    assert op in {n.op_type for n in rewritten.graph.node}
    assert_same_function(model, rewritten)
    names = generated_names(target)
    planted = {names[0]} if where == "sparse_initializer" else set(names)
    emitted = [n for n in rewritten.graph.node if n not in model.graph.node]
    new_names = {n.name for n in emitted} | {o for n in emitted for o in n.output} - {"h"} \
        | {t.name for t in rewritten.graph.initializer} - {t.name for t in model.graph.initializer}
    assert emitted and not new_names & planted, sorted(new_names & planted)
    if where == "value_info":  # the planted entries stay, the new tensors took other names
        assert {v.name for v in rewritten.graph.value_info} == {v.name for v in model.graph.value_info}
    if where == "training_info":
        assert rewritten.training_info[0].update_binding[0].key == "gain"


def test_removed_tensors_lose_their_value_info():
    """Resize + Conv -> ConvTranspose removes the Resize output 'r': its value_info goes with it."""
    model = _plain("convtranspose")
    model.graph.value_info.extend([helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 3, 10, 12]),
                                   helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 4, 10, 12])])
    rewritten = convert(model, to="convtranspose").model
    assert [v.name for v in rewritten.graph.value_info] == ["h"]
    assert "r" not in {o for n in rewritten.graph.node for o in n.output}
    assert_same_function(model, rewritten)


# ----------------------------------------------------------------------------- sparse initializers


def sparse(value: np.ndarray, name: str, coordinates: bool) -> onnx.SparseTensorProto:
    """``value`` as a sparse tensor: linear indices [NNZ] or coordinates [NNZ, rank]."""
    flat = value.ravel()
    nonzero = np.flatnonzero(flat)
    indices = np.stack(np.unravel_index(nonzero, value.shape), axis=1) if coordinates else nonzero
    return helper.make_sparse_tensor(numpy_helper.from_array(flat[nonzero], name),
                                     numpy_helper.from_array(indices.astype(np.int64), f"{name}_indices"),
                                     list(value.shape))


def sparse_model(target: str, coordinates: bool) -> onnx.ModelProto:
    """The site's weight is a sparse initializer (half its entries zero); another sparse
    initializer 'offset' is added after the site."""
    nodes, inits = _site(target)
    dense = numpy_helper.to_array(inits[0]).copy()
    dense[np.random.default_rng(3).random(dense.shape) < 0.5] = 0
    offset = np.zeros((1, 4, 1, 1), np.float32)
    offset[0, 2] = 1.5
    nodes.append(helper.make_node("Add", ["h", "offset"], ["y"], name="offset_add"))
    return _model(nodes, inits[1:], sparse=[sparse(dense, "W", coordinates), sparse(offset, "offset", coordinates)])


@pytest.mark.parametrize("coordinates", [True, False], ids=["coo", "linear"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_sparse_weights_are_read_and_other_sparse_initializers_kept(target, coordinates, verify, tmp_path):
    model = sparse_model(target, coordinates)
    out = tmp_path / "out.onnx"
    result = convert(model, to=target, verify=verify, output=out)
    assert [s.status for s in result.report.sites] == ["rewritten"], result.report.summary()
    saved = onnx.load(str(out))
    # the weight lives on in the emitted (dense) weights only; the other sparse initializer is untouched
    assert [t.values.name for t in saved.graph.sparse_initializer] == ["offset"]
    assert saved.graph.sparse_initializer[0] == model.graph.sparse_initializer[1]
    assert_same_function(model, saved)


def test_shared_sparse_weight_stays():
    """A sparse weight that another node also reads is kept as it is."""
    model = sparse_model("subpixel", coordinates=False)
    model.graph.node.append(helper.make_node("ReduceSum", ["W"], ["w_sum"], name="w_sum", keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("w_sum", TensorProto.FLOAT, None))
    rewritten = convert(model, to="subpixel").model
    assert [t.values.name for t in rewritten.graph.sparse_initializer] == ["W", "offset"]
    assert_same_function(model, rewritten)


# ----------------------------------------------------------------------------- training_info


def training_model(bind: bool) -> onnx.ModelProto:
    """The plain ConvTranspose site; training_info's algorithm reads its weight 'W' (halves it) and,
    when ``bind``, writes the result back to 'W' (update_binding)."""
    model = _plain("subpixel")
    step = helper.make_graph([helper.make_node("Mul", ["W", "half"], ["W_next"], name="halve")], "step", [],
                             [helper.make_tensor_value_info("W_next", TensorProto.FLOAT, list(W.shape))],
                             initializer=[numpy_helper.from_array(np.float32(0.5), "half")])
    info = onnx.TrainingInfoProto()
    info.algorithm.CopyFrom(step)
    if bind:
        info.update_binding.add(key="W", value="W_next")
    model.training_info.append(info)
    return model


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_site_whose_weight_training_updates_is_refused(verify):
    model = training_model(bind=True)
    result = convert(model, to="subpixel", verify=verify)
    [site] = result.report.sites
    assert site.status == "refused"
    assert "'up'" in site.reason and "training_info" in site.reason and "'W'" in site.reason
    assert result.model.training_info[0].update_binding[0].key == "W"
    assert "W" in {t.name for t in result.model.graph.initializer}
    assert_same_function(model, result.model)


def test_weight_training_only_reads_is_kept_beside_the_rewrite():
    model = training_model(bind=False)
    result = convert(model, to="subpixel")
    assert [s.status for s in result.report.sites] == ["rewritten"]
    kept = {t.name for t in result.model.graph.initializer}
    assert "W" in kept and "B" not in kept  # the algorithm reads W; B was the site's alone
    assert_same_function(model, result.model)


def _reading(model: onnx.ModelProto, node: onnx.NodeProto) -> onnx.ModelProto:
    info = model.training_info.add()
    info.algorithm.CopyFrom(helper.make_graph([node], "step", [], [helper.make_tensor_value_info(
        node.output[0], TensorProto.FLOAT, None)]))
    return model


def _main_tensors(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    return {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}


@pytest.mark.parametrize("source, target, tensor", [
    ("convtranspose", "convtranspose", "r"),  # Resize + Conv: the Resize output
    ("subpixel", "convtranspose", "up/conv_out"),  # Conv + DepthToSpace + Slice: the Conv output
    ("subpixel", "convtranspose", "up/depth_to_space_out"),
    ("subpixel", "resize", "W"),  # named only in an attribute (Gradient's xs)
])
def test_tensors_training_reads_survive(source, target, tensor):
    """The algorithm runs on the inference graph joined with its own: every main-graph tensor it
    reads must still exist after the rewrite (the site is refused, or shortened, otherwise)."""
    model = _plain(source)
    if source != target == "convtranspose" and tensor != "r":
        model = convert(model, to="subpixel").model  # a sub-pixel source named like its emitter
    if tensor == "W":
        node = helper.make_node("Gradient", ["x"], ["dW"], name="grad", domain="ai.onnx.preview.training",
                                xs=["W"], y="y")
        model.opset_import.append(helper.make_opsetid("ai.onnx.preview.training", 1))
    else:
        node = helper.make_node("ReduceMean", [tensor], ["loss"], name="loss")
    model = _reading(model, node)
    assert tensor in _main_tensors(model)
    result = convert(model, to=target)
    assert tensor in _main_tensors(result.model), result.report.summary()
    assert result.model.training_info == model.training_info
    assert_same_function(model, result.model)


# ----------------------------------------------------------------------------- one-line refusals


def test_refusal_of_node_with_newline_in_its_name_is_one_line(tmp_path):
    """A ConvTranspose named 'bad\\nname' whose weight is a graph input is refused: -q prints one line."""
    name = "bad\nname"
    graph = helper.make_graph(
        [helper.make_node("ConvTranspose", ["x", "Wd"], ["y"], name=name, strides=[2, 2], pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 6]),
         helper.make_tensor_value_info("Wd", TensorProto.FLOAT, list(W.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)]),
              str(src))
    quiet = invoke("convert", src, "-o", tmp_path / "out.onnx", "-q")
    assert_clean_exit(quiet, 3)
    lines = quiet.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("uprewrite: refused: "), quiet.stderr
    assert "'bad\\nname'" in lines[0]
    loud = invoke("convert", src, "-o", tmp_path / "out2.onnx", "--report", tmp_path / "report.json")
    assert_clean_exit(loud, 3)
    [site] = json.loads((tmp_path / "report.json").read_text())["sites"]
    assert site["node"] == name and "\n" not in site["reason"] and "'bad\\nname'" in site["reason"]
    refused = [ln for ln in loud.stdout.splitlines() if "refused" in ln]
    assert any("'bad\\nname'" in ln for ln in refused) and not any(ln.startswith("name") for ln in loud.stdout.splitlines())
    shown = invoke("inspect", src)
    assert_clean_exit(shown, 0)
    assert "'bad\\nname'" in shown.stdout and not any(ln.startswith("name") for ln in shown.stdout.splitlines())


def test_malformed_or_external_sparse_initializers_are_invalid_models():
    from onnx_uprewrite.errors import InvalidModelError

    for breakage, needle in (("index", "outside its shape"), ("indices_shape", "do not describe"),
                             ("external", "external file")):
        model = sparse_model("subpixel", coordinates=breakage != "indices_shape")
        offset = model.graph.sparse_initializer[1]
        if breakage == "index":
            offset.indices.CopyFrom(numpy_helper.from_array(np.array([[0, 9, 0, 0]], np.int64), "offset_indices"))
        elif breakage == "indices_shape":
            offset.indices.CopyFrom(numpy_helper.from_array(np.array([[1, 2]], np.int64), "offset_indices"))
        else:
            offset.values.data_location = TensorProto.EXTERNAL
            offset.values.external_data.add(key="location", value="offset.bin")
        with pytest.raises(InvalidModelError, match=needle) as caught:
            convert(model, to="subpixel")
        assert "'offset'" in str(caught.value)
    model = sparse_model("subpixel", coordinates=True)
    model.graph.sparse_initializer[1].indices.raw_data = b"\0" * 24  # 3 int64 for [1, 4] indices
    with pytest.raises(InvalidModelError, match="unreadable data"):
        convert(model, to="subpixel")


def test_verify_prints_one_line_per_output_whatever_its_name(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["out\nput"], name="r")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 6])],
                              [helper.make_tensor_value_info("out\nput", TensorProto.FLOAT, None)])
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)]),
              str(src))
    result = invoke("verify", src, src)
    assert_clean_exit(result, 0)
    lines = result.stdout.splitlines()
    assert any(ln.startswith("output 'out\\nput': ") for ln in lines) and not any(ln.startswith("put") for ln in lines)
