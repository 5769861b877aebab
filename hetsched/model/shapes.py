"""Fixed input dims and the static shape of every tensor, by every means available.

Models are exported with symbolic dims (``['batch', 3, 224, 224]``, tf2onnx ``unk__123``, paddle
``-1`` / ``DynamicDimension.0``, PyTorch ``height``/``width``). hetsched runs one frame at a time
with one input shape, so :func:`fix_model` rewrites the inputs to concrete dims:

* a symbolic or unknown **batch** dim (dim 0) becomes 1, said once with a warning;
* any other symbolic dim (H, W, ...) comes from ``model_input.shape`` in the config (or
  ``--input-shape``); without it the model is refused with a message naming the input and its dims.

Outputs' and intermediates' symbolic dims are then cleared, and :func:`resolve_shapes` finds every
activation's shape with the first of these steps that gets them all:

1. ``onnx.shape_inference`` (non-strict, with data propagation);
2. onnxruntime's symbolic shape inference (``onnxruntime.tools.symbolic_shape_infer``, needs sympy);
3. onnxruntime's constant folding: the model optimised at ``ORT_ENABLE_BASIC`` and written out,
   then onnx shape inference on that (e.g. a Pad whose pads come from a ``Constant -> Cast``
   chain). The optimised model is only read for shapes, by tensor name: its nodes are never used;
4. one real run in onnxruntime with every still-unknown tensor added as a graph output, on random
   inputs of the fixed shape, twice (two seeds): a tensor whose shape differs between the runs is
   data-dependent and stays unknown (it can never be a stage boundary).

Each step fills only tensors the earlier ones left unknown. :class:`ShapeResolution` says which
step completed the job (``source``); ``hetsched plan --layers`` shows it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import shape_inference

from hetsched.errors import ModelError
from hetsched.model.tensors import TensorInfo, constant_tensors, dim_text, model_label, real_inputs, static_infos

log = logging.getLogger(__name__)

STEP_ONNX = "onnx shape inference"
STEP_SYMBOLIC = "onnxruntime symbolic shape inference"
STEP_FOLDING = "onnxruntime constant folding"
STEP_RUN = "onnxruntime run"
STEPS = (STEP_ONNX, STEP_SYMBOLIC, STEP_FOLDING, STEP_RUN)

INPUT_SHAPE_KEY = "model_input.shape (or --input-shape)"


def _is_static(d: onnx.TensorShapeProto.Dimension) -> bool:
    return d.HasField("dim_value") and d.dim_value > 0


def input_is_static(model: onnx.ModelProto) -> bool:
    for vi in real_inputs(model.graph):
        tt = vi.type.tensor_type
        if not tt.HasField("shape") or not all(_is_static(d) for d in tt.shape.dim):
            return False
    return True


def _fixed_dims(model: onnx.ModelProto, vi: onnx.ValueInfoProto, override: Sequence[int] | None,
                batch_fixed: list[str]) -> list[int]:
    label, dims = model_label(model), dim_text(vi)
    tt = vi.type.tensor_type
    if override is not None:
        if tt.HasField("shape") and len(override) != len(dims):
            raise ModelError(f"{label}: {INPUT_SHAPE_KEY} is {list(override)} ({len(override)} dims) but input "
                             f"{vi.name!r} has {len(dims)} dims {dims}; give {len(dims)} dims")
        for i, (want, have) in enumerate(zip(override, dims)):
            if isinstance(have, int) and have > 0 and have != want:
                raise ModelError(f"{label}: {INPUT_SHAPE_KEY} is {list(override)} but input {vi.name!r} has "
                                 f"dims {dims}: dim {i} is fixed to {have} by the model; use {have} there")
        return [int(x) for x in override]
    if not tt.HasField("shape"):
        raise ModelError(f"{label}: input {vi.name!r} has no shape (unknown rank); set {INPUT_SHAPE_KEY}, "
                         "e.g. [1, 3, 224, 224]")
    out, open_dims = [], []
    for i, d in enumerate(tt.shape.dim):
        if _is_static(d):
            out.append(int(d.dim_value))
        elif i == 0:
            out.append(1)
            batch_fixed.append(f"{vi.name!r} {dims} -> batch 1")
        else:
            out.append(0)
            open_dims.append(i)
    if open_dims:
        example = [x if x else 224 for x in out]
        raise ModelError(f"{label}: input {vi.name!r} has dims {dims}: dim{'s' if len(open_dims) > 1 else ''} "
                         f"{', '.join(map(str, open_dims))} {'are' if len(open_dims) > 1 else 'is'} not fixed by the "
                         f"model; set {INPUT_SHAPE_KEY} to the input shape to run with, e.g. {example}")
    return out


def fix_model(model: onnx.ModelProto, input_shape: Sequence[int] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` whose real inputs have concrete dims (see the module docstring).

    ``input_shape`` applies to the model's first input; other inputs may only have a symbolic batch
    dim. Returns ``model`` itself when it is already static and no shape is given."""
    inputs = real_inputs(model.graph)
    if not inputs:
        raise ModelError(f"{model_label(model)}: every graph input is an initializer, so there is nothing to feed; "
                         "export the model with its image input as a graph input")
    if input_shape is not None and any(int(x) < 1 for x in input_shape):
        raise ModelError(f"{model_label(model)}: {INPUT_SHAPE_KEY} must be positive integers, got {list(input_shape)}")
    if input_shape is None and input_is_static(model):
        return model
    batch_fixed: list[str] = []
    new_dims = {vi.name: _fixed_dims(model, vi, input_shape if k == 0 else None, batch_fixed)
                for k, vi in enumerate(inputs)}
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for vi in fixed.graph.input:
        if vi.name in new_dims:
            shape = vi.type.tensor_type.shape
            shape.Clear()
            for v in new_dims[vi.name]:
                shape.dim.add().dim_value = v
    for vi in fixed.graph.output:  # symbolic output dims follow from shape resolution
        if vi.type.tensor_type.HasField("shape") and not all(_is_static(d) for d in vi.type.tensor_type.shape.dim):
            vi.type.tensor_type.ClearField("shape")
    keep = [vi for vi in fixed.graph.value_info
            if vi.type.tensor_type.HasField("shape") and all(_is_static(d) for d in vi.type.tensor_type.shape.dim)]
    if len(keep) != len(fixed.graph.value_info):
        # static intermediate shapes may also hold the old batch size: recompute them all
        del fixed.graph.value_info[:]
    if batch_fixed:
        log.warning("%s: dynamic batch dim fixed to 1 (%s)", model_label(model), "; ".join(batch_fixed))
    return fixed


