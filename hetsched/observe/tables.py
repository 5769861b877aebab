"""Text tables of stage balance for ``hetsched status`` (figures from hetsched.observe.metrics)."""

from __future__ import annotations

from hetsched.observe import metrics
from hetsched.observe.snapshot import read_snapshot


def stage_status(snap: dict, prev: dict | None = None) -> list[dict]:
    """Per stage of a stats snapshot: frames, utilisation (over the interval since ``prev``, or since
    the service started), predicted and measured compute ms."""
    now = read_snapshot(snap)
    before = read_snapshot(prev) if prev is not None else None
    rows = []
    for i, st in enumerate(now.stages):
        b = before.stages[i] if before is not None and i < len(before.stages) else None
        wall = now.uptime_s - (before.uptime_s if b is not None else 0.0)
        busy = st.compute_s + st.input_s - ((b.compute_s + b.input_s) if b is not None else 0.0)
        rows.append({"stage": st.stage, "cluster": st.cluster, "cores": list(st.cores), "replicas": st.workers,
                     "threads": st.threads, "frames": st.frames,
                     "utilization": metrics.stage_utilisation(busy, st.workers, wall),
                     "predicted_ms": st.predicted_ms, "compute_ms_p50": metrics.percentile(st.samples_ms, 50)})
    return rows


def format_stage_table(rows: list[dict]) -> str:
    """Per stage: cluster, cores, frames, utilisation, predicted vs measured compute ms."""
    out = [("stage", "cluster", "cores", "r x t", "frames", "util", "predicted ms", "measured p50 ms")]
    for s in rows:
        meas, util = s.get("compute_ms_p50"), s.get("utilization")
        out.append((str(s["stage"]), s["cluster"], ",".join(map(str, s["cores"])),
                    f"{s['replicas']}x{s['threads']}", str(s["frames"]), "-" if util is None else f"{util:.0%}",
                    f"{s['predicted_ms']:.2f}", "-" if meas is None else f"{meas:.2f}"))
    widths = [max(len(r[i]) for r in out) for i in range(len(out[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in out]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
