"""``hetsched plan``: profile the model on each cluster and show the stage plan."""

from __future__ import annotations

import argparse
import json

from hetsched.cli.common import load_cfg, progress_printer as _progress


# ---------------------------------------------------------------------------------- plan
def plan_report(prep) -> str:
    from hetsched.planning.planner import format_plan
    lines = []
    nodes = prep.placement.describe()["clusters"] if prep.placement is not None else {}
    for c in prep.clusters:
        emu = f"  EMULATED: delivers {c.emulated_speed:.0%} of its cycles" if c.emulated_speed else ""
        where = f"  on node {nodes[c.name]['node']} ({nodes[c.name]['ip']}, {nodes[c.name]['link']})" \
            if c.name in nodes else ""
        lines.append(f"cluster {c.name:<8} cores {list(c.cores)}{where}{emu}")
    lines.append("")
    lines.append(format_plan(prep.plan))
    if prep.measurements:
        from hetsched.observe.metrics import ENCODED, RAW
        limit = f"limit (sum of each core's standalone single-thread rate): {prep.limit_fps(RAW):.1f} frames/s raw tensors"
        if prep.with_preprocess and prep.limit_fps(ENCODED):
            limit += f", {prep.limit_fps(ENCODED):.1f} frames/s JPEG (decode + preprocess + model)"
        lines.append(limit)
    for w in prep.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    from hetsched.runtime.service import emulation, encoded_share, local_clusters, placement_for, prepare
    cfg = load_cfg(args)
    with placement_for(cfg) as (clusters, placement), \
            emulation(local_clusters(clusters, placement), cfg.emulation_period_ms, _progress(args.json)):
        prep = prepare(cfg, progress=_progress(args.json), clusters=clusters, with_preprocess=True,
                       encoded_share=encoded_share(cfg, args.preprocess), placement=placement)
    if args.json:
        out = prep.plan.to_dict()
        out["clusters"] = [c.to_dict() for c in prep.clusters]
        out["limit_fps"] = prep.limit_fps()
        out["layers"] = [{"index": l.index, "name": l.name, "flops": l.flops, "params": l.params}
                         for l in prep.graph.layers]
        out["shape_source"] = prep.graph.shape_source
        out["input_shape"] = [list(t.shape) for t in prep.graph.inputs]
        print(json.dumps(out, indent=2))
    else:
        print(plan_report(prep))
        if args.layers:
            from hetsched.model.graph import layer_table
            g = prep.graph
            print(f"\nmodel inputs {', '.join(f'{t.name} {list(t.shape)} {t.dtype}' for t in g.inputs)}; "
                  f"outputs {', '.join(f'{t.name} {list(t.shape)}' for t in g.outputs)}")
            print(g.shape_detail or f"shapes resolved by {g.shape_source}")
            print("\n".join(layer_table(g)))
    return 0


def add_parser(sub, common) -> None:
    sp = sub.add_parser("plan", help="profile the model on each cluster and show the stage plan")
    common(sp)
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--layers", action="store_true",
                    help="also list the layers between cut points and how the tensor shapes were found")
    sp.add_argument("--input-shape", metavar="DIMS",
                    help="model input shape, e.g. 1,3,320,320: fixes symbolic dims (overrides model_input.shape)")
    sp.add_argument("--preprocess", action="store_true", help="plan for JPEG/PNG traffic (decoding in stage 0)")
    sp.set_defaults(func=cmd_plan)
