"""The one definition of every figure hetsched reports: demo, ``profile``, ``status`` and ``bench``
compute their figures here and nowhere else. Pure: numpy only, plain numbers and sequences in.

Definitions (each function below states its own in full):

* **limit** (frames/s): the sum over cores of each core's standalone single-thread rate for *the
  same work the pipeline does* for that traffic: the model alone for raw-tensor traffic; decode +
  preprocess + model for encoded-image (JPEG/PNG) traffic. :func:`limit_fps`, :func:`core_rates_fps`.
* **throughput** (frames/s): completions after the first one, divided by the time from the first
  completion to the last one, counting only completions up to the end of the measured window (the
  moment load stopped being offered). The first completion marks the end of pipeline fill; ending at
  the window's end leaves out the drain. :func:`throughput_fps`.
* **latency percentiles** (ms): numpy's ``"linear"`` interpolation (``np.percentile`` default),
  p50 and p99. :func:`percentile`, :func:`latency_summary`.
* **busy seconds** of a worker: its own work on frames: decoding or converting their input (encoded
  images, camera pixels) when it does, plus onnxruntime's run.
* **utilisation**: a worker's busy seconds over wall seconds; a stage's is the mean over its
  workers. :func:`utilisation`, :func:`stage_utilisation`.
* **stage period** (ms): the time between two frames leaving the stage while it is saturated: one
  over the sum of its workers' rates, each worker's rate its frames over its busy seconds (equal
  workers: busy time per frame / workers). :func:`stage_period_ms`.
* **balance**: slowest stage period / mean stage period (1.0 = perfectly balanced). :func:`balance`.
* **prediction error**: ``(measured - predicted) / predicted``, both on the same basis: for a stage,
  its mean onnxruntime time per frame against its workers' predicted onnxruntime times, each weighted
  by the frames that worker served (a pool of a big and a little core is judged on the mix it
  really served); no overheads on either side. :func:`pool_predicted_ms`, :func:`prediction_error`.
* **efficiency**: throughput / limit. :func:`efficiency`.
* **CPU per frame** (ms): CPU seconds over frames; *beyond onnxruntime*: process CPU seconds minus
  the onnxruntime run CPU seconds the process reported, over its frames. :func:`per_frame_ms`,
  :func:`overhead_ms_per_frame`.
* **sustained offered rate**: an open-loop run at ``offered`` frames/s is sustained when its
  throughput (same definition) is at least ``SUSTAIN_TOLERANCE`` x offered and no frame failed;
  otherwise the contender is *overloaded* and its latency percentiles are not reported.
  :func:`offered_load`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

RAW = "raw"          # raw tensors of the model's input shape: the pipeline runs the model only
ENCODED = "jpeg"     # encoded photos: the pipeline decodes, preprocesses, then runs the model
TRAFFIC_KINDS = (RAW, ENCODED)
PERCENTILE_METHOD = "linear"
SUSTAIN_TOLERANCE = 0.95


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x))


# ------------------------------------------------------------------------------------------ latency
def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of ``values`` with linear interpolation between the two
    nearest ranks (numpy's ``"linear"`` method); None for no values."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q, method=PERCENTILE_METHOD))


def latency_summary(latencies_ms: Sequence[float]) -> dict:
    """``{"n", "p50_ms", "p99_ms", "mean_ms"}`` of a set of latencies (ms), via :func:`percentile`."""
    n = len(latencies_ms)
    return {"n": n, "p50_ms": percentile(latencies_ms, 50), "p99_ms": percentile(latencies_ms, 99),
            "mean_ms": float(np.mean(latencies_ms)) if n else None}


# ------------------------------------------------------------------------------------------ throughput
def window_completions(completion_times: Iterable[float], end: float | None = None) -> list[float]:
    """The completion times (seconds, one clock) that count for throughput: those at or before
    ``end`` (the end of the measured window; None: all), sorted."""
    ts = sorted(float(t) for t in completion_times)
    return ts if end is None else [t for t in ts if t <= end]


def throughput_fps(completion_times: Iterable[float], end: float | None = None) -> float:
    """Throughput: with ``t_1 <= ... <= t_n`` the completions at or before ``end`` (the moment load
    stopped being offered; None: every completion), ``(n - 1) / (t_n - t_1)``. The first completion
    only marks the end of pipeline fill, so it is not counted; the drain after ``end`` is left out.
    0.0 with fewer than two completions."""
    ts = window_completions(completion_times, end)
    if len(ts) < 2 or ts[-1] <= ts[0]:
        return 0.0
    return (len(ts) - 1) / (ts[-1] - ts[0])


# ------------------------------------------------------------------------------------------ limit
def core_rates_fps(measurements: Iterable[Any], traffic: str) -> dict[int, float] | None:
    """Each core's standalone single-thread rate (frames/s) from profile measurements (objects with
    ``cores``, ``whole_ms`` {threads: ms} and ``preprocess_ms``, e.g. ClusterMeasurement): every
    core of a cluster runs the same work in ``whole_ms[1]`` (+ ``preprocess_ms`` for encoded
    traffic). None when a needed time was not measured (encoded traffic without a preprocessing
    time): a limit that leaves out part of the work is not reported."""
    if traffic not in TRAFFIC_KINDS:
        raise ValueError(f"traffic must be one of {TRAFFIC_KINDS}, got {traffic!r}")
    out: dict[int, float] = {}
    for m in measurements:
        model_ms = (m.whole_ms or {}).get(1)
        extra = 0.0
        if traffic == ENCODED:
            if not _finite(m.preprocess_ms):
                return None
            extra = float(m.preprocess_ms)
        if not _finite(model_ms) or model_ms + extra <= 0:
            return None
        for core in m.cores:
            out[int(core)] = 1000.0 / (model_ms + extra)
    return out or None


def limit_fps(core_rates: Mapping[Any, float] | None) -> float | None:
    """The limit: sum over cores of each core's standalone single-thread rate (frames/s) for the
    same work the pipeline does (see :func:`core_rates_fps`; the bench measures the rates directly).
    None when unknown."""
    if not core_rates:
        return None
    rates = list(core_rates.values())
    if not all(_finite(r) and r >= 0 for r in rates):
        return None
    return float(sum(rates))


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b (comparisons between contenders); None when either is unknown or b <= 0."""
    if not _finite(a) or not _finite(b) or b <= 0:
        return None
    return float(a) / float(b)


