"""The numpy statistics every other layer relies on: histogram bins, quantiles, tie-breaking, merging."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest

from sitegen.corpus_keys import random_key
from sitegen.services.neuroscope import data as ns_data
from sitegen.services.neuroscope import render, stats
from tests.reference import brute_force_state

SIGMAS = np.logspace(-4, 2, 13)  # 1e-4 .. 1e2, half a decade apart


def _values(rng, n=20000) -> np.ndarray:
    x = np.concatenate(
        [
            rng.normal(0, 1, n),
            rng.normal(0, 1e-4, n // 10),
            [0.0, -0.0, 2**-10, -(2**-10), 1e-40, 300.0, -300.0, 1.0, -1.0],
        ]
    )
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
    s, sq_hi, sq_lo = stats.fixed_sums(x)
    out = stats.finalise(
        len(x), np.array([s]), np.array([sq_hi]), np.array([sq_lo]), hist, np.array([x.min()]), np.array([x.max()])
    )
    assert out["mean"][0] == pytest.approx(x.astype(np.float64).mean(), abs=1e-6)
    assert out["std"][0] == pytest.approx(x.astype(np.float64).std(), rel=1e-5)
    for level, q in zip(stats.QUANTILE_LEVELS, out["quantiles"][0]):
        exact = np.quantile(x, level)
        assert abs(q - exact) <= 0.07 * abs(exact) + 2**-10, (level, q, exact)
    assert out["hist_counts"][0].sum() == len(x) and len(out["hist_edges"][0]) == len(out["hist_counts"][0]) + 1


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
    parts = [
        brute_force_state(acts[m], lengths[m], ids[m], 1, 4, 3, seed=5)
        for m in (ids % 3 == 0, ids % 3 == 1, ids % 3 == 2)
    ]
    from sitegen.corpus_keys import random_key

    merged = ns_data.merge_states(parts, 4, 3, lambda s: -np.float32(random_key(5, int(s))))
    L = dict(zip(ids.tolist(), lengths.tolist()))
    assert ns_data.state_to_table(merged, 4, 3, L).equals(ns_data.state_to_table(whole, 4, 3, L))
    # and a table survives the round trip through table_to_state
    t = ns_data.state_to_table(whole, 4, 3, L)
    back = ns_data.table_to_state(t, 4, 3, T)
    again = ns_data.merge_states([back], 4, 3, lambda s: -np.float32(random_key(5, int(s))))
    assert ns_data.state_to_table(again, 4, 3, L).equals(t)


def _scaled_acts(rng, sigmas, S=64, T=33, mean=0.0) -> np.ndarray:
    """(S, T, n) float32 activations, neuron j ~ N(mean * sigma_j, sigma_j)."""
    return (rng.normal(mean, 1.0, (S, T, len(sigmas))) * sigmas).astype(np.float32)


def _counted(acts, lengths, first_valid=1) -> np.ndarray:
    T = acts.shape[1]
    return acts[(np.arange(T)[None, :] >= first_valid) & (np.arange(T)[None, :] < lengths[:, None])].astype(np.float64)


def test_std_exact_at_every_scale():
    """std within 1e-4 (relative) of float64 numpy for sigma 1e-4 .. 1e2, centred and off-centre
    (squares rounded to 2^-16 made it -70% at sigma 1e-3)."""
    rng = np.random.default_rng(4)
    for mean in (0.0, 2.0):
        acts = _scaled_acts(rng, SIGMAS, mean=mean)
        S, T = acts.shape[:2]
        lengths = np.full(S, T)
        lengths[::5] = 20  # some shorter sequences
        ids = np.arange(S)
        table = ns_data.state_to_table(
            brute_force_state(acts, lengths, ids, 1, 4, 3, seed=5), 4, 3, dict(zip(ids.tolist(), lengths.tolist()))
        )
        expected = _counted(acts, lengths).std(0)
        np.testing.assert_allclose(table.column("std").to_numpy(), expected, rtol=1e-4, err_msg=f"mean {mean} sigma")
        np.testing.assert_allclose(
            table.column("mean").to_numpy(), _counted(acts, lengths).mean(0), rtol=1e-4, atol=1e-7
        )


def test_shards_merge_to_identical_bytes_in_any_order():
    """Small-scale neurons split in three parts: every merge order gives the same bytes as the
    whole, and the merged std is still exact."""
    import itertools

    rng = np.random.default_rng(6)
    acts = _scaled_acts(rng, SIGMAS, S=30, T=12)
    S, T = acts.shape[:2]
    lengths = np.full(S, T)
    ids = np.arange(S)
    L = dict(zip(ids.tolist(), lengths.tolist()))

    def table_bytes(state) -> bytes:
        buf = io.BytesIO()
        pq.write_table(ns_data.state_to_table(state, 4, 3, L), buf)
        return buf.getvalue()

    whole = table_bytes(brute_force_state(acts, lengths, ids, 1, 4, 3, seed=5))
    masks = (ids % 3 == 0, (ids % 3 != 0) & (ids < 10), (ids % 3 != 0) & (ids >= 10))  # disjoint, uneven
    parts = [brute_force_state(acts[m], lengths[m], ids[m], 1, 4, 3, seed=5) for m in masks]
    score = lambda s: -np.float32(random_key(5, int(s)))
    for order in itertools.permutations(range(3)):
        merged = ns_data.merge_states([parts[i] for i in order], 4, 3, score)
        assert table_bytes(merged) == whole, order
    np.testing.assert_allclose(
        ns_data.state_to_table(merged, 4, 3, L).column("std").to_numpy(), _counted(acts, lengths).std(0), rtol=1e-4
    )


def _display(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hist = np.bincount(stats.fine_bins(x), minlength=stats.N_FINE_BINS)[None, :]
    edges, counts = stats.display_histogram(hist, np.array([x.min()]), np.array([x.max()]))
    return edges[0].astype(np.float64), counts[0]


@pytest.mark.parametrize("kind", ["lognormal", "tiny", "tiny_offset", "t3"])
def test_display_histogram_is_exact(kind):
    """Every displayed bar holds exactly the values np.histogram counts over the same edges, so an
    empty bar is a real gap; bars span min..max without holes and stay readable (a few hundred at
    most). (Re-binned into 50 linear bins, tiny-scale neurons were 33-51% off in L1.)"""
    rng = np.random.default_rng(7)
    x = {
        "lognormal": lambda: rng.lognormal(0, 1, 50000),
        "tiny": lambda: rng.normal(0, 0.003, 50000),
        "tiny_offset": lambda: rng.normal(0.002, 0.002, 50000),
        "t3": lambda: rng.standard_t(3, 50000),
    }[kind]().astype(np.float32)
    edges, counts = _display(x)
    assert edges[0] == x.min() and edges[-1] == x.max() and np.all(np.diff(edges) > 0)
    exact, _ = np.histogram(x, edges)
    np.testing.assert_array_equal(counts, exact)
    assert 10 <= len(counts) <= 3 * stats.DISPLAY_BINS
    if x.min() < 0 < x.max():
        assert 0.0 in edges  # no bar straddles zero (colour by sign)


@pytest.mark.parametrize("low,high", [(-0.3, 0.25), (-0.3, -0.01)])
def test_display_histogram_counts_values_on_edges_as_np_histogram(low, high):
    """Values exactly on bar edges, negative ones such as -0.1171875 included, and exact zeros
    inside the range: every bar counts what np.histogram counts over the same edges (right-open
    bars, the last closed), the largest value too."""
    rng = np.random.default_rng(10)
    inner = stats.fine_bin_edges()[1:-1]
    inner = inner[(inner > low) & (inner < high)]
    x = np.concatenate(
        [rng.uniform(low, high, 20000), np.repeat(inner, 3), [-0.1171875] * 7, [0.0, 0.0, -0.0] if high > 0 else []]
    ).astype(np.float32)
    edges, counts = _display(x)
    assert -0.1171875 in edges[1:-1] and (0.0 in edges[1:-1]) == (high > 0)
    on_inner_edges = np.isin(x, edges[1:-1]).sum()
    assert on_inner_edges > 100  # the case under test occurs often
    exact, _ = np.histogram(x, edges)
    np.testing.assert_array_equal(counts, exact)
    x_max = np.float32(edges[-2])  # a maximum that is itself a fine edge: the last bar is closed
    y = np.concatenate([x[x < x_max], [x_max] * 3])
    edges, counts = _display(y)
    np.testing.assert_array_equal(counts, np.histogram(y, edges)[0])


@pytest.mark.model
def test_torch_histogram_bins_edges_like_numpy():
    """The compute pass's torch binning equals stats.fine_bins on values exactly on edges, -0.0 and
    values below float32's normal range, in both update paths."""
    import torch

    from sitegen.services.neuroscope.compute import LayerAccumulator

    inner = stats.fine_bin_edges()[1:-1]
    values = np.concatenate([inner, -inner, [0.0, -0.0, 1e-40, -1e-40, 300.0, -300.0, -0.1171875]]).astype(np.float32)
    T = 9
    values = np.concatenate([values, np.zeros((-len(values)) % (T - 1), np.float32)])
    acts = np.concatenate([np.zeros((len(values) // (T - 1), 1), np.float32), values.reshape(-1, T - 1)], axis=1)[
        :, :, None
    ]
    for all_full in (True, False):
        acc = LayerAccumulator(1, T, 2, 1, 1, "cpu")
        valid = np.arange(T)[None, :].repeat(len(acts), 0) >= 1
        acc.update(
            torch.from_numpy(acts),
            torch.arange(len(acts)),
            torch.from_numpy(valid),
            torch.zeros(len(acts)),
            all_full=all_full,
        )
        want = np.bincount(stats.fine_bins(values), minlength=stats.N_FINE_BINS)
        np.testing.assert_array_equal(acc.state()["hist"][0], want)


def test_display_histogram_point_mass_at_zero():
    """A ReLU-like neuron: exact zeros are a zero-width bar of their own, drawn, not lost."""
    rng = np.random.default_rng(8)
    x = np.maximum(rng.normal(0, 1, 10000), 0).astype(np.float32)
    edges, counts = _display(x)
    assert edges[0] == edges[1] == 0.0 and counts[0] == (x == 0).sum()
    exact, _ = np.histogram(x[x > 0], edges[1:])
    np.testing.assert_array_equal(counts[1:], exact)
    svg = render.histogram_svg(counts.tolist(), edges.tolist())
    assert svg.count("h1v") >= 1  # the zero bar, one unit wide


def test_histogram_svg_bars_touch():
    """Drawn bars follow the edges: consecutive non-empty bars share an x coordinate (no false gaps)."""
    import re

    rng = np.random.default_rng(9)
    x = rng.normal(0, 0.003, 20000).astype(np.float32)
    edges, counts = _display(x)
    svg = render.histogram_svg(counts.tolist(), edges.tolist())
    bars = [(float(a), float(w)) for a, w in re.findall(rf"M([\d.]+) {render.PLOT_H}v-\d+h([\d.]+)v", svg)]
    assert len(bars) == int((counts > 0).sum())
    bars.sort()
    for (a, w), (b, _) in zip(bars, bars[1:]):
        assert abs(a + w - b) < 0.11, (a, w, b)
    assert bars[0][0] == render.PLOT_X and abs(bars[-1][0] + bars[-1][1] - (render.PLOT_X + render.PLOT_W)) < 0.11
