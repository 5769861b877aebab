"""The direct lane: a local client sends its frames straight to the workers of a one-stage plan and
takes the answers from them; the coordinator leaves the per-frame path (docs/protocol.md, "Direct lane").

Why: through the coordinator every frame costs four ZeroMQ messages and its bookkeeping in one more
process (~0.6 ms of CPU per frame on a 2-core VM, BENCHMARKS.md), which on a CPU-bound host is CPU
taken from the model. On the lane a frame costs the client one send and one receive, the worker the
same, the coordinator nothing: it grants the lane (the workers' endpoints, credits, which workers
take frames), tells lane clients when that changes (a worker lost or back, a new plan, a plan gone)
and learns counts and compute times from the workers' heartbeats and the clients' reports.

The client does what the coordinator did for its frames, with the same pure parts:

* which worker: ``hetsched.runtime.dispatch.Dispatcher`` (earliest expected finish, ``credits``
  frames per worker), fed with the compute times the answers carry;
* exactly one answer per frame, in per-stream order: :class:`LaneBook` (pure): every frame keeps its
  shared-memory slot until it is answered; a frame held by a worker that is lost, or by a plan that
  is gone, is sent again (attempt + 1) and the first answer wins (later ones are dropped); a frame
  that was with a lost worker ``max_attempts`` times is answered with an error (a poison frame must
  not kill every worker in turn).

Frames go through the coordinator as before whenever there is no lane (a pipeline of several stages,
tcp://, the service stopping) or a frame does not fit a slot; the book keeps their order too.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from hetsched.runtime.dispatch import Dispatcher
from hetsched.wire import client_protocol as cp
from hetsched.wire import stage_protocol as sp

REPORT_S = 0.25          # how often the client tells the service what it did on the lane
MAX_ATTEMPTS = 3         # sends of one frame to workers that were then lost, before it fails
MAX_REPORT_SAMPLES = 1024


@dataclass(slots=True)
class LaneFrame:
    token: int
    stream: str
    seq: int
    request: tuple            # (kind, slot, fields, payload): what to send, again if need be
    want_outputs: bool
    t_submit: float
    attempts: int = 0         # sends to workers (lane) so far
    worker: int | None = None  # the worker that holds it (lane), None: queued or with the coordinator
    generation: int | None = None
    via_front: bool = False
    reply: dict | None = None


@dataclass
class LaneBook:
    """Pure: the frames a lane client has submitted and not yet handed to its caller."""
    max_attempts: int = MAX_ATTEMPTS
    frames: dict[int, LaneFrame] = field(default_factory=dict)
    queued: deque = field(default_factory=deque)          # tokens waiting for a worker credit
    streams: dict[str, deque] = field(default_factory=dict)  # per stream: tokens in submission order
    by_seq: dict[tuple[str, int], int] = field(default_factory=dict)  # (stream, seq) -> token (front replies)
    next_token: int = 1
    duplicates: int = 0
    replays: int = 0

    def add(self, stream: str, seq: int, request: tuple, want_outputs: bool, now: float) -> LaneFrame:
        f = LaneFrame(self.next_token, stream, seq, request, want_outputs, now)
        self.next_token = (self.next_token + 1) & 0xFFFFFFFFFFFF or 1
        self.frames[f.token] = f
        self.streams.setdefault(stream, deque()).append(f.token)
        self.by_seq[(stream, seq)] = f.token
        self.queued.append(f.token)
        return f

    def on_sent(self, token: int, worker: int | None, generation: int | None) -> LaneFrame:
        f = self.frames[token]
        if worker is None:
            f.via_front = True
        else:
            f.attempts += 1
            f.worker, f.generation = worker, generation
        return f

    def answer(self, token: int, reply: dict) -> list[dict]:
        """The first answer of a frame is kept; the replies now due in stream order are returned."""
        f = self.frames.get(token)
        if f is None or f.reply is not None:
            self.duplicates += 1
            return []
        f.reply = reply
        f.worker = None
        return self._release(f.stream)

    def front_token(self, stream: Any, seq: Any) -> int | None:
        return self.by_seq.get((stream, seq))

    def _release(self, stream: str) -> list[dict]:
        q = self.streams[stream]
        out = []
        while q and self.frames[q[0]].reply is not None:
            f = self.frames.pop(q.popleft())
            self.by_seq.pop((f.stream, f.seq), None)
            out.append(f.reply)
        if not q:
            del self.streams[stream]
        return out

    def held_by(self, pred) -> list[LaneFrame]:
        return [f for f in self.frames.values() if f.reply is None and f.worker is not None and pred(f)]

    def requeue(self, frames: list[LaneFrame], why: str) -> list[tuple[LaneFrame, str]]:
        """Frames whose worker or plan is gone: queued again (oldest first), or (frame, error) when a
        frame was with ``max_attempts`` lost workers already."""
        failed = []
        for f in sorted(frames, key=lambda f: f.token, reverse=True):
            f.worker = f.generation = None
            if f.attempts >= self.max_attempts:
                failed.append((f, f"{why}; the frame was with {f.attempts} workers that were lost: given up"))
            else:
                self.replays += 1
                self.queued.appendleft(f.token)
        return failed

    @property
    def unanswered(self) -> int:
        return sum(1 for f in self.frames.values() if f.reply is None)


def _reachable(endpoint: str | None) -> bool:
    """An ipc:// endpoint this process may connect to (a connect to a path it cannot open would wait
    silently forever)."""
    if not endpoint or not endpoint.startswith("ipc://"):
        return False
    return os.access(endpoint[len("ipc://"):], os.R_OK | os.W_OK)


class Lane:
    """The I/O half: one DEALER per worker of the granted lane, the reports, the replies."""

    def __init__(self, grant: dict, ctx: zmq.Context, front: Any, region_slot_bytes: int):
        self.ctx, self.front = ctx, front
        self.book = LaneBook()
        self.labels = grant.get("labels")
        self.outputs = grant.get("outputs") or []
        self.slot_bytes = region_slot_bytes
        self.socks: dict[tuple[int, int], Any] = {}   # (generation, worker) -> DEALER
        self.sock_key: dict[Any, tuple[int, int]] = {}
        self.poller = zmq.Poller()
        self.poller.register(front, zmq.POLLIN)
        self.generation: int | None = None
        self.region = 0
        self.dispatcher = Dispatcher()
        self.pids: dict[int, Any] = {}
        self.direct = False
        self.why: str | None = None
        self._report = {"frames": 0, "encoded": 0, "errors": {}, "frames_detail": []}
        self._t_report = time.monotonic()
        self.update(grant)

    # ---------------------------------------------------------------- what the service says
    def update(self, msg: dict) -> list[tuple[LaneFrame, str]]:
        """A lane message (grant or change): adopt it; frames held by lost workers or gone plans are
        queued again. Returns frames given up (see LaneBook.requeue)."""
        failed: list = []
        gone = set(msg.get("gone") or ())
        for key in [k for k in self.socks if k[0] in gone]:
            self._close(key)
        if gone:
            failed += self.book.requeue(self.book.held_by(lambda f: f.generation in gone), "its plan was replaced")
        self.direct, self.why = bool(msg.get("direct")), msg.get("why")
        if not self.direct:
            return failed
        gen = msg["generation"]
        if gen != self.generation:  # a new plan: frames of the old one still come back on its sockets
            self.generation, self.dispatcher, self.pids = gen, Dispatcher(), {}
        self.region = msg["region"]
        credits = int(msg.get("credits") or 2)
        for w in msg["workers"]:
            wid = w["worker"]
            if wid not in self.dispatcher.workers:
                self.dispatcher.add(wid, 0, float(w["service_ms"]) / 1e3, credits)
            ok = bool(w["accepting"]) and _reachable(w.get("endpoint"))
            was = self.dispatcher.workers[wid].accepting
            if was and not ok:  # lost: what it held goes to the others (or to it again, restarted)
                failed += self.book.requeue(self.book.held_by(lambda f, wid=wid: f.generation == gen and f.worker == wid),
                                            f"worker {wid} was lost")
            self.dispatcher.set_accepting(wid, ok)
            if ok and (gen, wid) not in self.socks:
                self._open((gen, wid), w["endpoint"])
        return failed

    def _open(self, key: tuple[int, int], endpoint: str) -> None:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 1000)
        s.setsockopt(zmq.RCVHWM, 1000)
        s.connect(endpoint)
        self.socks[key], self.sock_key[s] = s, key
        self.poller.register(s, zmq.POLLIN)

    def _close(self, key: tuple[int, int]) -> None:
        s = self.socks.pop(key)
        self.sock_key.pop(s, None)
        self.poller.unregister(s)
        s.close(linger=0)

    def close(self) -> None:
        for key in list(self.socks):
            self._close(key)

    # ---------------------------------------------------------------- sending
    def pump(self, send_front) -> None:
        """Send queued frames: to the worker expected to finish each first while one has a credit, or
        through the coordinator when there is no lane now."""
        book, disp = self.book, self.dispatcher
        now = time.monotonic()
        while book.queued:
            token = book.queued[0]
            f = book.frames.get(token)
            if f is None or f.reply is not None:
                book.queued.popleft()
                continue
            if not self.direct:
                book.queued.popleft()
                book.on_sent(token, None, None)
                send_front(f)
                continue
            wid = disp.pick(0, now)
            if wid is None:
                return
            book.queued.popleft()
            book.on_sent(token, wid, self.generation)
            disp.on_dispatch(wid, now)
            kind, slot, fields, payload = f.request
            flags = sp.FLAG_WANT_OUTPUTS if f.want_outputs else 0
            attempt = min(f.attempts, 0xFFFF)
            if kind == "encoded":
                parts = [sp.pack_work(sp.KIND_BYTES, token, attempt, 0, f.t_submit, flags), payload]
            else:
                pixels = None
                if kind == "pixels":
                    pixels = (fields["pixels"], fields["width"], fields["height"], fields.get("color"))
                parts = [sp.pack_work(sp.KIND_REGION, token, attempt, 0, f.t_submit, flags, region=self.region,
                                      region_slot=slot, pixels=pixels)]
            sock = self.socks[(self.generation, wid)]
            if len(parts) == 1:
                sock.send(parts[0], zmq.NOBLOCK)
            else:
                sock.send_multipart(parts, zmq.NOBLOCK, copy=False)

    # ---------------------------------------------------------------- receiving
    def on_worker_reply(self, sock: Any) -> list[dict]:
        """One answer from a worker's socket: the caller's replies now due (in stream order)."""
        parts = sock.recv_multipart(copy=False)
        try:
            d = sp.unpack_done(parts[0].buffer)
        except Exception:  # (our own worker sent it: a bad header is a bug, not an attack; dropped)
            return []
        book = self.book
        f = book.frames.get(d.frame_id)
        now = time.monotonic()
        key = self.sock_key.get(sock)
        if key is not None and key[0] == self.generation:
            self.dispatcher.on_done(key[1], now, d.t_end - d.t_start if d.kind == sp.KIND_DONE else None)
        if f is None or f.reply is not None:
            book.duplicates += 1
            return []
        latency = (now - f.t_submit) * 1e3
        if d.kind == sp.KIND_FAILED:
            text = parts[1].bytes.decode("utf-8", "replace") if len(parts) > 1 else d.code
            rep = {"type": "error", "code": d.code, "message": text, "stream": f.stream, "seq": f.seq}
            errs = self._report["errors"]
            errs[d.code] = errs.get(d.code, 0) + 1
        else:
            rep = {"type": "result", "stream": f.stream, "seq": f.seq, "top_k": cp.top_items(d.top, self.labels),
                   "latency_ms": round(latency, 3), "lane": True,
                   "stages": [{"stage": 0, "worker": d.worker, "queue_ms": round((d.t_recv - f.t_submit) * 1e3, 3),
                               "compute_ms": round((d.t_end - d.t_start) * 1e3, 3)}]}
            if f.want_outputs and len(parts) > 1:
                rep["outputs"] = self.outputs
                rep["arrays"] = [np.frombuffer(p.buffer, dtype=o["dtype"]).reshape(o["shape"]).copy()
                                 for o, p in zip(self.outputs, parts[1:])]
            r = self._report
            r["frames"] += 1
            if f.request[0] != "tensor":
                r["encoded"] += 1
            if len(r["frames_detail"]) < MAX_REPORT_SAMPLES:  # for the service's trace and stage histograms
                r["frames_detail"].append((f.t_submit, d.worker, d.t_recv, d.t_start, d.t_end, now))
        return book.answer(f.token, rep)

    def report(self, now: float, force: bool = False) -> None:
        """Counts since the last report, to the coordinator (a few times a second, not per frame)."""
        r = self._report
        if not (force or now - self._t_report >= REPORT_S) or not (r["frames"] or r["errors"]):
            return
        self._t_report = now
        self.front.send(cp.encode({"type": "lane_report", **r}))
        self._report = {"frames": 0, "encoded": 0, "errors": {}, "frames_detail": []}
