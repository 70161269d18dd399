"""Uncertainty of a results table: bootstrap intervals over test users, paired tests between rows.

Why by hand and not ``scipy.stats.bootstrap``: scipy is not a dependency of the project (it would be
installed only for this), and what is needed is small and specific: ONE set of resampled user indices
shared by every metric of a row (so the cells of a row are consistent with each other) and by every row
of a table (so two rows are compared on the same resamples), vectorised over replicates with numpy.

* ``bootstrap_ci`` -- the percentile bootstrap: the test users are resampled with replacement
  ``n_boot`` times (seeded), each metric's mean is taken per replicate, and the (1-level)/2 and
  (1+level)/2 quantiles of those means bound the interval.  For a hit rate over n users this agrees
  with the closed-form binomial interval p +- 1.96 sqrt(p(1-p)/n) (tested).
* ``paired_comparison`` -- two rows scored on the SAME users: the per-user differences d_u = a_u - b_u.
  The interval is the paired bootstrap's (users resampled, mean of d per replicate); the two-sided
  p-value is a paired randomization (sign-flip) test: under the null that the two methods are
  exchangeable for every user, each d_u is equally likely +d_u or -d_u, and p is the share of
  ``n_perm`` random sign patterns whose |mean| reaches the observed |mean| (with the usual +1 in the
  numerator and denominator, so p > 0).  The randomization test is the one the IR literature recommends
  for paired per-query metrics (Smucker, Allan & Carterette, CIKM 2007).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

__all__ = ["bootstrap_ci", "paired_comparison", "seed_mean_std", "CI_METHOD"]

# Said in the header of every table that shows these intervals.
CI_METHOD = ("95 % intervals: percentile bootstrap over test users ({n_boot} resamples, seed {seed}); "
             "paired Δ: the same users resampled for both rows, p from a paired sign-flip randomization "
             "test ({n_boot} permutations)")

_CHUNK_CELLS = 4_000_000  # resampled values held at once (replicates x users x metrics), ~32 MB


def _matrix(per_user: Mapping[str, Sequence[float]]) -> tuple[list[str], np.ndarray]:
    keys = list(per_user)
    cols = [np.asarray(per_user[k], dtype=np.float64) for k in keys]
    n = {len(c) for c in cols}
    if len(n) > 1:
        raise ValueError(f"per-user vectors differ in length: { {k: len(c) for k, c in zip(keys, cols)} }")
    return keys, (np.stack(cols, axis=1) if cols else np.zeros((0, 0)))


def _replicate_means(m: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, metrics) means over users resampled with replacement; the draw depends only on
    (seed, number of users), so every row of a table scored on the same users gets the same resamples."""
    n, k = m.shape
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, k))
    chunk = max(1, _CHUNK_CELLS // max(n * max(k, 1), 1))
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = m[idx].mean(axis=1)
    return out


def _check(n_boot: int, level: float) -> None:
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def bootstrap_ci(per_user: Mapping[str, Sequence[float]], n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap interval of the mean of every per-user vector (all resampled together).

    Empty vectors give (0.0, 0.0)."""
    _check(n_boot, level)
    keys, m = _matrix(per_user)
    if not keys:
        return {}
    if m.shape[0] == 0:
        return {k: (0.0, 0.0) for k in keys}
    reps = _replicate_means(m, int(n_boot), seed)
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return {k: (float(a), float(b)) for k, a, b in zip(keys, lo, hi)}


def paired_comparison(a: Sequence[float], b: Sequence[float], n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict[str, float]:
    """Mean of a - b over the same users, its paired-bootstrap interval and a two-sided p-value.

    Returns {"diff", "lo", "hi", "p"}."""
    _check(n_boot, level)
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired rows must be scored on the same users: {a.shape} vs {b.shape}")
    d = a - b
    n = d.shape[0]
    if n == 0:
        return {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p": 1.0}
    observed = float(d.mean())
    reps = _replicate_means(d[:, None], int(n_boot), seed)[:, 0]
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    # sign-flip randomization test, same chunking as the bootstrap
    rng = np.random.default_rng(seed + 1)
    extreme = 0
    chunk = max(1, _CHUNK_CELLS // n)
    tol = 1e-12 * max(1.0, abs(observed))  # a permutation that ties the observed mean counts as extreme
    for start in range(0, int(n_boot), chunk):
        stop = min(int(n_boot), start + chunk)
        signs = rng.integers(0, 2, size=(stop - start, n)) * 2 - 1
        extreme += int((np.abs((signs * d).mean(axis=1)) >= abs(observed) - tol).sum())
    p = (extreme + 1) / (int(n_boot) + 1)
    return {"diff": observed, "lo": float(lo), "hi": float(hi), "p": float(min(p, 1.0))}


def seed_mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0.0 for a single seed) of one metric over seeds."""
    v = [float(x) for x in values]
    if not v:
        return 0.0, 0.0
    mean = sum(v) / len(v)
    if len(v) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))
