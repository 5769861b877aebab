"""From a config to a running pipeline: topology -> clusters -> emulation -> model -> costs -> plan.

This is the coordinator's set-up sequence, shared by ``hetsched plan``, ``start``, ``profile`` and
the benchmark. Every step reports progress through a callback; nothing here prints.

Where workers run comes from ``placement_for``: this host (``placement.engine: local``), or the Ray
nodes the clusters name (``ray``: ``hetsched.placement.ray_placement.RayPlacement``, which also
profiles each cluster on its node, probes each node's link for the planner's transfer costs and
gives the pipeline its launcher).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import onnx

from hetsched.config import Config, resolve_clusters
import dataclasses

from hetsched.planning.costs import (DEFAULT_PREPROCESS_MS, ClusterMeasurement, coordinator_ms,
                                     cost_table_from_measurements, flop_cost_table, flop_sanity,
                                     with_coordinator_overhead, with_input_work)
from hetsched.model.graph import ModelGraph, analyze, load_model
from hetsched.planning.planner import ClusterSpec, CostTable, Plan, TransferModel, plan_pipeline
from hetsched.host.topology import Cluster, Topology, detect_topology
from hetsched.placement.cores import CoreMap

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
    with_preprocess: bool = False  # stage 0's workers also decode encoded images
    coordinator_cores: tuple[int, ...] = ()  # where the coordinator process runs (pinned)
    preprocess_ms: dict = field(default_factory=dict)  # cluster -> ms to decode + preprocess one typical image
    encoded_share: float = 0.0     # share of encoded (JPEG/PNG) frames the plan was made for
    placement: Any = None          # None: this host; a hetsched.placement.ray_placement.RayPlacement
    core_map: CoreMap = field(default_factory=CoreMap)  # planner core ids -> real ones (several nodes)

    def cluster_specs(self) -> list[ClusterSpec]:
        """The clusters as the planner sees them (core ids unique across nodes)."""
        return planner_specs(self.clusters, self.placement)[0]

    def replan(self, **kw) -> Plan:
        return self.core_map.localize(make_plan(self.config, self.costs, self.cluster_specs(), self.transfer, **kw))

    def limit_fps(self, traffic: str = "raw") -> float:
        """The machine's limit for ``traffic`` ("raw" or "encoded"), from the profile
        (``hetsched.observe.metrics``: the same definition as every report)."""
        from hetsched.observe import metrics
        return metrics.limit_fps(metrics.core_rates_fps(self.measurements, traffic)) or 0.0


@contextlib.contextmanager
def placement_for(cfg: Config, sysfs_root: str = "/sys") -> Iterator[tuple[list[Cluster], Any]]:
    """The clusters to run on and where they are: (clusters, None) on this host, or (clusters, a
    RayPlacement) with ``placement.engine: ray`` (connected to Ray until the block ends)."""
    if not cfg.placement.ray:
        yield resolve_clusters(cfg, detect_topology(sysfs_root)), None
        return
    from hetsched.placement.ray_placement import RayPlacement
    with RayPlacement(cfg) as placement:
        yield placement.clusters, placement


def local_clusters(clusters: Sequence[Cluster], placement: Any = None) -> list[Cluster]:
    """The clusters on this host (all of them without a placement)."""
    return list(clusters) if placement is None else placement.local_clusters


def planner_specs(clusters: Sequence[Cluster], placement: Any = None) -> tuple[list[ClusterSpec], CoreMap]:
    if placement is None:
        return [ClusterSpec(c.name, c.cores) for c in clusters], CoreMap()
    return placement.planner_clusters()


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


def encoded_share(cfg: Config, encoded: bool = False) -> float:
    """The share of encoded (JPEG/PNG) frames to plan for: ``planner.traffic`` (auto plans for raw
    tensors until the service sees what clients send; ``encoded`` forces JPEG)."""
    return 1.0 if encoded or cfg.planner.traffic == "encoded" else 0.0


def make_plan(cfg: Config, costs: CostTable, clusters: Sequence[ClusterSpec], transfer: TransferModel,
              **overrides) -> Plan:
    """The planner with the config's settings (``overrides`` win)."""
    p = cfg.planner
    args = dict(max_stages=p.max_stages, tie_tolerance=p.tie_tolerance, allow_replicas=p.allow_replicas,
                allow_pools=p.allow_pools, forced_cuts=p.forced_cuts, objective=p.objective, target_fps=p.target_fps)
    args.update(overrides)
    return plan_pipeline(costs, clusters, transfer, **args)


