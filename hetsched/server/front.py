"""The client-facing front of the coordinator: a ZeroMQ ROUTER socket speaking docs/protocol.md.

One thread, one poller: client messages, pipeline results and worker control all arrive in the
same loop. Accepted frames wait in a bounded queue until the pipeline's in-flight window has room;
when that queue is full a frame is refused with BUSY (never dropped silently). Results are
released per (client, stream) in the order the frames were sent. Replies go through a per-client
outbox with non-blocking sends, so one slow client never stalls the others.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import zmq

from hetsched.wire import client_protocol as cp
from hetsched.runtime.ledger import Hop
from hetsched.runtime.pipeline import FrameResult, Pipeline
from hetsched.errors import ConfigError, ProtocolError
from hetsched.model.pixels import check_pixels, payload_size
from hetsched.model.preprocess import ImageLimits, load_labels, sniff_format
from hetsched.server import status
from hetsched.server.counters import ServiceCounters
from hetsched.wire.security import SecuritySettings, ServerAuth, check_bind, uses_curve

log = logging.getLogger(__name__)


IDLE_CLIENT_S = 60.0
_SNDMORE = int(zmq.SNDMORE)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
MAX_TRACKED_STREAMS = 10000


@dataclass
class ServerLimits:
    """Limits on what one peer controls (config section ``limits:``; docs/protocol.md sections 7, 8)."""
    max_message_bytes: int = 32 * 1024 * 1024   # zmq MAXMSGSIZE: bigger messages drop the connection
    max_tensor_elements: int = 16 * 1024 * 1024
    max_streams_per_client: int = 64
    max_inflight_per_client: int = 256
    max_pending: int = 64                      # accepted frames waiting for the pipeline (all clients)
    max_outbox: int = 4096                     # replies queued for one slow client


@dataclass
class _Entry:
    seq: int
    reply: list | None = None


@dataclass(eq=False)  # hashed by identity: kept in the set of clients with queued replies
class _Client:
    identity: bytes                      # the connection's ROUTER identity
    key: str = ""                        # who it is: its CURVE public key, else its socket identity
    streams: dict[str, deque] = field(default_factory=dict)
    outbox: deque = field(default_factory=deque)
    inflight: int = 0
    frames: int = 0
    last_seen: float = 0.0
    regions: dict[int, Any] = field(default_factory=dict)    # shared-memory input regions (hetsched.wire.shm)
    lane_region: int | None = None       # its direct lane's region (this connection's id), None: no lane


@dataclass
class _Job:
    client: _Client
    stream: str
    entry: _Entry
    kind: str  # "raw" | "encoded"
    data: Any
    want_outputs: bool
    t_accepted: float


def _frame_detail_ok(d: Any) -> bool:
    """One lane frame of a client's report: (t_submit, worker, t_recv, t_start, t_end, t_done), times
    in this host's monotonic seconds, in order (anything else is dropped, not trusted)."""
    if not (isinstance(d, list) and len(d) == 6 and all(isinstance(x, (int, float)) for x in d)):
        return False
    return type(d[1]) is int and 0 <= d[1] < 1 << 16 and d[0] <= d[2] <= d[3] <= d[4] <= d[5] < d[0] + 3600


def check_limits(limits: ServerLimits, image_limits: ImageLimits, model_input: Any) -> None:
    """Limits that contradict each other or the model; errors name the config key."""
    if limits.max_message_bytes < cp.MAX_HEADER_BYTES:
        raise ConfigError(f"limits.max_message_bytes: {limits.max_message_bytes} is below the header limit "
                          f"({cp.MAX_HEADER_BYTES} bytes)")
    if image_limits.max_encoded_bytes > limits.max_message_bytes:
        raise ConfigError(f"limits.max_encoded_bytes: {image_limits.max_encoded_bytes} exceeds "
                          f"limits.max_message_bytes ({limits.max_message_bytes}): such images would drop "
                          "the connection instead of getting TOO_LARGE")
    shape = tuple(model_input.shape)
    n = int(np.prod(shape))
    nbytes = n * np.dtype(model_input.dtype).itemsize
    if n > limits.max_tensor_elements:
        raise ConfigError(f"limits.max_tensor_elements: {limits.max_tensor_elements} is below the model input's "
                          f"{n} elements")
    if nbytes > limits.max_message_bytes:
        raise ConfigError(f"limits.max_message_bytes: {limits.max_message_bytes} is below the model input's "
                          f"{nbytes} bytes")


