"""Tests for the SCHED_FIFO duty-cycle little-core emulation (hetsched.host.emulation).

Every co-runner a test starts is recorded and SIGKILLed by PID in a finalizer if it
is still around: a leftover real-time co-runner would slow everything on its core.
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from hetsched.host import emulation as emulation
from hetsched.host.emulation import EmulatedCore, Emulator
from hetsched.errors import EmulationError

REPO = Path(__file__).resolve().parents[1]
CORE = 1

pytestmark = pytest.mark.skipif(
    CORE not in os.sched_getaffinity(0), reason=f"core {CORE} not available to this process"
)


def wait_until(pred, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def is_corunner(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and "hetsched.host.emulation" in " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@pytest.fixture
def tracked():
    """Record co-runner PIDs / Emulators / helper processes; kill leftovers by PID."""
    pids: set[int] = set()
    emulators: list[Emulator] = []
    procs: list[subprocess.Popen] = []

    class Tracker:
        def emulator(self, cores) -> Emulator:
            emu = Emulator(cores)
            emulators.append(emu)
            return emu

        def started(self, emu: Emulator) -> Emulator:
            pids.update(emu.pids)
            return emu

        def pid(self, pid: int) -> None:
            pids.add(pid)

        def proc(self, p: subprocess.Popen) -> subprocess.Popen:
            procs.append(p)
            return p

    yield Tracker()
    for emu in emulators:
        pids.update(emu.pids)
        try:
            emu.stop()
        except EmulationError:
            pass
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=5)
    for pid in pids:
        if is_corunner(pid):
            os.kill(pid, signal.SIGKILL)
    assert all(wait_until(lambda pid=pid: gone(pid), 5.0) for pid in pids)


@pytest.mark.timeout(30)
def test_corunner_pinned_fifo_and_reaped(tracked):
    emu = tracked.emulator([EmulatedCore(CORE, 0.5)])
    with emu:
        tracked.started(emu)
        assert len(emu.pids) == 1
        pid = emu.pids[0]
        p = psutil.Process(pid)
        assert p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        assert "hetsched.host.emulation" in " ".join(p.cmdline())
        assert set(p.cpu_affinity()) == {CORE}
        assert os.sched_getscheduler(pid) == os.SCHED_FIFO
        assert os.sched_getparam(pid).sched_priority == emulation.DEFAULT_PRIORITY
    assert emu.pids == []
    assert wait_until(lambda: not psutil.pid_exists(pid), 5.0)
    emu.stop()  # idempotent


@pytest.mark.timeout(30)
def test_restart_after_stop(tracked):
    emu = tracked.emulator([EmulatedCore(CORE, 0.5)])
    first = tracked.started(emu.start()).pids
    emu.stop()
    second = tracked.started(emu.start()).pids
    assert len(second) == 1 and second != first
    with pytest.raises(EmulationError, match="already started"):
        emu.start()
    emu.stop()
    assert all(wait_until(lambda p=p: gone(p)) for p in first + second)


def _busy_loop(n: int = 120_000) -> tuple[float, float]:
    """Return (wall, thread CPU) seconds of a pure-Python loop."""
    t, c = time.perf_counter(), time.thread_time()
    x = 0
    for i in range(n):
        x += i
    return time.perf_counter() - t, time.thread_time() - c


def _slowdown_ratio(tracked, emu: Emulator, rounds: int = 5) -> tuple[float, float]:
    """(share ratio, wall ratio), free and emulated alternating in rounds.

    share ratio: median(wall/cpu) emulated / median(wall/cpu) free -- how much less of
    the core the loop got.  It is immune to the host VM's own speed swings (the raw
    speed of this vCPU was seen to change by ~1.7x for tens of ms at a time), which
    make the plain wall-time ratio (also returned, for the message) noisy.
    """
    old = os.sched_getaffinity(0)
    free, slow = [], []
    try:
        os.sched_setaffinity(0, {CORE})
        _busy_loop()
        for _ in range(rounds):
            free += [_busy_loop() for _ in range(3)]
            with emu:
                tracked.started(emu)
                slow += [_busy_loop() for _ in range(3)]
    finally:
        os.sched_setaffinity(0, old)
    share = (statistics.median(w / c for w, c in slow) / statistics.median(w / c for w, c in free))
    wall = statistics.median(w for w, _ in slow) / statistics.median(w for w, _ in free)
    return share, wall


@pytest.mark.timeout(60)
def test_measured_slowdown_half_speed(tracked):
    emu = tracked.emulator([EmulatedCore(CORE, 0.5)])
    for _attempt in range(3):  # other work on a shared machine can disturb a timing
        share, wall = _slowdown_ratio(tracked, emu)
        if 1.5 <= share <= 2.6:
            break
    assert 1.5 <= share <= 2.6, f"slowdown {share:.2f} (wall-time ratio {wall:.2f}) for speed 0.5"


HELPER = """
import sys, time
from hetsched.host.emulation import Emulator, EmulatedCore
emu = Emulator([EmulatedCore({core}, 0.5)]).start()
print(" ".join(map(str, emu.pids)), flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(30)
def test_corunner_dies_with_sigkilled_parent(tracked):
    helper = tracked.proc(subprocess.Popen([sys.executable, "-c", HELPER.format(core=CORE)],
                                           stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                           env=child_env()))
    line = helper.stdout.readline().decode().strip()
    pids = [int(x) for x in line.split()]
    for pid in pids:
        tracked.pid(pid)
    assert len(pids) == 1 and is_corunner(pids[0])
    os.kill(helper.pid, signal.SIGKILL)
    helper.wait(timeout=5)
    assert wait_until(lambda: gone(pids[0]), 5.0), "co-runner outlived its SIGKILLed parent"


@pytest.mark.timeout(30)
def test_corunner_exits_if_parent_already_gone(tracked):
    # --parent-pid that is not our parent: the co-runner must exit at once, never spin.
    p = tracked.proc(subprocess.Popen(
        [sys.executable, "-m", "hetsched.host.emulation", "--core", str(CORE), "--speed", "0.5",
         "--parent-pid", str(os.getppid() or 1)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=child_env()))
    tracked.pid(p.pid)
    out, _ = p.communicate(timeout=10)
    assert p.returncode == 0 and b"ready" not in out


@pytest.mark.timeout(30)
def test_standalone_duration(tracked):
    t = time.monotonic()
    p = tracked.proc(subprocess.Popen(
        [sys.executable, "-m", "hetsched.host.emulation", "--core", str(CORE), "--speed", "0.5",
         "--duration", "0.3"], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env()))
    tracked.pid(p.pid)
    _, err = p.communicate(timeout=10)
    assert p.returncode == 0, err.decode()
    assert time.monotonic() - t >= 0.3


@pytest.mark.timeout(10)
@pytest.mark.parametrize("speed", [0.0, 0.01, 0.049, -0.5, 1.5, math.nan])
def test_speed_out_of_range(tracked, speed):
    emu = tracked.emulator([EmulatedCore(CORE, speed)])
    with pytest.raises(EmulationError, match="speed"):
        emu.start()
    assert emu.pids == []


@pytest.mark.timeout(10)
def test_core_outside_allowed_set(tracked):
    bad = max(os.sched_getaffinity(0)) + 1
    for core in (bad, -1):
        emu = tracked.emulator([EmulatedCore(core, 0.5)])
        with pytest.raises(EmulationError, match="not in"):
            emu.start()
        assert emu.pids == []


@pytest.mark.timeout(10)
def test_speed_one_means_no_corunner(tracked):
    with tracked.emulator([EmulatedCore(CORE, 1.0)]) as emu:
        assert emu.pids == []


@pytest.mark.timeout(10)
def test_realtime_not_permitted(tracked, monkeypatch):
    def refuse(*_a, **_k):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    emu = tracked.emulator([EmulatedCore(CORE, 0.5)])
    with pytest.raises(EmulationError, match="SCHED_FIFO is not permitted"):
        emu.start()
    assert emu.pids == []


def test_parse_core_spec():
    assert EmulatedCore.parse("1:0.5") == EmulatedCore(1, 0.5)
    assert EmulatedCore.parse("3:0.33:4") == EmulatedCore(3, 0.33, 4.0)
    with pytest.raises(EmulationError):
        EmulatedCore.parse("1")
