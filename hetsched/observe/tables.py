"""Text tables of stage balance, shared by the demo, ``status`` and ``profile``."""

from __future__ import annotations


def format_stage_table(snapshot: dict) -> str:
    """Per stage: cluster, cores, frames, utilization, predicted vs measured compute ms."""
    rows = [("stage", "cluster", "cores", "r x t", "frames", "util", "predicted ms", "measured p50 ms")]
    for s in snapshot["stages"]:
        meas = s.get("compute_ms_p50")
        rows.append((str(s["stage"]), s["cluster"], ",".join(map(str, s["cores"])),
                     f"{s['replicas']}x{s['threads']}", str(s["frames"]), f"{s['utilization']:.0%}",
                     f"{s['predicted_ms']:.2f}", "-" if meas is None else f"{meas:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
