"""The README's main job, `hetsched demo`, end to end on the built-in default config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_demo_runs_end_to_end_and_exits_zero(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hetsched", "demo", "--frames", "60"], cwd=ROOT,
                       capture_output=True, text=True, timeout=280,
                       env={**__import__("os").environ, "HETSCHED_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "EMULATED" in out                     # big_little.yaml on alike cores says so
    assert "predicted throughput" in out         # the plan
    assert "streamed 60 frames" in out           # results came back through the client socket
    assert "bottleneck" in out and "balance" in out and "efficiency" in out
    assert "hetsched: stopped" in r.stderr
