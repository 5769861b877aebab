"""Placement across nodes without Ray: the config keys, Ray's node list, planner core ids across
nodes, link costs in the planner, the "mixed" pipeline (shared memory and tcp:// links in one plan,
real processes and sessions) and the liveness rule of workers that are not the coordinator's child."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import psutil
import pytest

from hetsched.config import parse_config
from hetsched.errors import ConfigError, PlanError
from hetsched.placement.cores import NODE_STRIDE, planner_clusters
from hetsched.placement.nodes import node_resource, nodes_from_ray, require_nodes
from hetsched.planning.links import LinkProbe, link_transfer, probe_figures
from hetsched.planning.plan import ClusterSpec, TransferModel
from hetsched.planning.planner import plan_pipeline
from hetsched.runtime.pipeline import Pipeline

from .conftest import ROOT, manual_plan, topk5, wait_for
from .test_pipeline import costs_for, inputs, reference

RAY2 = {"placement": {"engine": "ray", "address": "127.0.0.2:26379"},
        "clusters": {"a": {"node": "board-a", "cores": [0]}, "b": {"node": "board-b", "cores": [0, 1]}}}


# ------------------------------------------------------------------------------------ config
def test_ray_placement_config_and_same_core_ids_on_two_nodes():
    cfg = parse_config(RAY2)
    assert cfg.placement.ray and cfg.placement.address == "127.0.0.2:26379"
    assert [(c.name, c.node, c.cores) for c in cfg.clusters] == [("a", "board-a", (0,)), ("b", "board-b", (0, 1))]
    assert not parse_config({}).placement.ray


@pytest.mark.parametrize("raw, message", [
    ({"placement": {"engine": "ray"}, "clusters": {"a": {"cores": [0]}}}, "clusters.a.node: missing"),
    ({"clusters": {"a": {"node": "board-a", "cores": [0]}}}, "clusters.a.node: only with placement.engine ray"),
    ({"placement": {"engine": "ray"}, "clusters": {"a": {"node": "no such/name", "cores": [0]}}},
     "clusters.a.node: 'no such/name' is not a node name"),
    ({"placement": {"engine": "ray"}, "clusters": {"a": {"node": 3, "cores": [0]}}}, "clusters.a.node: expected"),
    ({"placement": {"engine": "ray"}, "clusters": {"a": {"node": "n", "cores": [0]}, "b": {"node": "n", "cores": [0]}}},
     "clusters.b.cores[0]: core 0 is already in cluster 'a'"),
    ({"placement": {"engine": "kubernetes"}}, "placement.engine: must be one of local, ray"),
    ({"placement": {"engine": "ray", "address": " "}}, "placement.address: empty"),
    ({"placement": {"engine": "ray", "orphan_timeout_s": 0}}, "placement.orphan_timeout_s: must be between"),
    ({"placement": {"engin": "ray"}}, "placement.engin: unknown key"),
])
def test_placement_config_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError) as exc:
        parse_config(raw)
    assert message in str(exc.value)


# ------------------------------------------------------------------------------------ nodes
def ray_entry(node_id, ip, name=None, alive=True):
    res = {"CPU": 1.0, f"node:{ip}": 1.0}
    if name:
        res[node_resource(name)] = 1.0
    return {"NodeID": node_id, "NodeManagerAddress": ip, "Alive": alive, "Resources": res}


def test_nodes_are_the_alive_ones_with_a_hetsched_resource():
    nodes = nodes_from_ray([ray_entry("aa", "10.0.0.1", "board-a"), ray_entry("bb", "10.0.0.2", "board-b"),
                            ray_entry("cc", "10.0.0.3"), ray_entry("dd", "10.0.0.4", "board-c", alive=False)])
    assert {n: (x.node_id, x.ip) for n, x in nodes.items()} == {"board-a": ("aa", "10.0.0.1"),
                                                                "board-b": ("bb", "10.0.0.2")}
    assert nodes["board-a"].placement() == {"resources": {"hetsched_node_board-a": 0.001}}
    with pytest.raises(ConfigError, match="both declare hetsched_node_board-a"):
        nodes_from_ray([ray_entry("aa", "10.0.0.1", "board-a"), ray_entry("ee", "10.0.0.5", "board-a")])
    with pytest.raises(ConfigError, match=r"clusters.x.node: no alive Ray node declares hetsched_node_board-c "
                                          r"\(nodes: board-a, board-b\)"):
        require_nodes(nodes, [("x", "board-c")])


# ------------------------------------------------------------------------------------ core ids
def test_same_core_ids_on_two_nodes_are_planned_and_mapped_back(squeezenet):
    _, g = squeezenet
    clusters = [ClusterSpec("a", (0, 1)), ClusterSpec("b", (0, 1))]
    with pytest.raises(PlanError, match="core 0 belongs to both"):
        plan_pipeline(costs_for(g, {"a": (2, 1.0), "b": (2, 1.0)}), clusters)
    specs, core_map = planner_clusters(clusters, {"a": "board-a", "b": "board-b"})
    assert [s.cores for s in specs] == [(0, 1), (NODE_STRIDE, NODE_STRIDE + 1)]
    plan = plan_pipeline(costs_for(g, {"a": (2, 1.0), "b": (2, 1.0)}), specs, allow_replicas=False)
    real = core_map.localize(plan)
    assert {m.cluster for s in plan.stages for m in s.members} == {"a", "b"}
    assert all(c in (0, 1) for s in real.stages for m in s.members for c in m.cores)
    assert real.throughput_fps == plan.throughput_fps and len(real.stages) == len(plan.stages)
    # distinct ids (or one node): nothing is renumbered
    specs, core_map = planner_clusters([ClusterSpec("a", (0,)), ClusterSpec("b", (1,))], {"a": "x", "b": "y"})
    assert core_map.identity and [s.cores for s in specs] == [(0,), (1,)]


# ------------------------------------------------------------------------------------ link costs
def test_probe_figures_and_link_costs():
    p = probe_figures("n", [0.0002, 0.0002, 0.0009], [0.0022, 0.0022], 1 << 20)  # 2 MiB in 2 ms
    assert p.latency_ms == pytest.approx(0.1) and p.mib_per_s == pytest.approx(1000.0)
    base = TransferModel(0.03, 0.15)
    t = link_transfer(base, {"remote": p})
    assert t.for_cluster("local").cost_ms(1 << 20) == pytest.approx(base.cost_ms(1 << 20))
    assert t.for_cluster("remote").cost_ms(1 << 20) == pytest.approx(0.03 + 0.1 + 0.15 + 1.0)
    with pytest.raises(PlanError, match="bandwidth"):
        LinkProbe("n", 0.1, 0.0)


def test_the_planner_charges_a_slow_link_to_its_cluster(squeezenet):
    _, g = squeezenet
    costs = costs_for(g, {"here": (1, 1.0), "there": (1, 1.0)})
    clusters = [ClusterSpec("here", (0,)), ClusterSpec("there", (1,))]
    link = LinkProbe("n", 0.05, 1000.0)
    fast = plan_pipeline(costs, clusters, link_transfer(TransferModel(), {"there": link}), allow_pools=False)
    assert [m.cluster for s in fast.stages for m in s.members] == ["here", "there"]
    there = fast.stages[1]
    crossing = [g.boundary_bytes()[there.first_layer], g.boundary_bytes()[there.last_layer + 1]]
    assert there.members[0].transfer_ms == pytest.approx(sum(
        TransferModel().cost_ms(b) + link.latency_ms + b / (1 << 20) * 1000.0 / link.mib_per_s for b in crossing))
    assert fast.stages[0].members[0].transfer_ms == pytest.approx(sum(
        TransferModel().cost_ms(g.boundary_bytes()[b]) for b in (0, there.first_layer)))
    slow = plan_pipeline(costs, clusters, link_transfer(TransferModel(), {"there": LinkProbe("n", 500.0, 0.5)}),
                         allow_pools=False)
    assert [m.cluster for s in slow.stages for m in s.members] == ["here"]


# ------------------------------------------------------------------------------------ mixed links
def remote_clusters(*names):
    return lambda stage, worker, cores, cluster: "127.0.0.1" if cluster in names else None


@pytest.mark.timeout(240)
@pytest.mark.parametrize("remote", [("c1m0",), ("c0m0", "c2m0")], ids=["shm-tcp-shm", "tcp-shm-tcp"])
def test_mixed_links_equal_the_unsplit_model(squeezenet, remote):
    """Three stages, some linked by shared memory and some over tcp:// with CURVE: the coordinator moves
    tensors from ring slots into messages and back; outputs equal the unsplit model's."""
    model, g = squeezenet
    plan = manual_plan(g, [((0,), 0, 5, 1, 1), ((1,), 6, 14, 1, 1), ((0,), 15, len(g.layers) - 1, 1, 1)])
    xs = inputs(g, 10)
    want = reference(model, xs)
    with Pipeline(model, g, plan, transport="mixed", endpoint_host=remote_clusters(*remote), max_inflight=4,
                  topk=topk5()) as pipe:
        framed = [w.spec.in_ring is None for w in pipe.workers]
        assert framed == [w.cluster in remote for w in pipe.workers]
        assert all(w.spec.data_endpoint.startswith("tcp://127.0.0.1:") == f for w, f in zip(pipe.workers, framed))
        assert pipe.link_keys is not None
        got = list(pipe.run(xs, timeout=60))
    assert len(got) == len(xs)
    for r, w in zip(got, want):
        assert r.error is None and np.abs(r.outputs[0] - w).max() <= 1e-4
        assert r.top[0] == int(np.argmax(w))


