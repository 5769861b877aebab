"""Cached layer costs are checked at every start: a cluster whose whole-model speed moved is measured
again, a cache that still agrees is used as is, and a measurement disturbed by other processes on
the measured cores is reported and not trusted (while the emulation co-runners count as the cores'
own speed). Real profiler processes and onnxruntime sessions on a small generated model, in a
private cache directory.

Other engineers share this machine, so every test that is not about disturbance passes
``disturbance_limit=1.0`` (never "disturbed") and only asserts on decisions, never on times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
from onnx import TensorProto, helper, numpy_helper

from hetsched.config import parse_config
from hetsched.errors import ConfigError
from hetsched.host.topology import Cluster
from hetsched.model.graph import analyze
from hetsched.profiling import load as load_mod
from hetsched.profiling.load import CoreLoad, core_load, emulation_pids, parse_proc_stat
from hetsched.profiling.measure import (cache_key, measure_clusters, measure_clusters_checked, measure_stages)

from .conftest import wait_for

CORE = 1
pytestmark = pytest.mark.skipif(CORE not in os.sched_getaffinity(0), reason=f"core {CORE} not available")
FAST = dict(repeats=5, warmup=1)
CALM = dict(disturbance_limit=1.0)  # the shared machine's own load must not decide these tests


def conv_chain(layers: int = 4, channels: int = 16, side: int = 48) -> onnx.ModelProto:
    """A chain of conv3x3 + relu layers (a cut point after each): about a millisecond per run."""
    rng = np.random.default_rng(1)
    nodes, inits, x = [], [], "input"
    for i in range(layers):
        cin = 3 if i == 0 else channels
        w = (rng.standard_normal((channels, cin, 3, 3)) * 0.1).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"c{i}.w"))
        nodes.append(helper.make_node("Conv", [x, f"c{i}.w"], [f"c{i}"], name=f"c{i}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"r{i}"))
        x = f"r{i}"
    graph = helper.make_graph(nodes, "conv_chain",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, side, side])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, channels, side, side])],
                              initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


@pytest.fixture(scope="module")
def small():
    m = conv_chain()
    return m, analyze(m)


CLUSTER = Cluster("one", (CORE,), 1.0)


def cache_file(cache_dir, g) -> Path:
    return Path(cache_dir) / f"{cache_key(g, CLUSTER, FAST['repeats'], FAST['warmup'])}.json"


def run(model, g, cache_dir, notes=None, **kw):
    sink = notes if notes is not None else []
    return measure_clusters_checked(model, g, [CLUSTER], cache_dir=str(cache_dir), progress=sink.append,
                                    **{**FAST, **kw})


@pytest.fixture
def busy_loop():
    """A CPU-bound process pinned to CORE; killed and reaped by PID at the end."""
    procs = []

    def start():
        p = subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{CORE}}})\nwhile True: pass"])
        procs.append(p)
        ps = psutil.Process(p.pid)
        wait_for(lambda: ps.cpu_affinity() == [CORE] and ps.cpu_times().user > 0.05, timeout=20,
                 what="the busy loop to run on its core")
        return p
    yield start
    for p in procs:
        p.kill()
        p.wait(10)


@pytest.mark.timeout(300)
def test_cache_within_tolerance_is_used_as_is(small, tmp_path):
    model, g = small
    first = run(model, g, tmp_path, **CALM)
    assert first.checks["one"].remeasured and first.checks["one"].cached_ms is None
    path = cache_file(tmp_path, g)
    before = path.read_bytes()
    notes: list[str] = []
    again = run(model, g, tmp_path, notes, tolerance=1000.0, **CALM)
    check = again.checks["one"]
    assert not check.remeasured and check.cached_ms == json.loads(before)["check_ms"] > 0
    assert check.now_ms > 0 and check.load is not None and check.load.wall_s > 0
    assert again.measurements == first.measurements, "the cached costs are used unchanged"
    assert path.read_bytes() == before, "a cache that agrees is not rewritten"
    assert any("cached" in n and "now" in n and "using cached costs" in n for n in notes), notes
    assert again.speeds() == {"one": check.now_ms}


def doctor(path: Path, factor: float, old_format: bool = False) -> float:
    """Scale the cached whole-model times (as if measured on a faster day); returns the new reference."""
    d = json.loads(path.read_text())
    d["whole_ms"]["1"] *= factor
    if old_format:  # a cache written before check_ms existed: whole_ms[1] is the reference
        del d["check_ms"]
        ref = d["whole_ms"]["1"]
    else:
        d["check_ms"] *= factor
        ref = d["check_ms"]
    path.write_text(json.dumps(d))
    return ref


@pytest.mark.timeout(300)
@pytest.mark.parametrize("old_format", [False, True], ids=["check_ms", "whole_ms-only"])
def test_doctored_cache_is_detected_and_remeasured(small, tmp_path, old_format):
    model, g = small
    run(model, g, tmp_path, **CALM)
    path = cache_file(tmp_path, g)
    doctored = doctor(path, 0.5, old_format)
    notes: list[str] = []
    res = run(model, g, tmp_path, notes, **CALM)  # default tolerance 10 %
    check = res.checks["one"]
    assert check.remeasured and check.cached_ms == pytest.approx(doctored)
    assert any("re-measuring" in n and f"cached {doctored:.2f} ms" in n for n in notes), notes
    saved = json.loads(path.read_text())
    assert saved["whole_ms"]["1"] == res.measurements[0].whole_ms[1]
    assert saved["check_ms"] == check.now_ms > doctored * 1.1, "the doctored value was replaced by a measured one"
    # and the new cache is trusted at the next start
    notes.clear()
    assert not run(model, g, tmp_path, notes, tolerance=1000.0, **CALM).checks["one"].remeasured


@pytest.mark.timeout(300)
def test_disturbed_measurement_warns_and_is_not_trusted(small, tmp_path, busy_loop):
    model, g = small
    hog = busy_loop()
    notes: list[str] = []
    res = run(model, g, tmp_path, notes)
    hog.kill()
    hog.wait(10)
    load = res.checks["one"].load
    assert load.disturbed() and load.foreign_s > 0
    assert any("other processes used" in w and f"core {CORE}" in w and "costs may be too high" in w
               for w in res.warnings), res.warnings
    saved = json.loads(cache_file(tmp_path, g).read_text())
    assert saved["disturbed"] and saved["disturbed"]["foreign_share"] > 0.10
    notes.clear()
    again = run(model, g, tmp_path, notes, **CALM)
    assert again.checks["one"].remeasured, "a measurement flagged as disturbed is not trusted later"
    assert any("not trusted (other processes used" in n and "re-measuring" in n for n in notes), notes
    assert not json.loads(cache_file(tmp_path, g).read_text())["disturbed"]


@pytest.mark.timeout(300)
def test_expected_processes_are_not_disturbance(small, tmp_path, busy_loop):
    """A co-runner given as expected (the emulation's) is counted as part of the core's speed."""
    model, g = small
    hog = busy_loop()
    res = run(model, g, tmp_path, use_cache=False, expected_pids=[hog.pid])
    load = res.checks["one"].load
    assert load.expected_s > 0.3 * load.own_s, load  # the loop competed with the profiler at equal priority
    # /proc/stat counts in 10 ms ticks: the foreign share is what is left, never below zero
    assert load.foreign_s <= max(0.0, load.busy_s - load.own_s - load.expected_s) + 0.03
    assert load.foreign_s < 0.1 * load.wall_s, load
    assert not list(tmp_path.iterdir()), "use_cache=False writes nothing"


@pytest.mark.timeout(120)
def test_emulation_children_are_found_by_pid():
    from hetsched.host.emulation import EmulatedCore, Emulator, check_realtime_permitted
    from hetsched.errors import EmulationError
    try:
        check_realtime_permitted()
    except EmulationError as exc:
        pytest.skip(f"SCHED_FIFO not permitted here: {exc}")
    assert emulation_pids() == []
    with Emulator([EmulatedCore(CORE, 0.5)]) as emu:
        assert sorted(emulation_pids()) == sorted(emu.pids) and emu.pids
        s0 = load_mod.sample([CORE], emulation_pids())
        wait_for(lambda: load_mod.sample([CORE], emu.pids)["expected"][emu.pids[0]] > s0["expected"][emu.pids[0]],
                 timeout=10, what="the co-runner's CPU time to grow")
    assert emulation_pids() == []


@pytest.mark.timeout(300)
def test_stage_timings_are_dropped_when_their_cluster_is_remeasured(small, tmp_path):
    model, g = small
    run(model, g, tmp_path, **CALM)
    req = [("one", 0, 1, 1)]
    notes: list[str] = []
    first = measure_stages(model, g, [CLUSTER], req, cache_dir=str(tmp_path), progress=notes.append, **FAST, **CALM)
    assert len([n for n in notes if "timing 1 planned stage" in n]) == 1
    assert measure_stages(model, g, [CLUSTER], req, cache_dir=str(tmp_path), progress=notes.append,
                          **FAST, **CALM) == first
    assert len([n for n in notes if "timing 1 planned stage" in n]) == 1, "second call uses the cache"
    run(model, g, tmp_path, tolerance=0.0, **CALM)  # any deviation at all: the cluster is measured again
    measure_stages(model, g, [CLUSTER], req, cache_dir=str(tmp_path), progress=notes.append, **FAST, **CALM)
    assert len([n for n in notes if "timing 1 planned stage" in n]) == 2, "stale stage timings were reused"


@pytest.mark.timeout(300)
def test_prepare_uses_the_configured_tolerance(small, tmp_path):
    """Through the service's set-up: profile.cache_tolerance decides whether a moved cluster is re-measured."""
    from hetsched.runtime.service import prepare
    model, g = small
    onnx.save(model, tmp_path / "m.onnx")
    cache = tmp_path / "c"
    run(model, g, cache, **CALM)  # a trusted cache, keyed as prepare keys it
    doctored = doctor(cache_file(cache, g), 0.5)

    def start(tolerance):
        raw = {"model": str(tmp_path / "m.onnx"), "clusters": {"one": {"cores": [CORE]}},
               "planner": {"max_stages": 1}, "profile": {**FAST, "cache_dir": str(cache), "refine": 0,
                                                          "cache_tolerance": tolerance}}
        notes: list[str] = []
        prep = prepare(parse_config(raw), progress=notes.append)
        assert prep.measurements and prep.plan.stages
        return notes
    notes = start(10.0)
    assert any("using cached costs" in n for n in notes), notes
    notes = start(0.10)
    assert any(f"cached {doctored:.2f} ms" in n and "re-measuring" in n for n in notes), notes


def test_cache_tolerance_config():
    assert parse_config({}).profile.cache_tolerance == 0.10
    assert parse_config({"profile": {"cache_tolerance": 0.25}}).profile.cache_tolerance == 0.25
    for bad in (-0.1, "10%", 11):
        with pytest.raises(ConfigError, match="profile.cache_tolerance"):
            parse_config({"profile": {"cache_tolerance": bad}})


def test_measure_clusters_keeps_its_list_interface(small, tmp_path, caplog):
    model, g = small
    ms = measure_clusters(model, g, [CLUSTER], cache_dir=str(tmp_path), use_cache=False, **FAST, **CALM)
    assert [m.cluster for m in ms] == ["one"] and ms[0].whole_ms[1] > 0


# ---------------------------------------------------------------------- the load arithmetic (pure)
PROC_STAT = """cpu  100 0 50 1000 5 0 1 0 0 0
cpu0 60 0 30 500 2 0 1 0 0 0
cpu1 40 10 20 500 3 4 5 6 7 0
intr 12345
"""


def test_parse_proc_stat_counts_busy_ticks_only():
    busy = parse_proc_stat(PROC_STAT, 100)
    assert busy == {0: pytest.approx(0.91), 1: pytest.approx(0.85)}  # user nice system irq softirq steal


def sample(t, busy, own, expected=None):
    return {"t": t, "busy": busy, "own": own, "expected": expected or {}}


def test_core_load_subtracts_own_and_expected_time():
    before = sample(10.0, {1: 100.0}, 5.0, {42: 1.0, 43: 0.0})
    after = sample(12.0, {1: 102.0}, 5.8, {42: 1.9})       # pid 43 is gone: not counted
    load = core_load(before, after)
    assert load.wall_s == 2.0 and load.busy_s == pytest.approx(2.0)
    assert load.own_s == pytest.approx(0.8) and load.expected_s == pytest.approx(0.9)
    assert load.foreign_s == pytest.approx(0.3) and load.foreign_share == pytest.approx(0.15)
    assert load.disturbed() and not load.disturbed(0.2)
    assert load.describe() == "other processes used 15% of core 1 while measuring"
    assert CoreLoad.from_dict(load.to_dict()).foreign_share == pytest.approx(load.foreign_share)


def test_core_load_over_several_cores_and_never_negative():
    load = core_load(sample(0.0, {2: 0.0, 3: 0.0}, 0.0), sample(1.0, {2: 0.5, 3: 0.5}, 1.2))
    assert load.foreign_s == 0.0 and not load.disturbed()
    load = core_load(sample(0.0, {2: 0.0, 3: 0.0}, 0.0), sample(1.0, {2: 1.0, 3: 1.0}, 1.0))
    assert load.foreign_share == pytest.approx(0.5)
    assert load.describe() == "other processes used 50% of cores 2, 3 while measuring"
