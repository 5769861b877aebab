"""Process entry of ``hetsched bench``'s onnxruntime contenders.

``python -m workers.bench_worker ort SPEC.json``
    SPEC lists sessions, each with the cores it is pinned to and its intra-op thread count; every
    session lives in its own Python thread that pins itself (``os.sched_setaffinity(0, ...)`` pins
    only the calling thread on Linux) *before* it creates its session, and does the whole work of a
    frame: for raw traffic the model run, for JPEG traffic decode + preprocess (the service's own
    ``preprocess_encoded``) + the model run. The process is first pinned to the union of the
    sessions' cores. It then answers JSON commands on stdin, one per line, with one JSON line:

    * ``{"cmd": "saturate", "seconds": S, "traffic": "raw"|"jpeg", "workers": [i, ...]}``: closed
      loop, every listed session runs frames back to back until the deadline;
    * ``{"cmd": "fixed", "traffic": ...}``: open loop: every session takes the next due frame from
      the *due pipe* (file descriptor ``due_fd`` of the spec, shared by every process of the
      contender: a free session is blocked reading it, so the kernel hands each frame to whichever
      session is free). A record is 16 bytes ``<qd`` (frame number, due time on CLOCK_MONOTONIC);
      frame number -1 stops the session that reads it. Latency is measured from the due time;
    * ``{"cmd": "quit"}``.

    Replies: frames, completion times ``done_t`` (CLOCK_MONOTONIC, comparable across processes),
    latencies ``lat_ms``, ``t_end`` (the saturate deadline), per-session frame counts and median
    frame times, and the process CPU time (user + system, all threads) spent inside the command.

It dies with the process that started it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import os
import queue
import resource
import struct
import sys
import threading
import time

RECORD = struct.Struct("<qd")


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class _Session(threading.Thread):
    """One pinned onnxruntime session in its own thread; runs the jobs posted to it."""

    def __init__(self, index: int, cores: list[int], threads: int, spec: dict, work: dict):
        super().__init__(name=f"bench-session{index}", daemon=True)
        self.index, self.cores, self.threads, self.spec, self.work = index, cores, threads, spec, work
        self.ready = threading.Event()
        self.error: str | None = None
        self.jobs: "queue.Queue" = queue.Queue()

    def run(self) -> None:
        try:
            os.sched_setaffinity(0, set(self.cores))  # this thread only; ORT's pool threads inherit it
            from hetsched.host.ort import create_session
            # default spinning (as a user of onnxruntime gets it): the baseline is onnxruntime as shipped
            self.sess = create_session(self.spec["model_path"], self.threads, spinning=True)
            for traffic in self.work:
                for i in range(self.spec.get("warmup", 3)):
                    self.infer(traffic, i)
        except Exception as exc:  # reported by the main thread
            self.error = f"{type(exc).__name__}: {exc}"
        self.ready.set()
        if self.error:
            return
        while True:
            job = self.jobs.get()
            if job is None:
                return
            job(self)

    def infer(self, traffic: str, k: int):
        frames, prepare = self.work[traffic]
        x = frames[k % len(frames)]
        return self.sess.run(None, {self.spec["input_name"]: prepare(x) if prepare else x})


def _on_sessions(sessions: list[_Session], body) -> list:
    """Run ``body(session) -> result`` on each session's thread at once; results in order."""
    results: list = [None] * len(sessions)
    errors: list[str] = []
    left = threading.Semaphore(0)

    def job_for(slot: int):
        def job(sess: _Session) -> None:
            try:
                results[slot] = body(sess)
            except Exception as exc:
                errors.append(f"session {sess.index}: {type(exc).__name__}: {exc}")
            left.release()
        return job

    for slot, s in enumerate(sessions):
        s.jobs.put(job_for(slot))
    for _ in sessions:
        left.acquire()
    if errors:
        raise RuntimeError("; ".join(errors))
    return results


