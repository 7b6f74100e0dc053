"""The CPU's fused kernels (numba: the neuroscope accumulators, the logit histograms) against the torch
operations the GPU runs (the same classes with fused=False): the same state, bit for bit, on
values chosen to hit every rounding, sign, bin-edge and tie case, over batches with padding."""

from __future__ import annotations

import numpy as np
import pytest

from sitegen.services.neuroscope import stats
from tests.conftest import HAS_TORCH

pytestmark = [pytest.mark.model, pytest.mark.skipif(not HAS_TORCH, reason="needs the compute extra")]

N, T, B, FIRST_VALID = 37, 9, 6, 1  # 37 neurons: a partial block of the kernels' 64 (and of any split)


def _edge_values() -> np.ndarray:
    """Values on the 2^-24 grid's half points (rint ties to even), signed zeros, subnormals, the
    histogram's edges and the ulps beside them, the squares' limb boundaries, large values (within
    the sums' exact range, stats.py: beyond it a float64 batch sum depends on its order, on
    either path)."""
    tie = np.arange(-6, 7) * 0.5 * 2.0**-24
    edges = np.ldexp(1.0 + np.arange(16) / 16, -10)
    near = np.concatenate([np.nextafter(edges.astype(np.float32), np.float32(np.inf)), edges])
    special = [0.0, -0.0, 1e-45, -1e-45, 1e-39, -1e-39, 2.0**-11.5, 2.0**-23, 3.0, 255.9, 256.0, 300.0, 5e4, -5e4]
    v = np.concatenate([tie, near, -near, special]).astype(np.float32)
    return v


def _batches(seed: int, n_batches: int):
    """Activations with planted edge values and ties (whole rows repeated: equal maxima across
    sequences), random keys with ties, padding rows and short sequences in the last batches."""
    rng = np.random.default_rng(seed)
    edge = _edge_values()
    for i in range(n_batches):
        acts = (rng.standard_normal((B, T, N)) * rng.choice([1e-3, 0.3, 4.0], size=(1, 1, N))).astype(np.float32)
        acts.reshape(-1)[rng.choice(acts.size, len(edge), replace=False)] = edge
        acts[1] = acts[0]  # two sequences with the same trace: every score ties
        ids = np.arange(B, dtype=np.int64) + B * i
        lengths = np.full(B, T)
        if i >= n_batches - 2:
            lengths = rng.integers(4, T + 1, B)
            lengths[-1] = 0
            ids[-1] = -1  # a padding row
        valid = (np.arange(T)[None, :] >= FIRST_VALID) & (np.arange(T)[None, :] < lengths[:, None])
        keys = rng.choice(np.float32([-0.25, -0.5, -0.75]), size=B)  # few distinct keys: ties by id
        gate = rng.choice(np.float32([-1.0, 0.0, -0.0, 1.0]), size=acts.shape) * rng.random(acts.shape, np.float32)
        up = rng.choice(np.float32([-1.0, 0.0, 1.0]), size=acts.shape) * rng.random(acts.shape, np.float32)
        full = bool((lengths == T).all() and (ids >= 0).all())
        yield acts, ids, valid, keys, gate, up, full


def _ordered(score, seq_id, trace):
    """Kept examples column by column best-first (stats.select_extremes: score descending, lower id
    first, empty slots last): the slots' order is free while streaming."""
    order = stats.select_extremes(score, seq_id, score.shape[0])
    take = lambda a: np.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), 0)
    return take(score), take(seq_id), take(trace)


