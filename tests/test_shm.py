"""Shared-memory input slots: results equal the unsplit model, slots are reused, and the region is
refused when it is not the client's own, wrongly sized, or offered over tcp://. Hostile regions
(FIFOs, links, group/other access, foreign owner, truncated after registration) give BAD_SHM without
blocking or crashing, and the workers' region cache stays bounded and notices replaced files."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from hetsched.client import Client
from hetsched.runtime.pipeline import Pipeline
from hetsched.errors import ProtocolError
from hetsched.model.graph import random_inputs
from hetsched.server.front import Server, _Client
from hetsched.wire import shm
from hetsched.wire.shm import RegionCache, attach_region, attached_count, create_region

from .conftest import wait_for

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
            tcp._register_shm(tcp.clients.setdefault(b"x", _Client(b"x")), {"name": "hetsched-x", "slots": 1, "slot_bytes": 1})
    finally:
        tcp.close()


# ---------------------------------------------------------------------- hostile regions
@pytest.fixture
def shm_paths():
    """Names of files the test puts into /dev/shm; all removed at the end."""
    made: list[str] = []

    def new_name() -> str:
        name = f"hetsched-test-{os.getpid()}-{secrets.token_hex(4)}"
        made.append(os.path.join(shm.SHM_DIR, name))
        return name
    yield new_name
    for p in made:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def make_file(name: str, nbytes: int, mode: int = 0o600, fill: int = 0) -> str:
    path = os.path.join(shm.SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, bytes([fill]) * nbytes)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return path


def attach_within(timeout: float, *args):
    """attach_region in a thread: a regression that blocks fails the test instead of hanging it."""
    out: dict = {}

    def run():
        try:
            out["region"] = attach_region(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc
    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(timeout)
    assert not th.is_alive(), f"attach_region{args} still blocked after {timeout} s"
    return out


@pytest.mark.timeout(30)
def test_fifo_is_refused_without_blocking(shm_paths):
    name = shm_paths()
    os.mkfifo(os.path.join(shm.SHM_DIR, name), 0o600)
    out = attach_within(2.0, name, 1, 4096)
    assert isinstance(out.get("error"), ProtocolError), out
    assert out["error"].code == "BAD_SHM" and "FIFO" in out["error"].detail


@pytest.mark.timeout(120)
def test_fifo_registration_is_answered_and_service_goes_on(service, squeezenet, shm_paths):
    """The coordinator answers a FIFO registration with BAD_SHM in < 2 s and serves frames after it."""
    model, g = squeezenet
    name = shm_paths()
    os.mkfifo(os.path.join(shm.SHM_DIR, name), 0o600)
    x = random_inputs(g.inputs, seed=3)["data"]
    with Client(service.endpoint, timeout=30) as c, Client(service.endpoint, timeout=30) as other:
        other.submit(x, stream="o")
        assert other.recv(30)["type"] == "result"
        c.send_raw([shm_register(name, 1, x.nbytes)])
        rep = c.recv(2.0)
        assert rep is not None, "no answer to a FIFO registration within 2 s"
        assert rep["type"] == "error" and rep["code"] == "BAD_SHM", rep
        other.submit(x, stream="o")
        assert other.recv(30)["type"] == "result"


def shm_register(name: str, slots: int, slot_bytes: int) -> bytes:
    from hetsched.wire import client_protocol as cp
    return cp.encode({"type": "shm_register", "name": name, "slots": slots, "slot_bytes": slot_bytes})


def test_symlink_is_refused(shm_paths):
    target = shm_paths()
    make_file(target, 4096)
    link = shm_paths()
    os.symlink(os.path.join(shm.SHM_DIR, target), os.path.join(shm.SHM_DIR, link))
    with pytest.raises(ProtocolError, match="symbolic link") as err:
        attach_region(link, 1, 4096)
    assert err.value.code == "BAD_SHM"
    attach_region(target, 1, 4096).close()  # the file itself is fine


def test_directory_is_refused(shm_paths):
    name = shm_paths()
    os.mkdir(os.path.join(shm.SHM_DIR, name), 0o700)
    try:
        with pytest.raises(ProtocolError, match="directory"):
            attach_region(name, 1, 4096)
    finally:
        os.rmdir(os.path.join(shm.SHM_DIR, name))


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o660, 0o666])
def test_group_or_other_access_is_refused(shm_paths, mode):
    name = shm_paths()
    make_file(name, 4096, mode)
    with pytest.raises(ProtocolError, match="mode") as err:
        attach_region(name, 1, 4096)
    assert err.value.code == "BAD_SHM"
    assert attached_count() == 0


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_modes_are_accepted(shm_paths, mode):
    name = shm_paths()
    make_file(name, 8192, mode)
    r = attach_region(name, 2, 4096)
    try:
        assert r.view(1, "uint8", (4096,)).shape == (4096,)
    finally:
        r.close()


def test_foreign_owner_is_refused(shm_paths):
    if os.geteuid() != 0:
        pytest.skip("needs root to make a file owned by another user (an unprivileged user cannot chown)")
    name = shm_paths()
    path = make_file(name, 4096)
    os.chown(path, 65534, 65534)
    with pytest.raises(ProtocolError, match="uid 65534") as err:
        attach_region(name, 1, 4096)
    assert err.value.code == "BAD_SHM"


def test_wrong_size_is_refused_both_ways(shm_paths):
    name = shm_paths()
    make_file(name, 3 * 4096)
    for slots in (2, 4):
        with pytest.raises(ProtocolError, match="expected") as err:
            attach_region(name, slots, 4096)
        assert err.value.code == "BAD_SHM"
    attach_region(name, 3, 4096).close()
    assert attached_count() == 0


def test_hostile_shapes_do_not_wrap_around(shm_paths):
    """np.prod of (2**20,)*4 wraps to 0 in int64; the size check must use exact integers."""
    name = shm_paths()
    make_file(name, 4096)
    r = attach_region(name, 1, 4096)
    try:
        for shape in [(1 << 20,) * 4, (1 << 20,) * 8, (0,), (-4, -1)]:
            with pytest.raises(ProtocolError, match="needs|bytes"):
                r.view(0, "float32", shape)
    finally:
        r.close()


def test_truncated_region_gives_bad_shm(shm_paths):
    name = shm_paths()
    path = make_file(name, 2 * 4096, fill=7)
    r = attach_region(name, 2, 4096)
    try:
        assert int(r.view(1, "uint8", (4096,)).sum()) == 7 * 4096
        os.truncate(path, 4096)
        with pytest.raises(ProtocolError, match="truncated") as err:
            r.check_size()
        assert err.value.code == "BAD_SHM"
        for slot in (0, 1):  # the whole region is refused, not only the slots past the end
            with pytest.raises(ProtocolError, match="truncated"):
                r.view(slot, "uint8", (4096,))
    finally:
        r.close()


TRUNCATE_AND_READ = """
import os, sys
from hetsched.errors import ProtocolError
from hetsched.wire.shm import RegionCache
name, path = sys.argv[1], os.path.join("/dev/shm", sys.argv[1])
cache = RegionCache()
print(int(cache.view(name, 2, 4096, 1, "uint8", (4096,)).sum()), flush=True)
os.truncate(path, 100)
for how in ("view", "read"):
    try:
        a = getattr(cache, how)(name, 2, 4096, 1, "uint8", (4096,))
        print("read", int(a.sum()), flush=True)
    except ProtocolError as exc:
        print(exc.code, name in cache, flush=True)
