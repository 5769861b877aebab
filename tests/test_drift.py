"""Drift detection and the re-plan decision, without processes: numbers in, decisions out."""

from __future__ import annotations

import random

import pytest

from hetsched.planning.plan import ClusterSpec, CostTable, TransferModel
from hetsched.planning.planner import evaluate_stages, plan_pipeline
from hetsched.runtime.drift import DriftDetector, as_assignment, decide, scaled_costs

CLUSTERS = [ClusterSpec("big", (0,)), ClusterSpec("little", (1,))]
TM = TransferModel(per_message_ms=0.01, per_mb_ms=0.0)


def costs(n=12, ms=1.0):
    row = tuple([ms] * n)
    return CostTable(tuple(f"l{i}" for i in range(n)), {"big": {1: row}, "little": {1: row}}, tuple([1000] * (n + 1)))


def feed(det, t0, t1, speeds, rng, noise=0.05, fps=200):
    t = t0
    while t < t1:
        for cluster, speed in speeds.items():
            det.on_frame(cluster, measured_ms=5.0 / speed * (1 + rng.uniform(-noise, noise)), predicted_ms=5.0)
        t += 1.0 / fps
    return det.drifted(t1)


def test_noise_does_not_count_as_drift_and_a_lasting_slowdown_does():
    rng = random.Random(1)
    det = DriftDetector(threshold=0.15, hold_s=2.0)
    assert feed(det, 0.0, 5.0, {"big": 1.0, "little": 1.0}, rng, noise=0.12) == []
    # a burst shorter than hold_s does not flap the plan
    assert feed(det, 5.0, 6.0, {"big": 1.0, "little": 0.33}, rng) == []
    assert feed(det, 6.0, 6.5, {"big": 1.0, "little": 1.0}, rng) == []
    for t in (7.0, 7.5, 8.0, 8.5):   # the speed estimate settles and then has to hold for 2 s
        reasons = feed(det, t, t + 0.5, {"big": 1.0, "little": 0.33}, rng)
    assert reasons == []
    reasons = feed(det, 9.0, 11.5, {"big": 1.0, "little": 0.33}, rng)
    assert len(reasons) == 1 and "cluster little runs at 0.3" in reasons[0]
    assert det.speeds()["little"] == pytest.approx(0.33, rel=0.1) and det.speeds()["big"] == pytest.approx(1.0, rel=0.1)
    # once the running plan is kept for the new speeds, the same speeds are no longer drift, and
    # the estimate stays the speed relative to the profile (it does not compound)
    det.adopt(det.speeds(), 0.0, new_plan=False)
    assert feed(det, 11.5, 15.0, {"big": 1.0, "little": 0.33}, rng) == []
    assert det.speeds()["little"] == pytest.approx(0.33, rel=0.1)
    # a new plan made for the measured speeds predicts slower frames on the little core: still no drift
    det.adopt(det.speeds(), 0.0, new_plan=True)
    t = 15.0
    while t < 19.0:
        det.on_frame("little", measured_ms=5.0 / 0.33, predicted_ms=5.0 / det.clusters["little"].basis)
        det.on_frame("big", measured_ms=5.0, predicted_ms=5.0)
        t += 0.01
        assert det.drifted(t) == []
    assert det.speeds()["little"] == pytest.approx(0.33, rel=0.1)


def test_a_slowed_worker_with_few_frames_is_not_judged_half_way():
    """A slowed worker measures few frames: its moving average is half-way to the new speed for a
    while, and checks a second apart can see it barely move. It is acted on only once enough frames
    arrived since it went off, so the speed acted on is the new one, not a mix."""
    rng = random.Random(2)
    det = DriftDetector(threshold=0.15, hold_s=1.0)
    assert feed(det, 0.0, 3.0, {"big": 1.0, "little": 1.0}, rng) == []
    acted = []
    t = 3.0
    while t < 60.0 and not acted:        # the little core now finishes about one frame between checks
        det.on_frame("little", measured_ms=5.0 / 0.33, predicted_ms=5.0)
        det.on_frame("big", measured_ms=5.0, predicted_ms=5.0)
        t += 0.5
        acted = det.drifted(t)
    assert acted, "a lasting slowdown was never acted on"
    assert det.speeds()["little"] < 0.45, det.speeds()


