"""TensorInfo (name, numpy dtype, static shape) and the graph facts every model module shares:
which tensors are constants, which inputs are real (not initializers), a model's display name."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from hetsched.wire.dtypes import ONNX_TO_NUMPY

# metadata_props key under which load_model records the file a model came from (for messages)
SOURCE_KEY = "hetsched.source"

# Ops whose output is not a function of their inputs: never treated as constants.
_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                         "Multinomial", "Bernoulli"})


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorInfo":
        return cls(d["name"], d["dtype"], tuple(int(x) for x in d["shape"]))


def model_label(model: onnx.ModelProto) -> str:
    """The file the model was loaded from, else its graph name (for error messages)."""
    for prop in model.metadata_props:
        if prop.key == SOURCE_KEY:
            return prop.value
    return f"model {model.graph.name!r}" if model.graph.name else "the model"


def real_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are fed at run time (IR < 4 also lists initializers as inputs)."""
    inits = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    return [vi for vi in graph.input if vi.name not in inits]


def dim_text(vi: onnx.ValueInfoProto) -> list:
    """A value info's dims as written: ints, symbolic names, '?' for unset."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]


def static_infos(graph: onnx.GraphProto) -> dict[str, TensorInfo]:
    """TensorInfos of every input, value_info and output with a fully known, positive shape."""
    infos: dict[str, TensorInfo] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
            continue
        dims = [int(d.dim_value) for d in tt.shape.dim if d.HasField("dim_value") and d.dim_value > 0]
        dtype = ONNX_TO_NUMPY.get(tt.elem_type)
        if len(dims) != len(tt.shape.dim) or dtype is None:
            continue
        infos[vi.name] = TensorInfo(vi.name, dtype, tuple(dims))
    return infos


def subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names read by the subgraphs (If/Loop/Scan bodies) of ``node``."""
    out: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            defined = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                defined.update(n.output)
            for n in g.node:
                out.update(i for i in list(n.input) + sorted(subgraph_inputs(n)) if i and i not in defined)
    return out


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Every tensor ``node`` reads: its inputs and what its subgraphs read from the outer scope."""
    names = [i for i in node.input if i]
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        names += sorted(subgraph_inputs(node) - set(names))
    return names


def constant_tensors(graph: onnx.GraphProto, nodes: list[onnx.NodeProto] | None = None) -> set[str]:
    """Initializers, Constant outputs and everything computed from constants alone (e.g. a
    ``Constant -> Cast`` chain feeding a Pad). Such tensors never cross a stage boundary: every
    stage that needs one computes it itself. ``nodes`` must be in topological order."""
    consts = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    for node in nodes if nodes is not None else graph.node:
        if node.op_type in _RANDOM_OPS:
            continue
        if all(i in consts for i in node_inputs(node)):
            consts.update(o for o in node.output if o)
    return consts
