"""``hetsched topology``: the CPU clusters of this host (from sysfs), or of every Ray node (--ray)."""

from __future__ import annotations

import argparse
import json

from hetsched.cli.common import eprint


def cmd_topology(args: argparse.Namespace) -> int:
    from hetsched.host.topology import detect_topology, format_topology
    if args.ray:
        return _topology_ray(args)
    topo = detect_topology(args.sysfs_root)
    if args.config:
        import dataclasses

        from hetsched.config import load_config, resolve_clusters
        clusters = resolve_clusters(load_config(args.config), topo)
        topo = dataclasses.replace(topo, clusters=tuple(clusters))
    if args.json:
        print(json.dumps(topo.to_dict(), indent=2))
    else:
        print(format_topology(topo))
    return 0


def _topology_ray(args: argparse.Namespace) -> int:
    """Every Ray node's clusters, as a task on each node detects them from its own sysfs."""
    from hetsched.host.topology import format_topology
    from hetsched.placement.ray_cluster import RayCluster
    address, node_ip = args.address, args.node_ip
    if args.config:
        from hetsched.config import load_config
        pl = load_config(args.config).placement
        address, node_ip = address or pl.address, node_ip or pl.node_ip
    ray = RayCluster(address or "auto", node_ip)
    try:
        if not ray.nodes:
            eprint("no Ray node declares a hetsched_node_<name> resource (ray start --resources "
                   "'{\"hetsched_node_NAME\": 1}')")
            return 1
        topos = ray.topologies()
        if args.json:
            print(json.dumps({"coordinator_ip": ray.home_ip,
                              "nodes": [dict(t.to_dict(), ip=ray.nodes[n].ip) for n, t in sorted(topos.items())]},
                             indent=2))
            return 0
        for name, t in sorted(topos.items()):
            node = ray.nodes[name]
            here = " (this coordinator's node)" if ray.home is not None and ray.home.node_id == node.node_id else ""
            print(f"node {name}{here}: {node.ip}, host {t.hostname}, raylet CPU set {list(t.allowed)}")
            print("  " + format_topology(t.topology).replace("\n", "\n  "))
        return 0
    finally:
        ray.shutdown()


def add_parser(sub, common) -> None:
    sp = sub.add_parser("topology", help="show this host's CPU clusters (--ray: every Ray node's)")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--sysfs-root", default="/sys")
    sp.add_argument("--config", help="also apply a config's cluster settings (emulation); with --ray: its "
                                     "placement.address and node_ip")
    sp.add_argument("--ray", action="store_true",
                    help="list the clusters of every Ray node with a hetsched_node_<name> resource, each detected "
                         "on its node (a Ray task there reads its sysfs)")
    sp.add_argument("--address", help="with --ray: the Ray cluster (default: the config's placement.address, auto)")
    sp.add_argument("--node-ip", help="with --ray: this host's address in the Ray cluster")
    sp.set_defaults(func=cmd_topology)
