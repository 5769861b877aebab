"""Cost model (pure): turn per-layer measurements (or FLOP estimates) into the planner's CostTable.

Measurements come from ``hetsched.profiling.measure`` (a process pinned to each cluster). For each
cluster we have, per measured thread count t, the median time of every layer run alone as its own
sub-model, the median time of the whole model, and the median time of an empty run (onnxruntime's
fixed per-call overhead). From these:

- a layer's compute time = its median - the empty-run overhead (never below zero),
- scaled by ``calibration = (whole - overhead) / sum(layer compute)`` so that a stage's predicted
  time adds up to what the unsplit model really takes (separately run layers lose fusion and
  cache reuse, and pay per-call overheads),
- thread counts that were not measured are interpolated with Amdahl's law fitted per layer from
  the 1-thread and n-thread medians.

The FLOP estimate (2 x multiply-adds) is the fallback when measuring is switched off, and the
sanity check of a measured profile: a layer whose ms-per-GFLOP is far off the model's median is
reported.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from typing import Mapping, Sequence

from hetsched.planning.planner import CostTable

# Python + zmq bookkeeping per frame in a stage worker (recv, header parse, encode, send, heartbeat),
# ms on the fastest cluster; slower clusters pay it in proportion to their measured slowness.
# Measured by `hetsched bench`: workers use 0.5-0.7 ms of CPU per frame beyond onnxruntime.
WORKER_OVERHEAD_MS = 0.35
DEFAULT_GFLOPS_PER_CORE = 50.0


@dataclass(frozen=True)
class ClusterMeasurement:
    """Raw medians measured on one cluster, per thread count."""

    cluster: str
    cores: tuple[int, ...]
    layer_ms: Mapping[int, tuple[float, ...]]   # threads -> median ms per layer (run alone)
    whole_ms: Mapping[int, float]               # threads -> median ms of the unsplit model
    empty_ms: Mapping[int, float]               # threads -> median ms of an empty session.run
    repeats: int
    emulated_speed: float | None = None
    preprocess_ms: float | None = None          # decoding + resizing one typical JPEG, if measured

    def to_dict(self) -> dict:
        return {"cluster": self.cluster, "cores": list(self.cores), "preprocess_ms": self.preprocess_ms,
                "layer_ms": {str(t): list(v) for t, v in self.layer_ms.items()},
                "whole_ms": {str(t): v for t, v in self.whole_ms.items()},
                "empty_ms": {str(t): v for t, v in self.empty_ms.items()},
                "repeats": self.repeats, "emulated_speed": self.emulated_speed}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ClusterMeasurement":
        return cls(d["cluster"], tuple(d["cores"]),
                   {int(t): tuple(v) for t, v in d["layer_ms"].items()},
                   {int(t): float(v) for t, v in d["whole_ms"].items()},
                   {int(t): float(v) for t, v in d["empty_ms"].items()},
                   int(d["repeats"]), d.get("emulated_speed"), d.get("preprocess_ms"))


def calibrated_layer_ms(m: ClusterMeasurement, threads: int) -> tuple[float, ...]:
    raw = m.layer_ms[threads]
    overhead = m.empty_ms[threads]
    compute = [max(0.0, x - overhead) for x in raw]
    total = sum(compute)
    target = max(0.0, m.whole_ms[threads] - overhead)
    factor = target / total if total > 0 else 1.0
    return tuple(c * factor for c in compute)


def amdahl_serial_fraction(t1: float, tn: float, n: int) -> float:
    """Serial fraction f with tn = t1 * (f + (1 - f) / n), clamped to [0, 1]."""
    if n <= 1 or t1 <= 0:
        return 1.0
    f = (tn / t1 - 1.0 / n) / (1.0 - 1.0 / n)
    return min(1.0, max(0.0, f))


def layer_ms_all_threads(m: ClusterMeasurement) -> dict[int, tuple[float, ...]]:
    """Per-layer ms for every thread count 1..len(cores), measured where available, else Amdahl."""
    n = len(m.cores)
    measured = {t: calibrated_layer_ms(m, t) for t in m.layer_ms}
    if 1 not in measured:
        raise ValueError(f"cluster {m.cluster}: no single-thread measurement")
    top = max(measured)
    fractions = [amdahl_serial_fraction(a, b, top) for a, b in zip(measured[1], measured[top])]
    out: dict[int, tuple[float, ...]] = {}
    for t in range(1, n + 1):
        if t in measured:
            out[t] = measured[t]
        else:
            out[t] = tuple(t1 * (f + (1.0 - f) / t) for t1, f in zip(measured[1], fractions))
    return out


def cost_table_from_measurements(layer_names: Sequence[str], boundary_bytes: Sequence[int],
                                 measurements: Sequence[ClusterMeasurement],
                                 worker_overhead_ms: float = WORKER_OVERHEAD_MS) -> CostTable:
    fastest = min(m.whole_ms[1] for m in measurements)
    return CostTable(
        layer_names=tuple(layer_names),
        layer_ms={m.cluster: layer_ms_all_threads(m) for m in measurements},
        boundary_bytes=tuple(int(b) for b in boundary_bytes),
        stage_overhead_ms={m.cluster: m.empty_ms[1] + worker_overhead_ms * m.whole_ms[1] / fastest
                           for m in measurements},
    )


# The coordinator (client socket, dispatch, ordering) runs pinned to the fastest cluster and costs CPU
# there for every frame: client message in, one work/done pair per stage, the reply out.
# Measured by `hetsched bench` (coordinator CPU ms per frame, shared-memory input).
COORDINATOR_MS_PER_FRAME = 0.15
COORDINATOR_MS_PER_MIB = 0.25  # a raw tensor sent over the socket is copied into its input slot


def coordinator_ms(copied_bytes: int = 0) -> float:
    return COORDINATOR_MS_PER_FRAME + COORDINATOR_MS_PER_MIB * copied_bytes / (1 << 20)


def with_coordinator_overhead(costs: CostTable, cluster: str, n_cores: int, ms: float) -> CostTable:
    """Charge the coordinator's per-frame CPU to the workers sharing its cores (spread over the
    cluster's cores: a worker on k of n cores pays about k/n of it; exact for one-core clusters)."""
    ov = dict(costs.stage_overhead_ms)
    ov[cluster] = ov.get(cluster, 0.0) + ms / max(1, n_cores)
    return dataclasses.replace(costs, stage_overhead_ms=ov)