# ------------------------------------------------------------------------------------ liveness
COORDINATOR = textwrap.dedent("""
    import dataclasses, sys, time
    from hetsched.model.graph import analyze
    from hetsched.model.squeezenet import build_squeezenet11
    from hetsched.runtime.pipeline import Pipeline
    from hetsched.runtime.workers import local_launcher
    from tests.conftest import manual_plan

    def launcher(spec):  # as a Ray launcher does: the worker follows its link, not its parent
        return local_launcher(dataclasses.replace(spec, orphan_timeout=1.0))

    model = build_squeezenet11()
    g = analyze(model)
    plan = manual_plan(g, [((0,), 0, 10, 1, 1), ((1,), 11, len(g.layers) - 1, 1, 1)])
    with Pipeline(model, g, plan, transport="tcp", launcher=launcher, heartbeat_timeout=5.0) as pipe:
        print("PIDS", *[w.pid for w in pipe.workers], flush=True)
        t_end = time.monotonic() + 3.0          # idle for 3 x the orphan timeout: nobody may leave
        while time.monotonic() < t_end:
            pipe.poll(100)
        alive = [w.process.is_alive() for w in pipe.workers]
        print("ALIVE" if all(alive) else f"GONE {alive}", flush=True)
        sys.stdin.readline()                    # until the test kills us
""")


@pytest.mark.timeout(120)
def test_remote_workers_stay_while_the_link_is_up_and_exit_when_the_coordinator_is_killed():
    proc = subprocess.Popen([sys.executable, "-c", COORDINATOR], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("PIDS"), line + proc.stderr.read()
        workers = [psutil.Process(int(p)) for p in line.split()[1:]]
        assert proc.stdout.readline().strip() == "ALIVE"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers),
                 timeout=15, what="workers whose coordinator was killed to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_local_only_commands_refuse_a_ray_config():
    from hetsched.config import resolve_clusters
    from hetsched.host.topology import detect_topology
    with pytest.raises(ConfigError, match="placement.engine: ray places clusters on Ray nodes"):
        resolve_clusters(parse_config(RAY2), detect_topology())
