"""Record one measured window of a running service through its client socket: a settled stats
snapshot, frames fed with :func:`hetsched.client.feed.feed` (each result's completion time kept),
a settled snapshot again. The :class:`~hetsched.observe.report.RunData` it returns is what every
report builder takes (``profile``, the demo, the bench's hetsched slots)."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Mapping

from hetsched.observe import metrics
from hetsched.observe.report import RunData
from hetsched.observe.snapshot import settled_stats


def record_run(client: Any, frames: Iterator[tuple[str, Any]], *, fps: float | None = None,
               duration: float | None = None, count: int | None = None, window: int = 8, stream: str = "run",
               traffic: str = metrics.RAW, core_rates_fps: Mapping[Any, float] | None = None,
               predicted_overhead_ms: Mapping[str, float] | None = None, should_stop: Callable[[], bool] = lambda: False,
               on_result: Callable | None = None, on_progress: Callable | None = None,
               around: Callable[[str], None] | None = None, reply_timeout: float = 30.0) -> tuple[RunData, Any]:
    """Feed ``frames`` (as ``hetsched feed`` does) between two settled snapshots; returns
    ``(RunData, FeedStats)``. The window ends (for throughput) at the last submit, so the drain
    of the frames still in flight is left out. ``around("start")`` / ``around("end")`` are called
    on the feeding thread right before the first submit and right after the last reply (to read
    CPU counters over exactly the feeding)."""
    from hetsched.client.feed import feed
    done: list[float] = []
    last_pull = [0.0]

    def pulled() -> Iterator[tuple[str, Any]]:
        for item in frames:
            last_pull[0] = time.monotonic()
            yield item

    def got(name: str, rep: dict) -> None:
        if rep.get("type") == "result":
            done.append(time.monotonic())
        if on_result is not None:
            on_result(name, rep)

    before = settled_stats(client)
    if around is not None:
        around("start")
    t_start = time.monotonic()
    stats = feed(client, pulled(), fps=fps, duration=duration, count=count, window=window, stream=stream,
                 on_result=got, on_progress=on_progress, should_stop=should_stop, reply_timeout=reply_timeout)
    if around is not None:
        around("end")
    after = settled_stats(client)
    run = RunData(before=before, after=after, t_start=t_start, completion_times=done,
                  latencies_ms=list(stats.latencies_ms), sent=stats.sent, received=stats.received,
                  errors=stats.errors + stats.busy, traffic=traffic, core_rates_fps=core_rates_fps,
                  t_end=last_pull[0] or None, offered_fps=fps, predicted_overhead_ms=predicted_overhead_ms)
    return run, stats
