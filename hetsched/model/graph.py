"""Model graph analysis: cut points, layers between them, and sub-models for pipeline stages.

Cut points come from the graph's data flow, not from layer names. Walking the nodes in
topological order, the *live set* after node p is every activation that was produced (or is a
graph input) before p and is still needed at or after p, or is a graph output. A position is a cut
point when its live set holds at most ``max_cut_tensors`` tensors: a stage boundary there carries
exactly those tensors. Between SqueezeNet's fire modules the live set is one tensor; inside a
fire module (the squeeze output feeds two expands) it is two; across a residual block the skip
tensor stays live until its Add, so no single-tensor cut falls inside the block.

Constants (initializers, ``Constant`` nodes and anything computed from constants alone, such as
tf2onnx's ``Constant -> Cast`` pads) are never live: every stage that reads one gets its own copy,
and each constant node is placed in the layer of its first reader. A boundary carries floating-point
activations only (integer shape arithmetic would get random values when a layer is profiled alone).
A cut is also not offered just before an elementwise op that consumes only the previous node's
output (Conv | Relu): onnxruntime fuses such pairs and splitting them costs a transfer for nothing.
The nodes between consecutive cut points form one *layer*, the unit the planner assigns.

Models as exported have symbolic dims and shapes static inference cannot see: :func:`load_model`
fixes the input dims and :func:`analyze` resolves every shape (:mod:`hetsched.model.shapes`);
sub-models for stages come from :mod:`hetsched.model.stages`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from hetsched.errors import ModelError
from hetsched.model.shapes import STEP_ONNX, STEP_RUN, STEPS, fix_model, input_is_static, resolve_shapes
from hetsched.model.stages import sub_model
from hetsched.model.tensors import SOURCE_KEY, TensorInfo, constant_tensors, model_label, node_inputs, real_inputs

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_SQUEEZENET = "builtin:squeezenet1.1"

# Ops fused into their producer by onnxruntime; a cut right before them is never useful.
FUSABLE_FOLLOWERS = frozenset({
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
    "BatchNormalization", "PRelu", "Softplus", "Mish", "Gelu",
})

__all__ = ["TensorInfo", "Layer", "ModelGraph", "load_model", "model_hash", "analyze", "extract_stage",
           "passthrough_names", "layer_table", "random_inputs", "initializer_array", "topological_order"]


@dataclass(frozen=True)
class Layer:
    index: int
    name: str
    node_names: tuple[str, ...]
    op_types: tuple[str, ...]
    flops: int
    params: int


@dataclass(frozen=True)
class ModelGraph:
    """A model cut into layers. ``boundaries[b]`` are the tensors crossing boundary b
    (b=0: model inputs, b=len(layers): model outputs). ``shape_source`` is the step that resolved
    the tensors' shapes (one of ``hetsched.model.shapes.STEPS``), ``shape_detail`` says more."""

    layers: tuple[Layer, ...]
    boundaries: tuple[tuple[TensorInfo, ...], ...]
    model_hash: str
    name: str
    shape_source: str = STEP_ONNX
    shape_detail: str = ""

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return self.boundaries[0]

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return self.boundaries[-1]

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def boundary_bytes(self) -> tuple[int, ...]:
        return tuple(sum(t.nbytes for t in b) for b in self.boundaries)


def load_model(source: str | None, input_shape: Sequence[int] | None = None) -> onnx.ModelProto:
    """Load ``builtin:squeezenet1.1`` (also the default for None) or an ONNX file path, with its
    inputs fixed to concrete dims (:func:`hetsched.model.shapes.fix_model`: a dynamic batch dim
    becomes 1, ``input_shape`` gives the others)."""
    if source is None or source == BUILTIN_SQUEEZENET:
        from hetsched.model.squeezenet import build_squeezenet11
        return fix_model(build_squeezenet11(), input_shape)
    if source.startswith(BUILTIN_PREFIX):
        raise ModelError(f"unknown built-in model {source!r}; available: {BUILTIN_SQUEEZENET}")
    if not os.path.isfile(source):
        raise ModelError(f"model file not found: {source}")
    try:
        model = onnx.load(source)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ModelError(f"cannot read ONNX model {source}: {exc} (is it a complete .onnx file?)") from exc
    _set_source(model, source)
    return fix_model(model, input_shape)


def _set_source(model: onnx.ModelProto, source: str) -> None:
    for prop in model.metadata_props:
        if prop.key == SOURCE_KEY:
            prop.value = source
            return
    model.metadata_props.add(key=SOURCE_KEY, value=source)


def model_hash(model: onnx.ModelProto) -> str:
    """sha256 of the serialized model, without the file name load_model records."""
    props = [(p.key, p.value) for p in model.metadata_props]
    if not any(k == SOURCE_KEY for k, _ in props):
        return hashlib.sha256(model.SerializeToString()).hexdigest()
    del model.metadata_props[:]
    try:
        for k, v in props:
            if k != SOURCE_KEY:
                model.metadata_props.add(key=k, value=v)
        return hashlib.sha256(model.SerializeToString()).hexdigest()
    finally:
        del model.metadata_props[:]
        for k, v in props:
            model.metadata_props.add(key=k, value=v)