def prepare(cfg: Config, *, progress: Progress | None = None, sysfs_root: str = "/sys",
            use_cache: bool | None = None, clusters: list[Cluster] | None = None,
            with_preprocess: bool = False, encoded_share: float = 0.0, placement: Any = None) -> Prepared:
    """Everything up to the plan. Call inside ``emulation(...)`` so costs see the emulated speed.

    ``with_preprocess``: stage 0 also decodes images (its cost is measured per cluster);
    ``encoded_share``: the share of encoded frames to plan for (0: raw tensors, 1: all JPEG);
    ``placement``: from ``placement_for`` (None: every cluster on this host)."""
    note = progress or (lambda msg: None)
    topo = detect_topology(sysfs_root)
    if placement is not None:
        clusters = clusters if clusters is not None else placement.clusters
    clusters = clusters if clusters is not None else resolve_clusters(cfg, topo)
    runner = placement.profile_runner() if placement is not None else None
    model = load_model(cfg.model, cfg.model_input.shape)
    graph = analyze(model, cfg.planner.max_cut_tensors)
    note(f"model {cfg.model}: {len(model.graph.node)} nodes, {len(graph.layers)} layers between cut points")
    warnings: list[str] = []
    if with_preprocess:  # input.layout/dtype "auto" follow the model's input
        from hetsched.errors import ConfigError
        from hetsched.model.inputs import resolve_input_config
        try:
            cfg = cfg.with_overrides(input=resolve_input_config(cfg.input, graph.inputs[0]))
        except ConfigError as exc:
            warnings.append(f"images cannot be made into this model's input ({exc}): the service takes raw tensors "
                            "only")
            note(warnings[-1])
            with_preprocess = False
    bbytes = graph.boundary_bytes()
    if cfg.profile.measure:
        from hetsched.profiling.measure import measure_clusters_checked
        checked = measure_clusters_checked(model, graph, clusters, repeats=cfg.profile.repeats,
                                           warmup=cfg.profile.warmup,
                                           use_cache=cfg.profile.cache if use_cache is None else use_cache,
                                           cache_dir=cfg.profile.cache_dir, progress=note,
                                           preprocess=dataclasses.asdict(cfg.input) if with_preprocess else None,
                                           tolerance=cfg.profile.cache_tolerance, runner=runner)
        measurements = checked.measurements
        warnings += checked.warnings
        costs = cost_table_from_measurements(graph.layer_names, bbytes, measurements)
        for m in measurements:
            odd = flop_sanity(graph.layer_names, [lay.flops for lay in graph.layers], costs.layer_ms[m.cluster][1])
            warnings += [f"cluster {m.cluster}: {w}" for w in odd]
            note(f"cluster {m.cluster}: whole model {m.whole_ms[1]:.2f} ms on 1 thread"
                 + "".join(f", {m.whole_ms[t]:.2f} ms on {t}" for t in m.whole_ms if t != 1)
                 + (f"; preprocessing {m.preprocess_ms:.2f} ms" if m.preprocess_ms else ""))
        prep_ms = {m.cluster: m.preprocess_ms or 0.0 for m in measurements}
    else:
        measurements = []
        costs = flop_cost_table(graph.layer_names, bbytes, [lay.flops for lay in graph.layers],
                                [(c.name, len(c.cores), c.emulated_speed or c.speed) for c in clusters])
        prep_ms = {c.name: DEFAULT_PREPROCESS_MS / (c.emulated_speed or c.speed) for c in clusters}
    if not with_preprocess:
        prep_ms, encoded_share = {}, 0.0
    costs = with_input_work(costs, {c: encoded_share * ms for c, ms in prep_ms.items()})
    here = local_clusters(clusters, placement)
    home = coordinator_cluster(here) if here else None  # no cluster on the coordinator's host: no share
    if home is not None:
        costs = with_coordinator_overhead(costs, home.name, len(home.cores), coordinator_ms())
    transfer = TransferModel() if placement is None else placement.transfer(TransferModel(), note)
    specs, core_map = planner_specs(clusters, placement)
    plan = core_map.localize(make_plan(cfg, costs, specs, transfer))
    if cfg.profile.measure and cfg.profile.refine and measurements:
        costs, plan = refine_plan(cfg, model, graph, clusters, measurements, costs, plan, transfer, note,
                                  cfg.profile.cache if use_cache is None else use_cache, specs, core_map, runner)
    return Prepared(cfg, topo, list(clusters), model, graph, measurements, costs, plan, transfer, warnings,
                    with_preprocess, tuple(home.cores) if home else (), prep_ms, encoded_share, placement, core_map)


