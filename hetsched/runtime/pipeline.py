"""The coordinator's runtime half: start one pinned worker per stage replica, wire them with
ZeroMQ, feed frames, collect results, keep every frame in flight, stop everything cleanly.

Data path (one host, ipc:// in a private run directory; tcp:// when configured)::

    coordinator PUSH --> stage 0 replicas (PULL, bound) --PUSH--> stage 1 replicas ... --PUSH--> coordinator PULL

Each replica binds its own input, and every upstream sender connects to all replicas of the next
stage, so PUSH deals frames to replicas whose queue has room. High-water marks bound every queue:
a slow stage back-pressures the ones before it, and the coordinator's in-flight window bounds
the rest. Control (READY/CONNECT/RUNNING handshake, STATS heartbeats, STOP) uses a separate
ROUTER socket.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import onnx
import zmq

from hetsched.errors import HetschedError, ProtocolError, ShapeMismatch, WorkerDied
from hetsched.model.graph import ModelGraph, TensorInfo, extract_stage, passthrough_names
from hetsched.planning.planner import Plan
from hetsched.host.process import keep_large_buffers
from hetsched.wire.security import LinkKeys, secure_link_client, secure_link_server, start_link_authenticator
from hetsched.runtime.supervisor import Supervisor
from hetsched.wire.dtypes import ORT_TO_NUMPY
from hetsched.wire.stage_protocol import (KIND_DATA, KIND_SHM, Hop, control, decode_header, encode_header,
                                     encode_header_desc, parse_control, views)

log = logging.getLogger(__name__)



def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class FrameResult:
    frame_id: int
    outputs: list[np.ndarray]
    hops: tuple[Hop, ...]
    t_submit: float
    t_done: float
    tag: Any = None
    error: str | None = None
    code: str | None = None

    @property
    def latency_ms(self) -> float:
        return (self.t_done - self.t_submit) * 1000.0


@dataclass
class _InFlight:
    frames: list[Any]
    t_submit: float
    tag: Any
    tensors: list = field(default_factory=list)  # header descriptors (dtype, shape) to resend it
    kind: int = KIND_DATA


@dataclass
class WorkerHandle:
    stage: int
    replica: int
    cores: tuple[int, ...]
    threads: int
    process: Any
    identity: bytes
    endpoint: str | None = None
    ready: dict | None = None
    stats: dict = field(default_factory=dict)
    last_seen: float = 0.0
    carry: dict = field(default_factory=dict)   # counters of this slot's earlier (dead) processes

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def key(self) -> tuple[int, int]:
        return (self.stage, self.replica)


def _ort_shape_ok(reported: dict, expected: TensorInfo) -> bool:
    shape = reported["shape"]
    if len(shape) != len(expected.shape):
        return False
    for got, want in zip(shape, expected.shape):
        if isinstance(got, int) and got != want:
            return False
    return ORT_TO_NUMPY.get(reported["type"]) == expected.dtype


class Pipeline:
    """A running pipeline for one plan. Use as a context manager, or start() / stop()."""

    def __init__(self, model: onnx.ModelProto, graph: ModelGraph, plan: Plan, *, transport: str = "ipc",
                 host: str = "127.0.0.1", hwm: int = 1, max_inflight: int | None = None,
                 start_timeout: float = 60.0, stats_interval: float = 0.5, spinning: bool = True,
                 run_dir: str | None = None, preprocess: Any = None, image_limits: Any = None,
                 heartbeat_timeout: float = 1.0):
        """``preprocess``: an InputConfig when the plan's layer 0 is image preprocessing (the chain is
        then [preprocess] + graph layers, and stage 0 accepts encoded JPEG/PNG bytes)."""
        self.model, self.graph, self.plan = model, graph, plan
        self.preprocess, self.image_limits = preprocess, image_limits
        self._offset = 1 if preprocess is not None else 0
        self.transport, self.host, self.hwm = transport, host, hwm
        n_workers = sum(s.replicas for s in plan.stages)
        # one frame in work and one waiting per worker keeps every stage busy; more only adds latency
        self.max_inflight = max_inflight or 2 * n_workers + 1
        self.start_timeout, self.stats_interval, self.spinning = start_timeout, stats_interval, spinning
        self._own_run_dir = run_dir is None
        self.run_dir = run_dir or tempfile.mkdtemp(prefix="hetsched-")
        self.workers: list[WorkerHandle] = []
        self.inflight: dict[int, _InFlight] = {}
        self._next_id = 0
        self._ctx: zmq.Context | None = None
        self._feed = self._results = self._ctl = None
        self._started = self._stopped = False
        self.completed = 0
        self.failed = 0
        self.t_started = 0.0
        self._in_expected = [(t.dtype, t.shape) for t in graph.inputs]
        self._out_expected = [(t.dtype, t.shape) for t in graph.outputs]
        self.frame_errors: deque = deque(maxlen=100)
        self._last_check = 0.0
        self.link_keys: LinkKeys | None = None
        self._link_auth = None
        self._outq: deque = deque()            # messages for stage 0 not yet accepted by zmq (never blocks)
        self._specs: dict[tuple[int, int], dict] = {}
        self._downstream: dict[tuple[int, int], list[str]] = {}
        self.stats_interval = min(stats_interval, heartbeat_timeout / 4)
        self.supervisor = Supervisor(heartbeat_timeout=heartbeat_timeout, start_timeout=start_timeout)
        self.recovery_times: list[float] = []  # seconds from a failure to the replay of its frames
        self.replayed = 0
        self.duplicates_dropped = 0

    # ---------------------------------------------------------------- endpoints
    def _endpoint(self, name: str) -> str:
        if self.transport == "tcp":
            return f"tcp://{self.host}:*"
        return f"ipc://{os.path.join(self.run_dir, name)}"

    # ---------------------------------------------------------------- start
    def start(self) -> "Pipeline":
        if self._started:
            return self
        self._started = True
        try:
            self._start()
        except BaseException:
            self.stop(drain_timeout=0)
            raise
        return self

    def _start(self) -> None:
        keep_large_buffers()
        self._ctx = zmq.Context()
        # over tcp:// every link (data and control) is CURVE-encrypted with keys made for this run only
        self.link_keys = LinkKeys.generate() if self.transport == "tcp" else None
        self._link_auth = start_link_authenticator(self._ctx, self.link_keys, "coordinator control/results")
        self._ctl = self._ctx.socket(zmq.ROUTER)
        self._ctl.setsockopt(zmq.LINGER, 0)
        self._ctl.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker takes over its identity
        secure_link_server(self._ctl, self.link_keys)
        self._ctl.bind(self._endpoint("ctl"))
        ctl_ep = self._ctl.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._results = self._ctx.socket(zmq.PULL)
        self._results.setsockopt(zmq.RCVHWM, max(self.hwm, 2))
        self._results.setsockopt(zmq.LINGER, 0)
        secure_link_server(self._results, self.link_keys)
        self._results.bind(self._endpoint("results"))
        results_ep = self._results.getsockopt(zmq.LAST_ENDPOINT).decode()

        for stage in self.plan.stages:
            g_first, g_last, has_prep = self.graph_range(stage)
            path = None
            if g_last >= g_first:
                sub = extract_stage(self.model, self.graph, g_first, g_last)
                path = os.path.join(self.run_dir, f"stage{stage.index}.onnx")
                onnx.save(sub, path)
                passthrough = passthrough_names(self.graph, g_first, g_last)
            else:  # preprocessing only: the decoded image is passed on as the model input
                passthrough = [t.name for t in self.graph.inputs]
            inputs = [t.to_dict() for t in self.graph.boundaries[g_first]]
            for r, cores in enumerate(stage.replica_cores()):
                self._specs[(stage.index, r)] = {
                    "stage": stage.index, "replica": r, "cores": list(cores), "threads": stage.threads,
                    "model_path": path, "inputs": inputs, "passthrough": passthrough,
                    "preprocess": dataclasses.asdict(self.preprocess) if has_prep else None,
                    "image_limits": dataclasses.asdict(self.image_limits) if (has_prep and self.image_limits) else {},
                    "ctl_endpoint": ctl_ep, "bind": self._endpoint(f"s{stage.index}r{r}"), "hwm": self.hwm,
                    "parent_pid": os.getpid(), "stats_interval": self.stats_interval,
                    "spinning": self.spinning, "connect_timeout": self.start_timeout,
                    "log_level": logging.getLogger("hetsched").getEffectiveLevel(),
                    "link_keys": self.link_keys.to_dict() if self.link_keys else None,
                }
                self.workers.append(WorkerHandle(stage.index, r, tuple(cores), stage.threads,
                                                 self._spawn((stage.index, r)), f"s{stage.index}r{r}".encode()))
        self._await("READY")
        self._check_shapes()
        by_stage: dict[int, list[str]] = {}
        for w in self.workers:
            by_stage.setdefault(w.stage, []).append(w.endpoint)
        last = len(self.plan.stages) - 1
        for w in self.workers:
            self._downstream[w.key] = by_stage[w.stage + 1] if w.stage < last else [results_ep]
            self._ctl.send_multipart([w.identity, control("CONNECT", endpoints=self._downstream[w.key])])
            # a replacement binds the same address, so its neighbours reconnect by themselves
            self._specs[w.key]["bind"] = w.endpoint
        self._await("RUNNING")
        now = time.monotonic()
        for w in self.workers:
            stage = self.plan.stages[w.stage]
            # a stage busy with one long frame sends no heartbeat meanwhile: allow for it
            hb = max(self.supervisor.heartbeat_timeout, 3 * stage.service_ms / 1e3 + 0.5)
            self.supervisor.add(w.key, now, hb)
            self.supervisor.on_running(w.key, now)
        self._feed = self._ctx.socket(zmq.PUSH)
        self._feed.setsockopt(zmq.SNDHWM, self.hwm)
        self._feed.setsockopt(zmq.LINGER, 0)
        secure_link_client(self._feed, self.link_keys)
        for ep in by_stage[0]:
            self._feed.connect(ep)
        self.t_started = time.monotonic()
        log.info("pipeline running: %d stages, %d workers", len(self.plan.stages), len(self.workers))

    def _spawn(self, key: tuple[int, int]):
        from workers.stage_worker import run as worker_run
        proc = mp.get_context("spawn").Process(target=worker_run, args=(self._specs[key],),
                                               name=f"hetsched-stage{key[0]}r{key[1]}", daemon=True)
        proc.start()
        return proc

    def graph_range(self, stage) -> tuple[int, int, bool]:
        """(first graph layer, last graph layer, does preprocessing) of a plan stage; last < first when
        the stage only preprocesses."""
        return (max(stage.first_layer - self._offset, 0), stage.last_layer - self._offset,
                self._offset == 1 and stage.first_layer == 0)

    def _worker(self, identity: bytes) -> WorkerHandle | None:
        for w in self.workers:
            if w.identity == identity:
                return w
        return None

    def _await(self, what: str) -> None:
        pending = {w.identity for w in self.workers}
        deadline = time.monotonic() + self.start_timeout
        while pending:
            if time.monotonic() > deadline:
                names = ", ".join(sorted(p.decode() for p in pending))
                raise WorkerDied(f"timed out after {self.start_timeout:.0f}s waiting for {what} from {names}")
            for w in self.workers:
                if w.identity in pending and not w.process.is_alive():
                    raise WorkerDied(f"stage {w.stage} replica {w.replica} (pid {w.pid}) "
                                     f"{describe_exit(w.process.exitcode)} before {what}")
            if not self._ctl.poll(100):
                continue
            identity, raw = self._ctl.recv_multipart()
            msg = parse_control(raw)
            w = self._worker(identity)
            if w is None:
                continue
            if msg["type"] == "FAILED":
                raise WorkerDied(f"stage {w.stage} replica {w.replica} failed to start: {msg['error']}")
            if msg["type"] == what:
                pending.discard(identity)
                w.last_seen = time.monotonic()
                if what == "READY":
                    w.ready, w.endpoint = msg, msg["endpoint"]
            elif msg["type"] == "STATS":
                self._on_stats(w, msg)

    def _check_shapes(self) -> None:
        for w in self.workers:
            self._check_worker(w)

    def _check_worker(self, w: WorkerHandle) -> None:
        g_first, g_last, _ = self.graph_range(self.plan.stages[w.stage])
        if g_last < g_first:
            return  # preprocessing-only stage: no session
        want_in = {t.name: t for t in self.graph.boundaries[g_first]}
        passthrough = set(w.ready.get("passthrough", []))
        want_out = {t.name: t for t in self.graph.boundaries[g_last + 1] if t.name not in passthrough}
        got_in = {i["name"]: i for i in w.ready["inputs"]}
        got_out = {o["name"]: o for o in w.ready["outputs"]}
        if not set(got_in) <= set(want_in):
            raise ShapeMismatch(f"stage {w.stage}: inputs {sorted(got_in)}, plan expects {sorted(want_in)}")
        if sorted(got_out) != sorted(want_out):
            raise ShapeMismatch(f"stage {w.stage}: outputs {sorted(got_out)}, plan expects {sorted(want_out)}")
        for name, rep in list(got_in.items()) + list(got_out.items()):
            want = want_in.get(name) or want_out.get(name)
            if not _ort_shape_ok(rep, want):
                raise ShapeMismatch(f"stage {w.stage} tensor {name!r}: session has {rep['type']}{rep['shape']}, "
                                    f"plan expects {want.dtype}{list(want.shape)}")
        if sorted(w.ready["cores"]) != sorted(w.cores):
            raise WorkerDied(f"stage {w.stage} replica {w.replica} runs on cores {w.ready['cores']}, "
                             f"plan says {list(w.cores)}")

    # ---------------------------------------------------------------- data path
    @property
    def can_submit(self) -> bool:
        return not self.supervisor.recovering and len(self.inflight) < self.max_inflight

    def submit(self, arrays: Sequence[np.ndarray] | np.ndarray, tag: Any = None) -> int:
        """Send one frame (model inputs in graph order) into stage 0; returns its frame id.

        Does not block on the in-flight window: check ``can_submit`` or use ``run``.
        """
        if isinstance(arrays, np.ndarray):
            arrays = [arrays]
        arrays = [np.ascontiguousarray(a) for a in arrays]
        got = [(a.dtype.name, tuple(a.shape)) for a in arrays]
        if got != self._in_expected:
            raise ShapeMismatch(f"input {got}, model expects {self._in_expected}")
        fid = self._next_id
        self._next_id += 1
        t = time.monotonic()
        header = encode_header(fid, t, arrays)
        self._send_feed([header, *arrays])
        self.inflight[fid] = _InFlight(list(arrays), t, tag, [(a.dtype.name, a.shape) for a in arrays])
        return fid

    def submit_shm(self, ref: dict, dtype: str, shape: tuple[int, ...], tag: Any = None) -> int:
        """Send a reference to an input in a shared-memory slot (``hetsched.wire.shm``); stage 0 reads it there."""
        if [(dtype, tuple(shape))] != self._in_expected:
            raise ShapeMismatch(f"input {dtype}{list(shape)}, model expects {self._in_expected}")
        fid = self._next_id
        self._next_id += 1
        t = time.monotonic()
        payload = control("SHM", **ref)
        desc = [(dtype, tuple(shape))]
        self._send_feed([encode_header_desc(fid, t, desc, kind=KIND_SHM), payload])
        self.inflight[fid] = _InFlight([payload], t, tag, desc, KIND_SHM)
        return fid

    def submit_encoded(self, data: bytes | Any, tag: Any = None) -> int:
        """Send one encoded JPEG/PNG image; stage 0 decodes and preprocesses it."""
        if self.preprocess is None:
            raise ProtocolError("NO_PREPROCESS", "this pipeline takes tensors only (no preprocessing stage)")
        buf = data.buffer if hasattr(data, "buffer") else data
        arr = np.frombuffer(buf, dtype=np.uint8)
        fid = self._next_id
        self._next_id += 1
        t = time.monotonic()
        self._send_feed([encode_header(fid, t, [arr]), data])
        self.inflight[fid] = _InFlight([data], t, tag, [("uint8", arr.shape)])
        return fid

    def _send_feed(self, parts: list) -> None:
        self._outq.append(parts)
        self._flush_feed()

    def _flush_feed(self) -> None:
        """Hand queued frames to zmq without ever blocking the coordinator's loop."""
        while self._outq:
            try:
                self._feed.send_multipart(self._outq[0], flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._outq.popleft()

    def _replay(self) -> None:
        """Resend every frame in flight; results already delivered are never delivered twice."""
        self._outq.clear()
        for fid in sorted(self.inflight):
            entry = self.inflight[fid]
            header = encode_header_desc(fid, entry.t_submit, entry.tensors, kind=entry.kind)
            self._outq.append([header, *entry.frames])
        self.replayed += len(self.inflight)
        self._flush_feed()

    def register(self, poller: zmq.Poller) -> None:
        """Add the pipeline's sockets to a caller's poller (see ``process``)."""
        poller.register(self._results, zmq.POLLIN)
        poller.register(self._ctl, zmq.POLLIN)

    def poll(self, timeout_ms: int = 100) -> list[FrameResult]:
        """Wait up to timeout_ms for results and control messages; return finished frames."""
        poller = zmq.Poller()
        self.register(poller)
        return self.process(dict(poller.poll(timeout_ms)))

    def process(self, events: dict) -> list[FrameResult]:
        """Handle whatever of the pipeline's sockets is ready in ``events``; return finished frames."""
        done: list[FrameResult] = []
        if self._ctl in events:
            self._drain_control(done)
        if self._results in events:
            while self._results.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                res = self._on_result(self._results.recv_multipart(copy=False))
                if res is not None:
                    done.append(res)
        if self._outq:
            self._flush_feed()
        now = time.monotonic()
        if now - self._last_check > 0.05:
            self._last_check = now
            self._supervise(now)
        return done

    def _supervise(self, now: float) -> None:
        sup = self.supervisor
        alive = {w.key: w.process.is_alive() for w in self.workers}
        for w in self.workers:
            sup.mark_stable(w.key, now)
        for action in sup.tick(now, alive):
            w = next((x for x in self.workers if x.key == action.key), None)
            if action.kind == "kill" and w is not None:
                log.warning("stage %d replica %d (pid %s) %s: killing it", w.stage, w.replica, w.pid, action.reason)
                w.process.kill()
                w.process.join(2.0)
            elif action.kind == "spawn" and w is not None:
                code = w.process.exitcode
                log.warning("stage %d replica %d (pid %s) %s (%s); restarting it on cores %s (restart %d)",
                            w.stage, w.replica, w.pid, action.reason, describe_exit(code), list(w.cores),
                            sup.slots[w.key].restarts)
                w.process.join(0.5)
                for k in ("frames", "errors", "wait_s", "compute_s", "send_s"):
                    w.carry[k] = w.carry.get(k, 0) + w.stats.get(k, 0)
                w.stats = {"all_samples": w.stats.get("all_samples", [])}
                w.ready = None
                w.process = self._spawn(w.key)
            elif action.kind == "replay":
                if sup.t_failure is not None:
                    self.recovery_times.append(now - sup.t_failure)
                log.warning("all stages running again; replaying %d frames in flight", len(self.inflight))
                self._replay()

    def _on_result(self, parts: list) -> FrameResult | None:
        t_done = time.monotonic()
        hdr = decode_header(parts[0].buffer)
        entry = self.inflight.pop(hdr.frame_id, None)
        if entry is None:  # a replayed frame finished twice: the first result was delivered
            self.duplicates_dropped += 1
            return None
        outs = views(hdr, parts[1:], self._out_expected)
        self.completed += 1
        return FrameResult(hdr.frame_id, outs, hdr.hops, hdr.t_submit, t_done, entry.tag)

    def _drain_control(self, done: list[FrameResult]) -> None:
        while True:
            try:
                identity, raw = self._ctl.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = parse_control(raw)
            except ProtocolError as exc:
                log.warning("bad control message: %s", exc)
                continue
            w = self._worker(identity)
            if w is None:
                continue
            now = w.last_seen = time.monotonic()
            if w.key in self.supervisor.slots:
                self.supervisor.on_heartbeat(w.key, now)
            if msg["type"] == "STATS":
                if msg.get("pid") in (None, w.pid):
                    self._on_stats(w, msg)
            elif msg["type"] == "READY":  # a replacement worker
                w.ready, w.endpoint = msg, msg["endpoint"]
                try:
                    self._check_worker(w)
                except (ShapeMismatch, WorkerDied) as exc:
                    log.error("replacement for stage %d replica %d is wrong: %s", w.stage, w.replica, exc)
                    w.process.kill()
                    continue
                self._ctl.send_multipart([w.identity, control("CONNECT", endpoints=self._downstream[w.key])])
            elif msg["type"] == "RUNNING":
                self.supervisor.on_running(w.key, now)
            elif msg["type"] == "FRAME_ERROR":
                fid = msg.get("frame_id")
                entry = self.inflight.pop(fid, None) if fid is not None else None
                self.frame_errors.append(msg)
                if entry is not None:
                    self.failed += 1
                    done.append(FrameResult(fid, [], (), entry.t_submit, time.monotonic(), entry.tag,
                                            error=msg.get("error"), code=msg.get("code")))
            elif msg["type"] == "FAILED":
                log.error("stage %d replica %d failed: %s", w.stage, w.replica, msg.get("error"))
                w.process.kill()

    def _on_stats(self, w: WorkerHandle, msg: dict) -> None:
        prev = w.stats
        samples = list(prev.get("all_samples", ()))[-4096:] + list(msg.get("samples", ()))
        w.stats = {**msg, "all_samples": samples}

    def run(self, inputs: Iterable[Sequence[np.ndarray] | np.ndarray], timeout: float = 60.0) -> Iterator[FrameResult]:
        """Stream ``inputs`` through the pipeline; yield results in input order."""
        it = iter(inputs)
        exhausted = False
        pending: dict[int, FrameResult] = {}
        next_out = self._next_id
        last_progress = time.monotonic()
        while True:
            while not exhausted and self.can_submit:
                try:
                    x = next(it)
                except StopIteration:
                    exhausted = True
                    break
                self.submit(x)
            if exhausted and not self.inflight and not pending:
                return
            for res in self.poll(50):
                pending[res.frame_id] = res
                last_progress = time.monotonic()
            while next_out in pending:
                yield pending.pop(next_out)
                next_out += 1
            if exhausted and not self.inflight and next_out not in pending and pending:
                next_out = min(pending)
            if self.inflight and time.monotonic() - last_progress > timeout:
                raise HetschedError(f"no result for {timeout:.0f} s with {len(self.inflight)} frames in flight")

    def drain(self, timeout: float = 10.0) -> list[FrameResult]:
        deadline = time.monotonic() + timeout
        done = []
        while self.inflight and time.monotonic() < deadline:
            done += self.poll(50)
        return done

    # ---------------------------------------------------------------- stats
    def stage_stats(self) -> list[dict]:
        """Per stage: frames, compute/wait/send seconds, recent compute samples, from worker STATS."""
        out = []
        for stage in self.plan.stages:
            ws = [w for w in self.workers if w.stage == stage.index]
            agg = {"stage": stage.index, "replicas": len(ws), "pids": [w.pid for w in ws],
                   "frames": 0, "errors": 0, "wait_s": 0.0, "compute_s": 0.0, "send_s": 0.0, "samples": []}
            for w in ws:
                for k in ("frames", "errors", "wait_s", "compute_s", "send_s"):
                    agg[k] += w.stats.get(k, 0) + w.carry.get(k, 0)
                agg["samples"] += w.stats.get("all_samples", [])
            out.append(agg)
        return out

    # ---------------------------------------------------------------- stop
    def stop(self, drain_timeout: float = 5.0, grace: float = 3.0) -> None:
        """Drain in-flight frames (bounded), ask workers to stop, wait, kill, join. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if drain_timeout and self.inflight and self._results is not None:
                try:
                    self.drain(drain_timeout)
                except HetschedError as exc:
                    log.warning("drain stopped: %s", exc)
            if self._ctl is not None:
                for w in self.workers:
                    try:
                        self._ctl.send_multipart([w.identity, control("STOP")], flags=zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass
                deadline = time.monotonic() + grace
                while any(w.process.is_alive() for w in self.workers) and time.monotonic() < deadline:
                    try:
                        if self._ctl.poll(50):
                            self._drain_control([])
                    except (zmq.ZMQError, HetschedError):
                        time.sleep(0.01)
        finally:
            reap_processes([w.process for w in self.workers], grace=0.5)
            for sock in (self._feed, self._results, self._ctl):
                if sock is not None:
                    sock.close(linger=0)
            if self._link_auth is not None:
                self._link_auth.stop()
                self._link_auth = None
            if self._ctx is not None:
                self._ctx.term()
            if self._own_run_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> "Pipeline":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop(drain_timeout=0 if exc[0] else 5.0)


def reap_processes(procs: Sequence[Any], grace: float = 2.0) -> None:
    """terminate -> wait -> kill -> join every process; on return all are joined."""
    deadline = time.monotonic() + grace
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5.0)