def efficiency(throughput: float | None, limit: float | None) -> float | None:
    """Efficiency: throughput / limit; None when either is unknown or the limit is 0."""
    return ratio(throughput, limit)


# ------------------------------------------------------------------------------------------ stages
def utilisation(busy_s: float, wall_s: float) -> float | None:
    """A worker's utilisation: its busy seconds (input decoding or conversion + onnxruntime run) /
    wall seconds."""
    if not _finite(wall_s) or wall_s <= 0:
        return None
    return float(busy_s) / float(wall_s)


def stage_utilisation(busy_s: float, workers: int, wall_s: float) -> float | None:
    """A stage's utilisation: the mean of its workers' :func:`utilisation`, i.e. the busy seconds
    summed over its ``workers`` divided by ``workers * wall_s``."""
    if workers <= 0:
        return None
    u = utilisation(busy_s, wall_s)
    return None if u is None else u / workers


def stage_period_ms(accounts: Sequence[tuple[float, int, int]]) -> float | None:
    """A stage's measured period from ``(busy seconds, frames, workers)`` per account (one worker, or
    several equal ones reported together): ``1 / sum(workers * frames / busy seconds)`` in ms, the
    time between two frames leaving the stage while every worker is kept busy. Accounts without
    frames add no rate; None when none has any."""
    rate = sum(n * f / b for b, f, n in accounts if f > 0 and n > 0 and _finite(b) and b > 0)
    return 1e3 / rate if rate > 0 else None


def pool_predicted_ms(served: Sequence[tuple[int, float | None]]) -> float | None:
    """The predicted time per frame of a stage over the frames it served: ``(frames, predicted ms)``
    per worker (or account), the mean of the predictions weighted by frames. None without frames
    or when a worker that served frames has no prediction."""
    total = sum(f for f, _ in served if f > 0)
    if total <= 0 or any(f > 0 and not _finite(p) for f, p in served):
        return None
    return sum(f * float(p) for f, p in served if f > 0) / total


