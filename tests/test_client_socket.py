"""The client socket (docs/protocol.md) on real processes and real sockets.

Each test runs a real service in-process: a Pipeline of two pinned stage workers over the built-in
SqueezeNet (plan layer 0 is image preprocessing), wrapped in a Server whose ROUTER socket listens
on a private ipc:// endpoint and whose serve loop runs in a background thread. Clients are
hetsched.client.Client instances or bare pyzmq DEALER sockets (for hostile input).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import zmq
from PIL import Image

from hetsched.wire import client_protocol as cp
from hetsched.client import Client
from hetsched.config import InputConfig
from hetsched.runtime.pipeline import Pipeline
from hetsched.model.graph import random_inputs
from hetsched.model.preprocess import ImageLimits, preprocess_encoded
from hetsched.server.front import Server, ServerLimits

from .conftest import ROOT, manual_plan, topk5, wait_for

DOC = ROOT / "docs" / "protocol.md"
N_CLASSES = 1000


# ---------------------------------------------------------------------------------------------
# helpers


TWO_STAGES = [((0,), 0, 10, 1, 1), ((1,), 11, 22, 1, 1)]        # stage 0 also decodes images
REPLICATED = [((0,), 0, 10, 1, 1), ((0, 1), 11, 22, 1, 2)]      # second stage: two replicas
RAW_TWO_STAGES = TWO_STAGES                                     # (run without preprocessing)


def image_bytes(fmt: str, w: int = 96, h: int = 80, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx * yy) % 256], axis=2)
    img = np.clip(img + rng.integers(-30, 31, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt)
    return buf.getvalue()


def tensor(g, seed: int = 0) -> np.ndarray:
    return random_inputs(g.inputs, seed=seed)["data"]


def reference(model, xs):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [sess.run(None, {"data": x})[0] for x in xs]


def header(**fields) -> bytes:
    return json.dumps({"v": 1, **fields}).encode()


def check_result(rep: dict, stream: str | None = None, seq: int | None = None, n_stages: int = 2) -> None:
    assert rep["type"] == "result", rep
    assert rep["v"] == 1
    if stream is not None:
        assert rep["stream"] == stream
    if seq is not None:
        assert rep["seq"] == seq
    top = rep["top_k"]
    assert len(top) == 5
    scores = [t["score"] for t in top]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    for t in top:
        assert 0 <= t["index"] < N_CLASSES and t["label"] == f"class {t['index']}"
    assert rep["latency_ms"] > 0
    assert [s["stage"] for s in rep["stages"]] == list(range(n_stages))
    for s in rep["stages"]:
        assert s["queue_ms"] >= 0 and s["compute_ms"] > 0 and s["worker"] >= 0


@dataclass
class Service:
    endpoint: str
    server: Server
    pipe: Pipeline
    thread: threading.Thread
    stop: threading.Event
    crashed: list

    def assert_alive(self) -> None:
        assert not self.crashed, f"serve loop crashed: {self.crashed!r}"
        assert self.thread.is_alive(), "serve loop returned"

    def client(self, **kw) -> Client:
        return Client(self.endpoint, timeout=kw.pop("timeout", 20.0), **kw)


@contextlib.contextmanager
def running_service(squeezenet, tmp_path, *, stages=TWO_STAGES, preprocess: bool = True,
                    max_inflight: int | None = None, limits: ServerLimits | None = None,
                    drain_timeout: float = 2.0, before_serve=None, heartbeat_timeout: float = 1.0):
    """Pipeline + Server + serve thread; on exit: stop, join the thread, close, stop the pipeline."""
    model, g = squeezenet
    sock_dir = str(tmp_path)
    own_dir = None
    if len(sock_dir) > 80:  # sun_path holds ~107 bytes
        sock_dir = own_dir = tempfile.mkdtemp(prefix="hs-cs-")
    labels = Path(sock_dir) / "labels.txt"
    labels.write_text("".join(f"n{i:08d} class {i}\n" for i in range(N_CLASSES)))
    pipe = Pipeline(model, g, manual_plan(g, stages), max_inflight=max_inflight,
                    heartbeat_timeout=heartbeat_timeout, topk=topk5(),
                    preprocess=InputConfig() if preprocess else None, image_limits=ImageLimits() if preprocess else None)
    server = thread = None
    stop = threading.Event()
    crashed: list = []
    try:
        pipe.start()
        server = Server(pipe, f"ipc://{sock_dir}/c.sock", labels_path=str(labels), limits=limits)
        if before_serve is not None:
            before_serve(server)

        def serve() -> None:
            try:
                server.serve(stop.is_set, drain_timeout=drain_timeout)
            except BaseException as exc:  # recorded for the test; the thread just ends
                crashed.append(exc)

        thread = threading.Thread(target=serve, name="hetsched-serve", daemon=True)
        thread.start()
        yield Service(server.endpoint, server, pipe, thread, stop, crashed)
    finally:
        stop.set()
        if thread is not None:
            thread.join(30)
        if server is not None:
            server.close()
        pipe.stop(drain_timeout=0)
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)
    assert thread is None or not thread.is_alive(), "serve() did not return"
    assert not crashed, f"serve loop crashed: {crashed!r}"


@pytest.fixture
def service(squeezenet, tmp_path):
    with running_service(squeezenet, tmp_path) as svc:
        yield svc


def raw_dealer(ctx: zmq.Context, endpoint: str, **opts) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    for k, v in opts.items():
        s.setsockopt(getattr(zmq, k), v)
    s.connect(endpoint)
    return s


def recv_json(sock: zmq.Socket, timeout: float = 20.0) -> tuple[dict, list] | None:
    if not sock.poll(int(timeout * 1000)):
        return None
    parts = sock.recv_multipart()
    return json.loads(parts[0]), parts[1:]


def frame_replies(c: Client, n: int, timeout: float = 20.0) -> list[dict]:
    return list(c.replies(expect=n, timeout=timeout))


# ---------------------------------------------------------------------------------------------
# results


@pytest.mark.timeout(60)
def test_jpeg_png_and_raw_frames_give_results_equal_to_the_unsplit_model(service, squeezenet):
    model, g = squeezenet
    jpeg, png = image_bytes("JPEG", seed=1), image_bytes("PNG", 64, 100, seed=2)
    xs = [tensor(g, seed=s) for s in range(3)]
    want = reference(model, xs + [preprocess_encoded(jpeg, InputConfig()), preprocess_encoded(png, InputConfig())])
    with service.client() as c:
        for x in xs:
            c.submit(x, stream="raw", want_outputs=True)
        c.submit(jpeg, stream="img", encoding="jpeg", want_outputs=True)
        c.submit(png, stream="img", encoding="png", want_outputs=True)
        c.submit(jpeg, stream="plain")                       # encoding "image", no outputs
        c.submit(png, stream="plain")
        reps = frame_replies(c, 7)
    by = {(r["stream"], r["seq"]): r for r in reps}
    assert sorted(by) == [("img", 0), ("img", 1), ("plain", 0), ("plain", 1), ("raw", 0), ("raw", 1), ("raw", 2)]
    got = [by["raw", 0], by["raw", 1], by["raw", 2], by["img", 0], by["img", 1]]
    for rep, w in zip(got, want):
        check_result(rep)
        assert rep["outputs"] == [{"name": "logits", "dtype": "float32", "shape": [1, N_CLASSES]}]
        out = rep["arrays"][0]
        assert out.dtype == np.float32 and out.shape == (1, N_CLASSES)
        assert np.abs(out - w).max() <= 1e-4
        assert rep["top_k"][0]["index"] == int(np.argmax(w))
    for rep in (by["plain", 0], by["plain", 1]):
        check_result(rep)
        assert "outputs" not in rep and "arrays" not in rep
    # the same image gives the same classes whichever encoding field was used
    assert [t["index"] for t in by["plain", 0]["top_k"]] == [t["index"] for t in by["img", 0]["top_k"]]
    service.assert_alive()


@pytest.mark.timeout(60)
def test_many_clients_and_streams_each_frame_answered_once_in_order(squeezenet, tmp_path):
    # Replicated second stage: frames can overtake each other inside the pipeline, the server
    # must still release them per (client, stream) in submission order.
    model, g = squeezenet
    x = tensor(g)
    imgs = [image_bytes("JPEG", 64 + 16 * (i % 4), 64, seed=i) for i in range(4)]
    n_clients, streams, n = 3, ("a", "b"), 10
    with running_service(squeezenet, tmp_path, stages=REPLICATED) as svc:
        clients = [svc.client() for _ in range(n_clients)]
        try:
            for i in range(n):                          # interleaved: client, stream, frame
                for k, c in enumerate(clients):
                    for s in streams:
                        if (i + k) % 3 == 0:
                            c.submit(x, stream=s)       # raw tensor
                        else:
                            c.submit(imgs[(i + k) % 4], stream=s)
            for k, c in enumerate(clients):
                reps = frame_replies(c, n * len(streams))
                assert c.recv(0.2) is None, "a frame was answered twice"
                for s in streams:
                    mine = [r for r in reps if r["stream"] == s]
                    assert [r["seq"] for r in mine] == list(range(n)), (k, s, [r["seq"] for r in mine])
                    for r in mine:
                        check_result(r)
        finally:
            for c in clients:
                c.close()
        svc.assert_alive()
        with svc.client() as c:
            st = c.stats()
        assert st["accepted"] == st["completed"] == n_clients * len(streams) * n
        assert st["errors"] == st["busy"] == st["rejected"] == 0


@pytest.mark.timeout(60)
def test_a_client_that_does_not_read_does_not_stall_another(squeezenet, tmp_path):
    def small_buffers(server: Server) -> None:
        # Make unread replies back up after a few KB instead of after ~1000 replies: a tiny
        # per-connection send queue and kernel send buffer on the ROUTER (tcp://, where ZeroMQ
        # applies SO_SNDBUF). ZeroMQ copies socket options into the listener at bind time, so
        # unbind, set them, and bind again before the serve loop starts.
        server.front.unbind(server.endpoint)
        server.front.setsockopt(zmq.SNDHWM, 2)
        server.front.setsockopt(zmq.SNDBUF, 4096)
        server.front.bind("tcp://127.0.0.1:*")
        server.endpoint = server.front.getsockopt(zmq.LAST_ENDPOINT).decode()

    img = image_bytes("JPEG", seed=3)
    with running_service(squeezenet, tmp_path, before_serve=small_buffers) as svc:
        ctx = zmq.Context()
        slow = raw_dealer(ctx, svc.endpoint, RCVHWM=1, RCVBUF=4096, ROUTING_ID=b"slow-reader")
        try:
            for seq in range(30):      # 30 results with the output tensor: ~4 KB each
                slow.send_multipart([header(type="submit", stream="s", seq=seq, outputs=True), img])
            outbox_max = 0
            with svc.client() as fast:
                for seq in range(20):
                    fast.submit(img, stream="f")
                    rep = fast.recv(20)
                    check_result(rep, "f", seq)
                    slow_client = svc.server.clients.get(b"slow-reader")
                    if slow_client is not None:
                        outbox_max = max(outbox_max, len(slow_client.outbox))
            # the fast client is done; the slow one has not read a single reply yet
            wait_for(lambda: svc.server.counters.completed >= 50, timeout=20, what="all 50 frames")
            slow_client = svc.server.clients[b"slow-reader"]
            outbox_max = max(outbox_max, len(slow_client.outbox))
            assert outbox_max > 0, "the slow client's replies never backed up into the server's outbox"
            seqs = []
            for _ in range(30):
                got = recv_json(slow, 20)
                assert got is not None, f"slow client got only {seqs}"
                check_result(got[0], "s")
                assert len(got[1]) == 1 and len(got[1][0]) == 4 * N_CLASSES
                seqs.append(got[0]["seq"])
            assert seqs == list(range(30))
            assert recv_json(slow, 0.2) is None
        finally:
            slow.close(0)
            ctx.term()
        svc.assert_alive()


# ---------------------------------------------------------------------------------------------
# hostile input


@pytest.mark.timeout(60)
def test_bad_input_gets_the_right_error_and_the_client_goes_on(service, squeezenet):
    _, g = squeezenet
    good = image_bytes("JPEG", seed=4)
    jpeg = image_bytes("JPEG", 200, 150, seed=5)
    x = tensor(g)
    tiny = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tiny, "PNG")
    n_ok = n_refused = 0

    with service.client() as c:
        def still_works() -> None:
            nonlocal n_ok
            seq = c.submit(good, stream="ok")
            rep = c.recv(20)
            check_result(rep, "ok", seq)
            n_ok += 1

        def expect(parts: list, code: str, stream=None, seq=None, accepted: bool = False) -> dict:
            nonlocal n_refused
            n_refused += not accepted
            c.send_raw(parts)
            rep = c.recv(20)
            assert rep is not None, f"no reply (expected {code})"
            assert rep["type"] == "error" and rep["code"] == code, rep
            assert rep["code"] in cp.ERROR_CODES and isinstance(rep["message"], str) and rep["message"]
            assert rep.get("stream") == stream and rep.get("seq") == seq, rep
            still_works()
            return rep

        def submit(seq: int, payload, **fields) -> list:
            return [header(type="submit", stream="bad", seq=seq, **fields), payload]

        raw = {"encoding": "raw", "dtype": "float32", "shape": [1, 3, 224, 224]}
        # refused on receipt (immediate replies)
        expect(submit(0, b"\x00garbage bytes, not an image" * 10), "BAD_IMAGE", "bad", 0)
        expect(submit(1, b"\x00garbage" * 10, encoding="jpeg"), "BAD_IMAGE", "bad", 1)
        expect(submit(2, jpeg, encoding="png"), "BAD_IMAGE", "bad", 2)      # says PNG, is JPEG
        expect(submit(3, x.astype(np.float64).tobytes(), encoding="raw", dtype="float64", shape=[1, 3, 224, 224]),
               "SHAPE_MISMATCH", "bad", 3)                                      # accepted dtype, not the model's
        expect(submit(4, b"\x00" * 16, encoding="raw", dtype="complex64", shape=[2]), "BAD_DTYPE", "bad", 4)
        expect(submit(5, b"\x00" * 16, encoding="raw", shape=[4]), "BAD_DTYPE", "bad", 5)   # dtype missing
        expect(submit(6, np.zeros((1, 3, 200, 200), np.float32).tobytes(), encoding="raw", dtype="float32",
                      shape=[1, 3, 200, 200]), "SHAPE_MISMATCH", "bad", 6)
        expect(submit(7, x.tobytes()[:-4], **raw), "SHAPE_MISMATCH", "bad", 7)        # 4 bytes short
        expect(submit(8, x.tobytes() + b"\x00" * 4, **raw), "SHAPE_MISMATCH", "bad", 8)  # 4 bytes over
        expect(submit(9, b"", encoding="raw", dtype="float32", shape="1x3x224x224"), "SHAPE_MISMATCH", "bad", 9)
        expect(submit(10, b"\x00" * 8, encoding="raw", dtype="float32", shape=[1 << 20, 1 << 20]),
               "TOO_LARGE", "bad", 10)
        expect([header(type="submit", stream="bad", seq=11)], "BAD_FRAMES", "bad", 11)        # no payload
        expect([header(type="submit", stream="bad", seq=12), good, good], "BAD_FRAMES", "bad", 12)
        expect([header(type="submit", stream="bad", encoding="image"), good], "BAD_HEADER", "bad")  # no seq
        expect([header(type="submit", stream="bad", seq=-1), good], "BAD_HEADER", "bad", -1)
        expect([header(type="submit", stream="", seq=13), good], "BAD_HEADER", "", 13)
        expect([header(type="submit", stream="x" * 129, seq=14), good], "BAD_HEADER", "x" * 129, 14)
        expect([header(type="submit", stream="bad", seq=15, encoding="gif"), good], "BAD_HEADER", "bad", 15)
        expect([json.dumps({"v": 2, "type": "submit", "seq": 16}).encode(), good], "BAD_VERSION")
        expect([json.dumps({"type": "submit", "seq": 17}).encode(), good], "BAD_VERSION")          # no v
        expect([header(type="frobnicate", seq=18)], "BAD_TYPE")
        expect([b"this is not json", good], "BAD_HEADER")
        expect([b"\xff\xfe\x00 not utf-8", good], "BAD_HEADER")
        expect([b"[1, 2, 3]", good], "BAD_HEADER")
        expect([header(type="submit", stream="bad", seq=19, pad="x" * cp.MAX_HEADER_BYTES), good], "BAD_HEADER")
        big = b"\xff\xd8\xff" + bytes(ImageLimits().max_encoded_bytes)  # starts like a JPEG, over the limit
        expect(submit(20, big), "TOO_LARGE", "bad", 20)
        del big
        # accepted, refused by the decoding stage (ordered replies)
        expect(submit(21, jpeg[: len(jpeg) // 2]), "BAD_IMAGE", "bad", 21, accepted=True)  # truncated JPEG
        expect(submit(22, tiny.getvalue()), "IMAGE_TOO_SMALL", "bad", 22, accepted=True)
        # a bool tensor from the Python client
        c.submit(np.zeros((1, 3, 224, 224), bool), stream="bad2")
        rep = c.recv(20)
        assert rep["code"] == "BAD_DTYPE", rep
        c.submit(x.astype(np.float64), stream="bad2")
        rep = c.recv(20)
        assert rep["code"] == "SHAPE_MISMATCH", rep
        still_works()
        st = c.stats()
    service.assert_alive()
    assert st["completed"] == n_ok
    assert st["errors"] == 2                     # the two frames refused by the decoding stage
    assert st["rejected"] == n_refused + 2       # everything else above, refused on receipt
    assert st["busy"] == 0


@pytest.mark.timeout(60)
def test_message_over_maxmsgsize_drops_the_connection_and_the_service_goes_on(service):
    img = image_bytes("JPEG", seed=6)
    limit = service.server.limits.max_message_bytes
    ctx = zmq.Context()
    rogue = raw_dealer(ctx, service.endpoint)
    try:
        with service.client() as other:
            other.submit(img, stream="o")
            check_result(other.recv(20), "o", 0)
            rogue.send_multipart([header(type="submit", stream="r", seq=0), b"\xff\xd8\xff" + bytes(limit)])
            assert recv_json(rogue, 1.5) is None, "a message over MAXMSGSIZE must get no reply"
            # the service keeps serving others
            for _ in range(3):
                seq = other.submit(img, stream="o")
                check_result(other.recv(20), "o", seq)
            st = other.stats()
        # the dropped DEALER reconnects by itself, as a new client
        rogue.send_multipart([header(type="hello")])
        got = recv_json(rogue, 20)
        assert got is not None and got[0]["type"] == "hello"
    finally:
        rogue.close(0)
        ctx.term()
    service.assert_alive()
    assert st["accepted"] == st["completed"] == 4


@pytest.mark.timeout(60)
def test_a_client_disconnecting_mid_stream_does_not_hurt_the_service(service, squeezenet):
    _, g = squeezenet
    img = image_bytes("JPEG", seed=7)
    with service.client() as gone:
        for _ in range(10):
            gone.submit(img, stream="g")
        gone.submit(tensor(g), stream="g")
        wait_for(lambda: service.server.counters.accepted >= 11, timeout=10, what="11 accepted frames")
    # closed with 11 frames accepted and (mostly) unanswered
    with service.client() as other:
        for _ in range(5):
            seq = other.submit(img, stream="o")
            check_result(other.recv(20), "o", seq)

        def settled():
            st = other.stats()
            return st if st["queue"] == {"pending": 0, "in_flight": 0} else None
        st = wait_for(settled, timeout=20, what="the queue to empty")
    service.assert_alive()
    assert st["accepted"] == 16
    assert st["completed"] + st["errors"] == 16 and st["errors"] == 0
    assert all(s["errors"] == 0 for s in st["stages"])


# ---------------------------------------------------------------------------------------------
# hello / stats / query


@pytest.mark.timeout(60)
def test_hello_stats_and_query(service):
    img = image_bytes("PNG", seed=8)
    with service.client() as c:
        h = c.hello()
        assert h["type"] == "hello" and h["protocol"] == cp.PROTOCOL_VERSION == 1
        assert h["input"] == {"name": "data", "dtype": "float32", "shape": [1, 3, 224, 224]}
        assert sorted(h["accepts"]) == ["bgr24", "image", "jpeg", "nv12", "nv21", "png", "raw", "rgb24"]
        lim = h["limits"]
        assert lim["max_message_bytes"] == ServerLimits().max_message_bytes
        assert lim["max_encoded_bytes"] == ImageLimits().max_encoded_bytes
        assert lim["max_pixels"] == ImageLimits().max_pixels

        q = c.query("q")
        assert q == {"v": 1, "type": "query", "stream": "q", "last_delivered": None, "pending": []}
        for _ in range(3):
            c.submit(img, stream="q")
        q = c.query("q")                         # in flight or just done: consistent either way
        done = -1 if q["last_delivered"] is None else q["last_delivered"]
        assert q["pending"] == list(range(done + 1, 3))
        assert [r["seq"] for r in frame_replies(c, 3)] == [0, 1, 2]
        wait_for(lambda: c.query("q")["last_delivered"] == 2, timeout=10, what="last_delivered 2")
        assert c.query("q")["pending"] == []
        assert c.query("default")["last_delivered"] is None

        st = c.stats()
        assert st["type"] == "stats"
        for key in ("accepted", "completed", "errors", "busy", "rejected", "clients"):
            assert isinstance(st[key], int), key
        assert st["accepted"] == st["completed"] == 3
        assert st["queue"] == {"pending": 0, "in_flight": 0}
        assert st["uptime_s"] > 0 and st["clients"] >= 1
        assert [s["stage"] for s in st["stages"]] == [0, 1]
        assert len(st["plan"]["stages"]) == 2

        # a default-stream query without a stream field
        c.send_raw([header(type="query")])
        assert c.recv(20) == {"v": 1, "type": "query", "stream": "default", "last_delivered": None, "pending": []}
    service.assert_alive()


# ---------------------------------------------------------------------------------------------
# flow control


@pytest.mark.timeout(60)
def test_busy_when_the_pending_queue_is_full(squeezenet, tmp_path):
    img = image_bytes("JPEG", seed=9)
    n = 40
    with running_service(squeezenet, tmp_path, max_inflight=1, limits=ServerLimits(max_pending=1)) as svc:
        with svc.client() as c:
            for _ in range(n):
                c.submit(img, stream="s")
            reps = frame_replies(c, n, timeout=30)
            assert c.recv(0.3) is None, "more replies than frames"
            seqs = sorted(r["seq"] for r in reps)
            assert seqs == list(range(n)), "every frame gets exactly one reply"
            busy = [r for r in reps if r["type"] == "error"]
            ok = [r for r in reps if r["type"] == "result"]
            assert all(r["code"] == "BUSY" and r["stream"] == "s" for r in busy), busy
            assert busy, "expected at least one BUSY"
            assert ok, "expected some frames to be accepted"
            assert [r["seq"] for r in ok] == sorted(r["seq"] for r in ok), "results out of order"
            for r in ok:
                check_result(r, "s")
            # BUSY frames were not accepted: resending them later works
            for r in busy[:3]:
                c.submit(img, stream="s", seq=r["seq"])
                check_result(c.recv(20), "s", r["seq"])
            st = c.stats()
        assert st["busy"] == len(busy)
        assert st["accepted"] == st["completed"] == len(ok) + min(3, len(busy))
        svc.assert_alive()


@contextlib.contextmanager
def stopped(pid: int):
    """SIGSTOP a stage worker so that accepted frames stay in flight; always SIGCONT."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.timeout(60)
