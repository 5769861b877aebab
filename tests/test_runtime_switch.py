"""The plan switch itself, on real pipelines (real worker processes and ZeroMQ sockets), driven the
way the server drives it: frames keep going in while a new plan starts; a plan whose workers cannot
start is given up and the running one keeps every frame; a plan that starts takes over without a
frame lost or answered twice."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import onnxruntime as ort
import pytest
import zmq

from hetsched.model.graph import random_inputs
from hetsched.runtime.drift import Decision
from hetsched.runtime.pipeline import Pipeline
from hetsched.runtime.runtime import Runtime

from .conftest import manual_plan


def drive(rt: Runtime, model, g, n_before: int, switch, n_after: int = 12, timeout: float = 120.0):
    """Submit frames (a few at a time), call ``switch()`` after ``n_before`` of them, and go on until
    the new plan started (or was given up) and ``n_after`` more frames were submitted; return the
    results in the order they came and the inputs."""
    poller = zmq.Poller()
    rt.register(poller)
    xs: list = []
    results: list = []
    switched, after = False, None
    deadline = time.monotonic() + timeout
    while after is None or len(xs) < after + n_after or len(results) < len(xs):
        assert time.monotonic() < deadline, f"{len(results)} of {len(xs)} frames answered in {timeout} s"
        while (after is None or len(xs) < after + n_after) and len(xs) - len(results) < 4 and rt.can_submit:
            xs.append(random_inputs(g.inputs, seed=len(xs))["data"])
            rt.submit(xs[-1])
        if not switched and len(xs) >= n_before:
            switch()
            switched = True
        events = dict(poller.poll(50))
        results += rt.process(events)
        if switched and after is None and rt.starting is None:
            after = len(xs)   # the switch is over (done or given up): frames from here go to the survivor
    return results, xs


def check(results, xs, model):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    # (the Runtime hands results on as they finish, old and new plan mixed; the server puts each stream
    # back in order: tests/test_replan.py checks that through the socket)
    results = sorted(results, key=lambda r: r.frame_id)
    assert len({r.frame_id for r in results}) == len(results) == len(xs), "a frame was lost or answered twice"
    for r, x in zip(results, xs):
        assert r.error is None, r.error
        want = sess.run(None, {"data": x})[0]
        assert np.abs(r.outputs[0] - want).max() <= 1e-4


@contextlib.contextmanager
def switched_mid_stream(model, g, new_stages):
    """A one-stage plan on core 0 serving frames, told mid-stream to switch to ``new_stages``
    (``manual_plan`` form; ``n`` = the last layer): yields the runtime, the switch's history entry, the
    results and the inputs; the runtime is stopped after."""
    def make(p, generation, ids):
        return Pipeline(model, g, p, max_inflight=6, frame_ids=ids, generation=generation)
    n = len(g.layer_names) - 1
    rt = Runtime(manual_plan(g, [((0,), 0, n, 1, 1)]), make).start()
    entry: dict = {"switch": True, "decision": "test"}
    new = manual_plan(g, [tuple(n if v == "n" else v for v in st) for st in new_stages])
    try:
        switch = lambda: rt._begin_switch(Decision(True, "test", rt.active.plan, new, 1.0), {}, 0.0, entry)  # noqa: E731
        results, xs = drive(rt, model, g, 8, switch)
        yield rt, entry, results, xs
    finally:
        rt.stop()


@pytest.mark.timeout(180)
def test_a_plan_whose_workers_cannot_start_is_given_up_and_no_frame_is_lost(squeezenet):
    model, g = squeezenet
    # core 4000 does not exist here: the new plan's worker cannot be pinned and exits at start
    with switched_mid_stream(model, g, [((4000,), 0, "n", 1, 1)]) as (rt, entry, results, xs):
        assert rt.starting is None and rt.generation == 0
        assert entry["switch"] is False and "failed to start" in entry["decision"], entry
        check(results, xs, model)


@pytest.mark.timeout(180)
def test_a_plan_that_starts_takes_over_mid_stream_exactly_once(squeezenet):
    model, g = squeezenet
    with switched_mid_stream(model, g, [((1,), 0, 9, 1, 1), ((0,), 10, "n", 1, 1)]) as (rt, entry, results, xs):
        assert rt.generation == 1 and rt.active.plan.n_stages == 2, entry
        assert entry["switch"] is True and entry["start_s"] > 0
        gens = [len(r.hops) for r in sorted(results, key=lambda r: r.frame_id)]
        assert gens[0] == 1 and gens[-1] == 2, "the first frames ran on the old plan, the last on the new"
        check(results, xs, model)
