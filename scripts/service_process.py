"""Start and stop `hetsched start` as a real process, for the scripts that measure it (soak, re-planning)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_service(config: str | None, sock: str, tmp: str, timeout: float = 180.0) -> subprocess.Popen:
    """``hetsched start --config CONFIG --bind SOCK`` with a private cost cache; returns once it serves."""
    cmd = [sys.executable, "-m", "hetsched", "start", "--bind", sock] + (["--config", config] if config else [])
    env = {**os.environ, "HETSCHED_CACHE_DIR": os.path.join(tmp, "cache")}
    log_path = os.path.join(tmp, "service.log")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = open(log_path).read()
        if "serving on" in text:
            return proc
        if proc.poll() is not None:
            raise SystemExit(f"the service exited: {text[-2000:]}")
        time.sleep(0.5)
    proc.kill()
    proc.wait(10)
    raise SystemExit(f"the service did not start within {timeout:.0f} s")


def stop_service(proc: subprocess.Popen) -> None:
    """SIGINT (drain and stop), then kill if it does not exit within a minute."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
