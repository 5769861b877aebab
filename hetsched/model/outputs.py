"""Which model output the results' top-k comes from, and whether it already holds probabilities.

Pure helpers for the runtime: results carry every output; top-k is taken from one of them.

* :func:`topk_output_index` - the output named by ``model_output.top_k_from`` in the config, else
  the first *vector-shaped* one: exactly one dim larger than 1 ([1, C], [C], [1, C, 1, 1], C > 1).
* :func:`output_is_probability` - True when the output is produced by ``Softmax``, possibly through
  shape-only ops (Reshape, Flatten, Identity, Squeeze, Unsqueeze): then no second softmax is applied.
"""

from __future__ import annotations

import onnx

from hetsched.errors import ModelError

TOPK_KEY = "model_output.top_k_from"

# ops that only move or relabel values: a Softmax behind them is still a distribution
_SHAPE_ONLY = frozenset({"Reshape", "Flatten", "Identity", "Squeeze", "Unsqueeze"})


def is_vector_shape(shape: tuple[int, ...]) -> bool:
    return sum(1 for d in shape if d > 1) == 1


def _choices(graph) -> str:
    return ", ".join(f"{t.name!r} {list(t.shape)}" for t in graph.outputs)


def topk_output_index(graph, configured: str | None) -> int:
    """Index into ``graph.outputs`` (a :class:`~hetsched.model.graph.ModelGraph`) of the output to
    take top-k from. Raises ModelError naming the outputs when ``configured`` is not one of them, or
    when nothing is configured and no output is vector-shaped (e.g. a detector)."""
    names = [t.name for t in graph.outputs]
    if configured is not None:
        if configured in names:
            return names.index(configured)
        raise ModelError(f"{TOPK_KEY}: model {graph.name!r} has no output {configured!r}; its outputs are "
                         f"{_choices(graph)}: name one of them")
    for i, t in enumerate(graph.outputs):
        if is_vector_shape(tuple(t.shape)):
            return i
    raise ModelError(f"model {graph.name!r} has no class-vector output ([1, C] or [C] with C > 1) to take top-k "
                     f"from; its outputs are {_choices(graph)}: set {TOPK_KEY} to one of them")


def output_is_probability(model: onnx.ModelProto, output_name: str) -> bool:
    """True when ``output_name`` is computed by a Softmax, possibly followed by shape-only ops."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    name, seen = output_name, set()
    while name in producer and name not in seen:
        seen.add(name)
        node = producer[name]
        if node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
            return True
        if node.op_type not in _SHAPE_ONLY or not node.input:
            return False
        name = node.input[0]
    return False