DEFAULT_PREPROCESS_MS = 2.5  # FLOP-fallback guess for decoding + resizing one camera frame on a big core


def with_input_work(costs: CostTable, input_ms: Mapping[str, float]) -> CostTable:
    """Per-frame input work (image decoding, weighted by the share of encoded frames) charged to the
    stage that starts at layer 0: whichever of its workers takes a frame decodes it."""
    return dataclasses.replace(costs, input_ms={c: float(v) for c, v in input_ms.items()})


def flop_cost_table(layer_names: Sequence[str], boundary_bytes: Sequence[int], layer_flops: Sequence[int],
                    clusters: Sequence[tuple[str, int, float]], gflops_per_core: float = DEFAULT_GFLOPS_PER_CORE,
                    parallel_efficiency: float = 0.85,
                    worker_overhead_ms: float = WORKER_OVERHEAD_MS) -> CostTable:
    """Estimate from FLOPs alone. ``clusters``: (name, n_cores, relative speed)."""
    layer_ms = {}
    for name, n, speed in clusters:
        base = [f / (gflops_per_core * 1e9 * speed) * 1e3 for f in layer_flops]
        layer_ms[name] = {t: tuple(b / (1 + (t - 1) * parallel_efficiency) for b in base) for t in range(1, n + 1)}
    return CostTable(tuple(layer_names), layer_ms, tuple(int(b) for b in boundary_bytes),
                     {name: 0.02 + worker_overhead_ms for name, _, _ in clusters})


def flop_sanity(layer_names: Sequence[str], layer_flops: Sequence[int], layer_ms: Sequence[float],
                tolerance: float = 8.0, min_flops: int = 5_000_000) -> list[str]:
    """Layers whose measured ms per GFLOP is more than ``tolerance`` x off the model's median."""
    rates = [(name, ms / (f / 1e9)) for name, f, ms in zip(layer_names, layer_flops, layer_ms) if f >= min_flops]
    if len(rates) < 3:
        return []
    med = statistics.median(r for _, r in rates)
    if med <= 0:
        return []
    return [f"{name}: {r:.2f} ms/GFLOP vs median {med:.2f}" for name, r in rates
            if r > med * tolerance or r < med / tolerance]


def rescale_range(costs: CostTable, cluster: str, first: int, last: int, factor: float) -> CostTable:
    """Scale layers first..last on one cluster (every thread count) by ``factor``: the correction
    learnt from timing a whole stage sub-model against the sum of its layers' predictions."""
    per_t = {t: tuple(v * factor if first <= i <= last else v for i, v in enumerate(ms))
             for t, ms in costs.layer_ms[cluster].items()}
    return dataclasses.replace(costs, layer_ms={**costs.layer_ms, cluster: per_t})


def thread_counts_to_measure(n_cores: int) -> tuple[int, ...]:
    return (1,) if n_cores == 1 else (1, n_cores)
