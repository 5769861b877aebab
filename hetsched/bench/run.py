"""``hetsched bench``: hetsched against the onnxruntime set-ups people use today, in one run.

Contenders (same model, same input tensors, same cores, same emulation):

* ``ort-all``: one onnxruntime session, intra-op threads = every core of the scenario (default spinning);
* ``ort-fastest-cluster``: one session pinned to the fastest cluster only (threads = its cores);
* ``ort-replicas``: one single-threaded session per core, each pinned, next frame to whichever is free;
* ``hetsched``: the planned pipeline service in its own process, frames through the client socket;
* ``limit``: the sum over cores of each core's standalone single-thread throughput (each core measured
  alone, back to back, in the same rounds).

Per scenario the emulation (if any) is started once; the service and the onnxruntime processes are
started once and stay up; contenders then alternate in rounds (the order rotates every round) so
machine drift hits all alike, each saturated for ``seconds``. Then a fixed-load pass offers every
contender 70 % of its own measured maximum, open loop (frame k due at t0 + k/f; latency from the due
time, so queueing shows). Outputs: a terminal table, ``results/bench.json``, ``results/bench.png`` and
``BENCHMARKS.md``.

Library use: ``run_bench(BenchOptions(...))`` returns the JSON-able result dict.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import json
import os
import platform
import queue
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from hetsched.errors import HetschedError

CONTENDERS = ("ort-all", "ort-fastest-cluster", "ort-replicas", "hetsched", "limit")
ORT_CONTENDERS = ("ort-all", "ort-fastest-cluster", "ort-replicas")
LATENCY_CONTENDERS = ("ort-all", "ort-fastest-cluster", "ort-replicas", "hetsched")
BUILTIN_SCENARIOS = ("homogeneous", "bl0.5", "bl0.33")
NOTES_BEGIN = "<!-- notes:begin -->"
NOTES_END = "<!-- notes:end -->"
CORRECT_ATOL = 1e-4

Progress = Callable[[str], None]


@dataclass
class BenchOptions:
    scenarios: list[str] = field(default_factory=lambda: list(BUILTIN_SCENARIOS))
    configs: list[str] = field(default_factory=list)
    rounds: int = 3
    seconds: float = 2.5            # saturated, per contender per round (limit: per core)
    fixed_seconds: float = 3.0      # fixed-load pass, per contender
    load_fraction: float = 0.7      # of the contender's own measured maximum
    warmup_seconds: float = 0.6
    out: str = "results"
    md: str | None = "BENCHMARKS.md"
    model: str | None = None
    quick: bool = False
    seed: int = 0
    pool: int = 8                   # distinct input tensors
    check_every: int = 20           # fixed-load pass: request outputs of every n-th hetsched frame
    profile_repeats: int | None = None
    pin_service: bool = False       # experiment: pin coordinator + feeding client to the fastest cluster
    shm: bool = True                # hetsched client: shared-memory input slots when the service offers them
    command: str = "hetsched bench"
    progress: Progress | None = None

    @classmethod
    def quick_defaults(cls, **kw: Any) -> "BenchOptions":
        base = dict(scenarios=["bl0.5"], rounds=1, seconds=0.8, fixed_seconds=1.0, warmup_seconds=0.3,
                    quick=True, profile_repeats=5, check_every=5)
        base.update(kw)
        return cls(**base)


# ------------------------------------------------------------------------------------------ scenarios
@dataclass
class Scenario:
    name: str
    raw: dict                 # the config as a plain mapping (what the service gets, minus emulation)
    cfg: Any                  # hetsched.config.Config
    clusters: list            # hetsched.host.topology.Cluster, with emulated_speed where emulated
    source: str               # "built-in" or the config path

    @property
    def emulated(self) -> dict[int, float]:
        return {core: c.emulated_speed for c in self.clusters if c.emulated_speed for core in c.cores}

    @property
    def cores(self) -> list[int]:
        return sorted(core for c in self.clusters for core in c.cores)

    def fastest_cluster(self):
        """Highest (emulated) speed; ties go to the cluster listed first (configs list big first)."""
        best = None
        for c in self.clusters:
            s = c.emulated_speed if c.emulated_speed is not None else c.speed
            if best is None or s > best[0] + 1e-9:
                best = (s, c)
        return best[1]

    def service_raw(self, profile_repeats: int | None) -> dict:
        """The config the service process runs: the same clusters WITHOUT ``speed`` (the bench owns
        the emulation for the whole scenario, so the service must not start co-runners of its own) and
        the cost cache off, so the service measures the emulated cores as slow by itself."""
        raw = copy.deepcopy(self.raw)
        raw["model"] = self.cfg.model
        raw.pop("emulate_big_little", None)
        raw.pop("emulation", None)
        if self.emulated or raw.get("clusters", "auto") != "auto":
            raw["clusters"] = {c.name: {"cores": list(c.cores)} for c in self.clusters}
        prof = dict(raw.get("profile") or {})
        prof["cache"] = False
        if profile_repeats:
            prof["repeats"] = profile_repeats
            prof["warmup"] = min(prof.get("warmup", 5), 2)
        raw["profile"] = prof
        srv = dict(raw.get("server") or {})
        srv.pop("bind", None)
        raw["server"] = srv
        if isinstance(raw.get("input"), dict):
            raw["input"] = {k: v for k, v in raw["input"].items() if k != "labels"}
        return raw


def _allowed_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def builtin_scenario(name: str, model: str | None = None) -> Scenario:
    from hetsched.config import parse_config
    raw: dict = {"model": model or "builtin:squeezenet1.1"}
    if name == "homogeneous":
        raw["clusters"] = "auto"
    elif name.startswith("bl"):
        try:
            speed = float(name[2:])
        except ValueError:
            raise HetschedError(f"unknown scenario {name!r}: use homogeneous or blX (X = little speed, e.g. bl0.5)")
        cores = _allowed_cores()
        if len(cores) < 2:
            raise HetschedError(f"scenario {name} needs at least 2 allowed cores, this process has {cores}")
        half = (len(cores) + 1) // 2
        raw["clusters"] = {"big": {"cores": cores[:half]}, "little": {"cores": cores[half:], "speed": speed}}
    else:
        raise HetschedError(f"unknown scenario {name!r}: use homogeneous or blX (X = little speed, e.g. bl0.5)")
    cfg = parse_config(raw)
    return Scenario(name, raw, cfg, _resolve(cfg), "built-in")


def config_scenario(path: str, model: str | None = None) -> Scenario:
    import yaml

    from hetsched.config import load_config, parse_config
    cfg = load_config(path)  # validates, resolves relative paths
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    if model:
        raw["model"] = os.path.abspath(model)
        cfg = parse_config(raw, path)
    name = os.path.splitext(os.path.basename(path))[0]
    return Scenario(name, raw, cfg, _resolve(cfg), os.path.abspath(path))


def _resolve(cfg) -> list:
    from hetsched.config import resolve_clusters
    from hetsched.host.topology import detect_topology
    return resolve_clusters(cfg, detect_topology())


def scenarios_from(opts: BenchOptions) -> list[Scenario]:
    out = [builtin_scenario(s, opts.model) for s in opts.scenarios if s and s != "none"]
    out += [config_scenario(p, opts.model) for p in opts.configs]
    names = [s.name for s in out]
    for i, s in enumerate(out):  # keep names unique
        if names.count(s.name) > 1:
            s.name = f"{s.name}#{i}"
    if not out:
        raise HetschedError("no scenario to run (give --scenarios and/or --config)")
    return out


# ------------------------------------------------------------------------------------------ processes
def _reader(stream, q: "queue.Queue") -> None:
    try:
        for line in stream:
            q.put(line)
    finally:
        q.put(None)


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "".join(fh.readlines()[-n:])
    except OSError:
        return ""


class _Child:
    """A child process speaking JSON lines on stdout; stderr goes to a log file."""

    def __init__(self, name: str, argv: list[str], log_path: str, stdin: bool):
        self.name, self.log_path = name, log_path
        self._log = open(log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
                                     cwd=_repo_root(), env=_child_env())
        self._q: "queue.Queue" = queue.Queue()
        threading.Thread(target=_reader, args=(self.proc.stdout, self._q), daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise HetschedError(f"{self.name}: no reply within {timeout:.0f} s\n{_tail(self.log_path)}") from None
            if line is None:
                self.proc.wait(5)
                raise HetschedError(f"{self.name}: exited with code {self.proc.returncode}\n{_tail(self.log_path)}")
            line = line.strip()
            if line.startswith("{"):
                msg = json.loads(line)
                if msg.get("type") == "error":
                    raise HetschedError(f"{self.name}: {msg.get('error')}")
                return msg

    def stop(self, grace: float = 10.0) -> None:
        """Ask (stdin EOF / SIGINT), wait, then kill; always reaped."""
        p = self.proc
        try:
            if p.poll() is None:
                if p.stdin is not None:
                    try:
                        p.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                        p.stdin.close()
                    except (BrokenPipeError, OSError, ValueError):
                        pass
                else:
                    p.send_signal(signal.SIGINT)
                try:
                    p.wait(grace)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        finally:
            self._log.close()


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child_env() -> dict:
    env = dict(os.environ)
    root = _repo_root()
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class OrtProc(_Child):
    def __init__(self, name: str, sessions: list[dict], model_path: str, inputs_path: str, input_name: str,
                 tmp: str, warmup: int = 5):
        spec = {"sessions": sessions, "model_path": model_path, "inputs": inputs_path, "input_name": input_name,
                "parent_pid": os.getpid(), "warmup": warmup}
        spec_path = os.path.join(tmp, f"{name}.json")
        with open(spec_path, "w", encoding="utf-8") as fh:
            json.dump(spec, fh)
        super().__init__(name, [sys.executable, "-m", "workers.bench_worker", "ort", spec_path],
                         os.path.join(tmp, f"{name}.log"), stdin=True)
        self.sessions = sessions
        self.ready = self.read(120)

    @property
    def pids(self) -> list[int]:
        return [self.pid]

    def command(self, timeout: float, **cmd: Any) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read(timeout)


class ServiceProc(_Child):
    def __init__(self, config_path: str, endpoint: str, tmp: str):
        super().__init__("hetsched-service", [sys.executable, "-m", "workers.bench_worker", "serve", config_path,
                                              endpoint, str(os.getpid())],
                         os.path.join(tmp, "service.log"), stdin=False)
        self.ready = self.read(300)
        self.endpoint = self.ready["endpoint"]
        self.worker_pids = [w["pid"] for w in self.ready["workers"]]

    @property
    def pids(self) -> list[int]:
        return [self.pid] + self.worker_pids


# ------------------------------------------------------------------------------------------ measuring
def _cpu(pids: list[int]) -> dict[int, float]:
    import psutil
    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except psutil.Error:
            out[pid] = 0.0
    return out


class RssSampler:
    """Samples the summed RSS of a set of processes every ``interval`` s; ``window`` returns the peak."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self._pids: list[int] = []
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._th.start()

    def _sample(self, pids: list[int]) -> int:
        import psutil
        total = 0
        for pid in pids:
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                pids = list(self._pids)
            if pids:
                v = self._sample(pids)
                with self._lock:
                    self._peak = max(self._peak, v)

    def begin(self, pids: list[int]) -> None:
        with self._lock:
            self._pids, self._peak = list(pids), self._sample(pids)

    def end(self) -> float:
        with self._lock:
            peak = max(self._peak, self._sample(self._pids))
            self._pids = []
        return peak / 2**20

    def close(self) -> None:
        self._stop.set()
        self._th.join(2)


