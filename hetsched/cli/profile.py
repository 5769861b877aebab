"""``hetsched profile`` (drive load, report stage balance, write report.json/trace.json/balance.png)
and ``hetsched status`` (live view of a running service)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def drive_and_measure(endpoint: str, *, duration: float, fps: float | None, warmup: float, window: int,
                      images: list[str] | None, stop, prep=None, progress=None,
                      server_key: str | None = None, client_key: str | None = None) -> dict:
    """Connect, warm up, record a measured window of ``duration`` s, fetch the trace; return
    {"report": ..., "trace": ...}. ``prep`` (the local service's Prepared) gives the limit for the
    traffic fed (JPEG files or raw tensors) and the planner's overheads; None (``--connect``): unknown."""
    from hetsched.client import Client
    from hetsched.client.feed import feed, file_frames, image_files, synthetic_frames
    from hetsched.observe import metrics
    from hetsched.observe.recording import record_run
    from hetsched.observe.report import build_report, predicted_overheads

    traffic = metrics.ENCODED if images else metrics.RAW
    with Client(endpoint, timeout=30, server_public_key=server_key, client_secret_key_file=client_key) as c:
        hello = c.hello()
        inp = hello["input"]
        if not images and endpoint.startswith("ipc://"):
            c.enable_shm(window + 4)  # same host: tensors through shared memory, as a local client would

        def frames():
            if images:
                return file_frames(image_files(images), loop=True)
            return synthetic_frames(tuple(inp["shape"]), inp["dtype"])

        if warmup > 0:
            feed(c, frames(), fps=fps, duration=warmup, count=None, window=window, stream="warmup",
                 should_stop=stop)
        run, _ = record_run(c, frames(), fps=fps, duration=duration, window=window, stream="profile",
                            traffic=traffic, should_stop=stop, on_progress=progress,
                            core_rates_fps=metrics.core_rates_fps(prep.measurements, traffic) if prep else None,
                            predicted_overhead_ms=predicted_overheads(prep.costs, prep.measurements) if prep else None)
        trace = c.trace(2000)
    return {"report": build_report(run), "trace": trace}


def write_outputs(out_dir: str, result: dict, extra: dict) -> list[str]:
    from hetsched.observe.plots import balance_png
    from hetsched.observe.report import chrome_trace
    os.makedirs(out_dir, exist_ok=True)
    report = {**result["report"], **extra}
    paths = [os.path.join(out_dir, n) for n in ("report.json", "trace.json", "balance.png")]
    with open(paths[0], "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    with open(paths[1], "w", encoding="utf-8") as fh:
        json.dump(chrome_trace(result["trace"], result["report"]), fh)
    balance_png(result["report"], result["trace"], paths[2])
    return paths


def cmd_profile(args: argparse.Namespace) -> int:
    from hetsched.cli.common import StopFlag, eprint
    from hetsched.cli.serve import serve
    from hetsched.observe.report import format_report

    images = args.images
    tty = sys.stderr.isatty()

    def progress(stats):
        if tty:
            eprint("\r  " + stats.line() + "   ", end="")

    if args.connect:
        stop = StopFlag().install()
        result = drive_and_measure(args.connect, duration=args.duration, fps=args.fps, warmup=args.warmup,
                                   window=args.window, images=images, stop=stop, progress=progress,
                                   server_key=args.server_key, client_key=args.client_key)
        print(format_report(result["report"]))
        for p in write_outputs(args.out, result, {"connect": args.connect}):
            print(f"wrote {p}")
        return 0

    def driver(endpoint, prep, result, stop):
        try:
            result.update(drive_and_measure(endpoint, duration=args.duration, fps=args.fps, warmup=args.warmup,
                                            window=args.window, images=images, stop=stop, prep=prep,
                                            progress=progress))
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"

    def finish(result, prep, server):
        if "report" not in result:
            return
        if tty:
            eprint("")
        print("\n" + format_report(result["report"]))
        extra = {"config": prep.config.path, "model": prep.config.model,
                 "clusters": [c.to_dict() for c in prep.clusters],
                 "measured_costs": [m.to_dict() for m in prep.measurements]}
        for p in write_outputs(args.out, result, extra):
            print(f"wrote {p}")

    args.no_replan = not args.replan
    return serve(args, driver, finish, with_preprocess=True, encoded=bool(images))


def cmd_status(args: argparse.Namespace) -> int:
    from hetsched.cli.common import StopFlag
    from hetsched.client import Client
    from hetsched.observe.tables import format_stage_table, stage_status
    from hetsched.cli.keys import client_key_options
    stop = StopFlag().install()
    with Client(args.connect, timeout=args.timeout, **client_key_options(args)) as c:
        if args.json:
            snap = c.stats()
            for s in snap["stages"]:
                s.pop("samples_ms", None)
            print(json.dumps(snap, indent=2))
            return 0
        prev = None
        while not stop():
            snap = c.stats()
            lines = [f"hetsched status  {args.connect}  up {snap['uptime_s']:.0f} s  workers {snap['workers']}  "
                     f"clients {snap['clients']}",
                     f"completed {snap['completed']}  errors {snap['errors']}  busy {snap['busy']}  "
                     f"queue pending {snap['queue']['pending']} in flight {snap['queue']['in_flight']}"]
            sup = snap.get("supervision", {})
            health = "DEGRADED (workers crash on start)" if sup.get("degraded") else (
                "recovering" if sup.get("recovering") else "ok")
            lines.append(f"health {health}  restarts {sup.get('restarts', 0)}  replayed {sup.get('replayed', 0)}")
            if prev is not None:
                dt = snap["uptime_s"] - prev["uptime_s"]
                rate = (snap["completed"] - prev["completed"]) / dt if dt > 0 else 0.0
                lines.append(f"rate {rate:.1f} frames/s")
            lines.append(format_stage_table(stage_status(snap, prev)))
            if sys.stdout.isatty():
                sys.stdout.write("\x1b[2J\x1b[H")
            print("\n".join(lines), flush=True)
            prev = snap
            if args.once:
                break
            stop.event.wait(args.interval)
    return 0


def add_parser(sub, common) -> None:
    from hetsched.cli.keys import add_client_key_arguments
    sp = sub.add_parser("profile", help="drive load and report stage balance, predicted vs measured")
    common(sp)
    sp.add_argument("--connect", help="attach to a running service instead of starting one")
    sp.add_argument("--duration", type=float, default=20.0, help="seconds of measured load")
    sp.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    sp.add_argument("--fps", type=float, default=None, help="offered load (default: saturate)")
    sp.add_argument("--window", type=int, default=8, help="frames in flight from the load generator")
    sp.add_argument("--images", nargs="+", help="feed these images (default: synthetic raw tensors)")
    sp.add_argument("--out", default="prof", help="directory for report.json, trace.json, balance.png")
    sp.add_argument("--bind", help="client socket (default: a private ipc:// socket)")
    sp.add_argument("--labels", help=argparse.SUPPRESS)
    sp.add_argument("--drain-timeout", type=float, default=10.0)
    sp.add_argument("--replan", action="store_true",
                    help="let the service re-plan while it is measured (default: the plan it printed is held, "
                         "so the report measures that plan; a drifting core shows as prediction error)")
    add_client_key_arguments(sp)
    sp.set_defaults(func=cmd_profile)

    sp = sub.add_parser("status", help="live view of a running service")
    sp.add_argument("--connect", default="tcp://127.0.0.1:5555")
    sp.add_argument("--json", action="store_true", help="print one snapshot as JSON")
    sp.add_argument("--once", action="store_true", help="print one table and exit")
    sp.add_argument("--interval", type=float, default=1.0)
    sp.add_argument("--timeout", type=float, default=10.0)
    add_client_key_arguments(sp)
    sp.set_defaults(func=cmd_status)
