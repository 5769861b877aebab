"""The built-in SqueezeNet 1.1 graph, generated here so hetsched runs with no download.

Architecture as torchvision's ``squeezenet1_1`` (Iandola et al., SqueezeNet v1.1):
conv1 3x3/2 64ch + ReLU, MaxPool 3/2 (ceil), fire2, fire3, MaxPool, fire4, fire5, MaxPool,
fire6..fire9, conv10 1x1 512->1000 + ReLU, GlobalAveragePool, Flatten: 1,235,496 parameters.
Input ``data`` float32 [1,3,224,224] (NCHW, RGB, ImageNet-normalised), output ``logits`` [1,1000].

Weights are deterministic (He-normal from a seeded generator), so outputs are reproducible but
carry no meaning: use ``model: path/to/real.onnx`` for real predictions. Initializer and node
names follow torchvision's state_dict keys, like the ONNX export of the pretrained model.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_NAME = "data"
OUTPUT_NAME = "logits"
INPUT_SHAPE = (1, 3, 224, 224)
NUM_CLASSES = 1000
EXPECTED_PARAMS = 1_235_496

# (feature index, in_channels, squeeze, expand1x1, expand3x3); MaxPools sit at indices 2, 5, 8.
FIRE_MODULES = (
    (3, 64, 16, 64, 64),
    (4, 128, 16, 64, 64),
    (6, 128, 32, 128, 128),
    (7, 256, 32, 128, 128),
    (9, 256, 48, 192, 192),
    (10, 384, 48, 192, 192),
    (11, 384, 64, 256, 256),
    (12, 512, 64, 256, 256),
)
POOL_AFTER = {4: 5, 7: 8}  # fire index -> index of the MaxPool that follows it


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def conv(self, name: str, x: str, cin: int, cout: int, k: int, stride: int = 1, pad: int = 0) -> str:
        std = np.sqrt(2.0 / (cin * k * k))
        w = (self.rng.standard_normal((cout, cin, k, k)) * std).astype(np.float32)
        b = (self.rng.standard_normal(cout) * 0.01).astype(np.float32)
        self.inits += [numpy_helper.from_array(w, f"{name}.weight"), numpy_helper.from_array(b, f"{name}.bias")]
        conv_out, relu_out = f"{name}_conv", f"{name}_relu"
        self.nodes.append(helper.make_node(
            "Conv", [x, f"{name}.weight", f"{name}.bias"], [conv_out], name=name,
            kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, dilations=[1, 1], group=1))
        self.nodes.append(helper.make_node("Relu", [conv_out], [relu_out], name=f"{name}_relu"))
        return relu_out

    def maxpool(self, name: str, x: str) -> str:
        self.nodes.append(helper.make_node(
            "MaxPool", [x], [name], name=name, kernel_shape=[3, 3], strides=[2, 2], pads=[0] * 4, ceil_mode=1))
        return name

    def fire(self, idx: int, x: str, cin: int, s: int, e1: int, e3: int) -> str:
        base = f"features.{idx}"
        sq = self.conv(f"{base}.squeeze", x, cin, s, 1)
        a = self.conv(f"{base}.expand1x1", sq, s, e1, 1)
        b = self.conv(f"{base}.expand3x3", sq, s, e3, 3, pad=1)
        out = f"{base}_concat"
        self.nodes.append(helper.make_node("Concat", [a, b], [out], name=out, axis=1))
        return out


def build_squeezenet11(seed: int = 0) -> onnx.ModelProto:
    """Return the SqueezeNet 1.1 ONNX model (opset 13) with deterministic weights from ``seed``."""
    g = _Builder(seed)
    x = g.conv("features.0", INPUT_NAME, 3, 64, 3, stride=2)
    x = g.maxpool("features.2", x)
    for idx, cin, s, e1, e3 in FIRE_MODULES:
        x = g.fire(idx, x, cin, s, e1, e3)
        if idx in POOL_AFTER:
            x = g.maxpool(f"features.{POOL_AFTER[idx]}", x)
    x = g.conv("classifier.1", x, 512, NUM_CLASSES, 1)
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], ["classifier.3"], name="classifier.3"))
    g.nodes.append(helper.make_node("Flatten", ["classifier.3"], [OUTPUT_NAME], name="flatten", axis=1))
    graph = helper.make_graph(
        g.nodes, "squeezenet1.1",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, list(INPUT_SHAPE))],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [1, NUM_CLASSES])],
        initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="hetsched")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def count_parameters(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(t.dims) for t in model.graph.initializer))
