"""Prometheus metrics: the hot-path Histogram, and the exporter scraped over real HTTP and parsed
with prometheus_client's own parser, every value checked against the snapshot it came from."""

from __future__ import annotations

import math
import socket
import threading
import urllib.error
import urllib.request

import pytest

from hetsched.errors import HetschedError
from hetsched.observe.prometheus import LATENCY_BUCKETS, METRIC_NAMES, Histogram, MetricsExporter

parser = pytest.importorskip("prometheus_client.parser", reason="the metrics extra: pip install -e '.[metrics]'")


# ---------------------------------------------------------------------------------------------
# Histogram


def test_histogram_buckets_are_le_upper_bounds():
    h = Histogram([0.1, 1.0, 10.0])
    for x in (0.05, 0.1, 0.1000001, 1.0, 5.0, 10.0, 11.0, 1e9, float("nan")):
        h.observe(x)
    d = h.to_dict()
    assert d["buckets"] == [0.1, 1.0, 10.0]
    assert d["counts"] == [2, 2, 2, 2]  # <=0.1, (0.1, 1], (1, 10], > 10; NaN not counted
    assert d["count"] == 8 == h.count
    assert d["sum"] == pytest.approx(0.05 + 0.1 + 0.1000001 + 1.0 + 5.0 + 10.0 + 11.0 + 1e9)
    assert Histogram().to_dict() == {"buckets": list(LATENCY_BUCKETS), "counts": [0] * (len(LATENCY_BUCKETS) + 1),
                                     "sum": 0.0, "count": 0}
    assert LATENCY_BUCKETS[0] == 0.001 and LATENCY_BUCKETS[-1] == 10.0


def test_histogram_refuses_bad_buckets_and_merges_equal_ones():
    for bad in ([], [1.0, 1.0], [2.0, 1.0], [1.0, math.inf], [float("nan")]):
        with pytest.raises(ValueError, match="strictly increasing"):
            Histogram(bad)
    a, b = Histogram([1.0, 2.0]), Histogram([1.0, 2.0])
    for x in (0.5, 1.5):
        a.observe(x)
    for x in (1.5, 3.0, 3.0):
        b.observe(x)
    a.merge(b.to_dict())
    assert a.to_dict() == {"buckets": [1.0, 2.0], "counts": [1, 2, 2], "sum": 9.5, "count": 5}
    with pytest.raises(ValueError, match="different buckets"):
        a.merge(Histogram([1.0, 3.0]).to_dict())


def test_to_dict_is_a_copy():
    h = Histogram([1.0])
    d = h.to_dict()
    h.observe(0.5)
    assert d["counts"] == [0, 0] and h.to_dict()["counts"] == [1, 0]


# ---------------------------------------------------------------------------------------------
# the exporter over HTTP


class Snapshots:
    """A snapshot_fn over real Histograms and counters, as the server would keep them."""

    def __init__(self):
        self.calls = 0
        self.latency = Histogram()
        self.compute = {0: Histogram(), 1: Histogram()}
        self.wait = {0: Histogram(), 1: Histogram()}
        self.counters = {"frames_accepted": 0, "frames_completed": 0, "busy_refusals": 0, "worker_restarts": 0,
                         "replays": 0, "replans": 0, "plan_generation": 0}
        self.failed = {"BAD_IMAGE": 0, "STAGE_FAILED": 0}
        self.speed = {"big": 1.0, "little": 0.5}

    def frames(self, n: int, seed: int = 0) -> None:
        for i in range(n):
            self.counters["frames_accepted"] += 1
            if i % 7 == 3:
                self.failed["BAD_IMAGE" if i % 2 else "STAGE_FAILED"] += 1
                continue
            self.counters["frames_completed"] += 1
            self.latency.observe(0.0007 * (i + seed + 1))
            for s in (0, 1):
                self.compute[s].observe(0.003 * (s + 1) + 0.0001 * i)
                self.wait[s].observe(0.0002 * i)

    def __call__(self) -> dict:
        self.calls += 1
        return {"uptime_s": 1.0, "metrics": {
            **self.counters, "frames_failed": dict(self.failed), "latency_seconds": self.latency.to_dict(),
            "stage_compute_seconds": {s: h.to_dict() for s, h in self.compute.items()},
            "stage_wait_seconds": {s: h.to_dict() for s, h in self.wait.items()},
            "cluster_speed": dict(self.speed)}}


def scrape(url: str) -> dict:
    """{family name: family} from one GET of /metrics."""
    with urllib.request.urlopen(url, timeout=10) as rep:
        assert rep.status == 200 and rep.headers["Content-Type"].startswith("text/plain")
        text = rep.read().decode()
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def samples(family, name: str | None = None) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples
            if name is None or s.name == name}


