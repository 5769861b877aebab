"""Tests of hetsched.planning.planner (pure, fast)."""

from __future__ import annotations

import itertools
import json
import math
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetsched.errors import PlanError
from hetsched.planning.planner import (
    ClusterSpec,
    CostTable,
    Plan,
    StageSpec,
    TransferModel,
    evaluate_stages,
    format_plan,
    plan_pipeline,
)

MIB = 1 << 20


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def make_costs(base, clusters, speeds, *, scaling=0.8, bytes_=None, overhead=0.0, thread_exp=None):
    """Cost table where layer l on cluster c with t threads takes base[l] / speed[c] / t**scaling."""
    n = len(base)
    layer_ms = {}
    for c, sp in zip(clusters, speeds):
        layer_ms[c.name] = {
            t: tuple(b / sp / (t ** scaling) for b in base) for t in range(1, len(c.cores) + 1)
        }
    if bytes_ is None:
        bytes_ = [64 * 1024] * (n + 1)
    return CostTable(
        layer_names=tuple(f"layer{i}" for i in range(n)),
        layer_ms=layer_ms,
        boundary_bytes=tuple(int(b) for b in bytes_),
        stage_overhead_ms={c.name: overhead for c in clusters},
    )


def random_case(rng: random.Random, n_max=8, k_max=3, c_max=3):
    n = rng.randint(1, n_max)
    k = rng.randint(1, k_max)
    clusters = []
    next_core = 0
    for ci in range(k):
        m = rng.randint(0 if ci else 1, c_max)
        clusters.append(ClusterSpec(f"c{ci}", tuple(range(next_core, next_core + m))))
        next_core += m
    layer_ms = {}
    for c in clusters:
        # arbitrary (even non-monotone) per-thread tables
        layer_ms[c.name] = {
            t: tuple(round(rng.uniform(0.0, 10.0), 3) for _ in range(n)) for t in range(1, len(c.cores) + 1)
        }
    costs = CostTable(
        layer_names=tuple(f"L{i}" for i in range(n)),
        layer_ms=layer_ms,
        boundary_bytes=tuple(rng.randint(0, 8 * MIB) for _ in range(n + 1)),
        stage_overhead_ms={c.name: round(rng.uniform(0.0, 1.0), 3) for c in clusters},
    )
    transfer = TransferModel(per_message_ms=rng.uniform(0.0, 0.5), per_mb_ms=rng.uniform(0.0, 2.0))
    return costs, clusters, transfer


def check_invariants(plan: Plan, costs: CostTable, clusters, transfer, max_stages=None, allow_replicas=True,
                     allow_pools=True):
    n = len(costs.layer_names)
    assert plan.stages, "plan has no stages"
    covered = []
    for idx, s in enumerate(plan.stages):
        assert s.index == idx
        assert s.first_layer <= s.last_layer
        covered.extend(s.layer_range())
    assert covered == list(range(n)), "stages must be contiguous and cover every layer exactly once"
    by_name = {c.name: c for c in clusters}
    all_cores = [c for s in plan.stages for c in s.cores]
    assert len(all_cores) == len(set(all_cores)), "cores shared between stages"
    for s in plan.stages:
        assert s.members
        assert len({m.cluster for m in s.members}) == len(s.members), "one member per cluster"
        if not allow_pools:
            assert len(s.members) == 1
        rate = 0.0
        for m in s.members:
            assert m.cluster in by_name
            assert set(m.cores) <= set(by_name[m.cluster].cores)
            assert m.replicas >= 1 and m.threads >= 1
            assert m.replicas * m.threads == len(m.cores)
            if not allow_replicas:
                assert m.replicas == 1
            rc = m.replica_cores()
            assert len(rc) == m.replicas and all(len(x) == m.threads for x in rc)
            comp = sum(costs.layer_ms[m.cluster][m.threads][i] for i in s.layer_range()) + \
                costs.stage_overhead_ms.get(m.cluster, 0.0) + (costs.input_ms.get(m.cluster, 0.0) if s.first_layer == 0 else 0)
            xfer = transfer.cost_ms(costs.boundary_bytes[s.first_layer]) + transfer.cost_ms(
                costs.boundary_bytes[s.last_layer + 1])
            assert m.compute_ms == pytest.approx(comp, rel=1e-9, abs=1e-12)
            assert m.transfer_ms == pytest.approx(xfer, rel=1e-9, abs=1e-12)
            rate += m.replicas * 1000.0 / (comp + xfer) if comp + xfer > 0 else math.inf
        assert s.period_ms == pytest.approx(1000.0 / rate, rel=1e-9)
        assert s.p99_ms == pytest.approx(max(m.service_ms for m in s.members), rel=1e-12)
        assert min(m.service_ms for m in s.members) <= s.p50_ms <= s.p99_ms
        assert s.replicas == sum(m.replicas for m in s.members) == len(s.workers())
    if max_stages is not None:
        assert len(plan.stages) <= max_stages
    assert plan.bottleneck_ms == max(s.period_ms for s in plan.stages)
    assert plan.latency_ms == pytest.approx(sum(s.p99_ms for s in plan.stages), rel=1e-12)
    if plan.bottleneck_ms > 0:
        assert plan.throughput_fps == pytest.approx(1000.0 / plan.bottleneck_ms)
    periods = [s.period_ms for s in plan.stages]
    if sum(periods) > 0:
        assert plan.balance == pytest.approx(max(periods) / (sum(periods) / len(periods)))
    assert plan.stages[plan.bottleneck_stage].period_ms == plan.bottleneck_ms


