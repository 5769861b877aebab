"""Reading the service's ``stats`` snapshot (``Client.stats()`` / ``Server.snapshot()``).

Every report (profile, demo, status, bench) reads the snapshot through :func:`read_snapshot` and
nothing else, so a change of the snapshot's layout is absorbed in that ONE function: it maps the
service's dict onto the typed counters below.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Account:
    """Cumulative counters of a set of worker processes that the snapshot reports together (one
    worker when the service reports per worker; today a whole stage)."""
    stage: int
    pids: tuple[int, ...]
    cores: tuple[int, ...]              # where these processes run
    frames: int
    errors: int
    compute_s: float                    # onnxruntime run time, wall seconds, summed over the pids
    compute_cpu_s: float | None = None  # onnxruntime run time, CPU seconds, when the workers report it
    input_s: float = 0.0                # decoding / converting their inputs (images, pixels), wall seconds
    predicted_compute_ms: float | None = None  # the plan's onnxruntime time per frame on these workers


@dataclass(frozen=True)
class StageCounters:
    stage: int
    cluster: str
    cores: tuple[int, ...]
    workers: int
    threads: int
    layers: tuple[str, str]
    first_layer: int | None
    last_layer: int | None
    frames: int
    errors: int
    compute_s: float
    wait_s: float
    send_s: float
    input_s: float                      # the workers' input decoding / conversion, wall seconds
    samples_ms: tuple[float, ...]       # recent per-frame compute times, oldest first
    predicted_ms: float                 # the plan's stage time (may include overheads, see below)
    predicted_compute_ms: float | None  # the plan's onnxruntime-only time, if the snapshot carries it
    predicted_period_ms: float
    accounts: tuple[Account, ...]


@dataclass(frozen=True)
class ServiceCounters:
    uptime_s: float
    completed: int
    errors: int
    plan: dict
    stages: tuple[StageCounters, ...]

    @property
    def worker_pids(self) -> list[int]:
        return [p for st in self.stages for a in st.accounts for p in a.pids if p is not None]

    @property
    def settled(self) -> bool:
        """Every stage's reported frames have caught up with the frames the service completed
        (workers report their counters on each heartbeat, so a fresh snapshot can lag)."""
        done = self.completed + self.errors
        return all(st.frames + st.errors >= done for st in self.stages)


def read_snapshot(snap: dict) -> ServiceCounters:
    """THE adapter from the service's stats snapshot to typed counters. Update here (only) when the
    snapshot changes. Layout read today (hetsched/server/front.py ``Server.snapshot``):
    ``uptime_s``, ``completed``, ``errors``, ``plan`` (Plan.to_dict), ``stages[i]`` with ``stage``,
    ``cluster``, ``cores``, ``replicas``, ``threads``, ``pids`` (one per replica), ``layers``,
    ``frames``, ``errors``, ``compute_s``, ``wait_s``, ``send_s`` (summed over the replicas),
    ``samples_ms``, ``predicted_ms`` and ``predicted_period_ms``. Optional, used when present:
    ``stages[i]["workers"]`` (per-worker counters: ``pid``, ``cores``, ``frames``, ``errors``,
    ``compute_s``, ``compute_cpu_s``, ``input_s``, ``predicted_compute_ms``),
    ``stages[i]["compute_cpu_s"]``, ``stages[i]["input_s"]`` and ``stages[i]["predicted_compute_ms"]``.
    ``compute_s`` is onnxruntime's run time, wall seconds (``compute_cpu_s``: its CPU seconds, with
    the input conversion); ``input_s`` the time the workers spent decoding or converting their
    inputs (encoded images, camera pixels) before the run."""
    plan_stages = {p.get("index"): p for p in (snap.get("plan") or {}).get("stages", [])}
    stages = []
    for s in snap["stages"]:
        idx = int(s["stage"])
        per_worker = s.get("workers") if isinstance(s.get("workers"), list) else None
        if per_worker:
            accounts = tuple(Account(idx, (int(w["pid"]),), tuple(w.get("cores", s["cores"])), int(w["frames"]),
                                     int(w.get("errors", 0)), float(w["compute_s"]), w.get("compute_cpu_s"),
                                     float(w.get("input_s", 0.0)), w.get("predicted_compute_ms"))
                             for w in per_worker)
        else:
            accounts = (Account(idx, tuple(int(p) for p in s.get("pids", []) if p is not None), tuple(s["cores"]),
                                int(s["frames"]), int(s.get("errors", 0)), float(s["compute_s"]),
                                s.get("compute_cpu_s"), float(s.get("input_s", 0.0)), s.get("predicted_compute_ms")),)
        ps = plan_stages.get(idx, {})
        stages.append(StageCounters(
            stage=idx, cluster=str(s["cluster"]), cores=tuple(s["cores"]),
            workers=int(s.get("replicas") or len(accounts)), threads=int(s.get("threads", 1)),
            layers=tuple(s.get("layers") or ("?", "?")), first_layer=ps.get("first_layer"),
            last_layer=ps.get("last_layer"), frames=int(s["frames"]), errors=int(s.get("errors", 0)),
            compute_s=float(s["compute_s"]), wait_s=float(s.get("wait_s", 0.0)), send_s=float(s.get("send_s", 0.0)),
            input_s=float(s.get("input_s", 0.0)),
            samples_ms=tuple(s.get("samples_ms") or ()), predicted_ms=float(s["predicted_ms"]),
            predicted_compute_ms=s.get("predicted_compute_ms"),
            predicted_period_ms=float(s.get("predicted_period_ms", s["predicted_ms"])), accounts=accounts))
    return ServiceCounters(uptime_s=float(snap.get("uptime_s", 0.0)), completed=int(snap.get("completed", 0)),
                           errors=int(snap.get("errors", 0)), plan=snap.get("plan") or {}, stages=tuple(stages))


def settled_stats(client: Any, timeout: float = 3.0, interval: float = 0.05) -> dict:
    """A raw snapshot from ``client.stats()`` taken once it is :attr:`ServiceCounters.settled`
    (or after ``timeout`` seconds: then the latest one)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = client.stats()
        if read_snapshot(snap).settled or time.monotonic() > deadline:
            return snap
        time.sleep(interval)