def check_histogram(family, h: dict, labels: tuple = ()) -> None:
    """Cumulative le buckets, _count and _sum of one labelled histogram equal the snapshot's."""
    got = {float(s.labels["le"]): s.value for s in family.samples
           if s.name == family.name + "_bucket" and all(s.labels.get(k) == v for k, v in labels)}
    cumulative = [sum(h["counts"][:i + 1]) for i in range(len(h["counts"]))]
    assert got == dict(zip(h["buckets"] + [math.inf], cumulative)), (family.name, labels)
    assert h["count"] > 0  # the snapshot had observations at all
    lab = tuple(sorted(labels))
    assert samples(family, family.name + "_count")[(family.name + "_count", lab)] == h["count"]
    assert samples(family, family.name + "_sum")[(family.name + "_sum", lab)] == pytest.approx(h["sum"])


def check_all(fams: dict, snap: dict) -> None:
    m = snap["metrics"]
    exposed = {f.name + ("_total" if f.type == "counter" else "") for f in fams.values()}
    assert exposed == set(METRIC_NAMES)
    for key in ("frames_accepted", "frames_completed", "busy_refusals", "worker_restarts", "replays", "replans"):
        fam = fams[f"hetsched_{key}"]
        assert fam.type == "counter"
        assert samples(fam) == {(f"hetsched_{key}_total", ()): m[key]}
    fam = fams["hetsched_frames_failed"]
    assert fam.type == "counter"
    assert samples(fam) == {("hetsched_frames_failed_total", (("code", c),)): v for c, v in m["frames_failed"].items()}
    assert fams["hetsched_plan_generation"].type == "gauge"
    assert samples(fams["hetsched_plan_generation"]) == {("hetsched_plan_generation", ()): m["plan_generation"]}
    assert samples(fams["hetsched_cluster_speed"]) == {("hetsched_cluster_speed", (("cluster", c),)): v
                                                       for c, v in m["cluster_speed"].items()}
    fam = fams["hetsched_frame_latency_seconds"]
    assert fam.type == "histogram"
    check_histogram(fam, m["latency_seconds"])
    for key, name in (("stage_compute_seconds", "hetsched_stage_compute_seconds"),
                      ("stage_wait_seconds", "hetsched_stage_wait_seconds")):
        assert fams[name].type == "histogram"
        for stage, h in m[key].items():
            check_histogram(fams[name], h, (("stage", str(stage)),))


@pytest.mark.timeout(30)
def test_every_scraped_value_matches_the_snapshot():
    snap = Snapshots()
    with MetricsExporter(snap, port=0) as exp:
        assert exp.host == "127.0.0.1" and exp.port > 0
        assert exp.url == f"http://127.0.0.1:{exp.port}/metrics"
        snap.frames(40)
        fams = scrape(exp.url)
        check_all(fams, snap())
        assert fams["hetsched_frames_accepted"].samples[0].value == 40
        # counters move between scrapes; each scrape reads a fresh snapshot
        calls = snap.calls
        snap.frames(25, seed=3)
        snap.counters.update(worker_restarts=2, replays=5, replans=1, plan_generation=1, busy_refusals=9)
        snap.speed["little"] = 0.42
        fams = scrape(exp.url)
        assert snap.calls == calls + 1  # one snapshot per scrape
        check_all(fams, snap())
        assert fams["hetsched_frames_accepted"].samples[0].value == 65
        assert samples(fams["hetsched_cluster_speed"])[("hetsched_cluster_speed", (("cluster", "little"),))] == 0.42


@pytest.mark.timeout(30)
def test_stop_frees_the_port_and_errors_are_named():
    exp = MetricsExporter(Snapshots(), port=0).start()
    port = exp.port
    scrape(exp.url)
    exp.stop()
    exp.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    # a port in use is a HetschedError naming it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with pytest.raises(HetschedError, match=f"127.0.0.1:{busy}"):
            MetricsExporter(Snapshots(), port=busy).start()


@pytest.mark.timeout(30)
def test_a_failing_snapshot_is_a_server_error_and_the_exporter_goes_on():
    snap = Snapshots()
    snap.frames(10)
    broken = threading.Event()

    def snapshot_fn():
        if broken.is_set():
            raise RuntimeError("snapshot broke")
        return snap()

    with MetricsExporter(snapshot_fn, port=0) as exp:
        broken.set()
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(exp.url, timeout=10)
        assert info.value.code == 500
        broken.clear()
        check_all(scrape(exp.url), snap())


@pytest.mark.timeout(30)
def test_only_our_families_are_exposed():
    """A private registry: no process_*/python_* collectors from the default registry."""
    with MetricsExporter(Snapshots(), port=0) as exp:
        names = set(scrape(exp.url))
    assert all(n.startswith("hetsched_") for n in names), names