"""


@pytest.mark.timeout(60)
def test_truncated_region_is_an_error_not_sigbus_in_a_reader_process(shm_paths):
    """A worker-like process reading a region truncated after it was mapped gets BAD_SHM and lives
    (without the size check the read is a SIGBUS: the process would die with -7)."""
    name = shm_paths()
    make_file(name, 2 * 4096, fill=1)
    r = subprocess.run([sys.executable, "-c", TRUNCATE_AND_READ, name], capture_output=True, text=True, timeout=50)
    assert r.returncode != -signal.SIGBUS, "the reader died of SIGBUS"
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["4096", "BAD_SHM", "False", "BAD_SHM", "False"], r.stdout


def test_region_keeps_its_descriptor_until_closed(shm_paths):
    name = shm_paths()
    make_file(name, 4096)
    before = attached_count()
    r = attach_region(name, 1, 4096)
    assert r.fd >= 0 and os.fstat(r.fd).st_size == 4096
    assert attached_count() == before + 1
    fd = r.fd
    r.close()
    assert r.fd == -1 and attached_count() == before
    with pytest.raises(OSError):
        os.fstat(fd)
    r.close()  # idempotent
    assert attached_count() == before


def test_attached_regions_are_bounded(shm_paths, monkeypatch):
    monkeypatch.setattr(shm, "MAX_ATTACHED", 2)
    names = [shm_paths() for _ in range(3)]
    for n in names:
        make_file(n, 4096)
    a, b = attach_region(names[0], 1, 4096), attach_region(names[1], 1, 4096)
    try:
        with pytest.raises(ProtocolError, match="limit 2") as err:
            attach_region(names[2], 1, 4096)
        assert err.value.code == "LIMIT"
        a.close()
        attach_region(names[2], 1, 4096).close()  # room again
    finally:
        a.close()
        b.close()
    assert attached_count() == 0


def test_region_cache_is_lru_bounded(shm_paths):
    names = [shm_paths() for _ in range(5)]
    for i, n in enumerate(names):
        make_file(n, 4096, fill=i)
    cache = RegionCache(max_regions=3)
    try:
        for i, n in enumerate(names[:3]):
            assert int(cache.view(n, 1, 4096, 0, "uint8", (16,))[0]) == i
        cache.view(names[0], 1, 4096, 0, "uint8", (16,))  # names[0] is now the most recently used
        for n in names[3:]:
            cache.view(n, 1, 4096, 0, "uint8", (16,))
            assert len(cache) <= 3
        assert names[0] in cache and names[1] not in cache and names[2] not in cache
        assert attached_count() == 3, "evicted regions are unmapped and their descriptors closed"
        assert int(cache.view(names[1], 1, 4096, 0, "uint8", (16,))[0]) == 1  # mapped again on demand
        assert len(cache) == 3
    finally:
        cache.close()
    assert len(cache) == 0 and attached_count() == 0


def test_region_cache_notices_replaced_and_removed_files(shm_paths):
    name = shm_paths()
    path = make_file(name, 4096, fill=1)
    cache = RegionCache()
    try:
        assert int(cache.view(name, 1, 4096, 0, "uint8", (8,))[0]) == 1
        os.unlink(path)                       # the client re-created its region under the same name
        make_file(name, 4096, fill=2)
        assert int(cache.view(name, 1, 4096, 0, "uint8", (8,))[0]) == 2, "stale mapping of a replaced file"
        assert attached_count() == 1
        os.unlink(path)                       # removed: refused, and dropped from the cache
        with pytest.raises(ProtocolError, match="cannot open") as err:
            cache.view(name, 1, 4096, 0, "uint8", (8,))
        assert err.value.code == "BAD_SHM" and name not in cache
        other = shm_paths()
        make_file(name, 4096)
        make_file(other, 4096)
        cache.view(name, 1, 4096, 0, "uint8", (8,))
        cache.view(other, 1, 4096, 0, "uint8", (8,))
        os.unlink(os.path.join(shm.SHM_DIR, other))
        assert cache.sweep() == [other]
        assert name in cache and other not in cache
        cache.forget(name)
        assert len(cache) == 0 and attached_count() == 0
    finally:
        cache.close()


@pytest.mark.timeout(120)
def test_region_truncated_after_registration_is_refused_at_submit(service, squeezenet):
    """Stage 0 checks the file before it reads a slot (the coordinator checks only what the client
    names): the frame gets BAD_SHM saying why, other frames go on."""
    model, g = squeezenet
    x = random_inputs(g.inputs, seed=4)["data"]
    from hetsched.wire import client_protocol as cp
    with Client(service.endpoint, timeout=30) as c:
        assert c.enable_shm(slots=2)
        os.truncate(c._region.path, 10)
        c.send_raw([cp.encode({"type": "submit", "stream": "s", "seq": 0, "encoding": "shm", "shm": 0, "slot": 0,
                               "dtype": "float32", "shape": list(x.shape)})])
        rep = c.recv(10)
        # (truncated before or after stage 0 mapped it: the worker maps a region when told of it, so
        # either the mapping or the read refuses it, each saying why)
        assert rep["type"] == "error" and rep["code"] == "BAD_SHM" and (
            "truncated" in rep["message"] or "greater than file size" in rep["message"]), rep
        c.sock.send_multipart([cp.encode({"type": "submit", "stream": "s", "seq": 1, "encoding": "raw",
                                          "dtype": "float32", "shape": list(x.shape)}), x])
        assert c.recv(30)["type"] == "result"


def test_read_copies_the_slot(shm_paths):
    name = shm_paths()
    path = make_file(name, 2 * 64)
    with open(path, "r+b") as fh:
        fh.seek(64)
        fh.write(np.arange(16, dtype=np.float32).tobytes())
    r = attach_region(name, 2, 64)
    try:
        got = r.read(1, "float32", (4, 4))
        assert got.dtype == np.float32 and got.shape == (4, 4)
        assert np.array_equal(got, r.view(1, "float32", (4, 4)))
        with open(path, "r+b") as fh:
            fh.seek(64)
            fh.write(b"\0" * 64)
        assert got[3, 3] == 15.0, "read returns a private copy"
        assert r.view(1, "float32", (4, 4))[3, 3] == 0.0
        os.truncate(path, 64 + 60)                     # slot 1 now ends past the file
        assert r.read(0, "float32", (16,)).shape == (16,)
        with pytest.raises(ProtocolError, match="truncated") as err:
            r.read(1, "float32", (16,))
        assert err.value.code == "BAD_SHM"
        with pytest.raises(ProtocolError, match="outside"):
            r.read(2, "float32", (1,))
    finally:
        r.close()
    with pytest.raises(ProtocolError, match="closed"):
        r.read(0, "float32", (1,))


FLIP_SIZE = """
import os, sys, time
path, full, stop = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
n = 0
while time.monotonic() < stop:
    os.truncate(path, 100 if n % 2 == 0 else full)
    n += 1