def test_a_slowdown_all_clusters_share_is_not_drift_but_a_lone_cluster_s_is():
    """Under full traffic both cores measure below their quiet profile (the service's own CPU): the
    best plan does not change, so it is not drift. With one cluster there is nothing to compare it
    with, and the slowdown counts."""
    rng = random.Random(3)
    det = DriftDetector(threshold=0.15, hold_s=1.0)
    for t in range(0, 10):
        assert feed(det, float(t), t + 1.0, {"big": 0.75, "little": 0.78}, rng) == []
    reasons = [feed(det, 10.0 + i / 2, 10.5 + i / 2, {"big": 0.75, "little": 0.3}, rng) for i in range(8)]
    assert [r for r in reasons if r] and all(any(x.startswith("cluster little runs at 0.3") for x in r)
                                             for r in reasons if r), reasons
    lone = DriftDetector(threshold=0.15, hold_s=1.0)
    reasons = [feed(lone, i / 2, (i + 1) / 2, {"big": 0.75}, rng) for i in range(10)]
    assert [r for r in reasons if r] and reasons[-1][0].startswith("cluster big"), reasons


def test_a_change_of_traffic_mix_is_drift():
    det = DriftDetector(hold_s=1.0)
    for _ in range(100):
        det.on_submit(encoded=False)
    assert det.drifted(0.0) == [] and det.drifted(5.0) == []
    for _ in range(200):
        det.on_submit(encoded=True)
    assert det.drifted(10.0) == []
    assert "encoded" in det.drifted(11.5)[0]


def test_scaled_costs_divide_compute_by_speed_and_weight_decoding_by_the_mix():
    base = costs()
    scaled = scaled_costs(base, {"little": 0.5}, {"big": 2.0, "little": 4.0}, encoded_share=0.25)
    assert scaled.layer_ms["little"][1][0] == pytest.approx(2.0) and scaled.layer_ms["big"][1][0] == 1.0
    assert scaled.input_ms == {"big": pytest.approx(0.5), "little": pytest.approx(2.0)}


def plan_fn(c):
    return plan_pipeline(c, CLUSTERS, TM, tie_tolerance=0.02)


def eval_fn(c, a):
    return evaluate_stages(c, CLUSTERS, TM, a)


def test_a_slowed_little_core_makes_a_pipeline_worth_it_and_back():
    base = costs()
    running = plan_fn(base)
    assert running.n_stages == 1 and len(running.stages[0].members) == 2     # per-core replicas
    same = decide(running, base, plan_fn, eval_fn)
    assert not same.switch and "running one" in same.reason
    slow = scaled_costs(base, {"little": 0.33}, {}, 0.0)
    d = decide(running, slow, plan_fn, eval_fn)
    # the rate of both is about the same; the pipeline never holds a whole frame on the little core
    assert d.switch and "p99" in d.reason and d.candidate.n_stages == 2
    assert d.candidate.latency_ms < 0.7 * d.current.latency_ms
    # and when the core is fast again, the pipeline is left for replicas (a throughput gain)
    back = decide(d.candidate, base, plan_fn, eval_fn)
    assert back.switch and "fps" in back.reason and back.candidate.n_stages == 1


def test_a_small_gain_is_not_worth_a_switch():
    base = costs()
    no_pools = lambda c: plan_pipeline(c, CLUSTERS, TM, allow_pools=False)  # noqa: E731
    running = no_pools(base)
    assert running.n_stages == 2
    # little 5% slower: a better split exists but gains less than min_gain
    d = decide(running, scaled_costs(base, {"little": 0.95}, {}, 0.0), no_pools, eval_fn, min_gain=0.1)
    assert not d.switch
    d = decide(running, scaled_costs(base, {"little": 0.33}, {}, 0.0), no_pools, eval_fn, min_gain=0.1)
    assert d.switch and d.gain > 0.5
    assert [s.n_layers for s in d.candidate.stages] == [9, 3]
    assert as_assignment(d.candidate)[0].members == (("big", 1, 1, 1),)


def test_latency_is_not_bought_by_leaving_a_core_idle():
    """A plan on fewer cores must not lose predicted rate, even for a much better p99: the service's own
    CPU then lands on the cores it keeps, which the measured speeds do not show."""
    from hetsched.planning.plan import StageSpec
    slow = scaled_costs(costs(), {"little": 0.05}, {}, 0.0)
    pool = [StageSpec(0, 11, (("big", 1, 1, 1), ("little", 1, 1, 1)))]
    big_only = [StageSpec(0, 11, (("big", 1, 1, 1),))]
    running = eval_fn(slow, pool)
    cand = eval_fn(slow, big_only)
    assert -0.1 < cand.throughput_fps / running.throughput_fps - 1 < -0.02   # a small rate loss ...
    assert cand.latency_ms < 0.5 * running.latency_ms                      # ... for a much better p99
    d = decide(running, slow, lambda c: eval_fn(c, big_only), eval_fn, tie_tolerance=0.1)
    assert not d.switch and "too little" in d.reason
    # (the same trade between plans on the same cores stays allowed: see
    # test_a_slowed_little_core_makes_a_pipeline_worth_it_and_back)
