"""Measure layer costs on each cluster (the I/O edge of the cost model), with an on-disk cache.

One process per cluster, pinned to that cluster's cores, runs every layer's sub-model (see
``workers/profile_worker.py``). Clusters are measured one after the other so they do not
disturb each other. Results are cached as JSON keyed by model hash + cluster (name, cores,
emulated speed) + host (hostname, CPU model, onnxruntime version) + profile settings.

The cache is not trusted for ever: at every start the whole model is timed once per cluster and a
cluster whose speed moved by more than ``profile.cache_tolerance`` is measured again; a
measurement during which other processes used the cores (``hetsched.profiling.load``) is
reported and cached flagged as disturbed, so the next start measures it again.

Where the profiler runs is a hook: ``runner(spec, cluster, timeout, progress) -> result`` replaces
the local pinned process (``hetsched.placement.ray_profile`` runs it on the cluster's Ray node).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import onnx

from hetsched.planning.costs import ClusterMeasurement, thread_counts_to_measure
from hetsched.errors import HetschedError
from hetsched.model.graph import ModelGraph, extract_stage
from hetsched.host.topology import Cluster
from hetsched.profiling.load import DISTURBANCE_LIMIT, CoreLoad, core_load, emulation_pids

log = logging.getLogger(__name__)


def default_cache_dir() -> str:
    return os.environ.get("HETSCHED_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hetsched", "costs")


def host_key() -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "cpu part", "hardware")):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import onnxruntime
    return "|".join([socket.gethostname(), platform.machine(), cpu, onnxruntime.__version__])


def cache_key(graph: ModelGraph, cluster: Cluster, repeats: int, warmup: int, preprocess: dict | None = None) -> str:
    ident = json.dumps([graph.model_hash, graph.layer_names, cluster.name, list(cluster.cores),
                        cluster.emulated_speed, host_key(), repeats, warmup, preprocess], default=str)
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


CHECK_REPEATS = 10   # whole-model runs of the start-up speed check (after CHECK_WARMUP runs), median
CHECK_WARMUP = 2
CACHE_TOLERANCE = 0.10


@dataclass(frozen=True)
class SpeedCheck:
    """How fast the whole model runs on one cluster at this start (1 thread), next to the cache."""

    cluster: str
    now_ms: float                  # measured now: the speed check, or the fresh full measurement
    cached_ms: float | None        # the cached costs' reference time (None: there were none to trust)
    remeasured: bool               # the cluster's layer costs were measured now (not taken from the cache)
    load: CoreLoad | None          # CPU use on the cluster's cores while ``now_ms`` was measured

    @property
    def deviation(self) -> float | None:
        return None if not self.cached_ms else self.now_ms / self.cached_ms - 1.0


@dataclass
class MeasureResult:
    measurements: list[ClusterMeasurement]
    checks: dict[str, SpeedCheck] = field(default_factory=dict)   # cluster -> speed at this start
    warnings: list[str] = field(default_factory=list)             # disturbed measurements

    def speeds(self) -> dict[str, float]:
        """Measured whole-model ms (1 thread) per cluster at this start."""
        return {name: c.now_ms for name, c in self.checks.items()}


def measure_clusters(model: onnx.ModelProto, graph: ModelGraph, clusters: Sequence[Cluster],
                     **kw) -> list[ClusterMeasurement]:
    """``measure_clusters_checked`` without the speed checks and warnings (warnings are logged)."""
    result = measure_clusters_checked(model, graph, clusters, **kw)
    for w in result.warnings:
        log.warning("%s", w)
    return result.measurements


def measure_clusters_checked(model: onnx.ModelProto, graph: ModelGraph, clusters: Sequence[Cluster], *,
                             repeats: int = 30, warmup: int = 5, use_cache: bool = True,
                             cache_dir: str | None = None, timeout: float = 600.0,
                             progress: Callable[[str], None] | None = None, preprocess: dict | None = None,
                             tolerance: float = CACHE_TOLERANCE, expected_pids: Iterable[int] | None = None,
                             disturbance_limit: float = DISTURBANCE_LIMIT, runner: "ProfileRunner | None" = None
                             ) -> MeasureResult:
    """Layer costs per cluster, from the cache when a quick whole-model check still agrees with it.

    For a cluster with trusted cached costs, the whole model is timed on that cluster (a pinned
    process, CHECK_REPEATS runs, median); if it differs from the cached time by more than
    ``tolerance`` the cluster is measured again and the cache overwritten (the cached time is the
    same check run at the end of the full measurement, ``check_ms``, or whole_ms[1] in older caches).
    Every measurement samples the CPU use of other processes on the measured cores; when that exceeds
    ``disturbance_limit`` of their capacity the result carries a warning and is cached flagged as
    disturbed (the next start measures again). ``expected_pids``: processes whose CPU time is part
    of the cores' speed (emulation co-runners); None = this process's ``hetsched.host.emulation``
    children. ``preprocess``: InputConfig as a dict, to also time image preprocessing."""
    cache_dir = cache_dir or default_cache_dir()
    expected = list(emulation_pids() if expected_pids is None else expected_pids)
    note = progress or (lambda msg: None)
    layer_models: list[bytes] | None = None
    result = MeasureResult([])
    for cluster in clusters:
        path = os.path.join(cache_dir, f"{cache_key(graph, cluster, repeats, warmup, preprocess)}.json")
        cached, flagged, reference = _read_cache(path) if use_cache else (None, None, None)
        cached_ms = None
        if cached is not None and flagged is None:
            cached_ms = reference
            now_ms, check_load = _check_speed(model, graph, cluster, expected, timeout, runner)
            dev = now_ms / cached_ms - 1.0
            verdict = f"cluster {cluster.name}: cached {cached_ms:.2f} ms, now {now_ms:.2f} ms ({dev:+.0%})"
            if check_load.disturbed(disturbance_limit):
                verdict += f" [{check_load.describe()}]"
            if abs(dev) <= tolerance:
                note(f"{verdict}: using cached costs from {path}")
                result.measurements.append(cached)
                result.checks[cluster.name] = SpeedCheck(cluster.name, now_ms, cached_ms, False, check_load)
                continue
            note(f"{verdict}: re-measuring")
        elif cached is not None:
            note(f"cluster {cluster.name}: cached costs are not trusted ({flagged.describe()}): re-measuring")
        if layer_models is None:
            layer_models = [extract_stage(model, graph, i, i).SerializeToString() for i in range(len(graph.layers))]
        m, mload, check_ms = _measure_one(model, graph, cluster, layer_models, repeats, warmup, timeout, progress,
                                          preprocess, expected, runner)
        disturbed = mload.disturbed(disturbance_limit)
        if disturbed:
            result.warnings.append(f"cluster {cluster.name}: {mload.describe()}; costs may be too high"
                                   + (" (not trusted by the next start: it measures again)" if use_cache else ""))
            note(result.warnings[-1])
        result.measurements.append(m)
        result.checks[cluster.name] = SpeedCheck(cluster.name, check_ms or m.whole_ms[1], cached_ms, True, mload)
        if use_cache:
            _write_json(path, {**m.to_dict(), "check_ms": check_ms, "load": mload.to_dict(),
                               "disturbed": mload.to_dict() if disturbed else None})
            _write_json(_epoch_path(cache_dir, graph, cluster), {"epoch": secrets.token_hex(8)})
    return result


def _read_cache(path: str) -> tuple[ClusterMeasurement | None, CoreLoad | None, float | None]:
    """(cached measurement, its disturbance if it was flagged, the speed check's reference ms).

    The reference is ``check_ms`` (the whole model timed by the speed check's own procedure at the
    end of the full measurement, so the comparison has no method bias), or whole_ms[1] in caches
    written without it."""
    if not os.path.isfile(path):
        return None, None, None
    try:
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
        m = ClusterMeasurement.from_dict(d)
        flagged = CoreLoad.from_dict(d["disturbed"]) if d.get("disturbed") else None
        reference = float(d.get("check_ms") or m.whole_ms[1])
        if not reference > 0:
            raise ValueError("no single-thread whole-model time")
        return m, flagged, reference
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable cost cache %s: %s", path, exc)
        return None, None, None


def _write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


def _epoch_path(cache_dir: str, graph: ModelGraph, cluster: Cluster) -> str:
    """Changes whenever the cluster's costs are measured again: stage timings of an older epoch are stale."""
    return os.path.join(cache_dir, f"epoch-{cache_key(graph, cluster, 0, 0)}.json")


def _read_epoch(cache_dir: str, graph: ModelGraph, cluster: Cluster) -> str | None:
    try:
        with open(_epoch_path(cache_dir, graph, cluster), encoding="utf-8") as fh:
            return str(json.load(fh)["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_speed(model: onnx.ModelProto, graph: ModelGraph, cluster: Cluster, expected: list[int],
                 timeout: float, runner: "ProfileRunner | None" = None) -> tuple[float, CoreLoad]:
    """Median ms of the whole model on one thread of ``cluster`` (the start-up speed check)."""
    from workers.profile_worker import run as profile_run
    spec = {"cores": list(cluster.cores), "threads": [1], "whole_model": model.SerializeToString(),
            "whole_inputs": [t.to_dict() for t in graph.inputs], "repeats": CHECK_REPEATS, "warmup": CHECK_WARMUP,
            "parent_pid": os.getpid(), "expected_pids": expected}
    res = _run_profiler(spec, cluster, timeout, None, profile_run, runner)
    return float(res["whole_ms"][1]), core_load(*res["load"])


ProfileRunner = Callable[[dict, Cluster, float, "Callable[[str], None] | None"], dict]


def _run_profiler(spec: dict, cluster: Cluster, timeout: float, progress, profile_run,
                  runner: ProfileRunner | None = None) -> dict:
    if runner is not None:  # elsewhere (another node): the runner pins and measures there
        return runner(spec, cluster, timeout, progress)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=profile_run, args=(spec, q), name=f"hetsched-profile-{cluster.name}", daemon=True)
    t0 = time.monotonic()
    proc.start()
    result = None
    last_note = 0.0
    try:
        while result is None:
            if time.monotonic() - t0 > timeout:
                raise HetschedError(f"profiling cluster {cluster.name} took more than {timeout:.0f} s")
            try:
                kind, payload = q.get(timeout=0.2)
            except queue_mod.Empty:
                if not proc.is_alive():
                    raise HetschedError(f"profiler for cluster {cluster.name} exited with code {proc.exitcode}")
                continue
            if kind == "progress":
                now = time.monotonic()
                if progress and (now - last_note > 0.5 or payload["done"] == payload["total"]):
                    progress(f"profiling cluster {cluster.name} (cores {list(cluster.cores)}), "
                             f"{payload['threads']} thread(s): round {payload['done']}/{payload['total']}")
                    last_note = now
            elif kind == "error":
                raise HetschedError(f"profiling cluster {cluster.name} failed: {payload}")
            else:
                result = payload
    finally:
        proc.join(5.0)
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)
        q.close()
    return result