def refine_plan(cfg: Config, model, graph: ModelGraph, clusters, measurements, costs: CostTable, plan: Plan,
                transfer: TransferModel, note: Progress, use_cache: bool, specs: Sequence[ClusterSpec] | None = None,
                core_map: CoreMap = CoreMap(), runner: Any = None) -> tuple[CostTable, Plan]:
    """Time the planned stages as whole sub-models on the clusters of their pool members, scale the
    layers' costs by measured/predicted, and plan again (up to ``profile.refine`` rounds, until the
    plan holds).

    Layers timed one by one miss what a whole stage does (fusion across layer boundaries, cache
    reuse, per-run overheads); this closes most of that gap for the stages actually chosen."""
    from hetsched.planning.costs import rescale_range
    from hetsched.profiling.measure import measure_stages
    empty = {m.cluster: m.empty_ms for m in measurements}
    specs = specs if specs is not None else [ClusterSpec(c.name, c.cores) for c in clusters]
    seen: set = set()
    for _ in range(cfg.profile.refine):
        reqs = sorted({(m.cluster, st.first_layer, st.last_layer, m.threads) for st in plan.stages
                       for m in st.members} - seen)
        if not reqs:
            break
        timed = measure_stages(model, graph, clusters, reqs, repeats=max(10, cfg.profile.repeats // 2),
                               warmup=cfg.profile.warmup, use_cache=use_cache, cache_dir=cfg.profile.cache_dir,
                               progress=note, runner=runner)
        for (c, first, last, t), ms in timed.items():
            seen.add((c, first, last, t))
            predicted = sum(costs.layer_ms[c][t][first:last + 1])
            measured = max(0.0, ms - empty[c].get(t, empty[c][1]))
            if predicted > 0 and abs(measured / predicted - 1.0) > 0.02:
                note(f"cluster {c}: layers {first}..{last} take {measured:.2f} ms as one stage, "
                     f"predicted {predicted:.2f}: correcting")
                costs = rescale_range(costs, c, first, last, measured / predicted)
        new = core_map.localize(make_plan(cfg, costs, specs, transfer))
        same = new.shape() == plan.shape()
        plan = new
        if same:
            break
    return costs, plan


def topk_spec(model: onnx.ModelProto, graph: ModelGraph, k: int, configured: str | None = None):
    """What the last stage reports: the top-k of the output named by ``model_output.top_k_from`` (or
    the first class-vector output), softmax unless the model already ends in Softmax; None when the
    model has no class-vector output (a detector: results then carry only what ``outputs`` asks)."""
    from hetsched.errors import ModelError
    from hetsched.model.outputs import output_is_probability, topk_output_index
    from hetsched.runtime.spec import TopkSpec
    try:
        i = topk_output_index(graph, configured)
    except ModelError:
        if configured is not None:
            raise
        return None
    return TopkSpec(i, k, apply_softmax=not output_is_probability(model, graph.outputs[i].name))


def coordinator_cluster(clusters: Sequence[Cluster]) -> Cluster:
    """The fastest cluster (emulated speed counts): the coordinator is pinned there."""
    return max(clusters, key=lambda c: (c.emulated_speed or c.speed, -clusters.index(c)))


def pin_coordinator(clusters: Sequence[Cluster]) -> tuple[int, ...]:
    """Pin the calling thread (call it before any other thread starts) to the fastest cluster; with
    no cluster on this host (the coordinator of Ray nodes elsewhere) it stays unpinned: ()."""
    import os
    if not clusters:
        return ()
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
    from hetsched.model.preprocess import ImageLimits
    from hetsched.planning.planner import evaluate_stages
    from hetsched.runtime.pipeline import Pipeline
    from hetsched.runtime.runtime import ReplanSettings, Runtime
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
    topk = topk_spec(prep.model, prep.graph, cfg.input.top_k, cfg.model_output.top_k_from)

    # where workers run and how they are linked (this host by default; Ray nodes: hetsched.placement)
    placed = {"transport": cfg.transport.kind, "host": cfg.transport.host}
    if prep.placement is not None:
        placed = prep.placement.pipeline_options()

    def make_pipeline(plan: Plan, generation: int, frame_ids) -> Pipeline:
        return Pipeline(prep.model, prep.graph, plan, max_inflight=max_inflight or cfg.server.max_inflight,
                        preprocess=cfg.input if prep.with_preprocess else None, image_limits=image_limits,
                        topk=topk, frame_ids=frame_ids, generation=generation,
                        direct_lane=cfg.server.direct_lane, **placed)

    specs, localize = prep.cluster_specs(), prep.core_map.localize
    rp = cfg.planner.replan
    pipe = Runtime(prep.plan, make_pipeline, base_costs=prep.costs,
                   plan_fn=lambda costs: localize(make_plan(cfg, costs, specs, prep.transfer)),
                   evaluate_fn=lambda costs, a: localize(evaluate_stages(costs, specs, prep.transfer, a,
                                                                         objective=cfg.planner.objective,
                                                                         target_fps=cfg.planner.target_fps)),
                   preprocess_ms=prep.preprocess_ms, encoded_share=prep.encoded_share,
                   settings=ReplanSettings(rp.enabled, rp.check_s, rp.min_gain, rp.threshold, cfg.planner.tie_tolerance),
                   follow_traffic=cfg.planner.traffic == "auto" and prep.with_preprocess)
    server = None
    try:
        pipe.start()
        server = Server(pipe, bind, labels_path=cfg.input.labels,
                        limits=limits, image_limits=image_limits, security=security)
        yield server
    finally:
        if server is not None:
            server.close()
        pipe.stop(drain_timeout=0)