os.truncate(path, full)
print(n, flush=True)
"""
HAMMER_READ = """
import sys, time
from hetsched.errors import ProtocolError
from hetsched.wire.shm import attach_region
name, stop = sys.argv[1], float(sys.argv[2])
r = attach_region(name, 4, 65536)
ok = bad = 0
while time.monotonic() < stop:
    try:
        r.read(3, "uint8", (65536,)).sum()
        ok += 1
    except ProtocolError as exc:
        assert exc.code == "BAD_SHM", exc
        bad += 1
print(ok, bad, flush=True)
"""


@pytest.mark.timeout(60)
def test_read_survives_a_client_flipping_the_size(shm_paths):
    """Another process truncates and restores the file as fast as it can while a reader reads:
    the reader never dies (touching the mapping instead would end in SIGBUS)."""
    import time
    name = shm_paths()
    path = make_file(name, 4 * 65536)
    reader = subprocess.Popen([sys.executable, "-c", HAMMER_READ, name, str(time.monotonic() + 3.0)],
                              stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: reader.poll() is not None or attached_in(reader.pid, path), timeout=20,
                 what="the reader to map the region")
        flipper = subprocess.run([sys.executable, "-c", FLIP_SIZE, path, str(4 * 65536), str(time.monotonic() + 1.5)],
                                 capture_output=True, text=True, timeout=30)
        out, _ = reader.communicate(timeout=30)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait(10)
    assert reader.returncode == 0, f"reader died with {reader.returncode}"
    assert int(flipper.stdout) > 10
    ok, bad = map(int, out.split())
    assert ok > 0 and ok + bad > 10


def attached_in(pid: int, path: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as fh:
            return path in fh.read()
    except OSError:
        return False
