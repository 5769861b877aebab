"""Benchmark scenarios: the clusters every contender runs on, with the cores the bench slows down
(emulation) and the config the hetsched service gets for them."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

from hetsched.bench.options import BenchOptions
from hetsched.errors import HetschedError


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

    def speed(self, core: int) -> float:
        """The share of its cycles a core delivers under the bench's emulation (1.0: not slowed)."""
        return self.emulated.get(core, 1.0)

    def fastest_cluster(self):
        """Highest (emulated) speed; ties go to the cluster listed first (configs list big first)."""
        best = None
        for c in self.clusters:
            s = c.emulated_speed if c.emulated_speed is not None else c.speed
            if best is None or s > best[0] + 1e-9:
                best = (s, c)
        return best[1]

    def service_raw(self, profile_repeats: int | None = None) -> dict:
        """The config ``hetsched start`` gets: the scenario's own, with the same clusters WITHOUT
        ``speed`` (the bench owns the emulation for the whole scenario, so the service must not start
        co-runners of its own; it profiles the emulated cores and finds them slow by itself, as on a
        real big.LITTLE chip), no bind (the bench passes ``--bind``) and no ``profile.cache_dir`` (the
        bench points HETSCHED_CACHE_DIR at a fresh directory: a first-time user's empty cache).
        Nothing is added for the planner. ``profile_repeats`` (``--quick`` only) shortens profiling (and at most one refining round)."""
        raw = copy.deepcopy(self.raw)
        raw["model"] = self.cfg.model
        raw.pop("emulate_big_little", None)
        raw.pop("emulation", None)
        if self.emulated or raw.get("clusters", "auto") != "auto":
            raw["clusters"] = {c.name: {"cores": list(c.cores)} for c in self.clusters}
        prof = dict(raw.get("profile") or {})
        prof.pop("cache_dir", None)
        if profile_repeats:
            prof["repeats"] = profile_repeats
            prof["warmup"] = min(prof.get("warmup", 5), 2)
            prof["refine"] = min(prof.get("refine", 1), 1)
        if prof:
            raw["profile"] = prof
        else:
            raw.pop("profile", None)
        srv = dict(raw.get("server") or {})
        srv.pop("bind", None)
        raw["server"] = srv
        if isinstance(raw.get("input"), dict):
            raw["input"] = {k: v for k, v in raw["input"].items() if k != "labels"}
        return raw


def allowed_cores() -> list[int]:
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
        cores = allowed_cores()
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


def ort_specs(sc: Scenario, replicas: str) -> dict[str, list[list[dict]]]:
    """Per onnxruntime contender, its processes, each a list of sessions (cores, threads):
    ``ort-all``: one session, threads = every core; ``ort-fastest-cluster``: one session on the
    fastest cluster only (None with one cluster: it would be ort-all again); ``ort-replicas``: one
    single-threaded session per core, in one process per core (``replicas="processes"``) or as
    threads of one process (``"threads"``)."""
    cores = sc.cores
    fast = sc.fastest_cluster()
    singles = [{"cores": [c], "threads": 1} for c in cores]
    return {
        "ort-all": [[{"cores": cores, "threads": len(cores)}]],
        "ort-fastest-cluster": ([[{"cores": list(fast.cores), "threads": len(fast.cores)}]]
                                if len(sc.clusters) > 1 else None),
        "ort-replicas": [[s] for s in singles] if replicas == "processes" else [singles],
    }
