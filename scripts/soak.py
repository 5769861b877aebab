"""Soak test (not in the default suite): hours of abuse in minutes.

    python scripts/soak.py --minutes 10 --out docs/reliability.md

Starts `hetsched start` (the built-in SqueezeNet, big + emulated little core unless --config),
measures its capacity, then for --minutes offers 80% of it over shared memory while:

* a random stage worker is SIGKILLed every --kill-every seconds,
* hostile clients come and go: garbage headers, FIFOs and symlinks registered as shared memory,
  truncated regions, corrupt JPEGs, oversized frames, and a client that never reads its replies.

It checks that every frame the honest client sent was answered exactly once and in order, samples
the RSS of the service's processes, and reads the coordinator's longest loop turn from `stats`.
The report (markdown) is printed and, with --out, written between markers in that file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time

import numpy as np
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hetsched.client import Client  # noqa: E402
from scripts.service_process import start_service, stop_service  # noqa: E402
from hetsched.wire import client_protocol as cp  # noqa: E402

BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"


def rss_mb(pid: int) -> float:
    try:
        p = psutil.Process(pid)
        return (p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))) / 2**20
    except psutil.Error:
        return float("nan")


IMMEDIATE = {"BUSY", "LIMIT", "SHUTTING_DOWN", "TOO_LARGE", "NO_PREPROCESS"}


def refused_at_once(rep: dict) -> bool:
    """An error sent on receipt, not part of its stream's order (docs/protocol.md section 6)."""
    code = rep.get("code", "") if rep.get("type") == "error" else ""
    return code in IMMEDIATE or code.startswith("BAD_")


def honest(sock: str, fps: float, seconds: float, result: dict) -> None:
    """Open loop at ``fps`` through shared memory; every reply checked for exactly-once, and results
    and ordered errors for submission order."""
    rng = np.random.default_rng(0)
    pool = [rng.standard_normal((1, 3, 224, 224)).astype(np.float32) for _ in range(8)]
    seen: dict[int, int] = {}
    order_ok = True
    last = -1
    with Client(sock, timeout=60, identity=b"soak-honest") as c:
        c.enable_shm(64)
        t0 = time.monotonic()
        sent = 0
        outstanding = 0
        while time.monotonic() - t0 < seconds or outstanding:
            now = time.monotonic()
            while now - t0 < seconds and sent < (now - t0) * fps and outstanding < 48:
                c.submit(pool[sent % 8], stream="honest")
                sent += 1
                outstanding += 1
            rep = c.recv(0.01)
            if rep is None:
                if now - t0 > seconds + 120:
                    break
                continue
            if rep.get("type") not in ("result", "error"):
                continue
            seq = rep.get("seq")
            seen[seq] = seen.get(seq, 0) + 1
            if not refused_at_once(rep):   # immediate refusals may overtake (docs/protocol.md section 6)
                order_ok &= seq > last
                last = max(last, seq)
            outstanding -= 1
            if rep["type"] == "error":
                result.setdefault("errors", {}).setdefault(rep.get("code"), 0)
                result["errors"][rep.get("code")] += 1
    result.update(sent=sent, answered=len(seen), duplicated=sum(1 for n in seen.values() if n > 1),
                  missing=sent - len(seen), in_order=order_ok)


def hostile(sock: str, stop: threading.Event, tmp: str, counts: dict) -> None:
    """Clients that misbehave, one kind after another, until told to stop."""
    kinds = ["garbage", "fifo", "symlink", "truncated", "corrupt_jpeg", "oversized", "no_reader"]
    i = 0
    while not stop.is_set():
        kind = kinds[i % len(kinds)]
        i += 1
        try:
            with Client(sock, timeout=2) as c:
                if kind == "garbage":
                    c.send_raw([os.urandom(64)])
                    c.send_raw([b'{"v":1,"type":"submit"' + b"[" * 5000])
                elif kind in ("fifo", "symlink"):
                    name = f"hetsched-soak{os.getpid()}{i}"
                    path = f"/dev/shm/{name}"
                    os.mkfifo(path) if kind == "fifo" else os.symlink("/etc/passwd", path)
                    try:
                        c.send_raw([cp.encode({"type": "shm_register", "name": name, "slots": 1, "slot_bytes": 64})])
                        c.recv(2)
                    finally:
                        os.unlink(path)
                elif kind == "truncated":
                    if c.enable_shm(2):  # registered, then truncated: stage 0 must refuse, not crash
                        os.truncate(c._region.path, 10)
                        c.send_raw([cp.encode({"type": "submit", "stream": "t", "seq": 0, "encoding": "shm", "shm": 0,
                                               "slot": 0, "dtype": "float32", "shape": [1, 3, 224, 224]})])
                        c.recv(5)
                elif kind == "corrupt_jpeg":
                    c.submit(b"\xff\xd8\xff\xe0" + os.urandom(5000), stream="j", encoding="jpeg")
                    c.recv(5)
                elif kind == "oversized":
                    c.send_raw([cp.encode({"type": "submit", "stream": "o", "seq": 0, "encoding": "raw",
                                           "dtype": "float32", "shape": [1, 3, 224, 224]}), bytes(40 << 20)])
                else:  # submits and never reads
                    for s in range(50):
                        c.submit(np.zeros((1, 3, 224, 224), np.float32), stream="n", seq=s)
                    time.sleep(1.0)
            counts[kind] = counts.get(kind, 0) + 1
        except Exception as exc:  # the service must survive; the hostile client may not
            counts[f"{kind} failed"] = counts.get(f"{kind} failed", 0) + 1
            counts.setdefault("last_error", repr(exc)[:200])
        stop.wait(0.5)


