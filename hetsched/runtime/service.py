"""From a config to a running pipeline: topology -> clusters -> emulation -> model -> costs -> plan.

This is the coordinator's set-up sequence, shared by ``hetsched plan``, ``start``, ``profile`` and
the benchmark. Every step reports progress through a callback; nothing here prints.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import onnx

from hetsched.config import Config, resolve_clusters
import dataclasses

from hetsched.planning.costs import (DEFAULT_PREPROCESS_MS, TYPICAL_ENCODED_BYTES, ClusterMeasurement,
                            coordinator_ms, cost_table_from_measurements, flop_cost_table, flop_sanity,
                            with_coordinator_overhead, with_preprocess_layer)
from hetsched.model.graph import ModelGraph, analyze, load_model
from hetsched.planning.planner import ClusterSpec, CostTable, Plan, TransferModel, plan_pipeline
from hetsched.host.topology import Cluster, Topology, detect_topology

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass
class Prepared:
    config: Config
    topology: Topology
    clusters: list[Cluster]
    model: onnx.ModelProto
    graph: ModelGraph
    measurements: list[ClusterMeasurement]
    costs: CostTable
    plan: Plan
    transfer: TransferModel
    warnings: list[str] = field(default_factory=list)
    with_preprocess: bool = False  # layer 0 of the plan is image preprocessing
    coordinator_cores: tuple[int, ...] = ()  # where the coordinator process runs (pinned)

    def cluster_specs(self) -> list[ClusterSpec]:
        return [ClusterSpec(c.name, c.cores) for c in self.clusters]

    def replan(self, **kw) -> Plan:
        p = self.config.planner
        args = dict(max_stages=p.max_stages, tie_tolerance=p.tie_tolerance, allow_replicas=p.allow_replicas,
                    forced_cuts=p.forced_cuts)
        args.update(kw)
        return plan_pipeline(self.costs, self.cluster_specs(), self.transfer, **args)

    def limit_fps(self) -> float:
        """Sum over cores of each core's standalone single-thread throughput (from the profile)."""
        total = 0.0
        for m in self.measurements:
            if m.whole_ms.get(1):
                total += len(m.cores) * 1000.0 / m.whole_ms[1]
        return total


def emulated_cores(clusters: Sequence[Cluster], period_ms: float | None = None) -> list:
    from hetsched.host.emulation import EmulatedCore
    out = []
    for c in clusters:
        if c.emulated_speed is not None and c.emulated_speed < 1.0:
            for core in c.cores:
                out.append(EmulatedCore(core, c.emulated_speed, period_ms) if period_ms
                           else EmulatedCore(core, c.emulated_speed))
    return out


@contextlib.contextmanager
def emulation(clusters: Sequence[Cluster], period_ms: float | None = None,
              progress: Progress | None = None) -> Iterator[object]:
    """Start duty-cycle co-runners for emulated clusters; always stopped (by PID) on exit."""
    cores = emulated_cores(clusters, period_ms)
    if not cores:
        yield None
        return
    from hetsched.host.emulation import Emulator
    emu = Emulator(cores)
    emu.start()
    if progress:
        for ec in cores:
            progress(f"emulating a slow core: core {ec.core} delivers {ec.speed:.0%} of its cycles "
                     f"(real-time duty-cycle co-runner)")
    try:
        yield emu
    finally:
        emu.stop()


