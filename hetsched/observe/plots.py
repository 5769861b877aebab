"""Pictures (matplotlib, headless): the stage-balance figure of ``hetsched profile``."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def balance_png(report: dict, trace: dict, path: str, window_frames: int = 30) -> None:
    stages = report["stages"]
    labels = [f"s{s['stage']} {s['cluster']}\n{s['layers'][0]}..\n{s['layers'][1]}" for s in stages]
    x = range(len(stages))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1, 1, 2]})
    ax = axes[0]
    w = 0.38
    ax.bar([i - w / 2 for i in x], [s["predicted_ms"] for s in stages], w, label="predicted")
    ax.bar([i + w / 2 for i in x], [s["compute_ms_p50"] or 0 for s in stages], w, label="measured p50")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("compute ms per frame (one replica)")
    ax.set_title("predicted vs measured")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.bar(list(x), [100 * (s["utilization"] or 0) for s in stages], color="tab:green")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylim(0, 105)
    ax.set_ylabel("utilization %")
    p = report["pipeline"]
    ax.set_title(f"{p['throughput_fps']:.0f} fps, balance {p['balance'] or 0:.2f}")
    ax = axes[2]
    frames = trace["frames"][-window_frames:]
    if frames:
        t0 = min(f["t_submit"] for f in frames)
        rows = sorted({(h[0], h[1]) for f in frames for h in f["hops"]})
        ypos = {r: i for i, r in enumerate(rows)}
        colors = plt.get_cmap("tab20")
        for f in frames:
            for stage, replica, t_recv, t_start, t_end in f["hops"]:
                ax.broken_barh([((t_start - t0) * 1e3, (t_end - t_start) * 1e3)], (ypos[(stage, replica)] - 0.4, 0.8),
                               color=colors(f["id"] % 20))
        ax.set_yticks(range(len(rows)), [f"stage {s}.{r}" for s, r in rows])
        ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(f"timeline of the last {len(frames)} frames (color = frame)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
