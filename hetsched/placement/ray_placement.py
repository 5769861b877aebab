"""One service run on Ray: the clusters on their nodes, checked there; how to plan, profile and
start workers across the nodes (``placement.engine: ray``).

* clusters: each explicit cluster names its node; its cores are checked against the CPUs that
  node reports (its own sysfs, its raylet's allowed set). ``clusters: auto`` takes every node's
  detected clusters, named ``<node>.<cluster>``.
* links: workers on the coordinator's node are linked by shared-memory rings (unless
  ``transport.kind: tcp``), the others over tcp:// with CURVE; each tcp:// node's link is probed
  at start and the planner charges its clusters' crossings with what was measured.
* the coordinator binds its sockets on its own node's address in the Ray cluster, every worker
  on its node's address.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from hetsched.errors import ConfigError
from hetsched.host.topology import Cluster, format_cpulist
from hetsched.placement.cores import CoreMap, planner_clusters
from hetsched.placement.nodes import RayNode, require_nodes
from hetsched.placement.ray_cluster import NodeTopology, RayCluster
from hetsched.planning.links import LinkProbe, link_transfer
from hetsched.planning.plan import ClusterSpec, TransferModel

log = logging.getLogger(__name__)


def check_cores(name: str, cores, where: NodeTopology) -> None:
    """A cluster's cores must exist on its node and be usable there; errors name the key."""
    for i, core in enumerate(cores):
        if core not in where.online:
            raise ConfigError(f"clusters.{name}.cores[{i}]: core {core} does not exist on node {where.node} "
                              f"({where.hostname}: {format_cpulist(where.online)})")
        if core not in where.allowed:
            raise ConfigError(f"clusters.{name}.cores[{i}]: core {core} is outside the CPU set of node "
                              f"{where.node}'s raylet ({format_cpulist(where.allowed)})")


class RayPlacement:
    def __init__(self, cfg: Any, cluster: RayCluster | None = None):
        self.cfg = cfg
        self.ray = cluster or RayCluster(cfg.placement.address, cfg.placement.node_ip)
        try:
            self.home: RayNode | None = self.ray.home
            self.nodes_of: dict[str, RayNode] = {}   # cluster name -> its node
            self.clusters: list[Cluster] = self._resolve()
            self.all_tcp = cfg.transport.kind == "tcp"
            self.probes: dict[str, LinkProbe] = {}
            self._launcher = None
        except BaseException:
            self.ray.shutdown()
            raise

    # ------------------------------------------------------------------ clusters
    def _resolve(self) -> list[Cluster]:
        cfg = self.cfg
        nodes = self.ray.nodes
        if cfg.clusters is None:
            if not nodes:
                raise ConfigError("clusters: auto with placement.engine ray, but no Ray node declares a "
                                  "hetsched_node_<name> resource")
            out = []
            for node, topo in sorted(self.ray.topologies().items()):
                for c in topo.topology.clusters:
                    out.append(Cluster(f"{node}.{c.name}", c.cores, c.speed, c.capacity, c.max_freq_khz,
                                       c.smt_siblings))
                    self.nodes_of[out[-1].name] = nodes[node]
            return out
        require_nodes(nodes, [(c.name, c.node) for c in cfg.clusters])
        topos = self.ray.topologies(sorted({c.node for c in cfg.clusters}))
        out = []
        for cc in cfg.clusters:
            node = nodes[cc.node]
            check_cores(cc.name, cc.cores, topos[cc.node])
            if cc.speed is not None and not self.is_home(node):
                where = f"node {self.home.name}" if self.home else "this host (no hetsched node here)"
                raise ConfigError(f"clusters.{cc.name}.speed: emulated speeds run on the coordinator's node only "
                                  f"({where}); cluster {cc.name} is on node {cc.node}")
            self.nodes_of[cc.name] = node
            out.append(Cluster(cc.name, tuple(cc.cores), cc.speed if cc.speed is not None else 1.0,
                               emulated_speed=cc.speed))
        return out

    def is_home(self, node: RayNode) -> bool:
        return self.home is not None and node.node_id == self.home.node_id

    @property
    def local_clusters(self) -> list[Cluster]:
        """The clusters on the coordinator's own node (where it may pin itself, emulate, map rings)."""
        return [c for c in self.clusters if self.is_home(self.nodes_of[c.name])]

    def framed(self, cluster: str) -> bool:
        """Does a worker of ``cluster`` get its tensors in tcp:// messages (not shared memory)?"""
        return self.all_tcp or not self.is_home(self.nodes_of[cluster])

    # ------------------------------------------------------------------ planning
    def planner_clusters(self) -> tuple[list[ClusterSpec], CoreMap]:
        return planner_clusters(self.clusters, {c: n.name for c, n in self.nodes_of.items()})

    def transfer(self, base: TransferModel, progress: Callable[[str], None] | None = None) -> TransferModel:
        """``base`` with each tcp:// cluster's crossings over its node's link, probed now."""
        from hetsched.placement.probe import describe, probe_nodes
        wanted = {self.nodes_of[c.name].name: self.nodes_of[c.name] for c in self.clusters if self.framed(c.name)}
        self.probes = probe_nodes(list(wanted.values()))
        if progress and self.probes:
            progress(f"links to the coordinator ({self.ray.home_ip}): {describe(self.probes)}")
        return link_transfer(base, {c.name: self.probes[self.nodes_of[c.name].name] for c in self.clusters
                                    if self.framed(c.name)})

    def profile_runner(self) -> Callable:
        from hetsched.placement.ray_profile import ray_profile_runner
        return ray_profile_runner(self.nodes_of, self.home)

    # ------------------------------------------------------------------ running
    def pipeline_options(self) -> dict:
        """Keyword arguments for ``hetsched.runtime.pipeline.Pipeline``."""
        from hetsched.placement.ray_workers import RayLauncher
        if self._launcher is None:
            self._launcher = RayLauncher(self.nodes_of, self.cfg.placement.orphan_timeout_s)
        return {"transport": "tcp" if self.all_tcp else "mixed", "host": self.ray.home_ip,
                "launcher": self._launcher, "endpoint_host": self.endpoint_host}

    def endpoint_host(self, stage: int, worker: int, cores: tuple, cluster: str) -> str | None:
        return self.nodes_of[cluster].ip if self.framed(cluster) else None

    def describe(self) -> dict:
        return {"engine": "ray", "coordinator": {"node": self.home.name if self.home else None,
                                                 "ip": self.ray.home_ip},
                "clusters": {c: {"node": n.name, "ip": n.ip, "link": "tcp" if self.framed(c) else "shm"}
                             for c, n in self.nodes_of.items()},
                "links": {n: p.to_dict() for n, p in self.probes.items()}}

    def close(self) -> None:
        self.ray.shutdown()

    def __enter__(self) -> "RayPlacement":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