@dataclass(frozen=True)
class ShapeResolution:
    infos: dict[str, TensorInfo]            # every tensor with a known static shape
    source: str                             # the step that resolved the last needed tensor (STEPS)
    unknown: tuple[str, ...]                # needed tensors no step could resolve (data-dependent)
    counts: tuple[tuple[str, int], ...]     # (step, needed tensors still unknown after it)
    needed: int                             # how many tensors needed a shape

    def describe(self) -> str:
        """e.g. ``shapes resolved by onnxruntime run: 240 tensors, all static (onnx shape inference
        left 5 unknown, onnxruntime symbolic shape inference 5, onnxruntime constant folding 2)``"""
        steps = ", ".join(f"{step} {'left ' if i == 0 else ''}{left}{' unknown' if i == 0 else ''}"
                          for i, (step, left) in enumerate(self.counts[:-1]))
        status = f"{len(self.unknown)} stay dynamic" if self.unknown else "all static"
        return f"shapes resolved by {self.source}: {self.needed} tensors, {status}" + (f" ({steps})" if steps else "")


def needed_tensors(model: onnx.ModelProto) -> list[str]:
    """Activations whose shape hetsched needs: every non-constant node output and graph output."""
    graph = model.graph
    consts = constant_tensors(graph, _topo(graph))
    names = [o for n in graph.node for o in n.output if o and o not in consts]
    names += [o.name for o in graph.output if o.name not in consts]
    names += [vi.name for vi in real_inputs(graph)]
    return list(dict.fromkeys(names))


