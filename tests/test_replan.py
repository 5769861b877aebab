"""Live re-planning on a real service: a core slowed mid-stream by the emulation co-runner (the
service is not told) makes the service re-plan from what its workers measure, without losing or
duplicating a frame; when the co-runner stops, the plan comes back."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from hetsched.client import Client
from hetsched.observe.report import chrome_trace

from .conftest import ROOT, wait_for
from .test_lifecycle import start_service
from .test_video import stop_service

CONFIG = """
model: builtin:squeezenet1.1
clusters:
  a: {cores: [0]}
  b: {cores: [1]}
planner: {allow_pools: %s, replan: {check_s: 1.0, min_gain: 0.1}}
profile: {repeats: 8, warmup: 2, refine: 1}
"""

RATE = """
import os, sys, time, numpy as np
os.sched_setaffinity(0, {int(sys.argv[1])})
from hetsched.model.squeezenet import build_squeezenet11
from hetsched.host.ort import create_session
s = create_session(build_squeezenet11(), 1)
x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
for _ in range(5): s.run(None, {"data": x})
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < float(sys.argv[2]):
    s.run(None, {"data": x}); n += 1
print(n / (time.perf_counter() - t0))
"""


def core_rate(core: int, seconds: float = 2.0) -> float:
    """One pinned single-thread onnxruntime session on ``core``, frames per second (as the limit)."""
    r = subprocess.run([sys.executable, "-c", RATE, str(core), str(seconds)], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return float(r.stdout.strip().splitlines()[-1])


class Stream:
    """Saturating traffic in a thread; every reply checked for exactly-once and in-order delivery."""

    def __init__(self, sock: str):
        self.sock, self.stop = sock, threading.Event()
        self.done_times: list[float] = []
        self.seqs: list[int] = []
        self.errors: list[dict] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
        with Client(self.sock, timeout=60) as c:
            c.enable_shm(10)
            sent = 0
            while not self.stop.is_set() or sent > len(self.seqs) + len(self.errors):
                while not self.stop.is_set() and sent - len(self.seqs) - len(self.errors) < 8:
                    c.submit(x, stream="s")
                    sent += 1
                rep = c.recv(30)
                if rep is None:
                    self.errors.append({"code": "NO_REPLY"})
                    return
                if rep["type"] == "result":
                    self.seqs.append(rep["seq"])
                    self.done_times.append(time.monotonic())
                elif rep["type"] == "error":
                    self.errors.append(rep)
            self.sent = sent

    def rate(self, seconds: float) -> float:
        t_end = time.monotonic()
        return sum(1 for t in self.done_times if t_end - t <= seconds) / seconds

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)


def generation(sock: str) -> dict:
    with Client(sock, timeout=30) as c:
        return c.stats()["replan"]


def settled(state: dict, quiet_s: float = 5.0) -> bool:
    """No plan starting, every latency trade judged, and no switch in the last ``quiet_s`` seconds."""
    switches = [e for e in state["history"] if e.get("switch_age_s") is not None]
    return (not state["starting"] and all("kept" in e for e in switches if e.get("kind") == "p99")
            and all(e["switch_age_s"] >= quiet_s for e in switches))


def history_entry(sock: str, cond, what: str, timeout: float = 60.0) -> dict:
    return wait_for(lambda: next((e for e in generation(sock)["history"] if cond(e)), None), timeout=timeout,
                    interval=0.5, what=what)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_slowed_core_is_followed_at_once_and_the_rate_stays_near_the_new_limit(tmp_path, monkeypatch):
    """The default plan (one worker per core, frames to whoever finishes first) follows a slowed core
    by itself; the drift detector notices and re-plans, and keeps the plan if it is still the best."""
    from hetsched.host.emulation import EmulatedCore, Emulator
    monkeypatch.setenv("HETSCHED_CACHE_DIR", str(tmp_path / "cache"))
    proc, sock, lines = start_service(tmp_path, CONFIG % "true")
    emu = None
    try:
        stream = Stream(sock)
        time.sleep(4)
        before = stream.rate(3)
        emu = Emulator([EmulatedCore(1, 0.33)]).start()           # the service is not told
        # (under load both cores measure a little below their profile: such drift is judged and kept too)
        entry = history_entry(sock, lambda e: any("cluster b runs at" in r for r in e["reasons"])
                              and e["speeds"]["b"] < 0.6, "the slowdown to be detected")
        # a latency trade is on probation until its rate is measured (and undone if it fell): wait for
        # the plan to be settled, then measure
        wait_for(lambda: settled(generation(sock)), timeout=60, interval=0.5, what="the plan to settle")
        after = stream.rate(4)
        stream.close()
        assert not stream.errors, stream.errors[:3]
        assert stream.seqs == list(range(stream.sent)), "a frame was lost, duplicated or reordered"
        limit = core_rate(0) + core_rate(1)                        # the per-core limit, core 1 slowed
        print(f"\nbefore {before:.1f} fps, after the slowdown {after:.1f} fps = {after / limit:.2f} x the new limit "
              f"{limit:.1f}; decision: {entry['decision']}; then: "
              f"{[e['decision'] for e in generation(sock)['history'] if e.get('switch')]}")
        # (a regression guard, not the benchmark: scripts/bench_replan.py measures how close it gets)
        assert after >= 0.75 * limit, (after, limit)
    finally:
        if emu is not None:
            emu.stop()
        stop_service(proc)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_slowed_core_makes_a_pipeline_replan_without_losing_a_frame_and_the_plan_comes_back(tmp_path,
                                                                                               monkeypatch):
    """Stages on one cluster each (planner.allow_pools: false): the split planned for two equal cores
    is wrong once one is slowed; the service re-plans from what its workers measure, switches to the
    new split without losing, duplicating or reordering a frame, and switches back when the co-runner
    stops."""
    from hetsched.host.emulation import EmulatedCore, Emulator
    monkeypatch.setenv("HETSCHED_CACHE_DIR", str(tmp_path / "cache"))
    proc, sock, lines = start_service(tmp_path, CONFIG % "false")
    emu = None
    try:
        first = generation(sock)
        assert first["generation"] == 0 and " | " in first["plan"], first   # a two-stage pipeline
        stream = Stream(sock)
        time.sleep(4)
        before = stream.rate(3)
        emu = Emulator([EmulatedCore(1, 0.33)]).start()
        t_slow = time.monotonic()
        slowed = wait_for(lambda: (g := generation(sock))["generation"] >= 1 and g, timeout=60,
                          interval=0.5, what="a re-plan after the slowdown")
        t_switch = time.monotonic() - t_slow
        entry = next(e for e in slowed["history"] if e.get("switch"))
        # the re-plan is made from the measured speeds: for the slowed core's drift, or with its measured
        # slowdown when the first reason names core 0's cluster (the coordinator and the client move
        # there when core 1 slows)
        assert (any("cluster b runs at" in r for r in entry["reasons"]) or entry["speeds"]["b"] < 0.6) \
            and entry["new_plan"] != entry["old_plan"], entry
        assert entry["predicted_gain"] > 0.1 and entry["start_s"] < 30
        time.sleep(4)
        after = stream.rate(3)
        emu.stop()
        emu = None
        # the two cores are alike again: a split for equal cores comes back (not necessarily the first
        # cut: cuts a layer apart predict within a few percent, and min_gain keeps the one it took)
        def came_back():
            g = generation(sock)
            return next((e for e in g["history"] if e.get("switch") and e["generation"] >= 2
                         and e["speeds"]["b"] > 0.6 and "fps_after" in e), None)
        try:
            back = wait_for(came_back, timeout=90, interval=0.5, what="a switch back after the co-runner stopped")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; first plan {first['plan']}; re-plan state {generation(sock)}") from None
        assert back["fps_after"] >= 1.1 * after, (back, after)   # faster again than while slowed
        stream.close()
        assert not stream.errors, stream.errors[:3]
        assert stream.seqs == list(range(stream.sent)), "a frame was lost, duplicated or reordered"
        with Client(sock, timeout=30) as c:       # the profile trace marks each switch
            marks = c.trace(10)["switches"]
        assert [m["generation"] for m in marks][:2] == [1, 2] and all(m["t_switch"] > m["t_decision"] for m in marks)
        events = chrome_trace({"frames": [{"id": 0, "t_submit": marks[0]["t_decision"] - 1, "hops": []}],
                               "pids": {}, "switches": marks}, {"stages": []})["traceEvents"]
        assert [e["name"] for e in events][:2] == ["re-plan decided 1", "switched to plan generation 1"]
        print(f"\nbefore {before:.1f} fps; re-planned {t_switch:.1f} s after the slowdown ({entry['decision']}); "
              f"after {after:.1f} fps; back to {back['new_plan']} in generation {back['generation']} "
              f"at {back['fps_after']:.1f} fps")
    finally:
        if emu is not None:
            emu.stop()
        stop_service(proc)
