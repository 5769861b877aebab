"""Sub-models for pipeline stages: the nodes that compute a set of tensors from another set.

A stage sub-model is built by walking back from its outputs to its inputs: every node on the way
is kept (in the model's order), with every initializer, ``Constant`` node and constant-only chain
(``Constant -> Cast``) it reads, so a weight or constant used on both sides of a cut is copied
into both stages. Inputs and outputs get the static shapes the analysis resolved. Opset imports,
IR version, producer, model-local functions and metadata are carried over unchanged.
"""

from __future__ import annotations

import onnx
from onnx import helper

from hetsched.errors import ModelError
from hetsched.model.tensors import TensorInfo, model_label, node_inputs
from hetsched.wire.dtypes import NUMPY_TO_ONNX


def _value_info(t: TensorInfo, label: str) -> onnx.ValueInfoProto:
    code = NUMPY_TO_ONNX.get(t.dtype)
    if code is None:
        raise ModelError(f"{label}: tensor {t.name!r} has dtype {t.dtype}, which hetsched cannot carry between "
                         "stages; choose cut points where it does not cross")
    return helper.make_tensor_value_info(t.name, code, list(t.shape))


def sub_model(model: onnx.ModelProto, inputs: list[TensorInfo], outputs: list[TensorInfo],
              name: str) -> onnx.ModelProto:
    """The model computing ``outputs`` from ``inputs`` (plus the model's constants)."""
    graph = model.graph
    producer: dict[str, int] = {}
    for idx, node in enumerate(graph.node):
        for out in node.output:
            if out:
                producer[out] = idx
    inits = {t.name: t for t in graph.initializer}
    sparse = {t.values.name: t for t in graph.sparse_initializer}
    stop = {t.name for t in inputs}
    keep: set[int] = set()
    used_inits: set[str] = set()
    seen: set[str] = set()
    stack = [t.name for t in outputs]
    while stack:
        tname = stack.pop()
        if tname in seen or tname in stop:
            continue
        seen.add(tname)
        if tname in producer:
            idx = producer[tname]
            if idx not in keep:
                keep.add(idx)
                stack.extend(node_inputs(graph.node[idx]))
        elif tname in inits or tname in sparse:
            used_inits.add(tname)
        else:
            raise ModelError(f"{model_label(model)}: stage {name} needs tensor {tname!r}, which is neither "
                             f"computed in the stage nor one of its inputs {sorted(stop)}; choose other cut points")
    from hetsched.model.graph import topological_order
    nodes = topological_order([graph.node[i] for i in sorted(keep)], stop | used_inits, model_label(model))
    label = model_label(model)
    g = helper.make_graph(nodes, name, [_value_info(t, label) for t in inputs],
                          [_value_info(t, label) for t in outputs],
                          initializer=[inits[n] for n in sorted(used_inits) if n in inits],
                          sparse_initializer=[sparse[n] for n in sorted(used_inits) if n in sparse])
    if model.ir_version < 4:  # initializers must also be listed as inputs before IR 4
        declared = {vi.name: vi for vi in graph.input}
        g.input.extend(declared[n] for n in sorted(used_inits) if n in declared)
    sub = onnx.ModelProto()
    sub.ir_version = model.ir_version
    sub.opset_import.extend(model.opset_import)
    sub.functions.extend(model.functions)
    sub.metadata_props.extend(model.metadata_props)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(sub, field, getattr(model, field))
    sub.graph.CopyFrom(g)
    return sub
