"""The ``hetsched`` command line: one module per command (hetsched/cli/*.py), assembled here. Only
the CLI configures logging and prints."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from hetsched.cli import bench, demo, emulate, feed, keys, plan, profile, serve, topology
from hetsched.cli.common import common_options, eprint
from hetsched.errors import HetschedError

COMMANDS = (topology, plan, serve, demo, emulate, feed, profile, bench, keys)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetsched", description="Pipeline CNN inference across heterogeneous CPU clusters")
    p.add_argument("-v", "--verbose", action="count", default=0)
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub, common_options)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except HetschedError as exc:
        eprint(f"hetsched: error: {exc}")
        return 2
    except KeyboardInterrupt:
        eprint("hetsched: forced stop")
        return 130


if __name__ == "__main__":
    sys.exit(main())