def prepare(cfg: Config, *, progress: Progress | None = None, sysfs_root: str = "/sys",
            use_cache: bool | None = None, clusters: list[Cluster] | None = None,
            with_preprocess: bool = False) -> Prepared:
    """Everything up to the plan. Call inside ``emulation(...)`` so costs see the emulated speed."""
    note = progress or (lambda msg: None)
    topo = detect_topology(sysfs_root)
    clusters = clusters if clusters is not None else resolve_clusters(cfg, topo)
    model = load_model(cfg.model)
    graph = analyze(model, cfg.planner.max_cut_tensors)
    note(f"model {cfg.model}: {len(model.graph.node)} nodes, {len(graph.layers)} layers between cut points")
    warnings: list[str] = []
    bbytes = graph.boundary_bytes()
    if cfg.profile.measure:
        from hetsched.profiling.measure import measure_clusters_checked
        checked = measure_clusters_checked(model, graph, clusters, repeats=cfg.profile.repeats,
                                           warmup=cfg.profile.warmup,
                                           use_cache=cfg.profile.cache if use_cache is None else use_cache,
                                           cache_dir=cfg.profile.cache_dir, progress=note,
                                           preprocess=dataclasses.asdict(cfg.input) if with_preprocess else None,
                                           tolerance=cfg.profile.cache_tolerance)
        measurements = checked.measurements
        warnings += checked.warnings
        costs = cost_table_from_measurements(graph.layer_names, bbytes, measurements)
        for m in measurements:
            odd = flop_sanity(graph.layer_names, [lay.flops for lay in graph.layers], costs.layer_ms[m.cluster][1])
            warnings += [f"cluster {m.cluster}: {w}" for w in odd]
            note(f"cluster {m.cluster}: whole model {m.whole_ms[1]:.2f} ms on 1 thread"
                 + "".join(f", {m.whole_ms[t]:.2f} ms on {t}" for t in m.whole_ms if t != 1)
                 + (f"; preprocessing {m.preprocess_ms:.2f} ms" if m.preprocess_ms else ""))
        if with_preprocess:
            costs = with_preprocess_layer(costs, {m.cluster: m.preprocess_ms for m in measurements})

    else:
        measurements = []
        costs = flop_cost_table(graph.layer_names, bbytes, [lay.flops for lay in graph.layers],
                                [(c.name, len(c.cores), c.emulated_speed or c.speed) for c in clusters])
        if with_preprocess:
            costs = with_preprocess_layer(costs, {c.name: DEFAULT_PREPROCESS_MS / (c.emulated_speed or c.speed)
                                                  for c in clusters})
    home = coordinator_cluster(clusters)
    in_bytes = TYPICAL_ENCODED_BYTES if with_preprocess else bbytes[0]
    costs = with_coordinator_overhead(costs, home.name, len(home.cores), coordinator_ms(in_bytes))
    transfer = TransferModel()
    p = cfg.planner
    plan = plan_pipeline(costs, [ClusterSpec(c.name, c.cores) for c in clusters], transfer,
                         max_stages=p.max_stages, tie_tolerance=p.tie_tolerance, allow_replicas=p.allow_replicas,
                         forced_cuts=p.forced_cuts)
    if cfg.profile.measure and cfg.profile.refine and measurements:
        costs, plan = refine_plan(cfg, model, graph, clusters, measurements, costs, plan, transfer,
                                  1 if with_preprocess else 0, note,
                                  cfg.profile.cache if use_cache is None else use_cache)
    return Prepared(cfg, topo, list(clusters), model, graph, measurements, costs, plan, transfer, warnings,
                    with_preprocess, tuple(home.cores))


