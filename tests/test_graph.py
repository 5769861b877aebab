"""Built-in SqueezeNet 1.1 structure and graph cut points (pure graph tests, onnxruntime for equality)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hetsched.errors import ModelError
from hetsched.model.graph import analyze, extract_stage, load_model, passthrough_names, random_inputs
from hetsched.model.squeezenet import EXPECTED_PARAMS, FIRE_MODULES, build_squeezenet11, count_parameters


def run(model, feed):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))


def test_squeezenet_structure():
    m = build_squeezenet11()
    onnx.checker.check_model(m)
    assert count_parameters(m) == EXPECTED_PARAMS == 1_235_496
    inits = {t.name: numpy_helper.to_array(t).shape for t in m.graph.initializer}
    assert inits["features.0.weight"] == (64, 3, 3, 3)
    conv1 = m.graph.node[0]
    assert [a.ints for a in conv1.attribute if a.name == "strides"][0] == [2, 2]
    for idx, cin, s, e1, e3 in FIRE_MODULES:
        assert inits[f"features.{idx}.squeeze.weight"] == (s, cin, 1, 1)
        assert inits[f"features.{idx}.expand1x1.weight"] == (e1, s, 1, 1)
        assert inits[f"features.{idx}.expand3x3.weight"] == (e3, s, 3, 3)
    assert inits["classifier.1.weight"] == (1000, 512, 1, 1)
    # deterministic weights
    assert build_squeezenet11().SerializeToString() == m.SerializeToString()
    assert build_squeezenet11(seed=1).SerializeToString() != m.SerializeToString()


def test_squeezenet_cut_points_carry_one_tensor(squeezenet):
    model, g = squeezenet
    assert all(len(b) == 1 for b in g.boundaries)
    names = {t.name for b in g.boundaries for t in b}
    # every fire module's output (the Concat) is a boundary: the network splits between fire modules
    for idx, *_ in FIRE_MODULES:
        assert f"features.{idx}_concat" in names
    # never between a Conv and its ReLU
    assert not any(n.endswith("_conv") for n in names)
    assert g.inputs[0].shape == (1, 3, 224, 224) and g.outputs[0].shape == (1, 1000)
    assert sum(layer.params for layer in g.layers) == EXPECTED_PARAMS
    assert all(layer.flops > 0 for layer in g.layers)


def _chain_outputs(model, g, cuts, feed):
    bounds = [0, *cuts, len(g.layers)]
    cur = feed
    for a, b in zip(bounds[:-1], bounds[1:]):
        sub = extract_stage(model, g, a, b - 1)
        wanted = {i.name for i in sub.graph.input}
        out = run(sub, {k: v for k, v in cur.items() if k in wanted})
        out.update({k: cur[k] for k in passthrough_names(g, a, b - 1)})
        assert sorted(out) == sorted(t.name for t in g.boundaries[b])
        cur = out
    return cur


@pytest.mark.parametrize("cuts", [[], [3], [1, 8], [5, 11, 20], list(range(1, 23))])
def test_split_squeezenet_equals_whole(squeezenet, cuts):
    model, g = squeezenet
    feed = random_inputs(g.inputs, seed=3)
    want = run(model, feed)
    got = _chain_outputs(model, g, cuts, feed)
    name = g.outputs[0].name
    assert np.abs(got[name] - want[name]).max() <= 1e-5


def residual_model(blocks: int = 2) -> onnx.ModelProto:
    """conv stem, then ``blocks`` residual blocks (conv-relu-conv + skip, Add, Relu), GAP, Gemm."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def conv(name, x, cin, cout, k=3):
        w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2 / (cin * k * k))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{name}.w"))
        nodes.append(helper.make_node("Conv", [x, f"{name}.w"], [name], name=name, pads=[k // 2] * 4))
        return name

    def relu(x):
        nodes.append(helper.make_node("Relu", [x], [f"{x}_relu"], name=f"{x}_relu"))
        return f"{x}_relu"

    x = relu(conv("stem", "input", 3, 8))
    for b in range(blocks):
        y = relu(conv(f"b{b}.c1", x, 8, 8))
        y = conv(f"b{b}.c2", y, 8, 8)
        nodes.append(helper.make_node("Add", [y, x], [f"b{b}.add"], name=f"b{b}.add"))
        x = relu(f"b{b}.add")
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flat"))
    inits.append(numpy_helper.from_array(rng.standard_normal((8, 10)).astype(np.float32), "fc.w"))
    nodes.append(helper.make_node("MatMul", ["flat", "fc.w"], ["out"], name="fc"))
    graph = helper.make_graph(nodes, "resnet_tiny",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 10])], initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_residual_skip_connections_are_respected():
    m = residual_model(blocks=2)
    g = analyze(m)
    # inside a block the skip tensor is live too, so no single-tensor cut falls there
    layer_of = {name: layer.index for layer in g.layers for name in layer.node_names}
    for b in range(2):
        block = {f"b{b}.c1", f"b{b}.c1_relu", f"b{b}.c2", f"b{b}.add"}
        assert len({layer_of[n] for n in block}) == 1, f"block {b} was split: {g.layer_names}"
    assert all(len(bd) == 1 for bd in g.boundaries)
    feed = random_inputs(g.inputs, seed=1)
    want = run(m, feed)["out"]
    for cut in range(1, len(g.layers)):
        got = _chain_outputs(m, g, [cut], feed)["out"]
        assert np.abs(got - want).max() <= 1e-5


def test_two_tensor_cuts_inside_residual_blocks():
    m = residual_model(blocks=1)
    g1, g2 = analyze(m, max_cut_tensors=1), analyze(m, max_cut_tensors=2)
    assert len(g2.layers) > len(g1.layers)
    assert any(len(b) == 2 for b in g2.boundaries)
    feed = random_inputs(g2.inputs, seed=2)
    want = run(m, feed)["out"]
    got = _chain_outputs(m, g2, list(range(1, len(g2.layers))), feed)["out"]
    assert np.abs(got - want).max() <= 1e-5


def test_dynamic_batch_is_fixed_but_dynamic_height_is_a_clear_error():
    m = residual_model(blocks=1)
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    assert analyze(m).inputs[0].shape == (1, 3, 16, 16)
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(ModelError, match=r"input 'input' has dims \['N', 3, 'H', 16\].*model_input.shape"):
        analyze(m)


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(str(tmp_path / "missing.onnx"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError):
        load_model(str(bad))
    with pytest.raises(ModelError, match="unknown built-in"):
        load_model("builtin:resnet9000")


def test_loaded_file_keeps_its_hash_and_names_its_source(tmp_path):
    """load_model records the file in metadata (for messages) without changing the model's hash,
    so cost-cache keys of models that need no fixing stay what they were."""
    from hetsched.model.graph import model_hash
    from hetsched.model.tensors import model_label
    path = tmp_path / "res.onnx"
    onnx.save(residual_model(blocks=1), str(path))
    loaded = load_model(str(path))
    assert model_label(loaded) == str(path)
    assert model_hash(loaded) == model_hash(onnx.load(str(path)))
    assert model_label(loaded) == str(path)  # hashing leaves the metadata in place
    assert analyze(loaded).model_hash == model_hash(onnx.load(str(path)))
