"""The pipeline on real processes, real ZeroMQ ipc:// sockets and real onnxruntime sessions:
outputs equal the unsplit model's for every kind of plan, workers are pinned, nothing leaks."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from hetsched.planning.costs import flop_cost_table
from hetsched.runtime.pipeline import Pipeline
from hetsched.errors import ShapeMismatch
from hetsched.model.graph import random_inputs
from hetsched.planning.planner import ClusterSpec, TransferModel, plan_pipeline

from .conftest import SHARED_IMAGES, SHARED_MODEL, manual_plan, needs_shared, wait_for


def reference(model, xs):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [sess.run(None, {"data": x})[0] for x in xs]


def inputs(g, n, seed=0):
    return [random_inputs(g.inputs, seed=seed + i)["data"] for i in range(n)]


def costs_for(g, speeds):
    """FLOP-based cost table for clusters {name: (n_cores, speed)}."""
    return flop_cost_table(g.layer_names, g.boundary_bytes(), [layer.flops for layer in g.layers],
                           [(name, n, s) for name, (n, s) in speeds.items()])


def planner_plans(g):
    one_fast_one_slow = [ClusterSpec("big", (0,)), ClusterSpec("little", (1,))]
    both = [ClusterSpec("cpu", (0, 1))]
    t = TransferModel()
    return {
        "two clusters, little at 0.5": plan_pipeline(costs_for(g, {"big": (1, 1.0), "little": (1, 0.5)}),
                                                     one_fast_one_slow, t, allow_pools=False),
        "per-core replicas, little at 0.5": plan_pipeline(costs_for(g, {"big": (1, 1.0), "little": (1, 0.5)}),
                                                          one_fast_one_slow, t),
        "two clusters, little at 0.33": plan_pipeline(costs_for(g, {"big": (1, 1.0), "little": (1, 0.33)}),
                                                      one_fast_one_slow, t),
        "homogeneous, replicated": plan_pipeline(costs_for(g, {"cpu": (2, 1.0)}), both, t, tie_tolerance=0.0),
        "single stage, 2 threads": plan_pipeline(costs_for(g, {"cpu": (2, 1.0)}), both, t,
                                                 allow_replicas=False, max_stages=1),
        "single stage, 1 core": plan_pipeline(costs_for(g, {"big": (1, 1.0)}), [ClusterSpec("big", (0,))], t),
        "forced cut at 5": plan_pipeline(costs_for(g, {"big": (1, 1.0), "little": (1, 0.5)}),
                                         one_fast_one_slow, t, forced_cuts=[5]),
    }


def check_equal(model, g, plan, n=12):
    xs = inputs(g, n)
    want = reference(model, xs)
    with Pipeline(model, g, plan, max_inflight=6) as pipe:
        got = list(pipe.run(xs, timeout=60))
    assert [r.frame_id for r in got] == sorted(r.frame_id for r in got), "results out of order"
    assert len(got) == n
    for r, w in zip(got, want):
        assert r.error is None
        assert np.abs(r.outputs[0] - w).max() <= 1e-4
        assert [h.stage for h in r.hops] == list(range(len(plan.stages)))


@pytest.mark.timeout(240)
def test_every_planner_plan_equals_unsplit_model(squeezenet):
    model, g = squeezenet
    plans = planner_plans(g)
    shapes = {name: [(s.first_layer, s.last_layer, s.replicas, s.threads) for s in p.stages] for name, p in plans.items()}
    assert len(plans["two clusters, little at 0.5"].stages) == 2, shapes
    assert [len(s.members) for s in plans["per-core replicas, little at 0.5"].stages] == [2], shapes
    assert plans["homogeneous, replicated"].stages[0].replicas == 2, shapes
    assert plans["single stage, 2 threads"].stages[0].threads == 2, shapes
    for name, plan in plans.items():
        check_equal(model, g, plan)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stages", [
    [((0,), 0, 7, 1, 1), ((1,), 8, 15, 1, 1), ((0,), 16, 22, 1, 1)],           # 3 stages
    [((0,), 0, 2, 1, 1), ((0, 1), 3, 22, 1, 2)],                                # replicated second stage
    [((0, 1), 0, 10, 1, 2), ((1,), 11, 22, 1, 1)],                              # replicated first stage
    [((0,), 0, 0, 1, 1), ((1,), 1, 1, 1, 1), ((0,), 2, 21, 1, 1), ((1,), 22, 22, 1, 1)],  # tiny stages
])
def test_hand_built_plans_equal_unsplit_model(squeezenet, stages):
    model, g = squeezenet
    check_equal(model, g, manual_plan(g, stages), n=10)


@pytest.mark.timeout(120)
def test_workers_are_pinned_to_their_stage_cores(squeezenet):
    model, g = squeezenet
    plan = manual_plan(g, [((0,), 0, 8, 1, 1), ((1,), 9, 22, 1, 1), ((0, 1), 9, 22, 2, 1)][:2])
    with Pipeline(model, g, plan) as pipe:
        for w in pipe.workers:
            with open(f"/proc/{w.pid}/status") as fh:
                allowed = [line.split(":", 1)[1].strip() for line in fh if line.startswith("Cpus_allowed_list")][0]
            assert allowed == ",".join(map(str, w.cores)), (w.stage, allowed)
        # threads of the worker (onnxruntime, zmq) inherit the pinning
        import psutil
        for w in pipe.workers:
            for th in psutil.Process(w.pid).threads():
                with open(f"/proc/{w.pid}/task/{th.id}/status") as fh:
                    allowed = [line.split(":", 1)[1].strip() for line in fh if line.startswith("Cpus_allowed_list")][0]
                assert allowed == ",".join(map(str, w.cores))
    for w in pipe.workers:
        assert not w.process.is_alive()


@pytest.mark.timeout(120)
def test_wrong_input_shape_is_refused_and_pipeline_goes_on(squeezenet):
    model, g = squeezenet
    plan = manual_plan(g, [((0,), 0, 10, 1, 1), ((1,), 11, 22, 1, 1)])
    xs = inputs(g, 3)
    want = reference(model, xs)
    with Pipeline(model, g, plan) as pipe:
        with pytest.raises(ShapeMismatch):
            pipe.submit(np.zeros((1, 3, 200, 200), np.float32))
        with pytest.raises(ShapeMismatch):
            pipe.submit(np.zeros((1, 3, 224, 224), np.float64))
        got = list(pipe.run(xs))
    assert all(np.abs(r.outputs[0] - w).max() <= 1e-4 for r, w in zip(got, want))


@pytest.mark.timeout(120)
def test_worker_stats_count_every_frame(squeezenet):
    model, g = squeezenet
    plan = manual_plan(g, [((0,), 0, 10, 1, 1), ((1,), 11, 22, 1, 1)])
    with Pipeline(model, g, plan, stats_interval=0.1) as pipe:
        list(pipe.run(inputs(g, 20)))
        def all_counted():
            pipe.poll(20)
            return all(s["frames"] == 20 for s in pipe.stage_stats())
        wait_for(all_counted, timeout=10, what="stats of 20 frames per stage")
        stats = pipe.stage_stats()
    for s in stats:
        assert s["compute_s"] > 0 and len(s["samples"]) == 20


@needs_shared
@pytest.mark.timeout(180)
def test_real_weights_top1_through_the_pipeline_decoding_in_stage_zero():
    """Real ImageNet SqueezeNet from ../shared: encoded JPEGs go in, whichever stage-0 worker takes a
    frame decodes it (a pool across both cores, and a two-stage pipeline)."""
    from hetsched.config import InputConfig
    from hetsched.model.graph import analyze, load_model
    from hetsched.model.preprocess import top_k

    model = load_model(str(SHARED_MODEL))
    g = analyze(model)
    n = len(g.layers)
    plans = [[(0, n - 1, [((0,), 1, 1), ((1,), 1, 1)])],
             [((1,), 0, 8, 1, 1), ((0,), 9, n - 1, 1, 1)]]
    images = {name: (SHARED_IMAGES / name).read_bytes() for name in ("chelsea.jpg", "coffee.jpg")}
    for stages in plans:
        with Pipeline(model, g, manual_plan(g, stages), preprocess=InputConfig(), max_inflight=8) as pipe:
            ids = {pipe.submit_encoded(data, want_outputs=True): name for name, data in images.items() for _ in range(3)}
            results = pipe.drain(60)
        assert len(results) == 6 and all(r.error is None for r in results)
        for r in results:
            top1 = top_k(r.outputs[0], 1)[0]["index"]
            assert top1 in ((281, 282, 285) if ids[r.frame_id] == "chelsea.jpg" else (967,)), (ids[r.frame_id], top1)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stages", [
    [(0, 22, [((0,), 1, 1), ((1,), 1, 1)])],                                      # per-core replicas
    [((0,), 0, 6, 1, 1), (7, 22, [((0,), 1, 1), ((1,), 1, 1)])],                 # pipeline into a pool
    [(0, 9, [((0,), 1, 1), ((1,), 1, 1)]), (10, 22, [((1,), 1, 1), ((0,), 1, 1)])],  # two pools
])
def test_pool_and_hybrid_plans_equal_unsplit_model(squeezenet, stages):
    model, g = squeezenet
    plan = manual_plan(g, stages)
    check_equal(model, g, plan, n=24)


@pytest.mark.timeout(240)
def test_slots_are_never_overwritten_before_their_frame_is_done(squeezenet):
    """Many distinct frames through a 3-stage pipeline with few slots: every output must be its own
    input's (a slot reused too early would give one frame another's activations), and the ledger
    never holds two frames in one slot."""
    model, g = squeezenet
    plan = manual_plan(g, [((0,), 0, 5, 1, 1), (6, 14, [((1,), 1, 1), ((0,), 1, 1)]), ((1,), 15, 22, 1, 1)])
    xs = inputs(g, 40, seed=100)
    want = reference(model, xs)
    with Pipeline(model, g, plan, max_inflight=3) as pipe:
        got, seen_max = [], 0
        it = iter(xs)
        pending = {}
        sent = 0
        while len(got) < len(xs):
            while sent < len(xs) and pipe.can_submit:
                pending[pipe.submit(next(it))] = sent
                sent += 1
                slots = [r.slot for r in pipe.ledger.frames.values()]
                assert len(slots) == len(set(slots)), "two frames share a slot"
                seen_max = max(seen_max, len(slots))
            for r in pipe.poll(50):
                got.append((pending.pop(r.frame_id), r))
        assert seen_max == 3
    for i, r in got:
        assert r.error is None
        assert np.abs(r.outputs[0] - want[i]).max() <= 1e-4, f"frame {i} got another frame's result"


@pytest.mark.timeout(240)
def test_a_worker_killed_mid_stream_is_replaced_and_its_frames_replayed_from_their_slots(squeezenet):
    import os
    import signal
    model, g = squeezenet
    plan = manual_plan(g, [((0,), 0, 8, 1, 1), ((1,), 9, 22, 1, 1)])
    xs = inputs(g, 60, seed=7)
    want = reference(model, xs)
    with Pipeline(model, g, plan, heartbeat_timeout=1.0) as pipe:
        got = []
        killed = False
        for r in pipe.run(xs, timeout=60):
            got.append(r)
            if len(got) == 10 and not killed:
                os.kill(pipe.workers[1].pid, signal.SIGKILL)
                killed = True
        assert pipe.supervisor.restarts == 1
    assert len(got) == len(xs) and [r.frame_id for r in got] == sorted(r.frame_id for r in got)
    for r, w in zip(got, want):
        assert r.error is None and np.abs(r.outputs[0] - w).max() <= 1e-4


@pytest.mark.timeout(120)
def test_tcp_transport_with_curve_links(squeezenet):
    """Stages over tcp://127.0.0.1 (CURVE-encrypted with per-run keys) give the same outputs, and
    a peer without the run's keys cannot inject frames into a stage."""
    import zmq
    model, g = squeezenet
    plan = manual_plan(g, [((0,), 0, 10, 1, 1), ((1,), 11, 22, 1, 1)])
    xs = inputs(g, 6)
    want = reference(model, xs)
    with Pipeline(model, g, plan, transport="tcp") as pipe:
        assert pipe.link_keys is not None
        assert all(w.endpoint.startswith("tcp://127.0.0.1:") for w in pipe.workers)
        ctx = zmq.Context()
        intruder = ctx.socket(zmq.PUSH)
        intruder.setsockopt(zmq.LINGER, 0)
        intruder.connect(pipe.workers[1].endpoint)
        intruder.send_multipart([b"HS garbage", b"x" * 100], flags=zmq.NOBLOCK) if intruder.poll(200, zmq.POLLOUT) else None
        got = list(pipe.run(xs))
        intruder.close()
        ctx.term()
        assert all(w.process.is_alive() for w in pipe.workers)
        assert pipe.supervisor.restarts == 0
    for r, w in zip(got, want):
        assert np.abs(r.outputs[0] - w).max() <= 1e-4
