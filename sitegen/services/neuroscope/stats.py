"""Exact, mergeable per-neuron activation statistics (numpy only; shared by compute and merge).

Why these shapes:
- Sums are int64 fixed point so that adding shards in any order gives bit-identical results
  (`sitegen merge` of n shards equals one whole run exactly; floating-point merges such as
  Chan/Welford's (count, mean, M2) depend on the order). Activations are rounded to 2^-24. Each
  float32 square is split into two integer limbs, hi in units of 2^-16 and lo in units of 2^-46
  (lo = the rounding remainder of hi, |lo| <= 2^29), summed separately: together they hold every
  square >= 2^-23 (|x| >= 2^-11.5) exactly and smaller ones to 2^-47, so std keeps its accuracy at
  small scales (one limb at 2^-16 rounded the squares of |x| < 0.003 to zero: -70% at sigma 1e-3).
  Cost on the hot path: one more rint and sum per value. The std is then formed from the integers
  (N * sum(x^2) - sum(x)^2 in Python ints), so there is no cancellation either: relative error
  <= ~1e-7 for N(0, sigma), sigma from 1e-4 to 1e2, against float64 numpy (tested).
  Bounds: within a batch the limbs are summed in float64, exact while a batch holds < 2^21 values
  per neuron; over a run, int64 holds 2^32 tokens of |x| < 128 (the sum of x is the binding limb).
- The fine histogram bins |x| by the top bits of its float32 representation (16 linear sub-bins
  per octave, 2^-10 .. 2^8, plus a zero bin and overflow bins at both ends). Reading bits is
  exact, so the streaming histogram equals a brute-force one, and any value range is covered
  without knowing a neuron's range in advance.
- Quantiles are derived from the fine histogram at finalise time (resolution: one fine bin,
  <= 6.25% of the value). The display histogram is the fine histogram itself, clipped to
  [min, max], with neighbouring fine bins merged into bars about 1/100 of the range wide: each
  bar's count is exact (it equals np.histogram over the same edges), bars have variable width and
  are drawn as density. (A linear histogram between min and max cannot be exact in one streaming,
  mergeable pass: the range is unknown until the end. Re-binning the log-spaced fine bins into
  linear bins, as before, left empty bins between filled ones that were not in the data.)
"""

from __future__ import annotations

import math

import numpy as np

SUM_SHIFT = 24  # activations summed in units of 2^-24
SQ_SHIFT = 16  # squares: high limb in units of 2^-16
SQ_LO_SHIFT = 30  # squares: low limb in units of 2^-(16 + 30) = 2^-46
LO_EXP = -10  # 0 < |x| < 2^-10 lands in a 'tiny' bin of its sign
OCTAVES = 18  # up to 2^8; larger values land in the overflow bin
BINS_PER_OCTAVE = 16  # from the top 4 mantissa bits
HALF_BINS = OCTAVES * BINS_PER_OCTAVE  # regular bins per sign
# Index order = value order: negative bins (most negative first), negative tiny, zero, positive tiny, positive bins.
NEG_TINY, ZERO_BIN, POS_TINY = HALF_BINS, HALF_BINS + 1, HALF_BINS + 2
N_FINE_BINS = 2 * HALF_BINS + 3
_LO_CODE = (127 + LO_EXP) << 4  # float32 exponent + top 4 mantissa bits of 2^LO_EXP
DISPLAY_BINS = 100  # display bars are at least 1/100 of a neuron's range wide (unless one fine bin is wider)
QUANTILE_LEVELS = (
    0.0001,
    0.001,
    0.01,
    0.05,
    0.1,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
    0.95,
    0.975,
    0.99,
    0.995,
    0.999,
    0.9995,
    0.9999,
)


def _code_table() -> np.ndarray:
    """Fine bin for every code (see fine_bins) + CODE_OFFSET, i.e. sign, exponent and 4 mantissa
    bits. Magnitude code 0 (zero and values below ~1e-38) counts as zero; code -4097 is -0.0."""
    code = np.arange(-4097, 4096)
    negative = code < 0
    mag = np.where(negative, code + 4096, code)
    j = np.minimum(mag - _LO_CODE, HALF_BINS - 1)
    regular = np.where(negative, HALF_BINS - 1 - j, POS_TINY + 1 + j)
    tiny = np.where(negative, NEG_TINY, POS_TINY)
    return np.where(mag <= 0, ZERO_BIN, np.where(mag < _LO_CODE, tiny, regular)).astype(np.int32)


CODE_TABLE = _code_table()
CODE_OFFSET = 4097


