"""``hetsched bench``: argument parsing and printing; the benchmark itself is hetsched.bench."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from hetsched.bench.options import BUILTIN_SCENARIOS, REPLICA_MODES, TRAFFIC, BenchOptions


def _command_line() -> str:
    prog = os.path.basename(sys.argv[0]) if sys.argv else "hetsched"
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    if prog in ("hetsched", "cli.py", "__main__.py"):
        return f"hetsched {args}".strip()
    return f"python {shlex.quote(sys.argv[0])} {args}".strip()


def _list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    kw: dict = {"configs": list(args.config or []), "out": args.out, "model": args.model, "seed": args.seed,
                "shm": not args.no_shm, "replicas": args.replicas, "images": args.images,
                "command": _command_line()}
    if args.scenarios is not None:
        kw["scenarios"] = _list(args.scenarios)
    if args.traffic is not None:
        kw["traffic"] = _list(args.traffic)
    for key in ("rounds", "seconds", "fixed_seconds", "load_fraction", "window"):
        if getattr(args, key) is not None:
            kw[key] = getattr(args, key)
    opts = BenchOptions.quick_defaults(**kw) if args.quick else BenchOptions(**kw)
    if args.md is not None:
        opts.md = args.md or None
    elif args.quick:
        opts.md = os.path.join(args.out, "BENCHMARKS.md")
    return opts


def cmd_bench(args: argparse.Namespace) -> int:
    from hetsched.bench.report import format_report
    from hetsched.bench.run import all_correct, run_bench
    from hetsched.cli.common import eprint
    opts = options_from_args(args)
    opts.progress = lambda msg: eprint(f"  {msg}")
    result = run_bench(opts)
    print(format_report(result))
    for p in result["paths"].values():
        print(f"wrote {p}")
    return 0 if all_correct(result) else 1


def _traffic_list(text: str) -> str:
    bad = [t for t in _list(text) if t not in TRAFFIC]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown traffic {', '.join(bad)}: use {','.join(TRAFFIC)}")
    return text


def add_parser(sub, common) -> None:
    from hetsched.bench import run
    sp = sub.add_parser("bench", help="hetsched vs onnxruntime (all cores, fastest cluster, per-core replicas) vs "
                                      "the limit, raw and JPEG traffic", description=run.__doc__.split("\n\n")[0])
    sp.add_argument("--config", action="extend", nargs="+", metavar="F",
                    help="device config(s), each run as its own scenario, as-is (also adds to the built-in ones "
                         "unless --scenarios is given; --scenarios none runs only these)")
    sp.add_argument("--scenarios", help=f"comma-separated: homogeneous, blX (emulated big + little at speed X); "
                                        f"default {','.join(BUILTIN_SCENARIOS)} ('none': only --config)")
    sp.add_argument("--traffic", type=_traffic_list, help=f"comma-separated traffic kinds (default {','.join(TRAFFIC)})")
    sp.add_argument("--images", help="directory of JPEG photos for JPEG traffic (default ../shared/images beside "
                                     "the checkout, else synthetic 640x480 JPEGs)")
    sp.add_argument("--rounds", type=int, help="rounds of alternating contenders (default 3; --quick 1)")
    sp.add_argument("--seconds", type=float, help="saturated seconds per contender per round (default 2)")
    sp.add_argument("--fixed-seconds", type=float, help="open-loop seconds per contender per round (default 3)")
    sp.add_argument("--load-fraction", type=float, help="offered rate of the open-loop pass, x the limit (default 0.6)")
    sp.add_argument("--replicas", choices=REPLICA_MODES, default="processes",
                    help="ort-replicas as one process per core (default) or one thread per core in one process")
    sp.add_argument("--window", type=int, help="frames in flight from hetsched's feeding client (default 8, as "
                                               "hetsched feed)")
    sp.add_argument("--out", default="results", help="directory for bench.json and bench.png")
    sp.add_argument("--md", default=None, help="markdown report path (default BENCHMARKS.md; --quick: OUT/BENCHMARKS.md;"
                                               " '' for none)")
    sp.add_argument("--model", help="ONNX model path (default: the built-in SqueezeNet 1.1)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the raw input tensors")
    sp.add_argument("--no-shm", action="store_true",
                    help="hetsched client sends tensors over the socket instead of shared-memory input slots")
    sp.add_argument("--quick", action="store_true", help="a few seconds per scenario (harness check; default "
                                                         "scenario bl0.5)")
    sp.set_defaults(func=cmd_bench)
