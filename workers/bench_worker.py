"""Process entries for ``hetsched bench``.

``python -m workers.bench_worker ort SPEC.json``
    An onnxruntime baseline. SPEC lists sessions, each with the cores it is pinned to and its intra-op
    thread count; every session lives in its own Python thread that pins itself
    (``os.sched_setaffinity(0, ...)`` pins only the calling thread on Linux) *before* it creates its
    session. The process is first pinned to the union of the sessions' cores. It then answers JSON
    commands on stdin, one per line, with one JSON line on stdout:

    * ``{"cmd": "saturate", "seconds": S, "workers": [i, ...]}``: closed loop, every listed session runs
      frames back to back (the next frame goes to whichever session is free); latency = run time.
    * ``{"cmd": "fixed", "fps": F, "seconds": S}``: open loop, frame k is offered at ``t0 + k / F`` into a
      shared queue that every session takes from; latency is measured from the scheduled time, so
      queueing shows.
    * ``{"cmd": "quit"}``.

    Replies carry frames, wall seconds, latencies (ms), per-session frame counts and the process CPU
    time (user + system, all threads) spent inside the command.

``python -m workers.bench_worker serve CONFIG.yaml ENDPOINT``
    The hetsched contender: prepare the plan (tensors only, no preprocessing layer), start the pipeline
    service and serve the client socket until SIGINT/SIGTERM. Prints one JSON line ``{"type": "ready",
    ...}`` (plan, limit, worker pids) on stdout once the socket is bound, and "serving on" on stderr.

Both die with the process that started them (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import os
import queue
import resource
import signal
import sys
import threading
import time


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------ ort
class _Session(threading.Thread):
    """One pinned onnxruntime session in its own thread; takes jobs from the process's job queue."""

    def __init__(self, index: int, cores: list[int], threads: int, model_path: str, pool, input_name: str,
                 warmup: int):
        super().__init__(name=f"bench-session{index}", daemon=True)
        self.index, self.cores, self.threads = index, cores, threads
        self.model_path, self.pool, self.input_name, self.warmup = model_path, pool, input_name, warmup
        self.ready = threading.Event()
        self.error: str | None = None
        self.jobs: "queue.Queue" = queue.Queue()

    def run(self) -> None:
        try:
            os.sched_setaffinity(0, set(self.cores))  # this thread only; ORT's pool threads inherit it
            from hetsched.host.ort import create_session
            # default spinning (as a user of onnxruntime gets it): the baseline is onnxruntime as shipped
            self.sess = create_session(self.model_path, self.threads, spinning=True)
            for i in range(self.warmup):
                self.infer(i)
        except Exception as exc:  # reported by the main thread
            self.error = f"{type(exc).__name__}: {exc}"
        self.ready.set()
        if self.error:
            return
        while True:
            job = self.jobs.get()
            if job is None:
                return
            job()

    def infer(self, k: int):
        return self.sess.run(None, {self.input_name: self.pool[k % len(self.pool)]})