def fine_bins(x: np.ndarray) -> np.ndarray:
    """Fine-histogram bin of each float32 value (the reference for the torch version).

    Bins are right-open in value, as np.histogram's: a value on an edge belongs to the bin on its
    right. The top bits of |x| put a positive value on an edge into the bin above it, but a
    negative one into the bin further left; so a negative value's bits are taken one ulp closer
    to zero ((bits - 1) in int64: the same bin, except exactly on an edge). -0.0 falls to -4097."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.int32).astype(np.int64)
    return CODE_TABLE[((bits + (bits >> 31)) >> 19) + CODE_OFFSET].astype(np.int64)


def fine_bin_edges() -> np.ndarray:
    """Edges of the fine bins as float64, length N_FINE_BINS + 1 (outermost are +-inf; the zero bin
    is [0, 0]). Every bin is [a, b) but the zero bin (exactly 0) and the tiny negative one
    [-2^-10, 0), whose right edge is shared with the zero bin."""
    j = np.arange(HALF_BINS)
    lower = np.ldexp(1.0 + (j % BINS_PER_OCTAVE) / BINS_PER_OCTAVE, LO_EXP + j // BINS_PER_OCTAVE)
    pos_edges = np.concatenate([lower, [np.inf]])  # lower_0 .. lower_{P-1}, inf
    return np.concatenate([-pos_edges[::-1], [0.0, 0.0], pos_edges])


def positive_count(hist: np.ndarray) -> np.ndarray:
    """Tokens > 0 per neuron, read off the histogram (bins above the zero bin)."""
    return hist[..., POS_TINY:].sum(-1)


def square_limbs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two fixed-point limbs of each float32 square: hi in units of 2^-16, lo in units of 2^-46
    (|lo| <= 2^29), both integer-valued float32. hi * 2^-16 + lo * 2^-46 equals the float32 square
    exactly when it is >= 2^-23, else to within 2^-47. (The torch accumulator does the same steps.)"""
    sq = np.square(np.asarray(x, dtype=np.float32)) * np.float32(2.0**SQ_SHIFT)
    hi = np.rint(sq)
    # sq - hi is exact (Sterbenz); scaling by a power of two is exact; only the last rint rounds.
    lo = np.rint((sq - hi) * np.float32(2.0**SQ_LO_SHIFT))
    return hi, lo


def fixed_sums(x: np.ndarray) -> tuple[int, int, int]:
    """Reference fixed-point sum, and sum of squares as (hi, lo) limbs, of float32 values."""
    x = np.asarray(x, dtype=np.float32)
    s = np.rint(x * np.float32(2.0**SUM_SHIFT)).astype(np.int64).sum()
    hi, lo = square_limbs(x)
    return int(s), int(hi.astype(np.int64).sum()), int(lo.astype(np.int64).sum())


def exact_std(count: int, sum_fx: np.ndarray, sumsq_fx: np.ndarray, sumsq_lo: np.ndarray) -> np.ndarray:
    """Population std from the integer sums, without cancellation: N^2 var = N * sum(x^2) - sum(x)^2
    is formed in Python integers (units 2^-48), so the only rounding is the final conversion."""
    # sum(x)^2 is in units of 2^-48; the square limbs in 2^-16 and 2^-46: bring all to 2^-48.
    hi_shift, lo_shift = 2 * SUM_SHIFT - SQ_SHIFT, 2 * SUM_SHIFT - SQ_SHIFT - SQ_LO_SHIFT
    out = np.zeros(len(sum_fx), dtype=np.float64)
    if count <= 0:
        return out
    for i, (s, hi, lo) in enumerate(zip(sum_fx.tolist(), sumsq_fx.tolist(), sumsq_lo.tolist())):
        n2_var = count * ((hi << hi_shift) + (lo << lo_shift)) - s * s
        out[i] = math.sqrt(max(n2_var, 0)) / count / 2.0**SUM_SHIFT
    return out


