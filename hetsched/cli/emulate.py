"""``hetsched emulate``: make cores deliver a fraction of their cycles, until Ctrl+C."""

from __future__ import annotations

import argparse
import time

from hetsched.cli.common import StopFlag, eprint


# ---------------------------------------------------------------------------------- emulate
def cmd_emulate(args: argparse.Namespace) -> int:
    from hetsched.host.emulation import EmulatedCore, Emulator
    stop = StopFlag().install()
    cores = [EmulatedCore(c, args.speed) for c in args.cores]
    with Emulator(cores) as emu:
        eprint(f"emulating: cores {args.cores} deliver {args.speed:.0%} of their cycles "
               f"(co-runner pids {emu.pids}); Ctrl+C to stop")
        t_end = time.monotonic() + args.duration if args.duration else None
        while not stop() and (t_end is None or time.monotonic() < t_end):
            stop.event.wait(0.2)
    eprint("emulation stopped; co-runners reaped")
    return 0


def add_parser(sub, common) -> None:
    sp = sub.add_parser("emulate", help="make cores deliver a fraction of their cycles (until Ctrl+C)")
    sp.add_argument("--cores", type=int, nargs="+", required=True)
    sp.add_argument("--speed", type=float, required=True)
    sp.add_argument("--duration", type=float, default=None)
    sp.set_defaults(func=cmd_emulate)
