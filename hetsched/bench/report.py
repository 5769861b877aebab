"""Rendering a ``hetsched bench`` result: the terminal report and BENCHMARKS.md (with its kept notes
block and a README headline block for pasting). Rows are built once and rendered as text or markdown;
no figure is computed here (they come from hetsched.bench.figures)."""

from __future__ import annotations

import os
import platform
from typing import Any

from hetsched.bench.options import CONTENDERS, CORRECT_ATOL

NOTES_BEGIN = "<!-- notes:begin -->"
NOTES_END = "<!-- notes:end -->"
HEADER = ["contender", "fps", "fps range", "x limit", "x ort-all", "x ort-replicas", "saturated p50/p99 ms",
          "at offered rate: p50/p99 ms", "CPU ms/frame", "RSS MB"]
BUDGET_HEADER = ["hetsched process", "CPU ms/frame", "budget", ""]
STAGE_HEADER = ["stage", "cluster", "replicas x threads", "layers", "plan ms", "predicted compute", "compute mean",
                "compute p50", "decode", "send", "busy % (util)", "pred err"]
MARK = {True: "MET", False: "MISSED", None: "n/a"}
WORK = {"raw": "raw tensors (model only)", "jpeg": "JPEG photos (decode + preprocess + model)"}


def machine_info() -> dict:
    import numpy as np
    import onnxruntime as ort

    from hetsched.bench.scenarios import allowed_cores
    model = platform.processor() or "?"
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name") and model in ("?", "", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line
    except OSError:
        pass
    return {"cpu_model": model, "arch": platform.machine(), "cores_online": os.cpu_count(),
            "cores_allowed": allowed_cores(), "virtualized": " hypervisor" in flags,
            "kernel": platform.release(), "os": platform.platform(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "numpy": np.__version__}


def _fmt(x: Any, nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _pair(a: Any, b: Any) -> str:
    return f"{_fmt(a)} / {_fmt(b)}"


def _offered_cell(f: dict | None, unit: str = "") -> str:
    if not f:
        return "-"
    if f.get("overloaded"):
        return f"overloaded ({_fmt(f['achieved_fps'])} fps)"
    late = f" ({f['overloaded_runs']} of {f['runs']} rounds overloaded)" if f.get("overloaded_runs") else ""
    return _pair(f.get("p50_ms"), f.get("p99_ms")) + unit + late


def table_rows(t: dict) -> list[list[str]]:
    rows = []
    for name in CONTENDERS:
        m = t["contenders"].get(name)
        if m is None:
            continue
        rows.append([name, _fmt(m["fps"]), f"{_fmt(m['fps_min'])}-{_fmt(m['fps_max'])}", _fmt(m["vs_limit"], 2),
                     _fmt(m["vs_ort_all"], 2), _fmt(m["vs_ort_replicas"], 2), _pair(m["sat_p50_ms"], m["sat_p99_ms"]),
                     _offered_cell(m.get("fixed")), _fmt(m["cpu_ms_per_frame"], 2), _fmt(m["peak_rss_mb"], 0)])
    return rows


def budget_rows(b: dict) -> list[list[str]]:
    lim = b["budget_ms"]
    rows = [["coordinator (the `hetsched start` process)", _fmt(b["coordinator_ms"], 3), f"<= {lim['coordinator']}",
             MARK[b["coordinator_met"]]]]
    for w in b["workers"]:
        what = (f"stage {w['stage']} ({w['cluster']}) worker(s) {w['pids']}, beyond onnxruntime"
                + (" (estimated: run wall time x core speed)" if w["estimated"] else "")
                + (" (restarted meanwhile)" if w["restarted"] else ""))
        rows.append([what, _fmt(w["beyond_onnxruntime_ms"], 3) + f" (of {_fmt(w['cpu_ms_per_frame'], 2)})",
                     f"<= {lim['worker']}", MARK[w["met"]]])
    rows.append(["feeding client (its thread)", _fmt(b["client_ms"], 3), f"<= {lim['client']}", MARK[b["client_met"]]])
    return rows


def stage_rows(stages: list[dict]) -> list[list[str]]:
    return [[str(s["stage"]), f"{s['cluster']} {s['cores']}", f"{s['replicas']} x {s['threads']}",
             f"{s['first_layer']}..{s['last_layer']}", _fmt(s["predicted_ms"], 2), _fmt(s["predicted_compute_ms"], 2),
             _fmt(s["compute_ms_mean"], 2), _fmt(s["compute_ms_p50"], 2), _fmt(s["input_ms"], 2), _fmt(s["send_ms"], 2),
             _fmt(None if s["utilization"] is None else 100 * s["utilization"], 0),
             "-" if s["prediction_error"] is None else f"{s['prediction_error']:+.0%}"] for s in stages]


def text_table(rows: list[list[str]], header: list[str]) -> str:
    w = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).rjust(w[i]) if i else str(v).ljust(w[i]) for i, v in enumerate(r))  # noqa
    return "\n".join([line(header), "  ".join("-" * x for x in w)] + [line(r) for r in rows])