def _machine_busy() -> tuple[float, float]:
    """(CPU seconds busy on the whole machine, steal seconds) so far."""
    import psutil
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    steal = getattr(t, "steal", 0.0)
    busy = sum(t) - idle - steal - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    return busy, steal


def _own_tree_cpu() -> float:
    """CPU seconds of this process and every live descendant (service, workers, baselines, co-runners)."""
    import psutil
    me = psutil.Process()
    total = 0.0
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class ForeignLoad:
    """CPU used on this machine by processes that are not ours, per slot (other users' tests...)."""

    def __init__(self) -> None:
        self.slots: list[float] = []
        self.steal: list[float] = []

    def begin(self) -> None:
        self._t = time.monotonic()
        self._busy, self._steal = _machine_busy()
        self._own = _own_tree_cpu()

    def end(self) -> float:
        wall = time.monotonic() - self._t
        busy, steal = _machine_busy()
        own = _own_tree_cpu()
        if wall <= 0:
            return 0.0
        pct = max(0.0, 100.0 * ((busy - self._busy) - (own - self._own)) / wall)
        self.slots.append(pct)
        self.steal.append(100.0 * (steal - self._steal) / wall)
        return pct

    def summary(self) -> dict:
        return {"mean_pct": _r(float(np.mean(self.slots)), 1) if self.slots else None,
                "max_pct": _r(max(self.slots), 1) if self.slots else None,
                "steal_mean_pct": _r(float(np.mean(self.steal)), 1) if self.steal else None}


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


def _steady_fps(times: list[float], t_end: float) -> float:
    """Completions per second between the first completion and the end of sending (fill excluded)."""
    ts = [t for t in times if t <= t_end]
    if len(ts) < 2 or ts[-1] <= ts[0]:
        return 0.0
    return (len(ts) - 1) / (ts[-1] - ts[0])


