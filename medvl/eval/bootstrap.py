"""Seeded bootstrap confidence intervals for any metric.

``bootstrap_ci(fn, n, ...)`` resamples the n evaluation items with replacement
``n_boot`` times (NumPy ``default_rng(seed)``), recomputes ``fn(indices)`` each time and
returns the percentile interval, as CheXzero and most papers do. For metrics that are a
mean of per-sample values, :func:`bootstrap_mean` does the same with one matrix product.
Corpus-level metrics (BLEU from summed n-gram statistics, METEOR, CIDEr-D) pass a ``fn``
that recomputes the corpus score from the resampled items; CIDEr-D keeps the document
frequencies of the full set (recomputing them per resample would change the metric).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def bootstrap_ci(fn: Callable[[np.ndarray], float], n: int, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> dict:
    rng = np.random.default_rng(seed)
    vals = np.array([fn(rng.integers(0, n, n)) for _ in range(n_boot)], dtype=float)
    lo, hi = np.nanpercentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"low": float(lo), "high": float(hi), "std": float(np.nanstd(vals)), "n_boot": n_boot,
            "seed": seed, "level": 1 - alpha}


def bootstrap_mean(values: Sequence[float], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), (n_boot, len(v)))
    means = v[idx].mean(axis=1)
    lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"low": float(lo), "high": float(hi), "std": float(means.std()), "n_boot": n_boot,
            "seed": seed, "level": 1 - alpha}


def bootstrap_ci_many(fn: Callable[[np.ndarray], dict[str, float]], n: int, n_boot: int = 1000, seed: int = 0,
                      alpha: float = 0.05) -> dict[str, dict]:
    """:func:`bootstrap_ci` for several statistics computed together per draw (``fn`` returns a dict):
    the same resamples for all of them, at the cost of one evaluation per draw."""
    rng = np.random.default_rng(seed)
    draws = [fn(rng.integers(0, n, n)) for _ in range(n_boot)]
    out = {}
    for k in draws[0]:
        vals = np.array([d[k] for d in draws], dtype=float)
        lo, hi = np.nanpercentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        out[k] = {"low": float(lo), "high": float(hi), "std": float(np.nanstd(vals)), "n_boot": n_boot,
                  "seed": seed, "level": 1 - alpha}
    return out