def measure_stages(model: onnx.ModelProto, graph: ModelGraph, clusters: Sequence[Cluster],
                   requests: Sequence[tuple[str, int, int, int]], *, repeats: int = 20, warmup: int = 3,
                   use_cache: bool = True, cache_dir: str | None = None, timeout: float = 600.0,
                   progress: Callable[[str], None] | None = None, expected_pids: Iterable[int] | None = None,
                   disturbance_limit: float = DISTURBANCE_LIMIT, runner: ProfileRunner | None = None
                   ) -> dict[tuple[str, int, int, int], float]:
    """Median ms of whole stage sub-models: requests are (cluster, first graph layer, last, threads),
    each timed by a process pinned to that cluster's cores. Cached timings are used only while the
    cluster's layer costs have not been measured again since (epoch); disturbed timings are not cached."""
    cache_dir = cache_dir or default_cache_dir()
    by_name = {c.name: c for c in clusters}
    out: dict[tuple[str, int, int, int], float] = {}
    todo: dict[str, list[tuple[str, int, int, int]]] = {}
    epochs = {c.name: _read_epoch(cache_dir, graph, c) for c in clusters}

    def stage_path(r: tuple[str, int, int, int]) -> str:
        return os.path.join(cache_dir, f"stage-{cache_key(graph, by_name[r[0]], repeats, warmup)}-{r[1]}-{r[2]}-{r[3]}.json")

    for req in requests:
        path = stage_path(req)
        if use_cache and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as fh:
                    d = json.load(fh)
                if d.get("epoch") == epochs[req[0]]:
                    out[req] = float(d["ms"])
                    continue
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass
        todo.setdefault(req[0], []).append(req)
    from workers.profile_worker import run as profile_run
    expected = list(emulation_pids() if expected_pids is None else expected_pids)
    for name, reqs in todo.items():
        cluster = by_name[name]
        if progress:
            progress(f"timing {len(reqs)} planned stage(s) as whole sub-models on cluster {name}")
        spec = {"cores": list(cluster.cores), "threads": [], "whole_model": model.SerializeToString(),
                "whole_inputs": [t.to_dict() for t in graph.inputs], "repeats": repeats, "warmup": warmup,
                "parent_pid": os.getpid(), "expected_pids": expected,
                "stage_models": {f"{r[1]}-{r[2]}-{r[3]}": (r[3], extract_stage(model, graph, r[1], r[2]).SerializeToString(),
                                                           [t.to_dict() for t in graph.boundaries[r[1]]]) for r in reqs}}
        result = _run_profiler(spec, cluster, timeout, None, profile_run, runner)
        sload = core_load(*result["load"])
        trusted = not sload.disturbed(disturbance_limit)
        if not trusted:
            log.warning("cluster %s: %s; stage timings not cached", name, sload.describe())
            if progress:
                progress(f"cluster {name}: {sload.describe()}; stage timings may be too high (not cached)")
        for r in reqs:
            out[r] = float(result["stage_ms"][f"{r[1]}-{r[2]}-{r[3]}"])
            if use_cache and trusted:
                _write_json(stage_path(r), {"ms": out[r], "epoch": epochs[name]})
    return out


