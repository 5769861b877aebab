"""Settings of one ``hetsched bench`` run and the names every part of the bench shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from hetsched.observe import metrics

ORT_CONTENDERS = ("ort-all", "ort-fastest-cluster", "ort-replicas")
LATENCY_CONTENDERS = ORT_CONTENDERS + ("hetsched",)
CONTENDERS = LATENCY_CONTENDERS + ("limit",)
BUILTIN_SCENARIOS = ("homogeneous", "bl0.5", "bl0.33")
TRAFFIC = metrics.TRAFFIC_KINDS                  # ("raw", "jpeg")
REPLICA_MODES = ("processes", "threads")
CORRECT_ATOL = 1e-4
# issue 12's per-frame CPU budget of hetsched's processes (ms of CPU per frame, saturated)
CPU_BUDGET_MS = {"coordinator": 0.15, "worker": 0.15, "client": 0.10}

Progress = Callable[[str], None]


@dataclass
class BenchOptions:
    scenarios: list[str] = field(default_factory=lambda: list(BUILTIN_SCENARIOS))
    configs: list[str] = field(default_factory=list)
    traffic: list[str] = field(default_factory=lambda: list(TRAFFIC))
    images: str | None = None       # JPEG directory (default: ../shared/images beside the checkout, else synthetic)
    rounds: int = 3
    seconds: float = 2.0            # saturated, per contender per round (limit: per core)
    fixed_seconds: float = 3.0      # open-loop pass, per contender per round
    load_fraction: float = 0.6      # offered rate of the open-loop pass, x the limit (the same for everyone)
    warmup_seconds: float = 0.5
    replicas: str = "processes"     # ort-replicas: one process per core, or one thread per core in one process
    window: int = 8                 # frames in flight from the feeding client (hetsched feed's default)
    out: str = "results"
    md: str | None = "BENCHMARKS.md"
    model: str | None = None
    quick: bool = False
    seed: int = 0
    pool: int = 8                   # distinct raw input tensors
    check_every: int = 20           # open-loop pass: ask for the outputs of every n-th hetsched frame
    profile_repeats: int | None = None  # --quick only: fewer profiling repeats for the service
    shm: bool = True                # hetsched client: shared-memory input slots, as `hetsched feed` does
    command: str = "hetsched bench"
    progress: Progress | None = None

    @classmethod
    def quick_defaults(cls, **kw: Any) -> "BenchOptions":
        base = dict(scenarios=["bl0.5"], rounds=1, seconds=0.5, fixed_seconds=0.8, warmup_seconds=0.2,
                    quick=True, profile_repeats=5, check_every=5)
        base.update(kw)
        return cls(**base)

    def settings(self) -> dict:
        """The JSON-able settings recorded with a result."""
        keys = ("traffic", "images", "rounds", "seconds", "fixed_seconds", "load_fraction", "warmup_seconds",
                "replicas", "window", "pool", "seed", "quick", "profile_repeats", "shm", "check_every")
        return {k: getattr(self, k) for k in keys}