def pool_options(clusters, allow_replicas=True, allow_pools=True):
    per = []
    for c in clusters:
        opts = [None]
        for m in range(1, len(c.cores) + 1):
            for r in range(1, m + 1):
                if m % r or (r > 1 and not allow_replicas):
                    continue
                opts.append((c.name, m, m // r, r))
        per.append(opts)
    out = []
    for combo in itertools.product(*per):
        members = tuple(x for x in combo if x is not None)
        if members and (allow_pools or len(members) == 1):
            out.append(members)
    return out


def brute_force(costs, clusters, transfer, max_stages, allow_replicas=True, allow_pools=True):
    """All valid plans, by enumeration through evaluate_stages."""
    n = len(costs.layer_names)
    stage_opts = pool_options(clusters, allow_replicas, allow_pools)
    plans = []
    for n_st in range(1, min(n, max_stages) + 1):
        for cuts in itertools.combinations(range(1, n), n_st - 1):
            bounds = (0, *cuts, n)
            for choice in itertools.product(stage_opts, repeat=n_st):
                assignment = [StageSpec(bounds[i], bounds[i + 1] - 1, members) for i, members in enumerate(choice)]
                try:
                    plans.append(evaluate_stages(costs, clusters, transfer, assignment))
                except PlanError:
                    pass  # not enough cores
    return plans


# ---------------------------------------------------------------------------------------------
# invariants on random tables
# ---------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    max_stages=st.one_of(st.none(), st.integers(1, 5)),
    tie=st.sampled_from([0.0, 0.02, 0.2]),
    allow_replicas=st.booleans(),
)
def test_invariants_random(seed, max_stages, tie, allow_replicas):
    rng = random.Random(seed)
    costs, clusters, transfer = random_case(rng, n_max=12, k_max=3, c_max=4)
    plan = plan_pipeline(
        costs, clusters, transfer, max_stages=max_stages, tie_tolerance=tie, allow_replicas=allow_replicas
    )
    check_invariants(plan, costs, clusters, transfer, max_stages=max_stages, allow_replicas=allow_replicas)
    if tie > 0:
        exact = plan_pipeline(costs, clusters, transfer, max_stages=max_stages, allow_replicas=allow_replicas)
        assert plan.bottleneck_ms <= exact.bottleneck_ms * (1 + tie) + 1e-9
        assert plan.latency_ms <= exact.latency_ms + 1e-9


# ---------------------------------------------------------------------------------------------
# exactness against brute force
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_exact_vs_brute_force(seed):
    rng = random.Random(1000 + seed)
    costs, clusters, transfer = random_case(rng, n_max=6, k_max=2, c_max=2)
    max_stages = rng.randint(1, 3)
    allow_replicas = seed % 4 != 3
    plan = plan_pipeline(costs, clusters, transfer, max_stages=max_stages, allow_replicas=allow_replicas)
    check_invariants(plan, costs, clusters, transfer, max_stages=max_stages, allow_replicas=allow_replicas)

    plans = brute_force(costs, clusters, transfer, max_stages, allow_replicas)
    assert plans
    best_b = min(p.bottleneck_ms for p in plans)
    assert plan.bottleneck_ms == pytest.approx(best_b, rel=1e-9, abs=1e-12)
    tied = [p for p in plans if p.bottleneck_ms <= best_b * (1 + 1e-9) + 1e-12]
    best_lat = min(p.latency_ms for p in tied)
    assert plan.latency_ms == pytest.approx(best_lat, rel=1e-9, abs=1e-12)
    # remaining tie-breaks: fewer stages, then fewer cores
    lat_tied = [p for p in tied if p.latency_ms <= best_lat * (1 + 1e-9) + 1e-12]
    best_key = min((p.n_stages, p.n_cores) for p in lat_tied)
    assert (plan.n_stages, plan.n_cores) == best_key


@pytest.mark.parametrize("seed", range(15))
def test_tie_tolerance_vs_brute_force(seed):
    rng = random.Random(5000 + seed)
    costs, clusters, transfer = random_case(rng, n_max=5, k_max=2, c_max=2)
    tol = 0.1
    plan = plan_pipeline(costs, clusters, transfer, max_stages=3, tie_tolerance=tol)
    plans = brute_force(costs, clusters, transfer, 3)
    best_b = min(p.bottleneck_ms for p in plans)
    ok = [p for p in plans if p.bottleneck_ms <= best_b * (1 + tol) * (1 + 1e-9)]
    assert plan.bottleneck_ms <= best_b * (1 + tol) * (1 + 1e-9)
    assert plan.latency_ms == pytest.approx(min(p.latency_ms for p in ok), rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# sanity scenarios
# ---------------------------------------------------------------------------------------------


def test_fast_and_slow_cluster_split_by_speed():
    clusters = [ClusterSpec("big", (4,)), ClusterSpec("little", (0,))]
    base = [1.0] * 12
    costs = make_costs(base, clusters, speeds=[1.0, 0.5], bytes_=[1024] * 13)
    tm = TransferModel(per_message_ms=0.01, per_mb_ms=0.1)
    plan = plan_pipeline(costs, clusters, tm, allow_pools=False)
    check_invariants(plan, costs, clusters, tm, allow_pools=False)
    assert len(plan.stages) == 2
    slow = [s for s in plan.stages if s.cluster == "little"]
    assert len(slow) == 1
    assert slow[0].last_layer - slow[0].first_layer + 1 == 4  # a third of the (base) work
    assert all(s.threads == 1 and s.replicas == 1 for s in plan.stages)
    assert plan.bottleneck_ms == pytest.approx(8.0, abs=0.1)


def test_huge_layer_is_replicated():
    clusters = [ClusterSpec("cpu", (0, 1, 2, 3))]
    base = [1.0, 1.0, 20.0, 1.0, 1.0]
    # intra-op threads barely help this model (scaling exponent 0.1): replicas are the way to go
    costs = make_costs(base, clusters, speeds=[1.0], scaling=0.1, overhead=0.1)
    tm = TransferModel()
    plan = plan_pipeline(costs, clusters, tm)
    check_invariants(plan, costs, clusters, tm)
    huge = next(s for s in plan.stages if 2 in s.layer_range())
    assert huge.replicas > 1
    no_rep = plan_pipeline(costs, clusters, tm, allow_replicas=False)
    check_invariants(no_rep, costs, clusters, tm, allow_replicas=False)
    assert all(s.replicas == 1 for s in no_rep.stages)
    assert plan.bottleneck_ms < no_rep.bottleneck_ms


def test_homogeneous_expensive_transfer_single_stage_replicated():
    clusters = [ClusterSpec("cpu", (0, 1))]
    base = [2.0] * 6
    # internal activations are huge, model input/output tiny
    bytes_ = [1024] + [64 * MIB] * 5 + [1024]
    costs = make_costs(base, clusters, speeds=[1.0], scaling=0.5, bytes_=bytes_)
    tm = TransferModel()
    plan = plan_pipeline(costs, clusters, tm)
    check_invariants(plan, costs, clusters, tm)
    assert len(plan.stages) == 1
    assert plan.stages[0].replicas == 2 and plan.stages[0].threads == 1
    assert plan.stages[0].cores == (0, 1)


def test_forced_cuts_exact():
    rng = random.Random(7)
    tm = TransferModel()
    clusters = [ClusterSpec("a", (0, 1, 2)), ClusterSpec("b", (3, 4, 5))]
    n = 10
    base = [rng.uniform(1, 5) for _ in range(n)]
    costs = make_costs(base, clusters, speeds=[1.0, 0.6])
    for cuts in ([3], [1, 9], [2, 5, 7], [8, 2, 5]):
        plan = plan_pipeline(costs, clusters, tm, forced_cuts=cuts)
        check_invariants(plan, costs, clusters, tm)
        assert plan.cuts() == tuple(sorted(cuts))
        assert len(plan.stages) == len(cuts) + 1
    # the planner still optimises clusters/cores for the forced cuts: compare to brute force
    plans = [p for p in brute_force(costs, clusters, tm, 2) if p.cuts() == (3,)]
    forced = plan_pipeline(costs, clusters, tm, forced_cuts=[3])
    assert forced.bottleneck_ms == pytest.approx(min(p.bottleneck_ms for p in plans), rel=1e-9)
    # no cuts = exactly one stage
    one = plan_pipeline(costs, clusters, tm, forced_cuts=[])
    assert len(one.stages) == 1
    with pytest.raises(PlanError):
        plan_pipeline(costs, clusters, tm, forced_cuts=[0])
    with pytest.raises(PlanError):
        plan_pipeline(costs, clusters, tm, forced_cuts=[n])
    with pytest.raises(PlanError):
        plan_pipeline(costs, clusters, tm, forced_cuts=[3, 3])
    with pytest.raises(PlanError):
        plan_pipeline(costs, clusters, tm, forced_cuts=[2, 4, 6], max_stages=3)
    with pytest.raises(PlanError):  # 7 stages but only 6 cores
        plan_pipeline(costs, clusters, tm, forced_cuts=[1, 2, 3, 4, 5, 6])


@pytest.mark.parametrize("max_stages", [1, 2, 3])
def test_max_stages_respected(max_stages):
    clusters = [ClusterSpec("big", (0, 1, 2, 3)), ClusterSpec("little", (4, 5, 6, 7))]
    base = [1.0 + (i % 3) for i in range(16)]
    costs = make_costs(base, clusters, speeds=[1.0, 0.5], scaling=0.0, bytes_=[1024] * 17)
    tm = TransferModel()
    plan = plan_pipeline(costs, clusters, tm, max_stages=max_stages, allow_replicas=False)
    check_invariants(plan, costs, clusters, tm, max_stages=max_stages, allow_replicas=False)
    assert len(plan.stages) == max_stages  # threads don't help, so every extra stage pays off


def test_no_cores_raises():
    clusters = [ClusterSpec("a", ()), ClusterSpec("b", ())]
    costs = CostTable(("x", "y"), {"a": {}, "b": {}}, (1, 1, 1), {})
    with pytest.raises(PlanError):
        plan_pipeline(costs, clusters)
    with pytest.raises(PlanError):
        plan_pipeline(costs, [])


def test_invalid_inputs_raise():
    clusters = [ClusterSpec("a", (0, 1))]
    costs = make_costs([1.0, 2.0], clusters, speeds=[1.0])
    with pytest.raises(PlanError):
        plan_pipeline(costs, clusters, max_stages=0)
    with pytest.raises(PlanError):  # missing costs for a cluster with cores
        plan_pipeline(costs, clusters + [ClusterSpec("b", (2,))])
    with pytest.raises(PlanError):  # core shared between clusters
        plan_pipeline(costs, [ClusterSpec("a", (0, 1)), ClusterSpec("b", (1,))])
    bad = CostTable(costs.layer_names, costs.layer_ms, (1, 2), costs.stage_overhead_ms)
    with pytest.raises(PlanError):
        plan_pipeline(bad, clusters)


def test_evaluate_stages_validation():
    clusters = [ClusterSpec("big", (4, 5)), ClusterSpec("little", (0, 1))]
    costs = make_costs([1.0, 2.0, 3.0, 4.0], clusters, speeds=[1.0, 0.5])
    tm = TransferModel()
    ok = evaluate_stages(costs, clusters, tm, [("big", 2, 0, 1, 1, 2), ("little", 1, 2, 3, 1, 1)])
    check_invariants(ok, costs, clusters, tm)
    assert ok.stages[0].cores == (4, 5) and ok.stages[0].replica_cores() == ((4,), (5,))
    assert ok.stages[1].cores == (0,)
    two_on_one = evaluate_stages(costs, clusters, tm, [("big", 1, 0, 1, 1, 1), ("big", 1, 2, 3, 1, 1)])
    assert two_on_one.stages[0].cores == (4,) and two_on_one.stages[1].cores == (5,)
    bad = [
        [("big", 2, 0, 1, 1, 2), ("little", 1, 3, 3, 1, 1)],  # gap
        [("big", 2, 0, 1, 1, 2)],  # not covered
        [("big", 2, 0, 2, 1, 2), ("little", 1, 2, 3, 1, 1)],  # overlap
        [("big", 2, 1, 3, 1, 2)],  # does not start at 0
        [("big", 2, 0, 1, 1, 2), ("big", 1, 2, 3, 1, 1)],  # too many cores on big
        [("big", 2, 0, 3, 1, 1)],  # replicas*threads != cores
        [("gpu", 1, 0, 3, 1, 1)],  # unknown cluster
        [("big", 3, 0, 3, 3, 1)],  # more cores than the cluster has
        [],
    ]
    for a in bad:
        with pytest.raises(PlanError):
            evaluate_stages(costs, clusters, tm, a)


def test_format_plan_and_to_dict():
    clusters = [ClusterSpec("big", (4, 5, 6, 7)), ClusterSpec("little", (0, 1, 2, 3))]
    costs = make_costs([1.0, 3.0, 2.0, 5.0, 1.0, 2.0], clusters, speeds=[1.0, 0.4])
    plan = plan_pipeline(costs, clusters, forced_cuts=[2, 4])
    text = format_plan(plan)
    lines = text.splitlines()
    for s in plan.stages:
        assert any(line.startswith(str(s.index)) and s.members[0].cluster in line for line in lines)
        assert costs.layer_names[s.first_layer] in text
    pooled = evaluate_stages(costs, clusters, TransferModel(),
                             [StageSpec(0, 5, (("big", 2, 1, 2), ("little", 4, 2, 2)))])
    text2 = format_plan(pooled)
    assert "big" in text2 and "little" in text2 and "2 x 1" in text2 and "2 x 2" in text2
    assert Plan.from_dict(json.loads(json.dumps(pooled.to_dict()))) == pooled
    assert "throughput" in text and "frames/s" in text
    assert "latency" in text and "balance" in text and "bottleneck stage" in text
    d = plan.to_dict()
    s = json.dumps(d)
    back = json.loads(s)
    assert len(back["stages"]) == len(plan.stages)
    assert back["stages"][0]["first_layer_name"] == "layer0"
    assert back["stages"][-1]["last_layer_name"] == "layer5"
    assert back["bottleneck_stage"] == plan.bottleneck_stage
    assert Plan.from_dict(back) == plan


def test_bottleneck_stage_property():
    clusters = [ClusterSpec("big", (4,)), ClusterSpec("little", (0,))]
    costs = make_costs([1.0, 1.0, 1.0, 10.0], clusters, speeds=[1.0, 1.0])
    plan = evaluate_stages(costs, clusters, TransferModel(), [("big", 1, 0, 2, 1, 1), ("little", 1, 3, 3, 1, 1)])
    assert plan.bottleneck_stage == 1
    assert plan.balance > 1.0


def test_speed_20_layers_3_clusters():
    rng = random.Random(3)
    clusters = [ClusterSpec("big", (4, 5, 6, 7)), ClusterSpec("little", (0, 1, 2, 3)), ClusterSpec("prime", (8,))]
    base = [rng.uniform(0.5, 5.0) for _ in range(20)]
    bytes_ = [rng.randint(10_000, 4_000_000) for _ in range(21)]
    costs = make_costs(base, clusters, speeds=[1.0, 0.4, 1.3], scaling=0.7, bytes_=bytes_, overhead=0.2)
    tm = TransferModel()
    t0 = time.perf_counter()
    plan = plan_pipeline(costs, clusters, tm, max_stages=4, tie_tolerance=0.02)
    dt = time.perf_counter() - t0
    check_invariants(plan, costs, clusters, tm, max_stages=4)
    assert dt < 1.0, f"planning took {dt:.3f} s"


# ---------------------------------------------------------------------------------------------
# pools across clusters, latency as an objective
# ---------------------------------------------------------------------------------------------


def big_little_costs(base, little_speed=0.5, little_factors=None, bytes_=None):
    clusters = [ClusterSpec("big", (0,)), ClusterSpec("little", (1,))]
    costs = make_costs(base, clusters, speeds=[1.0, little_speed], bytes_=bytes_ or [200_000] * (len(base) + 1))
    if little_factors is not None:  # per-layer slowness of the little core relative to the big one
        costs = CostTable(costs.layer_names, {"big": costs.layer_ms["big"],
                                              "little": {1: tuple(b * f for b, f in zip(base, little_factors))}},
                          costs.boundary_bytes, costs.stage_overhead_ms)
    return costs, clusters


def test_planner_finds_per_core_replicas_when_they_are_best():
    costs, clusters = big_little_costs([1.0] * 12)
    tm = TransferModel(per_message_ms=0.05, per_mb_ms=0.2)
    plan = plan_pipeline(costs, clusters, tm, tie_tolerance=0.0)
    check_invariants(plan, costs, clusters, tm)
    assert plan.n_stages == 1
    assert {m.cluster for m in plan.stages[0].members} == {"big", "little"}
    # the pool's rate is the sum of both cores' rates, better than any pipeline of the same cores
    best_pipeline = plan_pipeline(costs, clusters, tm, allow_pools=False)
    assert best_pipeline.n_stages == 2
    assert plan.throughput_fps > best_pipeline.throughput_fps
    assert plan.throughput_fps == pytest.approx(sum(m.rate_fps for m in plan.stages[0].members))


def test_planner_finds_a_pipeline_when_it_is_best():
    # the little core is 4x slower on the first (compute-bound) half but as fast on the second
    # (memory-bound) half: a pipeline that gives it the second half beats one replica per core
    base = [1.0] * 12
    costs, clusters = big_little_costs(base, little_factors=[4.0] * 6 + [1.0] * 6)
    tm = TransferModel(per_message_ms=0.01, per_mb_ms=0.05)
    plan = plan_pipeline(costs, clusters, tm, tie_tolerance=0.0)
    check_invariants(plan, costs, clusters, tm)
    assert plan.n_stages == 2 and all(len(s.members) == 1 for s in plan.stages)
    assert [s.members[0].cluster for s in plan.stages] == ["big", "little"]
    replicas = evaluate_stages(costs, clusters, tm, [StageSpec(0, 11, (("big", 1, 1, 1), ("little", 1, 1, 1)))])
    assert plan.throughput_fps > replicas.throughput_fps * 1.2


def test_within_tie_tolerance_the_lower_p99_wins():
    # equal layers, little at 0.5: replicas (rate 1.5/12 ms) and a 2/3 + 1/3 pipeline tie on throughput;
    # the pipeline's p99 is 16 ms, the replicas' 24 ms (a frame on the little core)
    costs, clusters = big_little_costs([1.0] * 12)
    tm = TransferModel(per_message_ms=0.01, per_mb_ms=0.0)
    exact = plan_pipeline(costs, clusters, tm, tie_tolerance=0.0)
    tied = plan_pipeline(costs, clusters, tm, tie_tolerance=0.02)
    check_invariants(tied, costs, clusters, tm)
    assert exact.n_stages == 1 and exact.latency_ms == pytest.approx(24.02)
    assert tied.n_stages == 2 and tied.latency_ms == pytest.approx(16.04)
    assert tied.throughput_fps >= exact.throughput_fps / 1.02


def test_latency_objective_gives_a_slow_camera_the_big_core_only():
    costs, clusters = big_little_costs([1.0] * 12)
    tm = TransferModel(per_message_ms=0.01, per_mb_ms=0.0)
    plan = plan_pipeline(costs, clusters, tm, objective="latency", target_fps=30)
    check_invariants(plan, costs, clusters, tm)
    assert plan.n_stages == 1 and [m.cluster for m in plan.stages[0].members] == ["big"]
    assert plan.latency_ms == pytest.approx(12.02)
    assert plan.objective == "latency" and plan.target_fps == 30 and not plan.notes
    # a rate only both cores reach: the lowest p99 among plans that sustain it
    fast = plan_pipeline(costs, clusters, tm, objective="latency", target_fps=110)
    assert fast.throughput_fps >= 110 and fast.n_stages == 2
    # a rate no plan reaches: the best-throughput plan, with a note saying so
    too_fast = plan_pipeline(costs, clusters, tm, objective="latency", target_fps=1000)
    assert too_fast.notes and "above the best plan" in too_fast.notes[0]
    assert too_fast.throughput_fps == pytest.approx(plan_pipeline(costs, clusters, tm).throughput_fps)
    with pytest.raises(PlanError):
        plan_pipeline(costs, clusters, tm, objective="latency")
    with pytest.raises(PlanError):
        plan_pipeline(costs, clusters, tm, objective="fastest")


def test_input_work_is_charged_to_stage_zero_only():
    costs, clusters = big_little_costs([1.0] * 6)
    costs = CostTable(costs.layer_names, costs.layer_ms, costs.boundary_bytes, costs.stage_overhead_ms,
                      input_ms={"big": 3.0, "little": 6.0})
    tm = TransferModel(per_message_ms=0.0, per_mb_ms=0.0)
    plan = evaluate_stages(costs, clusters, tm, [("big", 1, 0, 2, 1, 1), ("little", 1, 3, 5, 1, 1)])
    assert plan.stages[0].compute_ms == pytest.approx(6.0) and plan.stages[1].compute_ms == pytest.approx(6.0)


@pytest.mark.parametrize("seed", range(12))
def test_pools_exact_vs_brute_force_three_clusters(seed):
    rng = random.Random(9000 + seed)
    costs, clusters, transfer = random_case(rng, n_max=4, k_max=3, c_max=2)
    plan = plan_pipeline(costs, clusters, transfer, max_stages=2)
    check_invariants(plan, costs, clusters, transfer, max_stages=2)
    plans = brute_force(costs, clusters, transfer, 2)
    best_b = min(p.bottleneck_ms for p in plans)
    assert plan.bottleneck_ms == pytest.approx(best_b, rel=1e-9, abs=1e-12)
    tied = [p for p in plans if p.bottleneck_ms <= best_b * (1 + 1e-9) + 1e-12]
    assert plan.latency_ms == pytest.approx(min(p.latency_ms for p in tied), rel=1e-9, abs=1e-12)


def test_speed_intel_hybrid_host():
    rng = random.Random(4)
    clusters = [ClusterSpec("p", tuple(range(8))), ClusterSpec("e", tuple(range(8, 16)))]
    base = [rng.uniform(0.2, 3.0) for _ in range(40)]
    costs = make_costs(base, clusters, speeds=[1.0, 0.5], scaling=0.7, bytes_=[500_000] * 41, overhead=0.1)
    t0 = time.perf_counter()
    plan = plan_pipeline(costs, clusters, TransferModel(), max_stages=4, tie_tolerance=0.02)
    dt = time.perf_counter() - t0
    check_invariants(plan, costs, clusters, TransferModel(), max_stages=4)
    assert dt < 30.0, f"planning took {dt:.1f} s"