def test_per_client_limits_and_a_raw_only_service(squeezenet, tmp_path):
    _, g = squeezenet
    x = tensor(g)
    limits = ServerLimits(max_inflight_per_client=4, max_streams_per_client=1)
    with running_service(squeezenet, tmp_path, stages=RAW_TWO_STAGES, preprocess=False, max_inflight=2,
                         limits=limits, heartbeat_timeout=60.0) as svc:
        with svc.client() as c, svc.client() as d:
            h = c.hello()
            assert h["accepts"] == ["raw"]
            assert h["limits"]["max_inflight_per_client"] == 4 and h["limits"]["max_streams_per_client"] == 1
            c.submit(image_bytes("JPEG"), stream="a", seq=100)
            rep = c.recv(20)
            assert (rep["type"], rep["code"], rep["seq"]) == ("error", "NO_PREPROCESS", 100)

            with stopped(svc.pipe.workers[1].pid):     # frames stay in flight
                for _ in range(3):
                    c.submit(x, stream="a")            # a0..a2 accepted
                c.submit(x, stream="b")                # a second stream while "a" is busy
                rep = c.recv(20)
                assert (rep["code"], rep["stream"], rep["seq"]) == ("LIMIT", "b", 0), rep
                c.submit(x, stream="a")                # a3: the 4th frame in flight, accepted
                c.submit(x, stream="a")                # a4: over the in-flight limit
                rep = c.recv(20)
                assert (rep["code"], rep["stream"], rep["seq"]) == ("LIMIT", "a", 4), rep
                q = c.query("a")
                assert q["pending"] == [0, 1, 2, 3] and q["last_delivered"] is None
                d.submit(x, stream="b")                # limits are per client
                assert d.recv(0.3) is None             # accepted, waiting
            reps = frame_replies(c, 4)
            assert [(r["type"], r["seq"]) for r in reps] == [("result", i) for i in range(4)]
            for r in reps:
                check_result(r, "a")
            check_result(d.recv(20), "b", 0)
            c.submit(x, stream="b", seq=0)             # "a" is idle now: a new stream is fine
            check_result(c.recv(20), "b", 0)
            st = c.stats()
        assert st["limit"] == 2 and st["busy"] == 0 and st["rejected"] == 1
        svc.assert_alive()


