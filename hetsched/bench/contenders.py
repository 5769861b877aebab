"""The contenders of a scenario and how each is driven: closed loop (saturated) and open loop (frame k
due at t0 + k / f, latency from the due time). Every run returns a :class:`Slot` of raw records;
hetsched.bench.figures turns them into figures with hetsched.observe.metrics.

* :class:`OrtContender`: one or more ``workers/bench_worker.py`` processes (onnxruntime sessions,
  frames from an in-process pool: no IPC, as these set-ups are used). Open-loop frames go through a
  *due pipe* shared by all its sessions, so the next due frame goes to whichever session is free.
* :class:`HetschedContender`: the service started by ``hetsched start``, fed over its client socket
  by ``hetsched.client.Client`` + ``hetsched.client.feed.feed`` (shared-memory input when offered).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hetsched.bench.measuring import cpu_of
from hetsched.bench.processes import OrtProc, ServiceProc
from hetsched.bench.traffic import Traffic
from hetsched.errors import HetschedError
from hetsched.observe.snapshot import read_snapshot

RECORD_FORMAT = "<qd"  # the due pipe's record, as workers/bench_worker.py reads it


@dataclass
class Slot:
    """The raw record of one measured run of one contender."""
    done_t: list[float]               # completion times, CLOCK_MONOTONIC
    lat_ms: list[float]               # per completed frame
    cpu_s: float                      # CPU of all the contender's processes (hetsched: + the feeding thread)
    frames: int
    t_end: float | None = None        # when load stopped being offered (throughput leaves the drain out)
    errors: int = 0
    per_session_ms: dict = field(default_factory=dict)  # median frame time per session (limit slots)
    extra: dict = field(default_factory=dict)           # hetsched: run data, CPU accounts, checks


class OrtContender:
    def __init__(self, name: str, processes: list[list[dict]], spec: dict, tmp: str):
        """Starts the processes; :meth:`wait_ready` waits until their sessions are warm."""
        self.name = name
        self.due_r, self.due_w = os.pipe()
        self.procs: list[OrtProc] = []
        try:
            for i, sessions in enumerate(processes):
                self.procs.append(OrtProc(f"{name}-{i}" if len(processes) > 1 else name, sessions, spec, tmp,
                                          self.due_r))
        except BaseException:
            self.stop()
            raise
        # (process, session index in it) of every session, in core order
        self.sessions = [(p, j) for p in self.procs for j in range(len(p.sessions))]

    def wait_ready(self) -> None:
        for p in self.procs:
            p.wait_ready()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _collect(self, procs: list[OrtProc], timeout: float) -> list[dict]:
        return [p.read(timeout) for p in procs]

    @staticmethod
    def _merge(outs: list[dict]) -> Slot:
        ends = [o["t_end"] for o in outs if o.get("t_end") is not None]
        per_ms = {}
        for o in outs:
            per_ms.update({len(per_ms) + int(k): v for k, v in o.get("per_worker_ms", {}).items()})
        return Slot(done_t=[t for o in outs for t in o["done_t"]], lat_ms=[v for o in outs for v in o["lat_ms"]],
                    cpu_s=sum(o["cpu_s"] for o in outs), frames=sum(o["frames"] for o in outs),
                    t_end=min(ends) if ends else None, per_session_ms=per_ms)

    def saturate(self, traffic: str, seconds: float, session: int | None = None) -> Slot:
        """Every session back to back for ``seconds`` (or only session ``session``: one core alone)."""
        if session is None:
            for p in self.procs:
                p.send(cmd="saturate", traffic=traffic, seconds=seconds)
            return self._merge(self._collect(self.procs, seconds + 60))
        proc, j = self.sessions[session]
        proc.send(cmd="saturate", traffic=traffic, seconds=seconds, workers=[j])
        return self._merge(self._collect([proc], seconds + 60))

    def fixed(self, traffic: str, fps: float, seconds: float) -> Slot:
        """Open loop: frame k is written to the due pipe at t0 + k / fps; a free session takes it."""
        import struct
        rec = struct.Struct(RECORD_FORMAT)
        for p in self.procs:
            p.send(cmd="fixed", traffic=traffic)
        n = max(2, int(fps * seconds))
        t0 = time.monotonic() + 0.05
        for k in range(n):
            due = t0 + k / fps
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            os.write(self.due_w, rec.pack(k, due))
        for _ in self.sessions:
            os.write(self.due_w, rec.pack(-1, 0.0))
        return self._merge(self._collect(self.procs, 120 + seconds))

    def stop(self) -> None:
        for p in self.procs:
            p.stop()
        for fd in (self.due_r, self.due_w):
            try:
                os.close(fd)
            except OSError:
                pass


class HetschedContender:
    """The service of ``hetsched start`` and one client connection feeding it (as ``hetsched feed``)."""

    def __init__(self, service: ServiceProc, client: Any, window: int, speed_of):
        self.service, self.client, self.window, self.speed_of = service, client, window, speed_of
        self.plan = read_snapshot(client.stats()).plan

    @property
    def pids(self) -> list[int]:
        return [self.service.pid] + read_snapshot(self.client.stats()).worker_pids

    def saturate(self, traffic: Traffic, seconds: float, stream: str) -> Slot:
        """Closed loop with the feed window; CPU of the coordinator, each worker account and the
        feeding thread measured over exactly the feeding (between two settled snapshots)."""
        from hetsched.observe.recording import record_run
        marks: dict = {}

        def around(when: str) -> None:
            counters = read_snapshot(self.client.stats()) if when == "start" else None
            if counters is not None:
                marks["pids"] = [self.service.pid] + counters.worker_pids
            marks[when] = (cpu_of(marks["pids"]), time.thread_time())

        run, _ = record_run(self.client, traffic.frames(), duration=seconds, window=self.window, stream=stream,
                            traffic=traffic.kind, around=around)
        return self._slot(run, marks)

    def _slot(self, run: Any, marks: dict) -> Slot:
        (c0, th0), (c1, th1) = marks["start"], marks["end"]
        coord = self.service.pid
        before, after = read_snapshot(run.before), read_snapshot(run.after)
        accounts = []
        for sb, sa in zip(before.stages, after.stages):
            for ab, aa in zip(sb.accounts, sa.accounts):
                cpu = sum(c1.get(p, 0.0) - c0.get(p, 0.0) for p in aa.pids)
                if aa.compute_cpu_s is not None and ab.compute_cpu_s is not None:
                    onnx_cpu, estimated = aa.compute_cpu_s - ab.compute_cpu_s, False
                else:  # wall seconds of the workers' runs x the share of the cores they got (emulation)
                    speed = float(np.mean([self.speed_of(c) for c in aa.cores])) if aa.cores else 1.0
                    onnx_cpu, estimated = (aa.compute_s - ab.compute_s) * sa.threads * speed, True
                accounts.append({"stage": sa.stage, "cluster": sa.cluster, "pids": list(aa.pids),
                                 "frames": aa.frames - ab.frames, "cpu_s": cpu, "onnxruntime_cpu_s": onnx_cpu,
                                 "estimated": estimated, "restarted": list(aa.pids) != list(ab.pids)})
        coord_s = c1.get(coord, 0.0) - c0.get(coord, 0.0)
        client_s = th1 - th0
        workers_s = sum(a["cpu_s"] for a in accounts)
        return Slot(done_t=list(run.completion_times), lat_ms=list(run.latencies_ms),
                    cpu_s=coord_s + workers_s + client_s, frames=run.received, t_end=run.t_end, errors=run.errors,
                    extra={"run": run, "coordinator_cpu_s": coord_s, "client_cpu_s": client_s, "accounts": accounts})

    def fixed(self, traffic: Traffic, fps: float, seconds: float, check_every: int) -> Slot:
        """Open loop: frame k is due at t0 + k / fps (sent then, or at once when late); latency from
        the due time. Every ``check_every``-th frame asks for its outputs (compared with the
        reference). Offering stops early when more than a second of frames is outstanding (the
        service cannot keep up: the slot is then reported as overloaded)."""
        client, n = self.client, max(2, int(fps * seconds))
        max_backlog = max(16, int(fps))
        due: dict[int, tuple[float, int, bool]] = {}
        lat, done, checks = [], [], []
        errors = k = 0
        pids = self.pids
        c0, th0 = cpu_of(pids), time.thread_time()
        t0 = time.monotonic() + 0.01
        last_reply = time.monotonic()
        offering = True
        while (offering and k < n) or due:
            now = time.monotonic()
            offering = offering and len(due) <= max_backlog
            while offering and k < n and t0 + k / fps <= now:
                i = k % len(traffic.payloads)
                want = k % check_every == 0
                seq = client.submit(traffic.payloads[i], stream="fixed", want_outputs=want)
                due[seq] = (t0 + k / fps, i, want)
                k += 1
            # wait for a reply until the next frame is due (the client waits to the microsecond, not spinning)
            wait = max(0.0, min(0.05, t0 + k / fps - time.monotonic())) if offering and k < n else 0.05
            rep = client.recv(wait)
            if rep is not None and rep.get("type") in ("result", "error"):
                t = last_reply = time.monotonic()
                d = due.pop(rep.get("seq"), None)
                if d is None:
                    continue
                if rep["type"] == "result":
                    lat.append((t - d[0]) * 1e3)
                    done.append(t)
                    if d[2] and rep.get("arrays"):
                        checks.append(float(np.max(np.abs(rep["arrays"][0] - traffic.reference[d[1]]))))
                else:
                    errors += 1
            elif due and time.monotonic() - last_reply > 30.0:
                raise HetschedError(f"hetsched: no reply for 30 s with {len(due)} frames outstanding")
        c1 = cpu_of(pids)
        cpu = sum(c1[p] - c0[p] for p in pids) + time.thread_time() - th0
        return Slot(done_t=done, lat_ms=lat, cpu_s=cpu, frames=len(lat), errors=errors + (n - k),
                    extra={"checks": checks, "offered_frames": n, "not_offered": n - k})

    def unloaded(self, traffic: Traffic, seconds: float) -> dict:
        """One frame at a time: where a lone frame's latency goes (client socket, each stage's
        transfer-in and compute, the rest of the coordinator's path; on the direct lane: the answer's way
        back to the client), medians in ms."""
        from hetsched.client.feed import feed
        from hetsched.observe.metrics import percentile
        reps: list[dict] = []
        stats = feed(self.client, traffic.frames(), fps=None, duration=seconds, count=None, window=1,
                     stream="unloaded", on_result=lambda name, rep: reps.append(rep), reply_timeout=30.0)
        ok = [r for r in reps if r.get("type") == "result"]
        if not ok:
            return {}
        med = lambda xs: percentile(xs, 50)  # noqa: E731
        stages = []
        for i in range(max(len(r["stages"]) for r in ok)):
            hops = [r["stages"][i] for r in ok if len(r["stages"]) > i]
            stages.append({"stage": i, "transfer_in_ms": med([h["queue_ms"] for h in hops]),
                           "compute_ms": med([h["compute_ms"] for h in hops])})
        server = [r["latency_ms"] for r in ok]
        inside = [sum(h["queue_ms"] + h["compute_ms"] for h in r["stages"]) for r in ok]
        client_lat = stats.latencies_ms
        return {"frames": len(ok), "lane": all(r.get("lane") for r in ok),
                "client_latency_ms": med(client_lat), "server_latency_ms": med(server),
                "stages": stages, "coordinator_rest_ms": med([sv - ins for sv, ins in zip(server, inside)]),
                "client_socket_ms": med([c - sv for c, sv in zip(client_lat, server)])
                if len(client_lat) == len(server) else None}

    def check(self, traffic: Traffic, n: int = 4) -> list[float]:
        """Send n frames asking for the outputs; max |difference| to the unsplit model's, per frame."""
        seqs = {self.client.submit(traffic.payloads[i % len(traffic.payloads)], stream="check", want_outputs=True):
                i % len(traffic.payloads) for i in range(n)}
        diffs = []
        for rep in self.client.replies(expect=n, timeout=60):
            if rep["type"] != "result" or not rep.get("arrays"):
                raise HetschedError(f"hetsched: a correctness frame failed: {rep}")
            diffs.append(float(np.max(np.abs(rep["arrays"][0] - traffic.reference[seqs[rep["seq"]]]))))
        return diffs
