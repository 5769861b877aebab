"""Stage-balance report (pure): from one measured window of a service run (:class:`RunData`: two
service snapshots, client completions and latencies, the limit's per-core rates) compute per-stage
measured vs predicted times, the bottleneck, balance, prediction errors and efficiency, every figure
by hetsched.observe.metrics; render the table and a Chrome trace (Perfetto / chrome://tracing)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from hetsched.observe import metrics
from hetsched.observe.snapshot import Account, StageCounters, read_snapshot


@dataclass
class RunData:
    """What one measured window of a service run recorded: the input of every report builder
    (``profile``, the demo and the bench's hetsched slots all fill one of these)."""
    before: dict                       # raw stats snapshot at the window's start (settled)
    after: dict                        # ... and at its end (settled)
    t_start: float                     # monotonic time of the window's first submit
    completion_times: Sequence[float]  # monotonic time of each result
    latencies_ms: Sequence[float]      # per result, submit -> reply (client side)
    sent: int
    received: int
    errors: int
    traffic: str = metrics.RAW         # what the frames were: metrics.RAW or metrics.ENCODED
    core_rates_fps: Mapping[Any, float] | None = None  # each core's standalone rate for this traffic
    t_end: float | None = None         # end of offering load (throughput leaves the drain out)
    offered_fps: float | None = None   # None: saturated (closed loop)
    predicted_overhead_ms: Mapping[str, float] | None = None  # per cluster: the non-onnxruntime part of
    #                                    a stage's predicted time (to compare compute with compute)


def predicted_overheads(costs: Any, measurements: Sequence[Any]) -> dict[str, float]:
    """Per cluster, the part of a planned stage's ``compute_ms`` that is not onnxruntime run time:
    the planner's per-stage overhead (``costs.stage_overhead_ms``) minus the empty-run time the
    workers' compute timer does include (``measurements[i].empty_ms[1]``)."""
    empty = {m.cluster: (m.empty_ms or {}).get(1, 0.0) for m in measurements}
    return {c: max(0.0, ov - empty.get(c, 0.0)) for c, ov in costs.stage_overhead_ms.items()}


def _predicted_compute(st: StageCounters, overhead: Mapping[str, float] | None) -> float | None:
    """A stage's predicted onnxruntime-only time: from the snapshot when it carries one, else the
    plan's stage time minus the known overhead; None when the two bases cannot be matched."""
    if st.predicted_compute_ms is not None:
        return float(st.predicted_compute_ms)
    if overhead is None or st.cluster not in overhead:
        return None
    return st.predicted_ms - overhead[st.cluster]


def _window_accounts(b: StageCounters | None, a: StageCounters) -> list[tuple[Account, int, float, float]]:
    """Per account of ``a``: (account, frames, onnxruntime seconds, input seconds) inside the window
    (an account not in ``b``, e.g. a restarted worker's, counts from zero)."""
    before = {acc.pids: acc for acc in (b.accounts if b is not None else ())}
    out = []
    for acc in a.accounts:
        prev = before.get(acc.pids)
        out.append((acc, acc.frames - (prev.frames if prev else 0), acc.compute_s - (prev.compute_s if prev else 0.0),
                    acc.input_s - (prev.input_s if prev else 0.0)))
    return out


def stage_figures(before: dict, after: dict, wall_s: float,
                  predicted_overhead_ms: Mapping[str, float] | None = None) -> list[dict]:
    """Per stage over the window between two snapshots (``wall_s`` long): frames, compute ms per
    frame (mean, p50, p99 of the window's samples), input decoding, wait and send ms per frame,
    period, utilisation and the compute prediction error, all by hetsched.observe.metrics."""
    out = []
    b_all, a_all = read_snapshot(before), read_snapshot(after)
    # a re-plan inside the window: the new plan's workers count from their start, so the window's
    # figures are those of the plan running at its end, since it started
    switched = before.get("plan") != after.get("plan")
    for b, a in zip(b_all.stages if not switched else [None] * len(a_all.stages), a_all.stages):
        accounts = _window_accounts(b, a)
        if b is None:
            b = replace(a, frames=0, compute_s=0.0, wait_s=0.0, send_s=0.0, input_s=0.0)
        frames = a.frames - b.frames
        compute_s = a.compute_s - b.compute_s
        busy_s = compute_s + a.input_s - b.input_s
        new = max(0, min(frames, len(a.samples_ms)))
        samples = a.samples_ms[-new:] if new else ()
        stage_predicted = _predicted_compute(a, predicted_overhead_ms)
        # each worker's prediction (its cluster's), weighted by the frames it served
        predicted = metrics.pool_predicted_ms([
            (f, acc.predicted_compute_ms if acc.predicted_compute_ms is not None else stage_predicted)
            for acc, f, _, _ in accounts]) if frames > 0 else stage_predicted
        mean = metrics.per_frame_ms(compute_s, frames)
        out.append({
            "stage": a.stage, "cluster": a.cluster, "cores": list(a.cores), "replicas": a.workers,
            "threads": a.threads, "pids": [p for acc in a.accounts for p in acc.pids], "layers": list(a.layers),
            "first_layer": a.first_layer, "last_layer": a.last_layer, "frames": frames,
            "predicted_ms": a.predicted_ms, "predicted_compute_ms": predicted,
            "predicted_period_ms": a.predicted_period_ms,
            "compute_ms_mean": mean, "compute_ms_p50": metrics.percentile(samples, 50),
            "compute_ms_p99": metrics.percentile(samples, 99),
            "input_ms": metrics.per_frame_ms(a.input_s - b.input_s, frames),
            "wait_ms": metrics.per_frame_ms(a.wait_s - b.wait_s, frames),
            "send_ms": metrics.per_frame_ms(a.send_s - b.send_s, frames),
            "measured_period_ms": metrics.stage_period_ms([(c + i, f, len(acc.pids) or 1)
                                                           for acc, f, c, i in accounts]),
            "utilization": metrics.stage_utilisation(busy_s, a.workers, wall_s),
            "prediction_error": metrics.prediction_error(mean, predicted),
        })
    return out


def build_report(run: RunData) -> dict:
    """The stage-balance report of one measured window: per-stage figures and the pipeline's
    throughput, latency, balance, limit and efficiency, every one from hetsched.observe.metrics.
    Utilisation is over the window from the first submit to the last completion."""
    plan = run.after["plan"]
    done = metrics.window_completions(run.completion_times)
    wall_s = (done[-1] - run.t_start) if done else 0.0
    stages = stage_figures(run.before, run.after, wall_s, run.predicted_overhead_ms)
    periods = [s["measured_period_ms"] for s in stages]
    known = [s for s in stages if s["measured_period_ms"] is not None]
    throughput = metrics.throughput_fps(run.completion_times, run.t_end)
    limit = metrics.limit_fps(run.core_rates_fps)
    lat = metrics.latency_summary(run.latencies_ms)
    return {
        "plan": plan,
        "stages": stages,
        "pipeline": {
            "traffic": run.traffic, "window_s": wall_s, "sent": run.sent, "received": run.received,
            "errors": run.errors, "offered_fps": run.offered_fps,
            "throughput_fps": throughput, "predicted_throughput_fps": plan["throughput_fps"],
            "throughput_prediction_error": metrics.prediction_error(throughput, plan["throughput_fps"]),
            "latency_p50_ms": lat["p50_ms"], "latency_p99_ms": lat["p99_ms"],
            "predicted_latency_ms": plan["latency_ms"],
            "bottleneck_stage": max(known, key=lambda s: s["measured_period_ms"])["stage"] if known else None,
            "predicted_bottleneck_stage": plan["bottleneck_stage"],
            "balance": metrics.balance(periods), "predicted_balance": plan["balance"],
            "limit_fps": limit, "efficiency": metrics.efficiency(throughput, limit),
            "replanned": run.before.get("plan") != run.after.get("plan"),
        },
    }


_WORK = {metrics.RAW: "model only, raw tensors", metrics.ENCODED: "decode + preprocess + model, encoded images"}


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def format_report(report: dict) -> str:
    head = ("stage", "cluster", "cores", "r x t", "layers", "plan ms", "pred compute", "mean ms", "p50 ms", "p99 ms",
            "decode ms", "wait ms", "send ms", "util", "pred err")
    rows = [head]
    for s in report["stages"]:
        rows.append((str(s["stage"]), s["cluster"], ",".join(map(str, s["cores"])), f"{s['replicas']}x{s['threads']}",
                     f"{s['layers'][0]} .. {s['layers'][1]}", _f(s["predicted_ms"]), _f(s["predicted_compute_ms"]),
                     _f(s["compute_ms_mean"]), _f(s["compute_ms_p50"]), _f(s["compute_ms_p99"]), _f(s["input_ms"]),
                     _f(s["wait_ms"]), _f(s["send_ms"]),
                     _f(s["utilization"], "{:.0%}"), _f(s["prediction_error"], "{:+.0%}")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    p = report["pipeline"]
    lines += [
        "",
        f"throughput      {_f(p['throughput_fps'], '{:.1f}')} frames/s  (predicted {_f(p['predicted_throughput_fps'], '{:.1f}')}, "
        f"error {_f(p['throughput_prediction_error'], '{:+.1%}')})",
        f"latency         p50 {_f(p['latency_p50_ms'], '{:.1f}')} ms, p99 {_f(p['latency_p99_ms'], '{:.1f}')} ms "
        f"(predicted unloaded {_f(p['predicted_latency_ms'], '{:.1f}')} ms)",
        f"bottleneck      stage {p['bottleneck_stage']} (planner predicted stage {p['predicted_bottleneck_stage']})",
        f"balance         {_f(p['balance'], '{:.3f}')} slowest/mean stage (predicted {_f(p['predicted_balance'], '{:.3f}')})",
        f"efficiency      {_f(p['efficiency'], '{:.1%}')} of the limit {_f(p['limit_fps'], '{:.1f}')} frames/s "
        f"(sum of each core's standalone single-thread rate for the same work: {_WORK[p['traffic']]})",
        f"frames          sent {p['sent']}, received {p['received']}, errors {p['errors']} in {p['window_s']:.1f} s",
    ]
    if p.get("replanned"):
        lines.append("re-planned      during the window: the stage figures are the new plan's, since it started")
    lines.append("(plan ms: the planner's stage time with its overheads, a pool's slowest member's; pred compute: "
                 "its onnxruntime-only part for the frames each worker served, against the measured mean in pred err; "
                 "mean/p50/p99: onnxruntime's run; decode: the workers' input decoding or conversion; util: decode + "
                 "run over wall time)")
    return "\n".join(lines)


def chrome_trace(trace: dict, report: dict) -> dict:
    """Chrome trace event JSON: one process track per stage replica, one slice per frame per stage."""
    events: list[dict] = []
    frames = trace["frames"]
    if not frames:
        return {"traceEvents": [], "displayTimeUnit": "ms"}
    t0 = min(f["t_submit"] for f in frames)
    stage_info = {s["stage"]: s for s in report["stages"]}
    seen = set()
    for f in frames:
        for stage, replica, t_recv, t_start, t_end in f["hops"]:
            key = f"{stage}.{replica}"
            pid = trace["pids"].get(key, 100000 + stage * 100 + replica)
            if key not in seen:
                seen.add(key)
                info = stage_info.get(stage, {})
                name = f"stage {stage} replica {replica} [{info.get('cluster', '?')} cores {info.get('cores', '?')}]"
                events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}})
                events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
                               "args": {"sort_index": stage * 100 + replica}})
            events.append({"name": f"frame {f['id']}", "cat": "compute", "ph": "X", "pid": pid, "tid": 0,
                           "ts": round((t_start - t0) * 1e6, 1), "dur": round((t_end - t_start) * 1e6, 1),
                           "args": {"frame": f["id"], "stage": stage, "queue_us": round((t_start - t_recv) * 1e6, 1)}})
    for sw in trace.get("switches", ()):  # plan switches: a global instant at the decision and the switch
        for what, t in (("re-plan decided", sw["t_decision"]), ("switched to plan generation", sw["t_switch"])):
            events.append({"name": f"{what} {sw['generation']}", "cat": "replan", "ph": "i", "s": "g",
                           "pid": 0, "tid": 0, "ts": round((t - t0) * 1e6, 1),
                           "args": {"old_plan": sw["old_plan"], "new_plan": sw["new_plan"],
                                    "decision": sw["decision"]}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}
