"""``hetsched start``: run the pipeline service until Ctrl+C (and the serving loop the demo and
``profile`` share)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
from typing import Callable

from hetsched.cli.common import StopFlag, eprint, load_cfg, progress_printer as _progress
from hetsched.cli.plan import plan_report


# ---------------------------------------------------------------------------------- start / demo
def serve(args: argparse.Namespace, demo: Callable | None, finish: Callable | None = None,
          with_preprocess: bool = True, encoded: bool = False) -> int:
    """Prepare and run the service. With ``demo`` (a driver run in a thread as
    demo(endpoint, prep, result, stop)), stop when it returns and call finish(result, prep, server)."""
    from hetsched.runtime.service import (emulation, encoded_share, local_clusters, pin_coordinator, placement_for,
                                          prepare, running_service)

    stop = StopFlag().install()
    cfg = load_cfg(args)
    progress = _progress(False)
    eprint("hetsched: preparing")
    with placement_for(cfg) as (clusters, placement), \
            emulation(local_clusters(clusters, placement), cfg.emulation_period_ms, progress):
        # the coordinator's own per-frame work goes to the fastest cores (the planner charges it there)
        home = pin_coordinator(local_clusters(clusters, placement))
        prep = prepare(cfg, progress=progress, clusters=clusters, with_preprocess=with_preprocess,
                       encoded_share=encoded_share(cfg, encoded), placement=placement)
        print(plan_report(prep), flush=True)
        bind = args.bind or (cfg.server.bind if demo is None else f"ipc://{tmp_socket()}")
        with running_service(prep, bind) as server, metrics_exporter(args, cfg, server) as exporter:
            eprint(f"hetsched: serving on {server.endpoint} "
                   f"({len(server.pipe.workers)} workers; coordinator on cores {list(home)}; Ctrl+C to stop)")
            if exporter is not None:
                eprint(f"hetsched: Prometheus metrics on {exporter.url}")
            result: dict = {}
            if demo is not None:
                th = threading.Thread(target=demo, args=(server.endpoint, prep, result, stop), daemon=True)
                th.start()
                should_stop = lambda: stop() or not th.is_alive()  # noqa: E731
            else:
                should_stop = stop
            tick = None if demo is not None else _status_ticker()
            server.serve(should_stop, on_tick=tick, drain_timeout=args.drain_timeout)
            if demo is not None:
                th.join(5)
                if finish is not None:
                    finish(result, prep, server)
                if result.get("error"):
                    eprint(f"demo failed: {result['error']}")
                    return 1
    eprint("hetsched: stopped")
    return 0


@contextlib.contextmanager
def metrics_exporter(args: argparse.Namespace, cfg, server):
    """/metrics for Prometheus when ``--metrics-port`` or ``server.metrics_port`` asks for it."""
    port = getattr(args, "metrics_port", None)
    port = cfg.server.metrics_port if port is None else port
    if port is None:
        yield None
        return
    from hetsched.observe.prometheus import MetricsExporter
    exporter = MetricsExporter(server.metrics, host=cfg.server.metrics_host, port=port).start()
    try:
        yield exporter
    finally:
        exporter.stop()


def tmp_socket() -> str:
    import tempfile
    return os.path.join(tempfile.mkdtemp(prefix="hetsched-demo-"), "client")


def _status_ticker() -> Callable:
    """A one-line live status on stderr (utilisation over the last interval, the plan generation)."""
    from hetsched.observe.tables import stage_status
    last: dict = {}

    def tick(server) -> None:
        snap = server.snapshot(samples=200)
        rows = stage_status(snap, last.get("snap"))
        last["snap"] = snap
        rates = " ".join(f"s{r['stage']}:{r['frames']}f/{r['utilization']:.0%}" for r in rows)
        gen = (snap.get("replan") or {}).get("generation", 0)
        eprint(f"\r  up {snap['uptime_s']:.0f}s  plan {gen}  completed {snap['completed']}  errors {snap['errors']}  "
               f"busy {snap['busy']}  queue {snap['queue']['pending']}+{snap['queue']['in_flight']}  {rates}   ",
               end="" if sys.stderr.isatty() else "\n")
    return tick


def cmd_start(args: argparse.Namespace) -> int:
    return serve(args, None)


def add_parser(sub, common) -> None:
    sp = sub.add_parser("start", help="run the pipeline service until Ctrl+C")
    common(sp)
    sp.add_argument("--bind", help="client socket address (default: the config's server.bind)")
    sp.add_argument("--labels", help="class label file (one per line)")
    sp.add_argument("--drain-timeout", type=float, default=10.0)
    sp.add_argument("--metrics-port", type=int, default=None,
                    help="serve Prometheus /metrics on this port (loopback; server.metrics_host to change)")
    sp.set_defaults(func=cmd_start)
