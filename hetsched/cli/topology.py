"""``hetsched topology``: the CPU clusters of this host (from sysfs)."""

from __future__ import annotations

import argparse
import json


# ---------------------------------------------------------------------------------- topology
def cmd_topology(args: argparse.Namespace) -> int:
    from hetsched.host.topology import detect_topology, format_topology
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


def add_parser(sub, common) -> None:
    sp = sub.add_parser("topology", help="show this host's CPU clusters")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--sysfs-root", default="/sys")
    sp.add_argument("--config", help="also apply a config's cluster settings (emulation)")
    sp.set_defaults(func=cmd_topology)
