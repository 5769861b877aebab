"""``hetsched feed``: stream images (files, a directory, synthetic frames, a video) into a running
service over its client socket, with a live progress line and a final summary (``--json``: one
JSON object per result, then the summary)."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from hetsched.errors import HetschedError

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


@dataclass
class FeedStats:
    sent: int = 0
    received: int = 0
    errors: int = 0
    busy: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    error_codes: dict[str, int] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    def summary(self) -> dict:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        return {"type": "summary", "sent": self.sent, "received": self.received, "errors": self.errors,
                "busy": self.busy, "error_codes": self.error_codes, "seconds": round(elapsed, 3),
                "throughput": round(self.received / elapsed, 2),
                "latency_p50_ms": _r(self.percentile(50)), "latency_p99_ms": _r(self.percentile(99))}

    def line(self) -> str:
        s = self.summary()
        p50, p99 = s["latency_p50_ms"], s["latency_p99_ms"]
        lat = f"p50 {p50:.1f} ms p99 {p99:.1f} ms" if p50 is not None else "p50 - p99 -"
        return (f"sent {s['sent']}  received {s['received']}  {s['throughput']:.1f} fps  {lat}  "
                f"errors {s['errors']}  busy {s['busy']}")


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def image_files(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTS))
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise HetschedError(f"no such file or directory: {p}")
    if not out:
        raise HetschedError(f"no JPEG/PNG images found in {', '.join(paths)}")
    return out


def file_frames(files: list[str], loop: bool) -> Iterator[tuple[str, bytes]]:
    cache: dict[str, bytes] = {}
    for path in itertools.cycle(files) if loop else files:
        if path not in cache:
            with open(path, "rb") as fh:
                cache[path] = fh.read()
        yield os.path.basename(path), cache[path]


def synthetic_frames(shape: tuple[int, ...], dtype: str) -> Iterator[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    pool = [rng.standard_normal(shape).astype(dtype) for _ in range(8)]
    for i in itertools.count():
        yield f"frame-{i}", pool[i % len(pool)]


def video_frames(path: str, loop: bool) -> Iterator[tuple[str, bytes]]:
    try:
        import cv2  # optional: pip install opencv-python-headless
    except ImportError:
        raise HetschedError("--video needs OpenCV: pip install opencv-python-headless") from None
    while True:
        cap = cv2.VideoCapture(path)
        if not cap.isOpened():
            raise HetschedError(f"cannot open video {path}")
        i = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            ok, buf = cv2.imencode(".jpg", frame)
            if ok:
                yield f"{os.path.basename(path)}#{i}", buf.tobytes()
            i += 1
        cap.release()
        if not loop:
            return


def feed(client, frames: Iterator[tuple[str, object]], *, fps: float | None, duration: float | None,
         count: int | None, window: int, stream: str, on_result=None, on_progress=None,
         should_stop=lambda: False, reply_timeout: float = 30.0) -> FeedStats:
    """Send frames (at ``fps`` or as fast as the window allows) and collect every reply."""
    stats = FeedStats()
    names: dict[int, tuple[str, float]] = {}
    interval = 1.0 / fps if fps else 0.0
    next_send = time.monotonic()
    t_end = stats.t0 + duration if duration else None
    exhausted = False
    last_progress = 0.0
    last_reply = time.monotonic()
    while True:
        now = time.monotonic()
        if not exhausted and (should_stop() or (t_end and now >= t_end) or (count is not None and stats.sent >= count)):
            exhausted = True
        while not exhausted and len(names) < window and now >= next_send:
            try:
                name, data = next(frames)
            except StopIteration:
                exhausted = True
                break
            seq = client.submit(data, stream=stream)
            names[seq] = (name, time.monotonic())
            stats.sent += 1
            next_send = next_send + interval if interval else now
            if interval and next_send < now - 1.0:
                next_send = now  # far behind (service slower than --fps): do not burst
            if count is not None and stats.sent >= count:
                exhausted = True
        if exhausted and not names:
            break
        wait = 0.05 if not interval else max(0.0, min(0.05, next_send - time.monotonic()))
        rep = client.recv(wait)
        if rep is not None and rep.get("type") in ("result", "error"):
            last_reply = time.monotonic()
            name, t_sent = names.pop(rep.get("seq"), ("?", None))
            if rep["type"] == "result":
                stats.received += 1
                if t_sent is not None:
                    stats.latencies_ms.append((time.monotonic() - t_sent) * 1e3)
            else:
                code = rep.get("code", "?")
                stats.error_codes[code] = stats.error_codes.get(code, 0) + 1
                if code == "BUSY":
                    stats.busy += 1
                else:
                    stats.errors += 1
            if on_result:
                on_result(name, rep)
        elif names and time.monotonic() - last_reply > reply_timeout:
            raise HetschedError(f"no reply for {reply_timeout:.0f} s with {len(names)} frames outstanding")
        if on_progress and time.monotonic() - last_progress > 0.5:
            last_progress = time.monotonic()
            on_progress(stats)
    return stats


def cmd_feed(args: argparse.Namespace) -> int:
    from hetsched.cli import StopFlag, eprint
    from hetsched.client import Client

    from hetsched.keys_cli import client_key_options
    stop = StopFlag().install()
    with Client(args.connect, timeout=args.timeout, **client_key_options(args)) as client:
        hello = client.hello()
        if args.shm and not client.enable_shm(args.window + 2):
            eprint("note: the service does not offer shared-memory input here (ipc:// only); sending over the socket")
        if args.synthetic:
            inp = hello["input"]
            frames: Iterator = synthetic_frames(tuple(inp["shape"]), inp["dtype"])
        elif args.video:
            frames = video_frames(args.video, args.loop)
        elif args.images or args.files:
            frames = file_frames(image_files((args.images or []) + (args.files or [])), args.loop)
        else:
            raise HetschedError("give --images DIR, --files F.., --video F or --synthetic")
        tty = sys.stderr.isatty()

        def on_result(name: str, rep: dict) -> None:
            if args.json:
                out = {"type": rep["type"], "source": name, "stream": rep.get("stream"), "seq": rep.get("seq")}
                if rep["type"] == "result":
                    out.update(top_k=rep["top_k"], latency_ms=rep["latency_ms"], stages=rep["stages"])
                else:
                    out.update(code=rep.get("code"), message=rep.get("message"))
                print(json.dumps(out), flush=True)
            elif rep["type"] == "error":
                eprint(f"\n{name}: error {rep.get('code')}: {rep.get('message')}")
            elif args.show:
                top = rep["top_k"][0] if rep["top_k"] else {}
                label = f" {top.get('label')}" if top.get("label") else ""
                print(f"{name}: {top.get('index')}{label} ({top.get('score', 0):.3f})  {rep['latency_ms']:.1f} ms",
                      flush=True)

        def on_progress(stats: FeedStats) -> None:
            if tty:
                eprint("\r  " + stats.line() + "   ", end="")

        stats = feed(client, frames, fps=args.fps, duration=args.duration, count=args.count, window=args.window,
                     stream=args.stream, on_result=on_result, on_progress=on_progress, should_stop=stop,
                     reply_timeout=args.timeout)
    summary = stats.summary()
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        if tty:
            eprint("")
        print("summary: " + stats.line() + f"  ({summary['seconds']:.1f} s)")
    return 0 if stats.errors == 0 else 1


def add_parser(sub, common) -> None:
    sp = sub.add_parser("feed", help="stream images into a running service and report results")
    sp.add_argument("--connect", default="tcp://127.0.0.1:5555", help="the service's client socket")
    src = sp.add_argument_group("source (one of)")
    src.add_argument("--images", nargs="+", help="image directories or files (JPEG/PNG)")
    src.add_argument("--files", nargs="+", help="image files")
    src.add_argument("--video", help="a video file (needs opencv-python-headless)")
    src.add_argument("--synthetic", action="store_true", help="random raw tensors of the model's input shape")
    sp.add_argument("--loop", action="store_true", help="repeat the images")
    sp.add_argument("--fps", type=float, default=None, help="target frames/s (default: as fast as allowed)")
    sp.add_argument("--duration", type=float, default=None, help="stop sending after this many seconds")
    sp.add_argument("--count", type=int, default=None, help="stop after sending this many frames")
    sp.add_argument("--window", type=int, default=8, help="max frames in flight")
    sp.add_argument("--stream", default="feed", help="stream name")
    sp.add_argument("--json", action="store_true", help="one JSON line per result, then a summary line")
    sp.add_argument("--shm", action="store_true",
                    help="raw tensors through shared memory (same host, ipc:// service): no tensor copies on the socket")
    sp.add_argument("--show", action="store_true", help="print each result's top-1")
    sp.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a reply")
    from hetsched.keys_cli import add_client_key_arguments
    add_client_key_arguments(sp)
    sp.set_defaults(func=cmd_feed)
