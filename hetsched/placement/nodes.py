"""The Ray nodes hetsched can place work on (pure: parses what ``ray.nodes()`` returns).

A node takes part when its ``ray start --resources`` declares ``hetsched_node_<name>``; ``<name>``
is what a cluster's ``node:`` key names. Work is placed on a node by asking for a tiny share of
that resource (so any number of workers fit on it; the plan's cores, not Ray's CPU count, decide
how many workers a node runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from hetsched.errors import ConfigError

RESOURCE_PREFIX = "hetsched_node_"
PLACEMENT_SHARE = 0.001  # of a node's hetsched_node_<name> resource, per worker, task or probe


def node_resource(name: str) -> str:
    return f"{RESOURCE_PREFIX}{name}"


@dataclass(frozen=True)
class RayNode:
    name: str          # from its resource hetsched_node_<name>
    node_id: str       # Ray's node id (hex)
    ip: str            # the node's address in the Ray cluster (workers there bind their inputs on it)
    cpus: float        # what Ray counts (informative: placement follows the plan's cores)

    def placement(self) -> dict:
        """Ray options that put an actor or task on this node."""
        return {"resources": {node_resource(self.name): PLACEMENT_SHARE}}


def nodes_from_ray(entries: Iterable[Mapping]) -> dict[str, RayNode]:
    """Alive nodes declaring a hetsched node resource, by name. Two alive nodes with one name are an
    error (each name must identify one host)."""
    out: dict[str, RayNode] = {}
    for e in entries:
        if not e.get("Alive", e.get("alive", False)):
            continue
        resources = e.get("Resources") or {}
        for key in resources:
            if not key.startswith(RESOURCE_PREFIX):
                continue
            name = key[len(RESOURCE_PREFIX):]
            node = RayNode(name, str(e["NodeID"]), str(e["NodeManagerAddress"]), float(resources.get("CPU", 0.0)))
            if name in out and out[name].node_id != node.node_id:
                raise ConfigError(f"Ray nodes {out[name].ip} and {node.ip} both declare {key}: give every host "
                                  "its own name in `ray start --resources`")
            out[name] = node
    return out


def require_nodes(nodes: Mapping[str, RayNode], wanted: Iterable[tuple[str, str]]) -> None:
    """Every (cluster, node) must name a node of the Ray cluster; the error lists those there are."""
    for cluster, name in wanted:
        if name not in nodes:
            known = ", ".join(sorted(nodes)) or "none (no node declares a hetsched_node_<name> resource)"
            raise ConfigError(f"clusters.{cluster}.node: no alive Ray node declares {node_resource(name)} "
                              f"(nodes: {known}); start it with ray start --resources "
                              f"'{{\"{node_resource(name)}\": 1}}'")
