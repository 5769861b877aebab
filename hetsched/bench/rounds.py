"""One scenario of ``hetsched bench``: start the emulation, the hetsched service (``hetsched start``)
and the onnxruntime contenders once; then, per traffic kind, alternate the contenders in rounds (the
order rotates every round, so machine drift hits all alike), each saturated for ``seconds``, the
limit measured core by core in the same rounds; then offer every contender the same rate
(``load_fraction`` x the limit) open loop; then hetsched one frame at a time."""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from hetsched.bench import figures
from hetsched.bench.contenders import HetschedContender, OrtContender, Slot
from hetsched.bench.measuring import ForeignLoad, RssSampler, cpu_of
from hetsched.bench.options import CORRECT_ATOL, BenchOptions, Progress
from hetsched.bench.processes import ServiceProc
from hetsched.bench.scenarios import Scenario, ort_specs
from hetsched.bench.traffic import Traffic, make_traffic, model_io
from hetsched.observe import metrics


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


def run_scenario(sc: Scenario, opts: BenchOptions, note: Progress) -> dict:
    import yaml

    from hetsched.client import Client
    from hetsched.model.graph import load_model
    from hetsched.runtime.service import emulation

    tmp = tempfile.mkdtemp(prefix="hetsched-bench-")
    model_bytes = load_model(sc.cfg.model).SerializeToString()
    model_path = os.path.join(tmp, "model.onnx")
    with open(model_path, "wb") as fh:
        fh.write(model_bytes)
    traffics = {kind: make_traffic(kind, model_bytes, sc.cfg.input, opts, tmp) for kind in opts.traffic}
    input_name = model_io(model_bytes)[0]
    spec: dict = {"model_path": model_path, "input_name": input_name, "warmup": 3}
    if "raw" in traffics:
        spec["raw_inputs"] = os.path.join(tmp, "inputs.npy")
        np.save(spec["raw_inputs"], np.stack(traffics["raw"].payloads))
    if "jpeg" in traffics:
        spec.update(jpeg_files=traffics["jpeg"].files, input_cfg=dataclasses.asdict(sc.cfg.input))
    svc_raw = sc.service_raw(opts.profile_repeats if opts.quick else None)
    svc_cfg = os.path.join(tmp, "service.yaml")
    with open(svc_cfg, "w", encoding="utf-8") as fh:
        yaml.safe_dump(svc_raw, fh)
    specs = ort_specs(sc, opts.replicas)
    res: dict = {"name": sc.name, "source": sc.source, "model": sc.cfg.model,
                 "clusters": [{"name": c.name, "cores": list(c.cores), "emulated_speed": c.emulated_speed}
                              for c in sc.clusters],
                 "emulated": {str(k): v for k, v in sc.emulated.items()}, "fastest_cluster": sc.fastest_cluster().name,
                 "ort_specs": specs, "replicas_mode": opts.replicas, "service_config": svc_raw, "notes": [],
                 "traffic": {}}
    if not specs["ort-fastest-cluster"]:
        res["notes"].append("one cluster: ort-fastest-cluster would be ort-all again, not run")
    orts: dict[str, OrtContender] = {}
    service = None
    sampler = RssSampler()
    ok = False
    try:
        with emulation(sc.clusters, sc.cfg.emulation_period_ms, note):
            note(f"[{sc.name}] hetsched start --config {svc_cfg} (fresh cost cache: the service profiles the cores)")
            service = ServiceProc(svc_cfg, tmp)
            t0 = time.monotonic()
            service.wait_ready()
            res["service_start_s"] = _r(time.monotonic() - t0, 1)
            for name in figures.ort_names(specs):
                note(f"[{sc.name}] starting {name}: " + "; ".join(
                    ", ".join(f"cores {s['cores']} x{s['threads']}" for s in proc) for proc in specs[name]))
                orts[name] = OrtContender(name, specs[name], spec, tmp)
            for o in orts.values():  # started together, warm when this returns
                o.wait_ready()
            with Client(service.endpoint, timeout=60) as client:
                shm = bool(opts.shm and client.enable_shm(opts.window + 2))  # as `hetsched feed` does
                from hetsched.host.process import quiet_garbage_collector
                quiet_garbage_collector()  # as `hetsched feed` does
                het = HetschedContender(service, client, opts.window, sc.speed)
                plan = het.plan
                res.update(plan=plan, predicted_fps=plan.get("throughput_fps"), window=opts.window,
                           hetsched_input="shared-memory slots" if shm else "tensor over the socket")
                note(f"[{sc.name}] plan: {len(plan['stages'])} stage(s), predicted "
                     f"{plan.get('throughput_fps', 0):.1f} fps; client input: {res['hetsched_input']}")
                for kind, traffic in traffics.items():
                    res["traffic"][kind] = run_traffic(sc, opts, traffic, het, orts, sampler, note)
        ok = True
    finally:
        sampler.close()
        for name, p in list(orts.items()) + ([("hetsched", service)] if service else []):
            try:
                p.stop()
            except Exception as exc:  # keep stopping the others
                note(f"[{sc.name}] stopping {name}: {exc}")
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            note(f"[{sc.name}] logs kept in {tmp}")
    for kind, t in res["traffic"].items():
        t["targets"] = figures.evaluate_targets(t, bool(sc.emulated))
    return res


