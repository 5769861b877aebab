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
from hetsched.planning.planner import ClusterSpec, Plan, Stage, TransferModel, plan_pipeline

from .conftest import SHARED_IMAGES, SHARED_MODEL, needs_shared, wait_for


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


def manual_plan(g, stages):
    """A plan built by hand: [(cores, first, last, threads, replicas)], cores may repeat across stages."""
    out = []
    for i, (cores, a, b, t, r) in enumerate(stages):
        out.append(Stage(i, f"c{i}", tuple(cores), a, b, t, r, 1.0, 0.0, 1.0, 1.0 / r))
    return Plan(tuple(out), 1.0, 1000.0, float(len(out)), 1.0, g.layer_names)


def planner_plans(g):
    one_fast_one_slow = [ClusterSpec("big", (0,)), ClusterSpec("little", (1,))]
    both = [ClusterSpec("cpu", (0, 1))]
    t = TransferModel()
    return {
        "two clusters, little at 0.5": plan_pipeline(costs_for(g, {"big": (1, 1.0), "little": (1, 0.5)}),
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
def test_real_weights_top1_through_the_pipeline_with_preprocessing_stage():
    """Real ImageNet SqueezeNet from ../shared: encoded JPEGs go in, stage 0 decodes them."""
    from hetsched.config import InputConfig
    from hetsched.model.graph import analyze, load_model
    from hetsched.model.preprocess import top_k

    model = load_model(str(SHARED_MODEL))
    g = analyze(model)
    names = ("preprocess", *g.layer_names)
    n = len(names)
    plans = [  # preprocessing alone, then the model split in two; and preprocessing sharing a stage
        [((0,), 0, 0, 1, 1), ((1,), 1, 12, 1, 1), ((0,), 13, n - 1, 1, 1)],
        [((1,), 0, 9, 1, 1), ((0,), 10, n - 1, 1, 1)],
    ]
    images = {name: (SHARED_IMAGES / name).read_bytes() for name in ("chelsea.jpg", "coffee.jpg")}
    for stages in plans:
        plan = manual_plan(g, stages)
        plan = Plan(plan.stages, plan.bottleneck_ms, plan.throughput_fps, plan.latency_ms, plan.balance, names)
        with Pipeline(model, g, plan, preprocess=InputConfig()) as pipe:
            ids = {pipe.submit_encoded(data): name for name, data in images.items()}
            results = pipe.drain(60)
        top1 = {ids[r.frame_id]: top_k(r.outputs[0], 1)[0]["index"] for r in results}
        assert top1["chelsea.jpg"] in (281, 282, 285), top1
        assert top1["coffee.jpg"] == 967, top1


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
