"""Input fixing, shape resolution by every step, and valid stage sub-models on generated graphs
(the cases exporters produce: see tests/model_builders.py). Real onnxruntime sessions throughout."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from hetsched.errors import ModelError
from hetsched.model import shapes
from hetsched.model.graph import analyze, extract_stage, load_model, random_inputs
from tests import model_builders as mb
from tests.stage_checks import assert_every_cut_equal, chain_outputs, run

pytestmark = pytest.mark.timeout(120)


def save(tmp_path, model, name="m.onnx") -> str:
    path = str(tmp_path / name)
    onnx.save(model, path)
    return path


def input_dims(model) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in
            model.graph.input[0].type.tensor_type.shape.dim]


# ------------------------------------------------------------------------------- dynamic dims
@pytest.mark.parametrize("batch", ["batch", "N", "unk__123", "DynamicDimension.0", "p2o.DynamicDimension.0",
                                   -1, 0, None])
def test_dynamic_batch_is_fixed_to_one_with_one_warning(tmp_path, caplog, batch):
    m = mb.cnn(batch_dim="batch")
    for vi in (m.graph.input[0], m.graph.output[0]):
        d = vi.type.tensor_type.shape.dim[0]
        d.Clear()
        if isinstance(batch, str):
            d.dim_param = batch
        elif batch is not None:
            d.dim_value = batch
    path = save(tmp_path, m)
    with caplog.at_level(logging.WARNING, logger="hetsched"):
        fixed = load_model(path)
        g = analyze(fixed)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "batch dim fixed to 1" in warnings[0].getMessage()
    assert path in warnings[0].getMessage() and "'input'" in warnings[0].getMessage()
    assert input_dims(fixed) == [1, 3, 16, 16]
    assert g.inputs[0].shape == (1, 3, 16, 16) and g.outputs[0].shape == (1, 10)
    assert len(g.layers) >= 4
    # the fixed model is what onnxruntime and the stages see: a 2-stage split equals the whole
    feed = random_inputs(g.inputs, seed=0)
    assert np.abs(chain_outputs(fixed, g, [2], feed)["logits"] - run(fixed, feed)["logits"]).max() <= 1e-5


def test_analyze_fixes_a_dynamic_batch_itself_and_stages_come_out_static():
    m = mb.cnn(batch_dim="N")
    g = analyze(m)  # not through load_model: still fixed to batch 1
    assert g.inputs[0].shape == (1, 3, 16, 16)
    sub = extract_stage(m, g, 0, 1)
    onnx.checker.check_model(sub, full_check=True)
    assert input_dims(sub) == [1, 3, 16, 16]
    whole = extract_stage(m, g, 0, len(g.layers) - 1)  # the dynamic original is not handed back
    assert input_dims(whole) == [1, 3, 16, 16]


def test_missing_height_width_is_a_clear_error_naming_file_input_dims_and_key(tmp_path):
    path = save(tmp_path, mb.cnn(batch_dim="N", hw=("height", "width")), "detector.onnx")
    with pytest.raises(ModelError) as err:
        load_model(path)
    msg = str(err.value)
    for part in (path, "'input'", "['N', 3, 'height', 'width']", "dims 2, 3", "model_input.shape", "--input-shape"):
        assert part in msg, (part, msg)


def test_input_shape_fixes_height_width_and_outputs_follow(tmp_path):
    path = save(tmp_path, mb.cnn(batch_dim="N", hw=("height", "width")))
    fixed = load_model(path, input_shape=(1, 3, 24, 20))
    assert input_dims(fixed) == [1, 3, 24, 20]
    g = analyze(fixed)
    assert g.boundaries[1][0].shape == (1, 8, 24, 20) and g.outputs[0].shape == (1, 10)


@pytest.mark.parametrize("shape, words", [((1, 3, 24), ["3 dims", "4 dims"]),
                                          ((1, 4, 24, 24), ["dim 1 is fixed to 3", "use 3"]),
                                          ((1, 0, 24, 24), ["positive"])])
def test_bad_input_shape_is_refused_with_the_reason(tmp_path, shape, words):
    path = save(tmp_path, mb.cnn(batch_dim="N", hw=("height", "width")))
    with pytest.raises(ModelError) as err:
        load_model(path, input_shape=shape)
    assert all(w in str(err.value) for w in words) and path in str(err.value)


def test_static_model_is_returned_unchanged():
    m = mb.two_output_net()
    assert shapes.fix_model(m) is m


# ------------------------------------------------------------------------------- shape steps
def test_tf2onnx_pad_from_constant_cast_chain_gets_cut_points():
    """onnx shape inference loses every shape after the first Pad; the later steps recover them
    and the net is cut between its residual blocks."""
    m = shapes.fix_model(mb.tf2onnx_pad_resnet(blocks=3))
    res = shapes.resolve_shapes(m)
    assert res.counts[0][0] == shapes.STEP_ONNX and res.counts[0][1] > 20  # onnx alone: almost nothing
    assert not res.unknown and res.source != shapes.STEP_ONNX
    g = analyze(m)
    assert g.shape_source == res.source and "all static" in g.shape_detail
    pads = [layer.index for layer in g.layers if "Pad" in layer.op_types]
    assert len(g.layers) >= 6 and len(set(pads)) >= 4
    # the Constant -> Cast chain never crosses a cut: every boundary carries one float activation
    assert all(len(b) == 1 and b[0].dtype == "float32" for b in g.boundaries)
    assert_every_cut_equal(m, g)


@pytest.mark.parametrize("step", [shapes.STEP_SYMBOLIC, shapes.STEP_RUN])
def test_symbolic_inference_or_a_run_alone_resolves_the_pad_chain(step):
    m = shapes.fix_model(mb.tf2onnx_pad_resnet(blocks=2))
    res = shapes.resolve_shapes(m, steps=(shapes.STEP_ONNX, step))
    assert res.source == step and not res.unknown, res.describe()
    g = analyze(m, shape_steps=(shapes.STEP_ONNX, step))
    assert len(g.layers) == len(analyze(m).layers)


def test_constant_folding_recovers_the_shapes_after_each_pad():
    """onnxruntime's basic optimisation folds the Cast into a constant (and fuses each Pad into its
    Conv, so the Pad outputs themselves are gone from the optimised model): everything after the
    Pads is sized again; the run then sizes the fused-away Pad outputs."""
    m = shapes.fix_model(mb.tf2onnx_pad_resnet(blocks=2))
    res = shapes.resolve_shapes(m, steps=(shapes.STEP_ONNX, shapes.STEP_FOLDING, shapes.STEP_RUN))
    (_, after_onnx), (_, after_folding), (_, after_run) = res.counts
    pads = [n.output[0] for n in m.graph.node if n.op_type == "Pad"]
    assert after_folding == len(pads) < after_onnx and after_run == 0 and res.source == shapes.STEP_RUN
    assert res.infos[pads[-1]].shape == (1, 8, 18, 18)


def test_onnx_alone_does_not_even_size_the_output_of_the_pad_chain():
    """What issue 13 saw: with onnx shape inference only, nothing after the first Pad has a shape."""
    m = shapes.fix_model(mb.tf2onnx_pad_resnet(blocks=2))
    with pytest.raises(ModelError, match="'logits' has no static shape.*onnxruntime run"):
        analyze(m, shape_steps=(shapes.STEP_ONNX,))


def test_contrib_op_shape_only_a_real_run_can_find():
    m = mb.contrib_op_net()
    res = shapes.resolve_shapes(m)
    assert [c for _, c in res.counts[:3]] == [res.counts[0][1]] * 3 and res.counts[0][1] > 0
    assert res.source == shapes.STEP_RUN and not res.unknown
    sig = next(n.output[0] for n in m.graph.node if n.op_type == "Sigmoid")
    assert res.infos[sig].shape == (1, 1, 8, 8, 8) and res.infos[sig].dtype == "float32"
    g = analyze(m)
    assert g.shape_source == shapes.STEP_RUN and len(g.layers) >= 5
    assert_every_cut_equal(m, g)
    without_run = analyze(m, shape_steps=shapes.STEPS[:3])
    assert len(without_run.layers) < len(g.layers)


def test_data_dependent_output_is_refused_naming_the_tensor():
    with pytest.raises(ModelError) as err:
        analyze(mb.nonzero_output_net())
    assert "'where'" in str(err.value) and "no static shape" in str(err.value)


# ------------------------------------------------------------------------------- sub-models
def test_shared_initializer_and_constant_are_copied_into_both_stages():
    m = mb.shared_weight_net()
    g = analyze(m)
    layer_of = {name: layer.index for layer in g.layers for name in layer.node_names}
    users = sorted({layer_of[n.name] for n in m.graph.node if "shared.w" in n.input})
    assert len(users) == 2 and users[0] < users[1]
    for cut in range(users[0] + 1, users[1] + 1):
        a, b = extract_stage(m, g, 0, cut - 1), extract_stage(m, g, cut, len(g.layers) - 1)
        for sub in (a, b):
            assert "shared.w" in {t.name for t in sub.graph.initializer}
            reads_bias = any(n.op_type == "Add" for n in sub.graph.node)
            assert reads_bias == any(n.op_type == "Constant" for n in sub.graph.node)
    assert_every_cut_equal(m, g)


def test_stage_models_keep_opsets_ir_and_pass_the_full_checker():
    m = mb.tf2onnx_pad_resnet(blocks=2)
    m.opset_import.append(onnx.helper.make_opsetid("ai.onnx.ml", 2))
    fixed = shapes.fix_model(m)
    g = analyze(fixed)
    for i in range(len(g.layers)):
        sub = extract_stage(fixed, g, i, i)
        onnx.checker.check_model(sub, full_check=True)
        assert sub.ir_version == m.ir_version == 7
        assert [(o.domain, o.version) for o in sub.opset_import] == [(o.domain, o.version) for o in m.opset_import]
        assert [list(t.shape) for t in g.boundaries[i]] == [input_dims_of(v) for v in sub.graph.input]


def input_dims_of(vi) -> list:
    return [d.dim_value for d in vi.type.tensor_type.shape.dim]


def test_two_outputs_are_both_carried_to_the_last_stage():
    m = mb.two_output_net()
    g = analyze(m)
    assert [t.name for t in g.outputs] == ["box", "cls"]
    assert [t.shape for t in g.outputs] == [(1, 4), (1, 6)]
    assert_every_cut_equal(m, g)


def test_nhwc_and_uint8_inputs_split_like_any_other():
    for dtype in (TensorProto.FLOAT, TensorProto.UINT8):
        m = mb.nhwc_net(dtype)
        g = analyze(m)
        assert g.inputs[0].shape == (1, 16, 16, 3)
        assert g.inputs[0].dtype == ("uint8" if dtype == TensorProto.UINT8 else "float32")
        assert all(b[0].dtype == "float32" for b in g.boundaries[1:])  # the uint8 -> float Cast is inside
        assert_every_cut_equal(m, g)