class Server:
    def __init__(self, pipeline: Pipeline, bind: str, *, labels_path: str | None = None,
                 limits: ServerLimits | None = None, image_limits: ImageLimits | None = None,
                 context: zmq.Context | None = None, security: SecuritySettings | None = None):
        """``security``: CURVE keys for the client socket (docs/security.md), used on tcp:// binds.
        Without server keys only a loopback, ipc:// or inproc:// ``bind`` is accepted (unless
        ``security.insecure``)."""
        self.pipe = pipeline
        self.limits = limits or ServerLimits()
        self.image_limits = image_limits or ImageLimits()
        self.security = security or SecuritySettings()
        check_limits(self.limits, self.image_limits, pipeline.graph.inputs[0])
        check_bind(bind, self.security, "server.bind")
        self.labels = load_labels(labels_path)
        topk = getattr(pipeline, "topk", None)
        n_classes = int(np.prod(pipeline.graph.outputs[topk.output if topk else 0].shape))
        if self.labels is not None and len(self.labels) != n_classes:
            raise ConfigError(f"input.labels: {labels_path} has {len(self.labels)} labels, the model "
                              f"outputs {n_classes} classes")
        self._next_region = 0
        self._note_submit = getattr(pipeline, "note_submit", None)  # a Runtime follows the traffic mix
        self.auth: ServerAuth | None = None
        curve = uses_curve(bind, self.security)
        if self.security.server_enabled and not curve:
            log.info("server.bind %s is local (ipc/inproc): CURVE keys are not used on it; file permissions "
                     "protect it", bind)
        # A context holds one ZAP handler, so a secured server gets a context of its own.
        self._own_ctx = context is None and curve
        self._ctx = context or (zmq.Context() if self._own_ctx else zmq.Context.instance())
        self.front = None
        try:
            if curve:
                self.auth = ServerAuth(self._ctx, self.security, "server.bind")
            self.front = self._ctx.socket(zmq.ROUTER)
            self.front.setsockopt(zmq.LINGER, 0)
            self.front.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self.front.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a client reconnecting with its identity takes over
            self.front.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
            self.front.setsockopt(zmq.SNDHWM, 1000)
            self.front.setsockopt(zmq.RCVHWM, 1000)
            if self.auth is not None:
                self.auth.apply(self.front)  # before bind: no connection is ever unauthenticated
            self.front.bind(bind)
            if self.auth is not None:
                self.auth.watch(self.front)
        except BaseException:
            self.close()
            raise
        self.endpoint = self.front.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.clients: dict[bytes, _Client] = {}
        self.pending: deque[_Job] = deque()
        self.jobs: dict[int, _Job] = {}
        self.accepting = True
        self.counters = ServiceCounters()
        self.t_start = self._last_prune = time.monotonic()
        self._next_housekeeping = self.t_start
        self._outbox_dirty: set[_Client] = set()  # clients with queued replies
        self.traces: deque = deque(maxlen=cp.MAX_TRACE_FRAMES)  # (frame_id, t_submit, hops, t_done)
        # (client key, stream) -> last seq replied: stream state belongs to one client (docs/security.md)
        self.stream_progress: OrderedDict[tuple[str, str], int] = OrderedDict()
        self.dropped_requests = 0  # requests of clients that do not read their replies (outbox full)
        self.loop_max_s = 0.0      # the longest turn of the loop since the start
        self._loop_recent: deque = deque(maxlen=64)  # (time, longest turn in the last quarter second)
        self._loop_window_max = 0.0
        self._in_expected = (pipeline.graph.inputs[0].dtype, pipeline.graph.inputs[0].shape)
        self._out_names = [t.name for t in pipeline.graph.outputs]
        self._lane_traces = 0
        self._lanes = hasattr(pipeline, "lane_version")
        self._lane_version = pipeline.lane_version if self._lanes else None

    # ------------------------------------------------------------------ loop
    def serve(self, should_stop: Callable[[], bool], on_tick: Callable[["Server"], None] | None = None,
              tick_s: float = 1.0, drain_timeout: float = 10.0) -> None:
        from hetsched.host.process import quiet_garbage_collector
        quiet_garbage_collector()
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        self.pipe.register(poller)
        next_tick = time.monotonic() + tick_s
        while not should_stop():
            self.step(poller, 20)
            if on_tick and time.monotonic() >= next_tick:
                next_tick = time.monotonic() + tick_s
                on_tick(self)
        self.drain(poller, drain_timeout)

    def step(self, poller: zmq.Poller, timeout_ms: int) -> None:
        """One turn of the loop: at most one client message, what the pipeline has ready, replies.

        Lean on purpose (it runs for every message on the data path): one message per ready socket
        and turn (the poll returns at once while more are queued), housekeeping a few times a second."""
        events = dict(poller.poll(timeout_ms))
        t0 = time.perf_counter()
        if self.front in events:
            self._on_client(self.front.recv_multipart(copy=False))
        for res in self.pipe.process(events):
            self._on_result(res)
        if self.pending:
            self._pump()
        if self._lanes and self._lane_version != self.pipe.lane_version:
            self._lane_version = self.pipe.lane_version
            self._announce_lane()
        if self._outbox_dirty:
            self._flush_all()
        now = time.monotonic()
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + 0.25
            self._housekeeping(now)
        turn = time.perf_counter() - t0
        if turn > self._loop_window_max:
            self._loop_window_max = turn

    def drain(self, poller: zmq.Poller, timeout: float) -> None:
        """Stop accepting; finish accepted frames within ``timeout``; error the rest; flush replies."""
        self.accepting = False
        # lane clients: frames they still hold go to the service from now on (refused SHUTTING_DOWN);
        # frames the workers hold are answered by them: keep serving (the workers run) while they finish
        self._announce_lane()
        deadline = time.monotonic() + timeout
        lane_until = time.monotonic()
        if any(c.lane_region is not None for c in self.clients.values()):
            slowest = max((getattr(w, "predicted_ms", 0.0) for w in getattr(self.pipe, "workers", ())), default=0.0)
            lane_until = min(deadline, time.monotonic() + max(0.5, 4 * slowest / 1e3))
        while (self.pending or self.jobs or time.monotonic() < lane_until) and time.monotonic() < deadline:
            self.step(poller, 20)
        for job in list(self.pending) + list(self.jobs.values()):
            self._finish(job, cp.error_message("TIMEOUT", "not finished before the service stopped",
                                               job.stream, job.entry.seq), "TIMEOUT")
        self.pending.clear()
        self.jobs.clear()
        end = time.monotonic() + 1.0
        while any(c.outbox for c in self.clients.values()) and time.monotonic() < end:
            self._flush_all()
            time.sleep(0.005)

    def close(self) -> None:
        for c in self.clients.values():
            for region in c.regions.values():
                self._close_region(region)
        if self.auth is not None:
            self.counters.auth_rejected = self.auth.rejected
            self.auth.close()  # monitors first (they watch the socket), then the ZAP thread
        if self.front is not None:
            self.front.close(linger=0)
        self.auth = None
        if self._own_ctx:
            self._ctx.term()
            self._own_ctx = False

    # ------------------------------------------------------------------ client messages
    def _client(self, parts: list) -> _Client:
        identity = parts[0].bytes
        c = self.clients.get(identity)
        if c is None:
            c = self.clients[identity] = _Client(identity, key=self._client_key(parts[1], identity))
        c.last_seen = time.monotonic()
        return c

    def _client_key(self, frame: Any, identity: bytes) -> str:
        """Who a connection is, for the state that outlives it (streams, ``query``): its CURVE public
        key when the socket authenticates clients, else its socket identity (a client that sets one,
        ``Client(identity=...)``, finds its streams again after reconnecting)."""
        if self.auth is not None:
            try:
                user = frame.get("User-Id")
            except (zmq.ZMQError, AttributeError):
                user = None
            if user:
                return "curve:" + user
        return "id:" + identity.hex()

    def _reply_now(self, client: _Client, parts: list) -> None:
        client.outbox.append(parts)
        self._outbox_dirty.add(client)

    def _on_client(self, parts: list) -> None:
        if len(parts) < 2:
            return
        client = self._client(parts)
        if len(client.outbox) >= self.limits.max_outbox:
            # it does not read its replies: no new requests until it does (what it is owed stays queued)
            self.dropped_requests += 1
            if self.dropped_requests in (1, 100) or self.dropped_requests % 10000 == 0:
                log.warning("client %s does not read its replies (%d queued): %d request(s) dropped so far",
                            client.key, len(client.outbox), self.dropped_requests)
            return
        stream = seq = rid = None
        try:
            msg = cp.decode_header(parts[1].buffer)
            t = msg["type"]
            if t == "submit":
                stream, seq = msg.get("stream"), msg.get("seq")
                sub = cp.parse_submit(msg, len(parts) - 2)
                self._on_submit(client, sub, parts[2] if len(parts) > 2 else None)
                return
            rid = cp.control_id(msg)
            if t == "hello":
                rep = self.hello()
            elif t == "stats":
                rep = {"type": "stats", **self.snapshot()}
            elif t == "query":
                s = cp.check_stream(msg.get("stream", "default"))
                # streams outlive connections, but belong to one client: a client that reconnects
                # with the same key or identity learns what was delivered and what is still pending
                pend = sorted(e.seq for c in self.clients.values() if c.key == client.key
                              for e in c.streams.get(s, ()))
                rep = {"type": "query", "stream": s, "last_delivered": self.stream_progress.get((client.key, s)),
                       "pending": pend}
            elif t == "trace":
                limit = msg.get("limit", 1000)
                limit = limit if isinstance(limit, int) and 0 < limit <= cp.MAX_TRACE_FRAMES else 1000
                rep = {"type": "trace", **self.trace(limit)}
            elif t == "lane_report":
                self._on_lane_report(client, msg)
                return
            elif t == "lane_open":
                rep = self._open_lane(client, msg)
            else:  # shm_register
                rep = {"type": "shm_registered", **self._register_shm(client, msg)}
            if rid is not None:
                rep["id"] = rid
            self._reply_now(client, [cp.encode(rep)])
        except ProtocolError as exc:
            self.counters.on_refused(exc.code)
            self._reply_now(client, cp.error_message(exc.code, exc.detail,
                                                     stream if isinstance(stream, str) else None,
                                                     seq if isinstance(seq, int) else None, rid))

    def _on_submit(self, client: _Client, sub: cp.Submit, payload: Any) -> None:
        if not self.accepting:
            raise ProtocolError("SHUTTING_DOWN", "the service is stopping")
        if len(self.pending) >= self.limits.max_pending:
            raise ProtocolError("BUSY", f"{len(self.pending)} frames already queued; resend later")
        if client.inflight >= self.limits.max_inflight_per_client:
            raise ProtocolError("LIMIT", f"{client.inflight} frames in flight for this client "
                                         f"(limit {self.limits.max_inflight_per_client})")
        if sub.stream not in client.streams and len(client.streams) >= self.limits.max_streams_per_client:
            raise ProtocolError("LIMIT", f"more than {self.limits.max_streams_per_client} streams for this client")
        if sub.pixels is not None:  # raw camera pixels: stage 0 converts and preprocesses them
            if self.pipe.preprocess is None:
                raise ProtocolError("NO_PREPROCESS", "this service was started for raw tensors only")
            pix = (sub.pixels, sub.width, sub.height, sub.color)
            if sub.encoding == "shm":
                region = client.regions.get(sub.shm)
                if region is None:
                    raise ProtocolError("BAD_SHM", f"no shared-memory region {sub.shm} registered on this connection")
                n = payload_size(sub.pixels, sub.width, sub.height)
                if n > region.slot_bytes:
                    raise ProtocolError("BAD_SHM", f"a {sub.width}x{sub.height} {sub.pixels} frame needs {n} bytes, "
                                                   f"the region's slots hold {region.slot_bytes}")
                check_pixels(sub.pixels, n, sub.width, sub.height, sub.color, self.image_limits)
                region.check_slot(sub.slot, "uint8", (n,))
                data, kind = (region.global_id, sub.slot, pix), "shm"
            else:
                check_pixels(sub.pixels, len(payload.buffer), sub.width, sub.height, sub.color, self.image_limits)
                data, kind = (payload, pix), "pixels"
        elif sub.encoding == "raw":
            data = cp.raw_tensor(sub, payload, self._in_expected, self.limits.max_tensor_elements)
            kind = "raw"
        elif sub.encoding == "shm":
            region = client.regions.get(sub.shm)
            if region is None:
                raise ProtocolError("BAD_SHM", f"no shared-memory region {sub.shm} registered on this connection")
            if (sub.dtype, sub.shape) != self._in_expected:
                raise ProtocolError("SHAPE_MISMATCH", f"got {sub.dtype}{list(sub.shape)}, model input is "
                                                      f"{self._in_expected[0]}{list(self._in_expected[1])}")
            region.check_slot(sub.slot, sub.dtype, sub.shape)  # arithmetic only: stage 0 checks the file
            data = (region.global_id, sub.slot, None)
            kind = "shm"
        else:
            if self.pipe.preprocess is None:
                raise ProtocolError("NO_PREPROCESS", "this service was started for raw tensors only")
            size = len(payload.buffer)
            if size > self.image_limits.max_encoded_bytes:
                raise ProtocolError("TOO_LARGE", f"image of {size} bytes exceeds {self.image_limits.max_encoded_bytes}")
            fmt = sniff_format(payload.buffer)
            if fmt is None or (sub.encoding in ("jpeg", "png") and fmt != sub.encoding):
                raise ProtocolError("BAD_IMAGE", f"payload is not a {sub.encoding.upper() if sub.encoding != 'image' else 'JPEG/PNG'} image")
            data, kind = payload, "encoded"
        entry = _Entry(sub.seq)
        client.streams.setdefault(sub.stream, deque()).append(entry)
        client.inflight += 1
        client.frames += 1
        self.counters.accepted += 1
        self.pending.append(_Job(client, sub.stream, entry, kind, data, sub.want_outputs, time.monotonic()))
        if self._note_submit is not None:
            self._note_submit(kind == "encoded" or sub.pixels is not None)

    def _register_shm(self, client: _Client, msg: dict) -> dict:
        """A local client's shared-memory input region (zero-copy input path, ipc:// only: a tcp peer
        must not name another process's memory)."""
        from hetsched.wire.shm import attach_region
        if not self.endpoint.startswith("ipc://"):
            raise ProtocolError("BAD_SHM", "shared-memory input is only offered on ipc:// sockets")
        if len(client.regions) >= 4:
            raise ProtocolError("LIMIT", "at most 4 shared-memory regions per connection")
        region = attach_region(msg.get("name"), msg.get("slots"), msg.get("slot_bytes"))
        rid = max(client.regions, default=-1) + 1
        region.global_id = self._next_region  # stage 0's workers know regions by this id
        self._next_region += 1
        client.regions[rid] = region
        self.pipe.add_region(region.global_id, region.name, region.slots, region.slot_bytes)
        return {"shm": rid, "slots": region.slots, "slot_bytes": region.slot_bytes}

    # ------------------------------------------------------------------ the direct lane
    def _lane_message(self, client: _Client) -> dict:
        """What ``client`` needs to send its frames straight to the workers (docs/protocol.md,
        "Direct lane"): the active plan's lane, or why there is none now, and the generations gone."""
        state = self.pipe.lane_state() if hasattr(self.pipe, "lane_state") else {"lane": None, "gone": []}
        lane, why = state["lane"], None
        if not self.accepting:
            lane, why = None, "the service is stopping"
        elif lane is None:
            why = "this plan has no direct lane (more than one stage, tcp:// workers or server.direct_lane off)"
        region = client.regions.get(client.lane_region) if client.lane_region is not None else None
        msg: dict = {"type": "lane", "direct": lane is not None and region is not None, "why": why,
                     "gone": state["gone"]}
        if lane is not None and region is not None:
            msg.update(lane, region=region.global_id)
        return msg

    def _open_lane(self, client: _Client, msg: dict) -> dict:
        if not self.endpoint.startswith("ipc://"):
            raise ProtocolError("NO_LANE", "the direct lane is only offered on ipc:// sockets (same host)")
        rid = msg.get("shm")
        if rid not in client.regions:
            raise ProtocolError("BAD_SHM", f"no shared-memory region {rid!r} registered on this connection")
        client.lane_region = rid
        out = self._lane_message(client)
        topk = getattr(self.pipe, "topk", None)
        out["labels"] = self.labels
        out["outputs"] = [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.pipe.graph.outputs]
        out["top_k"] = topk.k if topk is not None else 0
        return out

    def _announce_lane(self) -> None:
        """Tell every lane client what changed (a new plan, a worker lost or back, a plan gone)."""
        for c in self.clients.values():
            if c.lane_region is not None:
                self._reply_now(c, [cp.encode(self._lane_message(c))])

    def _on_lane_report(self, client: _Client, msg: dict) -> None:
        """A lane client's counts since its last report: the service's counters stay whole."""
        def count(v: Any) -> int:
            return v if type(v) is int and 0 <= v <= 1_000_000 else 0
        frames, encoded = count(msg.get("frames")), count(msg.get("encoded"))
        detail = msg.get("frames_detail")
        detail = [d for d in detail[:4096] if _frame_detail_ok(d)] if isinstance(detail, list) else []
        errors = msg.get("errors") if isinstance(msg.get("errors"), dict) else {}
        n_err = 0
        for code, n in list(errors.items())[:64]:
            n = count(n)
            n_err += n
            if n:
                self.counters.on_error(str(code)[:32], n)
        self.counters.accepted += frames + n_err
        client.frames += frames + n_err
        for t_submit, worker, t_recv, t_start, t_end, t_done in detail[:frames]:
            hops = [Hop(0, int(worker), t_recv, t_start, t_end)]
            self.counters.on_result(t_done - t_submit, hops, t_submit)
            self._lane_traces -= 1  # lane frames get ids of their own in the trace (negative)
            self.traces.append((self._lane_traces, t_submit, hops, t_done))
        self.counters.completed += max(0, frames - len(detail))
        if self._note_submit is not None:
            encoded = min(encoded, frames + n_err)
            self._note_submit(True, encoded)
            self._note_submit(False, frames + n_err - encoded)

    def _close_region(self, region: Any) -> None:
        self.pipe.remove_region(getattr(region, "global_id", -1))
        region.close()

    # ------------------------------------------------------------------ pipeline
    def _pump(self) -> None:
        while self.pending and self.pipe.can_submit:
            job = self.pending.popleft()
            try:
                if job.kind == "raw":
                    fid = self.pipe.submit(job.data, want_outputs=job.want_outputs)
                elif job.kind == "shm":
                    fid = self.pipe.submit_region(*job.data, want_outputs=job.want_outputs)
                elif job.kind == "pixels":
                    fid = self.pipe.submit_pixels(*job.data, want_outputs=job.want_outputs)
                else:
                    fid = self.pipe.submit_encoded(job.data, want_outputs=job.want_outputs)
            except ProtocolError as exc:
                self._finish(job, cp.error_message(exc.code, exc.detail, job.stream, job.entry.seq), exc.code)
                continue
            self.jobs[fid] = job

    def _on_result(self, res: FrameResult) -> None:
        job = self.jobs.pop(res.frame_id, None)
        if job is None:
            return
        if res.error is not None:
            self._finish(job, cp.error_message(res.code or "STAGE_FAILED", res.error, job.stream, job.entry.seq),
                         res.code or "STAGE_FAILED")
            return
        self.traces.append((res.frame_id, res.t_submit, res.hops, res.t_done))
        top = cp.top_items(res.top, self.labels) if res.top else []
        stages, prev = [], res.t_submit
        for h in res.hops:
            stages.append({"stage": h.stage, "worker": h.worker, "queue_ms": round((h.t_recv - prev) * 1e3, 3),
                           "compute_ms": round((h.t_end - h.t_start) * 1e3, 3)})
            prev = h.t_end
        latency = (res.t_done - job.t_accepted) * 1e3
        reply = cp.result_message(job.stream, job.entry.seq, top, latency, stages,
                                  res.outputs if job.want_outputs else None, self._out_names)
        self.counters.on_result(res.t_done - job.t_accepted, res.hops, res.t_submit)
        self._finish(job, reply)

    def _finish(self, job: _Job, reply: list, code: str | None = None) -> None:
        """Answer ``job`` (``code``: its error code, None for a result)."""
        job.entry.reply = reply
        if code is not None:
            self.counters.on_error(code)
        client = job.client
        client.inflight -= 1
        q = client.streams.get(job.stream)
        while q and q[0].reply is not None:
            e = q.popleft()
            client.outbox.append(e.reply)
            self._outbox_dirty.add(client)
            key = (client.key, job.stream)
            self.stream_progress[key] = e.seq
            self.stream_progress.move_to_end(key)
            if len(self.stream_progress) > MAX_TRACKED_STREAMS:
                self.stream_progress.popitem(last=False)
        if q is not None and not q:
            del client.streams[job.stream]

    def _flush_all(self) -> None:
        """Send what the clients with queued replies are owed, without ever blocking."""
        gone = []
        send = self.front.send
        for client in list(self._outbox_dirty):
            outbox = client.outbox
            while outbox:
                parts = outbox[0]
                try:
                    send(client.identity, _SNDMORE_NOBLOCK)  # a slow client: EAGAIN here, others go on
                except zmq.Again:
                    break
                except zmq.ZMQError as exc:
                    if exc.errno == zmq.EHOSTUNREACH:
                        gone.append(client)
                        break
                    raise
                for p in parts[:-1]:
                    send(p, _SNDMORE, copy=False)
                send(parts[-1], 0, copy=False)
                outbox.popleft()
            if not outbox:
                self._outbox_dirty.discard(client)
            elif len(outbox) > self.limits.max_outbox:
                log.warning("client %r does not read its replies; dropping its %d queued replies",
                            client.identity, len(outbox))
                outbox.clear()
                self._outbox_dirty.discard(client)
        for client in gone:
            if client.inflight == 0 and self.clients.pop(client.identity, None) is not None:
                for region in client.regions.values():  # its regions go with it (else mapped until stop)
                    self._close_region(region)
                client.regions.clear()
            client.outbox.clear()
            self._outbox_dirty.discard(client)

    def _housekeeping(self, now: float) -> None:
        # the loop's longest turn (the work after its poll returned; waiting is not counted)
        self._loop_recent.append((now, self._loop_window_max))
        self.loop_max_s = max(self.loop_max_s, self._loop_window_max)
        self._loop_window_max = 0.0
        if self.auth is not None:
            self.counters.auth_rejected = self.auth.rejected
        if now - self._last_prune > 10.0:  # forget idle clients that are owed nothing
            self._last_prune = now
            for ident in [i for i, c in self.clients.items() if c.inflight == 0 and not c.streams
                          and not c.outbox and now - c.last_seen > IDLE_CLIENT_S]:
                for region in self.clients.pop(ident).regions.values():
                    self._close_region(region)

    # ------------------------------------------------------------------ info (hetsched.server.status)
    def hello(self) -> dict:
        return status.hello(self)

    def trace(self, limit: int) -> dict:
        return status.trace(self, limit)

    def snapshot(self, samples: int = 2000) -> dict:
        return status.snapshot(self, samples)

    def metrics(self) -> dict:
        return status.metrics(self)