# ------------------------------------------------------------------------------------------ hetsched client side
def _pool_frames(pool: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    k = 0
    while True:
        yield f"frame-{k}", pool[k % len(pool)]
        k += 1


def hetsched_saturate(client, pool: np.ndarray, seconds: float, window: int, stream: str,
                      on_progress: Callable | None = None) -> dict:
    from hetsched.client.feed import feed
    times: list[float] = []
    c0 = time.thread_time()
    t0 = time.monotonic()
    stats = feed(client, _pool_frames(pool), fps=None, duration=seconds, count=None, window=window, stream=stream,
                 on_result=lambda name, rep: times.append(time.monotonic()), on_progress=on_progress,
                 reply_timeout=30.0)
    wall = time.monotonic() - t0
    return {"frames": stats.received, "errors": stats.errors + stats.busy, "seconds": wall,
            "fps": _steady_fps(times, t0 + seconds), "lat_ms": list(stats.latencies_ms),
            "client_cpu_s": time.thread_time() - c0}


def hetsched_fixed(client, pool: np.ndarray, fps: float, seconds: float, stream: str, check_every: int,
                   reference: np.ndarray | None) -> dict:
    """Open loop: frame k is due at t0 + k/fps (sent then, or at once when late); latency from the due time."""
    n = max(1, int(fps * seconds))
    due: dict[int, tuple[float, int, bool]] = {}
    lat: list[float] = []
    errors = 0
    checks: list[float] = []
    c0 = time.thread_time()
    t0 = time.monotonic() + 0.01
    k = 0
    last_reply = time.monotonic()
    while k < n or due:
        now = time.monotonic()
        while k < n and t0 + k / fps <= now:
            want = reference is not None and k % check_every == 0
            seq = client.submit(pool[k % len(pool)], stream=stream, want_outputs=want)
            due[seq] = (t0 + k / fps, k % len(pool), want)
            k += 1
        # wait for a reply until the next frame is due, without spinning: zmq polls in whole ms, so the
        # last sub-ms is slept (a spinning client would take CPU from the workers on a small machine)
        wait = max(0.0, min(0.05, t0 + k / fps - time.monotonic())) if k < n else 0.05
        if wait >= 0.001:
            rep = client.recv(int(wait * 1000) / 1000.0)
        else:
            rep = client.recv(0)
            if rep is None and wait > 0:
                time.sleep(wait)
        if rep is not None and rep.get("type") in ("result", "error"):
            t = time.monotonic()
            last_reply = t
            d = due.pop(rep.get("seq"), None)
            if d is None:
                continue
            if rep["type"] == "result":
                lat.append((t - d[0]) * 1e3)
                if d[2] and rep.get("arrays"):
                    checks.append(float(np.max(np.abs(rep["arrays"][0] - reference[d[1]]))))
            else:
                errors += 1
        elif due and time.monotonic() - last_reply > 30.0:
            raise HetschedError(f"hetsched: no reply for 30 s with {len(due)} frames outstanding")
    return {"frames": len(lat), "offered": n, "errors": errors, "seconds": time.monotonic() - t0,
            "lat_ms": lat, "client_cpu_s": time.thread_time() - c0, "checks": checks}


def hetsched_unloaded(client, pool: np.ndarray, seconds: float) -> dict:
    """One frame at a time: where a lone frame's latency goes (client socket, each stage's transfer-in and
    compute, the rest of the coordinator's path), medians in ms."""
    from hetsched.client.feed import feed
    reps: list[dict] = []
    stats = feed(client, _pool_frames(pool), fps=None, duration=seconds, count=None, window=1, stream="unloaded",
                 on_result=lambda name, rep: reps.append(rep), reply_timeout=30.0)
    ok = [r for r in reps if r.get("type") == "result"]
    if not ok:
        return {}
    med = lambda xs: _r(float(np.median(xs))) if xs else None  # noqa: E731
    n_st = max(len(r["stages"]) for r in ok)
    stages = []
    for i in range(n_st):
        hops = [r["stages"][i] for r in ok if len(r["stages"]) > i]
        stages.append({"stage": i, "transfer_in_ms": med([h["queue_ms"] for h in hops]),
                       "compute_ms": med([h["compute_ms"] for h in hops])})
    server = [r["latency_ms"] for r in ok]
    inside = [sum(h["queue_ms"] + h["compute_ms"] for h in r["stages"]) for r in ok]
    client_lat = stats.latencies_ms
    out = {"frames": len(ok), "client_latency_ms": med(client_lat), "server_latency_ms": med(server),
           "stages": stages,
           "coordinator_rest_ms": med([sv - ins for sv, ins in zip(server, inside)]),
           "client_socket_ms": med([c - sv for c, sv in zip(client_lat, server)]) if len(client_lat) == len(server)
           else None}
    return out


def hetsched_check(client, pool: np.ndarray, reference: np.ndarray, n: int = 4) -> list[float]:
    """Send n frames asking for the outputs; max abs difference to the unsplit model's, per frame."""
    seqs = {client.submit(pool[i % len(pool)], stream="check", want_outputs=True): i % len(pool) for i in range(n)}
    diffs = []
    for rep in client.replies(expect=n, timeout=60):
        if rep["type"] != "result" or not rep.get("arrays"):
            raise HetschedError(f"hetsched: correctness frame failed: {rep}")
        diffs.append(float(np.max(np.abs(rep["arrays"][0] - reference[seqs[rep["seq"]]]))))
    return diffs


# ------------------------------------------------------------------------------------------ one scenario
def _reference(model_bytes: bytes, pool: np.ndarray, input_name: str) -> np.ndarray:
    from hetsched.host.ort import create_session
    sess = create_session(model_bytes, 1)
    return np.stack([sess.run(None, {input_name: x})[0] for x in pool])


def _model_io(model_bytes: bytes) -> tuple[str, list[int], str]:
    from hetsched.host.ort import create_session
    from hetsched.wire.dtypes import ORT_TO_NUMPY
    sess = create_session(model_bytes, 1)
    inp = sess.get_inputs()[0]
    if not all(isinstance(d, int) for d in inp.shape):
        raise HetschedError(f"model input {inp.name} has a dynamic shape {inp.shape}; the benchmark needs a static one")
    dtype = ORT_TO_NUMPY.get(inp.type)
    if dtype is None:
        raise HetschedError(f"model input type {inp.type} is not supported by the benchmark")
    return inp.name, list(inp.shape), dtype


def _ort_specs(sc: Scenario) -> dict[str, list[dict]]:
    cores = sc.cores
    fast = sc.fastest_cluster()
    return {
        "ort-all": [{"cores": cores, "threads": len(cores)}],
        "ort-fastest-cluster": [{"cores": list(fast.cores), "threads": len(fast.cores)}],
        "ort-replicas": [{"cores": [c], "threads": 1} for c in cores],
    }


def run_scenario(sc: Scenario, opts: BenchOptions, note: Progress) -> dict:
    from hetsched.client import Client
    from hetsched.model.graph import load_model
    from hetsched.runtime.service import emulation

    import yaml

    tmp = tempfile.mkdtemp(prefix="hetsched-bench-")
    model = load_model(sc.cfg.model)
    model_bytes = model.SerializeToString()
    model_path = os.path.join(tmp, "model.onnx")
    with open(model_path, "wb") as fh:
        fh.write(model_bytes)
    input_name, shape, dtype = _model_io(model_bytes)
    rng = np.random.default_rng(opts.seed)
    pool = np.stack([rng.standard_normal(shape).astype(dtype) for _ in range(opts.pool)])
    inputs_path = os.path.join(tmp, "inputs.npy")
    np.save(inputs_path, pool)
    reference = _reference(model_bytes, pool, input_name)
    svc_cfg = os.path.join(tmp, "service.yaml")
    with open(svc_cfg, "w", encoding="utf-8") as fh:
        yaml.safe_dump(sc.service_raw(opts.profile_repeats), fh)
    endpoint = f"ipc://{os.path.join(tmp, 'client.sock')}"
    specs = _ort_specs(sc)
    fast = sc.fastest_cluster()
    res: dict = {
        "name": sc.name, "source": sc.source, "model": sc.cfg.model, "input": {"name": input_name, "shape": shape,
                                                                              "dtype": dtype},
        "clusters": [{"name": c.name, "cores": list(c.cores),
                      "emulated_speed": c.emulated_speed} for c in sc.clusters],
        "emulated": {str(k): v for k, v in sc.emulated.items()},
        "fastest_cluster": fast.name,
        "ort_specs": specs,
        "notes": [],
    }
    if len(sc.clusters) == 1:
        res["notes"].append("one cluster: ort-fastest-cluster runs the same set-up as ort-all (all cores)")
    procs: dict[str, Any] = {}
    saved_affinity = None
    sampler = RssSampler()
    try:
        with emulation(sc.clusters, sc.cfg.emulation_period_ms, note):
            note(f"[{sc.name}] starting the hetsched service (profiling the clusters, cost cache off)")
            svc = procs["hetsched"] = ServiceProc(svc_cfg, endpoint, tmp)
            plan = svc.ready["plan"]
            n_workers = len(svc.ready["workers"])
            window = 2 * n_workers + 2
            res.update(plan=plan, predicted_fps=plan.get("throughput_fps"), profile_limit_fps=svc.ready["limit_fps"],
                       profile_measured=svc.ready["measured"], hetsched_workers=svc.ready["workers"], window=window)
            if opts.pin_service:
                fast_cores = set(fast.cores)
                for tid in os.listdir(f"/proc/{svc.pid}/task"):
                    try:
                        os.sched_setaffinity(int(tid), fast_cores)
                    except OSError:
                        pass
                saved_affinity = os.sched_getaffinity(0)
                os.sched_setaffinity(0, fast_cores)  # this (client) thread only
                res["notes"].append(f"--pin-service: coordinator and feeding client pinned to {sorted(fast_cores)}")
            note(f"[{sc.name}] plan: {len(plan['stages'])} stage(s), {n_workers} worker(s), predicted "
                 f"{plan.get('throughput_fps', 0):.1f} fps; window {window}")
            for name in ORT_CONTENDERS:
                note(f"[{sc.name}] starting {name}: " + ", ".join(
                    f"cores {s['cores']} x{s['threads']} thread(s)" for s in specs[name]))
                procs[name] = OrtProc(name, specs[name], model_path, inputs_path, input_name, tmp)
            client = Client(endpoint, timeout=60)
            try:
                # a local client's fastest path: tensors in /dev/shm slots, only a header on the socket
                shm = bool(opts.shm and hasattr(client, "enable_shm") and client.enable_shm(window + 4))
                res["hetsched_input"] = "shared-memory slots" if shm else "tensor over the socket"
                note(f"[{sc.name}] hetsched client input: {res['hetsched_input']}")
                res["correctness"] = {"precheck_max_abs_diff": hetsched_check(client, pool, reference)}
                _run_rounds(sc, opts, procs, client, pool, reference, window, sampler, res, note)
            finally:
                client.close()
    finally:
        if saved_affinity is not None:
            os.sched_setaffinity(0, saved_affinity)
        sampler.close()
        for name, p in procs.items():
            try:
                p.stop()
            except Exception as exc:  # keep stopping the others
                note(f"[{sc.name}] stopping {name}: {exc}")
    corr = res.get("correctness", {})
    diffs = corr.get("precheck_max_abs_diff", []) + corr.get("fixed_max_abs_diff", [])
    corr["checked_frames"] = len(diffs)
    corr["max_abs_diff"] = max(diffs) if diffs else None
    corr["ok"] = bool(diffs) and max(diffs) <= CORRECT_ATOL
    res["targets"] = evaluate_targets(res)
    return res


def _run_rounds(sc: Scenario, opts: BenchOptions, procs: dict, client, pool: np.ndarray, reference: np.ndarray,
                window: int, sampler: RssSampler, res: dict, note: Progress) -> None:
    S = opts.seconds
    all_pids = {name: p.pids for name, p in procs.items()}
    svc = procs["hetsched"]
    n_cores = len(sc.cores)

    # warm-up (not measured): every session and the whole pipeline, under the scenario's emulation
    for name in ORT_CONTENDERS:
        procs[name].command(60 + opts.warmup_seconds, cmd="saturate", seconds=opts.warmup_seconds)
    hetsched_saturate(client, pool, opts.warmup_seconds * 2, window, "warmup")

    acc: dict[str, dict] = {n: {"fps": [], "lat": [], "cpu": 0.0, "frames": 0, "rss": 0.0, "wall": 0.0}
                            for n in CONTENDERS}
    acc["hetsched"].update(coord=0.0, workers=0.0, client=0.0, errors=0)
    acc["limit"].update(per_core={c: [] for c in sc.cores}, core_ms={c: [] for c in sc.cores})
    background: list[float] = []  # CPU % of the idle contenders while another one runs (sanity check)
    foreign = ForeignLoad()  # CPU % of processes that are not ours (other users) while a slot runs

    def slot(name: str, r: int) -> None:
        others = [pid for n, pids in all_pids.items() if n != name and not (name == "limit" and n == "ort-replicas")
                  for pid in pids]
        own = all_pids["ort-replicas" if name == "limit" else name]
        b0, o0 = _cpu(others), _cpu(own)
        t0 = time.monotonic()
        sampler.begin(own)
        foreign.begin()
        a = acc[name]
        if name in ORT_CONTENDERS:
            out = procs[name].command(S + 60, cmd="saturate", seconds=S)
            fps = out["frames"] / out["seconds"] if out["seconds"] > 0 else 0.0
            a["lat"] += out["lat_ms"]
            a["cpu"] += out["cpu_s"]
            a["frames"] += out["frames"]
        elif name == "limit":
            fps = 0.0
            cpu = frames = 0.0
            for i, core in enumerate(sc.cores):
                out = procs["ort-replicas"].command(S + 60, cmd="saturate", seconds=S, workers=[i])
                f = out["frames"] / out["seconds"] if out["seconds"] > 0 else 0.0
                a["per_core"][core].append(f)
                a["core_ms"][core].append(out["per_worker_ms"][str(i)])
                a["lat"] += out["lat_ms"]
                fps += f
                cpu += out["cpu_s"]
                frames += out["frames"]
            a["cpu"] += cpu
            a["frames"] += frames
        else:
            c0 = _cpu(svc.pids)
            out = hetsched_saturate(client, pool, S, window, f"sat{r}")
            c1 = _cpu(svc.pids)
            fps = out["fps"]
            a["lat"] += out["lat_ms"]
            coord = c1[svc.pid] - c0[svc.pid]
            workers = sum(c1[p] - c0[p] for p in svc.worker_pids)
            a["coord"] += coord
            a["workers"] += workers
            a["client"] += out["client_cpu_s"]
            a["cpu"] += coord + workers + out["client_cpu_s"]
            a["frames"] += out["frames"]
            a["errors"] += out["errors"]
        a["rss"] = max(a["rss"], sampler.end())
        fl = foreign.end()
        wall = time.monotonic() - t0
        b1 = _cpu(others)
        if others and wall > 0:
            background.append(100.0 * sum(b1[p] - b0[p] for p in others) / wall)
        a["fps"].append(fps)
        note(f"[{sc.name}] round {r + 1}/{opts.rounds}  {name:<20} {fps:8.1f} fps   "
             f"(median so far {statistics.median(a['fps']):.1f})" + (f"   WARNING: other processes used {fl:.0f}% "
                                                                       f"CPU meanwhile" if fl > 10 else ""))

    stats0 = client.stats()
    order = list(CONTENDERS)
    for r in range(opts.rounds):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            slot(name, r)
    time.sleep(0.7)  # workers report their counters every 0.5 s
    res["hetsched_stages"] = stage_breakdown(stats0, client.stats())

    # fixed-load pass: 70 % of each contender's own measured max, open loop
    fixed: dict[str, dict] = {}
    lat_order = list(LATENCY_CONTENDERS)
    corr = res["correctness"]
    corr["fixed_max_abs_diff"] = []
    for i in range(len(lat_order)):
        name = lat_order[(i + opts.rounds) % len(lat_order)]
        target = opts.load_fraction * statistics.median(acc[name]["fps"])
        if target <= 0:
            continue
        foreign.begin()
        if name == "hetsched":
            c0 = _cpu(svc.pids)
            out = hetsched_fixed(client, pool, target, opts.fixed_seconds, "fixed", opts.check_every, reference)
            c1 = _cpu(svc.pids)
            cpu = sum(c1[p] - c0[p] for p in svc.pids) + out["client_cpu_s"]
            corr["fixed_max_abs_diff"] = out["checks"]
        else:
            out = procs[name].command(opts.fixed_seconds + 60, cmd="fixed", fps=target, seconds=opts.fixed_seconds)
            out.setdefault("errors", 0)
            cpu = out["cpu_s"]
        lat = out["lat_ms"]
        foreign.end()
        fixed[name] = {"offered_fps": _r(target, 2), "achieved_fps": _r(out["frames"] / out["seconds"], 2),
                       "frames": out["frames"], "errors": out["errors"],
                       "p50_ms": _r(_pct(lat, 50)), "p99_ms": _r(_pct(lat, 99)), "mean_ms": _r(_pct(lat, 50) and
                                                                                               float(np.mean(lat))),
                       "cpu_ms_per_frame": _r(1e3 * cpu / out["frames"]) if out["frames"] else None}
        note(f"[{sc.name}] {opts.load_fraction:.0%} load  {name:<20} {target:7.1f} fps offered  "
             f"p50 {fixed[name]['p50_ms']} ms  p99 {fixed[name]['p99_ms']} ms")

    res["hetsched_unloaded"] = hetsched_unloaded(client, pool, max(1.0, opts.fixed_seconds / 2))
    u = res["hetsched_unloaded"]
    if u:
        note(f"[{sc.name}] hetsched, one frame at a time: {u['client_latency_ms']} ms p50 "
             f"(stages " + ", ".join(f"{st['transfer_in_ms']}+{st['compute_ms']}" for st in u["stages"]) + " ms)")

    # results
    c: dict[str, dict] = {}
    for name in CONTENDERS:
        a = acc[name]
        m = {"fps": _r(statistics.median(a["fps"]), 2), "fps_rounds": [_r(x, 2) for x in a["fps"]],
             "fps_min": _r(min(a["fps"]), 2), "fps_max": _r(max(a["fps"]), 2),
             "sat_p50_ms": _r(_pct(a["lat"], 50)), "sat_p99_ms": _r(_pct(a["lat"], 99)),
             "cpu_ms_per_frame": _r(1e3 * a["cpu"] / a["frames"]) if a["frames"] else None,
             "peak_rss_mb": _r(a["rss"], 1)}
        if name in fixed:
            m["fixed"] = fixed[name]
        c[name] = m
    h = acc["hetsched"]
    if h["frames"]:
        c["hetsched"]["cpu_breakdown_ms_per_frame"] = {
            "coordinator": _r(1e3 * h["coord"] / h["frames"]), "workers": _r(1e3 * h["workers"] / h["frames"]),
            "client": _r(1e3 * h["client"] / h["frames"])}
        c["hetsched"]["cpu_ms_per_frame_service"] = _r(1e3 * (h["coord"] + h["workers"]) / h["frames"])
        c["hetsched"]["errors"] = h["errors"]
    lim = acc["limit"]
    per_core = {str(core): _r(statistics.median(v), 2) for core, v in lim["per_core"].items()}
    core_ms = {str(core): _r(statistics.median(v), 3) for core, v in lim["core_ms"].items()}
    fastest_core = max(per_core, key=lambda k: per_core[k])
    c["limit"].update(per_core_fps=per_core, per_core_frame_ms=core_ms, fastest_core=int(fastest_core),
                      fastest_core_frame_ms=core_ms[fastest_core])
    c["limit"]["fps"] = _r(sum(per_core.values()), 2)  # sum of per-core medians
    lim_fps, all_fps = c["limit"]["fps"], c["ort-all"]["fps"]
    for name, m in c.items():
        m["vs_limit"] = _r(m["fps"] / lim_fps) if lim_fps else None
        m["vs_ort_all"] = _r(m["fps"] / all_fps) if all_fps else None
    res["contenders"] = c
    for st in res.get("hetsched_stages", []):  # share of the time the stage computes or sends, saturated
        st["busy_pct"] = _r(100.0 * (st["compute_ms_per_frame"] + st["send_ms_per_frame"]) * c["hetsched"]["fps"]
                            / 1e3 / st["replicas"], 1)
    res["foreign_cpu_pct"] = foreign.summary()
    res["background_cpu_pct"] = {"mean": _r(float(np.mean(background)), 1) if background else None,
                                 "max": _r(max(background), 1) if background else None}


def stage_breakdown(before: dict, after: dict) -> list[dict]:
    """Per stage, over the saturated hetsched slots: ms per frame computing, sending, waiting for input,
    against the plan's prediction."""
    out = []
    for b, a in zip(before["stages"], after["stages"]):
        n = a["frames"] - b["frames"]
        if n <= 0:
            continue
        per = lambda k: _r(1e3 * (a[k] - b[k]) / n)  # noqa: E731  (summed over replicas)
        out.append({"stage": a["stage"], "cluster": a["cluster"], "cores": a["cores"], "replicas": a["replicas"],
                    "threads": a["threads"], "frames": n, "compute_ms_per_frame": per("compute_s"),
                    "send_ms_per_frame": per("send_s"),
                    "compute_ms_p50": _r(a.get("compute_ms_p50")), "predicted_compute_ms": _r(a["predicted_ms"]),
                    "predicted_period_ms": _r(a["predicted_period_ms"])})
    return out


# ------------------------------------------------------------------------------------------ targets
def evaluate_targets(res: dict) -> list[dict]:
    c = res.get("contenders")
    if not c:
        return []
    h = c["hetsched"]
    out = []

    def add(what: str, value: float | None, op: str, bound: float | None) -> None:
        ok = None if value is None or bound is None else (value >= bound if op == ">=" else
                                                          value <= bound if op == "<=" else value < bound)
        out.append({"target": what, "value": _r(value), "op": op, "bound": _r(bound), "met": ok})

    if res["emulated"]:
        add("hetsched fps / limit", h["vs_limit"], ">=", 0.95)
        add("hetsched fps / ort-all", h["vs_ort_all"], ">=", 1.8)
        rep = c["ort-replicas"]["fps"]
        add("hetsched fps / ort-replicas", h["fps"] / rep if rep else None, ">=", 1.0)
        add("hetsched p99 @70% (ms) < ort-replicas p99 @70%", h.get("fixed", {}).get("p99_ms"), "<",
            c["ort-replicas"].get("fixed", {}).get("p99_ms"))
    else:
        best = max(c[n]["fps"] for n in ORT_CONTENDERS)
        add("hetsched fps / best onnxruntime", h["fps"] / best if best else None, ">=", 0.95)
    fm = c["limit"]["fastest_core_frame_ms"]
    add("hetsched p50 @70% (ms) <= 1.4 x fastest core's frame time", h.get("fixed", {}).get("p50_ms"), "<=",
        1.4 * fm if fm else None)
    return out


# ------------------------------------------------------------------------------------------ reporting
def machine_info() -> dict:
    import onnxruntime as ort
    model = platform.processor() or "?"
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name") and model in ("?", "", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line
    except OSError:
        pass
    return {"cpu_model": model, "arch": platform.machine(), "cores_online": os.cpu_count(),
            "cores_allowed": _allowed_cores(), "virtualized": " hypervisor" in flags,
            "kernel": platform.release(), "os": platform.platform(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "numpy": np.__version__}


def _fmt(x: Any, nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def table_rows(sc: dict) -> list[list[str]]:
    rows = []
    for name in CONTENDERS:
        m = sc["contenders"][name]
        f = m.get("fixed", {})
        rows.append([name, _fmt(m["fps"]), f"{_fmt(m['fps_min'])}-{_fmt(m['fps_max'])}", _fmt(m["vs_limit"], 2),
                     _fmt(m["vs_ort_all"], 2), f"{_fmt(m['sat_p50_ms'])} / {_fmt(m['sat_p99_ms'])}",
                     _fmt(f.get("offered_fps")), f"{_fmt(f.get('p50_ms'))} / {_fmt(f.get('p99_ms'))}",
                     _fmt(m["cpu_ms_per_frame"], 2), _fmt(m["peak_rss_mb"], 0)])
    return rows


HEADER = ["contender", "fps", "fps range", "x limit", "x ort-all", "sat p50/p99 ms", "70% fps",
          "70% p50/p99 ms", "CPU ms/frame", "RSS MB"]


def _text_table(rows: list[list[str]], header: list[str]) -> str:
    w = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).rjust(w[i]) if i else str(v).ljust(w[i]) for i, v in enumerate(r))  # noqa
    return "\n".join([line(header), "  ".join("-" * x for x in w)] + [line(r) for r in rows])


def _md_table(rows: list[list[str]], header: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _scenario_title(sc: dict) -> str:
    cl = ", ".join(f"{c['name']} {c['cores']}" + (f" at speed {c['emulated_speed']} (emulated)"
                                                     if c["emulated_speed"] else "") for c in sc["clusters"])
    return f"{sc['name']}: {cl}"


def _disturbed(sc: dict) -> str:
    fl = sc.get("foreign_cpu_pct") or {}
    if (fl.get("max_pct") or 0) > 10:
        return (f" (**disturbed**: processes not started by the benchmark used {_fmt(fl['mean_pct'])} % CPU on "
                f"average, up to {_fmt(fl['max_pct'])} % in one slot)")
    return ""


def _unloaded_text(u: dict) -> str:
    st = "; ".join(f"stage {x['stage']}: transfer in {x['transfer_in_ms']} + compute {x['compute_ms']}"
                   for x in u["stages"])
    return (f"hetsched, one frame at a time (median ms): client-measured {u['client_latency_ms']} = client socket "
            f"{u['client_socket_ms']} + {st} + rest of the coordinator's path {u['coordinator_rest_ms']}")


def _targets_text(sc: dict) -> list[str]:
    out = []
    for t in sc["targets"]:
        mark = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
        out.append(f"{t['target']}: {_fmt(t['value'], 3)} (target {t['op']} {_fmt(t['bound'], 3)}) {mark}")
    return out


def format_report(result: dict) -> str:
    lines = []
    for sc in result["scenarios"]:
        lines.append("")
        lines.append(_scenario_title(sc))
        lines.append(f"hetsched input: {sc.get('hetsched_input', '-')}; "
                     f"plan: {len(sc['plan']['stages'])} stage(s), predicted {_fmt(sc['predicted_fps'])} fps; "
                     f"fastest core alone {_fmt(sc['contenders']['limit']['fastest_core_frame_ms'], 2)} ms/frame; "
                     f"outputs {'OK' if sc['correctness']['ok'] else 'WRONG'} "
                     f"(max |diff| {_fmt(sc['correctness']['max_abs_diff'], 7)} over "
                     f"{sc['correctness']['checked_frames']} frames)")
        lines.append(_text_table(table_rows(sc), HEADER))
        h = sc["contenders"]["hetsched"].get("cpu_breakdown_ms_per_frame")
        if h:
            lines.append(f"hetsched CPU ms/frame: coordinator {h['coordinator']}, workers {h['workers']}, "
                         f"client {h['client']} (total above includes the client)")
        for st in sc.get("hetsched_stages", []):
            lines.append(f"hetsched stage {st['stage']} ({st['cluster']} {st['cores']}, {st['replicas']}x{st['threads']}): "
                         f"compute {st['compute_ms_p50']} ms p50 (predicted {st['predicted_compute_ms']}), "
                         f"send {st['send_ms_per_frame']} ms/frame, busy {_fmt(st.get('busy_pct'), 0)} % "
                         "at saturation")
        u = sc.get("hetsched_unloaded")
        if u:
            lines.append(_unloaded_text(u))
        fl = sc["foreign_cpu_pct"]
        lines.append(f"other processes on the machine: {_fmt(fl['mean_pct'])} % CPU mean, {_fmt(fl['max_pct'])} % max"
                     f" per slot; steal {_fmt(fl['steal_mean_pct'])} %"
                     + ("  <- NOT A QUIET MACHINE: figures are disturbed" if (fl["max_pct"] or 0) > 10 else ""))
        lines += ["  " + t for t in _targets_text(sc)]
    return "\n".join(lines)


def write_plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scs = result["scenarios"]
    names = [s["name"] for s in scs]
    colors = {"ort-all": "#888888", "ort-fastest-cluster": "#bbbbbb", "ort-replicas": "#4c72b0",
              "hetsched": "#dd8452", "limit": "#55a868"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    x = np.arange(len(scs))
    wd = 0.8 / len(CONTENDERS)
    ax = axes[0]
    for i, n in enumerate(CONTENDERS):
        vals = [s["contenders"][n]["fps"] or 0 for s in scs]
        lo = [max(0.0, v - (s["contenders"][n]["fps_min"] or v)) for v, s in zip(vals, scs)]
        hi = [max(0.0, (s["contenders"][n]["fps_max"] or v) - v) for v, s in zip(vals, scs)]
        ax.bar(x + (i - 2) * wd, vals, wd, label=n, color=colors[n], yerr=[lo, hi], capsize=2,
               hatch="//" if n == "limit" else None)
    ax.set_xticks(x, names)
    ax.set_ylabel("frames/s (median of rounds; bar = min-max)")
    ax.set_title("throughput, saturated")
    ax.legend(fontsize=8)
    for ax, key, title in ((axes[1], "fixed", "latency at 70% of own max (open loop)"),
                           (axes[2], "sat", "latency at saturation")):
        wd2 = 0.8 / len(LATENCY_CONTENDERS)
        for i, n in enumerate(LATENCY_CONTENDERS):
            if key == "fixed":
                p50 = [s["contenders"][n].get("fixed", {}).get("p50_ms") or 0 for s in scs]
                p99 = [s["contenders"][n].get("fixed", {}).get("p99_ms") or 0 for s in scs]
            else:
                p50 = [s["contenders"][n]["sat_p50_ms"] or 0 for s in scs]
                p99 = [s["contenders"][n]["sat_p99_ms"] or 0 for s in scs]
            pos = x + (i - 1.5) * wd2
            ax.bar(pos, p50, wd2, color=colors[n], label=f"{n} p50")
            ax.scatter(pos, p99, marker="_", s=120, color="black", zorder=3, label="p99" if i == 0 else None)
        ax.set_xticks(x, names)
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"hetsched bench - {result['machine']['cpu_model']} ({len(result['machine']['cores_allowed'])} cores)"
                 f", {result['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(result: dict, path: str) -> None:
    notes = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            old = fh.read()
        if NOTES_BEGIN in old and NOTES_END in old:
            notes = old[old.index(NOTES_BEGIN):old.index(NOTES_END) + len(NOTES_END)]
    m = result["machine"]
    s = result["settings"]
    L = ["# Benchmarks", "",
         "Generated by `hetsched bench` (this file is overwritten by every run; only the notes block between "
         "the `notes` markers is kept).", "",
         f"- **date**: {result['date']}",
         f"- **command**: `{result['command']}`",
         f"- **machine**: {m['cpu_model']}, {m['cores_online']} cores online, allowed {m['cores_allowed']}"
         f"{' (virtual machine)' if m['virtualized'] else ''}; kernel {m['kernel']}; Python {m['python']}; "
         f"onnxruntime {m['onnxruntime']}; numpy {m['numpy']}",
         f"- **settings**: {s['rounds']} rounds x {s['seconds']} s saturated per contender (limit: per core), "
         f"order rotated every round; then {s['fixed_seconds']} s per contender at {s['load_fraction']:.0%} of its "
         f"own max, open loop; total {result['wall_s']:.0f} s",
         "- **model**: " + ", ".join(sorted({sc["model"] for sc in result["scenarios"]})) + "; inputs: "
         f"{s['pool']} seeded random tensors, the same for every contender", ""]
    L += ["## Headline", ""]
    for sc in result["scenarios"]:
        c = sc["contenders"]
        h = c["hetsched"]
        L.append(f"- **{sc['name']}**: hetsched {h['fps']:.1f} fps = {h['vs_limit']:.2f} x limit, "
                 f"{h['vs_ort_all']:.2f} x ort-all, {h['fps'] / c['ort-replicas']['fps']:.2f} x ort-replicas; "
                 f"p50/p99 at 70% load {_fmt(h.get('fixed', {}).get('p50_ms'))}/"
                 f"{_fmt(h.get('fixed', {}).get('p99_ms'))} ms "
                 f"(ort-replicas {_fmt(c['ort-replicas'].get('fixed', {}).get('p50_ms'))}/"
                 f"{_fmt(c['ort-replicas'].get('fixed', {}).get('p99_ms'))} ms); targets met "
                 f"{sum(1 for t in sc['targets'] if t['met'])} of {len(sc['targets'])}"
                 + _disturbed(sc))
    L.append("")
    for sc in result["scenarios"]:
        L += [f"## {_scenario_title(sc)}", ""]
        plan = sc["plan"]
        st = "; ".join(f"stage {p['index']}: {p['cluster']} cores {p['cores']} ({p['replicas']} x {p['threads']}), "
                       f"layers {p['first_layer']}..{p['last_layer']}" for p in plan["stages"])
        L.append(f"hetsched client input: {sc.get('hetsched_input', '-')}. "
                 f"Plan: {len(plan['stages'])} stage(s){': ' + st if st else ''}; predicted "
                 f"{_fmt(sc['predicted_fps'])} fps. Fastest core alone: "
                 f"{_fmt(sc['contenders']['limit']['fastest_core_frame_ms'], 2)} ms/frame. Per-core standalone fps: "
                 + ", ".join(f"core {k}: {v}" for k, v in sc["contenders"]["limit"]["per_core_fps"].items()) + ".")
        L.append("")
        L.append(_md_table(table_rows(sc), HEADER))
        L.append("")
        h = sc["contenders"]["hetsched"].get("cpu_breakdown_ms_per_frame")
        if h:
            L.append(f"hetsched CPU per frame (saturated): coordinator {h['coordinator']} ms, workers {h['workers']} "
                     f"ms, feeding client {h['client']} ms (the table's figure includes the client).")
            L.append("")
        if sc.get("hetsched_stages"):
            L.append("hetsched stages while saturated (ms per frame, summed over a stage's replicas):")
            L.append("")
            L.append(_md_table([[str(st["stage"]), f"{st['cluster']} {st['cores']}", f"{st['replicas']} x {st['threads']}",
                                 _fmt(st["predicted_compute_ms"], 2), _fmt(st["compute_ms_p50"], 2),
                                 _fmt(st["send_ms_per_frame"], 2), _fmt(st.get("busy_pct"), 0)]
                                for st in sc["hetsched_stages"]],
                               ["stage", "cluster", "replicas x threads", "predicted compute", "compute p50",
                                "send", "busy % (saturated)"]))
            L.append("")
        if sc.get("hetsched_unloaded"):
            L.append(_unloaded_text(sc["hetsched_unloaded"]) + ".")
            L.append("")
        corr = sc["correctness"]
        L.append(f"Outputs: {'equal' if corr['ok'] else 'NOT equal'} to the unsplit model's (1-thread onnxruntime) "
                 f"within {CORRECT_ATOL:g} on {corr['checked_frames']} frames (max |diff| "
                 f"{_fmt(corr['max_abs_diff'], 7)}). Idle contenders used {_fmt(sc['background_cpu_pct']['mean'])} % "
                 f"CPU (mean; max {_fmt(sc['background_cpu_pct']['max'])} %) while another one ran; processes "
                 f"not started by the benchmark used {_fmt(sc['foreign_cpu_pct']['mean_pct'])} % CPU (mean; max "
                 f"{_fmt(sc['foreign_cpu_pct']['max_pct'])} %) and the hypervisor stole "
                 f"{_fmt(sc['foreign_cpu_pct']['steal_mean_pct'])} %.")
        for n in sc["notes"]:
            L.append(f"Note: {n}.")
        L.append("")
        L += ["Targets:", ""] + [f"- {t}" for t in _targets_text(sc)] + [""]
    L += ["## How it is measured", "",
          "- **ort-all**: one session, `intra_op_num_threads` = every core of the scenario, default spinning, the "
          "process pinned to those cores before the session exists. **ort-fastest-cluster**: the same, pinned to "
          "the fastest cluster only. **ort-replicas**: one single-threaded session per core in one process, each "
          "in a thread pinned to its core (`os.sched_setaffinity(0, ...)` pins the calling thread), the next frame "
          "to whichever is free. Frames come from an in-process pool (no IPC): that is how these set-ups are used.",
          "- **hetsched**: the service runs in its own process (`python -m workers.bench_worker serve`: plan for "
          "raw tensors, no preprocessing layer, cost cache off so the emulated cores are measured as slow); frames "
          "go through the client socket (`hetsched.client.Client` + `hetsched.client.feed.feed`, window 2 x workers + 2); "
          "the client uses shared-memory input slots (`Client.enable_shm`, a local client's fastest path: the "
          "tensor is written to /dev/shm and only a header crosses the socket) unless `--no-shm` is given.",
          "- **limit**: each core alone, one single-threaded pinned session, back to back, summed.",
          "- Emulation (if any) is started once per scenario by the benchmark (real-time duty-cycle co-runners), "
          "so every contender runs under the same slow cores.",
          "- Throughput: the median over rounds of each slot's rate (hetsched: completions from the first result "
          "to the end of sending, so pipeline fill is excluded). Latency at saturation: ORT = run time of a frame "
          "(closed loop, one frame per session); hetsched = send to reply with the feed window outstanding, so it "
          "includes queueing in the window. Latency at 70%: open loop, from the frame's scheduled time.",
          "- CPU time per frame: user + system time of the contender's processes over its measured windows "
          "divided by frames (ORT: getrusage of the process; hetsched: coordinator + workers via psutil, plus the "
          "feeding client thread's CPU time). Peak RSS: summed RSS of the contender's processes sampled every "
          "0.1 s (hetsched: coordinator + workers, not the client).",
          ""]
    if notes:
        L += [notes, ""]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(L))


# ------------------------------------------------------------------------------------------ entry points
def run_bench(opts: BenchOptions) -> dict:
    note = opts.progress or (lambda msg: None)
    t0 = time.monotonic()
    scenarios = scenarios_from(opts)
    result: dict = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "command": opts.command, "machine": machine_info(),
                    "settings": {"rounds": opts.rounds, "seconds": opts.seconds, "fixed_seconds": opts.fixed_seconds,
                                 "load_fraction": opts.load_fraction, "warmup_seconds": opts.warmup_seconds,
                                 "pool": opts.pool, "seed": opts.seed, "quick": opts.quick,
                                 "profile_repeats": opts.profile_repeats, "pin_service": opts.pin_service,
                                 "shm": opts.shm},
                    "scenarios": []}
    for sc in scenarios:
        note(f"scenario {sc.name} ({sc.source}): " + ", ".join(
            f"{c.name} {list(c.cores)}" + (f" emulated at {c.emulated_speed}" if c.emulated_speed else "")
            for c in sc.clusters))
        result["scenarios"].append(run_scenario(sc, opts, note))
    result["wall_s"] = round(time.monotonic() - t0, 1)
    os.makedirs(opts.out, exist_ok=True)
    paths = {"json": os.path.join(opts.out, "bench.json"), "plot": os.path.join(opts.out, "bench.png")}
    with open(paths["json"], "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    write_plot(result, paths["plot"])
    if opts.md:
        write_markdown(result, opts.md)
        paths["markdown"] = opts.md
    result["paths"] = paths
    return result


def _command_line() -> str:
    prog = os.path.basename(sys.argv[0]) if sys.argv else "hetsched"
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    if prog in ("hetsched", "cli.py", "__main__.py"):
        return f"hetsched {args}".strip()
    return f"python {shlex.quote(sys.argv[0])} {args}".strip()


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    kw: dict = {"configs": list(args.config or []), "out": args.out, "model": args.model, "seed": args.seed,
                "pin_service": args.pin_service, "shm": not args.no_shm,
                "command": _command_line()}
    if args.scenarios is not None:
        kw["scenarios"] = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for key in ("rounds", "seconds", "fixed_seconds"):
        if getattr(args, key) is not None:
            kw[key] = getattr(args, key)
    if args.quick:
        opts = BenchOptions.quick_defaults(**kw)
    else:
        opts = BenchOptions(**kw)
    if args.md is not None:
        opts.md = args.md or None
    elif args.quick:
        opts.md = os.path.join(args.out, "BENCHMARKS.md")
    return opts


def cmd_bench(args: argparse.Namespace) -> int:
    from hetsched.cli.main import eprint
    opts = options_from_args(args)
    opts.progress = lambda msg: eprint(f"  {msg}")
    result = run_bench(opts)
    print(format_report(result))
    for p in result["paths"].values():
        print(f"wrote {p}")
    return 0 if all(sc["correctness"]["ok"] for sc in result["scenarios"]) else 1


def add_parser(sub, common) -> None:
    sp = sub.add_parser("bench", help="hetsched vs onnxruntime (all cores, fastest cluster, replicas) vs the limit",
                        description=__doc__.split("\n\n")[0])
    sp.add_argument("--config", action="extend", nargs="+", metavar="F",
                    help="device config(s), each run as its own scenario, as-is (also adds to the built-in ones "
                         "unless --scenarios is given; --scenarios none runs only these)")
    sp.add_argument("--scenarios", help=f"comma-separated: homogeneous, blX (emulated big + little at speed X); "
                                        f"default {','.join(BUILTIN_SCENARIOS)} ('none': only --config)")
    sp.add_argument("--rounds", type=int, help="rounds of alternating contenders (default 3; --quick 1)")
    sp.add_argument("--seconds", type=float, help="saturated seconds per contender per round (default 2.5)")
    sp.add_argument("--fixed-seconds", type=float, help="seconds per contender at 70%% load (default 3)")
    sp.add_argument("--out", default="results", help="directory for bench.json and bench.png")
    sp.add_argument("--md", default=None, help="markdown report path (default BENCHMARKS.md; --quick: OUT/BENCHMARKS.md;"
                                               " '' for none)")
    sp.add_argument("--model", help="ONNX model path (default: the built-in SqueezeNet 1.1)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the input tensors")
    sp.add_argument("--pin-service", action="store_true",
                    help="experiment: pin the hetsched coordinator and the feeding client to the fastest cluster")
    sp.add_argument("--no-shm", action="store_true",
                    help="hetsched client sends tensors over the socket instead of shared-memory input slots")
    sp.add_argument("--quick", action="store_true", help="a few seconds per scenario (harness check; default "
                                                         "scenario bl0.5)")
    sp.set_defaults(func=cmd_bench)