def _run(fused: bool, seed: int, n_batches: int):
    import torch

    from sitegen.services.neuroscope.compute import GluQuadrants, IntervalExamples, LayerAccumulator

    acc = LayerAccumulator(N, T, 4, 3, FIRST_VALID, "cpu", fused=fused)
    intervals = IntervalExamples(N, T, "cpu", fused=fused)
    glu = GluQuadrants(N, T, FIRST_VALID, "cpu", fused=fused)
    t = torch.from_numpy
    for acts, ids, valid, keys, gate, up, full in _batches(seed, n_batches):
        seq_max = acc.update(t(acts), t(ids), t(valid), t(keys), all_full=full)
        intervals.update(seq_max, t(ids), t(keys[::-1].copy()), t(acts))
        glu.update(t(acts), t(gate), t(up), t(ids), t(valid), all_full=full)
    return acc.state(), intervals.state(), glu.state()


@pytest.mark.parametrize("seed", [0, 1])
def test_fused_kernels_equal_the_torch_path_bit_for_bit(seed):
    fused, plain = _run(True, seed, 8), _run(False, seed, 8)
    (acc_f, iv_f, glu_f), (acc_p, iv_p, glu_p) = fused, plain
    for name in ("count", "sum_fx", "sumsq_fx", "sumsq_lo", "n_pos", "vmin", "vmax", "hist"):
        np.testing.assert_array_equal(acc_f[name], acc_p[name], err_msg=name)
    for which in ("top", "bottom", "random"):
        got = _ordered(*(acc_f[which][k] for k in ("score", "seq_id", "trace")))
        want = _ordered(*(acc_p[which][k] for k in ("score", "seq_id", "trace")))
        for g, w, name in zip(got, want, ("score", "seq_id", "trace")):
            np.testing.assert_array_equal(g, w, err_msg=f"{which} {name}")
    np.testing.assert_array_equal(iv_f["top"], iv_p["top"])
    flat = lambda s, k: s[k].reshape(s[k].shape[0], -1, *s[k].shape[3:])
    got = _ordered(*(flat(iv_f, k) for k in ("score", "seq_id", "trace")))
    want = _ordered(*(flat(iv_p, k) for k in ("score", "seq_id", "trace")))
    for g, w, name in zip(got, want, ("score", "seq_id", "trace")):
        np.testing.assert_array_equal(g, w, err_msg=f"interval {name}")
    for name in ("count", "mass_fx", "top"):
        np.testing.assert_array_equal(glu_f[name], glu_p[name], err_msg=f"glu {name}")
    # the planted cases were reached: ties kept by id, padding excluded, every quadrant filled
    assert (acc_f["top"]["seq_id"] >= 0).all() and (glu_f["count"] > 0).all()


def test_the_fused_path_is_the_cpu_default_and_the_torch_path_the_others():
    from sitegen.services.neuroscope.compute import GluQuadrants, IntervalExamples, LayerAccumulator

    assert LayerAccumulator(2, T, 1, 1, 1, "cpu").fused and GluQuadrants(2, T, 1, "cpu").fused
    assert IntervalExamples(2, T, "cpu").fused
    assert not LayerAccumulator(2, T, 1, 1, 1, "meta").fused


@pytest.mark.parametrize("fused", [True, False])
def test_logit_histograms_equal_np_histogram_with_values_on_every_edge(fused):
    """The logits service's histogram on both paths (the CPU's numba kernel, the GPU's
    searchsorted), with values placed exactly on each row's bin edges and a constant row."""
    import torch

    from sitegen.services.logits.compute import logit_histograms
    from sitegen.services.logits.render import logit_hist_edges

    rng = np.random.default_rng(3)
    rows = (rng.standard_normal((12, 5000)) * rng.choice([1e-5, 1.0, 40.0], size=(12, 1))).astype(np.float32)
    rows[0] = 2.5
    for r in rows[1:]:
        edges = logit_hist_edges(r.min(), r.max())
        r[rng.choice(len(r), len(edges), replace=False)] = edges
    lo, hi, counts = logit_histograms(torch.from_numpy(rows), fused=fused)
    np.testing.assert_array_equal(counts, np.stack([np.histogram(r, 40)[0] for r in rows]))
    np.testing.assert_array_equal(lo, rows.min(1))
    np.testing.assert_array_equal(hi, rows.max(1))
