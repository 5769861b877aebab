"""A quick probe of each node's link to the coordinator, over the data path's own kind of link.

At start an echo actor on the node binds a ZeroMQ socket on the node's address with CURVE (fresh
keys, the same ZAP check as the pipeline's links); the coordinator sends ``SMALL`` small messages
and ``LARGE`` messages of ``PAYLOAD`` bytes, each echoed back, and times the round trips. The
figures (``hetsched.planning.links.probe_figures``) give the planner each link's latency and
bandwidth. Takes well under a second per node on a LAN (plus the actor's start).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import zmq

from hetsched.errors import HetschedError
from hetsched.placement.nodes import RayNode
from hetsched.planning.links import LinkProbe, probe_figures
from hetsched.wire.links import LinkKeys, secure_link_client, secure_link_server, start_link_authenticator

log = logging.getLogger(__name__)

SMALL, LARGE, PAYLOAD = 20, 6, 512 * 1024
WARMUP = 2
REPLY_TIMEOUT_MS = 10000


class EchoActor:
    """On the node: bind, then echo ``count`` messages (Ray runs the calls one after the other)."""

    def bind(self, keys: dict, ip: str) -> str:
        self.ctx = zmq.Context()
        link_keys = LinkKeys.from_dict(keys)
        self.auth = start_link_authenticator(self.ctx, link_keys, "link probe")
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        secure_link_server(self.sock, link_keys)
        self.sock.bind(f"tcp://{ip}:*")
        return self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()

    def echo(self, count: int, timeout_ms: int = REPLY_TIMEOUT_MS) -> int:
        done = 0
        try:
            while done < count and self.sock.poll(timeout_ms):
                self.sock.send_multipart(self.sock.recv_multipart(copy=False), copy=False)
                done += 1
        finally:
            self.sock.close(linger=1000)
            self.auth.stop()
            self.ctx.term()
        return done


@functools.lru_cache(maxsize=None)
def _actor_class():
    import ray
    return ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)(EchoActor)


def probe_node(node: RayNode, timeout: float = 60.0) -> LinkProbe:
    """Time the echo to ``node``; raises HetschedError naming the node when it does not answer."""
    import ray
    keys = LinkKeys.generate()
    actor = _actor_class().options(**node.placement()).remote()
    ctx = zmq.Context()
    sock = None
    try:
        endpoint = ray.get(actor.bind.remote(keys.to_dict(), node.ip), timeout=timeout)
        n = WARMUP + SMALL + LARGE
        served = actor.echo.remote(n)
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        secure_link_client(sock, keys)
        sock.connect(endpoint)
        small, large = b"x" * 64, bytes(PAYLOAD)

        def round_trip(payload: bytes) -> float:
            t0 = time.perf_counter()
            sock.send(payload, copy=False)
            if not sock.poll(REPLY_TIMEOUT_MS):
                raise HetschedError(f"link probe: node {node.name} ({endpoint}) sent no echo within "
                                    f"{REPLY_TIMEOUT_MS / 1000:.0f} s (is {node.ip} reachable from this host?)")
            sock.recv(copy=False)
            return time.perf_counter() - t0

        for _ in range(WARMUP):  # the CURVE handshake and the first buffers
            round_trip(small)
        small_rtt = [round_trip(small) for _ in range(SMALL)]
        large_rtt = [round_trip(large) for _ in range(LARGE)]
        ray.get(served, timeout=timeout)
        probe = probe_figures(node.name, small_rtt, large_rtt, PAYLOAD)
        log.info("link to node %s (%s): %.3f ms one way, %.0f MiB/s", node.name, node.ip, probe.latency_ms,
                 probe.mib_per_s)
        return probe
    except ray.exceptions.RayError as exc:
        raise HetschedError(f"link probe on node {node.name} failed: {str(exc).strip().splitlines()[-1]}") from None
    finally:
        if sock is not None:
            sock.close(linger=0)
        ctx.term()
        ray.kill(actor, no_restart=True)


def probe_nodes(nodes: list[RayNode], timeout: float = 60.0) -> dict[str, LinkProbe]:
    return {n.name: probe_node(n, timeout) for n in nodes}


def describe(probes: dict[str, Any]) -> str:
    return ", ".join(f"{name}: {p.latency_ms:.3f} ms, {p.mib_per_s:.0f} MiB/s" for name, p in sorted(probes.items()))