def _measure_one(model, graph, cluster, layer_models, repeats, warmup, timeout, progress,
                 preprocess, expected: list[int], runner: ProfileRunner | None = None
                 ) -> tuple[ClusterMeasurement, CoreLoad, float | None]:
    from workers.profile_worker import run as profile_run

    spec = {
        "cores": list(cluster.cores), "threads": list(thread_counts_to_measure(len(cluster.cores))),
        "layer_models": layer_models, "whole_model": model.SerializeToString(),
        "layer_inputs": [[t.to_dict() for t in graph.boundaries[i]] for i in range(len(graph.layers))],
        "whole_inputs": [t.to_dict() for t in graph.inputs],
        "repeats": repeats, "warmup": warmup, "parent_pid": os.getpid(), "preprocess": preprocess,
        "expected_pids": expected, "check_repeats": CHECK_REPEATS, "check_warmup": CHECK_WARMUP,
    }
    result = _run_profiler(spec, cluster, timeout, progress, profile_run, runner)
    m = ClusterMeasurement(cluster.name, tuple(cluster.cores),
                           {int(t): tuple(v) for t, v in result["layer_ms"].items()},
                           {int(t): float(v) for t, v in result["whole_ms"].items()},
                           {int(t): float(v) for t, v in result["empty_ms"].items()},
                           repeats, cluster.emulated_speed, result.get("preprocess_ms"))
    return m, core_load(*result["load"]), result.get("check_ms")
