"""Emulate slow ("little") cores on alike cores with a real-time duty-cycle co-runner.

A little core at speed ``s`` is a core that delivers only the fraction ``s`` of its
cycles to whatever runs on it.  We emulate this with one co-runner process per
emulated core that is

* pinned to that core (``os.sched_setaffinity``),
* scheduled ``SCHED_FIFO`` so it preempts every normal (CFS) task on that core,
* busy-spinning for ``(1 - s) * period`` and sleeping ``s * period`` in every period,
  with periods anchored to an absolute ``time.monotonic`` schedule (no drift; if the
  co-runner falls behind it skips ahead).

Because the co-runner is real-time it slows *everything* on the core alike (our
stage workers and any baseline), and a task that sleeps between bursts cannot
harvest more than its share.  A plain ``while True: pass`` co-runner under the
normal scheduler (CFS/EEVDF) fails that: it has no speed knob (it only takes the
fair share), and a task that sleeps between frames gets well over half the core
(measured here, SqueezeNet frames with 2-8 ms gaps: 1.57x slower instead of 2x).

Both phase boundaries are anchored (period k spins over ``[t0 + kP, t0 + kP + (1-s)P)``):
timer wake-up latency (~20-35 us here, in a KVM guest) is kernel/hypervisor overhead
during which the emulated workload does not run either, so it is counted inside the
busy phase rather than added to it (measured: ~5 % more accurate than spinning a
full ``(1-s)P`` from the actual wake-up).

Period choice (``DEFAULT_PERIOD_MS`` = 2 ms), measured with
``scripts/emulation_accuracy.py`` and a CPU-availability probe on this 2-vCPU VM:
each period costs two context switches plus cache refill, which shows as extra CPU
time per frame (+1-7 %); at 1 ms that overhead pushed s=0.33 to +11 %, at 3-4 ms a
7 ms frame spans too few periods and the bursty medians scatter by +-6-8 %.  At 2 ms
median frame-time ratios were within ~5 % of 1/s for s = 0.5 and 0.33, busy and
bursty.

Limits: Linux RT throttling (``/proc/sys/kernel/sched_rt_runtime_us`` = 950000 of
1000000) caps RT tasks at 95 % of a core, so speeds below 0.05 are refused.
``PR_SET_PDEATHSIG`` fires when the *thread* that spawned the co-runner exits, so
call :meth:`Emulator.start` from a thread that lives as long as the emulation
(normally the main thread).

Library use::

    from hetsched.host.emulation import EmulatedCore, Emulator
    with Emulator([EmulatedCore(core=1, speed=0.5)]) as emu:
        ...            # everything on core 1 now runs at ~half speed
    # co-runners killed and reaped here (also at interpreter exit)

A CLI wrapper is a few lines::

    emu = Emulator([EmulatedCore.parse(spec) for spec in args.cores])  # "1:0.5[:2]"
    with emu:
        emu.run_for(args.duration)        # None: until Ctrl+C; raises if a co-runner dies

Standalone (benchmarks; the process itself becomes the co-runner)::

    python -m hetsched.host.emulation --core 1 --speed 0.5 --duration 30
    python -m hetsched.host.emulation --core 1 --speed 0.33            # until Ctrl+C

Needs permission for SCHED_FIFO (root or CAP_SYS_NICE / RLIMIT_RTPRIO and a
non-zero RT budget in the cgroup).  The co-runner command line always contains
``-m hetsched.host.emulation`` so leftovers are easy to find (``pgrep -f hetsched.host.emulation``).
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import gc
import logging
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

from hetsched.errors import EmulationError

log = logging.getLogger(__name__)

MIN_SPEED = 0.05
"""Lowest emulated speed: RT throttling allows RT tasks at most 95 % of a core."""

DEFAULT_PERIOD_MS = 2.0
"""Duty-cycle period, chosen by measurement (see the module docstring): short enough that
a 2-7 ms burst spans several periods, long enough that per-period switch/cache overhead
stays at a few per cent."""

DEFAULT_PRIORITY = 10
"""SCHED_FIFO priority of co-runners: above every normal task, below kernel IRQ
threads (50) and migration/watchdog threads (99)."""

MIN_PERIOD_MS = 0.1
MAX_PERIOD_MS = 1000.0

READY_TIMEOUT_S = 10.0
PARENT_CHECK_S = 0.1

_PR_SET_PDEATHSIG = 1

# Live emulators, stopped by one atexit hook (weak so stopped ones can be collected).
_LIVE: "weakref.WeakSet[Emulator]" = weakref.WeakSet()


@dataclass(frozen=True)
class EmulatedCore:
    """One core to slow down to ``speed`` (fraction of its cycles left for others)."""

    core: int
    speed: float  # MIN_SPEED <= speed < 1.0 ; 1.0 means no co-runner
    period_ms: float = DEFAULT_PERIOD_MS

    @classmethod
    def parse(cls, spec: str) -> "EmulatedCore":
        """Parse ``CORE:SPEED[:PERIOD_MS]``, e.g. ``"1:0.5"`` or ``"3:0.33:2"``."""
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise EmulationError(f"bad core spec {spec!r}; expected CORE:SPEED[:PERIOD_MS]")
        try:
            core = int(parts[0])
            speed = float(parts[1])
            period = float(parts[2]) if len(parts) == 3 else DEFAULT_PERIOD_MS
        except ValueError as exc:
            raise EmulationError(f"bad core spec {spec!r}: {exc}") from None
        return cls(core=core, speed=speed, period_ms=period)


def check_realtime_permitted() -> None:
    """Cheap probe: can this process create SCHED_FIFO tasks?

    Switches a short-lived helper *thread* (Linux scheduling policy is per thread)
    to SCHED_FIFO at priority 1 and back; raises EmulationError if refused.
    """
    result: list[BaseException] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            result.append(exc)

    t = threading.Thread(target=probe, name="hetsched-rt-probe", daemon=True)
    t.start()
    t.join(5.0)
    if result:
        exc = result[0]
        raise EmulationError(
            "SCHED_FIFO is not permitted for this process "
            f"({type(exc).__name__}: {exc}); run as root, grant CAP_SYS_NICE or raise "
            "RLIMIT_RTPRIO (ulimit -r), and make sure the cgroup has an RT budget"
        )
    try:
        with open("/proc/sys/kernel/sched_rt_runtime_us") as f:
            if int(f.read().strip()) == 0:
                raise EmulationError("RT scheduling is disabled (sched_rt_runtime_us = 0)")
    except (OSError, ValueError):
        pass


def _validate(cores: Sequence[EmulatedCore]) -> None:
    allowed = os.sched_getaffinity(0)
    seen: set[int] = set()
    for ec in cores:
        if not isinstance(ec, EmulatedCore):
            raise EmulationError(f"expected EmulatedCore, got {ec!r}")
        if not isinstance(ec.core, int) or ec.core not in allowed:
            raise EmulationError(
                f"core {ec.core!r} is not in this process's allowed CPU set {sorted(allowed)}"
            )
        if ec.core in seen:
            raise EmulationError(f"core {ec.core} is listed twice")
        seen.add(ec.core)
        sp = ec.speed
        if not isinstance(sp, (int, float)) or math.isnan(sp) or not (MIN_SPEED <= sp <= 1.0):
            raise EmulationError(
                f"speed {sp!r} for core {ec.core} out of range [{MIN_SPEED}, 1.0] "
                f"(RT throttling caps a real-time co-runner at 95 % of a core)"
            )
        p = ec.period_ms
        if not isinstance(p, (int, float)) or math.isnan(p) or not (MIN_PERIOD_MS <= p <= MAX_PERIOD_MS):
            raise EmulationError(
                f"period_ms {p!r} for core {ec.core} out of range [{MIN_PERIOD_MS}, {MAX_PERIOD_MS}]"
            )


def _child_env() -> dict[str, str]:
    """Environment for co-runners: make sure ``hetsched`` is importable."""
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = pkg_root + (os.pathsep + old if old else "")
    return env


class Emulator:
    """Starts one SCHED_FIFO duty-cycle co-runner per EmulatedCore; context manager.

    stop() kills and reaps every co-runner BY PID and waits (with a timeout) until
    each is gone; idempotent; also run at interpreter exit (atexit).  Cores with
    speed 1.0 get no co-runner.  An Emulator can be started again after stop().
    """

    def __init__(self, cores: Sequence[EmulatedCore], *, priority: int = DEFAULT_PRIORITY,
                 ready_timeout: float = READY_TIMEOUT_S):
        self.cores: tuple[EmulatedCore, ...] = tuple(cores)
        self.priority = int(priority)
        self.ready_timeout = float(ready_timeout)
        self._procs: list[tuple[EmulatedCore, subprocess.Popen]] = []
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> "Emulator":
        with self._lock:
            if self._procs:
                raise EmulationError("Emulator already started")
            _validate(self.cores)
            if not (1 <= self.priority <= os.sched_get_priority_max(os.SCHED_FIFO)):
                raise EmulationError(f"bad SCHED_FIFO priority {self.priority}")
            active = [ec for ec in self.cores if ec.speed < 1.0]
            if not active:
                return self
            check_realtime_permitted()
            _LIVE.add(self)
            try:
                for ec in active:
                    self._procs.append((ec, self._spawn(ec)))
                self._wait_ready()
            except BaseException:
                self._stop_locked(5.0)
                raise
            log.info("emulation running: %s",
                     ", ".join(f"core {ec.core} @ {ec.speed:g} (pid {p.pid})" for ec, p in self._procs))
            return self

    def _spawn(self, ec: EmulatedCore) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "hetsched.host.emulation",
               "--core", str(ec.core), "--speed", repr(float(ec.speed)),
               "--period-ms", repr(float(ec.period_ms)),
               "--priority", str(self.priority),
               "--parent-pid", str(os.getpid())]
        log.debug("spawning co-runner: %s", " ".join(cmd))
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                env=_child_env(), close_fds=True)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        pending = {p.stdout.fileno(): (ec, p) for ec, p in self._procs}
        buffers: dict[int, bytes] = {fd: b"" for fd in pending}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                cores = sorted(ec.core for ec, _ in pending.values())
                raise EmulationError(f"co-runner(s) for core(s) {cores} not ready within "
                                     f"{self.ready_timeout:g} s")
            readable, _, _ = select.select(list(pending), [], [], min(left, 0.5))
            for fd in readable:
                ec, p = pending[fd]
                chunk = os.read(fd, 4096)
                buffers[fd] += chunk
                text = buffers[fd].decode(errors="replace")
                if "\n" in text or not chunk:
                    line = text.split("\n", 1)[0].strip()
                    if line.startswith("ready"):
                        del pending[fd]
                        p.stdout.close()
                        continue
                    try:
                        rc = p.wait(timeout=1.0)
                    except subprocess.TimeoutExpired:
                        rc = None
                    msg = line[len("error:"):].strip() if line.startswith("error:") else (
                        line or "exited without reporting ready")
                    raise EmulationError(f"co-runner for core {ec.core} failed (exit code {rc}): {msg}")

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stop_locked(timeout)

    def _stop_locked(self, timeout: float) -> None:
        procs, self._procs = self._procs, []
        _LIVE.discard(self)
        if not procs:
            return
        for _, p in procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        stuck = []
        for ec, p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stuck.append((ec.core, p.pid))
            if p.stdout is not None and not p.stdout.closed:
                p.stdout.close()
        if stuck:
            log.error("co-runner(s) did not exit within %.1f s: %s", timeout, stuck)
            raise EmulationError(f"co-runner(s) (core, pid) {stuck} did not exit within {timeout:g} s")
        log.info("emulation stopped (%d co-runner(s) reaped)", len(procs))

    @property
    def pids(self) -> list[int]:
        return [p.pid for _, p in self._procs]

    @property
    def running(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for _, p in self._procs)

    def run_for(self, duration: Optional[float] = None) -> None:
        """Block for ``duration`` seconds (forever if None) or until Ctrl+C; raises
        EmulationError if a co-runner dies meanwhile.  Convenience for CLI wrappers."""
        end = None if duration is None else time.monotonic() + duration
        try:
            while end is None or time.monotonic() < end:
                dead = [(ec.core, p.pid, p.returncode) for ec, p in self._procs if p.poll() is not None]
                if dead:
                    raise EmulationError(f"co-runner(s) (core, pid, rc) {dead} exited unexpectedly")
                time.sleep(0.2 if end is None else max(0.0, min(0.2, end - time.monotonic())))
        except KeyboardInterrupt:
            pass

    def __enter__(self) -> "Emulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Emulator({list(self.cores)!r}, pids={self.pids})"


def _stop_all_at_exit() -> None:
    for emu in list(_LIVE):
        try:
            emu.stop()
        except Exception:  # noqa: BLE001 - best effort at exit
            log.exception("stopping emulator at exit failed")


atexit.register(_stop_all_at_exit)


# -- co-runner body ----------------------------------------------------------------------
def _set_pdeathsig() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    except (OSError, AttributeError) as exc:
        raise EmulationError(f"cannot set PR_SET_PDEATHSIG: {exc}") from None


def _parent_alive(parent_pid: int) -> bool:
    if os.getppid() != parent_pid:
        return False
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def corunner_main(core: int, speed: float, period_ms: float, parent_pid: Optional[int], *,
                  duration: Optional[float] = None, priority: int = DEFAULT_PRIORITY,
                  ready_fd: Optional[int] = None) -> None:
    """The co-runner body: pin to ``core``, become SCHED_FIFO, then duty-cycle forever.

    With ``parent_pid`` (non-zero) it dies with its parent (PDEATHSIG + periodic check).
    With ``duration`` it returns after that many seconds.  ``ready_fd``: write
    ``"ready\\n"`` there once running (the spawning Emulator reads it).
    Raises EmulationError on setup failure.
    """
    if parent_pid:
        _set_pdeathsig()
        if os.getppid() != parent_pid:  # parent died before PDEATHSIG was armed
            raise SystemExit(0)
    if not (MIN_SPEED <= speed < 1.0):
        raise EmulationError(f"speed {speed} out of range [{MIN_SPEED}, 1.0)")
    if not (MIN_PERIOD_MS <= period_ms <= MAX_PERIOD_MS):
        raise EmulationError(f"period_ms {period_ms} out of range [{MIN_PERIOD_MS}, {MAX_PERIOD_MS}]")
    try:
        os.sched_setaffinity(0, {core})
    except (OSError, ValueError) as exc:
        raise EmulationError(f"cannot pin co-runner to core {core}: {exc}") from None
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except OSError as exc:
        raise EmulationError(f"SCHED_FIFO (priority {priority}) not permitted: {exc}") from None

    if ready_fd is not None:
        os.write(ready_fd, f"ready {os.getpid()}\n".encode())

    gc.disable()
    mono = time.monotonic
    sleep = time.sleep
    period = period_ms / 1000.0
    busy = (1.0 - speed) * period
    t0 = mono()
    end = None if duration is None else t0 + duration
    next_check = t0 + PARENT_CHECK_S
    start = t0  # anchored start of the current period: t0 + k * period
    k = 0
    while True:
        # Busy phase [start, start + busy): its end is anchored to the schedule, not to
        # our wake-up, because wake-up latency is kernel/hypervisor overhead during which
        # the emulated workload does not run either (measured: anchoring is ~5 % closer).
        spin_end = start + busy
        while mono() < spin_end:
            pass
        # Next anchored period start; skip ahead if we are behind.
        k += 1
        start = t0 + k * period
        now = mono()
        if now >= start:
            k = int((now - t0) / period) + 1
            start = t0 + k * period
        if now >= next_check:
            next_check = now + PARENT_CHECK_S
            if parent_pid and not _parent_alive(parent_pid):
                return
            if end is not None and now >= end:
                return
        dt = start - mono()
        if dt > 0:
            sleep(dt)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m hetsched.host.emulation",
        description="Real-time duty-cycle co-runner: make CORE behave like a core of relative speed SPEED.")
    ap.add_argument("--core", type=int, required=True, help="CPU to slow down")
    ap.add_argument("--speed", type=float, required=True,
                    help=f"fraction of the core left to other tasks, {MIN_SPEED} <= SPEED < 1")
    ap.add_argument("--period-ms", type=float, default=DEFAULT_PERIOD_MS,
                    help=f"duty-cycle period in ms (default {DEFAULT_PERIOD_MS:g})")
    ap.add_argument("--priority", type=int, default=DEFAULT_PRIORITY,
                    help=f"SCHED_FIFO priority (default {DEFAULT_PRIORITY})")
    ap.add_argument("--duration", type=float, default=None,
                    help="run this many seconds then exit (default: until Ctrl+C / parent exit)")
    ap.add_argument("--parent-pid", type=int, default=0,
                    help="(internal) die when this process, our parent, dies; report readiness on stdout")
    args = ap.parse_args(argv)
    managed = bool(args.parent_pid)
    if not managed:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        # Ctrl+C must stop us even if started with SIGINT ignored (e.g. `cmd &` in a script).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if not managed:
            check_realtime_permitted()
            _validate([EmulatedCore(args.core, args.speed, args.period_ms)])
            if args.speed >= 1.0:
                log.info("speed 1.0: nothing to do")
                return 0
            log.info("co-runner pid %d: core %d at speed %g (period %g ms)%s", os.getpid(), args.core,
                     args.speed, args.period_ms,
                     f" for {args.duration:g} s" if args.duration else "; Ctrl+C to stop")
        corunner_main(args.core, args.speed, args.period_ms, args.parent_pid or None,
                      duration=args.duration, priority=args.priority,
                      ready_fd=1 if managed else None)
    except EmulationError as exc:
        if managed:
            try:
                os.write(1, f"error: {exc}\n".encode())
            except OSError:
                pass
        else:
            log.error("error: %s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
