"""Metrics a monitoring stack can read: Prometheus text format on ``/metrics`` (prometheus-client,
``pip install 'hetsched[metrics]'``).

The hot path pays almost nothing: the server keeps plain integers and :class:`Histogram` objects
(one ``bisect`` and two additions per observation, no locks, no prometheus-client objects), and the
exporter's HTTP thread calls ``snapshot_fn()`` once per scrape and turns its ``"metrics"`` section
into Prometheus families. Nothing is computed between scrapes.

The ``"metrics"`` section of a snapshot (every key required; counters are cumulative since the
service started and never go down):

=========================  ===========================  ===================================  ==========
key                        value                        Prometheus family                    type
=========================  ===========================  ===================================  ==========
``frames_accepted``        int: frames accepted         ``hetsched_frames_accepted_total``   counter
``frames_completed``       int: ``result`` replies      ``hetsched_frames_completed_total``  counter
``frames_failed``          {code: int}: accepted        ``hetsched_frames_failed_total``     counter
                           frames that ended in an      ``{code}``
                           error, by error code
``busy_refusals``          int: submits refused with    ``hetsched_busy_refusals_total``     counter
                           ``BUSY`` (not accepted)
``latency_seconds``        Histogram dict: accept to    ``hetsched_frame_latency_seconds``   histogram
                           last stage's output (the
                           result's ``latency_ms``)
``stage_compute_seconds``  {stage: Histogram dict}      ``hetsched_stage_compute_seconds``   histogram
                           each stage's own work        ``{stage}``
``stage_wait_seconds``     {stage: Histogram dict}      ``hetsched_stage_wait_seconds``      histogram
                           transfer + queueing before   ``{stage}``
                           the stage took the frame
``worker_restarts``        int                          ``hetsched_worker_restarts_total``   counter
``replays``                int: frames sent again       ``hetsched_replays_total``           counter
                           after a worker restart
``replans``                int: plans replaced at run   ``hetsched_replans_total``           counter
                           time
``plan_generation``        int: the plan in use (0 =    ``hetsched_plan_generation``         gauge
                           the first)
``cluster_speed``          {cluster: float}: each       ``hetsched_cluster_speed``           gauge
                           cluster's speed as measured  ``{cluster}``
=========================  ===========================  ===================================  ==========

A *Histogram dict* is :meth:`Histogram.to_dict`: ``{"buckets": [b0, b1, ...], "counts": [c0, c1,
..., c_inf], "sum": float, "count": int}`` with finite, strictly increasing upper bounds ``buckets``
(seconds), ``counts[i]`` the observations ``x`` with ``buckets[i-1] < x <= buckets[i]`` (not
cumulative; one more entry than ``buckets``: the last counts ``x > buckets[-1]``) and ``count ==
sum(counts)``. The exporter makes them cumulative ``le`` buckets. Stage keys may be ints (the stage
index) or strings; label values are ``str(key)``.

``snapshot_fn`` runs in the exporter's HTTP thread, so it must be safe to call from another thread;
reading ints and calling ``to_dict()`` under the GIL is (``to_dict`` copies the counts first and
derives ``count`` from that copy, so a histogram's buckets and count always agree).
"""

from __future__ import annotations

import ipaddress
import logging
import math
from bisect import bisect_left
from typing import Any, Callable, Iterator, Sequence

from hetsched.errors import HetschedError

log = logging.getLogger(__name__)

__all__ = ["Histogram", "LATENCY_BUCKETS", "MetricsExporter", "METRIC_NAMES"]

# 1 ms .. 10 s in 1-2-5 steps: a frame's latency, a stage's compute and wait all fall in here.
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

# snapshot key -> (family name as exposed, type, label, help)
_FAMILIES = (
    ("frames_accepted", "hetsched_frames_accepted_total", "counter", None, "Frames the service accepted."),
    ("frames_completed", "hetsched_frames_completed_total", "counter", None, "Frames answered with a result."),
    ("frames_failed", "hetsched_frames_failed_total", "counter", "code",
     "Accepted frames that ended in an error, by error code."),
    ("busy_refusals", "hetsched_busy_refusals_total", "counter", None,
     "Submits refused with BUSY (the pending queue was full; not accepted)."),
    ("latency_seconds", "hetsched_frame_latency_seconds", "histogram", None,
     "Seconds from accepting a frame to its last stage's output."),
    ("stage_compute_seconds", "hetsched_stage_compute_seconds", "histogram", "stage",
     "Seconds of each pipeline stage's own work per frame."),
    ("stage_wait_seconds", "hetsched_stage_wait_seconds", "histogram", "stage",
     "Seconds a frame waited (transfer and queueing) before each stage took it."),
    ("worker_restarts", "hetsched_worker_restarts_total", "counter", None, "Stage worker processes restarted."),
    ("replays", "hetsched_replays_total", "counter", None, "Frames sent again after a worker restart."),
    ("replans", "hetsched_replans_total", "counter", None, "Stage plans replaced while running."),
    ("plan_generation", "hetsched_plan_generation", "gauge", None, "Generation of the plan in use (0: the first)."),
    ("cluster_speed", "hetsched_cluster_speed", "gauge", "cluster", "Each CPU cluster's speed as measured."),
)
METRIC_NAMES = tuple(name for _, name, _, _, _ in _FAMILIES)


