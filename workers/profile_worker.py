"""Cost-profiling process: pinned to one cluster's cores, times every layer's sub-model.

Started with the ``spawn`` method by ``hetsched.profiling.measure``. It pins itself *before* creating
any onnxruntime session, then for each thread count: warms up every session, and measures in
rounds (each round runs every layer once, the whole model once, and an empty model once) so
drift on the core hits all alike; medians are reported through the result queue, with the CPU
load on the pinned cores during the measurement (``hetsched.profiling.load``: was it disturbed?).
"""

from __future__ import annotations

import os
import statistics
import sys
import time


def _session(ort, model_bytes: bytes, threads: int):
    from hetsched.host.ort import create_session
    return create_session(model_bytes, threads)


def _empty_model() -> bytes:
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "empty",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m.SerializeToString()


def _time_models(ort, models: list[bytes], feeds: list[dict], threads: int, warmup: int, repeats: int,
                 on_round=None) -> list[float]:
    """Median ms of one run of each model.

    One thread: all sessions stay alive and are timed in interleaved rounds (drift hits all alike).
    More threads: one session at a time, because the idle thread pools of other sessions would spin
    on the same cores and make every multi-threaded run look many times slower.
    """
    clock = time.perf_counter
    if threads == 1:
        sessions = [_session(ort, mb, 1) for mb in models]
        for _ in range(warmup):
            for sess, feed in zip(sessions, feeds):
                sess.run(None, feed)
        times: list[list[float]] = [[] for _ in models]
        for r in range(repeats):
            for i, (sess, feed) in enumerate(zip(sessions, feeds)):
                t0 = clock()
                sess.run(None, feed)
                times[i].append(clock() - t0)
            if on_round:
                on_round(r + 1, repeats)
        return [statistics.median(t) * 1e3 for t in times]
    out = []
    for i, (mb, feed) in enumerate(zip(models, feeds)):
        sess = _session(ort, mb, threads)
        for _ in range(warmup):
            sess.run(None, feed)
        t = []
        for _ in range(repeats):
            t0 = clock()
            sess.run(None, feed)
            t.append(clock() - t0)
        del sess
        out.append(statistics.median(t) * 1e3)
        if on_round:
            on_round(i + 1, len(models))
    return out


def _feeds(ort, models: list[bytes], inputs: list[list[dict]]) -> list[dict]:
    from hetsched.model.graph import TensorInfo, random_inputs
    feeds = []
    for i, (mb, ins) in enumerate(zip(models, inputs)):
        x = random_inputs([TensorInfo.from_dict(t) for t in ins], seed=i)
        import onnx
        names = {inp.name for inp in onnx.load_from_string(mb).graph.input}
        feeds.append({k: v for k, v in x.items() if k in names})
    return feeds


def measure(spec: dict, progress=None) -> dict:
    import onnxruntime as ort

    results = {"layer_ms": {}, "whole_ms": {}, "empty_ms": {}, "preprocess_ms": None, "stage_ms": {}}
    if spec.get("preprocess") is not None:
        results["preprocess_ms"] = _measure_preprocess(spec, progress)
    models = list(spec.get("layer_models", [])) + [spec["whole_model"], _empty_model()]
    inputs = list(spec.get("layer_inputs", [])) + [spec["whole_inputs"],
                                                   [{"name": "x", "dtype": "float32", "shape": [1, 1]}]]
    feeds = _feeds(ort, models, inputs)
    n = len(spec.get("layer_models", []))
    for threads in spec["threads"]:
        def on_round(done, total, threads=threads):
            if progress is not None:
                progress(threads, done, total)
        ms = _time_models(ort, models, feeds, threads, spec["warmup"], spec["repeats"], on_round)
        results["layer_ms"][threads] = ms[:n]
        results["whole_ms"][threads] = ms[n]
        results["empty_ms"][threads] = ms[n + 1]
    if spec.get("check_repeats"):  # the start-up speed check's procedure, for an exact reference next time
        results["check_ms"] = _time_models(ort, models[n:], feeds[n:], 1, spec["check_warmup"],
                                           spec["check_repeats"])[0]
    # whole candidate stages (sub-models of several layers), for refining a plan
    for key, (threads, mb, ins) in spec.get("stage_models", {}).items():
        results["stage_ms"][key] = _time_models(ort, [mb], _feeds(ort, [mb], [ins]), threads, spec["warmup"],
                                                spec["repeats"])[0]
    return results


def _measure_preprocess(spec: dict, progress) -> float:
    from hetsched.config import InputConfig
    from hetsched.model.preprocess import preprocess_encoded
    cfg = InputConfig(**spec["preprocess"])
    from hetsched.model.samples import sample_jpeg
    data = sample_jpeg()
    for _ in range(max(2, spec["warmup"])):
        preprocess_encoded(data, cfg)
    times = []
    for _ in range(max(5, spec["repeats"] // 2)):
        t0 = time.perf_counter()
        preprocess_encoded(data, cfg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def pinned_measure(spec: dict, progress=None) -> dict:
    """Pin to the spec's cores, measure, and add the foreign CPU load seen on them meanwhile."""
    from hetsched.profiling import load
    os.sched_setaffinity(0, spec["cores"])
    cores = spec["cores"]
    expected = spec.get("expected_pids", ())
    before = load.sample(cores, expected)  # other processes' CPU on these cores while we measure
    results = measure(spec, progress)
    results["load"] = (before, load.sample(cores, expected))
    return results


def run(spec: dict, queue) -> None:
    """multiprocessing target: pin, measure, put ("ok", results) or ("error", message)."""
    from hetsched.host.process import die_with_parent
    die_with_parent(spec["parent_pid"])
    try:
        def progress(threads, done, total):
            queue.put(("progress", {"threads": threads, "done": done, "total": total}))

        queue.put(("ok", pinned_measure(spec, progress)))
    except Exception as exc:  # reported to the coordinator, which raises it
        queue.put(("error", f"{type(exc).__name__}: {exc}"))
        sys.exit(1)
