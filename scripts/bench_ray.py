"""Benchmark of the local two-node Ray cluster: throughput of the pipeline across the two nodes and
the extra latency of a tcp:// hop (CURVE, tensors in the message) over a shared-memory one.

    python scripts/bench_ray.py [--frames 600] [--lone 200] [--model PATH]

Starts its own two-node cluster (scripts/ray_local_cluster.sh, a private state dir and port) and
stops it at the end. One plan (prepared once on the Ray nodes: stage 0 on board-a's core 0, stage 1
on board-b's core 1) runs three ways, coordinator pinned to core 0 each time:

* ``local-shm``  both workers local processes, shared-memory links (placement.engine local)
* ``ray-mixed``  Ray actors; board-a (the coordinator's node) by shared memory, board-b over tcp://
* ``ray-tcp``    Ray actors; both over tcp:// (transport.kind tcp)

Throughput: ``--frames`` raw input tensors streamed with the pipeline's full window. Latency: ``--lone``
frames one at a time (median). A "hop" is one message between the coordinator and a tcp-linked
worker carrying a tensor (ray-mixed: 2 per frame, ray-tcp: 4), so extra latency per hop =
(median lone latency - local-shm's) / hops. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PORT = 28379

CONFIG = """
model: {model}
placement: {{engine: ray, address: '127.0.0.2:{port}', node_ip: 127.0.0.2}}
clusters:
  a_core: {{node: board-a, cores: [0]}}
  b_core: {{node: board-b, cores: [1]}}
planner: {{max_stages: 2, allow_pools: false, replan: {{enabled: false}}}}
profile: {{repeats: 20, warmup: 3, refine: 1, cache: false}}
transport: {{kind: {kind}}}
"""


def run_pipeline(prep, plan, frames: int, lone: int, **options) -> dict:
    import numpy as np

    from hetsched.model.graph import random_inputs
    from hetsched.runtime.pipeline import Pipeline
    xs = [random_inputs(prep.graph.inputs, seed=i)["data"] for i in range(16)]
    with Pipeline(prep.model, prep.graph, plan, **options) as pipe:
        for _ in pipe.run(xs * 2, timeout=60):  # warm-up
            pass
        t0 = time.perf_counter()
        n = sum(1 for _ in pipe.run((xs[i % 16] for i in range(frames)), timeout=60))
        fps = n / (time.perf_counter() - t0)
        lat = []
        for i in range(lone):
            r = next(pipe.run([xs[i % 16]], timeout=60))
            lat.append(r.latency_ms)
        workers = [(w.cluster, w.spec.data_endpoint.split(":")[0]) for w in pipe.workers]
    return {"fps": round(fps, 1), "lone_p50_ms": round(statistics.median(lat), 3),
            "lone_p90_ms": round(float(np.percentile(lat, 90)), 3), "links": workers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--lone", type=int, default=200)
    ap.add_argument("--model", default="builtin:squeezenet1.1")
    args = ap.parse_args()
    from hetsched.config import parse_config
    from hetsched.placement.ray_placement import RayPlacement
    from hetsched.runtime.service import pin_coordinator, prepare
    import yaml

    state = tempfile.mkdtemp(prefix="hsbench-", dir="/tmp")
    env = {**os.environ, "HETSCHED_RAY_DIR": state, "HETSCHED_RAY_PORT": str(PORT),
           "HETSCHED_CACHE_DIR": os.path.join(state, "costs")}
    os.environ["HETSCHED_CACHE_DIR"] = env["HETSCHED_CACHE_DIR"]
    script = os.path.join(ROOT, "scripts", "ray_local_cluster.sh")
    subprocess.run(["bash", script, "start"], env=env, check=True)
    out: dict = {}
    try:
        def config(kind: str):
            return parse_config(yaml.safe_load(CONFIG.format(model=args.model, port=PORT, kind=kind)))

        with RayPlacement(config("ipc")) as placement:
            pin_coordinator(placement.local_clusters)
            prep = prepare(placement.cfg, placement=placement, progress=lambda m: print(" ", m, file=sys.stderr))
            plan = prep.plan
            print(" plan:", " | ".join(f"{s.first_layer}-{s.last_layer}:{s.cluster}" for s in plan.stages),
                  file=sys.stderr)
            out["probe"] = {n: p.to_dict() for n, p in placement.probes.items()}
            out["local-shm"] = run_pipeline(prep, plan, args.frames, args.lone)
            out["ray-mixed"] = run_pipeline(prep, plan, args.frames, args.lone, **placement.pipeline_options())
            all_tcp = RayPlacement(config("tcp"), cluster=placement.ray)  # the same connection
            out["ray-tcp"] = run_pipeline(prep, plan, args.frames, args.lone, **all_tcp.pipeline_options())
    finally:
        subprocess.run(["bash", script, "stop"], env=env)
        shutil.rmtree(state, ignore_errors=True)
    base = out["local-shm"]["lone_p50_ms"]
    for name, hops in (("ray-mixed", 2), ("ray-tcp", 4)):
        out[name]["tcp_hops_per_frame"] = hops
        out[name]["extra_ms_per_hop"] = round((out[name]["lone_p50_ms"] - base) / hops, 3)
    print(f"{'scenario':<10} {'fps':>7} {'lone p50 ms':>12} {'lone p90 ms':>12} {'tcp hops':>9} {'extra ms/hop':>13}")
    for name in ("local-shm", "ray-mixed", "ray-tcp"):
        r = out[name]
        print(f"{name:<10} {r['fps']:>7} {r['lone_p50_ms']:>12} {r['lone_p90_ms']:>12} "
              f"{r.get('tcp_hops_per_frame', 0):>9} {r.get('extra_ms_per_hop', 0.0):>13}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
