"""Fused CPU kernels for the neuroscope accumulators (numba; the compute half).

On a CPU, the per-value work of a layer's accumulators as a chain of torch operations reads and
writes the (batch, positions, neurons) activations about thirty times (scaling, rounding, two
limbs of the squares, extremes, histogram codes, quadrant cells...), and that traffic, not the
arithmetic, is what the corpus pass waited for. These kernels read each activation once and do
all of it in registers, over blocks of neurons in parallel (each block's sums and histogram
columns belong to one thread, so no two threads write one cell).

They compute exactly what the torch code in compute.py computes (the GPU path), bit for bit:
the same float32 products and roundings (float64 is used only where it is exact: scaling a
float32 by a power of two, and integers below 2^53), integer sums that are exact in any order,
the same float32 bit patterns for the histogram and the quadrants' top keys. tests/test_kernels.py
compares the two on random and edge-case values.
"""

from __future__ import annotations

import numba
import numpy as np

from sitegen.services.neuroscope import stats

BLOCK = 64  # neurons per parallel task: its running sums fit in registers and L1

_SUM_SCALE = 2.0**stats.SUM_SHIFT
_SQ_SCALE = 2.0**stats.SQ_SHIFT
_SQ_LO_SCALE = 2.0**stats.SQ_LO_SHIFT


