"""The one top-k of a class vector (used by the last stage's workers and by reports).

Scores are softmax probabilities unless the model already outputs probabilities. NaN never ranks
first; ties keep the lower index first.
"""

from __future__ import annotations

import numpy as np


def topk_scores(output: np.ndarray, k: int, apply_softmax: bool) -> tuple[np.ndarray, np.ndarray]:
    """(indices, scores) of the ``k`` best classes of a class vector, best first (float64 math)."""
    v = np.asarray(output).reshape(-1)
    if v.size == 0:
        raise ValueError("top-k of an empty model output")
    if k < 0:
        raise ValueError(f"top-k: k must be >= 0, got {k}")
    v = v.astype(np.float64)
    if apply_softmax:
        finite = v[np.isfinite(v)]
        m = finite.max() if finite.size else 0.0
        e = np.exp(v - m)
        p = e / e[np.isfinite(e)].sum() if np.isfinite(e).any() else np.zeros_like(v)
    else:
        p = v
    p = np.where(np.isnan(p), -np.inf, p)
    k = min(k, p.size)
    if 0 < k < p.size:
        kth = np.partition(p, p.size - k)[p.size - k]
        cand = np.flatnonzero(p >= kth)
        order = cand[np.argsort(-p[cand], kind="stable")][:k]
    else:
        order = np.argsort(-p, kind="stable")[:k]
    scores = p[order]
    return order, np.where(np.isfinite(scores), scores, 0.0)
