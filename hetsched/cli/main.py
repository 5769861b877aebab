"""The ``hetsched`` command line. Only this module configures logging and prints."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence

from hetsched.errors import HetschedError

DEFAULT_CONFIG = "configs/big_little.yaml"
log = logging.getLogger("hetsched")


def eprint(*args: Any, **kw: Any) -> None:
    print(*args, file=sys.stderr, flush=True, **kw)


class StopFlag:
    """SIGINT/SIGTERM set the flag (graceful stop); a second signal forces the stop."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.count = 0

    def install(self) -> "StopFlag":
        def handler(signum, frame):
            self.count += 1
            self.event.set()
            if self.count == 1:
                eprint(f"\n{signal.Signals(signum).name}: draining and stopping (again to force)")
            else:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        return self

    def __call__(self) -> bool:
        return self.event.is_set()


def load_cfg(args: argparse.Namespace):
    from hetsched.config import Config, load_config
    path = getattr(args, "config", None)
    if path is None:
        path = DEFAULT_CONFIG if os.path.isfile(DEFAULT_CONFIG) else None
    cfg = load_config(path) if path else Config(little_speed=0.5)  # built-in default: big + emulated little
    if getattr(args, "model", None):
        cfg = cfg.with_overrides(model=os.path.abspath(args.model))
    if getattr(args, "no_cache", False):
        import dataclasses
        cfg = cfg.with_overrides(profile=dataclasses.replace(cfg.profile, cache=False))
    if getattr(args, "labels", None):
        import dataclasses
        cfg = cfg.with_overrides(input=dataclasses.replace(cfg.input, labels=os.path.abspath(args.labels)))
    if getattr(args, "input_shape", None):
        from hetsched.config import ModelInputConfig
        cfg = cfg.with_overrides(model_input=ModelInputConfig(parse_shape(args.input_shape)))
    return cfg


def parse_shape(text: str) -> tuple[int, ...]:
    """``1,3,224,224`` or ``1x3x224x224`` -> (1, 3, 224, 224); ConfigError naming --input-shape."""
    from hetsched.errors import ConfigError
    parts = text.replace("x", ",").replace(" ", "").strip("[]()").split(",")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise ConfigError(f"--input-shape: expected positive integers like 1,3,224,224, got {text!r}")
    return dims


def _progress(quiet: bool) -> Callable[[str], None]:
    return (lambda msg: None) if quiet else (lambda msg: eprint(f"  {msg}"))


# ---------------------------------------------------------------------------------- topology
def cmd_topology(args: argparse.Namespace) -> int:
    from hetsched.host.topology import detect_topology, format_topology
    if args.ray:
        return _topology_ray(args)
    topo = detect_topology(args.sysfs_root)
    if args.config:
        import dataclasses

        from hetsched.config import load_config, resolve_clusters
        clusters = resolve_clusters(load_config(args.config), topo)
        topo = dataclasses.replace(topo, clusters=tuple(clusters))
    if args.json:
        print(json.dumps(topo.to_dict(), indent=2))
    else:
        print(format_topology(topo))
    return 0


