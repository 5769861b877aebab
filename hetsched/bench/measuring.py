"""What the bench measures besides frames: CPU time of processes, peak RSS, and the CPU that
processes *not* started by the bench used meanwhile (other users' work disturbs the figures)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np


def _r1(x: float) -> float:
    return round(float(x), 1)


def _schedstat_s(pid: int) -> float | None:
    """CPU seconds of a process's live threads from /proc/PID/task/*/schedstat (nanoseconds on CPU,
    user + system): exact where utime/stime count whole clock ticks (10 ms), which over a few
    hundred frames would be too coarse for a 0.1 ms/frame budget."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as fh:
                total += int(fh.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        return None


def cpu_of(pids: list[int]) -> dict[int, float]:
    """CPU seconds (user + system, all threads) of each live process so far; 0.0 for a gone one."""
    import psutil
    out = {}
    for pid in pids:
        exact = _schedstat_s(pid)
        if exact is not None:
            out[pid] = exact
            continue
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except psutil.Error:
            out[pid] = 0.0
    return out


class RssSampler:
    """Samples the summed RSS of a set of processes every ``interval`` s; ``window`` returns the peak."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self._pids: list[int] = []
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._th.start()

    def _sample(self, pids: list[int]) -> int:
        import psutil
        total = 0
        for pid in pids:
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                pids = list(self._pids)
            if pids:
                v = self._sample(pids)
                with self._lock:
                    self._peak = max(self._peak, v)

    def begin(self, pids: list[int]) -> None:
        with self._lock:
            self._pids, self._peak = list(pids), self._sample(pids)

    def end(self) -> float:
        with self._lock:
            peak = max(self._peak, self._sample(self._pids))
            self._pids = []
        return peak / 2**20

    def close(self) -> None:
        self._stop.set()
        self._th.join(2)


def _steal_s() -> float:
    """Seconds the hypervisor has stolen from this machine's CPUs so far."""
    import psutil
    return getattr(psutil.cpu_times(), "steal", 0.0)


def _own_tree() -> set[int]:
    """This process and every live descendant (service, workers, baselines, co-runners)."""
    import psutil
    me = psutil.Process()
    return {me.pid} | {p.pid for p in me.children(recursive=True)}


def _foreign_cpu(own: set[int]) -> dict[int, float]:
    """CPU seconds so far of every process on the machine that is not ours (kernel threads too)."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in own:
            cpu = _schedstat_s(int(name))
            if cpu is not None:
                out[int(name)] = cpu
    return out


class ForeignLoad:
    """CPU used on this machine by processes that are not ours, per slot (other users' tests...).

    Summed over those processes' own CPU time, not taken as the machine's busy time minus ours:
    /proc/stat's per-CPU ticks do not see the emulation's real-time co-runner (a core running only
    it showed half its time neither busy nor idle), and the difference flagged every emulated
    scenario as disturbed by ~45 % of a core that nobody used. A process that starts and ends
    within one slot is not seen."""

    def __init__(self) -> None:
        self.slots: list[float] = []
        self.steal: list[float] = []

    def begin(self) -> None:
        self._own = _own_tree()
        self._cpu = _foreign_cpu(self._own)
        self._steal = _steal_s()
        self._t = time.monotonic()

    def end(self) -> float:
        wall = time.monotonic() - self._t
        steal = _steal_s()
        cpu = _foreign_cpu(self._own | _own_tree())
        if wall <= 0:
            return 0.0
        used = sum(max(0.0, c - self._cpu.get(pid, 0.0)) for pid, c in cpu.items())
        pct = 100.0 * used / wall
        self.slots.append(pct)
        self.steal.append(100.0 * (steal - self._steal) / wall)
        return pct

    def summary(self) -> dict:
        return {"mean_pct": _r1(float(np.mean(self.slots))) if self.slots else None,
                "max_pct": _r1(max(self.slots)) if self.slots else None,
                "steal_mean_pct": _r1(float(np.mean(self.steal))) if self.steal else None}
