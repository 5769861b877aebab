"""CPU topology detection from Linux sysfs: which logical CPUs form which cluster, how fast each is.

Everything is read relative to ``sysfs_root`` (``/sys`` on a real host, a fixture tree in tests):

* ``devices/system/cpu/online``                     online CPUs (cpulist, e.g. ``0-2,4-7``)
* ``devices/system/cpu/cpuN/cpu_capacity``          scheduler capacity, fastest core = 1024 (ARM)
* ``devices/system/cpu/cpuN/cpufreq/cpuinfo_max_freq``  maximum frequency in kHz
* ``devices/system/cpu/cpuN/topology/thread_siblings_list``  SMT siblings of cpuN (cpulist)
* ``devices/cpu_core/cpus`` and ``devices/cpu_atom/cpus``   Intel hybrid P-/E-core lists (cpulist)

If ``devices/system/cpu/online`` is missing, the ``cpuN`` directories are enumerated instead
(skipping those whose ``cpuN/online`` reads ``0``).

Grouping: order of trust (the first source that applies decides; ``Topology.source`` names it)
-------------------------------------------------------------------------------------------
1. ``cpu_capacity`` -- when every online CPU has a readable ``cpu_capacity``. CPUs with equal
   capacity form one cluster; speed = capacity / largest capacity. If all capacities are equal
   the host is homogeneous: one cluster ``"cpu"``, source still ``"cpu_capacity"`` (this is what
   a typical x86 VM with a recent kernel reports: 1024 on every core). Capacity beats cpufreq:
   on an RK3588 the two A76 pairs have different max freqs but the same capacity 1024.
2. ``intel_hybrid`` -- when both ``devices/cpu_core/cpus`` and ``devices/cpu_atom/cpus`` exist,
   are disjoint, and together cover every online CPU. Clusters ``"p-core"`` and ``"e-core"``.
   Checked *before* cpufreq because P-cores often have per-core max freqs (turbo bins / favoured
   cores) that cpufreq grouping would split into several clusters. Speed: ratio of the clusters'
   highest ``cpuinfo_max_freq`` when cpufreq is readable for every online CPU, else
   p-core 1.0 / e-core 0.6 (:data:`INTEL_E_CORE_DEFAULT_SPEED`).
3. ``cpufreq`` -- when every online CPU has a readable ``cpuinfo_max_freq``: CPUs with equal max
   freq (exact kHz) form one cluster; speed = max freq / highest max freq. All equal -> one
   cluster ``"cpu"`` with source ``"cpufreq"``.
4. ``uniform`` -- nothing above is available: one cluster ``"cpu"`` with speed 1.0.

So ``source`` always names the evidence that decided the grouping, even when the result is a
single cluster; ``"uniform"`` means "no evidence, assumed homogeneous".

Naming and filtering
--------------------
Cluster *kinds* are found over all online CPUs and named by their count: 1 -> ``"cpu"``,
2 -> ``"big"``/``"little"``, 3 -> ``"prime"``/``"mid"``/``"little"``, more -> ``"cluster0"``,
``"cluster1"``... (fastest first); Intel hybrid always uses ``"p-core"``/``"e-core"``. Only then
are CPUs outside ``allowed_cpus`` removed (so restricting the affinity to the A55 cores of an
RK3588 still yields a cluster called ``"little"``); clusters left empty are dropped and speeds
are renormalised so the fastest remaining cluster has speed 1.0.

``allowed_cpus=None`` means ``os.sched_getaffinity(0)`` when reading the real ``/sys`` and "all
CPUs" for any other root (fixture trees). If nothing remains, :class:`TopologyError` is raised.

``Cluster.emulated_speed`` is never set here: the config/emulation layer sets it (with
:func:`dataclasses.replace`) when it slows a cluster down by duty-cycling it; it is the fraction
of the cluster's native cycles that the emulation lets through (0.5 = runs half the time).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from hetsched.errors import TopologyError

__all__ = [
    "Cluster",
    "Topology",
    "detect_topology",
    "format_topology",
    "parse_cpulist",
    "format_cpulist",
    "cluster_names",
    "INTEL_E_CORE_DEFAULT_SPEED",
    "SOURCES",
]

#: Relative speed assumed for Intel E-cores when cpufreq gives no max frequencies.
INTEL_E_CORE_DEFAULT_SPEED = 0.6

#: Possible values of :attr:`Topology.source`, in order of trust.
SOURCES = ("cpu_capacity", "intel_hybrid", "cpufreq", "uniform")

_CPU_DIR_RE = re.compile(r"^cpu(\d+)$")


@dataclass(frozen=True)
class Cluster:
    """A set of identical logical CPUs."""

    name: str
    cores: tuple[int, ...]
    speed: float
    capacity: int | None = None
    max_freq_khz: int | None = None
    smt_siblings: tuple[tuple[int, ...], ...] = ()
    emulated_speed: float | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "cores": list(self.cores),
            "speed": self.speed,
            "capacity": self.capacity,
            "max_freq_khz": self.max_freq_khz,
            "smt_siblings": [list(g) for g in self.smt_siblings],
            "emulated": self.emulated_speed is not None,
            "emulated_speed": self.emulated_speed,
        }


@dataclass(frozen=True)
class Topology:
    """Clusters of a host, fastest first."""

    clusters: tuple[Cluster, ...]
    source: str
    sysfs_root: str

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "sysfs_root": self.sysfs_root,
            "clusters": [c.to_dict() for c in self.clusters],
        }

    def all_cores(self) -> tuple[int, ...]:
        return tuple(sorted(core for c in self.clusters for core in c.cores))

    def cluster(self, name: str) -> Cluster:
        for c in self.clusters:
            if c.name == name:
                return c
        available = ", ".join(repr(c.name) for c in self.clusters) or "none"
        raise TopologyError(f"no cluster named {name!r}; available clusters: {available}")


# --------------------------------------------------------------------------- pure parsing


def parse_cpulist(text: str) -> tuple[int, ...]:
    """Parse a kernel cpulist ("0-3,6", "0,2,4-7", "0-7:2/4", "" ...) into sorted unique ids.

    Whitespace and a trailing newline are ignored; an empty string is the empty list. The
    kernel's group syntax ``a-b:used/group`` (first ``used`` of every ``group`` CPUs) is
    supported. Anything else malformed raises :class:`TopologyError`.
    """
    s = "".join(text.split())
    if not s:
        return ()
    cpus: set[int] = set()
    for item in s.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+)/(\d+))?)?", item)
        if m is None:
            raise TopologyError(f"malformed cpulist {text.strip()!r}: bad item {item!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise TopologyError(f"malformed cpulist {text.strip()!r}: range {item!r} is reversed")
        if m.group(3) is not None:
            used, group = int(m.group(3)), int(m.group(4))
            if used == 0 or group == 0 or used > group:
                raise TopologyError(f"malformed cpulist {text.strip()!r}: bad group {item!r}")
            cpus.update(c for c in range(lo, hi + 1) if (c - lo) % group < used)
        else:
            cpus.update(range(lo, hi + 1))
    return tuple(sorted(cpus))


def format_cpulist(cores) -> str:
    """Inverse of :func:`parse_cpulist` (without group syntax): (0,1,2,3,6) -> "0-3,6"."""
    ids = sorted(set(cores))
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


def cluster_names(n_kinds: int) -> list[str]:
    """Names for ``n_kinds`` kinds of core, fastest first."""
    if n_kinds <= 0:
        return []
    if n_kinds == 1:
        return ["cpu"]
    if n_kinds == 2:
        return ["big", "little"]
    if n_kinds == 3:
        return ["prime", "mid", "little"]
    return [f"cluster{i}" for i in range(n_kinds)]


# --------------------------------------------------------------------------- sysfs reading


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _read_int(path: str) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _cpu_root(sysfs_root: str) -> str:
    return os.path.join(sysfs_root, "devices", "system", "cpu")


def _online_cpus(sysfs_root: str) -> tuple[int, ...] | None:
    """Online CPU ids, or None when the sysfs CPU directory does not exist at all."""
    cpu_root = _cpu_root(sysfs_root)
    online_path = os.path.join(cpu_root, "online")
    text = _read(online_path)
    if text is not None:
        try:
            return parse_cpulist(text)
        except TopologyError as e:
            raise TopologyError(f"{online_path}: {e}") from None
    try:
        entries = os.listdir(cpu_root)
    except OSError:
        return None
    cpus = []
    for entry in entries:
        m = _CPU_DIR_RE.match(entry)
        if m is None:
            continue
        if (_read(os.path.join(cpu_root, entry, "online")) or "1").strip() == "0":
            continue
        cpus.append(int(m.group(1)))
    return tuple(sorted(cpus))


def _per_cpu_ints(sysfs_root: str, cpus, rel: str) -> dict[int, int]:
    cpu_root = _cpu_root(sysfs_root)
    out = {}
    for cpu in cpus:
        v = _read_int(os.path.join(cpu_root, f"cpu{cpu}", rel))
        if v is not None:
            out[cpu] = v
    return out


def _intel_hybrid(sysfs_root: str, online: tuple[int, ...]):
    """(p_cores, e_cores) restricted to online CPUs, or None if not a usable hybrid layout."""
    p_text = _read(os.path.join(sysfs_root, "devices", "cpu_core", "cpus"))
    e_text = _read(os.path.join(sysfs_root, "devices", "cpu_atom", "cpus"))
    if p_text is None or e_text is None:
        return None
    try:
        p, e = set(parse_cpulist(p_text)), set(parse_cpulist(e_text))
    except TopologyError:
        return None
    if not p or not e or p & e or not set(online) <= (p | e):
        return None
    on = set(online)
    return tuple(sorted(p & on)), tuple(sorted(e & on))


def _thread_siblings(sysfs_root: str, cpu: int) -> tuple[int, ...]:
    text = _read(os.path.join(_cpu_root(sysfs_root), f"cpu{cpu}", "topology", "thread_siblings_list"))
    if text is None:
        return ()
    try:
        return parse_cpulist(text)
    except TopologyError:
        return ()


def _default_allowed(sysfs_root: str) -> set[int] | None:
    if os.path.realpath(sysfs_root) == "/sys" and hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return None


# --------------------------------------------------------------------------- detection


def detect_topology(sysfs_root: str = "/sys", allowed_cpus: set[int] | None = None) -> Topology:
    """Detect the CPU clusters under ``sysfs_root`` (see the module docstring for the rules)."""
    if allowed_cpus is None:
        allowed = _default_allowed(sysfs_root)
    else:
        allowed = {int(c) for c in allowed_cpus}

    online = _online_cpus(sysfs_root)
    if online is None:
        if os.path.realpath(sysfs_root) == "/sys" and allowed:
            # /sys not mounted (some containers): all we know is our affinity mask.
            online = tuple(sorted(allowed))
        else:
            raise TopologyError(f"no CPU information under {_cpu_root(sysfs_root)!r}")
    if not online:
        raise TopologyError(f"no online CPUs listed under {_cpu_root(sysfs_root)!r}")

    caps = _per_cpu_ints(sysfs_root, online, "cpu_capacity")
    freqs = _per_cpu_ints(sysfs_root, online, os.path.join("cpufreq", "cpuinfo_max_freq"))
    all_caps = len(caps) == len(online)
    all_freqs = len(freqs) == len(online)

    # kinds: list of (name or None, metric, cores), fastest first
    kinds: list[tuple[str | None, float, tuple[int, ...]]]
    hybrid = None if all_caps else _intel_hybrid(sysfs_root, online)
    if all_caps:
        source = "cpu_capacity"
        kinds = _group_by(caps)
    elif hybrid is not None:
        source = "intel_hybrid"
        p, e = hybrid
        if all_freqs:
            p_m = max((freqs[c] for c in p), default=0)
            e_m = max((freqs[c] for c in e), default=0)
        else:
            p_m, e_m = 1.0, INTEL_E_CORE_DEFAULT_SPEED
        kinds = [("p-core", p_m, p), ("e-core", e_m, e)]
        kinds = [k for k in kinds if k[2]]
        kinds.sort(key=lambda k: -k[1])  # stable: p-core first on a tie
    elif all_freqs:
        source = "cpufreq"
        kinds = _group_by(freqs)
    else:
        source = "uniform"
        kinds = [(None, 1.0, tuple(online))]

    names = cluster_names(len(kinds))
    kinds = [(name if name is not None else names[i], metric, cores)
             for i, (name, metric, cores) in enumerate(kinds)]

    # filter by allowed CPUs, drop empty clusters
    if allowed is not None:
        kinds = [(n, m, tuple(c for c in cores if c in allowed)) for n, m, cores in kinds]
        kinds = [k for k in kinds if k[2]]
    if not kinds:
        raise TopologyError(
            f"no usable CPUs: online CPUs under {sysfs_root!r} are {format_cpulist(online) or 'none'}"
            f" but the allowed CPUs are {format_cpulist(allowed or ()) or 'none'}"
        )

    fastest = max(m for _, m, _ in kinds)
    clusters = []
    for name, metric, cores in kinds:
        speed = metric / fastest if fastest > 0 else 1.0
        capacity = caps[cores[0]] if all_caps else None
        max_freq = max(freqs[c] for c in cores) if all(c in freqs for c in cores) else None
        clusters.append(Cluster(
            name=name,
            cores=cores,
            speed=speed,
            capacity=capacity,
            max_freq_khz=max_freq,
            smt_siblings=_smt_groups(sysfs_root, cores),
        ))
    return Topology(clusters=tuple(clusters), source=source, sysfs_root=sysfs_root)


def _group_by(values: dict[int, int]) -> list[tuple[None, float, tuple[int, ...]]]:
    groups: dict[int, list[int]] = {}
    for cpu, v in values.items():
        groups.setdefault(v, []).append(cpu)
    return [(None, float(v), tuple(sorted(groups[v]))) for v in sorted(groups, reverse=True)]


def _smt_groups(sysfs_root: str, cores: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    members = set(cores)
    groups = set()
    for cpu in cores:
        g = tuple(c for c in _thread_siblings(sysfs_root, cpu) if c in members)
        if len(g) > 1:
            groups.add(g)
    return tuple(sorted(groups))


# --------------------------------------------------------------------------- formatting


def format_topology(topo: Topology) -> str:
    """Human-readable table of the clusters, emulation notes and the detection source."""
    header = ("cluster", "cores", "speed", "capacity", "max freq", "SMT")
    rows = []
    for c in topo.clusters:
        rows.append((
            c.name,
            format_cpulist(c.cores),
            f"{c.speed:.3f}",
            str(c.capacity) if c.capacity is not None else "-",
            f"{c.max_freq_khz / 1e6:.2f} GHz" if c.max_freq_khz is not None else "-",
            " ".join("(" + ",".join(map(str, g)) + ")" for g in c.smt_siblings) or "-",
        ))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        return "  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    for c in topo.clusters:
        if c.emulated_speed is not None:
            out.append(
                f"EMULATED: cluster {c.name} delivers {c.emulated_speed * 100:.0f}% of its cycles"
                f" (duty-cycled; emulated_speed={c.emulated_speed:g})"
            )
    out.append(f"source: {topo.source} (sysfs root {topo.sysfs_root})")
    return "\n".join(out)
