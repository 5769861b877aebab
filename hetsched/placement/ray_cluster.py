"""The coordinator's connection to a Ray cluster: its nodes, a function run on a named node, and
every node's CPU topology as the node itself detects it (from its own sysfs).

Ray is imported here and in the other ``ray_*`` modules only, and only when a config asks for
``placement.engine: ray`` (``pip install 'hetsched[ray]'``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from hetsched.errors import ConfigError, HetschedError
from hetsched.placement.nodes import RayNode, nodes_from_ray

log = logging.getLogger(__name__)

NAMESPACE = "hetsched"


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("placement.engine: ray needs the ray package (pip install 'hetsched[ray]')") from exc
    return ray


@dataclass(frozen=True)
class NodeTopology:
    """What a node reports about its CPUs (a Ray task there reads its own /sys)."""
    node: str
    hostname: str
    topology: Any             # hetsched.host.topology.Topology
    online: tuple[int, ...]   # online CPUs
    allowed: tuple[int, ...]  # the CPUs a process started by the node's raylet may use

    def to_dict(self) -> dict:
        return {"node": self.node, "hostname": self.hostname, "online": list(self.online),
                "allowed": list(self.allowed), **self.topology.to_dict()}


def _detect_here(node: str, sysfs_root: str = "/sys") -> NodeTopology:
    """Runs on the node (a Ray task) at every start; also removes what killed actors left there."""
    import socket
    import tempfile

    from hetsched.config import _online_cpus
    from hetsched.host.topology import detect_topology
    from hetsched.placement.ray_workers import sweep_model_dirs
    sweep_model_dirs(tempfile.gettempdir())
    allowed = tuple(sorted(os.sched_getaffinity(0)))
    return NodeTopology(node, socket.gethostname(), detect_topology(sysfs_root), tuple(sorted(_online_cpus())),
                        allowed)


class RayCluster:
    """``ray.init`` once per coordinator process (``shutdown`` disconnects if we connected)."""

    def __init__(self, address: str = "auto", node_ip: str | None = None):
        self.ray = import_ray()
        self._own = not self.ray.is_initialized()
        if self._own:
            kw: dict = {"address": address, "namespace": NAMESPACE, "log_to_driver": False,
                        "logging_level": logging.WARNING, "configure_logging": False}
            if node_ip:
                kw["_node_ip_address"] = node_ip
            try:
                self.ray.init(**kw)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"placement.address: cannot connect to the Ray cluster at {address!r}: {exc} "
                                  "(start it with `ray start`, e.g. scripts/ray_local_cluster.sh start)") from exc
        self.nodes: dict[str, RayNode] = {}
        self.refresh()
        here = self.ray.get_runtime_context().get_node_id()
        self.home: RayNode | None = next((n for n in self.nodes.values() if n.node_id == here), None)
        self.home_ip = self.home.ip if self.home else self._ip_of_node(here)

    def _ip_of_node(self, node_id: str) -> str:
        for e in self.ray.nodes():
            if e.get("NodeID") == node_id:
                return str(e["NodeManagerAddress"])
        raise HetschedError(f"the coordinator's Ray node {node_id} is not in the cluster")

    def refresh(self) -> dict[str, RayNode]:
        self.nodes = nodes_from_ray(self.ray.nodes())
        return self.nodes

    def on_node(self, node: str, fn: Callable, *args: Any, timeout: float = 120.0) -> Any:
        """``fn(*args)`` as a Ray task on ``node``; its result."""
        task = self.ray.remote(num_cpus=0, max_retries=0)(fn).options(**self.nodes[node].placement())
        ref = task.remote(*args)
        try:
            return self.ray.get(ref, timeout=timeout)
        except self.ray.exceptions.GetTimeoutError:
            self.ray.cancel(ref, force=True)
            raise HetschedError(f"a task on Ray node {node} took more than {timeout:.0f} s") from None

    def topologies(self, names: list[str] | None = None, timeout: float = 120.0) -> dict[str, NodeTopology]:
        """Every (or the named) node's topology, detected there; the nodes are asked at once."""
        names = sorted(self.nodes) if names is None else names
        task = self.ray.remote(num_cpus=0, max_retries=0)(_detect_here)
        refs = {n: task.options(**self.nodes[n].placement()).remote(n) for n in names}
        try:
            return dict(zip(refs, self.ray.get(list(refs.values()), timeout=timeout)))
        except self.ray.exceptions.GetTimeoutError:
            raise HetschedError(f"Ray nodes {', '.join(names)} did not report their topology within {timeout:.0f} s "
                                "(is every node's raylet up? `ray status`)") from None

    def shutdown(self) -> None:
        if self._own and self.ray.is_initialized():
            self.ray.shutdown()