class Histogram:
    """Fixed-bucket histogram for the hot path: ``observe`` is one bisect and two additions.

    Not thread-safe for concurrent ``observe`` calls (the server observes from one thread);
    ``to_dict`` may run in another thread."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS):
        bounds = tuple(float(b) for b in buckets)
        if not bounds or not all(math.isfinite(b) for b in bounds) or any(
                a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"histogram buckets must be finite and strictly increasing, got {list(buckets)}")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, x: float) -> None:
        """Count one value (seconds); NaN is ignored."""
        if x == x:
            self.counts[bisect_left(self.bounds, x)] += 1
            self.sum += x

    @property
    def count(self) -> int:
        return sum(self.counts)

    def merge(self, other: dict) -> None:
        """Add another histogram's :meth:`to_dict` (e.g. a stage's replicas) with the same buckets."""
        if tuple(other["buckets"]) != self.bounds or len(other["counts"]) != len(self.counts):
            raise ValueError(f"cannot merge histograms with different buckets: {list(other['buckets'])} "
                             f"into {list(self.bounds)}")
        for i, c in enumerate(other["counts"]):
            self.counts[i] += c
        self.sum += other["sum"]

    def to_dict(self) -> dict:
        counts = list(self.counts)
        return {"buckets": list(self.bounds), "counts": counts, "sum": self.sum, "count": sum(counts)}


def _cumulative(h: dict) -> list[tuple[str, float]]:
    from prometheus_client.utils import floatToGoString
    out, total = [], 0
    for bound, c in zip(list(h["buckets"]) + [math.inf], h["counts"]):
        total += c
        out.append((floatToGoString(bound), total))
    return out


class _SnapshotCollector:
    """prometheus-client collector: one ``snapshot_fn()`` call per scrape."""

    def __init__(self, snapshot_fn: Callable[[], dict]):
        self.snapshot_fn = snapshot_fn

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        try:
            metrics = self.snapshot_fn()["metrics"]
        except Exception:
            log.exception("metrics snapshot failed; this scrape gets an error")
            raise
        kinds = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}
        for key, name, kind, label, doc in _FAMILIES:
            value = metrics[key]
            family = kinds[kind](name, doc, labels=[label] if label else None)
            items = sorted(value.items(), key=lambda kv: str(kv[0])) if label else [((), value)]
            for lv, v in items:
                labels = [str(lv)] if label else []
                if kind == "histogram":
                    family.add_metric(labels, _cumulative(v), v["sum"])
                else:
                    family.add_metric(labels, float(v))
            yield family


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MetricsExporter:
    """Serves ``http://host:port/metrics`` from ``snapshot_fn()`` (see the module docstring) in a
    daemon thread, on its own private registry (nothing else of the process is exposed).

    ``port=0`` picks a free port (read :attr:`port` after :meth:`start`). The endpoint has no
    authentication: it binds loopback by default, and any other ``host`` is logged as a warning."""

    def __init__(self, snapshot_fn: Callable[[], dict], host: str = "127.0.0.1", port: int = 9100):
        self.snapshot_fn, self.host, self._port = snapshot_fn, host, port
        self._server = self._thread = None

    @property
    def port(self) -> int:
        return self._server.server_port if self._server is not None else self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> "MetricsExporter":
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError:
            raise HetschedError("metrics need prometheus-client: pip install 'hetsched[metrics]'") from None
        if self._server is not None:
            return self
        if not _is_loopback(self.host):
            log.warning("SECURITY: serving unauthenticated metrics on %s:%d (not loopback)", self.host, self._port)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_SnapshotCollector(self.snapshot_fn))
        try:
            self._server, self._thread = start_http_server(self._port, addr=self.host, registry=registry)
        except OSError as exc:
            raise HetschedError(f"cannot serve metrics on {self.host}:{self._port}: {exc.strerror or exc}; "
                                "choose another metrics port") from None
        log.info("metrics on %s", self.url)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self._server = self._thread = None

    def __enter__(self) -> "MetricsExporter":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
