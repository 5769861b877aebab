"""The coordinator's worker processes: specs from a plan, spawning, the READY check, statistics.

One :class:`WorkerHandle` per worker of every stage's pool. Workers are started with the ``spawn``
method (a fresh interpreter, nothing inherited but the spec) and pin themselves before they create
their session. A replacement reuses the handle, its spec and its endpoint.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from dataclasses import dataclass, field
from typing import Any

from hetsched.errors import ShapeMismatch, WorkerDied
from hetsched.runtime.spec import WorkerSpec
from hetsched.wire.dtypes import ORT_TO_NUMPY

log = logging.getLogger(__name__)

def local_launcher(spec: WorkerSpec) -> Any:
    """Start a worker on this host: a ``spawn``-ed process (a fresh interpreter, nothing inherited but
    the spec). A launcher is any callable spec -> process handle with ``pid``, ``is_alive()``,
    ``exitcode``, ``kill()``, ``terminate()`` and ``join(timeout)`` (as multiprocessing.Process);
    hetsched.runtime.pipeline.Pipeline takes another one to place workers elsewhere."""
    from hetsched.runtime.worker import run as worker_run
    proc = mp.get_context("spawn").Process(target=worker_run, args=(spec,), name=f"hetsched-s{spec.stage}w{spec.worker}",
                                           daemon=True)
    proc.start()
    return proc


Launcher = Any  # Callable[[WorkerSpec], process handle], see local_launcher

STAT_KEYS = ("frames", "errors", "wait_s", "compute_s", "send_s", "input_s", "compute_cpu_s")
MAX_SAMPLES = 4096


@dataclass
class WorkerHandle:
    spec: WorkerSpec
    cluster: str
    predicted_ms: float       # service time of one frame (the dispatcher's first estimate)
    layers_ms: float = 0.0    # the layers' own compute (what the worker measures as compute)
    process: Any = None
    endpoint: str | None = None
    ready: dict | None = None
    running: bool = False
    stats: dict = field(default_factory=dict)
    carry: dict = field(default_factory=dict)   # counters of this worker's earlier (dead) processes
    samples: list = field(default_factory=list)
    feed: Any = None                            # the coordinator's PUSH socket to this worker
    direct_endpoint: str | None = None          # its direct lane's ROUTER (hetsched.client.lane), if any

    @property
    def wid(self) -> int:
        return self.spec.worker

    @property
    def stage(self) -> int:
        return self.spec.stage

    @property
    def cores(self) -> tuple[int, ...]:
        return self.spec.cores

    @property
    def threads(self) -> int:
        return self.spec.threads

    @property
    def identity(self) -> bytes:
        return f"w{self.spec.worker}".encode()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def spawn(self, launcher: "Launcher | None" = None) -> None:
        self.process = (launcher or local_launcher)(self.spec)
        self.ready, self.running = None, False

    def retire_counters(self) -> None:
        """Keep a dead process's counters (its replacement starts from zero)."""
        for k in STAT_KEYS:
            self.carry[k] = self.carry.get(k, 0) + self.stats.get(k, 0)
        self.stats = {}

    def on_stats(self, msg: dict) -> None:
        if msg.get("pid") not in (None, self.pid):
            return
        self.stats = msg
        self.samples = (self.samples + list(msg.get("samples", ())))[-MAX_SAMPLES:]

    def total(self, key: str) -> float:
        return self.stats.get(key, 0) + self.carry.get(key, 0)


def check_ready(w: WorkerHandle, msg: dict) -> None:
    """The worker's session must take and give exactly what the plan says, on the plan's cores."""
    spec = w.spec
    want_in = {t[0]: t for t in spec.inputs}
    want_out = {t[0]: t for t in spec.outputs if t[0] not in spec.passthrough}
    got_in = {i["name"]: i for i in msg["inputs"]}
    got_out = {o["name"]: o for o in msg["outputs"]}
    if not set(got_in) <= set(want_in):
        raise ShapeMismatch(f"{spec.name}: session inputs {sorted(got_in)}, plan expects {sorted(want_in)}")
    if sorted(got_out) != sorted(want_out):
        raise ShapeMismatch(f"{spec.name}: session outputs {sorted(got_out)}, plan expects {sorted(want_out)}")
    for name, rep in list(got_in.items()) + list(got_out.items()):
        _, dtype, shape = want_in.get(name) or want_out[name]
        ok = len(rep["shape"]) == len(shape) and ORT_TO_NUMPY.get(rep["type"]) == dtype and all(
            not isinstance(g, int) or g == s for g, s in zip(rep["shape"], shape))
        if not ok:
            raise ShapeMismatch(f"{spec.name} tensor {name!r}: session has {rep['type']}{rep['shape']}, "
                                f"plan expects {dtype}{list(shape)}")
    if sorted(msg["cores"]) != sorted(spec.cores):
        raise WorkerDied(f"{spec.name} runs on cores {msg['cores']}, plan says {list(spec.cores)}")


def stage_model(model: Any, graph: Any, stage: Any, topk: Any = None) -> Any:
    """The ONNX sub-model a stage's workers run; the last stage's also computes the top-k
    (``hetsched.model.topk.with_topk``)."""
    from hetsched.model.graph import extract_stage
    from hetsched.model.topk import with_topk
    sub = extract_stage(model, graph, stage.first_layer, stage.last_layer)
    if topk is not None:
        sub = with_topk(sub, graph.outputs[topk.output].name, topk.k, topk.apply_softmax)
    return sub


def stage_stats(plan, workers: list[WorkerHandle], dispatcher) -> list[dict]:
    """Per stage: frames, compute/wait/send seconds, recent compute samples, per-worker detail."""
    out = []
    for st in plan.stages:
        ws = [w for w in workers if w.stage == st.index]
        agg: dict[str, Any] = {"stage": st.index, "replicas": len(ws), "pids": [w.pid for w in ws],
                               "samples": [], "workers": []}
        for k in STAT_KEYS:
            agg[k] = sum(w.total(k) for w in ws)
        for w in ws:
            agg["samples"] += w.samples
            slot = dispatcher.workers.get(w.wid)
            node = getattr(getattr(w.process, "node", None), "name", None)  # a Ray node; None: this host
            agg["workers"].append({"worker": w.wid, "pid": w.pid, "node": node, "cluster": w.cluster,
                                   "cores": list(w.cores),
                                   "threads": w.threads, "predicted_ms": w.predicted_ms,
                                   "predicted_compute_ms": w.layers_ms,
                                   "measured_service_ms": slot.service_s * 1e3 if slot else None,
                                   **{k: w.total(k) for k in STAT_KEYS}})
        out.append(agg)
    return out
