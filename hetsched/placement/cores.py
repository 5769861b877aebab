"""Core ids across nodes (pure): the planner needs every core id once, boards reuse them.

Two RK3588 boards both have cores 0-7. The planner (``hetsched.planning.planner``) refuses a core
id in two clusters, so when clusters on different nodes share ids the planner is given *planner
ids* (``node index * NODE_STRIDE + core``) and the plans it returns are mapped back to the real
ids (``CoreMap.localize``) before a pipeline starts: a worker pins itself to real cores of its
own node. Without shared ids the mapping is the identity and plans pass through untouched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from hetsched.planning.plan import ClusterSpec, Plan

NODE_STRIDE = 4096


@dataclass(frozen=True)
class CoreMap:
    """Planner core id -> real core id (empty: the identity)."""
    to_real: Mapping[int, int] = field(default_factory=dict)

    @property
    def identity(self) -> bool:
        return not self.to_real

    def localize(self, plan: Plan) -> Plan:
        """The plan with every member's cores as real ids (figures unchanged)."""
        if self.identity:
            return plan
        stages = tuple(dataclasses.replace(st, members=tuple(
            dataclasses.replace(m, cores=tuple(self.to_real[c] for c in m.cores)) for m in st.members))
            for st in plan.stages)
        return dataclasses.replace(plan, stages=stages)


def planner_clusters(clusters: Sequence, nodes: Mapping[str, str]) -> tuple[list[ClusterSpec], CoreMap]:
    """Planner-facing ClusterSpecs of ``clusters`` (anything with ``name`` and ``cores``) placed on
    ``nodes`` (cluster name -> node name), and the map back to real ids. Ids are kept as they are
    unless two clusters on different nodes share one."""
    owner: dict[int, str] = {}
    shared = False
    for c in clusters:
        for core in c.cores:
            if core in owner and nodes.get(owner[core]) != nodes.get(c.name):
                shared = True
            owner.setdefault(core, c.name)
    if not shared:
        return [ClusterSpec(c.name, tuple(c.cores)) for c in clusters], CoreMap()
    order = {n: i for i, n in enumerate(dict.fromkeys(nodes.get(c.name) for c in clusters))}
    specs, back = [], {}
    for c in clusters:
        base = order[nodes.get(c.name)] * NODE_STRIDE
        ids = tuple(base + core for core in c.cores)
        back.update({v: core for v, core in zip(ids, c.cores)})
        specs.append(ClusterSpec(c.name, ids))
    return specs, CoreMap(back)
