"""From the bench's raw records (:class:`~hetsched.bench.contenders.Slot`) to its figures, every one
by hetsched.observe.metrics (hetsched's own slots through hetsched.observe.report.build_report, the
same builder ``profile`` and the demo use), and issue 12's targets evaluated on them."""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Sequence

from hetsched.bench.contenders import Slot
from hetsched.bench.options import CPU_BUDGET_MS, ORT_CONTENDERS
from hetsched.observe import metrics
from hetsched.observe.report import RunData, build_report


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


def _median(xs: Sequence[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def saturated(fps_rounds: Sequence[float], lat_ms: Sequence[float], cpu_s: float, frames: int,
              rss_mb: float | None = None) -> dict:
    """A contender's saturated row: median throughput over rounds (with the range), latency
    percentiles over every frame of every round, CPU ms per frame over all rounds."""
    lat = metrics.latency_summary(lat_ms)
    return {"fps": _r(_median(fps_rounds), 2), "fps_rounds": [_r(x, 2) for x in fps_rounds],
            "fps_min": _r(min(fps_rounds), 2) if fps_rounds else None,
            "fps_max": _r(max(fps_rounds), 2) if fps_rounds else None,
            "sat_p50_ms": _r(lat["p50_ms"]), "sat_p99_ms": _r(lat["p99_ms"]),
            "cpu_ms_per_frame": _r(metrics.per_frame_ms(cpu_s, frames)), "peak_rss_mb": _r(rss_mb, 1)}


def ort_saturated(slots: Sequence[Slot], rss_mb: float | None = None) -> dict:
    return saturated([metrics.throughput_fps(s.done_t, s.t_end) for s in slots], [v for s in slots for v in s.lat_ms],
                     sum(s.cpu_s for s in slots), sum(s.frames for s in slots), rss_mb)


def hetsched_slot_figures(run: RunData) -> dict:
    """The figures of one saturated hetsched slot, from the report builder every report uses."""
    rep = build_report(run)
    p = rep["pipeline"]
    return {"fps": p["throughput_fps"], "p50_ms": p["latency_p50_ms"], "p99_ms": p["latency_p99_ms"],
            "limit_fps": p["limit_fps"], "efficiency": p["efficiency"], "balance": p["balance"],
            "stages": rep["stages"]}


def hetsched_saturated(slots: Sequence[Slot], core_rates: dict, rss_mb: float | None = None) -> dict:
    """hetsched's saturated row (as :func:`saturated`, each round's throughput by
    :func:`hetsched_slot_figures` with the bench's measured per-core rates as the limit), the
    stages (median over rounds of each figure) and the per-frame CPU budget."""
    per = [hetsched_slot_figures(dataclasses.replace(s.extra["run"], core_rates_fps=core_rates)) for s in slots]
    row = saturated([f["fps"] for f in per], [v for s in slots for v in s.lat_ms], sum(s.cpu_s for s in slots),
                    sum(s.frames for s in slots), rss_mb)
    row["errors"] = sum(s.errors for s in slots)
    row["balance"] = _r(_median([f["balance"] for f in per]))
    stages = []
    for i, st in enumerate(per[-1]["stages"] if per else []):
        med = lambda key: _r(_median([f["stages"][i][key] for f in per if i < len(f["stages"])]))  # noqa: E731
        stages.append({"stage": st["stage"], "cluster": st["cluster"], "cores": st["cores"],
                       "replicas": st["replicas"], "threads": st["threads"], "first_layer": st["first_layer"],
                       "last_layer": st["last_layer"], "predicted_ms": _r(st["predicted_ms"]),
                       "predicted_compute_ms": med("predicted_compute_ms"), "compute_ms_mean": med("compute_ms_mean"),
                       "compute_ms_p50": med("compute_ms_p50"), "input_ms": med("input_ms"),
                       "send_ms": med("send_ms"), "utilization": med("utilization"),
                       "prediction_error": med("prediction_error")})
    row["stages"] = stages
    row["cpu_budget"] = cpu_budget(slots)
    return row


def cpu_budget(slots: Sequence[Slot]) -> dict:
    """hetsched's CPU ms per frame over its saturated slots, per process, against issue 12's budget:
    the coordinator (the ``hetsched start`` process, all threads), each worker account beyond
    onnxruntime's own run CPU time, and the feeding client's thread."""
    frames = sum(s.frames for s in slots)
    coord = metrics.per_frame_ms(sum(s.extra["coordinator_cpu_s"] for s in slots), frames)
    client = metrics.per_frame_ms(sum(s.extra["client_cpu_s"] for s in slots), frames)
    acc: dict[tuple, dict] = {}
    for s in slots:
        for i, a in enumerate(s.extra["accounts"]):
            b = acc.setdefault((a["stage"], i), {"stage": a["stage"], "cluster": a["cluster"], "pids": a["pids"],
                                                 "cpu_s": 0.0, "onnxruntime_cpu_s": 0.0, "frames": 0,
                                                 "estimated": False, "restarted": False})
            for k in ("cpu_s", "onnxruntime_cpu_s", "frames"):
                b[k] += a[k]
            b["estimated"] |= a["estimated"]
            b["restarted"] |= a["restarted"]
    workers = []
    for b in acc.values():
        over = metrics.overhead_ms_per_frame(b["cpu_s"], b["onnxruntime_cpu_s"], b["frames"])
        workers.append({**{k: b[k] for k in ("stage", "cluster", "pids", "frames", "estimated", "restarted")},
                        "cpu_ms_per_frame": _r(metrics.per_frame_ms(b["cpu_s"], b["frames"])),
                        "beyond_onnxruntime_ms": _r(over),  # an estimate is shown but not judged
                        "met": None if over is None or b["estimated"] else over <= CPU_BUDGET_MS["worker"]})
    return {"frames": frames, "budget_ms": dict(CPU_BUDGET_MS),
            "coordinator_ms": _r(coord), "coordinator_met": None if coord is None else coord <= CPU_BUDGET_MS["coordinator"],
            "client_ms": _r(client), "client_met": None if client is None else client <= CPU_BUDGET_MS["client"],
            "workers": workers}


def limit_figures(per_core: dict[int, list[Slot]]) -> dict:
    """The limit row: each core alone (one single-threaded session, the same work), its rate the
    median over rounds of :func:`metrics.throughput_fps`; limit = :func:`metrics.limit_fps`."""
    rates = {c: _median([metrics.throughput_fps(s.done_t, s.t_end) for s in slots]) or 0.0
             for c, slots in per_core.items()}
    frame_ms = {c: _median([v for s in slots for v in s.per_session_ms.values()]) for c, slots in per_core.items()}
    rounds = min(len(v) for v in per_core.values()) if per_core else 0
    round_sums = [sum(metrics.throughput_fps(per_core[c][r].done_t, per_core[c][r].t_end) for c in per_core)
                  for r in range(rounds)]
    all_slots = [s for v in per_core.values() for s in v]
    row = saturated(round_sums, [v for s in all_slots for v in s.lat_ms], sum(s.cpu_s for s in all_slots),
                    sum(s.frames for s in all_slots))
    fastest = max(rates, key=lambda c: rates[c]) if rates else None
    row.update(fps=_r(metrics.limit_fps(rates), 2), per_core_fps={str(c): _r(v, 2) for c, v in rates.items()},
               per_core_frame_ms={str(c): _r(v) for c, v in frame_ms.items()}, fastest_core=fastest,
               fastest_core_frame_ms=_r(frame_ms.get(fastest)) if fastest is not None else None)
    return row


def offered(slots: list[Slot], offered_fps: float) -> dict:
    """One contender at the common offered rate (open loop), over its runs (one per round, or one
    that overloaded it), by :func:`metrics.offered_load_rounds`."""
    f = metrics.offered_load_rounds(offered_fps, [(s.done_t, s.lat_ms, s.errors) for s in slots])
    cpu, frames = sum(s.cpu_s for s in slots), sum(s.frames for s in slots)
    return {**{k: _r(v) if isinstance(v, float) else v for k, v in f.items()},
            "cpu_ms_per_frame": _r(metrics.per_frame_ms(cpu, frames))}


def compare(contenders: dict[str, dict]) -> None:
    """Add each row's throughput x limit, x ort-all and x ort-replicas (metrics.ratio)."""
    lim = contenders["limit"]["fps"]
    base = {"vs_limit": lim, "vs_ort_all": contenders.get("ort-all", {}).get("fps"),
            "vs_ort_replicas": contenders.get("ort-replicas", {}).get("fps")}
    for m in contenders.values():
        for key, b in base.items():
            m[key] = _r(metrics.ratio(m["fps"], b))


# ------------------------------------------------------------------------------------------ targets
def _target(what: str, value: Any, op: str, bound: Any, met: bool | None = None) -> dict:
    if met is None and value is not None and bound is not None:
        met = value >= bound if op == ">=" else value <= bound if op == "<=" else value < bound
    return {"target": what, "value": _r(value), "op": op, "bound": _r(bound), "met": met}


def evaluate_targets(t: dict, emulated: bool) -> list[dict]:
    """Issue 12's performance goals for one scenario and traffic kind, met / missed / n/a (None)."""
    c = t["contenders"]
    h = c["hetsched"]
    out = [_target("hetsched fps / limit", h["vs_limit"], ">=", 0.95)]
    if emulated:
        out.append(_target("hetsched fps / ort-all (a core is slowed)", h["vs_ort_all"], ">=", 1.8))
    out.append(_target("hetsched fps / ort-replicas", h["vs_ort_replicas"], ">=", 1.0))
    hf, rf = h.get("fixed") or {}, c["ort-replicas"].get("fixed") or {}
    rate = f"at {t['offered_fps']:.0f} fps offered" if t.get("offered_fps") else "at the offered rate"
    if hf.get("overloaded"):
        out.append(_target(f"hetsched p99 {rate} < ort-replicas p99 (ms)", None, "<", rf.get("p99_ms"), False))
    elif rf.get("overloaded"):
        out.append(_target(f"hetsched p99 {rate} < ort-replicas p99 (ms; ort-replicas overloaded)",
                           hf.get("p99_ms"), "<", None, hf.get("p99_ms") is not None))
    else:
        out.append(_target(f"hetsched p99 {rate} < ort-replicas p99 (ms)", hf.get("p99_ms"), "<", rf.get("p99_ms")))
    fm = c["limit"].get("fastest_core_frame_ms")
    out.append(_target(f"hetsched p50 {rate} <= 1.25 x fastest core's frame time (ms)", hf.get("p50_ms"), "<=",
                       1.25 * fm if fm else None, False if hf.get("overloaded") else None))
    b = h.get("cpu_budget") or {}
    out.append(_target("coordinator CPU ms/frame", b.get("coordinator_ms"), "<=", CPU_BUDGET_MS["coordinator"]))
    for w in b.get("workers", []):
        out.append(_target(f"stage {w['stage']} worker(s) {w['pids']} CPU ms/frame beyond onnxruntime"
                           + (" (estimated, not judged: the workers report no onnxruntime CPU time)"
                              if w["estimated"] else ""), w["beyond_onnxruntime_ms"], "<=", CPU_BUDGET_MS["worker"],
                           w["met"]))
    out.append(_target("feeding client CPU ms/frame", b.get("client_ms"), "<=", CPU_BUDGET_MS["client"]))
    return out


def ort_names(specs: dict) -> list[str]:
    """The onnxruntime contenders this scenario runs (ort-fastest-cluster only with 2+ clusters)."""
    return [n for n in ORT_CONTENDERS if specs.get(n)]
