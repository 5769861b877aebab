"""``hetsched bench``: hetsched, through the user's own path, against the onnxruntime set-ups people
use today and against the machine's limit, for raw-tensor and JPEG traffic, in one run.

Contenders (same model, same frames, same cores, same emulation): ``ort-all`` (one session, every
core), ``ort-fastest-cluster`` (big cluster only), ``ort-replicas`` (one single-threaded pinned
session per core, next frame to whichever is free), ``hetsched`` (``hetsched start`` + the client
socket) and ``limit`` (each core alone, summed). Per scenario the emulation, the service and the
onnxruntime processes start once; per traffic kind the contenders alternate in rounds, then all are
offered the same rate open loop (see hetsched/bench/rounds.py). Figures: hetsched.observe.metrics.
Outputs: a terminal report, ``results/bench.json``, ``results/bench.png`` and ``BENCHMARKS.md``.

Library use: ``run_bench(BenchOptions(...))`` returns the JSON-able result dict.

Modules: options (settings, names), scenarios (clusters, service config), traffic (frames and
reference outputs), processes (children), contenders (driving each one), measuring (CPU, RSS,
foreign load), rounds (one scenario), figures (records -> figures, targets), report (text and
markdown), plot.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time

from hetsched.bench.options import BenchOptions
from hetsched.bench.plot import write_plot
from hetsched.bench.report import machine_info, write_markdown
from hetsched.bench.rounds import run_scenario
from hetsched.bench.scenarios import scenarios_from


def run_bench(opts: BenchOptions) -> dict:
    note = opts.progress or (lambda msg: None)
    t0 = time.monotonic()
    scenarios = scenarios_from(opts)
    result: dict = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "command": opts.command, "machine": machine_info(), "settings": opts.settings(),
                    "scenarios": []}
    for sc in scenarios:
        note(f"scenario {sc.name} ({sc.source}): " + ", ".join(
            f"{c.name} {list(c.cores)}" + (f" emulated at {c.emulated_speed}" if c.emulated_speed else "")
            for c in sc.clusters))
        result["scenarios"].append(run_scenario(sc, opts, note))
    result["wall_s"] = round(time.monotonic() - t0, 1)
    os.makedirs(opts.out, exist_ok=True)
    paths = {"json": os.path.join(opts.out, "bench.json"), "plot": os.path.join(opts.out, "bench.png")}
    with open(paths["json"], "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    write_plot(result, paths["plot"])
    if opts.md:
        write_markdown(result, opts.md)
        paths["markdown"] = opts.md
    result["paths"] = paths
    return result


def all_correct(result: dict) -> bool:
    return all(t["correctness"]["ok"] for sc in result["scenarios"] for t in sc["traffic"].values())
