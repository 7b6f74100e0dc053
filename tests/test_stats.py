"""The numpy statistics every other layer relies on: histogram bins, quantiles, tie-breaking, merging."""

from __future__ import annotations

import numpy as np
import pytest

from sitegen.services.neuroscope import data as ns_data
from sitegen.services.neuroscope import stats
from tests.reference import brute_force_state


def _values(rng, n=20000) -> np.ndarray:
    x = np.concatenate([rng.normal(0, 1, n), rng.normal(0, 1e-4, n // 10), [0.0, -0.0, 2**-10, -(2**-10), 1e-40, 300.0, -300.0, 1.0, -1.0]])
    return x.astype(np.float32)


def test_every_value_lies_in_its_bin():
    x = _values(np.random.default_rng(0))
    bins = stats.fine_bins(x)
    edges = stats.fine_bin_edges()
    lo, hi = edges[bins], edges[bins + 1]
    below_float32_normal = (x != 0) & (np.abs(x) < 1e-37)  # count as zero, by the documented rule
    assert np.all(bins[below_float32_normal] == stats.ZERO_BIN)
    ok = (lo <= x) & (x <= hi)
    assert np.all(ok | below_float32_normal), x[~(ok | below_float32_normal)][:5]
    assert np.all(np.diff(edges) >= 0)
    assert bins[x == 0.0].tolist() == [stats.ZERO_BIN] * int((x == 0).sum())


def test_positive_count_from_histogram():
    x = _values(np.random.default_rng(1))
    x = x[(x <= 0) | (x > 1e-37)]  # values below ~1e-38 count as zero (documented)
    hist = np.bincount(stats.fine_bins(x), minlength=stats.N_FINE_BINS)
    assert stats.positive_count(hist) == (x > 0).sum()


def test_quantiles_within_one_fine_bin_and_display_histogram():
    rng = np.random.default_rng(2)
    x = rng.standard_t(3, 50000).astype(np.float32)
    hist = np.bincount(stats.fine_bins(x), minlength=stats.N_FINE_BINS)[None, :]
    s, sq = stats.fixed_sums(x)
    out = stats.finalise(len(x), np.array([s]), np.array([sq]), hist, np.array([x.min()]), np.array([x.max()]))
    assert out["mean"][0] == pytest.approx(x.astype(np.float64).mean(), abs=1e-6)
    assert out["std"][0] == pytest.approx(x.astype(np.float64).std(), rel=1e-5)
    for level, q in zip(stats.QUANTILE_LEVELS, out["quantiles"][0]):
        exact = np.quantile(x, level)
        assert abs(q - exact) <= 0.07 * abs(exact) + 2**-10, (level, q, exact)
    assert out["hist_counts"].sum() == len(x) and out["hist_counts"].shape == (1, stats.DISPLAY_BINS)


def test_select_extremes_orders_by_value_then_lower_id():
    values = np.array([[3.0], [3.0], [1.0], [5.0]])
    ids = np.array([[7], [2], [0], [-1]])  # -1: an empty slot, even with a high value
    assert stats.select_extremes(values, ids, 3)[:, 0].tolist() == [1, 0, 2]


def test_merging_split_states_equals_the_whole():
    rng = np.random.default_rng(3)
    S, T, n = 30, 10, 5
    acts = rng.normal(size=(S, T, n)).astype(np.float32)
    acts[4, 2] = acts[9, 5]  # ties across parts
    lengths = np.full(S, T)
    lengths[[3, 17]] = 6
    ids = np.arange(S)
    whole = brute_force_state(acts, lengths, ids, 1, 4, 3, seed=5)
    parts = [brute_force_state(acts[m], lengths[m], ids[m], 1, 4, 3, seed=5) for m in (ids % 3 == 0, ids % 3 == 1, ids % 3 == 2)]
    from sitegen.corpus_keys import random_key

    merged = ns_data.merge_states(parts, 4, 3, lambda s: -np.float32(random_key(5, int(s))))
    L = dict(zip(ids.tolist(), lengths.tolist()))
    assert ns_data.state_to_table(merged, 4, 3, L).equals(ns_data.state_to_table(whole, 4, 3, L))
    # and a table survives the round trip through table_to_state
    t = ns_data.state_to_table(whole, 4, 3, L)
    back = ns_data.table_to_state(t, 4, 3, T)
    again = ns_data.merge_states([back], 4, 3, lambda s: -np.float32(random_key(5, int(s))))
    assert ns_data.state_to_table(again, 4, 3, L).equals(t)
