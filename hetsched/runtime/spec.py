"""What the coordinator hands a worker process (typed, frozen, validated on both sides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hetsched.errors import ConfigError
from hetsched.wire.dtypes import WIRE_CODES
from hetsched.wire.rings import RingSpec

TensorDesc = tuple[str, str, tuple[int, ...]]  # (name, numpy dtype, shape)


def _check_tensors(what: str, tensors: tuple) -> None:
    for t in tensors:
        if not (isinstance(t, tuple) and len(t) == 3 and isinstance(t[0], str) and t[1] in WIRE_CODES
                and isinstance(t[2], tuple) and all(isinstance(d, int) and d > 0 for d in t[2])):
            raise ConfigError(f"worker spec {what}: bad tensor description {t!r}")


@dataclass(frozen=True)
class TopkSpec:
    output: int          # index of the class-vector output among the stage's outputs
    k: int
    apply_softmax: bool  # False when the model already ends in Softmax


@dataclass(frozen=True)
class WorkerSpec:
    stage: int
    worker: int                        # unique in the pipeline; the dispatcher's id
    cores: tuple[int, ...]
    threads: int
    model_path: str
    inputs: tuple[TensorDesc, ...]     # the stage's input boundary, in ring order
    outputs: tuple[TensorDesc, ...]    # the stage's output boundary, in ring order
    passthrough: tuple[str, ...]       # tensors of both boundaries the stage forwards untouched
    data_endpoint: str                 # the worker binds its work PULL here
    results_endpoint: str              # ... and PUSHes done messages here
    ctl_endpoint: str                  # control DEALER -> the coordinator's ROUTER
    parent_pid: int
    in_ring: RingSpec | None = None    # None on tcp:// (tensors travel in frames)
    out_ring: RingSpec | None = None
    preprocess: Any = None             # hetsched.config.InputConfig: stage 0 also decodes images
    image_limits: dict | None = None   # hetsched.model.preprocess.ImageLimits fields
    topk: TopkSpec | None = None       # the last stage computes top-k
    stats_interval: float = 0.25
    connect_timeout: float = 60.0
    log_level: int = 30
    link_keys: dict | None = field(default=None, repr=False)
    spinning: bool | None = None
    cluster: str = ""                  # the plan member's cluster (a launcher places the worker by it)
    # None: the worker is the coordinator's child and dies with it (parent_pid). A number: it runs
    # elsewhere (a Ray actor) and exits when its control link is down this many seconds
    # (hetsched.runtime.liveness)
    orphan_timeout: float | None = None
    # the direct lane (hetsched.client.lane): stage 0 of a one-stage plan on one host also binds a
    # ROUTER here; local clients send it frames and it answers them itself, the coordinator off the path
    direct_endpoint: str | None = None

    def __post_init__(self) -> None:
        if self.stage < 0 or self.worker < 0 or self.threads < 1 or not self.cores:
            raise ConfigError(f"worker spec: bad stage/worker/threads/cores {self.stage}/{self.worker}/"
                              f"{self.threads}/{self.cores}")
        if len(self.cores) != self.threads:
            raise ConfigError(f"worker spec: {self.threads} threads on cores {self.cores}")
        _check_tensors("inputs", self.inputs)
        _check_tensors("outputs", self.outputs)
        names_in = {t[0] for t in self.inputs}
        if not set(self.passthrough) <= names_in & {t[0] for t in self.outputs}:
            raise ConfigError(f"worker spec: passthrough {self.passthrough} not in both boundaries")
        if (self.in_ring is None) != (self.out_ring is None):
            raise ConfigError("worker spec: rings on one side only")
        if self.in_ring is not None:
            if tuple(t[0] for t in self.in_ring.tensors) != tuple(t[0] for t in self.inputs):
                raise ConfigError("worker spec: input ring does not hold the stage's inputs")
            if tuple(t[0] for t in self.out_ring.tensors) != tuple(t[0] for t in self.outputs):
                raise ConfigError("worker spec: output ring does not hold the stage's outputs")
        if self.topk is not None and not 0 <= self.topk.output < len(self.outputs):
            raise ConfigError(f"worker spec: top-k output {self.topk.output} out of range")
        if self.stats_interval <= 0 or self.connect_timeout <= 0 or (self.orphan_timeout is not None
                                                                     and self.orphan_timeout <= 0):
            raise ConfigError("worker spec: intervals must be positive")

    @property
    def name(self) -> str:
        return f"stage {self.stage} worker {self.worker}"

