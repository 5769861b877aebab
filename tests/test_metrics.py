"""hetsched.observe.metrics: each definition on constructed data, the snapshot adapter, and one run's
recorded data fed through every report builder (profile, demo, status, bench) giving the same figures."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from hetsched.observe import metrics
from hetsched.observe.report import RunData, build_report, predicted_overheads, stage_figures
from hetsched.observe.snapshot import read_snapshot

pytestmark = pytest.mark.timeout(30)


def test_percentiles_use_linear_interpolation():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert metrics.percentile(xs, 50) == pytest.approx(2.5)
    assert metrics.percentile(xs, 99) == pytest.approx(3.97)  # 1 + 0.99 * 3 ranks
    assert metrics.percentile([], 50) is None
    s = metrics.latency_summary(xs)
    assert s == {"n": 4, "p50_ms": pytest.approx(2.5), "p99_ms": pytest.approx(3.97), "mean_ms": pytest.approx(2.5)}


def test_throughput_excludes_fill_and_drain():
    # pipeline fill: the first result comes 0.5 s after the first submit; then one every 0.1 s
    done = [10.5 + 0.1 * i for i in range(11)]
    assert metrics.throughput_fps(done) == pytest.approx(10.0)
    # a drain after the end of offering at 11.25 s, twice as fast, is left out
    drain = [11.55, 11.6, 11.65]
    assert metrics.throughput_fps(done + drain, end=11.25) == pytest.approx(10.0)
    assert metrics.throughput_fps(done + drain) > 10.0
    assert metrics.throughput_fps([3.0]) == 0.0 and metrics.throughput_fps([]) == 0.0
    assert metrics.throughput_fps(list(reversed(done))) == pytest.approx(10.0)  # order does not matter


def _measurement(cluster, cores, model_ms, preprocess_ms=None, empty_ms=0.1):
    return SimpleNamespace(cluster=cluster, cores=cores, whole_ms={1: model_ms, 2: model_ms / 1.6},
                           preprocess_ms=preprocess_ms, empty_ms={1: empty_ms})


def test_limit_counts_the_same_work_as_the_traffic():
    ms = [_measurement("big", (0, 1), 5.0, preprocess_ms=3.0), _measurement("little", (2,), 10.0, preprocess_ms=6.0)]
    raw = metrics.core_rates_fps(ms, metrics.RAW)
    assert raw == {0: pytest.approx(200.0), 1: pytest.approx(200.0), 2: pytest.approx(100.0)}
    assert metrics.limit_fps(raw) == pytest.approx(500.0)
    jpeg = metrics.core_rates_fps(ms, metrics.ENCODED)  # decode + preprocess + model per frame
    assert jpeg == {0: pytest.approx(125.0), 1: pytest.approx(125.0), 2: pytest.approx(62.5)}
    assert metrics.limit_fps(jpeg) == pytest.approx(312.5)
    # a pipeline decoding JPEGs at 300 fps is at 96 % of its limit, not at 60 % of the raw one
    assert metrics.efficiency(300.0, metrics.limit_fps(jpeg)) == pytest.approx(0.96)
    # no preprocessing time measured: no JPEG limit rather than one that leaves out the decode
    assert metrics.core_rates_fps([_measurement("big", (0,), 5.0)], metrics.ENCODED) is None
    assert metrics.limit_fps(None) is None and metrics.efficiency(100.0, None) is None
    with pytest.raises(ValueError):
        metrics.core_rates_fps(ms, "video")


def test_stage_figures_definitions():
    assert metrics.utilisation(1.5, 2.0) == pytest.approx(0.75)
    # two workers busy 2.0 s and 1.0 s over 2 s: the stage's is their mean, 0.75
    assert metrics.stage_utilisation(3.0, 2, 2.0) == pytest.approx(np.mean([1.0, 0.5]))
    assert metrics.utilisation(1.0, 0.0) is None and metrics.stage_utilisation(1.0, 0, 1.0) is None
    # two equal workers reported together: busy 2 s for 400 frames -> one frame leaves every 2.5 ms
    assert metrics.stage_period_ms([(2.0, 400, 2)]) == pytest.approx(2.5)
    assert metrics.stage_period_ms([(1.0, 0, 1)]) is None
    # a big core at 8 ms a frame and a little one at 16 ms: 125 + 62.5 frames/s, a frame every 5.33 ms
    # (the frame-weighted mean time over two workers would say (300*8 + 100*16)/400/2 = 5 ms)
    assert metrics.stage_period_ms([(2.4, 300, 1), (1.6, 100, 1)]) == pytest.approx(1e3 / 187.5)
    # predictions weighted by the frames each worker served; a silent worker needs none
    assert metrics.pool_predicted_ms([(300, 8.0), (100, 16.0)]) == pytest.approx(10.0)
    assert metrics.pool_predicted_ms([(300, 8.0), (0, None)]) == pytest.approx(8.0)
    assert metrics.pool_predicted_ms([(0, 8.0)]) is None and metrics.pool_predicted_ms([(5, None)]) is None
    assert metrics.balance([4.0, 6.0, 8.0]) == pytest.approx(8.0 / 6.0)
    assert metrics.balance([5.0, None]) == pytest.approx(1.0) and metrics.balance([]) is None
    assert metrics.prediction_error(12.0, 10.0) == pytest.approx(0.2)
    assert metrics.prediction_error(None, 10.0) is None and metrics.prediction_error(1.0, 0.0) is None


def test_cpu_per_frame_and_beyond_onnxruntime():
    assert metrics.per_frame_ms(0.5, 1000) == pytest.approx(0.5)
    assert metrics.overhead_ms_per_frame(1.2, 1.0, 1000) == pytest.approx(0.2)
    assert metrics.overhead_ms_per_frame(1.2, None, 1000) is None and metrics.per_frame_ms(1.0, 0) is None


def test_offered_load_sustained_or_overloaded():
    due = [0.01 * k for k in range(100)]  # 100 fps offered
    kept = metrics.offered_load(100.0, [t + 0.005 for t in due], [5.0] * 100)
    assert kept["sustained"] and not kept["overloaded"] and kept["p50_ms"] == pytest.approx(5.0)
    assert kept["achieved_fps"] == pytest.approx(100.0)
    # a contender that completes only 80 frames/s: overloaded, percentiles withheld
    slow = metrics.offered_load(100.0, [0.0125 * k for k in range(100)], [10.0 + k for k in range(100)])
    assert slow["overloaded"] and slow["p50_ms"] is None and slow["achieved_fps"] == pytest.approx(80.0)
    assert metrics.offered_load(100.0, [t + 0.005 for t in due], [5.0] * 100, errors=1)["overloaded"]


# ------------------------------------------------------------------------------------------ snapshots
def _snapshot(uptime, completed, stages):
    """A stats snapshot in the layout hetsched/server/front.py emits today."""
    plan_stages = [{"index": i, "cluster": s["cluster"], "cores": s["cores"], "first_layer": 8 * i,
                    "last_layer": 8 * i + 7, "threads": 1, "replicas": len(s["pids"]), "compute_ms": s["pred"],
                    "period_ms": s["pred"] / len(s["pids"])} for i, s in enumerate(stages)]
    return {"uptime_s": uptime, "completed": completed, "errors": 0,
            "plan": {"stages": plan_stages, "throughput_fps": 150.0, "latency_ms": 12.0, "balance": 1.05,
                     "bottleneck_stage": 1},
            "stages": [{"stage": i, "cluster": s["cluster"], "cores": s["cores"], "replicas": len(s["pids"]),
                        "threads": 1, "pids": s["pids"], "layers": [f"l{8 * i}", f"l{8 * i + 7}"],
                        "frames": s["frames"], "errors": 0, "compute_s": s["compute_s"], "wait_s": 0.1 * i,
                        "send_s": s["frames"] * 2e-4, "utilization": 0.0, "samples_ms": s["samples"],
                        "compute_ms_p50": None, "predicted_ms": s["pred"], "predicted_period_ms": s["pred"]}
                       for i, s in enumerate(stages)]}


def _run_data() -> RunData:
    rng = np.random.default_rng(3)
    n = 300
    before = _snapshot(50.0, 100, [
        {"cluster": "little", "cores": [1], "pids": [101], "frames": 100, "compute_s": 0.55, "pred": 5.6,
         "samples": list(rng.uniform(5, 6, 100))},
        {"cluster": "big", "cores": [0, 2], "pids": [102, 103], "frames": 100, "compute_s": 0.9, "pred": 9.4,
         "samples": list(rng.uniform(8, 10, 100))}])
    t0 = 1000.0
    done = sorted(t0 + 0.02 + i / 140.0 + rng.uniform(0, 0.002) for i in range(n))
    wall = done[-1] - t0
    after = _snapshot(50.0 + wall, 100 + n, [
        {"cluster": "little", "cores": [1], "pids": [101], "frames": 100 + n, "compute_s": 0.55 + n * 5.5e-3,
         "pred": 5.6, "samples": before["stages"][0]["samples_ms"] + list(rng.uniform(5, 6.5, n))},
        {"cluster": "big", "cores": [0, 2], "pids": [102, 103], "frames": 100 + n, "compute_s": 0.9 + n * 9e-3,
         "pred": 9.4, "samples": before["stages"][1]["samples_ms"] + list(rng.uniform(8, 10.5, n))}])
    return RunData(before=before, after=after, t_start=t0, completion_times=done,
                   latencies_ms=list(rng.gamma(4.0, 3.0, n)), sent=n, received=n, errors=0, traffic=metrics.ENCODED,
                   core_rates_fps={0: 110.0, 1: 55.0, 2: 110.0}, t_end=done[-4],
                   predicted_overhead_ms={"little": 0.3, "big": 0.4})


def test_adapter_reads_todays_snapshot_and_per_worker_counters():
    run = _run_data()
    c = read_snapshot(run.after)
    assert c.worker_pids == [101, 102, 103] and c.settled
    assert [st.workers for st in c.stages] == [1, 2]
    assert c.stages[1].accounts[0].pids == (102, 103) and c.stages[1].accounts[0].compute_cpu_s is None
    assert c.stages[0].first_layer == 0 and c.stages[1].last_layer == 15
    lagging = dict(run.after, completed=run.after["completed"] + 5)
    assert not read_snapshot(lagging).settled
    per_worker = dict(run.after)
    per_worker["stages"] = [dict(run.after["stages"][1], workers=[
        {"pid": 102, "cores": [0], "frames": 200, "compute_s": 1.8, "compute_cpu_s": 1.7},
        {"pid": 103, "cores": [2], "frames": 200, "compute_s": 1.8, "compute_cpu_s": 1.6}])]
    accounts = read_snapshot(per_worker).stages[0].accounts
    assert [(a.pids, a.cores, a.compute_cpu_s) for a in accounts] == [((102,), (0,), 1.7), ((103,), (2,), 1.6)]


def test_predicted_overheads_leave_the_empty_run_in_the_compute():
    costs = SimpleNamespace(stage_overhead_ms={"big": 0.9, "little": 1.4})
    ms = [_measurement("big", (0,), 5.0, empty_ms=0.1), _measurement("little", (1,), 10.0, empty_ms=0.2)]
    assert predicted_overheads(costs, ms) == {"big": pytest.approx(0.8), "little": pytest.approx(1.2)}


def test_every_report_gives_the_same_figures_from_the_same_run():
    from hetsched.bench import figures
    from hetsched.bench.contenders import Slot
    from hetsched.cli.demo import demo_result
    from hetsched.observe.tables import stage_status

    run = _run_data()
    profile = build_report(run)
    demo = demo_result(run, [], [])["report"]
    bench_slot = figures.hetsched_slot_figures(run)
    slot = Slot(done_t=list(run.completion_times), lat_ms=list(run.latencies_ms), cpu_s=1.0, frames=run.received,
                t_end=run.t_end, extra={"run": dataclasses.replace(run, core_rates_fps=None), "coordinator_cpu_s": 0.1,
                                        "client_cpu_s": 0.03, "accounts": []})
    bench_row = figures.hetsched_saturated([slot], dict(run.core_rates_fps))
    status = stage_status(run.after, run.before)

    p = profile["pipeline"]
    expected_fps = metrics.throughput_fps(run.completion_times, run.t_end)
    assert p["throughput_fps"] == pytest.approx(expected_fps)
    assert p["limit_fps"] == pytest.approx(275.0)
    assert p["efficiency"] == pytest.approx(expected_fps / 275.0)
    assert p["latency_p99_ms"] == pytest.approx(metrics.percentile(run.latencies_ms, 99))
    for rep in (demo, {"pipeline": {
            "throughput_fps": bench_slot["fps"], "latency_p50_ms": bench_slot["p50_ms"],
            "latency_p99_ms": bench_slot["p99_ms"], "limit_fps": bench_slot["limit_fps"],
            "efficiency": bench_slot["efficiency"], "balance": bench_slot["balance"]}}):
        for key in ("throughput_fps", "latency_p50_ms", "latency_p99_ms", "limit_fps", "efficiency", "balance"):
            assert rep["pipeline"][key] == pytest.approx(p[key]), key
    # the bench's row (rounded for its tables) agrees with the profile report
    assert bench_row["fps"] == pytest.approx(p["throughput_fps"], abs=0.01)
    assert bench_row["sat_p50_ms"] == pytest.approx(p["latency_p50_ms"], abs=1e-3)
    assert bench_row["sat_p99_ms"] == pytest.approx(p["latency_p99_ms"], abs=1e-3)
    assert bench_row["balance"] == pytest.approx(p["balance"], abs=1e-3)
    for st, b, d, s in zip(profile["stages"], bench_row["stages"], demo["stages"], status):
        assert st["utilization"] == pytest.approx(d["utilization"])
        assert b["utilization"] == pytest.approx(st["utilization"], abs=1e-3)
        assert s["utilization"] == pytest.approx(st["utilization"])  # status over the same interval
        assert b["prediction_error"] == pytest.approx(st["prediction_error"], abs=1e-3)
    # the definitions themselves, on this data
    wall = run.completion_times[-1] - run.t_start
    big = profile["stages"][1]
    assert big["utilization"] == pytest.approx(300 * 9e-3 / (2 * wall))
    assert big["measured_period_ms"] == pytest.approx(9.0 / 2)
    assert big["predicted_compute_ms"] == pytest.approx(9.4 - 0.4)
    assert big["compute_ms_mean"] == pytest.approx(9.0)
    assert big["prediction_error"] == pytest.approx((big["compute_ms_mean"] - 9.0) / 9.0)
    assert p["balance"] == pytest.approx(metrics.balance([5.5, 4.5]))


def test_a_pool_of_a_big_and_a_little_core_is_judged_on_the_frames_each_served():
    """A stage served by a big worker (8 ms predicted) and a little one (16 ms) that decode JPEGs:
    the prediction is weighted by the frames each served (not the slowest member's, which made a
    pool that ran as predicted show -53 %), utilisation and period count the decoding."""
    def snap(frames_big, frames_little, t):
        snap = _snapshot(t, frames_big + frames_little, [
            {"cluster": "big+little", "cores": [0, 1], "pids": [201, 202], "frames": frames_big + frames_little,
             "compute_s": frames_big * 8.2e-3 + frames_little * 16.4e-3, "pred": 16.5, "samples": [8.2] * 10}])
        st = snap["stages"][0]
        st.update(predicted_compute_ms=16.0, input_s=(frames_big + frames_little) * 4e-3, workers=[
            {"pid": 201, "cores": [0], "frames": frames_big, "compute_s": frames_big * 8.2e-3,
             "input_s": frames_big * 4e-3, "predicted_compute_ms": 8.0},
            {"pid": 202, "cores": [1], "frames": frames_little, "compute_s": frames_little * 16.4e-3,
             "input_s": frames_little * 4e-3, "predicted_compute_ms": 16.0}])
        return snap

    st = stage_figures(snap(100, 50, 10.0), snap(400, 150, 14.0), 4.0)[0]
    assert st["frames"] == 400
    assert st["predicted_compute_ms"] == pytest.approx((300 * 8.0 + 100 * 16.0) / 400)  # 10 ms
    assert st["compute_ms_mean"] == pytest.approx((300 * 8.2 + 100 * 16.4) / 400)
    assert st["prediction_error"] == pytest.approx(0.025)
    assert st["input_ms"] == pytest.approx(4.0)
    busy = 300 * 12.2e-3 + 100 * 20.4e-3
    assert st["utilization"] == pytest.approx(busy / (2 * 4.0))
    assert st["measured_period_ms"] == pytest.approx(1e3 / (1 / 12.2e-3 + 1 / 20.4e-3))


def test_offered_load_over_rounds_pools_the_sustained_rounds_and_needs_most_of_them():
    due = [k / 100.0 for k in range(100)]
    a = ([t + 0.005 for t in due], [5.0] * 99 + [40.0], 0)
    b = ([t + 0.005 for t in due], [7.0] * 100, 0)
    both = metrics.offered_load_rounds(100.0, [a, b])
    assert both["sustained"] and both["runs"] == 2 and both["frames"] == 200 and both["overloaded_runs"] == 0
    assert both["p50_ms"] == metrics.percentile([5.0] * 99 + [40.0] + [7.0] * 100, 50)
    assert both["p99_ms"] == metrics.percentile([5.0] * 99 + [40.0] + [7.0] * 100, 99)
    slow = ([0.0125 * k for k in range(100)], [10.0 + k for k in range(100)], 0)
    # one overloaded round of three: the other two count, and it is reported
    two = metrics.offered_load_rounds(100.0, [a, slow, b])
    assert two["sustained"] and two["overloaded_runs"] == 1 and two["frames"] == 200
    assert two["p99_ms"] == both["p99_ms"]
    assert two["achieved_fps"] == metrics.offered_load(100.0, *slow[:2])["achieved_fps"]
    # half or more overloaded: overloaded, no percentiles
    worse = metrics.offered_load_rounds(100.0, [a, slow])
    assert worse["overloaded"] and worse["p99_ms"] is None
    assert metrics.offered_load_rounds(100.0, [(b[0], b[1], 1)])["overloaded"], "a failed frame"
