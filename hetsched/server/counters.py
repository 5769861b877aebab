"""What the service counts as it runs (plain integers and histograms: cheap on the hot path).

The ``stats`` reply and the Prometheus ``/metrics`` page (``hetsched.observe.prometheus``, whose
docstring defines the ``metrics`` section) are both read from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hetsched.observe.prometheus import Histogram


@dataclass
class ServiceCounters:
    accepted: int = 0
    completed: int = 0
    errors: int = 0                # accepted frames answered with an error
    busy: int = 0                  # submits refused with BUSY (not accepted)
    limit: int = 0                 # submits refused with LIMIT (not accepted)
    rejected: int = 0              # submits refused for what they were (bad header, bad image, ...)
    auth_rejected: int = 0
    failed_by_code: dict[str, int] = field(default_factory=dict)
    latency: Histogram = field(default_factory=Histogram)
    stage_compute: dict[int, Histogram] = field(default_factory=dict)
    stage_wait: dict[int, Histogram] = field(default_factory=dict)

    def on_refused(self, code: str) -> None:
        if code == "BUSY":
            self.busy += 1
        elif code == "LIMIT":
            self.limit += 1
        else:
            self.rejected += 1

    def on_result(self, latency_s: float, hops, t_submit: float) -> None:
        self.completed += 1
        self.latency.observe(latency_s)
        prev = t_submit
        for h in hops:
            c = self.stage_compute.get(h.stage)
            if c is None:
                c = self.stage_compute[h.stage] = Histogram()
                self.stage_wait[h.stage] = Histogram()
            c.observe(h.t_end - h.t_start)
            self.stage_wait[h.stage].observe(max(0.0, h.t_start - prev))
            prev = h.t_end

    def on_error(self, code: str, n: int = 1) -> None:
        self.errors += n
        self.failed_by_code[code] = self.failed_by_code.get(code, 0) + n

    def as_dict(self) -> dict:
        """The flat counters of the ``stats`` reply."""
        return {"accepted": self.accepted, "completed": self.completed, "errors": self.errors, "busy": self.busy,
                "limit": self.limit, "rejected": self.rejected, "auth_rejected": self.auth_rejected,
                "failed_by_code": dict(self.failed_by_code)}

    def metrics(self, *, worker_restarts: int, replays: int, replans: int, plan_generation: int,
                cluster_speed: dict) -> dict:
        """The ``metrics`` section (see hetsched.observe.prometheus)."""
        return {"frames_accepted": self.accepted, "frames_completed": self.completed,
                "frames_failed": dict(self.failed_by_code), "busy_refusals": self.busy,
                "latency_seconds": self.latency.to_dict(),
                "stage_compute_seconds": {k: h.to_dict() for k, h in list(self.stage_compute.items())},
                "stage_wait_seconds": {k: h.to_dict() for k, h in list(self.stage_wait.items())},
                "worker_restarts": worker_restarts, "replays": replays, "replans": replans,
                "plan_generation": plan_generation, "cluster_speed": dict(cluster_speed)}
