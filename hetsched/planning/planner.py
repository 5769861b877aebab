"""Pipeline planner: split a layer chain into contiguous stages on heterogeneous CPU clusters.

Pure code: no I/O, no zmq/onnx/onnxruntime imports.

Model
-----
The network is a chain of ``n`` layers (the units between graph cut points).  A plan cuts
the chain into contiguous stages.  Each stage runs on ``m >= 1`` cores of ONE cluster,
configured as ``replicas x threads`` with ``replicas * threads == m``; each replica is a
separate process with ``threads`` intra-op threads.  Cores are never shared between
stages, a cluster may host several stages, and not every core has to be used.

For a stage covering layers ``i..j`` on cluster ``k`` with ``t`` threads and ``r`` replicas::

    compute_ms  = sum(layer_ms[k][t][i..j]) + stage_overhead_ms[k]
    transfer_ms = transfer.cost_ms(boundary_bytes[i]) + transfer.cost_ms(boundary_bytes[j+1])
    service_ms  = compute_ms + transfer_ms            (one replica, one frame)
    period_ms   = service_ms / r                      (stage time per frame when saturated)

Objective (exact): minimise the bottleneck ``max(period_ms)``; among plans whose bottleneck
is within ``tie_tolerance`` (relative) of the optimum, minimise latency ``sum(service_ms)``;
remaining ties: fewer stages, then fewer cores.

Algorithm
---------
Two dynamic programs over the state ``(layer prefix e, cores used per cluster u, stages s)``
(``u`` is a mixed-radix index over the per-cluster used-core counts), vectorised with numpy
over ``u`` and ``s`` and over the start layer ``i`` of the last stage:

1. ``G1[e, u, s]`` = minimal max-period of covering layers ``0..e-1`` with exactly ``s``
   stages using exactly ``u`` cores.  ``B* = min G1[n, :, :]``.
2. With the threshold ``B = B* * (1 + tie_tolerance)`` (+ a tiny float epsilon), every stage
   configuration with ``period > B`` is forbidden, and ``G2[e, u, s]`` = minimal latency.
   Because the stage count and the used cores are part of the state, the final choice
   among ``G2[n, u, s]`` applies the (latency, stages, cores) tie-breaks exactly.

The (max, sum) lexicographic objective is not decomposable, hence the two phases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from hetsched.errors import PlanError

__all__ = [
    "ClusterSpec",
    "CostTable",
    "TransferModel",
    "Stage",
    "Plan",
    "plan_pipeline",
    "evaluate_stages",
    "format_plan",
]

MIB = float(1 << 20)
# relative slack used when comparing floats (threshold of phase 2, latency ties)
_REL_EPS = 1e-9


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    cores: tuple[int, ...]  # logical CPU ids; all cores in a cluster are alike

    def __post_init__(self) -> None:
        object.__setattr__(self, "cores", tuple(int(c) for c in self.cores))


@dataclass(frozen=True)
class CostTable:
    layer_names: tuple[str, ...]
    # layer_ms[cluster_name][threads][layer_index]: compute ms of each layer with `threads` intra-op threads
    layer_ms: Mapping[str, Mapping[int, tuple[float, ...]]]
    # n+1 entries: bytes crossing boundary b (b=0: model input, b=n: model output)
    boundary_bytes: tuple[int, ...]
    # fixed per-frame cost of a stage on a cluster
    stage_overhead_ms: Mapping[str, float] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.layer_names)


@dataclass(frozen=True)
class TransferModel:
    per_message_ms: float = 0.03  # per boundary crossing, charged to both sending and receiving stage
    per_mb_ms: float = 0.15  # per MiB crossing a boundary, charged to both sides

    def cost_ms(self, nbytes: int) -> float:
        """Cost charged to ONE side (sender or receiver) of a boundary crossing of `nbytes` bytes."""
        return float(self.per_message_ms) + float(self.per_mb_ms) * (float(nbytes) / MIB)


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    index: int
    cluster: str
    cores: tuple[int, ...]
    first_layer: int  # inclusive
    last_layer: int  # inclusive
    threads: int
    replicas: int
    compute_ms: float
    transfer_ms: float
    service_ms: float
    period_ms: float

    def replica_cores(self) -> tuple[tuple[int, ...], ...]:
        """Cores of each replica: consecutive groups of `threads` cores."""
        t = self.threads
        return tuple(tuple(self.cores[r * t:(r + 1) * t]) for r in range(self.replicas))

    def layer_range(self) -> range:
        return range(self.first_layer, self.last_layer + 1)

    @property
    def n_layers(self) -> int:
        return self.last_layer - self.first_layer + 1

    def to_dict(self, layer_names: Sequence[str] | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "index": self.index,
            "cluster": self.cluster,
            "cores": list(self.cores),
            "first_layer": self.first_layer,
            "last_layer": self.last_layer,
            "threads": self.threads,
            "replicas": self.replicas,
            "replica_cores": [list(rc) for rc in self.replica_cores()],
            "compute_ms": self.compute_ms,
            "transfer_ms": self.transfer_ms,
            "service_ms": self.service_ms,
            "period_ms": self.period_ms,
        }
        if layer_names is not None:
            d["first_layer_name"] = layer_names[self.first_layer]
            d["last_layer_name"] = layer_names[self.last_layer]
        return d


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]
    bottleneck_ms: float  # max stage period_ms (the objective)
    throughput_fps: float  # 1000 / bottleneck_ms
    latency_ms: float  # sum of service_ms
    balance: float  # max period / mean period
    layer_names: tuple[str, ...]

    @property
    def bottleneck_stage(self) -> int:
        """Index of the (first) stage with the largest period."""
        best = 0
        for s in self.stages:
            if s.period_ms > self.stages[best].period_ms:
                best = s.index
        return best

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    @property
    def n_cores(self) -> int:
        return sum(len(s.cores) for s in self.stages)

    def cuts(self) -> tuple[int, ...]:
        """Boundary indices (1..n-1) where the plan cuts the chain."""
        return tuple(s.first_layer for s in self.stages[1:])

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": [s.to_dict(self.layer_names) for s in self.stages],
            "bottleneck_ms": self.bottleneck_ms,
            "throughput_fps": self.throughput_fps,
            "latency_ms": self.latency_ms,
            "balance": self.balance,
            "bottleneck_stage": self.bottleneck_stage,
            "layer_names": list(self.layer_names),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
        """Inverse of to_dict (extra keys such as layer names per stage are ignored)."""
        try:
            stages = tuple(
                Stage(
                    index=int(s["index"]),
                    cluster=str(s["cluster"]),
                    cores=tuple(int(c) for c in s["cores"]),
                    first_layer=int(s["first_layer"]),
                    last_layer=int(s["last_layer"]),
                    threads=int(s["threads"]),
                    replicas=int(s["replicas"]),
                    compute_ms=float(s["compute_ms"]),
                    transfer_ms=float(s["transfer_ms"]),
                    service_ms=float(s["service_ms"]),
                    period_ms=float(s["period_ms"]),
                )
                for s in d["stages"]
            )
            return cls(
                stages=stages,
                bottleneck_ms=float(d["bottleneck_ms"]),
                throughput_fps=float(d["throughput_fps"]),
                latency_ms=float(d["latency_ms"]),
                balance=float(d["balance"]),
                layer_names=tuple(str(x) for x in d["layer_names"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"malformed plan dict: {exc!r}") from exc


# ---------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------


def _check_inputs(costs: CostTable, clusters: Sequence[ClusterSpec]) -> int:
    n = len(costs.layer_names)
    if n == 0:
        raise PlanError("cost table has no layers")
    if len(costs.boundary_bytes) != n + 1:
        raise PlanError(
            f"boundary_bytes has {len(costs.boundary_bytes)} entries, expected n_layers+1 = {n + 1}"
        )
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
        per_t = costs.layer_ms[c.name]
        for t, row in per_t.items():
            if len(row) != n:
                raise PlanError(
                    f"layer_ms[{c.name!r}][{t}] has {len(row)} entries, expected {n} (one per layer)"
                )
            for li, v in enumerate(row):
                fv = float(v)
                if not math.isfinite(fv) or fv < 0:
                    raise PlanError(f"layer_ms[{c.name!r}][{t}][{li}] = {v!r} is not a finite non-negative number")
        ov = float(costs.stage_overhead_ms.get(c.name, 0.0))
        if not math.isfinite(ov) or ov < 0:
            raise PlanError(f"stage_overhead_ms[{c.name!r}] = {ov!r} is not a finite non-negative number")
    return n


def _overhead(costs: CostTable, cluster: str) -> float:
    return float(costs.stage_overhead_ms.get(cluster, 0.0))


# ---------------------------------------------------------------------------------------------
# evaluate a given assignment
# ---------------------------------------------------------------------------------------------


def evaluate_stages(
    costs: CostTable,
    clusters: Sequence[ClusterSpec],
    transfer: TransferModel,
    assignment: Sequence[tuple[str, int, int, int, int, int]],
) -> Plan:
    """Build a Plan from explicit stages ``(cluster, n_cores, first_layer, last_layer, threads, replicas)``.

    Core ids are assigned in order from each cluster's core list, stage by stage.
    Raises PlanError if the stages are not contiguous, do not cover every layer exactly once,
    or need more cores than a cluster has.
    """
    if transfer is None:
        transfer = TransferModel()
    n = _check_inputs(costs, clusters)
    by_name = {c.name: c for c in clusters}
    if not assignment:
        raise PlanError("empty assignment: at least one stage is needed")
    next_core = {c.name: 0 for c in clusters}
    stages: list[Stage] = []
    expected_first = 0
    for idx, entry in enumerate(assignment):
        try:
            cname, n_cores, first, last, threads, replicas = entry
        except (TypeError, ValueError) as exc:
            raise PlanError(
                f"stage {idx}: expected (cluster, n_cores, first_layer, last_layer, threads, replicas), got {entry!r}"
            ) from exc
        n_cores, first, last, threads, replicas = (int(x) for x in (n_cores, first, last, threads, replicas))
        if cname not in by_name:
            raise PlanError(f"stage {idx}: unknown cluster {cname!r} (known: {sorted(by_name)})")
        cl = by_name[cname]
        if first != expected_first:
            if expected_first == 0:
                raise PlanError(f"stage {idx}: first stage must start at layer 0, starts at {first}")
            raise PlanError(
                f"stage {idx}: starts at layer {first} but the previous stage ended at layer {expected_first - 1} "
                "(stages must be contiguous)"
            )
        if last < first:
            raise PlanError(f"stage {idx}: last_layer {last} < first_layer {first}")
        if last >= n:
            raise PlanError(f"stage {idx}: last_layer {last} out of range (model has {n} layers)")
        if n_cores < 1:
            raise PlanError(f"stage {idx}: needs at least one core, got {n_cores}")
        if threads < 1 or replicas < 1:
            raise PlanError(f"stage {idx}: threads ({threads}) and replicas ({replicas}) must be >= 1")
        if threads * replicas != n_cores:
            raise PlanError(
                f"stage {idx}: replicas*threads = {replicas}*{threads} != n_cores = {n_cores}"
            )
        start = next_core[cname]
        if start + n_cores > len(cl.cores):
            raise PlanError(
                f"stage {idx}: cluster {cname!r} has {len(cl.cores)} cores, "
                f"{start} already used by earlier stages, {n_cores} more requested"
            )
        per_t = costs.layer_ms.get(cname, {})
        if threads not in per_t:
            raise PlanError(
                f"stage {idx}: no layer_ms for cluster {cname!r} at {threads} threads "
                f"(available: {sorted(per_t)})"
            )
        next_core[cname] = start + n_cores
        row = per_t[threads]
        compute = math.fsum(float(row[li]) for li in range(first, last + 1)) + _overhead(costs, cname)
        xfer = transfer.cost_ms(costs.boundary_bytes[first]) + transfer.cost_ms(costs.boundary_bytes[last + 1])
        service = compute + xfer
        stages.append(
            Stage(
                index=idx,
                cluster=cname,
                cores=tuple(cl.cores[start:start + n_cores]),
                first_layer=first,
                last_layer=last,
                threads=threads,
                replicas=replicas,
                compute_ms=compute,
                transfer_ms=xfer,
                service_ms=service,
                period_ms=service / replicas,
            )
        )
        expected_first = last + 1
    if expected_first != n:
        raise PlanError(
            f"stages cover layers 0..{expected_first - 1} but the model has {n} layers (0..{n - 1})"
        )
    periods = [s.period_ms for s in stages]
    bottleneck = max(periods)
    mean = sum(periods) / len(periods)
    return Plan(
        stages=tuple(stages),
        bottleneck_ms=bottleneck,
        throughput_fps=(1000.0 / bottleneck) if bottleneck > 0 else math.inf,
        latency_ms=math.fsum(s.service_ms for s in stages),
        balance=(bottleneck / mean) if mean > 0 else 1.0,
        layer_names=tuple(costs.layer_names),
    )


# ---------------------------------------------------------------------------------------------
# planner
# ---------------------------------------------------------------------------------------------


@dataclass
class _Option:
    """One (cluster, core count) choice for a stage; matrices are indexed [first_layer, last_layer]."""

    k: int  # cluster index
    m: int  # cores
    factors: list[tuple[int, int]]  # (replicas, threads)
    service: np.ndarray  # (F, n, n) service ms per factorisation (inf where last < first)
    period: np.ndarray  # (F, n, n)
    prev: np.ndarray = None  # type: ignore[assignment]  # (U,) predecessor state index (U = invalid)


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


def plan_pipeline(
    costs: CostTable,
    clusters: Sequence[ClusterSpec],
    transfer: TransferModel = TransferModel(),
    *,
    max_stages: int | None = None,
    tie_tolerance: float = 0.0,
    allow_replicas: bool = True,
    forced_cuts: Sequence[int] | None = None,
) -> Plan:
    """Exact optimal pipeline plan (see module docstring for model and algorithm)."""
    if transfer is None:
        transfer = TransferModel()
    clusters = list(clusters)
    n = _check_inputs(costs, clusters)
    if tie_tolerance is None:
        tie_tolerance = 0.0
    tie_tolerance = float(tie_tolerance)
    if not math.isfinite(tie_tolerance) or tie_tolerance < 0:
        raise PlanError(f"tie_tolerance must be a finite number >= 0, got {tie_tolerance!r}")

    usable = [c for c in clusters if len(c.cores) > 0]
    total_cores = sum(len(c.cores) for c in usable)
    if total_cores == 0:
        raise PlanError("no cores available: every cluster is empty")

    if max_stages is not None:
        if int(max_stages) != max_stages or max_stages < 1:
            raise PlanError(f"max_stages must be a positive integer or None, got {max_stages!r}")
        max_stages = int(max_stages)

    boundaries: list[int] | None = None
    if forced_cuts is not None:
        cuts = _normalise_cuts(forced_cuts, n)
        boundaries = [0, *cuts, n]
        n_forced = len(boundaries) - 1
        if max_stages is not None and n_forced > max_stages:
            raise PlanError(f"{len(cuts)} forced cuts give {n_forced} stages > max_stages = {max_stages}")
        if n_forced > total_cores:
            raise PlanError(f"{len(cuts)} forced cuts give {n_forced} stages but only {total_cores} cores exist")
        S = n_forced
    else:
        S = min(n, total_cores, max_stages if max_stages is not None else total_cores)

    # ---- state space: mixed-radix index of cores used per usable cluster -------------------
    K = len(usable)
    caps = [len(c.cores) for c in usable]
    strides = [1] * K
    for k in range(1, K):
        strides[k] = strides[k - 1] * (caps[k - 1] + 1)
    U = strides[-1] * (caps[-1] + 1)
    u_idx = np.arange(U)
    used = [(u_idx // strides[k]) % (caps[k] + 1) for k in range(K)]  # used[k][u]
    cores_of_u = np.sum(np.stack(used), axis=0)

    # ---- per-stage cost matrices -----------------------------------------------------------
    bb = costs.boundary_bytes
    tc = np.array([transfer.cost_ms(bb[b]) for b in range(n + 1)], dtype=float)
    xfer = tc[:n, None] + tc[None, 1:]  # xfer[i, j] = in at boundary i + out at boundary j+1
    invalid = np.tril(np.ones((n, n), dtype=bool), k=-1)  # j < i

    options: list[_Option] = []
    for k, cl in enumerate(usable):
        per_t = costs.layer_ms[cl.name]
        over = _overhead(costs, cl.name)
        comp_by_t: dict[int, np.ndarray] = {}
        for t in range(1, caps[k] + 1):
            if t not in per_t:
                continue
            row = np.asarray(per_t[t], dtype=float)
            cum = np.concatenate(([0.0], np.cumsum(row)))
            c = cum[None, 1:] - cum[:-1, None] + over + xfer
            c[invalid] = np.inf
            comp_by_t[t] = c  # = service ms at t threads
        for m in range(1, caps[k] + 1):
            factors = []
            for r in range(1, m + 1):
                if m % r:
                    continue
                t = m // r
                if r > 1 and not allow_replicas:
                    continue
                if t in comp_by_t:
                    factors.append((r, t))
            if not factors:
                continue
            service = np.stack([comp_by_t[t] for (_, t) in factors])
            period = service / np.array([r for (r, _) in factors], dtype=float)[:, None, None]
            prev = np.where(used[k] >= m, u_idx - m * strides[k], U)
            options.append(_Option(k=k, m=m, factors=factors, service=service, period=period, prev=prev))
    if not options:
        raise PlanError("no usable (cluster, threads) configuration: cost table lacks the needed thread counts")

    _bpos = {b: p for p, b in enumerate(boundaries)} if boundaries is not None else {}

    def starts_for(e: int) -> tuple[int, int] | None:
        """Range [lo, hi) of allowed first layers of a stage ending at layer e-1."""
        if boundaries is None:
            return 0, e
        pos = _bpos.get(e)
        if pos is None or pos == 0:
            return None
        return boundaries[pos - 1], boundaries[pos - 1] + 1

    # ---- phase 1: minimal bottleneck ---------------------------------------------------------
    # G1[e, u, s]: min over plans covering layers 0..e-1 with s stages and cores u of the max period
    G1 = np.full((n + 1, U + 1, S + 1), np.inf)
    G1[0, 0, 0] = 0.0
    p1 = [opt.period.min(axis=0) for opt in options]  # best period over factorisations, (n, n)
    for e in range(1, n + 1):
        rng = starts_for(e)
        if rng is None:
            continue
        lo, hi = rng
        acc = G1[e, :U, 1:]
        for opt, per in zip(options, p1):
            cost = per[lo:hi, e - 1]
            cand = np.maximum(G1[lo:hi, opt.prev, :S], cost[:, None, None])
            np.minimum(acc, cand.min(axis=0), out=acc)
    best_b = float(G1[n, :U, 1:].min())
    if not math.isfinite(best_b):
        raise PlanError(
            f"no feasible plan: {n} layers, {total_cores} cores, max_stages={max_stages}, "
            f"forced_cuts={list(forced_cuts) if forced_cuts is not None else None}"
        )

    # ---- phase 2: minimal latency subject to period <= threshold ---------------------------------
    thr = best_b * (1.0 + tie_tolerance) + _REL_EPS * max(1.0, abs(best_b))
    p2: list[np.ndarray] = []
    f2: list[np.ndarray] = []
    for opt in options:
        svc = np.where(opt.period <= thr, opt.service, np.inf)
        f2.append(np.argmin(svc, axis=0))
        p2.append(svc.min(axis=0))
    G2 = np.full((n + 1, U + 1, S + 1), np.inf)
    G2[0, 0, 0] = 0.0
    back_i = np.full((n + 1, U, S + 1), -1, dtype=np.int64)
    back_o = np.full((n + 1, U, S + 1), -1, dtype=np.int64)
    for e in range(1, n + 1):
        rng = starts_for(e)
        if rng is None:
            continue
        lo, hi = rng
        acc = G2[e, :U, 1:]
        bi = back_i[e, :, 1:]
        bo = back_o[e, :, 1:]
        for oi, (opt, svc) in enumerate(zip(options, p2)):
            cost = svc[lo:hi, e - 1]
            if not np.isfinite(cost).any():
                continue
            cand = G2[lo:hi, opt.prev, :S] + cost[:, None, None]
            arg = np.argmin(cand, axis=0)
            val = np.take_along_axis(cand, arg[None], axis=0)[0]
            better = val < acc
            if better.any():
                acc[better] = val[better]
                bi[better] = arg[better] + lo
                bo[better] = oi

    final = G2[n, :U, :]  # (U, S+1)
    best_lat = float(final.min())
    if not math.isfinite(best_lat):  # cannot happen: the phase-1 optimum satisfies the threshold
        raise PlanError("internal error: no plan within the bottleneck threshold")
    lat_thr = best_lat + _REL_EPS * max(1.0, abs(best_lat))
    us, ss = np.nonzero(final <= lat_thr)
    # tie-breaks: fewer stages, then fewer cores, then lower latency, then state index
    order = sorted(zip(ss.tolist(), cores_of_u[us].tolist(), final[us, ss].tolist(), us.tolist()))
    s_best, _, _, u_best = order[0]

    # ---- backtrack ---------------------------------------------------------------------------
    assignment: list[tuple[str, int, int, int, int, int]] = []
    e, u, s = n, u_best, s_best
    while e > 0:
        i = int(back_i[e, u, s])
        oi = int(back_o[e, u, s])
        if i < 0 or oi < 0:  # pragma: no cover - defensive
            raise PlanError("internal error: broken back-pointers in planner DP")
        opt = options[oi]
        r, t = opt.factors[int(f2[oi][i, e - 1])]
        assignment.append((usable[opt.k].name, opt.m, i, e - 1, t, r))
        u = int(opt.prev[u])
        e, s = i, s - 1
    assignment.reverse()
    return evaluate_stages(costs, clusters, transfer, assignment)


# ---------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------


def _fmt_cores(cores: Sequence[int]) -> str:
    """Compact core list: (0,1,2,3,6) -> '0-3,6'."""
    if not cores:
        return "-"
    parts: list[str] = []
    start = prev = cores[0]
    for c in list(cores[1:]) + [None]:  # type: ignore[list-item]
        if c is not None and c == prev + 1:
            prev = c
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if c is not None:
            start = prev = c
    return ",".join(parts)


def format_plan(plan: Plan) -> str:
    """Human-readable table of the plan followed by the predicted metrics."""
    names = plan.layer_names
    header = ["stage", "cluster", "cores", "replicas x threads", "layers", "compute ms", "transfer ms", "period ms"]
    rows: list[list[str]] = []
    for s in plan.stages:
        first = names[s.first_layer] if s.first_layer < len(names) else str(s.first_layer)
        last = names[s.last_layer] if s.last_layer < len(names) else str(s.last_layer)
        layers = f"[{s.first_layer}] {first}" if s.first_layer == s.last_layer else (
            f"[{s.first_layer}..{s.last_layer}] {first} .. {last}"
        )
        mark = "*" if s.index == plan.bottleneck_stage else ""
        rows.append([
            f"{s.index}{mark}",
            s.cluster,
            _fmt_cores(s.cores),
            f"{s.replicas} x {s.threads}",
            layers,
            f"{s.compute_ms:.3f}",
            f"{s.transfer_ms:.3f}",
            f"{s.period_ms:.3f}",
        ])
    widths = [max(len(header[c]), *(len(r[c]) for r in rows)) for c in range(len(header))]
    numeric = {5, 6, 7}

    def line(cells: Sequence[str]) -> str:
        return " | ".join(
            cell.rjust(widths[c]) if c in numeric else cell.ljust(widths[c]) for c, cell in enumerate(cells)
        ).rstrip()

    out = [line(header), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    out.append("")
    out.append(f"predicted throughput: {plan.throughput_fps:.2f} frames/s (bottleneck {plan.bottleneck_ms:.3f} ms)")
    out.append(f"latency: {plan.latency_ms:.3f} ms")
    out.append(f"balance: {plan.balance:.3f} (max period / mean period)")
    out.append(f"bottleneck stage: {plan.bottleneck_stage} (marked *)")
    return "\n".join(out)