def topological_order(nodes: list[onnx.NodeProto], available: set[str],
                      label: str = "the model") -> list[onnx.NodeProto]:
    produced = set(available)
    remaining = list(nodes)
    order: list[onnx.NodeProto] = []
    while remaining:
        progressed = False
        rest = []
        for node in remaining:
            if all(i in produced for i in node_inputs(node)):
                order.append(node)
                produced.update(node.output)
                progressed = True
            else:
                rest.append(node)
        if not progressed:
            missing = sorted({i for n in rest for i in node_inputs(n) if i not in produced})
            raise ModelError(f"{label}: the graph has a cycle or reads undefined tensors {missing[:5]}; "
                             "check it with onnx.checker.check_model and re-export it")
        remaining = rest
    return order


def _constants_late(nodes: list[onnx.NodeProto], constants: set[str]) -> list[onnx.NodeProto]:
    """The same topological order with each constant-only node moved right before its first
    reader, so a layer holds the Constant -> Cast chain of its own Pad, not of the next one's."""
    producer = {o: i for i, nd in enumerate(nodes) for o in nd.output if o}
    is_const = [all(o in constants for o in nd.output if o) for nd in nodes]
    placed = [False] * len(nodes)
    order: list[onnx.NodeProto] = []

    def place(i: int) -> None:
        stack = [(i, False)]
        while stack:
            j, ready = stack.pop()
            if placed[j]:
                continue
            if ready:
                placed[j] = True
                order.append(nodes[j])
                continue
            stack.append((j, True))
            stack.extend((producer[t], False) for t in node_inputs(nodes[j])
                         if t in producer and is_const[producer[t]] and not placed[producer[t]])

    for i in range(len(nodes)):
        if not is_const[i]:
            place(i)
    for i in range(len(nodes)):
        if not placed[i]:
            place(i)
    return order


def _node_flops(node: onnx.NodeProto, infos: dict[str, TensorInfo], inits: dict[str, tuple[int, ...]]) -> int:
    out = infos.get(node.output[0]) if node.output else None
    out_elems = int(np.prod(out.shape)) if out else 0
    if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
        w = inits.get(node.input[1]) or (infos[node.input[1]].shape if node.input[1] in infos else None)
        if w is not None and out is not None:
            # out elements x (Cin/group * kh * kw) multiply-adds
            return 2 * out_elems * int(np.prod(w[1:]))
    if node.op_type in ("Gemm", "MatMul") and len(node.input) > 1:
        a = infos.get(node.input[0])
        if a is not None and out is not None:
            return 2 * out_elems * int(a.shape[-1])
    return out_elems


def _layer_name(nodes: list[onnx.NodeProto], index: int) -> str:
    names = [n.name for n in nodes if n.name]
    if names:
        prefix = os.path.commonprefix(names).rstrip("._/-:")
        if len(prefix) >= 3 and len(names) > 1:
            return prefix
        if len(names) == 1 or len(nodes) == 1:
            return names[0]
        return f"{names[0]}..{names[-1]}"
    return f"{nodes[0].op_type.lower()}_{index}"