def md_table(rows: list[list[str]], header: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def scenario_title(sc: dict) -> str:
    cl = ", ".join(f"{c['name']} {c['cores']}" + (f" at speed {c['emulated_speed']} (emulated)"
                                                     if c["emulated_speed"] else "") for c in sc["clusters"])
    return f"{sc['name']}: {cl}"


def disturbed(t: dict) -> str:
    fl = t.get("foreign_cpu_pct") or {}
    if (fl.get("max_pct") or 0) > 10:
        return (f" (**disturbed**: processes not started by the benchmark used {_fmt(fl['mean_pct'])} % CPU on "
                f"average, up to {_fmt(fl['max_pct'])} % in one slot)")
    return ""


def targets_text(t: dict) -> list[str]:
    return [f"{x['target']}: {_fmt(x['value'], 3)} (target {x['op']} {_fmt(x['bound'], 3)}) {MARK[x['met']]}"
            for x in t.get("targets", [])]


def headline(sc: dict, kind: str, t: dict) -> str:
    c, h = t["contenders"], t["contenders"]["hetsched"]
    hf, rf = h.get("fixed"), c["ort-replicas"].get("fixed")
    met = sum(1 for x in t.get("targets", []) if x["met"])
    return (f"**{sc['name']}, {kind}**: hetsched {_fmt(h['fps'])} fps = {_fmt(h['vs_limit'], 2)} x limit "
            f"({_fmt(c['limit']['fps'])} fps), {_fmt(h['vs_ort_all'], 2)} x ort-all, {_fmt(h['vs_ort_replicas'], 2)} "
            f"x ort-replicas; at {_fmt(t.get('offered_fps'))} fps offered p50/p99 {_offered_cell(hf, ' ms')} "
            f"(ort-replicas {_offered_cell(rf, ' ms')}); targets met {met} of {len(t.get('targets', []))}"
            + disturbed(t))


def _details(sc: dict, kind: str, t: dict, table) -> list[str]:
    """The lines about one scenario and traffic kind, tables rendered by ``table(rows, header)``."""
    plan = sc["plan"]
    st = "; ".join(f"stage {p['index']}: {p['cluster']} cores {p['cores']} ({p['replicas']} x {p['threads']}), "
                   f"layers {p['first_layer']}..{p['last_layer']}" for p in plan["stages"])
    lim = t["contenders"]["limit"]
    L = [f"Traffic: {WORK.get(kind, kind)}, {t['source']}. hetsched client input: {sc.get('hetsched_input', '-')}; "
         f"window {sc.get('window')}. Plan (`hetsched start`, its own profile): {len(plan['stages'])} stage(s)"
         f"{': ' + st if st else ''}; predicted {_fmt(sc['predicted_fps'])} fps. Per-core standalone fps: "
         + ", ".join(f"core {k}: {v}" for k, v in lim["per_core_fps"].items())
         + f"; fastest core alone {_fmt(lim['fastest_core_frame_ms'], 2)} ms/frame.", "",
         table(table_rows(t), HEADER), ""]
    h = t["contenders"]["hetsched"]
    if h.get("cpu_budget"):
        L += ["hetsched CPU per frame, saturated (issue 12's budget):", "", table(budget_rows(h["cpu_budget"]),
                                                                                 BUDGET_HEADER), ""]
    if h.get("stages"):
        L += ["hetsched stages while saturated (medians over rounds; ms per frame; compute: onnxruntime's run, "
              "predicted for the frames each worker served; decode: the workers' input decoding; busy: decode + "
              "compute over wall time; pred err: compute mean vs predicted):", "",
              table(stage_rows(h["stages"]), STAGE_HEADER), ""]
    u = t.get("hetsched_unloaded")
    if u:
        parts = "; ".join(f"stage {x['stage']}: transfer in {_fmt(x['transfer_in_ms'], 3)} + compute "
                          f"{_fmt(x['compute_ms'], 3)}" for x in u["stages"])
        L += [f"hetsched, one frame at a time (median ms): client-measured {_fmt(u['client_latency_ms'], 3)} = "
              f"client socket {_fmt(u['client_socket_ms'], 3)} + {parts} + "
              + ("the rest: image decode if any, the answer's way back to the client (direct lane: no coordinator "
                 "on the path) " if u.get("lane")
                 else "rest of the coordinator's path ")
              + f"{_fmt(u['coordinator_rest_ms'], 3)}.", ""]
    corr, fl, bg = t["correctness"], t["foreign_cpu_pct"], t["background_cpu_pct"]
    worst = ", ".join(f"{n} {_fmt(v)} %" for n, v in sorted(bg.get("max_by_contender", {}).items()))
    L += [f"Outputs: {'equal' if corr['ok'] else 'NOT equal'} to the unsplit model's (1-thread onnxruntime) within "
          f"{CORRECT_ATOL:g} on {corr['checked_frames']} frames (max |diff| {_fmt(corr['max_abs_diff'], 7)}). Idle "
          f"contenders used {_fmt(bg['mean'])} % CPU (mean; max {_fmt(bg['max'])} %; max by contender: "
          f"{worst or '-'}) while another one ran; "
          f"processes not started by the benchmark used {_fmt(fl['mean_pct'])} % CPU (mean; max "
          f"{_fmt(fl['max_pct'])} %), the hypervisor stole {_fmt(fl['steal_mean_pct'])} %.", ""]
    L += ["Targets (issue 12):", ""] + [f"- {x}" for x in targets_text(t)] + [""]
    return L


def format_report(result: dict) -> str:
    lines: list[str] = []
    for sc in result["scenarios"]:
        for kind, t in sc["traffic"].items():
            lines += ["", f"== {scenario_title(sc)}; traffic {kind}", ""]
            lines += _details(sc, kind, t, text_table)
        lines += [f"Note: {n}." for n in sc["notes"]]
    return "\n".join(lines)


HOW = [
    "- **Contenders**, the same model, frames, cores and emulation for all: **ort-all**: one onnxruntime "
    "session, `intra_op_num_threads` = every core, default spinning, pinned to those cores before the session "
    "exists. **ort-fastest-cluster**: the same on the fastest cluster only (not run with one cluster). "
    "**ort-replicas**: one single-threaded session per core, each pinned to its core, the next frame to "
    "whichever is free; {replicas}. For JPEG traffic every onnxruntime session also decodes and preprocesses "
    "its frame (the service's own `preprocess_encoded`). Their frames come from an in-process pool (no IPC).",
    "- **hetsched**: as a user runs it: `python -m hetsched start --config <scenario config> --bind "
    "ipc://<tmp>/s.sock` (the config without `speed`: the bench owns the emulation; HETSCHED_CACHE_DIR a fresh "
    "directory, so the service profiles the slowed cores itself; no planner hints), fed through the client "
    "socket by `hetsched.client.Client` + `hetsched.client.feed.feed` with shared-memory input slots "
    "(`Client.enable_shm`) when offered, window {window} (`hetsched feed`'s default).",
    "- **limit**: each core alone, one single-threaded pinned session doing the same work (model only for raw "
    "tensors; decode + preprocess + model for JPEG), back to back; the limit is the sum of the per-core rates "
    "(`hetsched.observe.metrics.limit_fps`).",
    "- **Throughput** (`metrics.throughput_fps`, the one definition): completions after the first divided by "
    "the time from the first completion to the last one before load stopped (fill and drain excluded); the "
    "median over rounds. Rounds alternate the contenders, the order rotated every round.",
    "- **Latency at the offered rate**: every contender gets the same rate, {load:.0%} x the limit, open loop "
    "(frame k due at t0 + k/f, latency from the due time, so queueing shows), in as many rounds as the "
    "saturated pass, interleaved with the other contenders (all see the same disturbances); percentiles "
    "over the frames of the rounds that sustained the rate. A contender whose throughput stays below 95 % "
    "of the offered rate (or that drops frames) in most rounds is reported as overloaded with its achieved "
    "rate, not with percentiles. Saturated latency: onnxruntime = the frame's run time; hetsched = send to "
    "reply with the feed window outstanding.",
    "- **CPU per frame**: CPU time of the contender's processes over its measured windows / frames (per thread "
    "from /proc/PID/task/*/schedstat, in ns; onnxruntime processes: their own getrusage). "
    "hetsched's budget: the coordinator = the `hetsched start` process (all threads); a worker's figure "
    "beyond onnxruntime = its CPU minus the CPU of its own runs (the workers' reported `compute_cpu_s`; if "
    "they report only wall `compute_s`, that x threads x the emulated core speed, marked estimated); the client "
    "= the feeding thread's `time.thread_time`. Worker and coordinator pids come from the service's `stats` "
    "reply (`hetsched.observe.snapshot.read_snapshot`).",
]


def write_markdown(result: dict, path: str) -> None:
    notes = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            old = fh.read()
        if NOTES_BEGIN in old and NOTES_END in old:
            notes = old[old.index(NOTES_BEGIN):old.index(NOTES_END) + len(NOTES_END)]
    m, s = result["machine"], result["settings"]
    heads = [headline(sc, kind, t) for sc in result["scenarios"] for kind, t in sc["traffic"].items()]
    L = ["# Benchmarks", "",
         "Generated by `hetsched bench` (this file is overwritten by every run; only the notes block between "
         "the `notes` markers is kept).", "",
         f"- **date**: {result['date']}", f"- **command**: `{result['command']}`",
         f"- **machine**: {m['cpu_model']}, {m['cores_online']} cores online, allowed {m['cores_allowed']}"
         f"{' (virtual machine)' if m['virtualized'] else ''}; kernel {m['kernel']}; Python {m['python']}; "
         f"onnxruntime {m['onnxruntime']}; numpy {m['numpy']}",
         f"- **settings**: traffic {', '.join(s['traffic'])}; {s['rounds']} rounds x {s['seconds']} s saturated per "
         f"contender (limit: per core), order rotated every round; then {s['rounds']} rounds x {s['fixed_seconds']} s per "
         f"contender at {s['load_fraction']:.0%} of the limit, open loop (a contender saturating below that rate "
         f"runs once); ort-replicas as {s['replicas']}; total "
         f"{result['wall_s']:.0f} s",
         "- **model**: " + ", ".join(sorted({sc["model"] for sc in result["scenarios"]})), "",
         "## Headline", ""] + [f"- {h}" for h in heads] + [
         "", "README headline (generated; paste into README.md):", "", "```markdown",
         f"Measured by `{result['command']}` on {m['cpu_model']} ({len(m['cores_allowed'])} cores), "
         f"{result['date'][:10]}:", ""] + [f"- {h}" for h in heads] + ["```", ""]
    for sc in result["scenarios"]:
        for kind, t in sc["traffic"].items():
            L += [f"## {scenario_title(sc)}; traffic {kind}", ""] + _details(sc, kind, t, md_table)
        L += [f"Note: {n}." for n in sc["notes"]] + ([""] if sc["notes"] else [])
    L += ["## How it is measured", ""] + [h.format(replicas=_replicas_text(s["replicas"]), window=s["window"],
                                                   load=s["load_fraction"]) for h in HOW] + [""]
    if notes:
        L += [notes, ""]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(L))


def _replicas_text(mode: str) -> str:
    if mode == "processes":
        return ("one process per core (the fair simplest alternative when each frame is decoded in Python: "
                "threads of one process would share the GIL for the decode and preprocessing glue), frames "
                "dealt through one pipe all of them read")
    return "one thread per core in one process (onnxruntime releases the GIL while it runs)"