def balance(periods_ms: Sequence[float | None]) -> float | None:
    """Slowest stage period / mean stage period over the stages with a known period."""
    ps = [float(p) for p in periods_ms if _finite(p)]
    if not ps or sum(ps) <= 0:
        return None
    return max(ps) / (sum(ps) / len(ps))


def prediction_error(measured: float | None, predicted: float | None) -> float | None:
    """``(measured - predicted) / predicted``. The caller passes both on the same basis (a stage's
    onnxruntime compute time only, or a throughput end to end); None when either is unknown."""
    if not _finite(measured) or not _finite(predicted) or predicted == 0:
        return None
    return (float(measured) - float(predicted)) / float(predicted)


# ------------------------------------------------------------------------------------------ CPU
def per_frame_ms(seconds: float | None, frames: int) -> float | None:
    """Milliseconds per frame of a time total (CPU seconds, compute seconds, ...): ``1000 * s / frames``."""
    if seconds is None or frames <= 0:
        return None
    return 1e3 * float(seconds) / frames


def overhead_ms_per_frame(cpu_s: float | None, onnxruntime_cpu_s: float | None, frames: int) -> float | None:
    """A worker's CPU ms per frame beyond onnxruntime's own run: (process CPU seconds - the CPU
    seconds its onnxruntime runs took) / frames it processed."""
    if cpu_s is None or onnxruntime_cpu_s is None:
        return None
    return per_frame_ms(float(cpu_s) - float(onnxruntime_cpu_s), frames)


# ------------------------------------------------------------------------------------------ offered load
def offered_load(offered_fps: float, completion_times: Sequence[float], latencies_ms: Sequence[float],
                 errors: int = 0, tolerance: float = SUSTAIN_TOLERANCE) -> dict:
    """Figures of an open-loop run at ``offered_fps`` (frame k due at t0 + k / offered, latency from
    the due time): achieved = :func:`throughput_fps` of the completions; sustained when achieved >=
    ``tolerance`` x offered and no frame failed. An overloaded run reports its achieved rate and
    None percentiles (its queue grew for the whole run: percentiles would only measure the run's
    length)."""
    achieved = throughput_fps(completion_times)
    ok = errors == 0 and len(latencies_ms) >= 2 and achieved >= tolerance * offered_fps
    lat = latency_summary(latencies_ms) if ok else _withheld(len(latencies_ms))
    return {"offered_fps": float(offered_fps), "achieved_fps": achieved, "sustained": ok, "overloaded": not ok,
            "frames": len(latencies_ms), "errors": int(errors), **lat}


def _withheld(n: int) -> dict:
    """:func:`latency_summary`'s keys for an overloaded run: no percentiles (they would measure only
    how long the run's queue grew)."""
    return {"n": n, "p50_ms": None, "p99_ms": None, "mean_ms": None}


def offered_load_rounds(offered_fps: float, runs: Sequence[tuple[Sequence[float], Sequence[float], int]],
                        tolerance: float = SUSTAIN_TOLERANCE) -> dict:
    """:func:`offered_load` over several open-loop runs of one contender at the same rate, each
    ``(completion times, latencies ms, errors)``, interleaved with the other contenders' runs (so all
    see the same disturbances). Sustained when most runs sustained the rate; the percentiles are over
    the frames of the runs that did (a p99 needs some thousand frames; a run that overloaded measured
    its own length, and is counted in ``overloaded_runs``); achieved is the lowest run's."""
    per = [offered_load(offered_fps, t, lat, err, tolerance) for t, lat, err in runs]
    kept = [r for r, f in zip(runs, per) if f["sustained"]]
    lats = [v for _, lat, _ in kept for v in lat]
    ok = len(kept) * 2 > len(per) and len(lats) >= 2
    lat = latency_summary(lats) if ok else _withheld(len(lats))
    return {"offered_fps": float(offered_fps), "achieved_fps": min(f["achieved_fps"] for f in per),
            "sustained": ok, "overloaded": not ok, "frames": len(lats), "errors": sum(int(e) for _, _, e in runs),
            "runs": len(per), "overloaded_runs": len(per) - len(kept), **lat}
