"""Streaming frames into a running service: frame sources (files, a directory, synthetic tensors, a
video) and the send/collect loop with its statistics. ``hetsched feed`` (hetsched/cli/feed.py) is
built on it, and so are the demo, ``profile`` and the benchmark."""

from __future__ import annotations

import itertools
import os
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


def video_frames(source) -> Iterator[tuple[object, np.ndarray, dict]]:
    """(frame, raw pixels, submit arguments) for each decoded frame of an open
    :class:`hetsched.client.video.VideoSource`: no JPEG round trip. The frame (its ``index``, ``time``
    and ``label``) is what ``feed`` hands back to ``on_result``."""
    for f in source.frames():
        yield f, f.data, f.submit_args()


def feed(client, frames: Iterator[tuple], *, fps: float | None, duration: float | None,
         count: int | None, window: int, stream: str, on_result=None, on_progress=None,
         should_stop=lambda: False, reply_timeout: float = 30.0) -> FeedStats:
    """Send frames (at ``fps`` or as fast as the window allows) and collect every reply.

    ``frames`` yields ``(name, data)`` or ``(name, data, submit keyword arguments)``; ``name`` (any
    object) comes back as the first argument of ``on_result(name, reply)``."""
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
                item = next(frames)
            except StopIteration:
                exhausted = True
                break
            name, data, kwargs = item if len(item) == 3 else (item[0], item[1], {})
            seq = client.submit(data, stream=stream, **kwargs)
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
                if code == "SHUTTING_DOWN":  # the service is stopping: send nothing more, collect what is owed
                    exhausted = True
            if on_result:
                on_result(name, rep)
        elif names and time.monotonic() - last_reply > reply_timeout:
            raise HetschedError(f"no reply for {reply_timeout:.0f} s with {len(names)} frames outstanding")
        if on_progress and time.monotonic() - last_progress > 0.5:
            last_progress = time.monotonic()
            on_progress(stats)
    return stats
