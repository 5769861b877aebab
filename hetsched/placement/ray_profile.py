"""Profiling a cluster on its own node: a Ray actor there, pinned to the cluster's cores.

The runner plugs into ``hetsched.profiling.measure`` (its ``runner`` hook): the spec the local
profiler would get goes to a fresh actor on the cluster's node, which pins every thread of its
process to the cluster's cores and runs the same measurement (``workers.profile_worker``), CPU load
sampling of those cores included. The actor is ended afterwards (its process is not reused for
anything pinned). Emulation co-runners exist only on the coordinator's node, so on other nodes no
process counts as expected load.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Mapping

from hetsched.errors import HetschedError
from hetsched.placement.nodes import RayNode

log = logging.getLogger(__name__)


class ProfileActor:
    def measure(self, spec: dict) -> dict:
        from hetsched.placement.ray_workers import pin_process
        from workers.profile_worker import pinned_measure
        pin_process(spec["cores"])
        return pinned_measure(spec)


@functools.lru_cache(maxsize=None)
def _actor_class():
    import ray
    return ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)(ProfileActor)


def ray_profile_runner(cluster_nodes: Mapping[str, RayNode], home: RayNode | None) -> Callable:
    """A ``runner(spec, cluster, timeout, progress)`` for ``hetsched.profiling.measure``."""
    import ray

    def run(spec: dict, cluster: Any, timeout: float, progress: Callable[[str], None] | None) -> dict:
        node = cluster_nodes[cluster.name]
        if home is None or node.node_id != home.node_id:
            spec = {**spec, "expected_pids": []}
        if progress:
            progress(f"profiling cluster {cluster.name} (cores {list(cluster.cores)}) on Ray node {node.name} "
                     f"({node.ip})")
        actor = _actor_class().options(**node.placement()).remote()
        t0 = time.monotonic()
        try:
            return ray.get(actor.measure.remote(spec), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise HetschedError(f"profiling cluster {cluster.name} on node {node.name} took more than "
                                f"{timeout:.0f} s") from None
        except ray.exceptions.RayError as exc:
            raise HetschedError(f"profiling cluster {cluster.name} on node {node.name} failed: "
                                f"{str(exc).strip().splitlines()[-1]}") from None
        finally:
            ray.kill(actor, no_restart=True)
            log.info("profiled cluster %s on node %s in %.1f s", cluster.name, node.name, time.monotonic() - t0)

    return run