@pytest.mark.timeout(60)
def test_stopping_service_refuses_new_frames_and_times_out_unfinished_ones(squeezenet, tmp_path):
    img = image_bytes("JPEG", seed=10)
    with running_service(squeezenet, tmp_path, drain_timeout=3.0, heartbeat_timeout=60.0) as svc:
        with svc.client() as c:
            c.submit(img, stream="s")
            check_result(c.recv(20), "s", 0)
            with stopped(svc.pipe.workers[1].pid):
                for _ in range(3):
                    c.submit(img, stream="s")          # seq 1..3, stuck in stage 1
                wait_for(lambda: c.query("s")["pending"] == [1, 2, 3], timeout=10, what="3 frames in flight")
                svc.stop.set()
                wait_for(lambda: not svc.server.accepting, timeout=10, what="the drain to start")
                c.submit(img, stream="s")              # seq 4
                rep = c.recv(20)
                assert (rep["type"], rep["code"], rep["seq"]) == ("error", "SHUTTING_DOWN", 4), rep
                reps = frame_replies(c, 3)
                assert [(r["code"], r["seq"]) for r in reps] == [("TIMEOUT", 1), ("TIMEOUT", 2), ("TIMEOUT", 3)]
                svc.thread.join(10)
                assert not svc.thread.is_alive()