def analyze(model: onnx.ModelProto, max_cut_tensors: int = 1, *, shape_steps: Sequence[str] = STEPS) -> ModelGraph:
    """Find the cut points of ``model`` and return its layers and boundary tensors.

    A model whose inputs still have a symbolic batch dim is fixed to batch 1 first (other symbolic
    dims need :func:`load_model`'s ``input_shape``). Shapes come from
    :func:`hetsched.model.shapes.resolve_shapes`, trying ``shape_steps`` in order.
    """
    if max_cut_tensors < 1:
        raise ModelError("max_cut_tensors must be >= 1")
    fixed = model if input_is_static(model) else fix_model(model)
    res = resolve_shapes(fixed, steps=shape_steps)
    infos = res.infos
    graph = fixed.graph
    label = model_label(model)
    init_names = {t.name for t in graph.initializer}
    init_shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    graph_inputs = [vi.name for vi in real_inputs(graph)]
    graph_outputs = [o.name for o in graph.output]
    nodes = topological_order(list(graph.node), set(graph_inputs) | init_names, label)
    constants = constant_tensors(graph, nodes) - set(graph_inputs)
    nodes = _constants_late(nodes, constants)
    for name in graph_inputs + graph_outputs:
        if name not in infos:
            why = ("its size depends on the input data, which hetsched cannot pipeline: export the model with "
                   "fixed output shapes") if STEP_RUN in shape_steps else \
                f"try the later shape steps ({', '.join(s for s in STEPS if s not in shape_steps)})"
            raise ModelError(f"{label}: tensor {name!r} has no static shape ({res.describe()}); {why}")

    n = len(nodes)
    last_use: dict[str, int] = {}
    for idx, node in enumerate(nodes):
        for name in node_inputs(node):
            if name not in constants:
                last_use[name] = idx
    for name in graph_outputs:
        last_use[name] = n  # needed "after the last node"
    producer: dict[str, int] = {name: -1 for name in graph_inputs}
    for idx, node in enumerate(nodes):
        for name in node.output:
            if name:
                producer[name] = idx

    def live_after(p: int) -> list[str]:
        """Tensors crossing the boundary between nodes[:p] and nodes[p:]."""
        return [t for t, prod in producer.items()
                if prod < p and t not in constants and last_use.get(t, -1) >= p]

    def carriable(t: str) -> bool:
        # a boundary carries activations: floating point, or a model input passed along. Integer
        # intermediates (shape arithmetic) would get random values when a stage is profiled alone
        return t in infos and (producer[t] < 0 or np.dtype(infos[t].dtype).kind == "f")

    is_const = [all(o in constants for o in nd.output if o) for nd in nodes]
    cuts = [0]
    for p in range(1, n):
        if is_const[p] or all(is_const[cuts[-1]:p]):
            continue  # constant nodes go with the stage that reads them; no layer of constants only
        live = live_after(p)
        if not live or len(live) > max_cut_tensors:
            continue
        nxt = nodes[p]
        prev_outputs = set(nodes[p - 1].output)
        data_inputs = [i for i in nxt.input if i and i not in constants]
        if nxt.op_type in FUSABLE_FOLLOWERS and data_inputs and set(data_inputs) <= prev_outputs:
            continue
        if not all(carriable(t) for t in live):
            continue  # a data-dependent shape or an integer tensor: not a usable boundary
        cuts.append(p)
    if len(cuts) > 1 and all(is_const[cuts[-1]:]):
        cuts.pop()  # trailing constants (e.g. a constant output) join the last layer
    cuts.append(n)

    layers: list[Layer] = []
    boundaries: list[tuple[TensorInfo, ...]] = [tuple(infos[t] for t in graph_inputs)]
    for li, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        seg = nodes[a:b]
        flops = sum(_node_flops(nd, infos, init_shapes) for nd in seg)
        params = sum(int(np.prod(init_shapes[i])) for nd in seg for i in set(nd.input) if i in init_shapes)
        layers.append(Layer(li, _layer_name(seg, li), tuple(nd.name for nd in seg),
                            tuple(nd.op_type for nd in seg), int(flops), int(params)))
        if b < n:
            boundaries.append(tuple(infos[t] for t in sorted(live_after(b), key=lambda t: producer[t])))
    boundaries.append(tuple(infos[t] for t in graph_outputs))
    return ModelGraph(tuple(layers), tuple(boundaries), model_hash(model), graph.name or "model",
                      res.source, res.describe())


def extract_stage(model: onnx.ModelProto, mg: ModelGraph, first_layer: int, last_layer: int) -> onnx.ModelProto:
    """The sub-model computing layers first..last: inputs boundary[first], outputs boundary[last+1].

    Tensors that cross both boundaries untouched are not outputs of the sub-model; the worker
    forwards them (see ``passthrough_names``). Inputs and outputs carry ``mg``'s static shapes
    (see :mod:`hetsched.model.stages`).
    """
    if not 0 <= first_layer <= last_layer < len(mg.layers):
        raise ModelError(f"bad layer range {first_layer}..{last_layer} (model has {len(mg.layers)} layers)")
    passthrough = set(passthrough_names(mg, first_layer, last_layer))
    outputs = [t for t in mg.boundaries[last_layer + 1] if t.name not in passthrough]
    if first_layer == 0 and last_layer == len(mg.layers) - 1 and not passthrough and input_is_static(model):
        return model
    return sub_model(model, list(mg.boundaries[first_layer]), outputs, f"{mg.name}[{first_layer}:{last_layer}]")


def passthrough_names(mg: ModelGraph, first_layer: int, last_layer: int) -> list[str]:
    into = {t.name for t in mg.boundaries[first_layer]}
    return [t.name for t in mg.boundaries[last_layer + 1] if t.name in into]


def layer_table(mg: ModelGraph) -> Iterable[str]:
    yield f"{'#':>3}  {'layer':<28} {'ops':<34} {'MFLOP':>8} {'out KiB':>8}"
    for layer in mg.layers:
        ops = ",".join(dict.fromkeys(layer.op_types))
        out_kib = sum(t.nbytes for t in mg.boundaries[layer.index + 1]) / 1024
        yield f"{layer.index:>3}  {layer.name:<28.28} {ops:<34.34} {layer.flops / 1e6:>8.1f} {out_kib:>8.0f}"


def random_inputs(infos: Iterable[TensorInfo], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for t in infos:
        if np.dtype(t.dtype).kind == "f":
            out[t.name] = rng.standard_normal(t.shape).astype(t.dtype)
        else:
            out[t.name] = rng.integers(0, 2, size=t.shape).astype(t.dtype)
    return out


def initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)
