"""How fast the service follows a core that slows down (and recovers), measured on a real service.

    python scripts/bench_replan.py [--pools] [--speed 0.33]

Starts `hetsched start` on two cores (no emulation in its config: the service is not told),
streams at saturation through shared memory, slows core 1 with the emulation co-runner after 6 s
and releases it 20 s later. Reports, for the slowdown and for the release: the time until the
rate is back within 10% of its new steady level, the longest gap between two results (the pause),
the re-plan decisions the service logged, and that every frame was answered once and in order.
Without --pools the planner keeps each stage on one cluster (a pipeline), which must re-split;
with --pools (the default config) one worker per core absorbs the change by dispatch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hetsched.client import Client  # noqa: E402
from scripts.service_process import start_service, stop_service  # noqa: E402

CONFIG = """model: builtin:squeezenet1.1
clusters:
  a: {{cores: [0]}}
  b: {{cores: [1]}}
planner: {{allow_pools: {pools}}}
profile: {{repeats: 10, warmup: 2}}
"""


def stream(sock: str, stop: threading.Event, out: dict) -> None:
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    times, seqs = [], []
    with Client(sock, timeout=60) as c:
        c.enable_shm(10)
        sent = 0
        while not stop.is_set() or sent > len(seqs):
            while not stop.is_set() and sent - len(seqs) < 8:
                c.submit(x, stream="s")
                sent += 1
            rep = c.recv(30)
            if rep is None:
                break
            if rep["type"] == "result":
                times.append(time.monotonic())
                seqs.append(rep["seq"])
    out.update(times=times, seqs=seqs, sent=sent)


def rate_series(times: list[float], t0: float, t1: float, step: float = 0.5) -> list[tuple[float, float]]:
    arr = np.asarray(times)
    return [(t - t0, float(((arr >= t) & (arr < t + step)).sum()) / step) for t in np.arange(t0, t1, step)]


def recovery(times: list[float], t_event: float, t_end: float) -> tuple[float, float, float]:
    """(seconds until the 1 s rate stays within 10% of the level of the last 4 s, that level, longest gap)."""
    arr = np.asarray(times)
    level = ((arr >= t_end - 4) & (arr < t_end)).sum() / 4.0
    t_rec = None
    for t in np.arange(t_event, t_end - 1, 0.25):
        window = ((arr >= t) & (arr < t + 1)).sum()
        if abs(window - level) <= 0.1 * level:
            if t_rec is None:
                t_rec = t
        else:
            t_rec = None
    seg = arr[(arr >= t_event) & (arr < t_end)]
    gap = float(np.diff(seg).max()) if len(seg) > 1 else float("nan")
    return (t_rec - t_event) if t_rec is not None else float("nan"), float(level), gap


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pools", action="store_true", help="the default plan space (pools across clusters)")
    ap.add_argument("--speed", type=float, default=0.33)
    ap.add_argument("--slow-for", type=float, default=20.0)
    args = ap.parse_args(argv)
    from hetsched.host.emulation import EmulatedCore, Emulator
    tmp = tempfile.mkdtemp(prefix="hetsched-replan-")
    config = os.path.join(tmp, "config.yaml")
    with open(config, "w") as fh:
        fh.write(CONFIG.format(pools="true" if args.pools else "false"))
    sock = f"ipc://{tmp}/s.sock"
    proc = start_service(config, sock, tmp)
    stop, out = threading.Event(), {}
    th = threading.Thread(target=stream, args=(sock, stop, out))
    emu = None
    try:
        th.start()
        time.sleep(6)
        t_slow = time.monotonic()
        emu = Emulator([EmulatedCore(1, args.speed)]).start()
        time.sleep(args.slow_for)
        t_fast = time.monotonic()
        emu.stop()
        emu = None
        time.sleep(args.slow_for)
        t_end = time.monotonic()
        stop.set()
        th.join(60)
        with Client(sock, timeout=30) as c:
            rp = c.stats()["replan"]
            t_stats = time.monotonic()
    finally:
        if emu is not None:
            emu.stop()
        stop.set()
        stop_service(proc)
    times = out["times"]
    rec_s, level_s, gap_s = recovery(times, t_slow, t_fast)
    rec_f, level_f, gap_f = recovery(times, t_fast, t_end)
    before = sum(1 for t in times if t_slow - 4 <= t < t_slow) / 4.0
    exact = out["seqs"] == list(range(out["sent"]))
    print(f"plan space: {'pools (default)' if args.pools else 'one cluster per stage (allow_pools: false)'}; "
          f"core 1 at {args.speed} from t={6:.0f} s for {args.slow_for:.0f} s")
    print(f"before: {before:.1f} fps")
    print(f"slowdown: back within 10% of the new level ({level_s:.1f} fps) after {rec_s:.1f} s; longest gap "
          f"between results {gap_s * 1e3:.0f} ms")
    print(f"release: back within 10% of the new level ({level_f:.1f} fps) after {rec_f:.1f} s; longest gap "
          f"{gap_f * 1e3:.0f} ms")
    print(f"frames: {out['sent']} sent, {len(out['seqs'])} answered, exactly once and in order: {exact}")
    print(f"plan generations: {rp['generation']}; decisions:")
    for e in rp["history"]:
        t_dec = t_stats - e["age_s"]
        since = (f"{t_dec - t_fast:.1f} s after the release" if t_dec >= t_fast
                 else f"{t_dec - t_slow:.1f} s after the slowdown")
        print(f"  gen {e['generation']}: {'SWITCH' if e['switch'] else 'keep'} ({since}; measured speeds "
              f"{e['speeds']}): {e['decision']}")
        if e["switch"]:
            print(f"      {e['old_plan']}  ->  {e['new_plan']}")
            print(f"      new plan running {e.get('start_s')} s after the decision; measured "
                  f"{e.get('fps_before')} fps before, {e.get('fps_after')} fps after")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
