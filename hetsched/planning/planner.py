"""Planner: split a layer chain into contiguous stages, each served by a pool of workers.

Pure code: no I/O, no zmq/onnx/onnxruntime imports. Inputs and outputs are frozen dataclasses
(``hetsched.planning.plan``).

Model
-----
The network is a chain of ``n`` layers (the units between graph cut points). A plan cuts the
chain into contiguous stages. A stage is served by a *pool*: on each cluster ``k`` it may use
``m_k`` cores as ``r_k`` workers of ``t_k`` intra-op threads (``r_k * t_k = m_k``); a frame goes to
whichever worker of the pool is free first. Cores are never shared between stages and not every
core has to be used, so one replica per core across all clusters ("per-core replicas"), the
big cluster alone, a pipeline of one worker per stage and every hybrid are points of one space.

For a worker on cluster ``k`` with ``t`` threads serving layers ``i..j``::

    compute_ms = sum(layer_ms[k][t][i..j]) + stage_overhead_ms[k] (+ input_ms[k] if i == 0)
    service_ms = compute_ms + transfer(boundary i) + transfer(boundary j+1)

A pool's rate is the sum of its workers' rates (``r_k * 1000 / service_ms``); its period (ms per
frame when saturated) is ``1000 / rate``. Its latency: **p99 = the slowest member's service time**
(a frame that lands on it takes that long), p50 = the service time of the member that serves the
median frame when frames are shared in proportion to rate. A plan's p99/p50 are the sums over its
stages (queueing between stages is not modelled).

Objectives (both exact):

* ``throughput`` (default): maximise the pipeline rate (minimise the bottleneck period); among
  plans within ``tie_tolerance`` of the best rate, take the lowest p99.
* ``latency`` with ``target_fps``: the lowest p99 among plans that sustain ``target_fps`` (e.g. a
  30 fps camera gets the big cores only). If no plan sustains it, the best-throughput plan is
  returned with a note.

Remaining ties: fewer stages, then fewer cores.

Algorithm
---------
Two dynamic programs over ``(layer prefix e, cores used per cluster u, stages s)`` (``u`` a
mixed-radix index), vectorised with numpy over ``u``, ``s`` and the first layer ``i`` of the last
stage; a transition is one pool choice (a "combo": per cluster none or ``(m, r, t)``):

1. ``G1[e, u, s]`` = minimal bottleneck period covering layers ``0..e-1``; ``B* = min G1[n]``.
2. With ``B = B* (1 + tie_tolerance)`` (or ``1000 / target_fps``), pools with a period above ``B``
   are forbidden and ``G2[e, u, s]`` = minimal summed p99; back-pointers give the plan.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from hetsched.errors import PlanError
from hetsched.planning.plan import (ClusterSpec, CostTable, Member, Plan, Stage, StageSpec, TransferModel,
                                    format_plan)

__all__ = ["ClusterSpec", "CostTable", "TransferModel", "Member", "Stage", "StageSpec", "Plan",
           "plan_pipeline", "evaluate_stages", "format_plan", "OBJECTIVES"]

OBJECTIVES = ("throughput", "latency")
_REL_EPS = 1e-9


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def _check_inputs(costs: CostTable, clusters: Sequence[ClusterSpec]) -> int:
    n = len(costs.layer_names)
    if n == 0:
        raise PlanError("cost table has no layers")
    if len(costs.boundary_bytes) != n + 1:
        raise PlanError(f"boundary_bytes has {len(costs.boundary_bytes)} entries, expected n_layers+1 = {n + 1}")
    for b, nb in enumerate(costs.boundary_bytes):
        if not (isinstance(nb, (int, np.integer)) or float(nb).is_integer()) or nb < 0:
            raise PlanError(f"boundary_bytes[{b}] = {nb!r} is not a non-negative integer")
    names = [c.name for c in clusters]
    if len(set(names)) != len(names):
        raise PlanError(f"duplicate cluster names: {names}")
    seen: dict[int, str] = {}
    for c in clusters:
        if len(set(c.cores)) != len(c.cores):
            raise PlanError(f"cluster {c.name!r} lists a core twice: {c.cores}")
        for core in c.cores:
            if core in seen:
                raise PlanError(f"core {core} belongs to both cluster {seen[core]!r} and {c.name!r}")
            seen[core] = c.name
        if not c.cores:
            continue
        if c.name not in costs.layer_ms:
            raise PlanError(f"cost table has no layer_ms for cluster {c.name!r}")
        for t, row in costs.layer_ms[c.name].items():
            if len(row) != n:
                raise PlanError(f"layer_ms[{c.name!r}][{t}] has {len(row)} entries, expected {n} (one per layer)")
            for li, v in enumerate(row):
                fv = float(v)
                if not math.isfinite(fv) or fv < 0:
                    raise PlanError(f"layer_ms[{c.name!r}][{t}][{li}] = {v!r} is not a finite non-negative number")
        for what, table in (("stage_overhead_ms", costs.stage_overhead_ms), ("input_ms", costs.input_ms)):
            ov = float(table.get(c.name, 0.0))
            if not math.isfinite(ov) or ov < 0:
                raise PlanError(f"{what}[{c.name!r}] = {ov!r} is not a finite non-negative number")
    return n


def _normalise_cuts(forced_cuts: Sequence[int], n: int) -> list[int]:
    cuts: list[int] = []
    for c in forced_cuts:
        try:
            ci = int(c)
        except (TypeError, ValueError) as exc:
            raise PlanError(f"forced cut {c!r} is not an integer") from exc
        if ci != c:
            raise PlanError(f"forced cut {c!r} is not an integer")
        if not 1 <= ci <= n - 1:
            raise PlanError(f"forced cut {ci} out of range: cuts are boundaries 1..{n - 1}")
        cuts.append(ci)
    if len(set(cuts)) != len(cuts):
        raise PlanError(f"duplicate forced cuts: {list(forced_cuts)}")
    return sorted(cuts)


# ---------------------------------------------------------------------------------------------
# the cost of one worker
# ---------------------------------------------------------------------------------------------


def _service_matrix(costs: CostTable, cluster: str, threads: int, transfer: TransferModel) -> np.ndarray:
    """(n, n) service ms of one worker serving layers i..j (inf where j < i)."""
    n = costs.n_layers
    row = np.asarray(costs.layer_ms[cluster][threads], dtype=float)
    cum = np.concatenate(([0.0], np.cumsum(row)))
    transfer = transfer.for_cluster(cluster)  # a worker on another node crosses its link (planning.links)
    tc = np.array([transfer.cost_ms(b) for b in costs.boundary_bytes], dtype=float)
    svc = cum[None, 1:] - cum[:-1, None] + float(costs.stage_overhead_ms.get(cluster, 0.0))
    svc = svc + tc[:n, None] + tc[None, 1:]
    svc[0, :] += float(costs.input_ms.get(cluster, 0.0))
    svc[np.tril(np.ones((n, n), dtype=bool), k=-1)] = np.inf
    return svc


def _member(costs: CostTable, transfer: TransferModel, cluster: str, cores: tuple[int, ...], first: int,
            last: int, threads: int, replicas: int) -> Member:
    row = costs.layer_ms[cluster][threads]
    layers = math.fsum(float(row[i]) for i in range(first, last + 1))
    compute = layers + float(costs.stage_overhead_ms.get(cluster, 0.0))
    if first == 0:
        compute += float(costs.input_ms.get(cluster, 0.0))
    transfer = transfer.for_cluster(cluster)
    xfer = transfer.cost_ms(costs.boundary_bytes[first]) + transfer.cost_ms(costs.boundary_bytes[last + 1])
    return Member(cluster, tuple(cores), threads, replicas, compute, xfer, layers)


# ---------------------------------------------------------------------------------------------
# evaluate a given assignment
# ---------------------------------------------------------------------------------------------


def evaluate_stages(costs: CostTable, clusters: Sequence[ClusterSpec], transfer: TransferModel | None,
                    assignment: Sequence, *, objective: str = "throughput", target_fps: float | None = None,
                    notes: tuple[str, ...] = ()) -> Plan:
    """A Plan from explicit stages. Each entry is a ``StageSpec(first, last, members)`` whose members
    are ``(cluster, n_cores, threads, replicas)``, or the one-cluster shorthand
    ``(cluster, n_cores, first_layer, last_layer, threads, replicas)``.

    Core ids are taken in order from each cluster's core list, stage by stage and member by member.
    Raises PlanError if stages are not contiguous, do not cover every layer once, or overuse a cluster.
    """
    transfer = transfer or TransferModel()
    n = _check_inputs(costs, clusters)
    by_name = {c.name: c for c in clusters}
    if not assignment:
        raise PlanError("empty assignment: at least one stage is needed")
    next_core = {c.name: 0 for c in clusters}
    stages: list[Stage] = []
    expected_first = 0
    for idx, entry in enumerate(assignment):
        spec = _as_stage_spec(idx, entry)
        first, last = spec.first_layer, spec.last_layer
        if first != expected_first:
            if expected_first == 0:
                raise PlanError(f"stage {idx}: first stage must start at layer 0, starts at {first}")
            raise PlanError(f"stage {idx}: starts at layer {first} but the previous stage ended at layer "
                            f"{expected_first - 1} (stages must be contiguous)")
        if last < first:
            raise PlanError(f"stage {idx}: last_layer {last} < first_layer {first}")
        if last >= n:
            raise PlanError(f"stage {idx}: last_layer {last} out of range (model has {n} layers)")
        if not spec.members:
            raise PlanError(f"stage {idx}: needs at least one worker")
        members = []
        for cname, n_cores, threads, replicas in spec.members:
            if cname not in by_name:
                raise PlanError(f"stage {idx}: unknown cluster {cname!r} (known: {sorted(by_name)})")
            if n_cores < 1:
                raise PlanError(f"stage {idx}: needs at least one core, got {n_cores}")
            if threads < 1 or replicas < 1:
                raise PlanError(f"stage {idx}: threads ({threads}) and replicas ({replicas}) must be >= 1")
            if threads * replicas != n_cores:
                raise PlanError(f"stage {idx}: replicas*threads = {replicas}*{threads} != n_cores = {n_cores}")
            cl = by_name[cname]
            start = next_core[cname]
            if start + n_cores > len(cl.cores):
                raise PlanError(f"stage {idx}: cluster {cname!r} has {len(cl.cores)} cores, {start} already used "
                                f"by earlier stages, {n_cores} more requested")
            if threads not in costs.layer_ms.get(cname, {}):
                raise PlanError(f"stage {idx}: no layer_ms for cluster {cname!r} at {threads} threads "
                                f"(available: {sorted(costs.layer_ms.get(cname, {}))})")
            next_core[cname] = start + n_cores
            members.append(_member(costs, transfer, cname, cl.cores[start:start + n_cores], first, last,
                                   threads, replicas))
        stages.append(Stage.of(idx, first, last, members))
        expected_first = last + 1
    if expected_first != n:
        raise PlanError(f"stages cover layers 0..{expected_first - 1} but the model has {n} layers (0..{n - 1})")
    return Plan.of(stages, tuple(costs.layer_names), objective=objective, target_fps=target_fps, notes=notes)


def _as_stage_spec(idx: int, entry) -> StageSpec:
    if isinstance(entry, StageSpec):
        return StageSpec(int(entry.first_layer), int(entry.last_layer),
                         tuple((str(c), int(m), int(t), int(r)) for c, m, t, r in entry.members))
    try:
        cname, n_cores, first, last, threads, replicas = entry
    except (TypeError, ValueError) as exc:
        raise PlanError(f"stage {idx}: expected a StageSpec or (cluster, n_cores, first_layer, last_layer, "
                        f"threads, replicas), got {entry!r}") from exc
    return StageSpec(int(first), int(last), ((str(cname), int(n_cores), int(threads), int(replicas)),))


# ---------------------------------------------------------------------------------------------
# planner
# ---------------------------------------------------------------------------------------------


@dataclass
class _Combo:
    """One pool choice: per usable cluster ``None`` or ``(m, replicas, threads)``."""

    picks: tuple[tuple[int, int, int] | None, ...]
    period: np.ndarray   # (n, n) ms per frame when saturated
    p99: np.ndarray      # (n, n) slowest member's service ms
    cores: int
    prev: np.ndarray     # (U,) predecessor state index (U = invalid)


def _cluster_choices(n_cores: int, threads_known: set[int], allow_replicas: bool) -> list[tuple[int, int, int] | None]:
    out: list[tuple[int, int, int] | None] = [None]
    for m in range(1, n_cores + 1):
        for r in range(1, m + 1):
            if m % r or (r > 1 and not allow_replicas) or (m // r) not in threads_known:
                continue
            out.append((m, r, m // r))
    return out


def plan_pipeline(costs: CostTable, clusters: Sequence[ClusterSpec], transfer: TransferModel = TransferModel(), *,
                  max_stages: int | None = None, tie_tolerance: float = 0.0, allow_replicas: bool = True,
                  allow_pools: bool = True, forced_cuts: Sequence[int] | None = None,
                  objective: str = "throughput", target_fps: float | None = None) -> Plan:
    """Exact optimal plan (see the module docstring for the model and the algorithm).

    ``allow_pools=False`` keeps every stage on one cluster (the pre-pool plan space)."""
    transfer = transfer or TransferModel()
    clusters = list(clusters)
    n = _check_inputs(costs, clusters)
    tie_tolerance = float(tie_tolerance or 0.0)
    if not math.isfinite(tie_tolerance) or tie_tolerance < 0:
        raise PlanError(f"tie_tolerance must be a finite number >= 0, got {tie_tolerance!r}")
    if objective not in OBJECTIVES:
        raise PlanError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective == "latency" and (target_fps is None or not target_fps > 0):
        raise PlanError("objective 'latency' needs a target rate (planner.target_fps > 0)")
    usable = [c for c in clusters if c.cores]
    total_cores = sum(len(c.cores) for c in usable)
    if total_cores == 0:
        raise PlanError("no cores available: every cluster is empty")
    if max_stages is not None:
        if int(max_stages) != max_stages or max_stages < 1:
            raise PlanError(f"max_stages must be a positive integer or None, got {max_stages!r}")
        max_stages = int(max_stages)
    boundaries = None
    if forced_cuts is not None:
        cuts = _normalise_cuts(forced_cuts, n)
        boundaries = [0, *cuts, n]
        if max_stages is not None and len(boundaries) - 1 > max_stages:
            raise PlanError(f"{len(cuts)} forced cuts give {len(boundaries) - 1} stages > max_stages = {max_stages}")
        if len(boundaries) - 1 > total_cores:
            raise PlanError(f"{len(cuts)} forced cuts give {len(boundaries) - 1} stages but only {total_cores} "
                            "cores exist")
        S = len(boundaries) - 1
    else:
        S = min(n, total_cores, max_stages if max_stages is not None else total_cores)

    # ---- state space: cores used per usable cluster, mixed radix ------------------------------
    K = len(usable)
    caps = [len(c.cores) for c in usable]
    strides = [1] * K
    for k in range(1, K):
        strides[k] = strides[k - 1] * (caps[k - 1] + 1)
    U = strides[-1] * (caps[-1] + 1)
    u_idx = np.arange(U)
    used = [(u_idx // strides[k]) % (caps[k] + 1) for k in range(K)]
    cores_of_u = np.sum(np.stack(used), axis=0)

    # ---- pool choices -----------------------------------------------------------------------
    svc: dict[tuple[int, int], np.ndarray] = {}
    per_cluster = []
    for k, cl in enumerate(usable):
        known = set(costs.layer_ms[cl.name])
        per_cluster.append(_cluster_choices(caps[k], known, allow_replicas))
        for t in known:
            if t <= caps[k]:
                svc[(k, t)] = _service_matrix(costs, cl.name, t, transfer)
    combos: list[_Combo] = []
    with np.errstate(divide="ignore"):
        for picks in itertools.product(*per_cluster):
            active = [(k, p) for k, p in enumerate(picks) if p is not None]
            if not active or (not allow_pools and len(active) > 1):
                continue
            rate = sum(p[1] / svc[(k, p[2])] for k, p in active)
            p99 = np.maximum.reduce([svc[(k, p[2])] for k, p in active])
            ok = np.all([used[k] >= p[0] for k, p in active], axis=0)
            prev = np.where(ok, u_idx - sum(p[0] * strides[k] for k, p in active), U)
            combos.append(_Combo(picks, 1.0 / rate, p99, sum(p[0] for _, p in active), prev))
    if not combos:
        raise PlanError("no usable (cluster, threads) configuration: cost table lacks the needed thread counts")

    bpos = {b: p for p, b in enumerate(boundaries)} if boundaries is not None else {}

    def starts_for(e: int) -> tuple[int, int] | None:
        if boundaries is None:
            return 0, e
        pos = bpos.get(e)
        if not pos:
            return None
        return boundaries[pos - 1], boundaries[pos - 1] + 1

    # ---- phase 1: minimal bottleneck ------------------------------------------------------------
    G1 = np.full((n + 1, U + 1, S + 1), np.inf)
    G1[0, 0, 0] = 0.0
    ends = [(e, *rng) for e in range(1, n + 1) if (rng := starts_for(e)) is not None]  # (end, first starts)
    for e, lo, hi in ends:
        acc = G1[e, :U, 1:]
        for cb in combos:
            cost = cb.period[lo:hi, e - 1]
            cand = np.maximum(G1[lo:hi, cb.prev, :S], cost[:, None, None])
            np.minimum(acc, cand.min(axis=0), out=acc)
    best_b = float(G1[n, :U, 1:].min())
    if not math.isfinite(best_b):
        raise PlanError(f"no feasible plan: {n} layers, {total_cores} cores, max_stages={max_stages}, "
                        f"forced_cuts={list(forced_cuts) if forced_cuts is not None else None}")

    # ---- phase 2: minimal p99 within the threshold ------------------------------------------------
    notes: tuple[str, ...] = ()
    thr = best_b * (1.0 + tie_tolerance)
    if objective == "latency":
        want = 1000.0 / float(target_fps)
        if want + _REL_EPS * want < best_b:
            notes = (f"target {target_fps:g} fps is above the best plan's {1000.0 / best_b:.1f} fps: "
                     "planned for throughput instead",)
        else:
            thr = want
    thr += _REL_EPS * max(1.0, abs(thr))
    G2 = np.full((n + 1, U + 1, S + 1), np.inf)
    G2[0, 0, 0] = 0.0
    back_i = np.full((n + 1, U, S + 1), -1, dtype=np.int64)
    back_c = np.full((n + 1, U, S + 1), -1, dtype=np.int64)
    lat = [np.where(cb.period <= thr, cb.p99, np.inf) for cb in combos]
    for e, lo, hi in ends:
        acc = G2[e, :U, 1:]
        bi, bc = back_i[e, :, 1:], back_c[e, :, 1:]
        for ci, (cb, lt) in enumerate(zip(combos, lat)):
            cost = lt[lo:hi, e - 1]
            if not np.isfinite(cost).any():
                continue
            cand = G2[lo:hi, cb.prev, :S] + cost[:, None, None]
            arg = np.argmin(cand, axis=0)
            val = np.take_along_axis(cand, arg[None], axis=0)[0]
            better = val < acc
            if better.any():
                acc[better] = val[better]
                bi[better] = arg[better] + lo
                bc[better] = ci
    final = G2[n, :U, :]
    best_lat = float(final.min())
    if not math.isfinite(best_lat):  # cannot happen: the phase-1 optimum satisfies the threshold
        raise PlanError("internal error: no plan within the bottleneck threshold")
    lat_thr = best_lat + _REL_EPS * max(1.0, abs(best_lat))
    us, ss = np.nonzero(final <= lat_thr)
    order = sorted(zip(ss.tolist(), cores_of_u[us].tolist(), final[us, ss].tolist(), us.tolist()))
    s_best, _, _, u_best = order[0]

    # ---- backtrack ----------------------------------------------------------------------------------
    specs: list[StageSpec] = []
    e, u, s = n, u_best, s_best
    while e > 0:
        i, ci = int(back_i[e, u, s]), int(back_c[e, u, s])
        if i < 0 or ci < 0:  # pragma: no cover - defensive
            raise PlanError("internal error: broken back-pointers in planner DP")
        cb = combos[ci]
        members = tuple((usable[k].name, p[0], p[2], p[1]) for k, p in enumerate(cb.picks) if p is not None)
        specs.append(StageSpec(i, e - 1, members))
        u = int(cb.prev[u])
        e, s = i, s - 1
    specs.reverse()
    return evaluate_stages(costs, clusters, transfer, specs, objective=objective, target_fps=target_fps, notes=notes)

