"""Was a measurement disturbed? Foreign CPU load on the measured cores while a profiler ran.

The profiler process (``workers/profile_worker.py``) samples, right after pinning itself and again
when it is done: the busy time of each measured core (``/proc/stat``), its own CPU time (all its
threads, ``getrusage``), and the CPU time of *expected* processes (the emulation co-runners that make
a core slow on purpose: they are part of the core's speed, not a disturbance). Whatever else ran
on those cores in between is foreign load::

    foreign = busy(cores) - own - expected        (seconds, over the window)
    share   = foreign / (window x number of cores)

A share above ``DISTURBANCE_LIMIT`` means other programs competed for the cores while they were
timed, so the costs are too high and must not be trusted (nor cached as trusted).
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

DISTURBANCE_LIMIT = 0.10
EMULATION_MARK = "hetsched.host.emulation"
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal (idle, iowait: not busy; guest: in user)


def parse_proc_stat(text: str, ticks_per_s: float) -> dict[int, float]:
    """Busy seconds per CPU id from the text of /proc/stat (offline CPUs have no line)."""
    out: dict[int, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        vals = [int(v) for v in rest.split()]
        out[int(name[3:])] = sum(vals[i] for i in _BUSY_FIELDS if i < len(vals)) / ticks_per_s
    return out


def _busy_seconds(cores: Iterable[int]) -> dict[int, float]:
    with open("/proc/stat", encoding="ascii") as fh:
        per_cpu = parse_proc_stat(fh.read(), os.sysconf("SC_CLK_TCK"))
    return {c: per_cpu.get(c, 0.0) for c in cores}


def _process_seconds(pid: int, cores: set[int]) -> float | None:
    """CPU seconds of ``pid`` if it may run on ``cores`` (None when it is gone or runs elsewhere)."""
    import psutil
    try:
        p = psutil.Process(pid)
        if not set(p.cpu_affinity()) & cores:
            return None
        t = p.cpu_times()
        return t.user + t.system
    except (psutil.Error, OSError):
        return None


def sample(cores: Sequence[int], expected_pids: Iterable[int] = ()) -> dict:
    """One snapshot, taken inside the measuring process (plain data: it crosses a process queue)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    expected = {}
    for pid in expected_pids:
        s = _process_seconds(int(pid), set(cores))
        if s is not None:
            expected[int(pid)] = s
    return {"t": time.monotonic(), "busy": _busy_seconds(cores), "own": ru.ru_utime + ru.ru_stime,
            "expected": expected}


@dataclass(frozen=True)
class CoreLoad:
    """CPU use on ``cores`` during one measurement window."""

    cores: tuple[int, ...]
    wall_s: float
    busy_s: float       # everything that ran on those cores
    own_s: float        # the measuring process (all threads)
    expected_s: float   # expected co-runners (emulation)

    @property
    def foreign_s(self) -> float:
        return max(0.0, self.busy_s - self.own_s - self.expected_s)

    @property
    def foreign_share(self) -> float:
        """Foreign CPU time as a share of the cores' capacity over the window (0..1)."""
        cap = self.wall_s * len(self.cores)
        return min(1.0, self.foreign_s / cap) if cap > 0 else 0.0

    def disturbed(self, limit: float = DISTURBANCE_LIMIT) -> bool:
        return self.foreign_share > limit

    def describe(self) -> str:
        where = f"core {self.cores[0]}" if len(self.cores) == 1 else "cores " + ", ".join(map(str, self.cores))
        return f"other processes used {self.foreign_share:.0%} of {where} while measuring"

    def to_dict(self) -> dict:
        return {"cores": list(self.cores), "wall_s": round(self.wall_s, 4), "busy_s": round(self.busy_s, 4),
                "own_s": round(self.own_s, 4), "expected_s": round(self.expected_s, 4),
                "foreign_share": round(self.foreign_share, 4)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "CoreLoad":
        return cls(tuple(int(c) for c in d["cores"]), float(d["wall_s"]), float(d["busy_s"]), float(d["own_s"]),
                   float(d["expected_s"]))


def core_load(before: Mapping, after: Mapping) -> CoreLoad:
    """The load between two ``sample`` snapshots of the same cores (pure)."""
    cores = tuple(sorted(int(c) for c in before["busy"]))
    busy = sum(after["busy"][c] - before["busy"][c] for c in before["busy"])
    expected = sum(after["expected"][p] - before["expected"][p] for p in before["expected"] if p in after["expected"])
    return CoreLoad(cores, after["t"] - before["t"], max(0.0, busy), max(0.0, after["own"] - before["own"]),
                    max(0.0, expected))


def emulation_pids() -> list[int]:
    """PIDs of the emulation co-runners this process started (``hetsched.host.emulation`` children)."""
    import psutil
    out = []
    for child in psutil.Process().children(recursive=False):
        try:
            if any(EMULATION_MARK in part for part in child.cmdline()):
                out.append(child.pid)
        except psutil.Error:
            continue
    return out
