"""Small generated ONNX graphs (onnx.helper) for the model tests: each one is a case real exporters
produce (dynamic batch, tf2onnx Pad with Constant -> Cast pads, NHWC input, uint8 input, several
outputs, a Softmax head, weights shared across a cut, a contrib op only a real run can size)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Net:
    """Accumulates nodes and initializers; every helper returns the name of its output."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def _name(self, op: str) -> str:
        self.count += 1
        return f"{op.lower()}_{self.count}"

    def node(self, op: str, inputs: list[str], domain: str = "", **attrs) -> str:
        out = self._name(op)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def weight(self, shape: tuple[int, ...], name: str | None = None) -> str:
        name = name or self._name("w")
        w = (self.rng.standard_normal(shape) * np.sqrt(2.0 / max(1, int(np.prod(shape[1:]))))).astype(np.float32)
        self.inits.append(numpy_helper.from_array(w, name))
        return name

    def const(self, value: np.ndarray) -> str:
        out = self._name("const")
        self.nodes.append(helper.make_node("Constant", [], [out], name=out,
                                           value=numpy_helper.from_array(np.asarray(value), out)))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, pad: bool = True, w: str | None = None) -> str:
        w = w or self.weight((cout, cin, k, k))
        return self.node("Conv", [x, w], pads=[k // 2] * 4 if pad else [0] * 4)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def head(self, x: str, c: int, classes: int) -> str:
        """GlobalAveragePool -> Flatten -> MatMul: a [1, classes] logit vector."""
        flat = self.node("Flatten", [self.node("GlobalAveragePool", [x])])
        return self.node("MatMul", [flat, self.weight((c, classes))])

    def model(self, inputs: list[tuple[str, int, list]], outputs: list[tuple[str, int, list | None]],
              opset: int = 13, ir: int = 8, name: str = "net") -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, name, [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                              [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
                              initializer=self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="hetsched-tests")
        m.ir_version = ir
        return m


def rename_output(net: Net, old: str, new: str) -> None:
    for node in net.nodes:
        node.output[:] = [new if o == old else o for o in node.output]
        node.input[:] = [new if i == old else i for i in node.input]


def cnn(batch_dim="batch", hw=(16, 16), blocks: int = 3, classes: int = 10) -> onnx.ModelProto:
    """conv stem + ``blocks`` conv-relu blocks + head, input [batch_dim, 3, H, W]."""
    net = Net()
    x = net.relu(net.conv("input", 3, 8))
    for _ in range(blocks):
        x = net.relu(net.conv(x, 8, 8))
    rename_output(net, net.head(x, 8, classes), "logits")
    return net.model([("input", TensorProto.FLOAT, [batch_dim, 3, *hw])],
                     [("logits", TensorProto.FLOAT, [batch_dim, classes])])


def tf2onnx_pad_resnet(blocks: int = 3) -> onnx.ModelProto:
    """A tf2onnx-style residual net: every 3x3 conv is preceded by a Pad whose pads come from a
    ``Constant(int32) -> Cast(int64)`` chain, as tf2onnx writes TF's explicit padding."""
    net = Net(1)

    def padded_conv(x, cin, cout):
        pads = net.node("Cast", [net.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int32))], to=TensorProto.INT64)
        return net.conv(net.node("Pad", [x, pads], mode="constant"), cin, cout, pad=False)

    x = net.relu(padded_conv("input", 3, 8))
    for _ in range(blocks):
        y = net.relu(padded_conv(x, 8, 8))
        y = padded_conv(y, 8, 8)
        x = net.relu(net.node("Add", [y, x]))
    rename_output(net, net.head(x, 8, 10), "logits")
    return net.model([("input", TensorProto.FLOAT, ["unk__42", 3, 16, 16])],
                     [("logits", TensorProto.FLOAT, ["unk__43", 10])], opset=13, ir=7, name="tf2onnx_resnet")


def nhwc_net(dtype: int = TensorProto.FLOAT, size: int = 16) -> onnx.ModelProto:
    """Input [N, H, W, 3] (uint8 or float), transposed to NCHW inside, as TF exports do."""
    net = Net(2)
    x = "image"
    if dtype == TensorProto.UINT8:
        x = net.node("Mul", [net.node("Cast", [x], to=TensorProto.FLOAT), net.const(np.float32(1 / 255))])
    x = net.node("Transpose", [x], perm=[0, 3, 1, 2])
    x = net.relu(net.conv(x, 3, 8))
    x = net.relu(net.conv(x, 8, 8))
    x = net.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = net.relu(net.conv(x, 8, 8))
    rename_output(net, net.head(x, 8, 5), "scores")
    return net.model([("image", dtype, ["N", size, size, 3])], [("scores", TensorProto.FLOAT, ["N", 5])],
                     name="nhwc_net")


def two_output_net(softmax: bool = True) -> onnx.ModelProto:
    """A trunk with two heads: box [1, 4] regression and class probabilities [1, 6] via
    Softmax -> Flatten -> Identity (or raw logits with ``softmax=False``)."""
    net = Net(3)
    x = net.relu(net.conv("input", 3, 8))
    x = net.relu(net.conv(x, 8, 8))
    x = net.relu(net.conv(x, 8, 8))
    box = net.head(x, 8, 4)
    cls = net.head(x, 8, 6)
    if softmax:
        cls = net.node("Identity", [net.node("Flatten", [net.node("Softmax", [cls], axis=-1)])])
    rename_output(net, box, "box")
    rename_output(net, cls, "cls")
    return net.model([("input", TensorProto.FLOAT, [1, 3, 12, 12])],
                     [("box", TensorProto.FLOAT, [1, 4]), ("cls", TensorProto.FLOAT, [1, 6])], name="two_heads")


def shared_weight_net() -> onnx.ModelProto:
    """The same conv weight (and the same Constant) used at the start and the end of the net: any
    cut between the uses needs a copy in both stages."""
    net = Net(4)
    shared = net.weight((8, 8, 3, 3), "shared.w")
    bias = net.const(np.full((1, 8, 1, 1), 0.1, np.float32))
    x = net.relu(net.conv("input", 3, 8))
    x = net.relu(net.node("Add", [net.conv(x, 8, 8, w=shared), bias]))
    for _ in range(3):
        x = net.relu(net.conv(x, 8, 8))
    x = net.relu(net.node("Add", [net.conv(x, 8, 8, w=shared), bias]))
    rename_output(net, net.head(x, 8, 3), "out")
    return net.model([("input", TensorProto.FLOAT, [1, 3, 10, 10])], [("out", TensorProto.FLOAT, [1, 3])],
                     name="shared_weights")


def contrib_op_net() -> onnx.ModelProto:
    """A com.microsoft ExpandDims in the trunk: neither onnx nor onnxruntime's symbolic inference
    knows its output shape, and folding cannot remove it; only a real run sizes it."""
    net = Net(5)
    x = net.relu(net.conv("input", 3, 8))
    x = net.relu(net.conv(x, 8, 8))
    x = net.node("ExpandDims", [x, net.const(np.array(1, np.int32))], domain="com.microsoft")
    x = net.node("Sigmoid", [x])  # [1, 1, 8, 8, 8]: only the run knows
    x = net.node("Reshape", [x, net.const(np.array([1, 8, 8, 8], np.int64))])
    x = net.relu(net.conv(x, 8, 8))
    x = net.relu(net.conv(x, 8, 8))
    rename_output(net, net.head(x, 8, 4), "out")
    m = net.model([("input", TensorProto.FLOAT, [1, 3, 8, 8])], [("out", TensorProto.FLOAT, [1, 4])],
                  name="contrib")
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return m


def nonzero_output_net() -> onnx.ModelProto:
    """An output whose size depends on the data (NonZero): no step can give it a static shape."""
    net = Net(6)
    x = net.conv("input", 3, 2)
    rename_output(net, net.node("NonZero", [net.node("Greater", [x, net.const(np.float32(0.0))])]), "where")
    return net.model([("input", TensorProto.FLOAT, [1, 3, 6, 6])], [("where", TensorProto.INT64, [4, "nonzero"])],
                     name="nonzero")
