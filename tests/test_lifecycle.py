"""`hetsched start` as a real process: Ctrl+C drains and stops everything; SIGKILL of the
coordinator leaves no worker and no emulation co-runner behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from .conftest import wait_for

CONFIG = """
model: builtin:squeezenet1.1
clusters:
  big: {cores: [0]}
  little: {cores: [1], speed: 0.5}
profile: {measure: false}
"""


def start_service(tmp_path, config=CONFIG):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(config)
    sock = f"ipc://{tmp_path}/client.sock"
    proc = subprocess.Popen([sys.executable, "-m", "hetsched", "start", "--config", str(cfg), "--bind", sock],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def reader(stream):
        for line in stream:
            lines.append(line)

    for s in (proc.stdout, proc.stderr):
        threading.Thread(target=reader, args=(s,), daemon=True).start()
    try:
        wait_for(lambda: any("serving on" in ln for ln in lines) or proc.poll() is not None, timeout=90,
                 what="the service to start")
    except AssertionError:
        proc.kill()
        proc.wait(5)
        raise
    assert proc.poll() is None, "".join(lines)
    return proc, sock, lines


def descendants(pid):
    try:
        return [p for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(procs):
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def feed_some(sock, n=5):
    import numpy as np

    from hetsched.client import Client
    with Client(sock, timeout=30) as c:
        for _ in range(n):
            c.submit(np.zeros((1, 3, 224, 224), np.float32))
        return list(c.replies(expect=n))


@pytest.mark.timeout(180)
def test_sigint_drains_and_stops_workers_and_corunners(tmp_path):
    proc, sock, lines = start_service(tmp_path)
    kids = descendants(proc.pid)
    cmdlines = [" ".join(k.cmdline()) for k in kids]
    assert sum("multiprocessing" in c for c in cmdlines) >= 2, cmdlines   # 2 stage workers
    assert any("hetsched.host.emulation" in c for c in cmdlines), cmdlines     # the little core's co-runner
    replies = feed_some(sock)
    assert all(r["type"] == "result" for r in replies)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0, "".join(lines)
    wait_for(lambda: not alive(kids), timeout=5, what="workers and co-runners to exit")


@pytest.mark.timeout(180)
def test_sigkill_of_coordinator_leaves_no_process(tmp_path):
    proc, sock, lines = start_service(tmp_path)
    kids = descendants(proc.pid)
    assert len(kids) >= 3
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    t0 = time.monotonic()
    wait_for(lambda: not alive(kids), timeout=5, what="orphaned workers/co-runners to die")
    print(f"all {len(kids)} children gone {time.monotonic() - t0:.2f} s after SIGKILL")


@pytest.mark.timeout(120)
def test_config_error_names_the_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("clusters:\n  big: {cores: [0]}\n  little: {cores: [1, 99]}\n")
    r = subprocess.run([sys.executable, "-m", "hetsched", "plan", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "clusters.little.cores[1]: core 99 does not exist on this host" in r.stderr


@pytest.mark.timeout(180)
def test_status_snapshot_of_a_running_service(tmp_path):
    import json
    proc, sock, lines = start_service(tmp_path)
    try:
        feed_some(sock, 4)
        r = subprocess.run([sys.executable, "-m", "hetsched", "status", "--connect", sock, "--json"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        snap = json.loads(r.stdout)
        assert snap["completed"] == 4 and snap["workers"] == 2 and snap["uptime_s"] > 0
        assert [s["cluster"] for s in snap["stages"]] and all("utilization" in s for s in snap["stages"])
        assert snap["supervision"]["restarts"] == 0 and not snap["supervision"]["degraded"]
        once = subprocess.run([sys.executable, "-m", "hetsched", "status", "--connect", sock, "--once"],
                              capture_output=True, text=True, timeout=60)
        assert once.returncode == 0 and "health ok" in once.stdout, once.stdout + once.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
