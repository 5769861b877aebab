"""What the service says about itself: ``hello``, ``trace``, the ``stats`` snapshot and the
Prometheus ``metrics`` section (all read from a running :class:`hetsched.server.front.Server`)."""

from __future__ import annotations

import os
import time

import numpy as np

from hetsched.model.pixels import PIXEL_ENCODINGS
from hetsched.observe.metrics import stage_utilisation
from hetsched.wire import client_protocol as cp


def hello(server) -> dict:
    t = server.pipe.graph.inputs[0]
    return {"type": "hello", "protocol": cp.PROTOCOL_VERSION, "input": t.to_dict(),
            "accepts": ["raw"] + (["jpeg", "png", "image", *PIXEL_ENCODINGS] if server.pipe.preprocess is not None
                                  else []),
            "limits": {"max_message_bytes": server.limits.max_message_bytes,
                       "max_tensor_elements": server.limits.max_tensor_elements,
                       "max_streams_per_client": server.limits.max_streams_per_client,
                       "max_inflight_per_client": server.limits.max_inflight_per_client,
                       "max_pending": server.limits.max_pending, "max_outbox": server.limits.max_outbox,
                       "max_inflight": server.pipe.max_inflight,
                       "max_encoded_bytes": server.image_limits.max_encoded_bytes,
                       "max_pixels": server.image_limits.max_pixels, "max_side": server.image_limits.max_side,
                       "min_side": server.image_limits.min_side}}

def trace(server, limit: int) -> dict:
    """The last ``limit`` frames' hop times (monotonic seconds) and each worker's pid (key "stage.worker")."""
    frames = [{"id": fid, "t_submit": ts, "t_done": td,
               "hops": [[h.stage, h.worker, h.t_recv, h.t_start, h.t_end] for h in hops]}
              for fid, ts, hops, td in list(server.traces)[-limit:]]
    pids = {f"{w.stage}.{w.wid}": w.pid for w in server.pipe.workers}
    switches = server.pipe.switch_marks() if hasattr(server.pipe, "switch_marks") else []
    return {"frames": frames, "pids": pids, "switches": switches}

def snapshot(server, samples: int = 2000) -> dict:
    """Service state: plan, per-stage cumulative worker counters and recent compute samples."""
    if server.auth is not None:
        server.counters.auth_rejected = server.auth.rejected
    now = time.monotonic()
    uptime = now - server.t_start
    names = server.pipe.plan.layer_names
    stages = []
    for st, agg in zip(server.pipe.plan.stages, server.pipe.stage_stats()):
        recent = agg["samples"][-samples:]
        stages.append({"stage": st.index, "cluster": st.cluster, "cores": list(st.cores),
                       "replicas": st.replicas, "threads": st.threads, "pids": agg["pids"],
                       "layers": [names[st.first_layer], names[st.last_layer]],
                       "frames": agg["frames"], "errors": agg["errors"],
                       "compute_s": agg["compute_s"], "wait_s": agg["wait_s"], "send_s": agg["send_s"],
                       "utilization": stage_utilisation(agg["compute_s"] + agg["input_s"], agg["replicas"],
                                                    uptime) or 0.0,
                       "compute_ms_p50": float(np.percentile(recent, 50) * 1e3) if recent else None,
                       "samples_ms": [round(x * 1e3, 4) for x in recent],
                       "predicted_ms": st.compute_ms, "predicted_period_ms": st.period_ms,
                       "predicted_compute_ms": max(m.layers_ms for m in st.members),
                       "compute_cpu_s": agg["compute_cpu_s"], "input_s": agg["input_s"],
                       "workers": agg["workers"]})
    return {"uptime_s": uptime, "t": now, "pid": os.getpid(), "plan": server.pipe.plan.to_dict(), "stages": stages,
            "queue": {"pending": len(server.pending), "in_flight": len(server.pipe.inflight)},
            "clients": len(server.clients), "workers": len(server.pipe.workers),
            "replan": server.pipe.describe() if hasattr(server.pipe, "describe") else None,
            "loop": {"max_turn_ms": round(1e3 * max(server.loop_max_s, server._loop_window_max), 3),
                     "max_turn_ms_last_10s": round(1e3 * max([m for t, m in server._loop_recent if now - t <= 10.0]
                                                              + [server._loop_window_max]), 3)},
            "dropped_requests": server.dropped_requests,
            "supervision": {**server.pipe.supervisor.describe(),
                            "recovery_times_s": [round(t, 3) for t in server.pipe.recovery_times],
                            "replayed": server.pipe.replayed, "duplicates_dropped": server.pipe.duplicates_dropped},
            **server.counters.as_dict()}

def metrics(server) -> dict:
    """The ``metrics`` section for /metrics (hetsched.observe.prometheus); safe from another thread."""
    rt = server.pipe
    describe = rt.describe() if hasattr(rt, "describe") else {}
    restarts = rt.supervisor.restarts + getattr(rt, "_retired_counts", {}).get("restarts", 0)
    return {"metrics": server.counters.metrics(
        worker_restarts=restarts, replays=rt.replayed, replans=describe.get("replans", 0),
        plan_generation=describe.get("generation", 0), cluster_speed=describe.get("measured_speeds", {}))}
