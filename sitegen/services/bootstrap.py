"""Seeded 95% bootstrap confidence intervals over excerpts for every explanation score. Pure numpy.

Every score here is a function of sums over excerpts (an excerpt's tokens for the simulation's pooled
correlation, its one answer for detection and fuzzing), so a bootstrap resample is a vector of
multiplicities (how often each excerpt was drawn) and the resampled sums are
one matrix product: B resamples cost one (B x n) @ (n x k) product, not B Python loops.

The interval is the percentile interval: the 2.5th and 97.5th percentiles of the B resampled
scores. Resamples whose score is undefined (a constant side in a correlation) are left out of the
percentiles; with fewer than half of them defined there is no interval (None).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95


def _multiplicities(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """(resamples, n) counts: how often each of n excerpts is drawn in each resample of size n
    (n draws with replacement per resample, counted with one bincount)."""
    drawn = rng.integers(0, n, size=(resamples, n)) + n * np.arange(resamples)[:, None]
    return np.bincount(drawn.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> list[float] | None:
    """The percentile interval of resampled scores (NaN: undefined, left out)."""
    ok = values[np.isfinite(values)]
    if ok.size == 0 or ok.size < values.size / 2:
        return None
    alpha = (1 - level) / 2
    lo, hi = np.quantile(ok, [alpha, 1 - alpha])
    return [float(lo), float(hi)]


def bootstrap_sums(
    groups: Sequence[np.ndarray],
    statistic: Callable[..., np.ndarray],
    *,
    seed: int = SEED,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
) -> list[float] | None:
    """The bootstrap interval of a statistic of per-excerpt sums. `groups`: one (n_g, k_g) array of
    per-excerpt sums per stratum (resampled separately, each keeping its size: detection's
    activating and non-activating excerpts); `statistic(*sums)` gets each stratum's (resamples, k_g)
    resampled sums and returns (resamples,) scores, NaN where undefined. None without excerpts."""
    if not groups or any(len(g) == 0 for g in groups):
        return None
    rng = np.random.default_rng(seed)
    sums = [_multiplicities(rng, len(g), resamples) @ np.asarray(g, dtype=np.float64) for g in groups]
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.asarray(statistic(*sums), dtype=np.float64)
    return percentile_interval(values, level)


# --- the scores -------------------------------------------------------------------------------


def correlation_sums(simulated: Sequence[Sequence[float | None]], true: Sequence[Sequence[float]]) -> np.ndarray:
    """Per excerpt: (count, sum x, sum y, sum x^2, sum y^2, sum xy) of its (simulated, true) tokens,
    a position with no prediction counting as 0 (as scoring.score_simulation)."""
    rows = []
    for sim, real in zip(simulated, true):
        x = np.asarray([0.0 if p is None else float(p) for p in sim], dtype=np.float64)
        y = np.asarray([float(t) for t in real], dtype=np.float64)
        rows.append([x.size, x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()])
    return np.asarray(rows, dtype=np.float64).reshape(-1, 6)


def pooled_correlation(s: np.ndarray) -> np.ndarray:
    """Pearson correlation from pooled sums (..., 6); NaN where either side is constant."""
    n, sx, sy, sxx, syy, sxy = np.moveaxis(s, -1, 0)
    cov = sxy - sx * sy / n
    vx = sxx - sx * sx / n
    vy = syy - sy * sy / n
    # a variance that is float noise of the sums is no variance (as correlation()'s std() == 0)
    tiny = 1e-12 * np.maximum(1.0, np.maximum(sxx, syy))
    ok = (n >= 2) & (vx > tiny) & (vy > tiny)
    out = np.full(np.shape(n), np.nan)
    np.divide(cov, np.sqrt(np.abs(vx * vy)), out=out, where=ok)
    return np.clip(out, -1.0, 1.0)


def simulation_ci(
    simulated: Sequence[Sequence[float | None]], true: Sequence[Sequence[float]], seed: int = SEED
) -> list[float] | None:
    """The interval of the pooled correlation, resampling the scored excerpts."""
    return bootstrap_sums([correlation_sums(simulated, true)], pooled_correlation, seed=seed)


def balanced_accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float | None:
    """The mean of the recall on each class (1: activating, 0: not); None without both classes."""
    y = np.asarray(labels, dtype=bool)
    p = np.asarray(predictions, dtype=bool)
    if y.all() or not y.any():
        return None
    return float(((p & y).sum() / y.sum() + (~p & ~y).sum() / (~y).sum()) / 2)


def balanced_accuracy_ci(labels: Sequence[int], predictions: Sequence[int], seed: int = SEED) -> list[float] | None:
    """The interval of the balanced accuracy, resampling the activating and the non-activating
    excerpts separately (a resample keeps both classes and their sizes)."""
    y = np.asarray(labels, dtype=bool)
    correct = (np.asarray(predictions, dtype=bool) == y).astype(np.float64)[:, None]
    if y.all() or not y.any():
        return None
    return bootstrap_sums(
        [correct[y], correct[~y]],
        lambda pos, neg: (pos[:, 0] / y.sum() + neg[:, 0] / (~y).sum()) / 2,
        seed=seed,
    )


def score_entry(value: float | None, ci: list[float] | None, n: int | None) -> dict:
    """One score as the payload carries it: {"value", "ci": [lo, hi] or None, "n": excerpts scored}."""
    r = lambda x: None if x is None else round(float(x), 4)
    return {"value": r(value), "ci": None if ci is None else [r(ci[0]), r(ci[1])], "n": n}