# ---------------------------------------------------------------------------------------------
# the document


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def doc_client_snippet() -> str:
    text = doc_text()
    m = re.search(r"<!-- minimal-client -->\s*```python\n(.*?)```", text, re.S)
    assert m, "docs/protocol.md lost its minimal client (a ```python block after <!-- minimal-client -->)"
    return m.group(1)


@pytest.mark.timeout(60)
def test_the_minimal_client_in_the_doc_works(service, tmp_path):
    code = doc_client_snippet()
    assert "hetsched" not in code and "pickle" not in code
    assert len(code.strip().splitlines()) <= 25
    image = tmp_path / "frame.jpg"
    image.write_bytes(image_bytes("JPEG", seed=11))
    code, n1 = re.subn(r'^ENDPOINT = ".*"$', f"ENDPOINT = {service.endpoint!r}", code, flags=re.M)
    code, n2 = re.subn(r'^IMAGE = ".*"$', f"IMAGE = {str(image)!r}", code, flags=re.M)
    assert n1 == 1 and n2 == 1, "the snippet must set ENDPOINT = \"...\" and IMAGE = \"...\" on their own lines"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=40, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3, proc.stdout
    for seq, line in enumerate(lines):
        got_seq, rest = line.split(" ", 1)
        assert int(got_seq) == seq
        assert re.fullmatch(r"result class \d+ 0\.\d+", rest), line
    service.assert_alive()