def _topology_ray(args: argparse.Namespace) -> int:
    """Every Ray node's clusters, as a task on each node detects them from its own sysfs."""
    from hetsched.host.topology import format_topology
    from hetsched.placement.ray_cluster import RayCluster
    address, node_ip = args.address, args.node_ip
    if args.config:
        from hetsched.config import load_config
        pl = load_config(args.config).placement
        address, node_ip = address or pl.address, node_ip or pl.node_ip
    ray = RayCluster(address or "auto", node_ip)
    try:
        if not ray.nodes:
            eprint("no Ray node declares a hetsched_node_<name> resource (ray start --resources "
                   "'{\"hetsched_node_NAME\": 1}')")
            return 1
        topos = ray.topologies()
        if args.json:
            print(json.dumps({"coordinator_ip": ray.home_ip,
                              "nodes": [dict(t.to_dict(), ip=ray.nodes[n].ip) for n, t in sorted(topos.items())]},
                             indent=2))
            return 0
        for name, t in sorted(topos.items()):
            node = ray.nodes[name]
            here = " (this coordinator's node)" if ray.home is not None and ray.home.node_id == node.node_id else ""
            print(f"node {name}{here}: {node.ip}, host {t.hostname}, raylet CPU set {list(t.allowed)}")
            print("  " + format_topology(t.topology).replace("\n", "\n  "))
        return 0
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------------- plan
def plan_report(prep) -> str:
    from hetsched.model.graph import layer_table
    from hetsched.planning.planner import format_plan
    lines = []
    nodes = prep.placement.describe()["clusters"] if prep.placement is not None else {}
    for c in prep.clusters:
        emu = f"  EMULATED: delivers {c.emulated_speed:.0%} of its cycles" if c.emulated_speed else ""
        where = f"  on node {nodes[c.name]['node']} ({nodes[c.name]['ip']}, {nodes[c.name]['link']})" \
            if c.name in nodes else ""
        lines.append(f"cluster {c.name:<8} cores {list(c.cores)}{where}{emu}")
    lines.append("")
    lines.append(format_plan(prep.plan))
    if prep.measurements:
        from hetsched.observe.metrics import ENCODED, RAW
        limit = f"limit (sum of each core's standalone single-thread rate): {prep.limit_fps(RAW):.1f} frames/s raw tensors"
        if prep.with_preprocess and prep.limit_fps(ENCODED):
            limit += f", {prep.limit_fps(ENCODED):.1f} frames/s JPEG (decode + preprocess + model)"
        lines.append(limit)
    for w in prep.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    from hetsched.runtime.service import emulation, encoded_share, local_clusters, placement_for, prepare
    cfg = load_cfg(args)
    with placement_for(cfg) as (clusters, placement), \
            emulation(local_clusters(clusters, placement), cfg.emulation_period_ms, _progress(args.json)):
        prep = prepare(cfg, progress=_progress(args.json), clusters=clusters, with_preprocess=True,
                       encoded_share=encoded_share(cfg, args.preprocess), placement=placement)
    if args.json:
        out = prep.plan.to_dict()
        out["clusters"] = [c.to_dict() for c in prep.clusters]
        out["limit_fps"] = prep.limit_fps()
        out["layers"] = [{"index": l.index, "name": l.name, "flops": l.flops, "params": l.params}
                         for l in prep.graph.layers]
        out["shape_source"] = prep.graph.shape_source
        out["input_shape"] = [list(t.shape) for t in prep.graph.inputs]
        print(json.dumps(out, indent=2))
    else:
        print(plan_report(prep))
        if args.layers:
            from hetsched.model.graph import layer_table
            g = prep.graph
            print(f"\nmodel inputs {', '.join(f'{t.name} {list(t.shape)} {t.dtype}' for t in g.inputs)}; "
                  f"outputs {', '.join(f'{t.name} {list(t.shape)}' for t in g.outputs)}")
            print(g.shape_detail or f"shapes resolved by {g.shape_source}")
            print("\n".join(layer_table(g)))
    return 0


# ---------------------------------------------------------------------------------- start / demo
def _serve(args: argparse.Namespace, demo: Callable | None, finish: Callable | None = None,
           with_preprocess: bool = True) -> int:
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
                       encoded_share=encoded_share(cfg), placement=placement)
        print(plan_report(prep), flush=True)
        bind = args.bind or (cfg.server.bind if demo is None else f"ipc://{_tmp_socket()}")
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
                (finish or _print_demo)(result, prep, server)
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


def _tmp_socket() -> str:
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


