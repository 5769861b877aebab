"""Shared-memory input slots: results equal the unsplit model, slots are reused, and the region is
refused when it is not the client's own, wrongly sized, or offered over tcp://."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from hetsched.client import Client
from hetsched.runtime.pipeline import Pipeline
from hetsched.errors import ProtocolError
from hetsched.model.graph import random_inputs
from hetsched.server.front import Server
from hetsched.wire.shm import attach_region, create_region

from .conftest import manual_plan, topk5
from .test_pipeline import reference


@pytest.fixture
def service(squeezenet, tmp_path):
    model, g = squeezenet
    pipe = Pipeline(model, g, manual_plan(g, [((0,), 0, 10, 1, 1), ((1,), 11, 22, 1, 1)]), topk=topk5()).start()
    server = Server(pipe, f"ipc://{tmp_path}/c.sock")
    stop = threading.Event()
    th = threading.Thread(target=server.serve, args=(stop.is_set,), daemon=True)
    th.start()
    yield server
    stop.set()
    th.join(30)
    server.close()
    pipe.stop(drain_timeout=0)


@pytest.mark.timeout(120)
def test_shm_frames_equal_unsplit_model_and_slots_are_reused(service, squeezenet):
    model, g = squeezenet
    xs = [random_inputs(g.inputs, seed=50 + i)["data"] for i in range(5)]
    want = reference(model, xs)
    with Client(service.endpoint, timeout=30) as c:
        assert c.enable_shm(slots=3)
        path = c._region.path
        got = []
        for i in range(20):  # more frames than slots: slots are freed by replies and reused
            c.submit(xs[i % 5], stream="s", want_outputs=True)
            if i >= 2:
                got.append(c.recv(30))
        got += list(c.replies(expect=20 - len(got)))
        assert service.counters.completed == 20
    assert not os.path.exists(path), "the client's region is removed on close"
    assert [r["seq"] for r in got] == list(range(20))
    for r in got:
        assert np.abs(r["arrays"][0] - want[r["seq"] % 5]).max() <= 1e-4


def test_attach_refuses_bad_regions(tmp_path):
    r = create_region(2, 4096)
    try:
        with pytest.raises(ProtocolError, match="expected"):
            attach_region(r.name, 3, 4096)          # wrong size
        with pytest.raises(ProtocolError, match="name"):
            attach_region("../etc/passwd", 1, 4096)  # not a hetsched region name
        with pytest.raises(ProtocolError, match="cannot open"):
            attach_region("hetsched-nope", 1, 4096)
        ok = attach_region(r.name, 2, 4096)
        with pytest.raises(ProtocolError, match="slot"):
            ok.view(2, "float32", (4,))
        ok.close()
    finally:
        r.close()


@pytest.mark.timeout(60)
def test_unregistered_region_and_tcp_are_refused(squeezenet, service):
    with Client(service.endpoint, timeout=10) as c:
        c.sock.send_multipart([b'{"v":1,"type":"submit","stream":"s","seq":0,"encoding":"shm","shm":0,"slot":0,'
                               b'"dtype":"float32","shape":[1,3,224,224]}'])
        rep = c.recv(10)
        assert rep["type"] == "error" and rep["code"] == "BAD_SHM"
    model, g = squeezenet
    pipe = service.pipe
    tcp = Server(pipe, "tcp://127.0.0.1:*")
    try:
        with pytest.raises(ProtocolError, match="ipc://"):
            tcp._register_shm(tcp._client(b"x"), {"name": "hetsched-x", "slots": 1, "slot_bytes": 1})
    finally:
        tcp.close()