def run_traffic(sc: Scenario, opts: BenchOptions, traffic: Traffic, het: HetschedContender,
                orts: dict[str, OrtContender], sampler: RssSampler, note: Progress) -> dict:
    kind, tag = traffic.kind, f"[{sc.name}/{traffic.kind}]"
    out: dict = {"kind": kind, "source": traffic.source, "notes": []}
    checks = het.check(traffic)
    # warm-up (not measured): every session and the whole pipeline, under the scenario's emulation
    for o in orts.values():
        o.saturate(kind, opts.warmup_seconds)
    het.saturate(traffic, opts.warmup_seconds * 2, "warmup")

    replicas = orts["ort-replicas"]
    names = list(orts) + ["hetsched", "limit"]
    pids = {n: o.pids for n, o in orts.items()}
    pids["hetsched"] = het.pids
    pids["limit"] = replicas.pids
    sat: dict[str, list[Slot]] = {n: [] for n in names}
    per_core: dict[int, list[Slot]] = {c: [] for c in sc.cores}
    rss: dict[str, float] = {n: 0.0 for n in names}
    background: list[float] = []  # CPU % of the idle contenders while another one runs (sanity check)
    by_name: dict[str, float] = {}  # ... the most each idle contender used in one slot
    foreign = ForeignLoad()       # CPU % of processes that are not ours (other users) while a slot runs

    def slot(name: str, r: int) -> None:
        own = pids[name]
        groups = {n: ps for n, ps in pids.items() if n != name and not set(ps) & set(own)}  # limit = the replicas
        others = [p for ps in groups.values() for p in ps]
        b0 = cpu_of(others)
        t0 = time.monotonic()
        sampler.begin(own)
        foreign.begin()
        if name == "limit":
            for i, core in enumerate(sc.cores):
                per_core[core].append(replicas.saturate(kind, opts.seconds, session=i))
            fps = sum(metrics.throughput_fps(per_core[c][-1].done_t, per_core[c][-1].t_end) for c in sc.cores)
        elif name == "hetsched":
            sat[name].append(het.saturate(traffic, opts.seconds, f"sat{r}"))
            fps = metrics.throughput_fps(sat[name][-1].done_t, sat[name][-1].t_end)
        else:
            sat[name].append(orts[name].saturate(kind, opts.seconds))
            fps = metrics.throughput_fps(sat[name][-1].done_t, sat[name][-1].t_end)
        rss[name] = max(rss[name], sampler.end())
        fl = foreign.end()
        wall = time.monotonic() - t0
        b1 = cpu_of(others)
        if others and wall > 0:
            background.append(100.0 * sum(b1[p] - b0[p] for p in others) / wall)
            for n, ps in groups.items():
                by_name[n] = max(by_name.get(n, 0.0), 100.0 * sum(b1[p] - b0[p] for p in ps) / wall)
        note(f"{tag} round {r + 1}/{opts.rounds}  {name:<20} {fps:8.1f} fps"
             + (f"   WARNING: other processes used {fl:.0f}% CPU meanwhile" if fl > 10 else ""))

    for r in range(opts.rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            slot(name, r)

    c: dict[str, dict] = {n: figures.ort_saturated(sat[n], rss[n]) for n in orts}
    c["limit"] = figures.limit_figures(per_core)
    c["limit"]["peak_rss_mb"] = _r(rss["limit"], 1)
    core_rates = {int(k): v for k, v in c["limit"]["per_core_fps"].items()}
    c["hetsched"] = figures.hetsched_saturated(sat["hetsched"], core_rates, rss["hetsched"])
    figures.compare(c)
    out["contenders"] = c

    # the same offered rate for every contender: load_fraction x the limit, open loop
    rate = opts.load_fraction * (c["limit"]["fps"] or 0.0)
    out["offered_fps"] = _r(rate)
    fixed_checks: list[float] = []
    if rate > 0:
        # in rounds, the order rotated, so that hetsched and the replicas see the same disturbances; a
        # contender whose saturated rate is below the offered one runs once (it can only overload)
        lat_names = list(orts) + ["hetsched"]
        runs: dict[str, list[Slot]] = {n: [] for n in lat_names}
        for r in range(opts.rounds):
            k = (r + opts.rounds) % len(lat_names)
            for name in lat_names[k:] + lat_names[:k]:
                if runs[name] and (c[name]["fps"] or 0.0) < metrics.SUSTAIN_TOLERANCE * rate:
                    continue
                foreign.begin()
                if name == "hetsched":
                    s = het.fixed(traffic, rate, opts.fixed_seconds, opts.check_every)
                    fixed_checks += s.extra["checks"]
                else:
                    s = orts[name].fixed(kind, rate, opts.fixed_seconds)
                foreign.end()
                runs[name].append(s)
                f = figures.offered([s], rate)
                note(f"{tag} round {r + 1}/{opts.rounds} {rate:7.1f} fps offered  {name:<20} " + (
                    f"OVERLOADED (achieved {f['achieved_fps']:.1f} fps)" if f["overloaded"]
                    else f"p50 {f['p50_ms']} ms  p99 {f['p99_ms']} ms"))
        for name in lat_names:
            c[name]["fixed"] = f = figures.offered(runs[name], rate)
            if not f["overloaded"]:
                note(f"{tag} {rate:7.1f} fps offered  {name:<20} over {f['runs'] - f['overloaded_runs']} of "
                     f"{f['runs']} rounds ({f['frames']} frames): p50 {f['p50_ms']} ms  p99 {f['p99_ms']} ms")
    out["hetsched_unloaded"] = het.unloaded(traffic, max(0.5, opts.fixed_seconds / 2))

    diffs = checks + fixed_checks
    out["correctness"] = {"checked_frames": len(diffs), "max_abs_diff": max(diffs) if diffs else None,
                          "ok": bool(diffs) and max(diffs) <= CORRECT_ATOL, "atol": CORRECT_ATOL}
    out["foreign_cpu_pct"] = foreign.summary()
    out["background_cpu_pct"] = {"mean": _r(statistics.fmean(background), 1) if background else None,
                                 "max": _r(max(background), 1) if background else None,
                                 "max_by_contender": {n: _r(v, 1) for n, v in by_name.items()}}
    return out