def demo_frames(n_images: int = 8):
    """A built-in set of frames: synthetic JPEG images (so the demo needs no files)."""
    import io

    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    frames = []
    for i in range(n_images):
        h, w = 360 + 40 * (i % 3), 480 + 40 * (i % 4)
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * (i + 1)) % 256, (yy * (i + 2)) % 256, ((xx + yy) * 3) % 256], -1)
        img = (img + rng.integers(0, 30, img.shape)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        frames.append((f"synthetic-{i}.jpg", buf.getvalue()))
    return frames


def _demo_client(n_frames: int) -> Callable:
    def run(endpoint: str, prep, result: dict, stop) -> None:
        from hetsched.client import Client
        from hetsched.observe import metrics
        from hetsched.observe.recording import record_run
        from hetsched.observe.report import predicted_overheads
        try:
            frames = demo_frames()
            window = 2 * sum(s.replicas for s in prep.plan.stages) + 2
            replies: list[dict] = []
            with Client(endpoint, timeout=60) as c:
                # the demo's frames are JPEG photos: its limit counts decode + preprocess + model per core
                run, _ = record_run(c, iter(frames * (n_frames // len(frames) + 1)), count=n_frames,
                                        window=window, stream="demo", traffic=metrics.ENCODED,
                                        core_rates_fps=metrics.core_rates_fps(prep.measurements, metrics.ENCODED),
                                        predicted_overhead_ms=predicted_overheads(prep.costs, prep.measurements),
                                        should_stop=stop, on_result=lambda name, rep: replies.append(rep))
            result.update(demo_result(run, replies, [n for n, _ in frames]))
        except Exception as exc:  # reported by the main thread
            result["error"] = f"{type(exc).__name__}: {exc}"
    return run


def demo_result(run, replies: list[dict], names: list[str]) -> dict:
    """What the demo prints, from its recorded window: the replies and the report (every figure by
    hetsched.observe.metrics through build_report)."""
    from hetsched.observe.report import build_report
    report = build_report(run)
    return {"replies": replies, "names": names, "seconds": report["pipeline"]["window_s"], "received": run.received,
            "report": report}


def _print_demo(result: dict, prep, server) -> None:
    from hetsched.observe.report import format_report
    reps = result.get("replies", [])
    if not reps:
        return
    names = result["names"]
    ok = [r for r in reps if r["type"] == "result"]
    print("\nresults (first frame of each built-in image; the built-in weights are synthetic, so the classes "
          "are arbitrary;\nuse --model ../shared/models/squeezenet1.1.onnx --labels ... for real predictions):")
    for r in ok[:len(names)]:
        top = r["top_k"][0]
        label = f" {top['label']}" if top.get("label") else ""
        print(f"  {names[r['seq'] % len(names)]:<18} top-1 class {top['index']:>4}{label}  score {top['score']:.3f}"
              f"  latency {r['latency_ms']:.1f} ms")
    print(f"\nstreamed {result['received']} frames through the client socket in {result['seconds']:.2f} s; "
          f"errors {len(reps) - len(ok)}\n")
    print(format_report(result["report"]))


def cmd_start(args: argparse.Namespace) -> int:
    return _serve(args, None)


def cmd_demo(args: argparse.Namespace) -> int:
    return _serve(args, _demo_client(args.frames))


# ---------------------------------------------------------------------------------- emulate
def cmd_emulate(args: argparse.Namespace) -> int:
    from hetsched.host.emulation import EmulatedCore, Emulator
    stop = StopFlag().install()
    cores = [EmulatedCore(c, args.speed) for c in args.cores]
    with Emulator(cores) as emu:
        eprint(f"emulating: cores {args.cores} deliver {args.speed:.0%} of their cycles "
               f"(co-runner pids {emu.pids}); Ctrl+C to stop")
        t_end = time.monotonic() + args.duration if args.duration else None
        while not stop() and (t_end is None or time.monotonic() < t_end):
            stop.event.wait(0.2)
    eprint("emulation stopped; co-runners reaped")
    return 0


# ---------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetsched", description="Pipeline CNN inference across heterogeneous CPU clusters")
    p.add_argument("-v", "--verbose", action="count", default=0)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, model=True):
        sp.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG} if present, else built-in)")
        if model:
            sp.add_argument("--model", help="ONNX model path (overrides the config's model)")
            sp.add_argument("--no-cache", action="store_true", help="re-measure layer costs instead of using the cache")

    sp = sub.add_parser("topology", help="show this host's CPU clusters (--ray: every Ray node's)")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--sysfs-root", default="/sys")
    sp.add_argument("--config", help="also apply a config's cluster settings (emulation); with --ray: its "
                                     "placement.address and node_ip")
    sp.add_argument("--ray", action="store_true",
                    help="list the clusters of every Ray node with a hetsched_node_<name> resource, each detected "
                         "on its node (a Ray task there reads its sysfs)")
    sp.add_argument("--address", help="with --ray: the Ray cluster (default: the config's placement.address, auto)")
    sp.add_argument("--node-ip", help="with --ray: this host's address in the Ray cluster")
    sp.set_defaults(func=cmd_topology)

    sp = sub.add_parser("plan", help="profile the model on each cluster and show the stage plan")
    common(sp)
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--layers", action="store_true",
                    help="also list the layers between cut points and how the tensor shapes were found")
    sp.add_argument("--input-shape", metavar="DIMS",
                    help="model input shape, e.g. 1,3,320,320: fixes symbolic dims (overrides model_input.shape)")
    sp.add_argument("--preprocess", action="store_true", help="plan for JPEG/PNG traffic (decoding in stage 0)")
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser("start", help="run the pipeline service until Ctrl+C")
    common(sp)
    sp.add_argument("--bind", help="client socket address (default: the config's server.bind)")
    sp.add_argument("--labels", help="class label file (one per line)")
    sp.add_argument("--drain-timeout", type=float, default=10.0)
    sp.add_argument("--metrics-port", type=int, default=None,
                    help="serve Prometheus /metrics on this port (loopback; server.metrics_host to change)")
    sp.set_defaults(func=cmd_start)

    sp = sub.add_parser("demo", help="start the service, stream built-in frames through it, report, stop")
    common(sp)
    sp.add_argument("--frames", type=int, default=400)
    sp.add_argument("--bind", help="client socket address (default: a private ipc:// socket)")
    sp.add_argument("--labels", help="class label file")
    sp.add_argument("--drain-timeout", type=float, default=10.0)
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("emulate", help="make cores deliver a fraction of their cycles (until Ctrl+C)")
    sp.add_argument("--cores", type=int, nargs="+", required=True)
    sp.add_argument("--speed", type=float, required=True)
    sp.add_argument("--duration", type=float, default=None)
    sp.set_defaults(func=cmd_emulate)

    for extra in _extra_commands():
        extra(sub, common)
    return p


def _extra_commands() -> list:
    out = []
    for mod in ("hetsched.cli.feed", "hetsched.cli.profile", "hetsched.cli.bench", "hetsched.cli.keys"):
        try:
            m = __import__(mod, fromlist=["add_parser"])
        except ImportError:
            continue
        out.append(m.add_parser)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except HetschedError as exc:
        eprint(f"hetsched: error: {exc}")
        return 2
    except KeyboardInterrupt:
        eprint("hetsched: forced stop")
        return 130


if __name__ == "__main__":
    sys.exit(main())