def _saturate(sessions: list[_Session], workers: list[int], seconds: float) -> dict:
    counter = iter(range(1 << 62))
    lock = threading.Lock()
    lat: list[list[float]] = [[] for _ in workers]
    ends = [0.0] * len(workers)
    done = threading.Barrier(len(workers) + 1)
    start = threading.Barrier(len(workers) + 1)
    t = {}

    def job(slot: int, sess: _Session):
        def run() -> None:
            start.wait()
            out = lat[slot]
            deadline = t["end"]
            while True:
                now = time.perf_counter()
                if now >= deadline:
                    break
                with lock:
                    k = next(counter)
                sess.infer(k)
                out.append((time.perf_counter() - now) * 1e3)
            ends[slot] = time.perf_counter()
            done.wait()
        return run

    for slot, w in enumerate(workers):
        sessions[w].jobs.put(job(slot, sessions[w]))
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    t["end"] = t0 + seconds
    start.wait()
    done.wait()
    wall = max(ends) - t0
    cpu = _cpu_s() - cpu0
    frames = sum(len(x) for x in lat)
    return {"frames": frames, "seconds": wall, "cpu_s": cpu, "lat_ms": [v for x in lat for v in x],
            "per_worker": {str(w): len(x) for w, x in zip(workers, lat)},
            "per_worker_ms": {str(w): (sorted(x)[len(x) // 2] if x else None) for w, x in zip(workers, lat)}}


def _fixed(sessions: list[_Session], fps: float, seconds: float) -> dict:
    """Open loop: frame k is due at t0 + k/fps; every session takes the next due frame when free."""
    q: "queue.Queue" = queue.Queue()
    lat: list[float] = []
    lock = threading.Lock()
    counts = [0] * len(sessions)
    finished = threading.Barrier(len(sessions) + 1)

    def job(slot: int, sess: _Session):
        def run() -> None:
            while True:
                item = q.get()
                if item is None:
                    break
                k, due = item
                sess.infer(k)
                d = (time.perf_counter() - due) * 1e3
                with lock:
                    lat.append(d)
                counts[slot] += 1
            finished.wait()
        return run

    for i, s in enumerate(sessions):
        s.jobs.put(job(i, s))
    cpu0 = _cpu_s()
    t0 = time.perf_counter() + 0.01
    n = int(fps * seconds)
    for k in range(n):
        due = t0 + k / fps
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        q.put((k, due))
    for _ in sessions:
        q.put(None)
    finished.wait()
    wall = time.perf_counter() - t0
    return {"frames": len(lat), "offered": n, "seconds": wall, "cpu_s": _cpu_s() - cpu0, "lat_ms": lat,
            "per_worker": {str(i): c for i, c in enumerate(counts)}}


def ort_main(spec_path: str) -> int:
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    from hetsched.host.process import die_with_parent
    die_with_parent(spec["parent_pid"])
    all_cores = sorted({c for s in spec["sessions"] for c in s["cores"]})
    os.sched_setaffinity(0, set(all_cores))  # before anything creates a thread pool
    import numpy as np
    pool = list(np.load(spec["inputs"]))
    pool = [np.ascontiguousarray(x) for x in pool]
    sessions = [_Session(i, s["cores"], s["threads"], spec["model_path"], pool, spec["input_name"],
                         spec.get("warmup", 5)) for i, s in enumerate(spec["sessions"])]
    for s in sessions:  # one at a time, so the warm-up of one does not slow the other's
        s.start()
        s.ready.wait()
    errors = [s.error for s in sessions if s.error]
    if errors:
        _reply({"type": "error", "error": "; ".join(errors)})
        return 1
    _reply({"type": "ready", "pid": os.getpid(), "sessions": len(sessions),
            "threads": [sorted(os.sched_getaffinity(s.native_id)) for s in sessions]})
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "quit":
                break
            if cmd["cmd"] == "saturate":
                out = _saturate(sessions, cmd.get("workers") or list(range(len(sessions))), float(cmd["seconds"]))
            elif cmd["cmd"] == "fixed":
                out = _fixed(sessions, float(cmd["fps"]), float(cmd["seconds"]))
            else:
                raise ValueError(f"unknown command {cmd['cmd']!r}")
            _reply({"type": "result", **out})
        except Exception as exc:
            _reply({"type": "error", "error": f"{type(exc).__name__}: {exc}"})
    for s in sessions:
        s.jobs.put(None)
    return 0


# ------------------------------------------------------------------------------------------ serve
def serve_main(config_path: str, endpoint: str, parent_pid: int) -> int:
    from hetsched.host.process import die_with_parent
    die_with_parent(parent_pid)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    from hetsched.config import load_config, resolve_clusters
    from hetsched.runtime.service import emulation, prepare, running_service
    from hetsched.host.topology import detect_topology

    def progress(msg: str) -> None:
        print(f"  {msg}", file=sys.stderr, flush=True)

    cfg = load_config(config_path)
    clusters = resolve_clusters(cfg, detect_topology())
    with emulation(clusters, cfg.emulation_period_ms, progress):  # no-op: the bench strips `speed`
        prep = prepare(cfg, progress=progress, clusters=clusters, with_preprocess=False)
        with running_service(prep, endpoint) as server:
            plan = prep.plan.to_dict()
            _reply({"type": "ready", "pid": os.getpid(), "endpoint": server.endpoint,
                    "workers": [{"pid": w.process.pid, "stage": w.stage, "replica": w.replica,
                                 "cores": list(w.cores)} for w in server.pipe.workers],
                    "plan": plan, "limit_fps": prep.limit_fps(),
                    "measured": [{"cluster": m.cluster, "cores": list(m.cores),
                                  "whole_ms": {str(k): v for k, v in m.whole_ms.items()}}
                                 for m in prep.measurements]})
            print(f"hetsched: serving on {server.endpoint} ({len(server.pipe.workers)} workers)",
                  file=sys.stderr, flush=True)
            server.serve(stop.is_set, drain_timeout=5.0)
    print("hetsched: stopped", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "ort":
        return ort_main(argv[1])
    if len(argv) >= 4 and argv[0] == "serve":
        return serve_main(argv[1], argv[2], int(argv[3]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