def chaos(service_pid: int, every: float, stop: threading.Event, killed: list) -> None:
    rng = random.Random(1)
    while not stop.wait(every):
        workers = [p for p in psutil.Process(service_pid).children() if "spawn_main" in " ".join(p.cmdline())]
        if workers:
            victim = rng.choice(workers)
            try:
                os.kill(victim.pid, signal.SIGKILL)
                killed.append(victim.pid)
            except ProcessLookupError:
                pass


def capacity(sock: str, seconds: float = 6.0) -> float:
    from hetsched.client.feed import feed, synthetic_frames
    with Client(sock, timeout=60) as c:
        c.enable_shm(10)
        stats = feed(c, synthetic_frames((1, 3, 224, 224), "float32"), fps=None, duration=seconds, count=None,
                     window=8, stream="capacity")
    return stats.received / seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--load", type=float, default=0.8, help="offered rate as a share of the measured capacity")
    ap.add_argument("--kill-every", type=float, default=20.0)
    ap.add_argument("--config", default=None, help="service config (default: the built-in big + emulated little)")
    ap.add_argument("--out", default=None, help="markdown file to write the report into (between soak markers)")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="hetsched-soak-")
    sock = f"ipc://{tmp}/s.sock"
    proc = start_service(args.config, sock, tmp)
    stop = threading.Event()
    try:
        cap = capacity(sock)
        fps = args.load * cap
        print(f"capacity {cap:.1f} fps; offering {fps:.1f} fps for {args.minutes:g} min", flush=True)
        result: dict = {}
        counts: dict = {}
        killed: list = []
        rss: list = []
        threads = [threading.Thread(target=honest, args=(sock, fps, args.minutes * 60, result)),
                   threading.Thread(target=hostile, args=(sock, stop, tmp, counts), daemon=True),
                   threading.Thread(target=chaos, args=(proc.pid, args.kill_every, stop, killed), daemon=True)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        while threads[0].is_alive():
            rss.append((round(time.monotonic() - t0), round(rss_mb(proc.pid), 1)))
            threads[0].join(15)
        stop.set()
        for t in threads[1:]:
            t.join(30)
        with Client(sock, timeout=30) as c:
            st = c.stats()
    finally:
        stop.set()
        stop_service(proc)
    warm = [m for t, m in rss if t >= 60] or [m for _, m in rss]
    report = [f"Run {time.strftime('%Y-%m-%d %H:%M')}: `python scripts/soak.py --minutes {args.minutes:g}` "
              f"({os.cpu_count()} cores; capacity {cap:.1f} fps, offered {fps:.1f} fps = {args.load:.0%}).", "",
              "| figure | value |", "|---|---|",
              f"| frames sent / answered / duplicated / missing | {result.get('sent')} / {result.get('answered')} / "
              f"{result.get('duplicated')} / {result.get('missing')} |",
              f"| results in submission order (immediate refusals excluded, as documented) | {result.get('in_order')} |",
              f"| error replies to the honest client | {json.dumps(result.get('errors', {}))} |",
              f"| workers SIGKILLed / restarts seen by the service | {len(killed)} / {st['supervision']['restarts']} |",
              f"| frames replayed / duplicates dropped by the ledger | {st['supervision']['replayed']} / "
              f"{st['supervision']['duplicates_dropped']} |",
              f"| hostile clients by kind | {json.dumps({k: v for k, v in counts.items() if k != 'last_error'})} |",
              f"| requests dropped for not reading | {st.get('dropped_requests')} |",
              f"| coordinator's longest loop turn | {st['loop']['max_turn_ms']:.1f} ms |",
              f"| RSS of the service's processes after warm-up (min / max MB) | {min(warm):.0f} / {max(warm):.0f} |",
              "", "RSS over time (s, MB): " + ", ".join(f"{t}:{m:.0f}" for t, m in rss[::max(1, len(rss) // 20)])]
    text = "\n".join(report)
    print(text)
    if args.out:
        body = open(args.out).read() if os.path.isfile(args.out) else "# Reliability\n"
        block = f"{BEGIN}\n{text}\n{END}"
        if BEGIN in body and END in body:
            body = body[:body.index(BEGIN)] + block + body[body.index(END) + len(END):]
        else:
            body = body.rstrip() + "\n\n## Soak test\n\n" + block + "\n"
        with open(args.out, "w") as fh:
            fh.write(body)
    ok = result.get("missing") == 0 and result.get("duplicated") == 0 and result.get("in_order")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
