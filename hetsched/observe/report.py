"""Stage-balance report (pure): from two service snapshots, client latencies and a frame trace,
compute per-stage measured vs predicted times, the bottleneck, balance, prediction errors and
efficiency; render the table and a Chrome trace (Perfetto / chrome://tracing)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _pct(xs: Sequence[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if len(xs) else None


def _err(measured: float | None, predicted: float | None) -> float | None:
    if measured is None or not predicted:
        return None
    return (measured - predicted) / predicted


def build_report(before: dict, after: dict, latencies_ms: Sequence[float], sent: int, received: int,
                 errors: int, window_s: float, limit_fps: float | None, offered_fps: float | None = None) -> dict:
    """``before``/``after``: Server.snapshot() at the start and end of the measured window."""
    plan = after["plan"]
    stages = []
    for b, a, ps in zip(before["stages"], after["stages"], plan["stages"]):
        frames = a["frames"] - b["frames"]
        compute_s = a["compute_s"] - b["compute_s"]
        wait_s = a["wait_s"] - b["wait_s"]
        send_s = a["send_s"] - b["send_s"]
        new = max(0, min(frames, len(a["samples_ms"])))
        samples = a["samples_ms"][-new:] if new else []
        mean = compute_s / frames * 1e3 if frames else None
        replicas = a["replicas"]
        stages.append({
            "stage": a["stage"], "cluster": a["cluster"], "cores": a["cores"], "replicas": replicas,
            "threads": a["threads"], "pids": a["pids"], "layers": a["layers"],
            "first_layer": ps["first_layer"], "last_layer": ps["last_layer"], "frames": frames,
            "predicted_ms": ps["compute_ms"], "predicted_period_ms": ps["period_ms"],
            "compute_ms_mean": mean, "compute_ms_p50": _pct(samples, 50), "compute_ms_p99": _pct(samples, 99),
            "wait_ms": wait_s / frames * 1e3 if frames else None,
            "send_ms": send_s / frames * 1e3 if frames else None,
            "measured_period_ms": (mean / replicas) if mean is not None else None,
            "utilization": compute_s / (window_s * replicas) if window_s > 0 else None,
            "prediction_error": _err(_pct(samples, 50), ps["compute_ms"]),
        })
    periods = [s["measured_period_ms"] for s in stages if s["measured_period_ms"] is not None]
    bottleneck = max(stages, key=lambda s: s["measured_period_ms"] or 0.0)["stage"] if periods else None
    balance = max(periods) / (sum(periods) / len(periods)) if periods else None
    throughput = received / window_s if window_s > 0 else 0.0
    return {
        "plan": plan,
        "stages": stages,
        "pipeline": {
            "window_s": window_s, "sent": sent, "received": received, "errors": errors,
            "offered_fps": offered_fps,
            "throughput_fps": throughput, "predicted_throughput_fps": plan["throughput_fps"],
            "throughput_prediction_error": _err(throughput, plan["throughput_fps"]),
            "latency_p50_ms": _pct(latencies_ms, 50), "latency_p99_ms": _pct(latencies_ms, 99),
            "predicted_latency_ms": plan["latency_ms"],
            "bottleneck_stage": bottleneck, "predicted_bottleneck_stage": plan["bottleneck_stage"],
            "balance": balance, "predicted_balance": plan["balance"],
            "limit_fps": limit_fps,
            "efficiency": throughput / limit_fps if limit_fps else None,
        },
    }


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def format_report(report: dict) -> str:
    head = ("stage", "cluster", "cores", "r x t", "layers", "pred ms", "p50 ms", "p99 ms", "wait ms", "send ms",
            "util", "pred err")
    rows = [head]
    for s in report["stages"]:
        rows.append((str(s["stage"]), s["cluster"], ",".join(map(str, s["cores"])), f"{s['replicas']}x{s['threads']}",
                     f"{s['layers'][0]} .. {s['layers'][1]}", _f(s["predicted_ms"]), _f(s["compute_ms_p50"]),
                     _f(s["compute_ms_p99"]), _f(s["wait_ms"]), _f(s["send_ms"]),
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
        f"(sum of each core's standalone single-thread throughput)",
        f"frames          sent {p['sent']}, received {p['received']}, errors {p['errors']} in {p['window_s']:.1f} s",
    ]
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
    return {"traceEvents": events, "displayTimeUnit": "ms"}
