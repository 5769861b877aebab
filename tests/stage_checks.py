"""Run a model whole and stage by stage (real onnxruntime sessions) and compare the outputs."""

from __future__ import annotations

import numpy as np
import onnx

from hetsched.host.ort import create_session
from hetsched.model.graph import extract_stage, passthrough_names, random_inputs


def run(model, feed: dict) -> dict:
    sess = create_session(model, 1)
    names = {i.name for i in sess.get_inputs()}
    outs = sess.run(None, {k: v for k, v in feed.items() if k in names})
    return dict(zip([o.name for o in sess.get_outputs()], outs))


def chain_outputs(model, g, cuts, feed, check: bool = True) -> dict:
    """Feed ``feed`` through the stages split at ``cuts`` (boundary indices), each stage's outputs
    (plus passed-through tensors) into the next; returns the last boundary's tensors."""
    bounds = [0, *cuts, len(g.layers)]
    cur = feed
    for a, b in zip(bounds[:-1], bounds[1:]):
        sub = extract_stage(model, g, a, b - 1)
        if check:
            onnx.checker.check_model(sub, full_check=True)
        out = run(sub, cur)
        out.update({k: cur[k] for k in passthrough_names(g, a, b - 1)})
        assert sorted(out) == sorted(t.name for t in g.boundaries[b])
        for t in g.boundaries[b]:
            assert out[t.name].shape == t.shape and out[t.name].dtype == np.dtype(t.dtype), t
        cur = out
    return cur


def max_diff(got: dict, want: dict) -> float:
    return max(float(np.abs(got[k].astype(np.float64) - want[k].astype(np.float64)).max()) for k in want)


def assert_split_equal(model, g, cuts, tol: float = 1e-4, seed: int = 0) -> float:
    feed = random_inputs(g.inputs, seed=seed)
    want = run(model, feed)
    d = max_diff(chain_outputs(model, g, cuts, feed), want)
    assert d <= tol, f"split at {cuts}: max abs diff {d}"
    return d


def assert_every_cut_equal(model, g, tol: float = 1e-5) -> None:
    """Every single cut, and all cuts at once, give the unsplit model's outputs."""
    for cut in range(1, len(g.layers)):
        assert_split_equal(model, g, [cut], tol)
    if len(g.layers) > 2:
        assert_split_equal(model, g, list(range(1, len(g.layers))), tol)
