"""The coordinator's runtime half (about 600 lines on purpose: the coordinator's side of the data path
is one state machine over one set of sockets, and its message handling reads best in one place): start the plan's workers, dispatch frames, collect, supervise, stop.

Data path (one host: ipc:// in a private run directory, activations in shared-memory rings)::

    submit -> ledger (slot) -> dispatcher picks a worker of stage 0 -> work header (PUSH) -> worker
    worker: run on ring[0][slot] (or a client's region slot, or decode the image) -> ring[1][slot]
    worker -> done header (PUSH -> the coordinator's PULL) -> ledger: next stage ... -> result

The coordinator dispatches every stage itself, so a stage can be a pool of workers on different
clusters (each frame to the worker that finishes it first, ``runtime.dispatch``) and it always knows
where every frame is: when a worker is lost only its frames are replayed, at their stage, from their
intact input slot (``runtime.ledger``). Control (READY/GO/RUNNING, STATS heartbeats, regions, STOP)
uses a separate ROUTER socket. Over tcp:// (workers on other hosts) tensors travel in the messages
and the coordinator relays them from stage to stage. ``transport="mixed"`` (workers on several
nodes, ``hetsched.placement``): each worker for which ``endpoint_host`` names a host is linked over
tcp:// (tensors in its messages), the others by rings on this host; the coordinator moves a frame's
tensors between a ring slot and messages where a link of one kind follows one of the other.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import onnx
import zmq

from hetsched.errors import HetschedError, ProtocolError, ShapeMismatch, WorkerDied
from hetsched.host.process import describe_exit, keep_large_buffers, reap_processes
from hetsched.model.graph import ModelGraph, passthrough_names
from hetsched.planning.plan import Plan
from hetsched.runtime.dispatch import Dispatcher
from hetsched.runtime.ledger import FrameRec, Hop, Ledger
from hetsched.runtime.spec import TopkSpec, WorkerSpec
from hetsched.runtime.supervisor import Supervisor
from hetsched.runtime.workers import WorkerHandle, check_ready, stage_model, stage_stats
from hetsched.wire import stage_protocol as sp
from hetsched.wire.rings import Ring, RingSpec, create_ring, new_ring_name, sweep_stale_rings
from hetsched.wire.links import LinkKeys, secure_link_client, secure_link_server, start_link_authenticator

log = logging.getLogger(__name__)

SRC_RING, SRC_REGION, SRC_BYTES, SRC_TENSORS, SRC_PIXELS = "ring", "region", "bytes", "tensors", "pixels"


@dataclass
class FrameResult:
    frame_id: int
    outputs: list[np.ndarray]
    top: tuple | None  # flat (index, score, ...) of the last stage's top-k
    hops: list[Hop]
    t_submit: float
    t_done: float
    tag: Any = None
    error: str | None = None
    code: str | None = None

    @property
    def latency_ms(self) -> float:
        return (self.t_done - self.t_submit) * 1000.0


def _descs(tensors) -> tuple:
    return tuple((t.name, t.dtype, tuple(t.shape)) for t in tensors)


class Pipeline:
    """A running pipeline for one plan. Use as a context manager, or start() / stop()."""

    def __init__(self, model: onnx.ModelProto, graph: ModelGraph, plan: Plan, *, transport: str = "ipc",
                 host: str = "127.0.0.1", max_inflight: int | None = None, credits: int = 2,
                 start_timeout: float = 60.0, stats_interval: float = 0.25, spinning: bool | None = None,
                 run_dir: str | None = None, preprocess: Any = None, image_limits: Any = None,
                 heartbeat_timeout: float = 1.0, topk: TopkSpec | None = None, max_failures: int = 2,
                 frame_ids: Iterator[int] | None = None, generation: int = 0, launcher: Any = None,
                 endpoint_host: Any = None, direct_lane: bool = True):
        """``preprocess``: an InputConfig: stage 0's workers also decode JPEG/PNG frames into the model
        input (whichever worker takes the frame). ``topk``: the last stage reports the top-k classes."""
        self.model, self.graph, self.plan = model, graph, plan
        self.preprocess, self.image_limits, self.topk = preprocess, image_limits, topk
        self.transport, self.host = transport, host
        self.credits = credits
        n_workers = sum(s.replicas for s in plan.stages)
        self.max_inflight = max_inflight or credits * n_workers + len(plan.stages)
        self.start_timeout = start_timeout
        self.stats_interval = min(stats_interval, heartbeat_timeout / 4)
        self.spinning = spinning
        self._own_run_dir = run_dir is None
        self.run_dir = run_dir or tempfile.mkdtemp(prefix="hetsched-")
        self.workers: list[WorkerHandle] = []
        self._by_wid: dict[int, WorkerHandle] = {}
        self._by_ident: dict[bytes, WorkerHandle] = {}
        self.generation = generation
        self.ledger = Ledger(len(plan.stages), self.max_inflight, max_failures, frame_ids)
        self.dispatcher = Dispatcher()
        self.supervisor = Supervisor(heartbeat_timeout=heartbeat_timeout, start_timeout=start_timeout)
        self.rings: list[Ring] = []
        self._carry: dict[int, list] = {}          # tcp: tensors a frame carries to its next stage
        self._regions: dict[int, dict] = {}        # client shared-memory regions stage 0 maps
        self._ctx: zmq.Context | None = None
        self._results = self._ctl = None
        self.link_keys: LinkKeys | None = None
        self._link_auth = None
        self._started = self._stopped = self._running = False
        self._t_begin = 0.0
        self._retire_t: float | None = None
        self.completed = self.failed = 0
        self.t_started = 0.0
        self.recovery_times: deque = deque(maxlen=100)
        self.frame_errors: deque = deque(maxlen=100)
        self._last_check = 0.0
        self._in_expected = [(t.dtype, tuple(t.shape)) for t in graph.inputs]
        self._tcp = transport == "tcp"
        self._mixed = transport == "mixed"     # per worker: rings here, or tensors in tcp:// messages
        self._net = self._tcp or self._mixed   # the coordinator's own sockets over tcp://, CURVE
        # how workers are started (hetsched.runtime.workers.local_launcher by default) and, over tcp://,
        # which address each worker binds (a callable (stage, worker, cores, cluster) -> host; with
        # transport "mixed", None: a worker on this host, linked by shared-memory rings)
        self.launcher, self.endpoint_host = launcher, endpoint_host
        # called with (cluster, measured compute ms, predicted layers ms) for every frame a worker did
        self.observer: Any = None
        # The direct lane (hetsched.client.lane): a one-stage plan on this host lets local clients
        # with shared-memory input send frames to its workers and take the answers from them; the
        # coordinator only learns counts and compute times from the workers' STATS.
        self.direct_lane = direct_lane and transport == "ipc" and len(plan.stages) == 1 and launcher is None
        self.lane_version = 0           # changes whenever what lane_info() says changes
        self.direct_completed = 0       # frames the workers answered on the lane (from their STATS)
        self.on_direct_done: Any = None  # called with the count of newly reported lane frames
        self._direct_seen: dict[int, tuple] = {}  # wid -> (pid, frames reported)

    # ---------------------------------------------------------------- compatibility figures
    @property
    def inflight(self) -> dict[int, FrameRec]:
        return self.ledger.frames

    @property
    def replayed(self) -> int:
        return self.ledger.replayed

    @property
    def duplicates_dropped(self) -> int:
        return self.ledger.duplicates

    # ---------------------------------------------------------------- start
    def _endpoint(self, name: str) -> str:
        return f"tcp://{self.host}:*" if self._net else f"ipc://{os.path.join(self.run_dir, name)}"

    def _worker_endpoint(self, wid: int, stage: int, cores, cluster: str) -> tuple[str, bool]:
        """(the endpoint the worker binds, whether its tensors travel in messages)"""
        host = self.endpoint_host(stage, wid, tuple(cores), cluster) if self._net and self.endpoint_host else None
        if host is not None:
            return f"tcp://{host}:*", True
        if self._mixed:
            return f"ipc://{os.path.join(self.run_dir, f'w{wid}')}", False
        return self._endpoint(f"w{wid}"), self._tcp

    def start(self) -> "Pipeline":
        """Start every worker and wait (bounded) until all run."""
        self.begin()
        try:
            self._await(lambda w: w.running, "RUNNING")
        except BaseException:
            self.stop(drain_timeout=0)
            raise
        return self

    def begin(self) -> "Pipeline":
        """Start the workers without waiting: ``process`` brings them to RUNNING (``running`` says when),
        so a new plan can start while an old one goes on serving. Raises if something fails at once."""
        if self._started:
            return self
        self._started = True
        self._t_begin = time.monotonic()
        try:
            self._begin()
        except BaseException:
            self.stop(drain_timeout=0)
            raise
        return self

    @property
    def running(self) -> bool:
        return self._running

    def _begin(self) -> None:
        keep_large_buffers()
        sweep_stale_rings()
        self._ctx = zmq.Context()
        self.link_keys = LinkKeys.generate() if self._net else None
        self._link_auth = start_link_authenticator(self._ctx, self.link_keys, "coordinator control/results")
        self._ctl = self._ctx.socket(zmq.ROUTER)
        self._ctl.setsockopt(zmq.LINGER, 0)
        self._ctl.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker takes over its identity
        secure_link_server(self._ctl, self.link_keys)
        self._ctl.bind(self._endpoint("ctl"))
        self._results = self._ctx.socket(zmq.PULL)
        self._results.setsockopt(zmq.RCVHWM, 100000)
        self._results.setsockopt(zmq.LINGER, 0)
        secure_link_server(self._results, self.link_keys)
        self._results.bind(self._endpoint("results"))
        ctl_ep = self._ctl.getsockopt(zmq.LAST_ENDPOINT).decode()
        results_ep = self._results.getsockopt(zmq.LAST_ENDPOINT).decode()
        stages = self.plan.stages
        bounds = [self.graph.boundaries[s.first_layer] for s in stages] + [self.graph.boundaries[-1]]
        ring_specs: list[RingSpec | None] = [None] * len(bounds)
        if not self._tcp:
            token = os.urandom(4).hex()
            for b, tensors in enumerate(bounds):
                ring_specs[b] = RingSpec(new_ring_name(b, token), self.max_inflight, _descs(tensors))
                self.rings.append(create_ring(ring_specs[b]))
        last = len(stages) - 1
        wid = 0
        for st in stages:
            path = os.path.join(self.run_dir, f"stage{st.index}.onnx")
            onnx.save(stage_model(self.model, self.graph, st, self.topk if st.index == last else None), path)
            passthrough = tuple(passthrough_names(self.graph, st.first_layer, st.last_layer))
            for member, cores in st.workers():
                endpoint, framed = self._worker_endpoint(wid, st.index, cores, member.cluster)
                spec = WorkerSpec(
                    stage=st.index, worker=wid, cores=tuple(cores), threads=member.threads, model_path=path,
                    inputs=_descs(bounds[st.index]), outputs=_descs(bounds[st.index + 1]), passthrough=passthrough,
                    data_endpoint=endpoint, results_endpoint=results_ep, ctl_endpoint=ctl_ep, parent_pid=os.getpid(),
                    in_ring=None if framed else ring_specs[st.index], out_ring=None if framed else ring_specs[st.index + 1],
                    preprocess=self.preprocess if st.index == 0 else None,
                    image_limits=dataclasses.asdict(self.image_limits) if (st.index == 0 and self.image_limits) else None,
                    topk=self.topk if st.index == last else None, stats_interval=self.stats_interval,
                    connect_timeout=self.start_timeout,
                    log_level=logging.getLogger("hetsched").getEffectiveLevel(),
                    link_keys=self.link_keys.to_dict() if self.link_keys else None, spinning=self.spinning,
                    cluster=member.cluster,
                    direct_endpoint=(f"ipc://{os.path.join(self.run_dir, f'd{wid}')}" if self.direct_lane else None))
                w = WorkerHandle(spec, member.cluster, member.service_ms, member.layers_ms)
                self.workers.append(w)
                self._by_wid[wid], self._by_ident[w.identity] = w, w
                self.dispatcher.add(wid, st.index, member.service_ms / 1e3, self.credits)
                wid += 1
        for w in self.workers:
            w.spawn(self.launcher)

    def _on_all_running(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            # a worker busy with one long frame sends no heartbeat meanwhile: allow for it
            hb = max(self.supervisor.heartbeat_timeout, 3 * w.predicted_ms / 1e3 + 0.5)
            self.supervisor.add(w.wid, now, hb)
            self.supervisor.on_running(w.wid, now)
            self.dispatcher.set_accepting(w.wid, True)
        self._running = True
        self.lane_version += 1
        self.t_started = now
        log.info("pipeline generation %d running: %d stages, %d workers, %d slots (started in %.2f s)",
                 self.generation, len(self.plan.stages), len(self.workers), self.max_inflight, now - self._t_begin)

    def check_start(self) -> None:
        """While starting: raise WorkerDied if a worker died or the start took too long."""
        if self._running:
            return
        for w in self.workers:
            if not w.running and not w.process.is_alive():
                raise WorkerDied(f"{w.spec.name} (pid {w.pid}) {describe_exit(w.process.exitcode)} before RUNNING")
        if time.monotonic() - self._t_begin > self.start_timeout:
            names = ", ".join(w.spec.name for w in self.workers if not w.running)
            raise WorkerDied(f"timed out after {self.start_timeout:.0f}s waiting for RUNNING from {names}")

    def _await(self, done, what: str) -> None:
        while not all(done(w) for w in self.workers):
            self.check_start()
            if self._ctl.poll(100):
                self._drain_control([])

    def _go(self, w: WorkerHandle) -> None:
        """A READY worker: (re)connect its work socket, tell it the client regions, let it run."""
        if w.feed is not None:
            w.feed.close(linger=0)  # drops anything still queued for a dead predecessor
        w.feed = self._ctx.socket(zmq.PUSH)
        w.feed.setsockopt(zmq.SNDHWM, 1000)
        w.feed.setsockopt(zmq.LINGER, 0)
        secure_link_client(w.feed, self.link_keys)
        w.feed.connect(w.endpoint)
        if w.stage == 0:
            for rid, reg in self._regions.items():
                self._ctl.send_multipart([w.identity, sp.control("REGION", id=rid, **reg)])
        self._ctl.send_multipart([w.identity, sp.control("GO")])

    # ---------------------------------------------------------------- client regions (stage 0 maps them)
    def add_region(self, rid: int, name: str, slots: int, slot_bytes: int) -> None:
        self._regions[rid] = {"name": name, "slots": slots, "slot_bytes": slot_bytes}
        for w in self.workers:
            if w.stage == 0 and w.ready is not None:
                self._ctl.send_multipart([w.identity, sp.control("REGION", id=rid, **self._regions[rid])])

    def remove_region(self, rid: int) -> None:
        if self._regions.pop(rid, None) is not None:
            for w in self.workers:
                if w.stage == 0 and w.ready is not None:
                    self._ctl.send_multipart([w.identity, sp.control("UNREGION", id=rid)])

    # ---------------------------------------------------------------- submitting
    @property
    def can_submit(self) -> bool:
        return self._running and self.ledger.free_slots > 0

    def submit(self, arrays: Sequence[np.ndarray] | np.ndarray, tag: Any = None, want_outputs: bool = True) -> int:
        """One frame of model inputs (graph order), copied into the frame's input slot."""
        if isinstance(arrays, np.ndarray):
            arrays = [arrays]
        got = [(a.dtype.name, tuple(a.shape)) for a in arrays]
        if got != self._in_expected:
            raise ShapeMismatch(f"input {got}, model expects {self._in_expected}")
        if self._tcp:
            rec = self.ledger.admit((SRC_TENSORS, [np.ascontiguousarray(a) for a in arrays]), time.monotonic(),
                                    tag, want_outputs)
        else:
            rec = self.ledger.admit((SRC_RING, None), time.monotonic(), tag, want_outputs)
            for dst, a in zip(self.rings[0].views(rec.slot), arrays):
                np.copyto(dst, a)
        self._pump()
        return rec.fid

    def submit_region(self, rid: int, slot: int, pixels: tuple | None = None, tag: Any = None,
                      want_outputs: bool = False) -> int:
        """An input that sits in a client's registered shared-memory region (stage 0 reads it there):
        a model input tensor, or raw camera ``pixels`` = (encoding, width, height, color)."""
        if pixels is not None and self.preprocess is None:
            raise ProtocolError("NO_PREPROCESS", "this pipeline takes tensors only (no image preprocessing)")
        rec = self.ledger.admit((SRC_REGION, (rid, slot, pixels)), time.monotonic(), tag, want_outputs)
        self._pump()
        return rec.fid

    def submit_encoded(self, data: Any, tag: Any = None, want_outputs: bool = False) -> int:
        """An encoded JPEG/PNG image (bytes or a zmq Frame); a stage-0 worker decodes it."""
        if self.preprocess is None:
            raise ProtocolError("NO_PREPROCESS", "this pipeline takes tensors only (no image preprocessing)")
        rec = self.ledger.admit((SRC_BYTES, data), time.monotonic(), tag, want_outputs)
        self._pump()
        return rec.fid

    def submit_pixels(self, data: Any, pixels: tuple, tag: Any = None, want_outputs: bool = False) -> int:
        """Raw camera pixels (bytes or a zmq Frame), ``pixels`` = (encoding, width, height, color)."""
        if self.preprocess is None:
            raise ProtocolError("NO_PREPROCESS", "this pipeline takes tensors only (no image preprocessing)")
        rec = self.ledger.admit((SRC_PIXELS, (data, pixels)), time.monotonic(), tag, want_outputs)
        self._pump()
        return rec.fid

    # ---------------------------------------------------------------- dispatching
    def _pump(self) -> None:
        ledger, disp = self.ledger, self.dispatcher
        now = time.monotonic()
        for stage in range(len(self.plan.stages) - 1, -1, -1):  # later stages first: finish what is started
            while ledger.waiting[stage]:
                wid = disp.pick(stage, now)
                if wid is None:
                    break
                rec = ledger.assign(stage, wid)
                self._send_work(self._by_wid[wid], rec)
                disp.on_dispatch(wid, now)

    def _send_work(self, w: WorkerHandle, rec: FrameRec) -> None:
        framed = self._tcp or (self._mixed and w.spec.in_ring is None)
        if rec.stage > 0:
            if framed:
                parts = [sp.pack_work(sp.KIND_TENSORS, rec.fid, rec.attempt, rec.slot, rec.t_submit),
                         *(self._carry[rec.fid] if self._tcp else self._mixed_frames(rec))]
            else:
                if self._mixed:
                    self._mixed_to_ring(rec)
                parts = [sp.pack_work(sp.KIND_RING, rec.fid, rec.attempt, rec.slot, rec.t_submit)]
        else:
            kind, payload = rec.source
            if kind == SRC_RING and framed:  # mixed: a tensor in ring 0 for a worker linked by tcp://
                parts = [sp.pack_work(sp.KIND_TENSORS, rec.fid, rec.attempt, rec.slot, rec.t_submit),
                         *self._mixed_frames(rec)]
            elif kind == SRC_RING:
                parts = [sp.pack_work(sp.KIND_RING, rec.fid, rec.attempt, rec.slot, rec.t_submit)]
            elif kind == SRC_REGION:
                parts = [sp.pack_work(sp.KIND_REGION, rec.fid, rec.attempt, rec.slot, rec.t_submit,
                                      region=payload[0], region_slot=payload[1], pixels=payload[2])]
            elif kind == SRC_BYTES:
                parts = [sp.pack_work(sp.KIND_BYTES, rec.fid, rec.attempt, rec.slot, rec.t_submit), payload]
            elif kind == SRC_PIXELS:
                parts = [sp.pack_work(sp.KIND_PIXELS, rec.fid, rec.attempt, rec.slot, rec.t_submit,
                                      pixels=payload[1]), payload[0]]
            else:
                parts = [sp.pack_work(sp.KIND_TENSORS, rec.fid, rec.attempt, rec.slot, rec.t_submit), *payload]
        if len(parts) == 1:  # never blocks: credits bound what a worker holds
            w.feed.send(parts[0])
        else:
            w.feed.send_multipart(parts, copy=False)

    # ---------------------------------------------------------------- transport "mixed"
    def _mixed_frames(self, rec: FrameRec) -> list:
        """The frame's tensors for its stage: as the previous (tcp://) stage sent them, or from the ring
        slot the previous (shared-memory) stage wrote; the slot stays intact until the frame moves on."""
        carried = self._carry.get(rec.fid)
        return carried if carried is not None else self.rings[rec.stage].views(rec.slot)

    def _mixed_to_ring(self, rec: FrameRec) -> None:
        """Tensors a tcp:// stage sent, into the ring slot its shared-memory successor reads."""
        carried = self._carry.get(rec.fid)
        if carried is not None:
            for dst, f in zip(self.rings[rec.stage].views(rec.slot), carried):
                np.copyto(dst, np.frombuffer(f.buffer, dtype=dst.dtype).reshape(dst.shape))

    # ---------------------------------------------------------------- the loop
    def register(self, poller: zmq.Poller) -> None:
        """Add the pipeline's sockets to a caller's poller (see ``process``)."""
        poller.register(self._results, zmq.POLLIN)
        poller.register(self._ctl, zmq.POLLIN)

    def poll(self, timeout_ms: int = 100) -> list[FrameResult]:
        poller = zmq.Poller()
        self.register(poller)
        return self.process(dict(poller.poll(timeout_ms)))

    def process(self, events: dict) -> list[FrameResult]:
        """Handle whatever of the pipeline's sockets is ready in ``events``; return finished frames."""
        done: list[FrameResult] = []
        pump = False
        if self._results in events:  # one message per turn: the caller's poll returns at once while more wait
            self._on_done(self._results.recv_multipart(copy=False), done)
            pump = True
        if self._ctl in events:
            self._drain_control(done)
        if not self._running:
            self.check_start()
            return done
        now = time.monotonic()
        if now - self._last_check > 0.05:
            self._last_check = now
            self._supervise(now, done)
            pump = True
        if pump:
            self._pump()
        return done

    def _on_done(self, parts: list, done: list[FrameResult]) -> None:
        try:
            d = sp.unpack_done(parts[0].buffer)
        except ProtocolError as exc:
            log.warning("bad done message: %s", exc)
            return
        now = time.monotonic()
        hop = Hop(d.stage, d.worker, d.t_recv, d.t_start, d.t_end)
        if d.kind == sp.KIND_FAILED:
            detail = parts[1].bytes.decode("utf-8", "replace") if len(parts) > 1 else d.code
            out = self.ledger.on_failed(d.frame_id, d.stage, d.attempt, d.worker, d.code, detail)
        else:
            out = self.ledger.on_done(d.frame_id, d.stage, d.attempt, d.worker, hop)
        if out.kind == "stale":
            return
        self.dispatcher.on_done(d.worker, now, d.t_end - d.t_start)
        if self.observer is not None and d.kind == sp.KIND_DONE:
            w = self._by_wid[d.worker]
            self.observer(w.cluster, (d.t_end - d.t_start) * 1e3, w.layers_ms)
        rec = out.frame
        framed = self._tcp or (self._mixed and self._by_wid[d.worker].spec.in_ring is None)
        if out.kind == "advance":
            if framed:
                self._carry[rec.fid] = parts[1:]
            elif self._mixed:
                self._carry.pop(rec.fid, None)  # the ring slot holds the frame's tensors now
            return
        if out.kind == "failed":
            self.frame_errors.append({"frame_id": rec.fid, "stage": d.stage, "code": out.code, "error": out.detail})
            done.append(self._finish(rec, now, error=out.detail, code=out.code))
            return
        outputs: list[np.ndarray] = []
        if rec.want_outputs:
            if framed:
                outputs = [np.frombuffer(f.buffer, dtype=t.dtype).reshape(t.shape)
                           for f, t in zip(parts[1:], self.graph.outputs)]
            else:
                outputs = [v.copy() for v in self.rings[-1].views(rec.slot)]
        done.append(self._finish(rec, now, outputs=outputs, top=d.top))

    def _finish(self, rec: FrameRec, now: float, outputs=None, top=None, error=None, code=None) -> FrameResult:
        if error is None:
            self.completed += 1
        else:
            self.failed += 1
        self._carry.pop(rec.fid, None)
        self.ledger.release(rec.fid)
        return FrameResult(rec.fid, outputs or [], top, rec.hops, rec.t_submit, now, rec.tag, error, code)

    def _drain_control(self, done: list[FrameResult]) -> None:
        starting = not self._running
        while True:
            try:
                identity, raw = self._ctl.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue
            try:
                msg = sp.parse_control(raw)
            except ProtocolError as exc:
                log.warning("bad control message: %s", exc)
                continue
            w = self._by_ident.get(identity)
            if w is None:
                continue
            now = time.monotonic()
            if w.wid in self.supervisor.slots:
                self.supervisor.on_heartbeat(w.wid, now)
            kind = msg["type"]
            if kind == "STATS":
                w.on_stats(msg)
                if msg.get("direct_frames"):
                    self._on_direct_stats(w, msg)
            elif kind == "READY":
                if msg.get("pid") not in (None, w.pid):
                    continue
                try:
                    check_ready(w, msg)
                except (ShapeMismatch, WorkerDied) as exc:
                    if starting:
                        raise
                    log.error("replacement for %s is wrong: %s", w.spec.name, exc)
                    w.process.kill()
                    continue
                w.ready, w.endpoint = msg, msg["endpoint"]
                w.direct_endpoint = msg.get("direct_endpoint")
                self._go(w)
            elif kind == "RUNNING":
                w.running = True
                if starting:
                    if all(x.running for x in self.workers):
                        self._on_all_running()
                else:
                    self.supervisor.on_running(w.wid, now)
                    self.dispatcher.set_accepting(w.wid, True)
                    self.lane_version += 1
            elif kind == "FAILED":
                if starting:
                    raise WorkerDied(f"{w.spec.name} failed to start: {msg.get('error')}")
                log.error("%s failed: %s", w.spec.name, msg.get("error"))
                w.process.kill()

    # ---------------------------------------------------------------- the direct lane
    def lane_info(self) -> dict | None:
        """What a lane client needs (docs/protocol.md, "Direct lane"), None when this plan has no lane:
        the workers' endpoints, which of them take frames now, their expected time per frame."""
        if not self.direct_lane or not self._running or self._retire_t is not None:
            return None
        workers = []
        for w in self.workers:
            slot = self.dispatcher.workers.get(w.wid)
            workers.append({"worker": w.wid, "endpoint": w.direct_endpoint,
                            "accepting": bool(slot and slot.accepting and w.running),
                            "service_ms": round((slot.service_s if slot else w.predicted_ms / 1e3) * 1e3, 3),
                            "cluster": w.cluster})
        return {"generation": self.generation, "credits": self.credits, "workers": workers}

    def lane_state(self) -> dict:
        """As ``Runtime.lane_state``: this plan's lane; no generation of its own is ever gone."""
        return {"lane": self.lane_info(), "gone": []}

    def _on_direct_stats(self, w: WorkerHandle, msg: dict) -> None:
        pid, total = msg.get("pid"), int(msg["direct_frames"])
        seen_pid, seen = self._direct_seen.get(w.wid, (pid, 0))
        new = total - seen if seen_pid == pid else total  # a restarted worker counts from zero
        self._direct_seen[w.wid] = (pid, total)
        if new <= 0:
            return
        self.direct_completed += new
        if self.on_direct_done is not None:
            self.on_direct_done(new)
        for s in msg.get("direct_samples", ()):
            self.dispatcher.observe(w.wid, s)  # the time per frame stats and a new lane client start from
            if self.observer is not None:
                self.observer(w.cluster, s * 1e3, w.layers_ms)

    # ---------------------------------------------------------------- supervision
    def _supervise(self, now: float, done: list[FrameResult]) -> None:
        if self._retire_t is not None:  # a retiring plan's workers exit on purpose: nothing to restart
            return
        sup = self.supervisor
        alive = {w.wid: w.process.is_alive() for w in self.workers}
        for w in self.workers:
            sup.mark_stable(w.wid, now)
        for action in sup.tick(now, alive):
            w = self._by_wid.get(action.key) if action.key is not None else None
            if action.kind == "kill" and w is not None:
                log.warning("%s (pid %s) %s: killing it", w.spec.name, w.pid, action.reason)
                self.dispatcher.set_accepting(w.wid, False)
                w.process.kill()  # reported lost once it is seen dead (no blocking join here)
            elif action.kind == "lost" and w is not None:
                self.dispatcher.set_accepting(w.wid, False)
                self.lane_version += 1  # its lane clients replay what it held
                outcomes = self.ledger.on_worker_lost(w.wid, action.reason or describe_exit(w.process.exitcode))
                requeued = sum(1 for o in outcomes if o.kind == "requeued")
                log.warning("%s (pid %s) %s (%s): %d frame(s) replayed elsewhere or after its restart",
                            w.spec.name, w.pid, action.reason, describe_exit(w.process.exitcode), requeued)
                for o in outcomes:
                    if o.kind == "failed":
                        log.error("frame %d failed: %s", o.frame.fid, o.detail)
                        self.frame_errors.append({"frame_id": o.frame.fid, "stage": o.frame.stage,
                                                  "code": o.code, "error": o.detail})
                        done.append(self._finish(o.frame, now, error=o.detail, code=o.code))
            elif action.kind == "spawn" and w is not None:
                log.warning("restarting %s on cores %s (restart %d)", w.spec.name, list(w.cores),
                            sup.slots[w.wid].restarts)
                w.process.join(0)
                w.retire_counters()
                w.spawn(self.launcher)
            elif action.kind == "recovered" and sup.t_failure is not None:
                self.recovery_times.append(now - sup.t_failure)

    # ---------------------------------------------------------------- convenience for library use
    def run(self, inputs: Iterable[Sequence[np.ndarray] | np.ndarray], timeout: float = 60.0) -> Iterator[FrameResult]:
        """Stream ``inputs`` through the pipeline; yield results (with outputs) in input order."""
        it = iter(inputs)
        exhausted = False
        pending: dict[int, FrameResult] = {}
        order: deque[int] = deque()
        last_progress = time.monotonic()
        while True:
            while not exhausted and self.can_submit:
                try:
                    x = next(it)
                except StopIteration:
                    exhausted = True
                    break
                order.append(self.submit(x))
            if exhausted and not order:
                return
            for res in self.poll(50):
                pending[res.frame_id] = res
                last_progress = time.monotonic()
            while order and order[0] in pending:
                yield pending.pop(order.popleft())
            if self.ledger.in_flight and time.monotonic() - last_progress > timeout:
                raise HetschedError(f"no result for {timeout:.0f} s with {self.ledger.in_flight} frames in flight")

    def drain(self, timeout: float = 10.0) -> list[FrameResult]:
        deadline = time.monotonic() + timeout
        done = []
        while self.ledger.in_flight and time.monotonic() < deadline:
            done += self.poll(50)
        return done

    # ---------------------------------------------------------------- statistics
    def stage_stats(self) -> list[dict]:
        """Per stage: frames, compute/wait/send seconds, recent compute samples, per-worker detail."""
        return stage_stats(self.plan, self.workers, self.dispatcher)

    # ---------------------------------------------------------------- stop
    def stop(self, drain_timeout: float = 5.0, grace: float = 3.0) -> None:
        """Drain in-flight frames (bounded), ask workers to stop, wait, kill, join. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if drain_timeout and self.ledger.in_flight and self._results is not None:
                self.drain(drain_timeout)
            if self._ctl is not None:
                for w in self.workers:
                    try:
                        self._ctl.send_multipart([w.identity, sp.control("STOP")], flags=zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass
                deadline = time.monotonic() + grace
                while any(w.process is not None and w.process.is_alive() for w in self.workers) \
                        and time.monotonic() < deadline:
                    try:
                        if self._ctl.poll(50):
                            self._drain_control([])
                    except (zmq.ZMQError, HetschedError):
                        time.sleep(0.01)
        finally:
            reap_processes([w.process for w in self.workers if w.process is not None], grace=0.5)
            for w in self.workers:
                if w.feed is not None:
                    w.feed.close(linger=0)
            for sock in (self._results, self._ctl):
                if sock is not None:
                    sock.close(linger=0)
            if self._link_auth is not None:
                self._link_auth.stop()
                self._link_auth = None
            if self._ctx is not None:
                self._ctx.term()
            for r in self.rings:
                r.close()
            self.rings = []
            if self._own_run_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)

    def retire(self) -> None:
        """Begin stopping without blocking (a plan that was replaced): ``retired`` finishes the job."""
        if self._retire_t is None:
            self._retire_t = time.monotonic()
            self.lane_version += 1
            for w in self.workers:
                try:
                    self._ctl.send_multipart([w.identity, sp.control("STOP")], flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass

    def retired(self, grace: float = 3.0) -> bool:
        """True once every worker of a retiring pipeline is gone and its resources are closed."""
        if self._stopped:
            return True
        if self._retire_t is None:
            self.retire()
        if self._ctl.poll(0):
            self._drain_control([])
        alive = any(w.process is not None and w.process.is_alive() for w in self.workers)
        if alive and time.monotonic() - self._retire_t < grace:
            return False
        self.stop(drain_timeout=0, grace=0)
        return True

    def __enter__(self) -> "Pipeline":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop(drain_timeout=0 if exc[0] else 5.0)
