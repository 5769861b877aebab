"""Shared fixtures: the built-in model, the shared real-weights assets, polling helpers, leak checks."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_MODEL = SHARED / "models" / "squeezenet1.1.onnx"
SHARED_IMAGES = SHARED / "images"
SHARED_LABELS = SHARED / "models" / "imagenet_synset_words.txt"

needs_shared = pytest.mark.skipif(not SHARED_MODEL.is_file(), reason=f"shared model not present at {SHARED_MODEL}")


def wait_for(cond, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``cond`` until it returns a truthy value; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def manual_plan(g, stages, names=None):
    """A plan built by hand: [(cores, first, last, threads, replicas)] (one member) or
    [(first, last, [(cores, threads, replicas), ...])] (a pool); cores may repeat across stages."""
    from hetsched.planning.plan import Member, Plan, Stage
    out = []
    for i, st in enumerate(stages):
        if len(st) == 5:
            cores, a, b, t, r = st
            members = [(cores, t, r)]
        else:
            a, b, members = st
        out.append(Stage.of(i, a, b, [Member(f"c{i}m{j}", tuple(c), t, r, 1.0 + j, 0.0)
                                      for j, (c, t, r) in enumerate(members)]))
    return Plan.of(out, tuple(names or g.layer_names))


def topk5():
    """The last stage reports the top-5 of output 0 (softmax applied), as the service configures it."""
    from hetsched.runtime.spec import TopkSpec
    return TopkSpec(0, 5, True)


@pytest.fixture(scope="session")
def squeezenet():
    from hetsched.model.graph import analyze
    from hetsched.model.squeezenet import build_squeezenet11
    model = build_squeezenet11()
    return model, analyze(model)


@pytest.fixture(autouse=True)
def no_leaked_children():
    """Every process a test starts must be reaped by the end of the test."""
    yield
    me = psutil.Process()

    def leftovers():
        out = []
        for c in me.children(recursive=True):
            try:
                if c.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(c.cmdline()):
                    out.append(c)
            except psutil.Error:  # exited (or became a zombie) meanwhile
                pass
        return out
    try:
        wait_for(lambda: not leftovers(), timeout=5.0, what="child processes to exit")
    except AssertionError:
        left = leftovers()
        for c in left:
            c.kill()
        pytest.fail(f"test leaked processes: {[(c.pid, c.cmdline()[-2:]) for c in left]}")
