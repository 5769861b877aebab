#!/usr/bin/env python3
"""How accurately does the RT duty-cycle co-runner emulate a slow core?

For each speed s, a single-threaded onnxruntime session pinned to CORE (default 1)
is timed with the emulator on CORE vs. the same core free (no co-runner), in:

  busy    back-to-back session.run
  bursty  one frame, then sleep a gap (random 2-8 ms, or --gap equal: the frame's own
          time), like a pipeline stage waiting for its neighbour

and, to show why a real-time co-runner is needed, with a naive co-runner (a plain
``while True: pass`` process pinned to CORE under the normal scheduler, CFS) --
which cannot be set to any speed and lets a sleeping (bursty) task catch up.

Free and emulated blocks alternate in rounds (order rotated each round) so that
drift (thermal, host noise) cancels.  The ratio reported per mode is
median(emulated frame time) / median(free frame time) over all rounds, compared
with 1/s; the spread is over the per-round ratios.

Model: /work/shared/models/squeezenet1.1.onnx (../shared/models beside the
checkout) if present, else a small synthetic CNN built with onnx.helper; --model
PATH or --synthetic to choose.

    python scripts/emulation_accuracy.py                  # table
    python scripts/emulation_accuracy.py --json > acc.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import signal
import statistics as st
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hetsched.host.emulation import DEFAULT_PERIOD_MS, EmulatedCore, Emulator  # noqa: E402
from hetsched.errors import EmulationError  # noqa: E402

DEFAULT_MODEL = REPO.parent / "shared" / "models" / "squeezenet1.1.onnx"

NAIVE_CODE = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[2]): sys.exit(0)\n"
    "os.sched_setaffinity(0, {int(sys.argv[1])})\n"
    "print('ready', flush=True)\n"
    "while True: pass\n"
)


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- model --------------------------------------------------------------------------------
def synthetic_cnn_bytes(channels: int = 64, hw: int = 56, layers: int = 3, seed: int = 0) -> bytes:
    """A few 3x3 conv + ReLU layers on 1 x C x H x W (about 3-7 ms per run, 1 thread)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "input"
    for i in range(layers):
        w = (rng.standard_normal((channels, channels, 3, 3)) * (1.0 / (3 * channels ** 0.5))).astype(np.float32)
        b = np.zeros(channels, np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"],
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        out = "output" if i == layers - 1 else f"r{i}"
        nodes.append(helper.make_node("Relu", [f"c{i}"], [out]))
        prev = out
    shape = [1, channels, hw, hw]
    graph = helper.make_graph(nodes, "synthetic_cnn",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_session(model, core: int):
    """Pin this process to `core` FIRST, then build a 1-thread sequential session."""
    os.sched_setaffinity(0, {core})
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    feeds = {}
    rng = np.random.default_rng(0)
    for inp in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        feeds[inp.name] = rng.random(shape, dtype=np.float32)
    return sess, feeds


# -- workloads ----------------------------------------------------------------------------
def run_block(sess, feeds, frames: int, mode: str, gap: str, rng: random.Random) -> list[tuple[float, float]]:
    """Time `frames` runs; returns (wall, thread CPU) seconds per frame.  With one intra-op
    thread onnxruntime computes on the calling thread, so thread_time is the frame's CPU."""
    times = []
    run = sess.run
    pc = time.perf_counter
    tt = time.thread_time
    gc.collect()
    gc.disable()
    try:
        for _ in range(frames):
            c = tt()
            t = pc()
            run(None, feeds)
            dt = pc() - t
            times.append((dt, tt() - c))
            if mode == "bursty":
                time.sleep(dt if gap == "equal" else rng.uniform(0.002, 0.008))
    finally:
        gc.enable()
    return times


class NaiveCorunner:
    """A plain busy loop pinned to `core` at normal (CFS) priority; killed by PID."""

    def __init__(self, core: int):
        self.core = core
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", NAIVE_CODE, str(self.core), str(os.getpid())],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline()
        if not line.startswith(b"ready"):
            self.__exit__()
            raise RuntimeError("naive co-runner failed to start")
        return self

    def __exit__(self, *exc):
        p, self.proc = self.proc, None
        if p is not None:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=5)
            p.stdout.close()


# -- main -------------------------------------------------------------------------------
def summarize(free: list[tuple[float, float]], emu: list[tuple[float, float]], per_round: list[float],
              target: float | None) -> dict:
    """ratio_median: median wall time emulated / free (the headline figure).
    share_ratio: median(wall/cpu) emulated / free -- the slowdown from losing the core alone,
    immune to the host's own speed swings; cpu_ratio: CPU time per frame emulated / free --
    the extra work caused by the co-runner (cache pollution, switch overhead)."""
    fw, ew = [w for w, _ in free], [w for w, _ in emu]
    ratio = st.median(ew) / st.median(fw)
    d = {
        "free_median_ms": st.median(fw) * 1e3,
        "median_ms": st.median(ew) * 1e3,
        "ratio_median": ratio,
        "ratio_mean": st.fmean(ew) / st.fmean(fw),
        "share_ratio": st.median(w / c for w, c in emu if c > 0) / st.median(w / c for w, c in free if c > 0),
        "cpu_ratio": st.median(c for _, c in emu) / st.median(c for _, c in free),
        "round_ratio_min": min(per_round),
        "round_ratio_max": max(per_round),
        "frames": len(emu),
    }
    if target is not None:
        d["target"] = target
        d["error_pct"] = (ratio / target - 1) * 100
        d["within_10pct"] = abs(ratio / target - 1) <= 0.10
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None,
                    help=f"ONNX model (default {DEFAULT_MODEL} if it exists, else synthetic)")
    ap.add_argument("--synthetic", action="store_true", help="use the built-in synthetic CNN")
    ap.add_argument("--core", type=int, default=1, help="emulated/measured core (default 1)")
    ap.add_argument("--speeds", type=float, nargs="+", default=[0.5, 0.33])
    ap.add_argument("--period-ms", type=float, default=DEFAULT_PERIOD_MS)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--frames", type=int, default=30, help="frames per block")
    ap.add_argument("--gap", choices=["random", "equal"], default="random",
                    help="bursty gap: random 2-8 ms (default) or equal to the frame time")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive CFS co-runner")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)

    if args.synthetic:
        model, model_name = synthetic_cnn_bytes(), "synthetic 3x conv3x3 1x64x56x56"
    else:
        path = args.model or (DEFAULT_MODEL if DEFAULT_MODEL.exists() else None)
        if path is None:
            model, model_name = synthetic_cnn_bytes(), "synthetic 3x conv3x3 1x64x56x56"
        else:
            model, model_name = str(path), str(path)
    if args.core not in os.sched_getaffinity(0):
        ap.error(f"core {args.core} not in allowed set {sorted(os.sched_getaffinity(0))}")

    sess, feeds = make_session(model, args.core)
    rng = random.Random(args.seed)
    progress(f"model {model_name}; measuring on core {args.core}; period {args.period_ms:g} ms")
    for _ in range(10):
        sess.run(None, feeds)

    modes = ["busy", "bursty"]
    configs: list[tuple[str, float | None]] = [("free", None)] + [(f"s={s:g}", s) for s in args.speeds]
    if not args.no_naive:
        configs.append(("naive-cfs", None))
    data = {(c, m): [] for c, _ in configs for m in modes}
    round_ratios: dict[tuple[str, str], list[float]] = {(c, m): [] for c, _ in configs[1:] for m in modes}

    t_start = time.monotonic()
    for r in range(args.rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        med_this = {}
        for name, s in order:
            for mode in modes:
                if s is not None:
                    ctx = Emulator([EmulatedCore(args.core, s, args.period_ms)])
                elif name == "naive-cfs":
                    ctx = NaiveCorunner(args.core)
                else:
                    ctx = None
                if ctx is None:
                    times = run_block(sess, feeds, args.frames, mode, args.gap, rng)
                else:
                    with ctx:
                        time.sleep(0.02)
                        times = run_block(sess, feeds, args.frames, mode, args.gap, rng)
                data[(name, mode)] += times
                med_this[(name, mode)] = st.median(w for w, _ in times)
        for (name, mode) in round_ratios:
            round_ratios[(name, mode)].append(med_this[(name, mode)] / med_this[("free", mode)])
        progress(f"round {r + 1}/{args.rounds}: " + "  ".join(
            f"{n}/{m} {round_ratios[(n, m)][-1]:.2f}" for n, m in round_ratios))
    elapsed = time.monotonic() - t_start

    results = []
    for name, s in configs[1:]:
        for mode in modes:
            # The naive co-runner has no speed knob: its nominal speed is the CFS fair share, 0.5.
            d = summarize(data[("free", mode)], data[(name, mode)], round_ratios[(name, mode)],
                          1.0 / s if s is not None else 2.0)
            d.update(config=name, mode=mode, speed=s)
            results.append(d)

    out = {
        "model": model_name, "core": args.core, "period_ms": args.period_ms, "rounds": args.rounds,
        "frames_per_block": args.frames, "gap": args.gap, "elapsed_s": elapsed,
        "free_median_ms": {m: st.median(w for w, _ in data[("free", m)]) * 1e3 for m in modes},
        "results": results,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"model: {model_name}   core {args.core}   period {args.period_ms:g} ms   "
              f"{args.rounds} rounds x {args.frames} frames   bursty gap: {args.gap}")
        print(f"free median frame: busy {out['free_median_ms']['busy']:.2f} ms, "
              f"bursty {out['free_median_ms']['bursty']:.2f} ms")
        hdr = (f"{'config':<10} {'mode':<7} {'median ms':>9} {'ratio':>6} {'target':>6} {'error':>7} "
               f"{'rounds min-max':>15} {'mean ratio':>10} {'share':>6} {'cpu':>5}")
        print(hdr)
        print("-" * len(hdr))
        for d in results:
            tgt = f"{d['target']:.2f}" if "target" in d else "(none)"
            err = f"{d['error_pct']:+.1f}%" if "error_pct" in d else ""
            print(f"{d['config']:<10} {d['mode']:<7} {d['median_ms']:9.2f} {d['ratio_median']:6.2f} {tgt:>6} "
                  f"{err:>7} {d['round_ratio_min']:7.2f}-{d['round_ratio_max']:<7.2f} {d['ratio_mean']:10.2f} "
                  f"{d['share_ratio']:6.2f} {d['cpu_ratio']:5.2f}")
        print("ratio = median frame time emulated / free (target 1/s); share = median(wall/CPU) ratio\n"
              "(core share lost, immune to host speed swings); cpu = CPU time per frame ratio (co-runner\n"
              "cache/switch overhead).")
        if not args.no_naive:
            print("naive-cfs: plain `while True: pass` pinned to the core at normal priority. It has no\n"
                  "speed knob (it can only take the fair share, nominal s=0.5 -> target 2.00), and a task\n"
                  "that sleeps between frames (bursty) is not held to that share.")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except EmulationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