def display_histogram(
    hist_fine: np.ndarray, vmin: np.ndarray, vmax: np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The display histogram of n neurons: per neuron, bar edges (k + 1, float32, from min to max)
    and exact counts (k,). Each bar is a union of whole fine bins (clipped to [min, max]), so its
    count is exactly the number of values in it; neighbouring fine bins are merged until a bar is
    about 1/DISPLAY_BINS of the range wide (a wider fine bin stays one bar); no bar crosses zero.
    Counts follow np.histogram's rule over the returned edges: bars are [a, b), the last [a, max],
    so a value on an inner edge is in the bar to its right and exact zeros in the bar starting at
    0; except that when the minimum is exactly 0, its zeros are a first bar [0, 0] of their own
    (np.histogram would fold them into the next bar). Bars are contiguous: an empty bar is an
    interval that really holds no value. Draw them with height from count / width (density)."""
    n = len(hist_fine)
    edges = fine_bin_edges()
    lo = np.maximum(edges[:-1][None, :], vmin[:, None].astype(np.float64))
    hi = np.maximum(np.minimum(edges[1:][None, :], vmax[:, None].astype(np.float64)), lo)
    span = (vmax.astype(np.float64) - vmin.astype(np.float64))[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        slot = np.where(span > 0, np.floor((lo - vmin[:, None]) / span * DISPLAY_BINS), 0)
    slot = np.clip(np.nan_to_num(slot), 0, DISPLAY_BINS - 1).astype(np.int64)
    # No bar crosses zero; exact zeros open the first bar at or above zero ([0, b), np.histogram's
    # rule), except at a neuron whose minimum is 0 (ReLU-like): its zeros are a bar [0, 0] of their own.
    key = slot + DISPLAY_BINS * (np.arange(N_FINE_BINS) >= ZERO_BIN)[None, :]
    key[:, ZERO_BIN] = np.where(vmin == 0, -1, key[:, ZERO_BIN])
    out_edges, out_counts = [], []
    for i in range(n):
        # Bins inside [min, max]: positive width, or holding values (the zero bin, a constant neuron).
        inside = np.flatnonzero((hi[i] > lo[i]) | (hist_fine[i] > 0))
        if len(inside) == 0:
            out_edges.append(np.zeros(0, np.float32))
            out_counts.append(np.zeros(0, np.int64))
            continue
        k = key[i, inside]
        starts = np.flatnonzero(np.concatenate([[True], k[1:] != k[:-1]]))
        out_counts.append(np.add.reduceat(hist_fine[i, inside], starts).astype(np.int64))
        bar_edges = np.concatenate([lo[i, inside[starts]], [hi[i, inside[-1]]]])
        out_edges.append(bar_edges.astype(np.float32))
    return out_edges, out_counts


def finalise(
    count: int,
    sum_fx: np.ndarray,
    sumsq_fx: np.ndarray,
    sumsq_lo: np.ndarray,
    hist_fine: np.ndarray,
    vmin: np.ndarray,
    vmax: np.ndarray,
) -> dict:
    """Derived statistics for n neurons from their raw accumulators.

    Returns mean, std (population), quantiles (n, len(QUANTILE_LEVELS)) and the display histogram
    (hist_edges, hist_counts: per neuron, see display_histogram).
    """
    n = len(sum_fx)
    c = max(int(count), 1)
    mean = sum_fx.astype(np.float64) / (c * 2.0**SUM_SHIFT)
    std = exact_std(int(count), sum_fx, sumsq_fx, sumsq_lo)
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
    hist_edges, hist_counts = display_histogram(hist_fine, vmin, vmax)
    return {"mean": mean, "std": std, "quantiles": quantiles, "hist_edges": hist_edges, "hist_counts": hist_counts}


def select_extremes(values: np.ndarray, seq_ids: np.ndarray, k: int) -> np.ndarray:
    """Indices (k, n) of the k best candidates per column: highest value first, ties by lower
    sequence id. Entries with seq_id < 0 are empty slots and sort last."""
    order = np.lexsort((seq_ids, -np.where(seq_ids < 0, -np.inf, values)), axis=0)
    return order[:k]


# Examples across the activation range (compute.IntervalExamples): a sequence is filed by its
# largest activation's float32 bits, exponent and top 2 mantissa bits, so 4 intervals per octave
# with edges 2^e x {1, 1.25, 1.5, 1.75} (each also a fine-histogram edge). The INTERVAL_GROUPS
# highest intervals a neuron's sequences reach are kept one by one, everything below them as one
# more group; per group the PER_INTERVAL sequences with the smallest corpus_keys.interval_key.
INTERVAL_SHIFT = 21  # float32 bits >> 21: sign, exponent, 2 mantissa bits
INTERVAL_GROUPS = 8
PER_INTERVAL = 5


def interval_code(x: np.ndarray) -> np.ndarray:
    """The interval of positive float32 values (monotone in the value)."""
    return np.asarray(x, dtype=np.float32).view(np.int32).astype(np.int64) >> INTERVAL_SHIFT


def interval_edge(code: int) -> float:
    """The lower edge of interval `code` (the upper edge of code - 1)."""
    return float(np.array([code << INTERVAL_SHIFT], dtype=np.int64).astype(np.int32).view(np.float32)[0])
