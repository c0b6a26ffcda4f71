"""Paired comparisons of evaluation runs over the questions they share."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def paired_bootstrap(diffs: Sequence[float], resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, Any]:
    """Mean of per-question differences and its percentile bootstrap interval (questions are
    resampled with replacement, `resamples` times, from a seeded generator)."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        raise ValueError("no paired items to bootstrap")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": int(d.size),
            "resamples": resamples, "seed": seed, "level": level}
