"""Measure layer costs on each cluster (the I/O edge of the cost model), with an on-disk cache.

One process per cluster, pinned to that cluster's cores, runs every layer's sub-model (see
``workers/profile_worker.py``). Clusters are measured one after the other so they do not
disturb each other. Results are cached as JSON keyed by model hash + cluster (name, cores,
emulated speed) + host (hostname, CPU model, onnxruntime version) + profile settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import socket
import time
from typing import Callable, Sequence

import onnx

from hetsched.planning.costs import ClusterMeasurement, thread_counts_to_measure
from hetsched.errors import HetschedError
from hetsched.model.graph import ModelGraph, extract_stage
from hetsched.host.topology import Cluster

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


def measure_clusters(model: onnx.ModelProto, graph: ModelGraph, clusters: Sequence[Cluster], *,
                     repeats: int = 30, warmup: int = 5, use_cache: bool = True, cache_dir: str | None = None,
                     timeout: float = 600.0, progress: Callable[[str], None] | None = None,
                     preprocess: dict | None = None) -> list[ClusterMeasurement]:
    """``preprocess``: InputConfig as a dict, to also time image preprocessing on each cluster."""
    cache_dir = cache_dir or default_cache_dir()
    layer_models: list[bytes] | None = None
    out = []
    for cluster in clusters:
        key = cache_key(graph, cluster, repeats, warmup, preprocess)
        path = os.path.join(cache_dir, f"{key}.json")
        if use_cache and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as fh:
                    m = ClusterMeasurement.from_dict(json.load(fh))
                out.append(m)
                if progress:
                    progress(f"costs for cluster {cluster.name}: from cache {path}")
                continue
            except (OSError, ValueError, KeyError) as exc:
                log.warning("ignoring unreadable cost cache %s: %s", path, exc)
        if layer_models is None:
            layer_models = [extract_stage(model, graph, i, i).SerializeToString() for i in range(len(graph.layers))]
        m = _measure_one(model, graph, cluster, layer_models, repeats, warmup, timeout, progress, preprocess)
        out.append(m)
        if use_cache:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(m.to_dict(), fh)
            os.replace(tmp, path)
    return out


def _run_profiler(spec: dict, cluster: Cluster, timeout: float, progress, profile_run) -> dict:
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
                   progress: Callable[[str], None] | None = None) -> dict[tuple[str, int, int, int], float]:
    """Median ms of whole stage sub-models: requests are (cluster, first graph layer, last, threads),
    each timed by a process pinned to that cluster's cores."""
    cache_dir = cache_dir or default_cache_dir()
    by_name = {c.name: c for c in clusters}
    out: dict[tuple[str, int, int, int], float] = {}
    todo: dict[str, list[tuple[str, int, int, int]]] = {}
    for req in requests:
        cluster = by_name[req[0]]
        path = os.path.join(cache_dir, f"stage-{cache_key(graph, cluster, repeats, warmup)}-{req[1]}-{req[2]}-{req[3]}.json")
        if use_cache and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as fh:
                    out[req] = float(json.load(fh)["ms"])
                continue
            except (OSError, ValueError, KeyError):
                pass
        todo.setdefault(req[0], []).append(req)
    from workers.profile_worker import run as profile_run
    for name, reqs in todo.items():
        cluster = by_name[name]
        if progress:
            progress(f"timing {len(reqs)} planned stage(s) as whole sub-models on cluster {name}")
        spec = {"cores": list(cluster.cores), "threads": [], "whole_model": model.SerializeToString(),
                "whole_inputs": [t.to_dict() for t in graph.inputs], "repeats": repeats, "warmup": warmup,
                "parent_pid": os.getpid(),
                "stage_models": {f"{r[1]}-{r[2]}-{r[3]}": (r[3], extract_stage(model, graph, r[1], r[2]).SerializeToString(),
                                                           [t.to_dict() for t in graph.boundaries[r[1]]]) for r in reqs}}
        result = _run_profiler(spec, cluster, timeout, None, profile_run)
        for r in reqs:
            ms = float(result["stage_ms"][f"{r[1]}-{r[2]}-{r[3]}"])
            out[r] = ms
            if use_cache:
                os.makedirs(cache_dir, exist_ok=True)
                path = os.path.join(cache_dir, f"stage-{cache_key(graph, cluster, repeats, warmup)}-{r[1]}-{r[2]}-{r[3]}.json")
                with open(path, "w", encoding="utf-8") as fh:
                    json.dump({"ms": ms}, fh)
    return out


def _measure_one(model, graph, cluster, layer_models, repeats, warmup, timeout, progress,
                 preprocess) -> ClusterMeasurement:
    from workers.profile_worker import run as profile_run

    spec = {
        "cores": list(cluster.cores), "threads": list(thread_counts_to_measure(len(cluster.cores))),
        "layer_models": layer_models, "whole_model": model.SerializeToString(),
        "layer_inputs": [[t.to_dict() for t in graph.boundaries[i]] for i in range(len(graph.layers))],
        "whole_inputs": [t.to_dict() for t in graph.inputs],
        "repeats": repeats, "warmup": warmup, "parent_pid": os.getpid(), "preprocess": preprocess,
    }
    result = _run_profiler(spec, cluster, timeout, progress, profile_run)
    return ClusterMeasurement(cluster.name, tuple(cluster.cores),
                              {int(t): tuple(v) for t, v in result["layer_ms"].items()},
                              {int(t): float(v) for t, v in result["whole_ms"].items()},
                              {int(t): float(v) for t, v in result["empty_ms"].items()},
                              repeats, cluster.emulated_speed, result.get("preprocess_ms"))
