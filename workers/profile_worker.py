"""Cost-profiling process: pinned to one cluster's cores, times every layer's sub-model.

Started with the ``spawn`` method by ``hetsched.cost_profiler``. It pins itself *before* creating
any onnxruntime session, then for each thread count: warms up every session, and measures in
rounds (each round runs every layer once, the whole model once, and an empty model once) so
drift on the core hits all alike; medians are reported through the result queue.
"""

from __future__ import annotations

import os
import statistics
import sys
import time


def _session(ort, model_bytes: bytes, threads: int):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads == 1:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _empty_model() -> bytes:
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "empty",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m.SerializeToString()


def measure(spec: dict, progress=None) -> dict:
    import numpy as np
    import onnxruntime as ort

    from hetsched.graph import TensorInfo, random_inputs

    results = {"layer_ms": {}, "whole_ms": {}, "empty_ms": {}, "preprocess_ms": None}
    empty = _empty_model()
    if spec.get("preprocess") is not None:
        results["preprocess_ms"] = _measure_preprocess(spec, progress)
    for threads in spec["threads"]:
        sessions = [_session(ort, mb, threads) for mb in spec["layer_models"]]
        whole = _session(ort, spec["whole_model"], threads)
        nothing = _session(ort, empty, threads)
        feeds = []
        for i, sess in enumerate(sessions):
            infos = [TensorInfo.from_dict(t) for t in spec["layer_inputs"][i]]
            x = random_inputs(infos, seed=i)
            feeds.append({k: v for k, v in x.items() if k in {n.name for n in sess.get_inputs()}})
        whole_feed = random_inputs([TensorInfo.from_dict(t) for t in spec["whole_inputs"]], seed=99)
        empty_feed = {"x": np.zeros((1, 1), np.float32)}
        for _ in range(spec["warmup"]):
            for sess, feed in zip(sessions, feeds):
                sess.run(None, feed)
            whole.run(None, whole_feed)
            nothing.run(None, empty_feed)
        times: list[list[float]] = [[] for _ in sessions]
        t_whole, t_empty = [], []
        clock = time.perf_counter
        for r in range(spec["repeats"]):
            for i, (sess, feed) in enumerate(zip(sessions, feeds)):
                t0 = clock()
                sess.run(None, feed)
                times[i].append(clock() - t0)
            t0 = clock()
            whole.run(None, whole_feed)
            t_whole.append(clock() - t0)
            for _ in range(3):
                t0 = clock()
                nothing.run(None, empty_feed)
                t_empty.append(clock() - t0)
            if progress is not None:
                progress(threads, r + 1, spec["repeats"])
        results["layer_ms"][threads] = [statistics.median(t) * 1e3 for t in times]
        results["whole_ms"][threads] = statistics.median(t_whole) * 1e3
        results["empty_ms"][threads] = statistics.median(t_empty) * 1e3
    return results


def sample_jpeg(width: int = 640, height: int = 480) -> bytes:
    """A photo-like JPEG (smooth gradients + noise) of a typical camera-frame size."""
    import io

    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 255 // (width + height)], -1)
    img = (img + rng.normal(0, 12, img.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _measure_preprocess(spec: dict, progress) -> float:
    from hetsched.config import InputConfig
    from hetsched.preprocess import preprocess_encoded
    cfg = InputConfig(**spec["preprocess"])
    data = sample_jpeg()
    for _ in range(max(2, spec["warmup"])):
        preprocess_encoded(data, cfg)
    times = []
    for _ in range(max(5, spec["repeats"] // 2)):
        t0 = time.perf_counter()
        preprocess_encoded(data, cfg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run(spec: dict, queue) -> None:
    """multiprocessing target: pin, measure, put ("ok", results) or ("error", message)."""
    from hetsched.process_setup import die_with_parent
    die_with_parent(spec["parent_pid"])
    try:
        os.sched_setaffinity(0, spec["cores"])

        def progress(threads, done, total):
            queue.put(("progress", {"threads": threads, "done": done, "total": total}))

        queue.put(("ok", measure(spec, progress)))
    except Exception as exc:  # reported to the coordinator, which raises it
        queue.put(("error", f"{type(exc).__name__}: {exc}"))
        sys.exit(1)
