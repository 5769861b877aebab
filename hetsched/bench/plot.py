"""``results/bench.png``: per traffic kind, saturated throughput of every contender per scenario, and
p50/p99 at the common offered rate (overloaded contenders marked, not drawn)."""

from __future__ import annotations

import numpy as np

from hetsched.bench.options import CONTENDERS, LATENCY_CONTENDERS

COLORS = {"ort-all": "#888888", "ort-fastest-cluster": "#bbbbbb", "ort-replicas": "#4c72b0",
          "hetsched": "#dd8452", "limit": "#55a868"}


def write_plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scs = result["scenarios"]
    kinds = [k for k in result["settings"]["traffic"] if any(k in sc["traffic"] for sc in scs)]
    fig, axes = plt.subplots(max(1, len(kinds)), 2, figsize=(14, 4.4 * max(1, len(kinds))), squeeze=False)
    x = np.arange(len(scs))
    names = [s["name"] for s in scs]
    for row, kind in zip(axes, kinds):
        ts = [sc["traffic"].get(kind, {}).get("contenders", {}) for sc in scs]
        ax = row[0]
        wd = 0.8 / len(CONTENDERS)
        for i, n in enumerate(CONTENDERS):
            vals = [t.get(n, {}).get("fps") or 0 for t in ts]
            lo = [max(0.0, v - (t.get(n, {}).get("fps_min") or v)) for v, t in zip(vals, ts)]
            hi = [max(0.0, (t.get(n, {}).get("fps_max") or v) - v) for v, t in zip(vals, ts)]
            ax.bar(x + (i - 2) * wd, vals, wd, label=n, color=COLORS[n], yerr=[lo, hi], capsize=2,
                   hatch="//" if n == "limit" else None)
        ax.set_xticks(x, names)
        ax.set_ylabel("frames/s (median of rounds; bar = min-max)")
        ax.set_title(f"{kind}: throughput, saturated")
        ax.legend(fontsize=8)
        ax = row[1]
        wd = 0.8 / len(LATENCY_CONTENDERS)
        for i, n in enumerate(LATENCY_CONTENDERS):
            fx = [t.get(n, {}).get("fixed") or {} for t in ts]
            pos = x + (i - 1.5) * wd
            ax.bar(pos, [f.get("p50_ms") or 0 for f in fx], wd, color=COLORS[n], label=f"{n} p50")
            ax.scatter(pos, [f.get("p99_ms") or np.nan for f in fx], marker="_", s=120, color="black", zorder=3,
                       label="p99" if i == 0 else None)
            for p, f in zip(pos, fx):
                if f.get("overloaded"):
                    ax.annotate("overloaded", (p, 1.0), rotation=90, fontsize=7, ha="center", va="bottom")
        ax.set_xticks(x, names)
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title(f"{kind}: latency at {result['settings']['load_fraction']:.0%} of the limit offered (open loop)")
        ax.legend(fontsize=7)
    fig.suptitle(f"hetsched bench - {result['machine']['cpu_model']} ({len(result['machine']['cores_allowed'])} "
                 f"cores), {result['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
