"""``hetsched demo``: start the service, stream built-in frames through it, report, stop."""

from __future__ import annotations

import argparse
from typing import Callable

from hetsched.cli.serve import serve


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


def cmd_demo(args: argparse.Namespace) -> int:
    return serve(args, _demo_client(args.frames), _print_demo)


def add_parser(sub, common) -> None:
    sp = sub.add_parser("demo", help="start the service, stream built-in frames through it, report, stop")
    common(sp)
    sp.add_argument("--frames", type=int, default=400)
    sp.add_argument("--bind", help="client socket address (default: a private ipc:// socket)")
    sp.add_argument("--labels", help="class label file")
    sp.add_argument("--drain-timeout", type=float, default=10.0)
    sp.set_defaults(func=cmd_demo)