def refine_plan(cfg: Config, model, graph: ModelGraph, clusters, measurements, costs: CostTable, plan: Plan,
                transfer: TransferModel, offset: int, note: Progress, use_cache: bool) -> tuple[CostTable, Plan]:
    """Time the planned stages as whole sub-models on their clusters, scale the layers' costs by
    measured/predicted, and plan again (up to ``profile.refine`` rounds, until the plan holds).

    Layers timed one by one miss what a whole stage does (fusion across layer boundaries, cache
    reuse, per-run overheads); this closes most of that gap for the stages actually chosen."""
    from hetsched.profiling.measure import measure_stages
    from hetsched.planning.costs import rescale_range
    p = cfg.planner
    empty = {m.cluster: m.empty_ms for m in measurements}
    seen: set = set()
    for _ in range(cfg.profile.refine):
        reqs = []
        for st in plan.stages:
            first, last = max(st.first_layer, offset), st.last_layer
            if last >= first and (st.cluster, first, last, st.threads) not in seen:
                reqs.append((st.cluster, first - offset, last - offset, st.threads))
        if not reqs:
            break
        timed = measure_stages(model, graph, clusters, reqs, repeats=max(10, cfg.profile.repeats // 2),
                               warmup=cfg.profile.warmup, use_cache=use_cache, cache_dir=cfg.profile.cache_dir,
                               progress=note)
        for (c, gf, gl, t), ms in timed.items():
            seen.add((c, gf + offset, gl + offset, t))
            predicted = sum(costs.layer_ms[c][t][gf + offset:gl + offset + 1])
            measured = max(0.0, ms - empty[c].get(t, empty[c][1]))
            if predicted > 0 and abs(measured / predicted - 1.0) > 0.02:
                note(f"cluster {c}: layers {gf + offset}..{gl + offset} take {measured:.2f} ms as one stage, "
                     f"predicted {predicted:.2f}: correcting")
                costs = rescale_range(costs, c, gf + offset, gl + offset, measured / predicted)
        new = plan_pipeline(costs, [ClusterSpec(c.name, c.cores) for c in clusters], transfer,
                            max_stages=p.max_stages, tie_tolerance=p.tie_tolerance, allow_replicas=p.allow_replicas,
                            forced_cuts=p.forced_cuts)
        same = [(s.cluster, s.first_layer, s.last_layer, s.threads) for s in new.stages] == \
               [(s.cluster, s.first_layer, s.last_layer, s.threads) for s in plan.stages]
        plan = new
        if same:
            break
    return costs, plan


def coordinator_cluster(clusters: Sequence[Cluster]) -> Cluster:
    """The fastest cluster (emulated speed counts): the coordinator is pinned there."""
    return max(clusters, key=lambda c: (c.emulated_speed or c.speed, -clusters.index(c)))


def pin_coordinator(clusters: Sequence[Cluster]) -> tuple[int, ...]:
    """Pin the calling thread (call it before any other thread starts) to the fastest cluster."""
    import os
    cores = tuple(coordinator_cluster(clusters).cores)
    os.sched_setaffinity(0, cores)
    return cores


@contextlib.contextmanager
def running_service(prep: Prepared, bind: str | None = None, *, with_preprocess: bool = True,
                    max_inflight: int | None = None):
    """Start the pipeline's workers and the client socket; stop both on exit (workers reaped).

    The config's ``security`` (CURVE keys, bind policy) and ``limits`` apply to the client socket;
    the image limits also to the decoding stage. A bind that the security policy refuses fails
    before any worker starts."""
    from hetsched.runtime.pipeline import Pipeline
    from hetsched.model.preprocess import ImageLimits
    from hetsched.wire.security import SecuritySettings, check_bind
    from hetsched.server.front import Server, ServerLimits, check_limits

    cfg = prep.config
    bind = bind or cfg.server.bind
    security = SecuritySettings.from_config(cfg.security)
    if not security.insecure:  # refuse before any worker starts (the insecure warning is the Server's)
        check_bind(bind, security, "server.bind")
    limits = ServerLimits(max_pending=cfg.server.max_pending, **cfg.limits.server_overrides())
    image_limits = ImageLimits(**cfg.limits.image_overrides())
    check_limits(limits, image_limits, prep.graph.inputs[0])
    pipe = Pipeline(prep.model, prep.graph, prep.plan, transport=cfg.transport.kind, host=cfg.transport.host,
                    hwm=cfg.transport.hwm, max_inflight=max_inflight or cfg.server.max_inflight,
                    preprocess=cfg.input if prep.with_preprocess else None, image_limits=image_limits)
    server = None
    try:
        pipe.start()
        server = Server(pipe, bind, labels_path=cfg.input.labels, top_k=cfg.input.top_k,
                        limits=limits, image_limits=image_limits, security=security)
        yield server
    finally:
        if server is not None:
            server.close()
        pipe.stop(drain_timeout=0)
