"""What the planner takes and returns (pure, frozen dataclasses): cost tables, stages, plans.

A :class:`Plan` is a chain of :class:`Stage` s; a stage is a pool of :class:`Member` s, each a group
of identical workers (``replicas`` x ``threads``) on one cluster. The figures of a plan are
computed once, here (``Stage.of``, ``Plan.of``), from the members' service times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from hetsched.errors import PlanError

MIB = float(1 << 20)


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    cores: tuple[int, ...]  # logical CPU ids; all cores in a cluster are alike

    def __post_init__(self) -> None:
        object.__setattr__(self, "cores", tuple(int(c) for c in self.cores))


@dataclass(frozen=True)
class CostTable:
    layer_names: tuple[str, ...]
    # layer_ms[cluster][threads][layer]: compute ms of each layer with `threads` intra-op threads
    layer_ms: Mapping[str, Mapping[int, tuple[float, ...]]]
    # n+1 entries: bytes crossing boundary b (b=0: model input, b=n: model output)
    boundary_bytes: tuple[int, ...]
    # fixed per-frame cost of a worker on a cluster (messaging, bookkeeping, shared coordinator CPU)
    stage_overhead_ms: Mapping[str, float] = field(default_factory=dict)
    # per-frame input work of the stage that starts at layer 0 (image decoding, weighted by the
    # share of encoded frames in the traffic); done by whichever worker of stage 0 takes the frame
    input_ms: Mapping[str, float] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.layer_names)


@dataclass(frozen=True)
class TransferModel:
    """Cost of one boundary crossing charged to ONE side (sender or receiver): a small header over
    ZeroMQ naming a shared-memory slot, plus touching the bytes (written in place, read in place)."""

    per_message_ms: float = 0.03
    per_mb_ms: float = 0.15

    def cost_ms(self, nbytes: int) -> float:
        return float(self.per_message_ms) + float(self.per_mb_ms) * (float(nbytes) / MIB)

    def for_cluster(self, cluster: str) -> "TransferModel":
        """The crossing cost of a worker on ``cluster`` (the same everywhere here; per link in
        ``hetsched.planning.links.LinkTransferModel``)."""
        return self


@dataclass(frozen=True)
class StageSpec:
    """Input to ``evaluate_stages``: layers first..last served by members
    ``(cluster, n_cores, threads, replicas)``."""

    first_layer: int
    last_layer: int
    members: tuple[tuple[str, int, int, int], ...]


@dataclass(frozen=True)
class Member:
    """``replicas`` identical workers of one stage on one cluster, ``threads`` cores each."""

    cluster: str
    cores: tuple[int, ...]
    threads: int
    replicas: int
    compute_ms: float
    transfer_ms: float
    layers_ms: float = 0.0  # the layers' own compute in compute_ms (no overheads, no decoding)

    @property
    def service_ms(self) -> float:
        """One frame on one worker of this member."""
        return self.compute_ms + self.transfer_ms

    @property
    def rate_fps(self) -> float:
        return self.replicas * 1000.0 / self.service_ms if self.service_ms > 0 else math.inf

    def replica_cores(self) -> tuple[tuple[int, ...], ...]:
        t = self.threads
        return tuple(tuple(self.cores[r * t:(r + 1) * t]) for r in range(self.replicas))

    def to_dict(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "cores": list(self.cores), "threads": self.threads,
                "replicas": self.replicas, "compute_ms": self.compute_ms, "transfer_ms": self.transfer_ms,
                "layers_ms": self.layers_ms, "service_ms": self.service_ms, "rate_fps": self.rate_fps}


def pool_latency(members: Sequence[Member]) -> tuple[float, float]:
    """(p50, p99) ms of a pool: p99 = the slowest member's service time; p50 = the service time of
    the member serving the median frame when frames are shared in proportion to rate."""
    ordered = sorted(members, key=lambda m: m.service_ms)
    total = sum(m.rate_fps for m in ordered)
    p50, acc = ordered[-1].service_ms, 0.0
    for m in ordered:
        acc += m.rate_fps
        if acc >= 0.5 * total:
            p50 = m.service_ms
            break
    return p50, ordered[-1].service_ms


@dataclass(frozen=True)
class Stage:
    index: int
    first_layer: int  # inclusive
    last_layer: int  # inclusive
    members: tuple[Member, ...]
    period_ms: float  # ms per frame when saturated: 1000 / (sum of the members' rates)
    p50_ms: float
    p99_ms: float

    @classmethod
    def of(cls, index: int, first: int, last: int, members: Sequence[Member]) -> "Stage":
        rate = sum(m.rate_fps for m in members)
        p50, p99 = pool_latency(members)
        return cls(index, first, last, tuple(members), 1000.0 / rate if rate > 0 else math.inf, p50, p99)

    # ---- figures that read like the one-cluster stage of earlier plans ----
    @property
    def cluster(self) -> str:
        return "+".join(dict.fromkeys(m.cluster for m in self.members))

    @property
    def cores(self) -> tuple[int, ...]:
        return tuple(c for m in self.members for c in m.cores)

    @property
    def replicas(self) -> int:
        """Workers in the pool."""
        return sum(m.replicas for m in self.members)

    @property
    def threads(self) -> int:
        return max(m.threads for m in self.members)

    @property
    def compute_ms(self) -> float:
        """Compute of the slowest member (one frame)."""
        return max(self.members, key=lambda m: m.service_ms).compute_ms

    @property
    def transfer_ms(self) -> float:
        return max(self.members, key=lambda m: m.service_ms).transfer_ms

    @property
    def service_ms(self) -> float:
        return self.p99_ms

    @property
    def n_layers(self) -> int:
        return self.last_layer - self.first_layer + 1

    def layer_range(self) -> range:
        return range(self.first_layer, self.last_layer + 1)

    def workers(self) -> tuple[tuple[Member, tuple[int, ...]], ...]:
        """Every worker of the pool: (its member, its cores)."""
        return tuple((m, rc) for m in self.members for rc in m.replica_cores())

    def replica_cores(self) -> tuple[tuple[int, ...], ...]:
        return tuple(rc for _, rc in self.workers())

    def to_dict(self, layer_names: Sequence[str] | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "index": self.index, "first_layer": self.first_layer, "last_layer": self.last_layer,
            "members": [m.to_dict() for m in self.members], "cluster": self.cluster, "cores": list(self.cores),
            "replicas": self.replicas, "threads": self.threads, "replica_cores": [list(rc) for rc in self.replica_cores()],
            "compute_ms": self.compute_ms, "transfer_ms": self.transfer_ms, "service_ms": self.service_ms,
            "period_ms": self.period_ms, "p50_ms": self.p50_ms, "p99_ms": self.p99_ms,
        }
        if layer_names is not None:
            d["first_layer_name"] = layer_names[self.first_layer]
            d["last_layer_name"] = layer_names[self.last_layer]
        return d


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]
    bottleneck_ms: float  # max stage period (the throughput objective)
    throughput_fps: float  # 1000 / bottleneck_ms
    latency_ms: float  # predicted p99: sum of the stages' p99
    latency_p50_ms: float
    balance: float  # max period / mean period
    layer_names: tuple[str, ...]
    objective: str = "throughput"
    target_fps: float | None = None
    notes: tuple[str, ...] = ()

    @classmethod
    def of(cls, stages: Sequence[Stage], layer_names: tuple[str, ...], *, objective: str = "throughput",
           target_fps: float | None = None, notes: tuple[str, ...] = ()) -> "Plan":
        periods = [s.period_ms for s in stages]
        bottleneck = max(periods)
        mean = sum(periods) / len(periods)
        return cls(tuple(stages), bottleneck, 1000.0 / bottleneck if bottleneck > 0 else math.inf,
                   math.fsum(s.p99_ms for s in stages), math.fsum(s.p50_ms for s in stages),
                   bottleneck / mean if mean > 0 else 1.0, tuple(layer_names), objective, target_fps, tuple(notes))

    @property
    def bottleneck_stage(self) -> int:
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

    @property
    def n_workers(self) -> int:
        return sum(s.replicas for s in self.stages)

    def cuts(self) -> tuple[int, ...]:
        return tuple(s.first_layer for s in self.stages[1:])

    def shape(self) -> tuple:
        """What identifies the plan's layout (stages, layers, workers), for comparing plans."""
        return tuple((s.first_layer, s.last_layer, tuple((m.cluster, m.cores, m.threads) for m in s.members))
                     for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [s.to_dict(self.layer_names) for s in self.stages], "bottleneck_ms": self.bottleneck_ms,
                "throughput_fps": self.throughput_fps, "latency_ms": self.latency_ms,
                "latency_p50_ms": self.latency_p50_ms, "balance": self.balance,
                "bottleneck_stage": self.bottleneck_stage, "layer_names": list(self.layer_names),
                "objective": self.objective, "target_fps": self.target_fps, "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
        try:
            stages = [Stage.of(int(s["index"]), int(s["first_layer"]), int(s["last_layer"]),
                               [Member(str(m["cluster"]), tuple(int(c) for c in m["cores"]), int(m["threads"]),
                                       int(m["replicas"]), float(m["compute_ms"]), float(m["transfer_ms"]),
                                       float(m.get("layers_ms", 0.0)))
                                for m in s["members"]]) for s in d["stages"]]
            return cls.of(stages, tuple(str(x) for x in d["layer_names"]), objective=d.get("objective", "throughput"),
                          target_fps=d.get("target_fps"), notes=tuple(d.get("notes", ())))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"malformed plan dict: {exc!r}") from exc