def _median(xs: list[float]) -> float | None:
    return sorted(xs)[len(xs) // 2] if xs else None


def _merge(sessions: list[_Session], per: list[tuple[list[float], list[float]]], cpu0: float, **extra) -> dict:
    done = [t for d, _ in per for t in d]
    return {"frames": len(done), "done_t": done, "lat_ms": [v for _, lat in per for v in lat],
            "cpu_s": _cpu_s() - cpu0, "per_worker": {str(s.index): len(d) for s, (d, _) in zip(sessions, per)},
            "per_worker_ms": {str(s.index): _median(lat) for s, (_, lat) in zip(sessions, per)}, **extra}


def saturate(sessions: list[_Session], traffic: str, seconds: float) -> dict:
    """Closed loop: each session runs frames back to back until the deadline; latency = frame time."""
    counter = iter(range(1 << 62))
    lock = threading.Lock()
    t_end = time.monotonic() + seconds

    def body(sess: _Session):
        done, lat = [], []
        while True:
            t0 = time.monotonic()
            if t0 >= t_end:
                return done, lat
            with lock:
                k = next(counter)
            sess.infer(traffic, k)
            t1 = time.monotonic()
            done.append(t1)
            lat.append((t1 - t0) * 1e3)

    cpu0 = _cpu_s()
    return _merge(sessions, _on_sessions(sessions, body), cpu0, t_end=t_end)


def fixed(sessions: list[_Session], traffic: str, due_fd: int) -> dict:
    """Open loop: take (frame, due time) records from the due pipe until a stop record."""
    def body(sess: _Session):
        done, lat = [], []
        while True:
            rec = os.read(due_fd, RECORD.size)
            if len(rec) != RECORD.size:
                raise RuntimeError(f"due pipe: read {len(rec)} bytes, expected {RECORD.size}")
            k, due = RECORD.unpack(rec)
            if k < 0:
                return done, lat
            sess.infer(traffic, k)
            t = time.monotonic()
            done.append(t)
            lat.append((t - due) * 1e3)

    cpu0 = _cpu_s()
    return _merge(sessions, _on_sessions(sessions, body), cpu0)


def _work(spec: dict) -> dict:
    """traffic -> (frames, prepare): raw tensors as they are; JPEG bytes through preprocess_encoded."""
    import numpy as np
    work: dict = {}
    if spec.get("raw_inputs"):
        work["raw"] = ([np.ascontiguousarray(x) for x in np.load(spec["raw_inputs"])], None)
    if spec.get("jpeg_files"):
        from hetsched.config import InputConfig
        from hetsched.model.preprocess import preprocess_encoded
        cfg = InputConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["input_cfg"].items()})
        jpegs = []
        for path in spec["jpeg_files"]:
            with open(path, "rb") as fh:
                jpegs.append(fh.read())
        work["jpeg"] = (jpegs, lambda data: preprocess_encoded(data, cfg))
    return work


def ort_main(spec_path: str) -> int:
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    from hetsched.host.process import die_with_parent
    die_with_parent(spec["parent_pid"])
    all_cores = sorted({c for s in spec["sessions"] for c in s["cores"]})
    os.sched_setaffinity(0, set(all_cores))  # before anything creates a thread pool
    work = _work(spec)
    sessions = [_Session(i, s["cores"], s["threads"], spec, work) for i, s in enumerate(spec["sessions"])]
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
            traffic = cmd.get("traffic", "raw")
            if traffic not in work:
                raise ValueError(f"no {traffic!r} frames in this process (spec has {sorted(work)})")
            if cmd["cmd"] == "saturate":
                chosen = [sessions[i] for i in (cmd.get("workers") or range(len(sessions)))]
                out = saturate(chosen, traffic, float(cmd["seconds"]))
            elif cmd["cmd"] == "fixed":
                out = fixed(sessions, traffic, int(spec["due_fd"]))
            else:
                raise ValueError(f"unknown command {cmd['cmd']!r}")
            _reply({"type": "result", **out})
        except Exception as exc:
            _reply({"type": "error", "error": f"{type(exc).__name__}: {exc}"})
    for s in sessions:
        s.jobs.put(None)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "ort":
        return ort_main(argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