def _topo(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    from hetsched.model.graph import topological_order
    avail = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    return topological_order(list(graph.node), avail)


def _onnx_step(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - any failure here leaves the later steps to do it
        log.debug("onnx shape inference failed: %s", exc)
        return static_infos(model.graph)
    return static_infos(inferred.graph)


def _symbolic_step(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError as exc:  # sympy missing
        log.info("skipping %s: %s", STEP_SYMBOLIC, exc)
        return {}
    cwd = os.getcwd()
    try:
        # when it gives up, onnxruntime saves "sym_shape_infer_temp.onnx" (and external data files)
        # into the current directory: let it do that in a directory of its own
        with tempfile.TemporaryDirectory(prefix="hetsched-sym-") as tmp:
            os.chdir(tmp)
            try:
                out = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=False)
            finally:
                os.chdir(cwd)
    except Exception as exc:  # noqa: BLE001 - unsupported ops and friends
        log.debug("%s failed: %s", STEP_SYMBOLIC, exc)
        return {}
    return static_infos(out.graph) if out is not None else {}


def _folding_step(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    import onnxruntime as ort
    with tempfile.TemporaryDirectory(prefix="hetsched-fold-") as tmp:
        path = os.path.join(tmp, "basic.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = path
        so.log_severity_level = 3
        try:
            ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            folded = onnx.load(path)
        except Exception as exc:  # noqa: BLE001
            log.debug("%s failed: %s", STEP_FOLDING, exc)
            return {}
    return _onnx_step(folded)


def _run_step(model: onnx.ModelProto, names: list[str], inputs: list[TensorInfo]) -> dict[str, TensorInfo]:
    """Shapes and dtypes of ``names`` from two real runs on random inputs (seeds 0 and 1); a tensor
    whose shape differs between the runs is left out."""
    import onnxruntime as ort

    from hetsched.model.graph import random_inputs
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs = [o.name for o in sess.get_outputs()]
        runs = [dict(zip(outs, sess.run(None, random_inputs(inputs, seed=s)))) for s in (0, 1)]
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{model_label(model)}: the shapes of {len(names)} tensors (e.g. {names[0]!r}) are not "
                         f"known statically and a run of the model in onnxruntime failed: {exc}; check that "
                         f"{INPUT_SHAPE_KEY} is a shape the model accepts") from exc
    found = {}
    for n in names:
        a, b = runs[0].get(n), runs[1].get(n)
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and a.ndim and \
                all(d > 0 for d in a.shape):
            found[n] = TensorInfo(n, a.dtype.name, tuple(int(d) for d in a.shape))
    return found


def resolve_shapes(model: onnx.ModelProto, *, steps: Sequence[str] = STEPS) -> ShapeResolution:
    """Static shapes of every needed tensor of a model whose inputs are fixed (:func:`fix_model`),
    trying ``steps`` (a subsequence of :data:`STEPS`) in order until none is missing."""
    if not input_is_static(model):
        raise ModelError(f"{model_label(model)}: inputs have symbolic dims; fix them first (fix_model)")
    unknown_steps = [s for s in steps if s not in STEPS]
    if unknown_steps or not steps:
        raise ValueError(f"shape steps must be among {STEPS}, got {list(steps)}")
    needed = needed_tensors(model)
    inputs = [static_infos(model.graph)[vi.name] for vi in real_inputs(model.graph)]
    infos: dict[str, TensorInfo] = {}
    counts: list[tuple[str, int]] = []
    missing = needed
    funcs = {STEP_ONNX: _onnx_step, STEP_SYMBOLIC: _symbolic_step, STEP_FOLDING: _folding_step,
             STEP_RUN: lambda m: _run_step(m, missing, inputs)}
    for step in [s for s in STEPS if s in steps]:
        if counts and not missing:
            break
        found = funcs[step](model)
        # the first step's answers are all kept (weights' shapes help FLOP counts); later steps
        # only fill what is still missing
        infos.update(found if not counts else {n: found[n] for n in missing if n in found})
        missing = [n for n in needed if n not in infos]
        counts.append((step, len(missing)))
        log.debug("%s: %s left %d of %d tensors without a static shape", model_label(model), step,
                  len(missing), len(needed))
    return ShapeResolution(infos, counts[-1][0], tuple(missing), tuple(counts), len(needed))
