"""Exact, mergeable per-neuron activation statistics (numpy only; shared by compute and merge).

Why these shapes:
- Sums are kept as int64 fixed point (each activation rounded to 2^-24, each square to 2^-16)
  so that adding shards in any order gives bit-identical results: `sitegen merge` of n shards
  equals one whole run exactly. Bounds: |activation| < 2^31 / 2^24 * ... ~ 128 per token for
  2^32 tokens before the squares could overflow int64; real MLP activations are far smaller.
- The fine histogram bins |x| by the top bits of its float32 representation (16 linear sub-bins
  per octave, 2^-10 .. 2^8, plus a zero bin and overflow bins at both ends). Reading bits is
  exact, so the streaming histogram equals a brute-force one, and any value range is covered
  without knowing a neuron's range in advance.
- Quantiles and the 50-bin display histogram are derived from the fine histogram at finalise
  time (resolution: one fine bin, <= 6.25% of the value).
"""

from __future__ import annotations

import numpy as np

SUM_SHIFT = 24  # activations summed in units of 2^-24
SQ_SHIFT = 16  # squares summed in units of 2^-16
LO_EXP = -10  # 0 < |x| < 2^-10 lands in a 'tiny' bin of its sign
OCTAVES = 18  # up to 2^8; larger values land in the overflow bin
BINS_PER_OCTAVE = 16  # from the top 4 mantissa bits
HALF_BINS = OCTAVES * BINS_PER_OCTAVE  # regular bins per sign
# Index order = value order: negative bins (most negative first), negative tiny, zero, positive tiny, positive bins.
NEG_TINY, ZERO_BIN, POS_TINY = HALF_BINS, HALF_BINS + 1, HALF_BINS + 2
N_FINE_BINS = 2 * HALF_BINS + 3
_LO_CODE = (127 + LO_EXP) << 4  # float32 exponent + top 4 mantissa bits of 2^LO_EXP
DISPLAY_BINS = 50
QUANTILE_LEVELS = (
    0.0001, 0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95,
    0.975, 0.99, 0.995, 0.999, 0.9995, 0.9999,
)


def _code_table() -> np.ndarray:
    """Fine bin for every value of (float32 bits >> 19) + 4096, i.e. sign, exponent and 4 mantissa bits.
    Magnitude code 0 (zero and values below ~1e-38) counts as zero."""
    code = np.arange(-4096, 4096)
    negative = code < 0
    mag = np.where(negative, code + 4096, code)
    j = np.minimum(mag - _LO_CODE, HALF_BINS - 1)
    regular = np.where(negative, HALF_BINS - 1 - j, POS_TINY + 1 + j)
    tiny = np.where(negative, NEG_TINY, POS_TINY)
    return np.where(mag == 0, ZERO_BIN, np.where(mag < _LO_CODE, tiny, regular)).astype(np.int32)


CODE_TABLE = _code_table()


def fine_bins(x: np.ndarray) -> np.ndarray:
    """Fine-histogram bin of each float32 value (the reference for the torch version)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.int32)
    return CODE_TABLE[(bits >> 19) + 4096].astype(np.int64)


def fine_bin_edges() -> np.ndarray:
    """Edges of the fine bins as float64, length N_FINE_BINS + 1 (outermost are +-inf; the zero bin is [0, 0])."""
    j = np.arange(HALF_BINS)
    lower = np.ldexp(1.0 + (j % BINS_PER_OCTAVE) / BINS_PER_OCTAVE, LO_EXP + j // BINS_PER_OCTAVE)
    pos_edges = np.concatenate([lower, [np.inf]])  # lower_0 .. lower_{P-1}, inf
    return np.concatenate([-pos_edges[::-1], [0.0, 0.0], pos_edges])


def positive_count(hist: np.ndarray) -> np.ndarray:
    """Tokens > 0 per neuron, read off the histogram (bins above the zero bin)."""
    return hist[..., POS_TINY:].sum(-1)


def fixed_sums(x: np.ndarray) -> tuple[int, int]:
    """Reference fixed-point sum and sum of squares of float32 values."""
    x = np.asarray(x, dtype=np.float32)
    s = np.rint(x * np.float32(2.0**SUM_SHIFT)).astype(np.int64).sum()
    sq = np.rint((x * x) * np.float32(2.0**SQ_SHIFT)).astype(np.int64).sum()
    return int(s), int(sq)


def finalise(count: int, sum_fx: np.ndarray, sumsq_fx: np.ndarray, hist_fine: np.ndarray,
             vmin: np.ndarray, vmax: np.ndarray) -> dict[str, np.ndarray]:
    """Derived statistics for n neurons from their raw accumulators.

    Returns mean, std (population), quantiles (n, len(QUANTILE_LEVELS)) and the 50-bin display
    histogram (counts (n, 50) between each neuron's min and max).
    """
    n = len(sum_fx)
    c = max(int(count), 1)
    mean = sum_fx.astype(np.float64) / (c * 2.0**SUM_SHIFT)
    ex2 = sumsq_fx.astype(np.float64) / (c * 2.0**SQ_SHIFT)
    std = np.sqrt(np.maximum(ex2 - mean * mean, 0.0))
    edges = fine_bin_edges()
    lo_e = np.maximum(edges[:-1][None, :], vmin[:, None].astype(np.float64))
    hi_e = np.minimum(edges[1:][None, :], vmax[:, None].astype(np.float64))
    hi_e = np.maximum(hi_e, lo_e)
    cum = np.cumsum(hist_fine, axis=1)
    quantiles = np.zeros((n, len(QUANTILE_LEVELS)), dtype=np.float32)
    rows = np.arange(n)
    for qi, level in enumerate(QUANTILE_LEVELS):
        target = level * cum[:, -1]
        b = np.minimum((cum < target[:, None]).sum(axis=1), N_FINE_BINS - 1)
        below = np.where(b > 0, cum[rows, np.maximum(b - 1, 0)], 0)
        in_bin = np.maximum(hist_fine[rows, b], 1)
        frac = np.clip((target - below) / in_bin, 0.0, 1.0)
        quantiles[:, qi] = lo_e[rows, b] + frac * (hi_e[rows, b] - lo_e[rows, b])
    # Display histogram: each fine bin's count goes to the display bin holding its midpoint.
    mid = (lo_e + hi_e) / 2
    span = np.maximum(vmax.astype(np.float64) - vmin.astype(np.float64), 1e-12)
    idx = np.clip(((mid - vmin[:, None]) / span[:, None] * DISPLAY_BINS).astype(np.int64), 0, DISPLAY_BINS - 1)
    display = np.zeros((n, DISPLAY_BINS), dtype=np.int64)
    np.add.at(display, (np.repeat(rows, N_FINE_BINS), idx.ravel()), hist_fine.ravel())
    return {"mean": mean, "std": std, "quantiles": quantiles, "hist_counts": display}


def select_extremes(values: np.ndarray, seq_ids: np.ndarray, k: int) -> np.ndarray:
    """Indices (k, n) of the k best candidates per column: highest value first, ties by lower
    sequence id. Entries with seq_id < 0 are empty slots and sort last."""
    order = np.lexsort((seq_ids, -np.where(seq_ids < 0, -np.inf, values)), axis=0)
    return order[:k]