@pytest.mark.timeout(10)
def test_the_doc_matches_the_code():
    """Every code, type, encoding, dtype and default limit of the implementation is in the doc."""
    text = doc_text()
    assert "No pickle or other code-executing format is used on the wire." in text
    for code in cp.ERROR_CODES:
        assert re.search(rf"^\| `{code}` \|", text, re.M), f"error code {code} missing from the table"
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", text, re.M))
    assert documented == set(cp.ERROR_CODES), documented ^ set(cp.ERROR_CODES)
    for name in cp.CLIENT_TYPES + cp.ENCODINGS + cp.DTYPES:
        assert f"`{name}`" in text, name
    sl, il = ServerLimits(), ImageLimits()
    numbers = [cp.MAX_HEADER_BYTES, cp.MAX_STREAM_NAME, cp.MAX_TRACE_FRAMES, sl.max_message_bytes,
               sl.max_tensor_elements, sl.max_streams_per_client, sl.max_inflight_per_client, sl.max_pending,
               sl.max_outbox, il.max_encoded_bytes, il.max_pixels, il.min_side, il.max_side]
    for n in numbers:
        assert re.search(rf"\b{n}\b", text.replace(",", "")), f"limit {n} is not in the doc"
    # the worked example's header bytes are what the code would send
    m = re.search(r"<!-- example-submit-header -->\s*```\n(.*?)```", text, re.S)
    assert m, "worked example header missing"
    hexdump = m.group(1)
    raw = bytes.fromhex("".join(line[6:53] for line in hexdump.strip().splitlines()))
    assert raw == cp.encode({"type": "submit", "stream": "cam0", "seq": 0, "encoding": "jpeg"})
    assert f"{len(raw)} bytes" in text


