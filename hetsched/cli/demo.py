"""``hetsched demo``: start the service, stream built-in frames through it, report, stop."""

from __future__ import annotations

import argparse
from typing import Callable

from hetsched.cli.serve import serve


def demo_frames(n_images: int = 8):
    """A built-in set of frames: synthetic camera-size JPEGs (so the demo needs no files), of the
    same size and kind as the image the profiler times decoding on (the limit then counts the
    demo's real work)."""
    from hetsched.model.samples import sample_jpeg
    return [(f"synthetic-{i}.jpg", sample_jpeg(seed=i)) for i in range(n_images)]


def _demo_client(n_frames: int) -> Callable:
    """The demo's driver: a client in a process of its own (like any client of the service: in the
    service's process it would share the coordinator's interpreter lock and cores), recording one
    window with hetsched.observe.recording.record_run; its results come back through a queue."""
    def run(endpoint: str, prep, result: dict, stop) -> None:
        import multiprocessing as mp
        import queue as queue_mod

        from hetsched.observe import metrics
        from hetsched.observe.report import predicted_overheads
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        window = 2 * sum(s.replicas for s in prep.plan.stages) + 2
        args = (endpoint, n_frames, window, metrics.core_rates_fps(prep.measurements, metrics.ENCODED),
                predicted_overheads(prep.costs, prep.measurements), q)
        proc = ctx.Process(target=_demo_feeder, args=args, name="hetsched-demo-client", daemon=True)
        proc.start()
        try:
            while True:
                if stop():
                    result["error"] = "stopped"
                    return
                try:
                    kind, payload = q.get(timeout=0.2)
                    break
                except queue_mod.Empty:
                    if not proc.is_alive():
                        result["error"] = f"the demo's client exited with code {proc.exitcode}"
                        return
            if kind == "error":
                result["error"] = payload
            else:
                result.update(payload)
        finally:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    return run


def _demo_feeder(endpoint: str, n_frames: int, window: int, core_rates, overheads, q) -> None:
    """multiprocessing target: feed the built-in frames, put ("ok", demo result) or ("error", text)."""
    import os

    from hetsched.client import Client
    from hetsched.host.process import die_with_parent, quiet_garbage_collector
    from hetsched.observe import metrics
    from hetsched.observe.recording import record_run
    die_with_parent(os.getppid())
    try:
        frames = demo_frames()
        replies: list[dict] = []
        with Client(endpoint, timeout=60) as c:
            c.enable_shm(window + 2)  # as `hetsched feed` does on ipc://: the direct lane when the plan has one stage
            quiet_garbage_collector()
            # the demo's frames are JPEG photos: its limit counts decode + preprocess + model per core
            run, _ = record_run(c, iter(frames * (n_frames // len(frames) + 1)), count=n_frames, window=window,
                                stream="demo", traffic=metrics.ENCODED, core_rates_fps=core_rates,
                                predicted_overhead_ms=overheads, on_result=lambda name, rep: replies.append(rep))
        q.put(("ok", demo_result(run, replies, [n for n, _ in frames])))
    except Exception as exc:
        q.put(("error", f"{type(exc).__name__}: {exc}"))


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


def cmd_demo(args: argparse.Namespace) -> int:
    # the demo sends JPEGs and says so: its plan is made for them from the start (a service left to
    # itself finds out from the traffic and re-plans)
    return serve(args, _demo_client(args.frames), _print_demo, encoded=True)


def add_parser(sub, common) -> None:
    sp = sub.add_parser("demo", help="start the service, stream built-in frames through it, report, stop")
    common(sp)
    sp.add_argument("--frames", type=int, default=400)
    sp.add_argument("--bind", help="client socket address (default: a private ipc:// socket)")
    sp.add_argument("--labels", help="class label file")
    sp.add_argument("--drain-timeout", type=float, default=10.0)
    sp.set_defaults(func=cmd_demo)
