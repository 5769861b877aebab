"""Transfer cost of links between nodes (pure): what a quick probe measured -> the planner's costs.

The coordinator dispatches every frame itself (star topology), so a worker on another node
receives each input and sends each output over its node's link to the coordinator. At start the
coordinator times a CURVE-encrypted tcp:// echo to a probe on every such node
(``hetsched.placement.probe``); ``probe_figures`` turns the round trips into a one-way latency
and a bandwidth, ``link_transfer`` into a :class:`LinkTransferModel` whose ``for_cluster`` gives
the planner a cluster's own crossing cost::

    cost(bytes) = base.per_message_ms + latency_ms + (base.per_mb_ms + 1000 / MiB_per_s) * bytes / MiB

The latency is charged to the worker's service time (a worker holds two credits, so part of it
overlaps with computing the next frame: the estimate errs on the slow side). Clusters on the
coordinator's node keep the base (shared-memory) cost.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Mapping, Sequence

from hetsched.errors import PlanError
from hetsched.planning.plan import TransferModel

MAX_MIB_PER_S = 1e6  # a faster link than this is indistinguishable from free in the model


@dataclass(frozen=True)
class LinkProbe:
    """One node's link to the coordinator, as measured at start."""
    node: str
    latency_ms: float   # one way, a small message
    mib_per_s: float    # payload bandwidth in one direction (encryption included)
    samples: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.latency_ms) and self.latency_ms >= 0):
            raise PlanError(f"link to node {self.node}: latency {self.latency_ms!r} ms is not a finite number >= 0")
        if not self.mib_per_s > 0:
            raise PlanError(f"link to node {self.node}: bandwidth {self.mib_per_s!r} MiB/s must be > 0")

    def to_dict(self) -> dict:
        return {"node": self.node, "latency_ms": self.latency_ms, "mib_per_s": self.mib_per_s,
                "samples": self.samples}


def probe_figures(node: str, small_rtt_s: Sequence[float], big_rtt_s: Sequence[float],
                  payload_bytes: int) -> LinkProbe:
    """Latency and bandwidth from echo round trips: small messages (latency only) and messages of
    ``payload_bytes`` echoed back (2 x latency + 2 x payload / bandwidth). Medians, so a stray
    slow round trip does not decide."""
    if not small_rtt_s or not big_rtt_s or payload_bytes <= 0:
        raise PlanError(f"link to node {node}: the probe needs small and large round trips and a payload size")
    small = statistics.median(small_rtt_s)
    big = statistics.median(big_rtt_s)
    extra = big - small
    mib_per_s = MAX_MIB_PER_S if extra <= 0 else min(MAX_MIB_PER_S, 2.0 * payload_bytes / extra / (1 << 20))
    return LinkProbe(node, small / 2.0 * 1e3, mib_per_s, len(small_rtt_s) + len(big_rtt_s))


def link_cost(base: TransferModel, probe: LinkProbe) -> TransferModel:
    """One crossing of ``probe``'s link: the base cost of a crossing plus the link's own."""
    return TransferModel(base.per_message_ms + probe.latency_ms, base.per_mb_ms + 1000.0 / probe.mib_per_s)


@dataclass(frozen=True)
class LinkTransferModel(TransferModel):
    """The base crossing cost, and per cluster the cost over its node's link."""
    links: tuple[tuple[str, TransferModel], ...] = ()

    def for_cluster(self, cluster: str) -> TransferModel:
        for name, model in self.links:
            if name == cluster:
                return model
        return TransferModel(self.per_message_ms, self.per_mb_ms)


def link_transfer(base: TransferModel, probes: Mapping[str, LinkProbe]) -> LinkTransferModel:
    """``probes``: cluster name -> the probe of its node's link (clusters not named keep ``base``)."""
    return LinkTransferModel(base.per_message_ms, base.per_mb_ms,
                             tuple((c, link_cost(base, p)) for c, p in sorted(probes.items())))
