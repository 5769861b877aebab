"""Reliability on real processes: killed and hung workers are replaced and their frames replayed
(every result exactly once, in order, equal to the unsplit model); overload is refused with BUSY
and memory stays flat; SIGTERM drains every accepted frame."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import numpy as np
import onnxruntime as ort
import psutil
import pytest

from hetsched.client import Client
from hetsched.runtime.pipeline import Pipeline
from hetsched.model.graph import random_inputs
from hetsched.server.front import Server

from .conftest import wait_for
from .test_lifecycle import alive, descendants, start_service
from .conftest import manual_plan, topk5

RAW_CONFIG = """
model: builtin:squeezenet1.1
clusters:
  big: {cores: [0]}
  little: {cores: [1]}
profile: {measure: false}
"""


class InProcessService:
    def __init__(self, squeezenet, tmp_path, stages):
        model, g = squeezenet
        self.pipe = Pipeline(model, g, manual_plan(g, stages), heartbeat_timeout=1.0, topk=topk5())
        self.pipe.start()
        self.server = Server(self.pipe, f"ipc://{tmp_path}/c.sock")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.server.serve, args=(self.stop.is_set,), daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.thread.join(30)
        self.server.close()
        self.pipe.stop(drain_timeout=0)


@pytest.fixture
def service(squeezenet, tmp_path):
    svc = InProcessService(squeezenet, tmp_path, [((0,), 0, 10, 1, 1), ((1,), 11, 22, 1, 1)])
    yield svc
    svc.close()


def reference_pool(squeezenet, n=6):
    model, g = squeezenet
    xs = [random_inputs(g.inputs, seed=100 + i)["data"] for i in range(n)]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return xs, [sess.run(None, {"data": x})[0] for x in xs]


def stream_and_check(svc, xs, want, n_frames, during=None, window=6):
    """Stream n frames (raw, outputs requested); check exactly-once, in-order, equal outputs."""
    got: list[dict] = []
    with Client(svc.server.endpoint, timeout=30) as c:
        sent = 0
        action = threading.Thread(target=during, daemon=True) if during else None
        if action:
            action.start()
        while len(got) < n_frames:
            while sent < n_frames and sent - len(got) < window:
                c.submit(xs[sent % len(xs)], stream="chaos", want_outputs=True)
                sent += 1
            rep = c.recv(30)
            assert rep is not None, f"no reply after {len(got)} of {n_frames}"
            if rep["type"] in ("result", "error"):
                got.append(rep)
        assert c.recv(0.5) is None, "a frame was answered twice"
        if action:
            action.join(60)
    assert [r["seq"] for r in got] == list(range(n_frames))
    for r in got:
        assert r["type"] == "result", r
        assert np.abs(r["arrays"][0] - want[r["seq"] % len(xs)]).max() <= 1e-4
    return got


@pytest.mark.timeout(180)
def test_chaos_sigkill_random_workers_every_frame_exactly_once(service, squeezenet):
    xs, want = reference_pool(squeezenet)
    rng = random.Random(7)
    kills = []

    def killer():
        for _ in range(4):
            wait_for(lambda: not service.pipe.supervisor.recovering and service.pipe.completed > 10 * (len(kills) + 1),
                     timeout=60, what="the pipeline to run again")
            w = rng.choice(service.pipe.workers)
            kills.append((w.stage, w.pid))
            os.kill(w.pid, signal.SIGKILL)
            time.sleep(0.3)

    stream_and_check(service, xs, want, 160, during=killer)
    assert len(kills) == 4
    sup = service.pipe.supervisor
    assert sup.restarts == 4 and len(service.pipe.recovery_times) == 4
    print(f"\nkilled {kills}; recovery (kill -> replay) times: "
          f"{[round(t, 3) for t in service.pipe.recovery_times]} s; replayed {service.pipe.replayed} frames, "
          f"dropped {service.pipe.duplicates_dropped} duplicate results")
    for w in service.pipe.workers:  # replacements are pinned like the originals
        assert os.sched_getaffinity(w.pid) == set(w.cores)


@pytest.mark.timeout(120)
def test_hung_worker_is_detected_replaced_and_its_frames_replayed(service, squeezenet):
    xs, want = reference_pool(squeezenet)
    victim = {}

    def hang():
        wait_for(lambda: service.pipe.completed > 10, timeout=30, what="some frames")
        w = service.pipe.workers[1]
        victim["pid"] = w.pid
        os.kill(w.pid, signal.SIGSTOP)

    stream_and_check(service, xs, want, 60, during=hang)
    assert not psutil.pid_exists(victim["pid"]) or psutil.Process(victim["pid"]).status() == psutil.STATUS_ZOMBIE
    assert service.pipe.workers[1].pid != victim["pid"]
    assert "hung" in service.pipe.supervisor.slots[service.pipe.workers[1].wid].last_reason


def rss_tree(pid):
    procs = [psutil.Process(pid)] + descendants(pid)
    out = {}
    for p in procs:
        try:
            if "emulation" not in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline()):
                out[p.pid] = p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.timeout(240)
def test_overload_is_refused_with_busy_and_memory_stays_flat(tmp_path):
    proc, sock, lines = start_service(tmp_path, RAW_CONFIG)
    try:
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        with Client(sock, timeout=30) as c:
            # capacity, measured saturated
            t0, n = time.monotonic(), 0
            for _ in range(60):
                c.submit(x)
            for _ in c.replies(expect=60):
                n += 1
            capacity = n / (time.monotonic() - t0)
            rate = 3 * capacity
            sent = 0
            tally = {"result": 0, "busy": 0, "other": 0}

            def count(rep):
                kind = "result" if rep["type"] == "result" else (
                    "busy" if rep.get("code") in ("BUSY", "LIMIT") else "other")
                tally[kind] += 1

            rss_warm = None
            t_start = time.monotonic()
            duration = 30.0
            while time.monotonic() - t_start < duration:
                due = int((time.monotonic() - t_start) * rate)
                while sent < due:
                    c.submit(x)
                    sent += 1
                rep = c.recv(0.002)
                while rep is not None:
                    count(rep)
                    rep = c.recv(0)
                if rss_warm is None and time.monotonic() - t_start > 5:
                    rss_warm = rss_tree(proc.pid)
            for rep in c.replies(expect=sent - sum(tally.values()), timeout=30):
                count(rep)
            rss_end = rss_tree(proc.pid)
        results, busy, other = tally["result"], tally["busy"], tally["other"]
        print(f"\ncapacity {capacity:.0f}/s, offered {rate:.0f}/s for {duration:.0f} s: sent {sent}, "
              f"results {results}, busy {busy}, other {other}")
        assert results + busy == sent and other == 0 and busy > 0
        for pid, before in rss_warm.items():
            after = rss_end.get(pid, before)
            assert after < before * 1.10, f"pid {pid}: RSS {before >> 20} MiB -> {after >> 20} MiB"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


@pytest.mark.timeout(180)
def test_sigterm_during_load_answers_every_accepted_frame(tmp_path):
    proc, sock, lines = start_service(tmp_path, RAW_CONFIG)
    kids = descendants(proc.pid)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with Client(sock, timeout=30) as c:
        for _ in range(40):
            c.submit(x)
        first = c.recv(30)
        assert first["type"] == "result"
        proc.send_signal(signal.SIGTERM)
        replies = [first] + list(c.replies(expect=39, timeout=30))
    codes = [r.get("code") for r in replies if r["type"] == "error"]
    results = sum(r["type"] == "result" for r in replies)
    # every accepted frame finishes (drain timeout 10 s); frames that arrived after the stop began
    # are refused with SHUTTING_DOWN, never lost
    assert set(codes) <= {"SHUTTING_DOWN"}, codes
    assert results + len(codes) == 40 and results >= 1
    assert proc.wait(30) == 0, "".join(lines)
    wait_for(lambda: not alive(kids), timeout=5, what="workers to exit")


@pytest.mark.timeout(60)
def test_reconnecting_client_asks_which_frames_are_done(service, squeezenet):
    xs, _ = reference_pool(squeezenet, n=2)
    with Client(service.server.endpoint, timeout=30, identity=b"camera-7") as c:
        for i in range(5):
            c.submit(xs[i % 2], stream="cam7")
        list(c.replies(expect=5))
    with Client(service.server.endpoint, timeout=30, identity=b"camera-7") as c2:  # a new connection, same client
        q = c2.query("cam7")
        assert q["last_delivered"] == 4 and q["pending"] == []
        assert c2.stats()["supervision"]["restarts"] == 0
    with Client(service.server.endpoint, timeout=30) as other:  # another client asking about that stream name
        assert other.query("cam7") == {"v": 1, "type": "query", "stream": "cam7", "last_delivered": None,
                                       "pending": []}


def test_two_clients_with_the_same_stream_name_cannot_see_each_others_state(service, squeezenet):
    xs, _ = reference_pool(squeezenet, n=1)
    with Client(service.server.endpoint, timeout=30, identity=b"alice") as a, \
            Client(service.server.endpoint, timeout=30, identity=b"bob") as b:
        for _ in range(3):
            a.submit(xs[0], stream="shared")
        list(a.replies(expect=3))
        b.submit(xs[0], stream="shared")
        list(b.replies(expect=1))
        assert a.query("shared")["last_delivered"] == 2
        assert b.query("shared")["last_delivered"] == 0
        # a control reply echoes the client's id, so replies without stream/seq can be matched
        a.sock.send_multipart([b'{"v":1,"type":"query","stream":"shared","id":"q-1"}'])
        rep = a.recv(10)
        assert rep["id"] == "q-1" and rep["last_delivered"] == 2


def big_jpeg(w: int = 6000, h: int = 5000) -> bytes:
    """A 30-megapixel photo-like JPEG: decoding it holds a worker for a few hundred milliseconds."""
    import io
    from PIL import Image
    yy, xx = np.mgrid[0:h:8, 0:w:8]
    small = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=2).astype(np.uint8)
    img = Image.fromarray(small).resize((w, h))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.timeout(240)
def test_a_poison_frame_is_failed_after_two_lost_workers_and_the_others_go_on(squeezenet, tmp_path):
    """A frame whose processing kills its worker (here: its worker is SIGKILLed every time it is
    decoding that frame) is replayed once, then answered with FRAME_FAILED; the frame queued behind
    it on the same worker, and another client's stream, are answered normally."""
    from hetsched.config import InputConfig
    from hetsched.model.preprocess import ImageLimits
    model, g = squeezenet
    pipe = Pipeline(model, g, manual_plan(g, [((1,), 0, 22, 1, 1)]), heartbeat_timeout=5.0, topk=topk5(),
                    preprocess=InputConfig(), image_limits=ImageLimits())
    pipe.start()
    server = Server(pipe, f"ipc://{tmp_path}/c.sock")
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop.is_set,), daemon=True)
    thread.start()
    try:
        xs, want = reference_pool(squeezenet, n=2)
        poison = big_jpeg()
        with Client(server.endpoint, timeout=60) as a, Client(server.endpoint, timeout=60) as b:
            a.submit(poison, stream="poison")                      # the poison frame: the first in flight
            a.submit(xs[1], stream="poison", want_outputs=True)    # queued behind it on the same worker
            for kill in range(2):
                pid = wait_for(lambda: pipe.workers[0].running and pipe.ledger.frames.get(0) is not None
                               and pipe.ledger.frames[0].worker is not None and pipe.workers[0].pid,
                               timeout=60, what="the poison frame on a running worker")
                assert pipe.ledger.frames[0].attempt == kill
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda: pipe.workers[0].pid != pid or pipe.ledger.frames.get(0) is None,
                         timeout=30, what="the worker to be replaced")
            first, second = a.recv(60), a.recv(60)
            assert first["type"] == "error" and first["code"] == "FRAME_FAILED" and first["seq"] == 0, first
            assert "2 times" in first["message"]
            assert second["type"] == "result" and second["seq"] == 1
            assert np.abs(second["arrays"][0] - want[1]).max() <= 1e-4
            for i in range(4):                                     # the service goes on, for everyone
                b.submit(xs[i % 2], stream="other")
            assert [r["type"] for r in b.replies(4, timeout=60)] == ["result"] * 4
            st = b.stats()
        assert st["failed_by_code"] == {"FRAME_FAILED": 1} and st["supervision"]["restarts"] == 2
    finally:
        stop.set()
        thread.join(30)
        server.close()
        pipe.stop(drain_timeout=0)
