"""YAML configuration, validated on load into typed objects. Errors name the key path.

Schema (every key optional; see configs/*.yaml for commented examples)::

    model: builtin:squeezenet1.1      # or a path to any ONNX file (relative to the config file)
    clusters: auto                    # detect from sysfs, or a mapping name -> {cores: [..], speed: s, node: n}
                                      #   (node: the Ray node the cluster lives on, placement.engine ray only)
    placement: {engine: local, address: auto, node_ip: null, orphan_timeout_s: 10}
                                      # engine ray: clusters on several hosts (hetsched.placement, README)
    emulate_big_little:               # only with clusters: auto on a host with ONE kind of core:
      little_speed: 0.5               #   split the cores into a big half and an emulated little half
    planner: {max_stages: 4, tie_tolerance: 0.02, allow_replicas: true, allow_pools: true, max_cut_tensors: 1,
              forced_cuts: null, objective: throughput, target_fps: null, traffic: auto,
              replan: {enabled: true, check_s: 2, min_gain: 0.1, threshold: 0.15}}
    profile: {repeats: 30, warmup: 5, cache: true, cache_dir: null, measure: true, refine: 2,
              cache_tolerance: 0.10}    # re-measure a cluster whose speed moved more than this
    transport: {kind: ipc, host: 127.0.0.1, hwm: 1}
    server: {bind: tcp://127.0.0.1:5555, max_inflight: null, max_pending: 64, metrics_port: null,
             metrics_host: 127.0.0.1, direct_lane: true}
    emulation: {period_ms: null}
    input: {size: 224, resize: 256, mean: [...], std: [...], channel_order: RGB, layout: auto, dtype: auto,
            labels: null, top_k: 5}      # layout auto: NHWC when the model input is [1, H, W, 3], else NCHW;
                                          # dtype auto: the model input's (float32, float16 or uint8)
    model_input: {shape: null}        # e.g. [1, 3, 320, 320]: fixes the model input's symbolic dims
    model_output: {top_k_from: null}  # the output to take top-k from (default: first [1, C] output)
    security: {server_secret_key: null, authorized_clients: null, insecure: false}   # docs/security.md
    limits: {max_message_bytes: 33554432, max_tensor_elements: 16777216, max_streams_per_client: 64,
             max_inflight_per_client: 256, max_encoded_bytes: 16777216, max_pixels: 40000000,
             max_side: 16384}                                                       # docs/protocol.md 8

The file is read with ``yaml.safe_load``: tags such as ``!!python/object`` are refused.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from hetsched.errors import ConfigError

DEFAULT_BIND = "tcp://127.0.0.1:5555"
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    cores: tuple[int, ...]
    speed: float | None = None  # emulated fraction of cycles; None = run at the core's own speed
    node: str | None = None     # the Ray node (its resource hetsched_node_<node>); placement.engine ray only


@dataclass(frozen=True)
class ReplanConfig:
    enabled: bool = True
    check_s: float = 2.0       # how often the measured speeds and traffic are compared with the plan
    min_gain: float = 0.1      # switch only when the new plan's predicted gain is at least this
    threshold: float = 0.15    # a cluster's speed must be off by this much (for check_s) to count


@dataclass(frozen=True)
class PlannerConfig:
    max_stages: int | None = 4
    tie_tolerance: float = 0.02
    allow_replicas: bool = True
    allow_pools: bool = True          # a stage may be served by workers on several clusters
    max_cut_tensors: int = 1
    forced_cuts: tuple[int, ...] | None = None
    objective: str = "throughput"     # or "latency": the lowest p99 that sustains target_fps
    target_fps: float | None = None
    traffic: str = "auto"             # plan for: auto (what clients send; raw until seen), raw, encoded
    replan: ReplanConfig = field(default_factory=ReplanConfig)


@dataclass(frozen=True)
class ProfileConfig:
    repeats: int = 30
    warmup: int = 5
    cache: bool = True
    cache_dir: str | None = None
    measure: bool = True
    refine: int = 2  # rounds of timing the planned stages as whole sub-models and re-planning
    cache_tolerance: float = 0.10  # cached costs are re-measured when the whole model's speed moved more


@dataclass(frozen=True)
class TransportConfig:
    kind: str = "ipc"  # ipc | tcp
    host: str = "127.0.0.1"
    hwm: int = 1


@dataclass(frozen=True)
class PlacementConfig:
    """Where workers run: ``local`` (this host) or ``ray`` (clusters on the Ray nodes they name)."""
    engine: str = "local"             # local | ray
    address: str = "auto"             # ray.init's address: "auto" or host:port of the head's GCS
    node_ip: str | None = None        # this (the coordinator's) node's address in the Ray cluster; None: Ray's guess
    orphan_timeout_s: float = 10.0    # a remote worker exits when its control link is down this long

    @property
    def ray(self) -> bool:
        return self.engine == "ray"


@dataclass(frozen=True)
class ServerConfig:
    bind: str = DEFAULT_BIND
    max_inflight: int | None = None  # None: 2 x workers + stages
    max_pending: int = 64
    metrics_port: int | None = None  # serve Prometheus /metrics on this port (None: off)
    metrics_host: str = "127.0.0.1"
    # local clients with shared-memory input send frames straight to a one-stage plan's workers and get
    # their answers from them (hetsched.client.lane): the coordinator leaves the per-frame path
    direct_lane: bool = True


@dataclass(frozen=True)
class InputConfig:
    size: int = 224
    resize: int = 256
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    scale: float = 1.0 / 255.0
    channel_order: str = "RGB"
    layout: str = "auto"  # NCHW | NHWC | auto (see hetsched.model.preprocess.resolve_input_config)
    labels: str | None = None
    top_k: int = 5
    dtype: str = "auto"  # float32 | float16 | uint8 | auto (the model input's); uint8: no normalisation


@dataclass(frozen=True)
class ModelInputConfig:
    shape: tuple[int, ...] | None = None  # concrete dims for the model's (first) input, batch included


@dataclass(frozen=True)
class ModelOutputConfig:
    top_k_from: str | None = None  # output name; None: the first vector-shaped output


@dataclass(frozen=True)
class SecurityConfig:
    """CURVE keys of the client socket (paths made absolute, relative to the config file)."""
    server_secret_key: str | None = None   # server.key_secret from ``hetsched keys generate``
    authorized_clients: str | None = None  # a directory of client public *.key files
    insecure: bool = False                 # allow a non-loopback bind without keys (logged loudly)


@dataclass(frozen=True)
class LimitsConfig:
    """Limits on what a peer controls. None keeps the default of ``hetsched.server.front.ServerLimits``
    or ``hetsched.model.preprocess.ImageLimits`` (listed in docs/protocol.md, section 8)."""
    max_message_bytes: int | None = None
    max_tensor_elements: int | None = None
    max_streams_per_client: int | None = None
    max_inflight_per_client: int | None = None
    max_encoded_bytes: int | None = None
    max_pixels: int | None = None
    max_side: int | None = None

    SERVER_KEYS = ("max_message_bytes", "max_tensor_elements", "max_streams_per_client", "max_inflight_per_client")
    IMAGE_KEYS = ("max_encoded_bytes", "max_pixels", "max_side")

    def server_overrides(self) -> dict:
        return {k: getattr(self, k) for k in self.SERVER_KEYS if getattr(self, k) is not None}

    def image_overrides(self) -> dict:
        return {k: getattr(self, k) for k in self.IMAGE_KEYS if getattr(self, k) is not None}


@dataclass(frozen=True)
class Config:
    model: str = "builtin:squeezenet1.1"
    clusters: tuple[ClusterConfig, ...] | None = None  # None = auto
    little_speed: float | None = None  # emulate_big_little.little_speed
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    input: InputConfig = field(default_factory=InputConfig)
    model_input: ModelInputConfig = field(default_factory=ModelInputConfig)
    model_output: ModelOutputConfig = field(default_factory=ModelOutputConfig)
    emulation_period_ms: float | None = None
    security: SecurityConfig = field(default_factory=SecurityConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    path: str | None = None

    def with_overrides(self, **kw: Any) -> "Config":
        return dataclasses.replace(self, **kw)


def _expect(value: Any, types: type | tuple, key: str, what: str) -> Any:
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ConfigError(f"{key}: expected {what}, got {value!r}")
    if not isinstance(value, types):
        raise ConfigError(f"{key}: expected {what}, got {value!r}")
    return value


def _section(raw: Mapping, key: str, cls: type, converters: Mapping[str, Any], prefix: str = "") -> Any:
    sec = raw.get(key)
    path = prefix + key
    if sec is None:
        return cls()
    _expect(sec, dict, path, "a mapping")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(sec) - known)
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in sec.items():
        conv = converters.get(name)
        kwargs[name] = conv(value, f"{path}.{name}") if conv else value
    return cls(**kwargs)


def _int(lo: int | None = None) -> Any:
    def conv(v: Any, key: str) -> int:
        _expect(v, int, key, "an integer")
        if lo is not None and v < lo:
            raise ConfigError(f"{key}: must be >= {lo}, got {v}")
        return v
    return conv


def _opt_int(lo: int) -> Any:
    def conv(v: Any, key: str) -> int | None:
        return None if v is None else _int(lo)(v, key)
    return conv


def _float(lo: float, hi: float) -> Any:
    def conv(v: Any, key: str) -> float:
        _expect(v, (int, float), key, "a number")
        if not lo <= v <= hi:
            raise ConfigError(f"{key}: must be between {lo} and {hi}, got {v}")
        return float(v)
    return conv


def _opt_float(lo: float, hi: float) -> Any:
    def conv(v: Any, key: str) -> float | None:
        return None if v is None else _float(lo, hi)(v, key)
    return conv


def _bool(v: Any, key: str) -> bool:
    return _expect(v, bool, key, "true or false")


def _str(v: Any, key: str) -> str:
    return _expect(v, str, key, "a string")


def _opt_str(v: Any, key: str) -> str | None:
    return None if v is None else _str(v, key)


def _choice(*options: str) -> Any:
    def conv(v: Any, key: str) -> str:
        _expect(v, str, key, "a string")
        if v not in options:
            raise ConfigError(f"{key}: must be one of {', '.join(options)}, got {v!r}")
        return v
    return conv


def _triple(v: Any, key: str) -> tuple[float, float, float]:
    _expect(v, list, key, "a list of 3 numbers")
    if len(v) != 3:
        raise ConfigError(f"{key}: expected 3 numbers, got {len(v)}")
    return tuple(float(_expect(x, (int, float), f"{key}[{i}]", "a number")) for i, x in enumerate(v))


def _cuts(v: Any, key: str) -> tuple[int, ...] | None:
    if v is None:
        return None
    _expect(v, list, key, "a list of boundary indices")
    return tuple(_int(1)(x, f"{key}[{i}]") for i, x in enumerate(v))


def _shape(v: Any, key: str) -> tuple[int, ...] | None:
    if v is None:
        return None
    _expect(v, list, key, "a list of positive integers (the input shape, batch first)")
    if not v:
        raise ConfigError(f"{key}: empty (give every dim, batch first, e.g. [1, 3, 224, 224])")
    return tuple(_int(1)(x, f"{key}[{i}]") for i, x in enumerate(v))


def _clusters(raw: Any, key: str) -> tuple[ClusterConfig, ...] | None:
    if raw is None or raw == "auto":
        return None
    if isinstance(raw, str):
        raise ConfigError(f"{key}: expected 'auto' or a mapping of cluster name -> {{cores: [...]}}, got {raw!r}")
    _expect(raw, dict, key, "'auto' or a mapping of clusters")
    if not raw:
        raise ConfigError(f"{key}: at least one cluster is needed")
    out = []
    seen: dict[tuple, str] = {}
    for name, spec in raw.items():
        ck = f"{key}.{name}"
        _expect(spec, dict, ck, "a mapping with 'cores'")
        unknown = sorted(set(spec) - {"cores", "speed", "node"})
        if unknown:
            raise ConfigError(f"{ck}.{unknown[0]}: unknown key (known: cores, node, speed)")
        if "cores" not in spec:
            raise ConfigError(f"{ck}.cores: missing (a list of CPU ids)")
        cores = _expect(spec["cores"], list, f"{ck}.cores", "a list of CPU ids")
        if not cores:
            raise ConfigError(f"{ck}.cores: empty")
        where = spec.get("node")  # the same core ids may be used on different nodes
        for i, c in enumerate(cores):
            _int(0)(c, f"{ck}.cores[{i}]")
            if (where, c) in seen:
                raise ConfigError(f"{ck}.cores[{i}]: core {c} is already in cluster {seen[where, c]!r}")
            seen[where, c] = str(name)
        speed = spec.get("speed")
        if speed is not None:
            speed = _float(0.05, 1.0)(speed, f"{ck}.speed")
            if speed == 1.0:
                speed = None
        node = spec.get("node")
        if node is not None:
            node = _node_name(node, f"{ck}.node")
        out.append(ClusterConfig(str(name), tuple(cores), speed, node))
    return tuple(out)


def _node_name(v: Any, key: str) -> str:
    _expect(v, str, key, "a Ray node name (the NAME of its resource hetsched_node_NAME)")
    if not NODE_NAME.fullmatch(v):
        raise ConfigError(f"{key}: {v!r} is not a node name (letters, digits, '.', '_', '-'; at most 64)")
    return v


def parse_config(raw: Any, path: str | None = None) -> Config:
    if raw is None:
        raw = {}
    _expect(raw, dict, "<top level>", "a mapping")
    known = {"model", "clusters", "emulate_big_little", "planner", "profile", "transport", "server", "input", "emulation",
             "security", "limits", "model_input", "model_output", "placement"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    model = _str(raw.get("model", "builtin:squeezenet1.1"), "model")
    if path and not model.startswith("builtin:") and not os.path.isabs(model):
        model = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), model))
    clusters = _clusters(raw.get("clusters", "auto"), "clusters")
    little = None
    ebl = raw.get("emulate_big_little")
    if ebl is not None:
        _expect(ebl, dict, "emulate_big_little", "a mapping with little_speed")
        unknown = sorted(set(ebl) - {"little_speed"})
        if unknown:
            raise ConfigError(f"emulate_big_little.{unknown[0]}: unknown key (known: little_speed)")
        little = _float(0.05, 1.0)(ebl.get("little_speed", 0.5), "emulate_big_little.little_speed")
        if clusters is not None:
            raise ConfigError("emulate_big_little: only valid with clusters: auto (give 'speed' per cluster instead)")
    planner = _section(raw, "planner", PlannerConfig, {
        "max_stages": _opt_int(1), "tie_tolerance": _float(0.0, 1.0), "allow_replicas": _bool,
        "allow_pools": _bool, "max_cut_tensors": _int(1), "forced_cuts": _cuts,
        "objective": _choice("throughput", "latency"), "target_fps": _opt_float(0.1, 1e6),
        "traffic": _choice("auto", "raw", "encoded"),
        "replan": lambda v, key: _section({key.split(".")[-1]: v}, key.split(".")[-1], ReplanConfig, {
            "enabled": _bool, "check_s": _float(0.2, 3600.0), "min_gain": _float(0.0, 10.0),
            "threshold": _float(0.01, 10.0)}, prefix="planner.")})
    if planner.objective == "latency" and planner.target_fps is None:
        raise ConfigError("planner.target_fps: missing (objective 'latency' plans the lowest p99 that sustains "
                          "this rate, e.g. target_fps: 30)")
    profile = _section(raw, "profile", ProfileConfig, {
        "repeats": _int(3), "warmup": _int(0), "cache": _bool, "cache_dir": _opt_str, "measure": _bool,
        "refine": _int(0), "cache_tolerance": _float(0.0, 10.0)})
    transport = _section(raw, "transport", TransportConfig, {
        "kind": _choice("ipc", "tcp"), "host": _str, "hwm": _int(1)})
    placement = _placement(raw, clusters)
    server = _section(raw, "server", ServerConfig, {
        "bind": _str, "max_inflight": _opt_int(1), "max_pending": _int(1), "metrics_port": _opt_int(0),
        "metrics_host": _str, "direct_lane": _bool})
    inp = _section(raw, "input", InputConfig, {
        "size": _int(8), "resize": _int(8), "mean": _triple, "std": _triple, "scale": _float(0.0, 1e6),
        "channel_order": _choice("RGB", "BGR"), "layout": _choice("NCHW", "NHWC", "auto"),
        "labels": _opt_str, "top_k": _int(1), "dtype": _choice("float32", "float16", "uint8", "auto")})
    model_input = _section(raw, "model_input", ModelInputConfig, {"shape": _shape})
    model_output = _section(raw, "model_output", ModelOutputConfig, {"top_k_from": _opt_str})
    if inp.labels and path and not os.path.isabs(inp.labels):
        inp = dataclasses.replace(inp, labels=os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), inp.labels)))
    emu = raw.get("emulation") or {}
    _expect(emu, dict, "emulation", "a mapping")
    period = emu.get("period_ms")
    if period is not None:
        period = _float(0.1, 100.0)(period, "emulation.period_ms")
    security = _security(raw, path)
    limits = _section(raw, "limits", LimitsConfig, {
        "max_message_bytes": _opt_int(64 * 1024), "max_tensor_elements": _opt_int(1),
        "max_streams_per_client": _opt_int(1), "max_inflight_per_client": _opt_int(1),
        "max_encoded_bytes": _opt_int(1024), "max_pixels": _opt_int(64), "max_side": _opt_int(8)})
    return Config(model=model, clusters=clusters, little_speed=little, planner=planner, profile=profile,
                  transport=transport, placement=placement, server=server, input=inp, model_input=model_input,
                  model_output=model_output, emulation_period_ms=period,
                  security=security, limits=limits, path=path)


def _placement(raw: Mapping, clusters: tuple[ClusterConfig, ...] | None) -> PlacementConfig:
    pl = _section(raw, "placement", PlacementConfig, {
        "engine": _choice("local", "ray"), "address": _str, "node_ip": _opt_str,
        "orphan_timeout_s": _float(1.0, 3600.0)})
    if not pl.address.strip():
        raise ConfigError("placement.address: empty (\"auto\" or the head node's host:port)")
    for c in clusters or ():
        if pl.ray and c.node is None:
            raise ConfigError(f"clusters.{c.name}.node: missing (with placement.engine ray every cluster names "
                              "the Ray node it lives on, e.g. node: board-a)")
        if not pl.ray and c.node is not None:
            raise ConfigError(f"clusters.{c.name}.node: only with placement.engine ray (this config places every "
                              "worker on this host)")
    return pl


def _security(raw: Mapping, path: str | None) -> SecurityConfig:
    sec = _section(raw, "security", SecurityConfig, {
        "server_secret_key": _opt_str, "authorized_clients": _opt_str, "insecure": _bool})
    base = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()

    def absolute(p: str | None) -> str | None:
        if p is None:
            return None
        p = os.path.expanduser(p)
        return os.path.normpath(p if os.path.isabs(p) else os.path.join(base, p))

    key, allowed = absolute(sec.server_secret_key), absolute(sec.authorized_clients)
    if key is not None and allowed is None:
        raise ConfigError("security.authorized_clients: missing (a directory of client public *.key files; "
                          "needed with security.server_secret_key)")
    if allowed is not None and key is None:
        raise ConfigError("security.server_secret_key: missing (the server's .key_secret file; needed with "
                          "security.authorized_clients)")
    if key is not None:
        if not os.path.isfile(key):
            raise ConfigError(f"security.server_secret_key: file not found: {key}")
        if not os.path.isdir(allowed):
            raise ConfigError(f"security.authorized_clients: not a directory: {allowed}")
        if sec.insecure:
            raise ConfigError("security.insecure: must be false when keys are configured")
    return SecurityConfig(key, allowed, sec.insecure)


def load_config(path: str) -> Config:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        try:
            raw = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return parse_config(raw, path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _online_cpus() -> set[int]:
    try:
        from hetsched.host.topology import parse_cpulist
        with open("/sys/devices/system/cpu/online", encoding="utf-8") as fh:
            return set(parse_cpulist(fh.read()))
    except (OSError, ImportError, ValueError):
        return set(range(os.cpu_count() or 1))


def resolve_clusters(cfg: Config, topology, existing: set[int] | None = None,
                     allowed: set[int] | None = None) -> list:
    """The clusters to run on: from the config's explicit lists, or the detected topology.

    Returns ``hetsched.host.topology.Cluster`` objects, fastest first as configured, with
    ``emulated_speed`` set where the config asks for emulation. Core ids are checked against the
    host (``existing``) and the process's allowed CPU set (``allowed``); errors name the key.
    """
    from hetsched.host.topology import Cluster, format_cpulist

    if cfg.placement.ray:
        raise ConfigError("placement.engine: ray places clusters on Ray nodes, and this command runs on this "
                          "host only (plan, start, demo, profile and topology --ray use Ray)")
    allowed = set(os.sched_getaffinity(0)) if allowed is None else set(allowed)
    existing = _online_cpus() | allowed if existing is None else set(existing)
    if cfg.clusters is None:
        clusters = list(topology.clusters)
        if cfg.little_speed is not None and len(clusters) == 1:
            cores = clusters[0].cores
            if len(cores) < 2:
                raise ConfigError("emulate_big_little: needs at least 2 allowed cores, host has "
                                  f"{format_cpulist(cores)}")
            half = (len(cores) + 1) // 2
            base = clusters[0]
            clusters = [Cluster("big", tuple(cores[:half]), 1.0, base.capacity, base.max_freq_khz),
                        Cluster("little", tuple(cores[half:]), cfg.little_speed, base.capacity, base.max_freq_khz,
                                emulated_speed=cfg.little_speed)]
        return clusters
    out = []
    host = format_cpulist(sorted(existing))
    for cc in cfg.clusters:
        for i, core in enumerate(cc.cores):
            if core not in existing:
                raise ConfigError(f"clusters.{cc.name}.cores[{i}]: core {core} does not exist on this host ({host})")
            if core not in allowed:
                raise ConfigError(f"clusters.{cc.name}.cores[{i}]: core {core} is outside this process's allowed "
                                  f"CPU set ({format_cpulist(sorted(allowed))})")
        out.append(Cluster(cc.name, tuple(cc.cores), cc.speed if cc.speed is not None else 1.0,
                           emulated_speed=cc.speed))
    return out