# ---------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------


def fmt_cores(cores: Sequence[int]) -> str:
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
    """The plan as a table (one row per pool member) followed by the predicted figures."""
    names = plan.layer_names
    header = ["stage", "layers", "cluster", "cores", "workers x threads", "service ms", "stage period ms"]
    rows: list[list[str]] = []
    for s in plan.stages:
        first = names[s.first_layer] if s.first_layer < len(names) else str(s.first_layer)
        last = names[s.last_layer] if s.last_layer < len(names) else str(s.last_layer)
        layers = f"[{s.first_layer}] {first}" if s.first_layer == s.last_layer else (
            f"[{s.first_layer}..{s.last_layer}] {first} .. {last}")
        mark = "*" if s.index == plan.bottleneck_stage else ""
        for mi, m in enumerate(s.members):
            rows.append([f"{s.index}{mark}" if mi == 0 else "", layers if mi == 0 else "", m.cluster,
                         fmt_cores(m.cores), f"{m.replicas} x {m.threads}", f"{m.service_ms:.3f}",
                         f"{s.period_ms:.3f}" if mi == 0 else ""])
    widths = [max(len(header[c]), *(len(r[c]) for r in rows)) for c in range(len(header))]
    numeric = {5, 6}

    def line(cells: Sequence[str]) -> str:
        return " | ".join(cell.rjust(widths[c]) if c in numeric else cell.ljust(widths[c])
                          for c, cell in enumerate(cells)).rstrip()

    out = [line(header), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows]
    out += ["", f"objective: {plan.objective}" + (f" (target {plan.target_fps:g} fps)" if plan.target_fps else ""),
            f"predicted throughput: {plan.throughput_fps:.2f} frames/s (bottleneck {plan.bottleneck_ms:.3f} ms)",
            f"predicted latency: p50 {plan.latency_p50_ms:.3f} ms, p99 {plan.latency_ms:.3f} ms",
            f"balance: {plan.balance:.3f} (max period / mean period)",
            f"bottleneck stage: {plan.bottleneck_stage} (marked *)"]
    out += [f"note: {n}" for n in plan.notes]
    return "\n".join(out)