# every error code of the doc's table, and where it is produced by a real message
ELSEWHERE = {  # codes that need a particular service state, each shown by a test of its own
    "BUSY": "test_busy_when_the_pending_queue_is_full",
    "LIMIT": "test_per_client_limits_and_a_raw_only_service",
    "NO_PREPROCESS": "test_per_client_limits_and_a_raw_only_service",
    "SHUTTING_DOWN": "test_stopping_service_refuses_new_frames_and_times_out_unfinished_ones",
    "TIMEOUT": "test_stopping_service_refuses_new_frames_and_times_out_unfinished_ones",
    "NO_LANE": "tests/test_lane.py::test_the_lane_is_refused_on_tcp_and_a_gone_client_releases_its_region",
    "FRAME_FAILED": "tests/test_reliability.py::test_a_poison_frame_is_failed_after_two_lost_workers_and_the_others_go_on",
    # no client message the service checks can cause it: the code of an unexpected exception in a
    # stage, sent by the same error path as the ordered codes (e.g. the ordered BAD_SHM of test_shm.py)
    "STAGE_FAILED": "tests/test_shm.py::test_region_truncated_after_registration_is_refused_at_submit (same path)",
}


@pytest.mark.timeout(120)
def test_every_documented_error_code_is_sent_by_the_service(service):
    """Each code in docs/protocol.md's table: a real message that gets it, on the live service (or
    the test that shows it, for codes that need a particular state of the service)."""
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", doc_text(), re.M))
    x = np.zeros((1, 3, 224, 224), np.float32)
    sub = {"type": "submit", "stream": "e", "seq": 0}
    cases = {
        "BAD_HEADER": [b"not json"],
        "BAD_VERSION": [json.dumps({"v": 2, "type": "hello"}).encode()],
        "BAD_TYPE": [header(type="fetch")],
        "BAD_FRAMES": [header(**sub, encoding="raw", dtype="float32", shape=[1, 3, 224, 224])],
        "BAD_IMAGE": [header(**sub, encoding="jpeg"), b"GIF89a not a jpeg at all"],
        "IMAGE_TOO_SMALL": [header(**sub, encoding="png"), image_bytes("PNG", 4, 4)],
        "TOO_LARGE": [header(**sub, encoding="raw", dtype="float32", shape=[1, 1 << 20, 1 << 20, 1]), b"x"],
        "BAD_DTYPE": [header(**sub, encoding="raw", dtype="complex64", shape=[1, 3, 224, 224]), x.tobytes()],
        "SHAPE_MISMATCH": [header(**sub, encoding="raw", dtype="float32", shape=[1, 3, 200, 200]), x.tobytes()],
        "SIZE_MISMATCH": [header(**sub, encoding="rgb24", width=64, height=48), bytes(100)],
        "IMAGE_TOO_LARGE": [header(**sub, encoding="rgb24", width=20000, height=8), bytes(20000 * 8 * 3)],
        "BAD_SHM": [header(**sub, encoding="shm", shm=7, slot=0, dtype="float32", shape=[1, 3, 224, 224])],
    }
    with service.client() as c:
        assert c.enable_shm(slots=2)
        cases["BAD_SLOT"] = [header(**sub, encoding="shm", shm=0, slot=5, dtype="float32", shape=[1, 3, 224, 224])]
        for code, parts in cases.items():
            c.send_raw(parts)
            rep = c.recv(20)
            assert rep["type"] == "error" and rep["code"] == code, (code, rep)
    service.assert_alive()
    assert documented == set(cases) | set(ELSEWHERE), documented ^ (set(cases) | set(ELSEWHERE))