@numba.njit(parallel=True, cache=True, nogil=True)
def layer_stats(acts, bits, starts, ends, code_table, sum_fx, sumsq_hi, sumsq_lo, vmin, vmax, hist, seq_min, seq_max):
    """One batch of one layer: acts (B, T, n) float32 and bits, the same memory as int32; row b
    counts positions starts[b] <= t < ends[b] (none for a padding row). Adds to the fixed-point
    sums (n,), the fine histogram hist (bins, n) and the running vmin / vmax (n,); writes each
    row's extremes seq_min / seq_max (B, n) (+inf / -inf for a row with nothing counted)."""
    B, _, n = acts.shape
    for block in numba.prange((n + BLOCK - 1) // BLOCK):
        j0 = block * BLOCK
        j1 = min(n, j0 + BLOCK)
        w = j1 - j0
        lo = np.empty(w, np.float32)
        hi = np.empty(w, np.float32)
        # A batch's sums in float64, as the torch path's: integer-valued, so exact while below 2^53
        # (stats.py's bounds), and loops of float64 vectorise where int64 conversions do not.
        s = np.zeros(w, np.float64)
        q_hi = np.zeros(w, np.float64)
        q_lo = np.zeros(w, np.float64)
        zeros = np.zeros(w, np.int64)
        for b in range(B):
            lo[:] = np.inf
            hi[:] = -np.inf
            for t in range(starts[b], ends[b]):
                row = acts[b, t, j0:j1]
                for i in range(w):
                    v = row[i]
                    lo[i] = min(lo[i], v)
                    hi[i] = max(hi[i], v)
                    # v * 2^24 and v's float32 square times 2^16 are exact in float64; rint rounds as torch's round
                    s[i] += np.rint(np.float64(v) * _SUM_SCALE)
                    sq = np.float64(v * v) * _SQ_SCALE
                    sq_hi = np.rint(sq)
                    q_hi[i] += sq_hi
                    q_lo[i] += np.rint((sq - sq_hi) * _SQ_LO_SCALE)
                codes = bits[b, t, j0:j1]
                for i in range(w):
                    x = np.int64(codes[i])
                    if x == 0:  # +0.0, most of a sparse dictionary's latents: counted locally
                        zeros[i] += 1
                    else:
                        hist[code_table[((x + (x >> 31)) >> 19) + stats.CODE_OFFSET], j0 + i] += 1
            for i in range(w):
                seq_min[b, j0 + i] = lo[i]
                seq_max[b, j0 + i] = hi[i]
                vmin[j0 + i] = min(vmin[j0 + i], lo[i])
                vmax[j0 + i] = max(vmax[j0 + i], hi[i])
        for i in range(w):
            hist[stats.ZERO_BIN, j0 + i] += zeros[i]
            sum_fx[j0 + i] += np.int64(s[i])
            sumsq_hi[j0 + i] += np.int64(q_hi[i])
            sumsq_lo[j0 + i] += np.int64(q_lo[i])


@numba.njit(parallel=True, cache=True, nogil=True)
def glu_quadrants(acts, bits, gate, up, seq_ids, starts, ends, seq_len, count, mass_fx, top):
    """One batch of a gated layer (compute.GluQuadrants; bits: acts' memory as int32): per cell q * n + neuron, q = 2 * (gate <= 0)
    + (up <= 0), the token count, the fixed-point sum of |acts| and the largest key
    bits(|act|) << 32 | (2^32 - 1 - (seq_id * seq_len + position)) over the counted positions."""
    B, _, n = acts.shape
    for block in numba.prange((n + BLOCK - 1) // BLOCK):
        j0 = block * BLOCK
        w = min(n, j0 + BLOCK) - j0
        # the block's cells, quadrant by quadrant, kept local until the end of the batch
        c = np.zeros((4, w), np.int64)
        mass = np.zeros((4, w), np.int64)
        best = np.empty((4, w), np.int64)
        for q in range(4):
            for i in range(w):
                best[q, i] = top[q * n + j0 + i]
        for b in range(B):
            for t in range(starts[b], ends[b]):
                tail = np.int64(0xFFFFFFFF) - (seq_ids[b] * seq_len + t)
                for i in range(w):
                    j = j0 + i
                    q = 2 * np.int64(gate[b, t, j] <= 0) + np.int64(up[b, t, j] <= 0)
                    c[q, i] += 1
                    mass[q, i] += np.int64(np.rint(np.float64(np.abs(acts[b, t, j])) * _SUM_SCALE))
                    key = (np.int64(bits[b, t, j] & 0x7FFFFFFF) << 32) | tail  # |act|'s float32 bits
                    best[q, i] = max(best[q, i], key)
        for q in range(4):
            for i in range(w):
                count[q * n + j0 + i] += c[q, i]
                mass_fx[q * n + j0 + i] += mass[q, i]
                top[q * n + j0 + i] = best[q, i]


@numba.njit(inline="always")
def _worst(kept_score, kept_id, col):
    """The kept slot a better sequence would evict: the lowest score, among equal scores the
    higher sequence id (an empty slot: -inf, id -1)."""
    w = 0
    for r in range(1, kept_score.shape[0]):
        if kept_score[r, col] < kept_score[w, col] or (
            kept_score[r, col] == kept_score[w, col] and kept_id[r, col] > kept_id[w, col]
        ):
            w = r
    return w


@numba.njit(parallel=True, cache=True, nogil=True)
def offer_sequences(kept_score, kept_id, kept_trace, score, seq_ids, acts):
    """compute.Extremes.update for a batch: per neuron j, each real row b (seq_ids[b] >= 0) whose
    (score[b, j], seq id) beats the worst kept one, higher score first, ties to the lower id,
    takes its slot with its trace acts[b, :, j]. The k kept are then the k best of the union, as
    the torch path's sort selects them (the slots' order differs; the store sorts them)."""
    B, T, n = acts.shape
    for j in numba.prange(n):
        w = _worst(kept_score, kept_id, j)
        for b in range(B):
            sid = seq_ids[b]
            s = score[b, j]
            if sid < 0 or not (s > kept_score[w, j] or (s == kept_score[w, j] and sid < kept_id[w, j])):
                continue
            kept_score[w, j] = s
            kept_id[w, j] = sid
            for t in range(T):
                kept_trace[w, j, t] = acts[b, t, j]
            w = _worst(kept_score, kept_id, j)


@numba.njit(parallel=True, cache=True, nogil=True)
def offer_intervals(kept_score, kept_id, kept_trace, top, seq_max, seq_max_bits, seq_ids, score, acts, shift, groups):
    """compute.IntervalExamples.update for a batch. Per neuron j: its highest interval `top[j]`
    rises to the batch's highest (bits >> shift of a positive maximum seq_max[b, j]; seq_max_bits:
    the same memory as int32) and the kept examples move down by the rise (group g to
    min(g + rise, groups - 1), re-offered, so the lowest group keeps the best of what falls into
    it, as data.merge_intervals); then each real row b with a positive maximum is offered to its
    group's column, min(top[j] - code, groups - 1) * n + j, with score[b]; kept as in
    offer_sequences."""
    B, T, n = acts.shape
    per = kept_score.shape[0]
    for j in numba.prange(n):
        highest = np.int64(-1)
        for b in range(B):
            if seq_ids[b] >= 0 and seq_max[b, j] > 0:
                highest = max(highest, np.int64(seq_max_bits[b, j]) >> shift)
        rise = highest - top[j]
        if rise > 0:
            top[j] = highest
            moved_score = np.empty((groups, per), kept_score.dtype)
            moved_id = np.empty((groups, per), np.int64)
            moved_trace = np.empty((groups, per, T), kept_trace.dtype)
            for g in range(groups):
                col = g * n + j
                for r in range(per):
                    moved_score[g, r] = kept_score[r, col]
                    moved_id[g, r] = kept_id[r, col]
                    moved_trace[g, r] = kept_trace[r, col]
                    kept_score[r, col] = -np.inf
                    kept_id[r, col] = -1
                    kept_trace[r, col] = 0
            for g in range(groups):
                col = min(g + rise, groups - 1) * n + j
                for r in range(per):
                    if moved_id[g, r] >= 0:
                        _offer(
                            kept_score, kept_id, kept_trace, col, moved_score[g, r], moved_id[g, r], moved_trace[g, r]
                        )
        for b in range(B):
            sid = seq_ids[b]
            if sid < 0 or not seq_max[b, j] > 0:
                continue
            col = min(top[j] - (np.int64(seq_max_bits[b, j]) >> shift), groups - 1) * n + j
            _offer(kept_score, kept_id, kept_trace, col, score[b], sid, acts[b, :, j])


@numba.njit(inline="always")
def _offer(kept_score, kept_id, kept_trace, col, s, sid, trace):
    """Keep (s, sid) with its trace in column col if it beats the worst kept example there."""
    w = _worst(kept_score, kept_id, col)
    if s > kept_score[w, col] or (s == kept_score[w, col] and sid < kept_id[w, col]):
        kept_score[w, col] = s
        kept_id[w, col] = sid
        kept_trace[w, col] = trace
