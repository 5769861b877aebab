"""Model inputs and outputs: NHWC / uint8 preprocessing decided from the model, which output top-k
comes from, whether it is already a probability vector; the config keys and the plan CLI flags."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from hetsched.config import InputConfig, parse_config
from hetsched.errors import ConfigError, ModelError
from hetsched.model.graph import TensorInfo, analyze
from hetsched.model.outputs import output_is_probability, topk_output_index
from hetsched.model.inputs import resolve_input_config
from hetsched.model.preprocess import model_input_shape, preprocess_array, top_k
from tests import model_builders as mb
from tests.stage_checks import run

pytestmark = pytest.mark.timeout(60)


def photo(h=40, w=52, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------- inputs
def test_nhwc_is_inferred_from_the_model_and_preprocessing_feeds_it():
    m = mb.nhwc_net(TensorProto.FLOAT, size=16)
    g = analyze(m)
    cfg = resolve_input_config(InputConfig(size=16, resize=18), g.inputs[0])
    assert (cfg.layout, cfg.dtype) == ("NHWC", "float32")
    x = preprocess_array(photo(), cfg)
    assert x.shape == model_input_shape(cfg) == g.inputs[0].shape and x.dtype == np.float32
    nchw = preprocess_array(photo(), dataclasses.replace(cfg, layout="NCHW"))
    np.testing.assert_array_equal(x, nchw.transpose(0, 2, 3, 1))
    assert run(m, {"image": x})["scores"].shape == (1, 5)


def test_uint8_model_input_gets_the_raw_cropped_pixels():
    m = mb.nhwc_net(TensorProto.UINT8, size=16)
    g = analyze(m)
    cfg = resolve_input_config(InputConfig(size=16, resize=16, channel_order="BGR"), g.inputs[0])
    assert (cfg.layout, cfg.dtype) == ("NHWC", "uint8")
    img = photo(16, 24)
    x = preprocess_array(img, cfg)
    assert x.dtype == np.uint8 and x.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(x[0], img[:, 4:20, ::-1])  # the center crop, BGR, no normalisation
    assert run(m, {"image": x})["scores"].shape == (1, 5)


def test_nchw_models_keep_nchw_and_explicit_layout_is_honoured():
    nchw = TensorInfo("x", "float32", (1, 3, 16, 16))
    assert resolve_input_config(InputConfig(size=16), nchw).layout == "NCHW"
    both = TensorInfo("x", "float32", (1, 3, 16, 3))  # ambiguous: channels first wins
    with pytest.raises(ConfigError, match="square"):
        resolve_input_config(InputConfig(size=16), both)
    nhwc = TensorInfo("image", "float32", (1, 16, 16, 3))
    with pytest.raises(ConfigError, match=r"input.layout: NCHW does not fit model input 'image' \[1, 16, 16, 3\]"):
        resolve_input_config(InputConfig(size=16, layout="NCHW"), nhwc)


@pytest.mark.parametrize("info, cfg, words", [
    (TensorInfo("x", "float32", (1, 3, 32, 32)), InputConfig(size=16), ["input.size: 16", "set input.size: 32"]),
    (TensorInfo("x", "float32", (1, 3, 48, 192)), InputConfig(size=48), ["48 x 192", "send tensors"]),
    (TensorInfo("x", "float32", (1, 76, 32, 1)), InputConfig(size=32), ["not an image tensor"]),
    (TensorInfo("x", "int64", (1, 3, 16, 16)), InputConfig(size=16), ["input.dtype", "int64"]),
    (TensorInfo("x", "float32", (1, 3, 16, 16)), InputConfig(size=16, dtype="uint8"), ["says uint8"]),
])
def test_input_config_that_does_not_fit_the_model_names_the_key(info, cfg, words):
    with pytest.raises(ConfigError) as err:
        resolve_input_config(cfg, info)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_float16_input():
    cfg = resolve_input_config(InputConfig(size=16, resize=16), TensorInfo("x", "float16", (1, 3, 16, 16)))
    x = preprocess_array(photo(16, 16), cfg)
    assert x.dtype == np.float16
    np.testing.assert_allclose(x, preprocess_array(photo(16, 16), dataclasses.replace(cfg, dtype="float32")),
                               atol=2e-3)


# ------------------------------------------------------------------------------- outputs
def test_topk_output_is_the_named_one_or_the_first_vector():
    g = analyze(mb.two_output_net())
    assert topk_output_index(g, None) == 0  # 'box' [1, 4] is the first vector-shaped output
    assert topk_output_index(g, "cls") == 1
    with pytest.raises(ModelError) as err:
        topk_output_index(g, "classes")
    assert "model_output.top_k_from" in str(err.value) and "'box' [1, 4], 'cls' [1, 6]" in str(err.value)


def test_topk_skips_outputs_that_are_not_vectors_and_refuses_when_none_is():
    class G:  # the two attributes topk_output_index reads from a ModelGraph
        name = "detector"
        outputs = (TensorInfo("boxes", "float32", (1, 22, 2100)), TensorInfo("scores", "float32", (1, 1000, 1, 1)))
    assert topk_output_index(G, None) == 1
    G.outputs = G.outputs[:1]
    with pytest.raises(ModelError, match=r"no class-vector output.*'boxes' \[1, 22, 2100\].*top_k_from"):
        topk_output_index(G, None)


def test_softmax_output_is_recognised_through_shape_ops_and_not_softmaxed_twice():
    with_sm, without = mb.two_output_net(softmax=True), mb.two_output_net(softmax=False)
    assert output_is_probability(with_sm, "cls") and not output_is_probability(with_sm, "box")
    assert not output_is_probability(without, "cls")
    g = analyze(with_sm)
    from hetsched.model.graph import random_inputs
    probs = run(with_sm, random_inputs(g.inputs))["cls"]
    assert abs(float(probs.sum()) - 1.0) < 1e-5
    best = top_k(probs, 3)
    assert [b["score"] for b in best] == pytest.approx(sorted(probs.ravel().tolist(), reverse=True)[:3], abs=1e-6)


def test_logsoftmax_is_not_a_probability():
    n = helper.make_node("LogSoftmax", ["x"], ["y"], axis=-1)
    g = helper.make_graph([n], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])])
    assert not output_is_probability(helper.make_model(g), "y")
    assert not output_is_probability(helper.make_model(g), "x")  # a graph input has no producer


# ------------------------------------------------------------------------------- config and CLI
def test_config_model_input_and_output_keys():
    cfg = parse_config({"model_input": {"shape": [1, 3, 320, 320]}, "model_output": {"top_k_from": "cls"},
                        "input": {"layout": "NHWC", "dtype": "uint8"}})
    assert cfg.model_input.shape == (1, 3, 320, 320) and cfg.model_output.top_k_from == "cls"
    assert (cfg.input.layout, cfg.input.dtype) == ("NHWC", "uint8")
    default = parse_config({})
    assert default.model_input.shape is None and default.model_output.top_k_from is None
    assert (default.input.layout, default.input.dtype) == ("auto", "auto")


@pytest.mark.parametrize("raw, message", [
    ({"model_input": {"shape": [1, 3, 0, 224]}}, "model_input.shape[2]: must be >= 1, got 0"),
    ({"model_input": {"shape": "1,3,224,224"}}, "model_input.shape: expected a list of positive integers"),
    ({"model_input": {"shape": []}}, "model_input.shape: empty"),
    ({"model_input": {"size": 3}}, "model_input.size: unknown key"),
    ({"model_output": {"top_k_from": 3}}, "model_output.top_k_from: expected a string"),
    ({"input": {"dtype": "int8"}}, "input.dtype: must be one of float32, float16, uint8, auto"),
])
def test_config_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert message in str(err.value)


def test_plan_input_shape_flag(tmp_path):
    from hetsched.cli.common import load_cfg, parse_shape
    from hetsched.cli.main import build_parser
    assert parse_shape("1,3,320,320") == parse_shape("1x3x320x320") == (1, 3, 320, 320)
    with pytest.raises(ConfigError, match="--input-shape"):
        parse_shape("1,3,h,w")
    path = tmp_path / "m.onnx"
    onnx.save(mb.cnn(batch_dim="N", hw=("H", "W")), str(path))
    args = build_parser().parse_args(["plan", "--model", str(path), "--input-shape", "1,3,20,20", "--layers"])
    assert load_cfg(args).model_input.shape == (1, 3, 20, 20)


def _plan(tmp_path, *extra):
    import os
    import subprocess
    import sys
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("clusters:\n  one: {cores: [0]}\nprofile: {measure: false}\n")
    env = dict(os.environ, HETSCHED_CACHE_DIR=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", "hetsched", "plan", "--config", str(cfg), "--no-cache", *extra],
                          capture_output=True, text=True, timeout=90, env=env)


@pytest.mark.timeout(200)
def test_plan_cli_fixes_dims_and_shows_the_shape_step(tmp_path):
    dyn = tmp_path / "hw.onnx"
    onnx.save(mb.cnn(batch_dim="N", hw=("H", "W")), str(dyn))
    r = _plan(tmp_path, "--model", str(dyn))
    assert r.returncode == 2 and "'input' has dims ['N', 3, 'H', 'W']" in r.stderr and "--input-shape" in r.stderr
    r = _plan(tmp_path, "--model", str(dyn), "--input-shape", "1,3,20,20", "--layers")
    assert r.returncode == 0, r.stderr
    assert "model inputs input [1, 3, 20, 20] float32; outputs logits [1, 10]" in r.stdout
    assert "shapes resolved by onnx shape inference" in r.stdout
    pad = tmp_path / "pad.onnx"
    onnx.save(mb.tf2onnx_pad_resnet(blocks=2), str(pad))
    r = _plan(tmp_path, "--model", str(pad), "--layers")
    assert r.returncode == 0, r.stderr
    assert "dynamic batch dim fixed to 1" in r.stderr and r.stderr.count("batch dim fixed") == 1
    assert "shapes resolved by onnxruntime symbolic shape inference" in r.stdout
