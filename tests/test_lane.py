"""The direct lane (hetsched.client.lane): local clients send frames straight to a one-stage plan's
workers. Its pure book (order, exactly one answer, replays, poison frames) on constructed events; then
real services: results equal to the unsplit model in per-stream order with the coordinator off the
path, a worker killed mid-stream (every frame answered once, correctly), a plan switched mid-stream,
hostile messages sent straight to a worker, a plan without a lane, and the service's counters."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import zmq

from hetsched.client import Client
from hetsched.client.lane import LaneBook
from hetsched.config import InputConfig
from hetsched.model.preprocess import preprocess_encoded
from hetsched.runtime.drift import Decision
from hetsched.runtime.pipeline import Pipeline
from hetsched.runtime.runtime import Runtime
from hetsched.server.front import Server
from hetsched.wire import stage_protocol as sp

from .conftest import manual_plan, topk5, wait_for
from .test_client_socket import N_CLASSES, image_bytes, running_service, tensor
from .test_pipeline import reference

POOL = [(0, 22, [((0,), 1, 1), ((1,), 1, 1)])]   # one stage served by a worker on each core


# ---------------------------------------------------------------------------- the book (pure)
def _req(slot=0):
    return ("tensor", slot, {"dtype": "float32", "shape": [1]}, None)


def test_book_releases_each_stream_in_order_and_drops_second_answers():
    b = LaneBook()
    a0, a1 = b.add("a", 0, _req(0), False, 0.0), b.add("a", 1, _req(1), False, 0.0)
    c0 = b.add("c", 0, _req(2), False, 0.0)
    for f, w in ((a0, 0), (a1, 1), (c0, 0)):
        b.queued.remove(f.token)
        b.on_sent(f.token, w, 0)
    assert b.answer(a1.token, {"seq": 1}) == []            # a/1 waits for a/0
    assert b.answer(c0.token, {"seq": "c0"}) == [{"seq": "c0"}]  # other streams do not wait
    assert b.answer(a0.token, {"seq": 0}) == [{"seq": 0}, {"seq": 1}]
    assert b.answer(a0.token, {"seq": 0}) == [] and b.duplicates == 1
    assert not b.frames and not b.streams and not b.by_seq


def test_book_replays_a_lost_workers_frames_first_and_gives_up_on_a_poison_frame():
    b = LaneBook(max_attempts=2)
    f0, f1, f2 = (b.add("s", i, _req(i), False, 0.0) for i in range(3))
    for f, w in ((f0, 0), (f1, 1), (f2, 0)):
        b.queued.remove(f.token)
        b.on_sent(f.token, w, 7)
    lost = b.held_by(lambda f: f.worker == 0)
    assert [f.seq for f in lost] == [0, 2]
    assert b.requeue(lost, "worker 0 was lost") == []
    assert list(b.queued) == [f0.token, f2.token] and b.replays == 2   # oldest first
    b.queued.clear()
    b.on_sent(f0.token, 1, 7)
    failed = b.requeue(b.held_by(lambda f: f.worker == 1 and f.seq == 0), "worker 1 was lost")
    assert [(f.seq, "given up" in why) for f, why in failed] == [(0, True)]
    assert b.front_token("s", 1) == f1.token and b.front_token("s", 9) is None


# ---------------------------------------------------------------------------- real services
def lane_frames(c: Client, n: int, xs: list, streams=("a", "b"), timeout: float = 60.0) -> list[dict]:
    """Submit ``n`` frames (window 6) round-robin over ``streams``; return every reply as it came."""
    got, sent = [], 0
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, f"{len(got)} of {n} replies"
        while sent < n and sent - len(got) < 6:
            c.submit(xs[sent % len(xs)], stream=streams[sent % len(streams)], want_outputs=True)
            sent += 1
        r = c.recv(5)
        if r is not None and r["type"] in ("result", "error"):
            got.append(r)
    return got


def check_exactly_once_in_order(got: list[dict], xs: list, want: list, n: int, streams=("a", "b")) -> None:
    assert all(r["type"] == "result" for r in got), [r for r in got if r["type"] != "result"][:3]
    for s in streams:
        seqs = [r["seq"] for r in got if r["stream"] == s]
        assert seqs == list(range(len(seqs))), f"stream {s}: {seqs}"
    assert len(got) == n
    for r in got:
        i = r["seq"] * len(streams) + streams.index(r["stream"])
        assert np.abs(r["arrays"][0] - want[i % len(xs)]).max() <= 1e-4


@pytest.mark.timeout(180)
def test_lane_results_equal_the_unsplit_model_with_the_coordinator_off_the_path(squeezenet, tmp_path):
    model, g = squeezenet
    xs = [tensor(g, seed=s) for s in range(5)]
    want = reference(model, xs)
    jpeg = image_bytes("JPEG", seed=3)
    want_jpeg = reference(model, [preprocess_encoded(jpeg, InputConfig())])[0]
    with running_service(squeezenet, tmp_path, stages=POOL) as svc:
        with svc.client() as c:
            assert c.enable_shm(slots=8)
            assert c.lane_status()["direct"] is True
            got = lane_frames(c, 30, xs)
            c.submit(jpeg, stream="img", encoding="jpeg", want_outputs=True)   # decoded by the worker
            rep = c.recv(30)
            status = c.lane_status()
        check_exactly_once_in_order(got, xs, want, 30)
        assert all(r.get("lane") for r in got), "every frame went straight to a worker"
        assert rep["type"] == "result" and rep.get("lane") and np.abs(rep["arrays"][0] - want_jpeg).max() <= 1e-4
        assert rep["top_k"][0]["label"] == f"class {int(np.argmax(want_jpeg))}"
        assert {r["stages"][0]["worker"] for r in got} == {0, 1}, "both workers served"
        assert status["unanswered"] == 0 and status["duplicates"] == 0
        assert svc.pipe.completed == 0 and not svc.pipe.ledger.in_flight, "no frame went through the coordinator"
        # the service still counts them (the client's reports and the workers' heartbeats)
        wait_for(lambda: svc.server.counters.completed == 31, timeout=10, what="lane reports")
        wait_for(lambda: svc.pipe.direct_completed == 31, timeout=10, what="worker heartbeats")
        assert svc.server.counters.latency.count == 31 and svc.server.counters.stage_compute[0].count == 31
        lane_trace = [f for f in svc.server.trace(1000)["frames"] if f["id"] < 0]
        assert len(lane_trace) == 31 and all(len(f["hops"]) == 1 and f["hops"][0][0] == 0 for f in lane_trace)
        assert all(f["t_submit"] <= f["hops"][0][2] <= f["hops"][0][4] <= f["t_done"] for f in lane_trace)


@pytest.mark.timeout(180)
def test_lane_worker_killed_mid_stream_every_frame_answered_once(squeezenet, tmp_path):
    model, g = squeezenet
    xs = [tensor(g, seed=10 + s) for s in range(4)]
    want = reference(model, xs)
    with running_service(squeezenet, tmp_path, stages=POOL, heartbeat_timeout=1.0) as svc:
        victim = svc.pipe.workers[1]
        killed = threading.Event()

        def kill_later() -> None:
            wait_for(lambda: (victim.stats.get("direct_frames") or 0) >= 5, timeout=60, what="victim busy")
            os.kill(victim.pid, signal.SIGKILL)
            killed.set()

        th = threading.Thread(target=kill_later, daemon=True)
        th.start()
        with svc.client() as c:
            assert c.enable_shm(slots=8) and c.lane_status()["direct"]
            got = lane_frames(c, 80, xs, timeout=150)
            status = c.lane_status()
        th.join(10)
        assert killed.is_set()
        check_exactly_once_in_order(got, xs, want, 80)
        assert status["unanswered"] == 0
        assert svc.pipe.supervisor.restarts >= 1


@pytest.mark.timeout(240)
def test_lane_plan_switched_mid_stream_every_frame_answered_once(squeezenet, tmp_path):
    """A re-plan on a lane: the old plan's workers go (their frames are sent again), the new plan's
    lane takes over; then a switch to two stages (no lane): frames go through the service."""
    model, g = squeezenet
    xs = [tensor(g, seed=20 + s) for s in range(4)]
    want = reference(model, xs)

    def make(p, generation, ids):
        return Pipeline(model, g, p, max_inflight=6, frame_ids=ids, generation=generation, topk=topk5())
    rt = Runtime(manual_plan(g, POOL), make).start()
    server = Server(rt, f"ipc://{tmp_path}/c.sock")
    plans = [manual_plan(g, [(0, 22, [((1,), 1, 1), ((0,), 1, 1)])]),
             manual_plan(g, [((0,), 0, 9, 1, 1), ((1,), 10, 22, 1, 1)])]
    todo: list = []

    def on_tick(s: Server) -> None:   # the serve thread runs the switch, as the runtime's own check would
        if todo and rt.starting is None:
            new = todo.pop(0)
            rt._begin_switch(Decision(True, "test", rt.active.plan, new, 1.0), {}, 0.0, {"switch": True})

    stop = threading.Event()
    th = threading.Thread(target=server.serve, args=(stop.is_set, on_tick, 0.2), daemon=True)
    th.start()
    try:
        with Client(server.endpoint, timeout=30) as c:
            assert c.enable_shm(slots=8) and c.lane_status()["direct"]
            got = lane_frames(c, 20, xs, streams=("a",))
            todo.append(plans[0])
            wait_for(lambda: rt.generation == 1, timeout=60, what="the first switch")
            got += lane_frames_more(c, xs, 20, 40, ("a",))
            assert c.lane_status()["generation"] == 1 and c.lane_status()["direct"]
            todo.append(plans[1])
            wait_for(lambda: rt.generation == 2, timeout=60, what="the second switch")
            got += lane_frames_more(c, xs, 40, 60, ("a",))
            status = c.lane_status()
        assert status["direct"] is False and "stage" in status["why"]
        check_exactly_once_in_order(got, xs, want, 60, streams=("a",))
        assert any(r.get("lane") for r in got[:20]) and not any(r.get("lane") for r in got[-5:])
    finally:
        stop.set()
        th.join(30)
        server.close()
        rt.stop()


def lane_frames_more(c: Client, xs: list, start: int, end: int, streams) -> list[dict]:
    """Frames ``start``..``end`` of one stream (seqs continue from ``start``)."""
    got, sent = [], start
    deadline = time.monotonic() + 90
    while len(got) < end - start:
        assert time.monotonic() < deadline, f"{len(got)} of {end - start} replies"
        while sent < end and sent - start - len(got) < 6:
            c.submit(xs[sent % len(xs)], stream=streams[0], want_outputs=True)
            sent += 1
        r = c.recv(5)
        if r is not None and r["type"] in ("result", "error"):
            got.append(r)
    return got


@pytest.mark.timeout(120)
def test_hostile_messages_straight_to_a_worker_are_refused_and_it_serves_on(squeezenet, tmp_path):
    model, g = squeezenet
    x = tensor(g, seed=3)
    want = reference(model, [x])[0]
    with running_service(squeezenet, tmp_path, stages=POOL) as svc:
        with svc.client() as c:
            assert c.enable_shm(slots=2) and c.lane_status()["direct"]
            region = c._lane.region
            ctx = zmq.Context.instance()
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(svc.pipe.workers[0].direct_endpoint)
            try:
                def ask(parts):
                    s.send_multipart(parts)
                    assert s.poll(20000), "the worker did not answer"
                    reply = s.recv_multipart()
                    return sp.unpack_done(reply[0]), reply[1:]

                s.send(b"garbage")                                   # not a work header: dropped
                s.send_multipart([b"x"] * 40)
                d, text = ask([sp.pack_work(sp.KIND_RING, 1, 0, 0, 0.0)])      # a ring slot: never from a client
                assert d.kind == sp.KIND_FAILED and d.code == "BAD_FRAMES" and d.frame_id == 1
                d, text = ask([sp.pack_work(sp.KIND_REGION, 2, 0, 0, 0.0, region=region, region_slot=99)])
                assert d.kind == sp.KIND_FAILED and d.code == "BAD_SLOT", text
                d, text = ask([sp.pack_work(sp.KIND_REGION, 3, 0, 0, 0.0, region=12345, region_slot=0)])
                assert d.kind == sp.KIND_FAILED and d.code == "BAD_SHM", text
                d, text = ask([sp.pack_work(sp.KIND_BYTES, 4, 0, 0, 0.0), b"not an image"])
                assert d.kind == sp.KIND_FAILED and d.code == "BAD_IMAGE", text
                d, text = ask([sp.pack_work(sp.KIND_PIXELS, 5, 0, 0, 0.0, pixels=("rgb24", 100000, 100000, None)),
                               b"\0" * 30])
                assert d.kind == sp.KIND_FAILED, text
            finally:
                s.close(linger=0)
            c.submit(x, stream="after", want_outputs=True)       # the worker serves on
            rep = c.recv(30)
        assert rep["type"] == "result" and np.abs(rep["arrays"][0] - want).max() <= 1e-4
        assert all(w.process.is_alive() for w in svc.pipe.workers)


@pytest.mark.timeout(120)
def test_a_plan_of_two_stages_has_no_lane_and_frames_go_through_the_service(squeezenet, tmp_path):
    model, g = squeezenet
    xs = [tensor(g, seed=s) for s in range(3)]
    want = reference(model, xs)
    with running_service(squeezenet, tmp_path) as svc:     # two stages
        with svc.client() as c:
            assert c.enable_shm(slots=4)
            st = c.lane_status()
            assert st["direct"] is False and "stage" in st["why"]
            got = lane_frames(c, 12, xs)
        check_exactly_once_in_order(got, xs, want, 12)
        assert svc.pipe.completed == 12 and N_CLASSES > 0


@pytest.mark.timeout(120)
def test_the_lane_is_refused_on_tcp_and_a_gone_client_releases_its_region(squeezenet, tmp_path):
    from hetsched.wire import client_protocol as cp
    from hetsched.wire.shm import attached_count
    with running_service(squeezenet, tmp_path, stages=POOL) as svc:
        tcp = Server(svc.pipe, "tcp://127.0.0.1:*")
        try:
            with Client(tcp.endpoint, timeout=10) as c:
                c.send_raw([cp.encode({"type": "lane_open", "shm": 0, "id": 1})])
                poller = zmq.Poller()
                poller.register(tcp.front, zmq.POLLIN)
                wait_for(lambda: poller.poll(10) or None, timeout=10, what="the lane_open request")
                tcp.step(poller, 10)
                tcp._flush_all()
                rep = c.recv(10)
            assert rep["type"] == "error" and rep["code"] == "NO_LANE" and rep["id"] == 1
        finally:
            tcp.close()
        before = attached_count()
        with svc.client() as c:
            assert c.enable_shm(slots=2) and c.lane_status()["direct"]
            wait_for(lambda: attached_count() == before + 1, timeout=10, what="the service maps the region")
        # gone without a word: once a message to it finds no peer (a lane announcement here), its
        # region is unmapped at once instead of staying mapped until the service stops
        svc.pipe.lane_version += 1
        wait_for(lambda: attached_count() == before, timeout=10, what="the gone client's region to be released")


@pytest.mark.timeout(120)
def test_hetsched_feed_sends_images_on_the_lane(squeezenet, tmp_path):
    """The user's path: `hetsched feed --images` on an ipc:// service with a one-stage plan sends every
    JPEG straight to a worker; the results come back in order and the service counts them."""
    import json
    import subprocess
    import sys
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        (imgs / f"p{i}.jpg").write_bytes(image_bytes("JPEG", seed=40 + i))
    with running_service(squeezenet, tmp_path, stages=POOL) as svc:
        out = subprocess.run([sys.executable, "-m", "hetsched", "feed", "--connect", svc.endpoint, "--images",
                              str(imgs), "--loop", "--count", "12", "--json"],
                             capture_output=True, text=True, timeout=90)
        assert out.returncode == 0, out.stderr
        lines = [json.loads(x) for x in out.stdout.splitlines() if x.strip()]
        results = [x for x in lines if x["type"] == "result"]
        assert [r["seq"] for r in results] == list(range(12))
        assert svc.pipe.completed == 0, "no image went through the coordinator"
        wait_for(lambda: svc.server.counters.completed == 12, timeout=10, what="the lane report")


@pytest.mark.timeout(120)
def test_a_stopping_service_answers_every_lane_frame_once(squeezenet, tmp_path):
    """Stop while lane frames are in flight: those the workers hold are answered by them, the ones the
    client still holds are refused SHUTTING_DOWN by the service; none is left without an answer."""
    model, g = squeezenet
    x = tensor(g, seed=5)
    with running_service(squeezenet, tmp_path, stages=POOL, drain_timeout=5.0) as svc:
        with svc.client(timeout=10) as c:
            assert c.enable_shm(slots=12) and c.lane_status()["direct"]
            for i in range(10):
                c.submit(x, stream="s")
            svc.stop.set()                     # the serve loop drains and returns
            got = [c.recv(10) for _ in range(10)]
    assert all(r is not None for r in got), "a frame was left without an answer"
    assert [r["seq"] for r in got] == list(range(10))
    assert {r["type"] if r["type"] == "result" else r["code"] for r in got} <= {"result", "SHUTTING_DOWN"}


@pytest.mark.timeout(120)
def test_a_wait_shorter_than_a_millisecond_sleeps_instead_of_spinning(squeezenet, tmp_path):
    """ZeroMQ waits in whole milliseconds: a wait of 0.4 ms truncated to 0 returned at once, and a paced
    feed waiting out the gap between two frames spun a core (found at 130 frames/s: 0.99 ms of client
    CPU per frame). Now the sub-millisecond part waits in select(): counts the polls, and a reply
    that comes during such a wait still wakes it."""
    with running_service(squeezenet, tmp_path, stages=POOL) as svc:
        with svc.client() as plain, svc.client() as lane:
            assert lane.enable_shm(slots=4) and lane.lane_status()["direct"] is True
            calls = {"front": 0, "lane": 0}

            def counting(poller, key):
                real = poller.poll

                def poll(*a, **k):
                    calls[key] += 1
                    return real(*a, **k)
                poller.poll = poll

            counting(plain._poller, "front")
            counting(lane._lane.poller, "lane")
            t0 = time.monotonic()
            for _ in range(20):
                assert plain.recv(0.0004) is None and lane.recv(0.0004) is None
            assert calls["front"] <= 40 and calls["lane"] <= 60, calls
            assert time.monotonic() - t0 >= 40 * 0.0004   # each waited (a spin would also count polls)
            x = tensor(squeezenet[1], seed=1)
            for c in (plain, lane):
                c.submit(x, stream="w")
                deadline = time.monotonic() + 30
                rep = None
                while rep is None and time.monotonic() < deadline:
                    rep = c.recv(0.0009)
                assert rep is not None and rep["type"] == "result", rep
