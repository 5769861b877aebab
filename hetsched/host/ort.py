"""The one place onnxruntime sessions are configured (workers, profiler, benchmark, tests).

Create sessions only after the process (or thread) is pinned to its cores: onnxruntime's intra-op
threads inherit the affinity of the thread that creates the session.
"""

from __future__ import annotations

from typing import Any


def session_options(threads: int = 1, *, spinning: bool | None = None) -> Any:
    """Sequential execution, full graph optimisation, ``threads`` intra-op threads, quiet logs.

    ``spinning``: let idle intra-op threads spin. Default: only when ``threads > 1`` (with one
    thread there is nothing to spin for; without spinning onnxruntime's 2-thread runs are no
    faster than 1)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if spinning is None:
        spinning = threads > 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def create_session(model: Any, threads: int = 1, *, spinning: bool | None = None) -> Any:
    """An onnxruntime CPU session for ``model`` (a path, serialized bytes or a ModelProto)."""
    import onnxruntime as ort
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    return ort.InferenceSession(model, session_options(threads, spinning=spinning),
                                providers=["CPUExecutionProvider"])
