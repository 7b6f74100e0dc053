"""The neuroscope service's stored form: accumulator state <-> one Arrow row per neuron, and the
exact merge of states (numpy only, so `sitegen merge` needs no torch).

A state is the dict LayerAccumulator.state() returns: three 'extremes' (top, bottom, random)
with score/seq_id/trace arrays of shape (k, n[, T]), plus raw stats. Rows keep the raw stats next
to the derived ones, so stores merge exactly and never need recomputing.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from sitegen.services.neuroscope import stats

_INTS, _FLOATS = pa.list_(pa.int64()), pa.list_(pa.float32())
_TRACES = pa.list_(_FLOATS)  # per sequence, per token
# The neuroscope table, declared once: the corpus pass and merge write exactly this (state_to_table),
# and it is the service's table_schema, so Store.open refuses a store lacking a column or holding
# one as another type.
TABLE_SCHEMA = pa.schema(
    [
        ("neuron", pa.int32()),
        ("top_seq", _INTS),
        ("top_max", _FLOATS),
        ("top_acts", _TRACES),
        ("bottom_seq", _INTS),
        ("bottom_min", _FLOATS),
        ("bottom_acts", _TRACES),
        ("random_seq", _INTS),
        ("random_acts", _TRACES),
        ("count", pa.int64()),
        ("sum_fx", pa.int64()),
        ("sumsq_fx", pa.int64()),
        ("sumsq_lo", pa.int64()),
        ("n_pos", pa.int64()),
        ("min", pa.float32()),
        ("max", pa.float32()),
        ("hist_fine", _INTS),
        ("mean", pa.float64()),
        ("std", pa.float64()),
        ("frac_pos", pa.float64()),
        ("quantiles", _FLOATS),
        ("hist_edges", _FLOATS),
        ("hist_counts", _INTS),
    ]
)


# A gated MLP's quadrant columns (compute.GluQuadrants), after TABLE_SCHEMA's in its stores only.
# Per neuron, 4 entries in quadrant order (gate > 0, up > 0), (+, <= 0), (<= 0, +), (<= 0, <= 0).
GLU_SCHEMA = pa.schema(
    [
        ("glu_count", _INTS),  # counted tokens
        ("glu_mass_fx", _INTS),  # sum of |activation| in units of 2^-24
        ("glu_top_seq", _INTS),  # the top example's sequence id, -1 for none
        ("glu_top_pos", pa.list_(pa.int32())),  # its position in the sequence
        ("glu_top_act", _FLOATS),  # its activation (the largest |activation| of the quadrant)
    ]
)
# Examples across the activation range (compute.IntervalExamples), after TABLE_SCHEMA's (and a gated
# MLP's GLU_SCHEMA's) columns in the stores that have them. Groups: 0 is the interval holding the
# neuron's largest sequence maximum (interval code `interval_top`), g the interval g below it, and
# INTERVAL_GROUPS every interval lower still (stats.interval_code).
INTERVAL_SCHEMA = pa.schema(
    [
        ("interval_top", pa.int32()),  # the interval code of the neuron's largest sequence maximum; -1: none > 0
        ("interval_group", pa.list_(pa.int16())),  # per example, its group (best first within a group)
        ("interval_seq", _INTS),  # per example, its sequence id
        ("interval_acts", _TRACES),  # per example, the neuron's activations over the sequence
        ("interval_tokens", _INTS),  # per group, counted tokens whose activation lies in its interval
    ]
)
GLU_SIGN = np.array([1.0, -1.0, -1.0, 1.0], dtype=np.float32)  # act(gate) * up's sign in each quadrant
_LOW32 = 0xFFFFFFFF


def glu_columns(glu: dict, seq_len: int) -> dict[str, pa.Array]:
    """GLU_SCHEMA's columns from a GluQuadrants state ((4, n) arrays; see its key)."""
    n = glu["count"].shape[1]
    top = glu["top"].T  # neuron-major (n, 4)
    present = top >= 0
    key = np.where(present, _LOW32 - (top & _LOW32), 0)
    magnitude = np.where(present, top >> 32, 0).astype(np.int32).view(np.float32)
    four = np.full(n, 4)
    return {
        "glu_count": _flat_list(glu["count"].T.reshape(-1), four, pa.int64()),
        "glu_mass_fx": _flat_list(glu["mass_fx"].T.reshape(-1), four, pa.int64()),
        "glu_top_seq": _flat_list(np.where(present, key // seq_len, -1).reshape(-1), four, pa.int64()),
        "glu_top_pos": _flat_list(np.where(present, key % seq_len, 0).reshape(-1), four, pa.int32()),
        "glu_top_act": _flat_list((magnitude * GLU_SIGN[None, :]).reshape(-1), four, pa.float32()),
    }


def glu_state(table: pa.Table, seq_len: int) -> dict:
    """Inverse of glu_columns: the (4, n) state arrays, the top keys rebuilt."""
    col = lambda name: np.asarray(table.column(name).combine_chunks().flatten()).reshape(-1, 4).T
    seq, pos = col("glu_top_seq").astype(np.int64), col("glu_top_pos").astype(np.int64)
    bits = np.abs(col("glu_top_act").astype(np.float32)).view(np.int32).astype(np.int64)
    top = np.where(seq >= 0, (bits << 32) | (_LOW32 - (seq * seq_len + pos)), -1)
    return {"count": col("glu_count").astype(np.int64), "mass_fx": col("glu_mass_fx").astype(np.int64), "top": top}


def merge_intervals(parts: list[dict], per_group: int) -> dict:
    """IntervalExamples states of disjoint sequences -> the state of their union: each neuron's top
    is the parts' highest; every kept example moves to its group under that top (group + the rise,
    at most INTERVAL_GROUPS: the lowest group takes everything below), and each (group, neuron)
    keeps its `per_group` best examples (highest score, i.e. the smallest interval_key; ties to the
    lower sequence id). A state: score, seq_id (k, G, n),
    trace (k, G, n, T) with k slots per group (k may be 0) and top (n,). Exact and order-free:
    an example dropped from a group is beaten by `per_group` examples that move with it."""
    top = np.max([p["top"] for p in parts], axis=0)
    n_groups = parts[0]["score"].shape[1]
    seq_len = parts[0]["trace"].shape[3]
    score, seq, group, neuron, traces = [], [], [], [], []
    for p in parts:
        rise = np.where(p["top"] >= 0, top - p["top"], 0)
        moved = np.minimum(np.arange(n_groups)[:, None] + rise[None, :], n_groups - 1)  # (G, n)
        present = p["seq_id"] >= 0
        score.append(p["score"][present])
        seq.append(p["seq_id"][present])
        group.append(np.broadcast_to(moved, p["seq_id"].shape)[present])
        neuron.append(np.broadcast_to(np.arange(len(top)), p["seq_id"].shape)[present])
        traces.append(p["trace"][present])
    out_score = np.full((per_group, n_groups, len(top)), -np.inf, np.float32)
    out_seq = np.full((per_group, n_groups, len(top)), -1, np.int64)
    out_trace = np.zeros((per_group, n_groups, len(top), seq_len), np.float32)
    if score:
        score, seq, group, neuron = (np.concatenate(a) for a in (score, seq, group, neuron))
        trace = np.concatenate(traces)
        order = np.lexsort((seq, -score, group, neuron))
        cell = (neuron * n_groups + group)[order]
        starts = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]])
        rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
        keep = order[rank < per_group]
        slot = rank[rank < per_group]
        out_score[slot, group[keep], neuron[keep]] = score[keep]
        out_seq[slot, group[keep], neuron[keep]] = seq[keep]
        out_trace[slot, group[keep], neuron[keep]] = trace[keep]
    return {"score": out_score, "seq_id": out_seq, "trace": out_trace, "top": top.astype(np.int64)}


def interval_token_counts(top: np.ndarray, hist: np.ndarray, n_groups: int) -> np.ndarray:
    """(n, n_groups) counted tokens whose activation lies in each group's interval, from the fine
    histogram (n, N_FINE_BINS): the interval edges are fine-histogram edges, so the counts are exact
    where the edges lie in its regular range (2^-10 .. 2^8). The lowest group is (0, its upper edge)."""
    cum = np.concatenate([np.zeros((hist.shape[0], 1), np.int64), np.cumsum(hist, axis=1)], axis=1)
    first_positive = stats.ZERO_BIN + 1
    fired = np.flatnonzero(top >= 0)
    codes = top[fired, None] + 1 - np.arange(n_groups)[None, :]  # each group's upper edge, as an interval code
    edges = (codes << stats.INTERVAL_SHIFT).astype(np.int32).view(np.float32)
    uppers = stats.fine_bins(edges).astype(np.int64)  # the fine bin starting at each edge
    lowers = np.maximum(np.c_[uppers[:, 1:], np.full(len(fired), first_positive)], first_positive)
    out = np.zeros((len(top), n_groups), np.int64)
    out[fired] = np.take_along_axis(cum[fired], uppers, 1) - np.take_along_axis(cum[fired], lowers, 1)
    return out


def interval_columns(iv: dict, hist: np.ndarray, seq_length: dict[int, int]) -> dict[str, pa.Array]:
    """INTERVAL_SCHEMA's columns from an IntervalExamples state (see merge_intervals)."""
    k, n_groups, n = iv["seq_id"].shape
    order = np.lexsort((iv["seq_id"], -np.where(iv["seq_id"] < 0, -np.inf, iv["score"])), axis=0)  # best first
    seq = np.take_along_axis(iv["seq_id"], order, 0).transpose(2, 1, 0).reshape(n, -1)  # neuron, group, slot
    trace = np.take_along_axis(iv["trace"], order[..., None], 0).transpose(2, 1, 0, 3).reshape(n, n_groups * k, -1)
    group = np.broadcast_to(np.repeat(np.arange(n_groups), k)[None, :], seq.shape)
    present = seq >= 0
    lengths = np.where(present, np.vectorize(lambda s: seq_length.get(int(s), 0))(seq), 0)
    keep = np.arange(trace.shape[2])[None, None, :] < lengths[:, :, None]
    per_neuron = present.sum(1)
    return {
        "interval_top": pa.array(iv["top"], pa.int32()),
        "interval_group": _flat_list(group[present], per_neuron, pa.int16()),
        "interval_seq": _flat_list(seq[present], per_neuron, pa.int64()),
        "interval_acts": _nested(trace[keep].astype(np.float32), lengths[present], per_neuron, pa.float32()),
        "interval_tokens": _flat_list(
            interval_token_counts(iv["top"], hist, n_groups).reshape(-1), np.full(n, n_groups), pa.int64()
        ),
    }


def interval_state(table: pa.Table, per_group: int, seq_len: int, key) -> dict:
    """Inverse of interval_columns (traces zero-padded to seq_len); key(seq_id) -> the score."""
    n = table.num_rows
    n_groups = stats.INTERVAL_GROUPS + 1
    score = np.full((per_group, n_groups, n), -np.inf, np.float32)
    seq_id = np.full((per_group, n_groups, n), -1, np.int64)
    trace = np.zeros((per_group, n_groups, n, seq_len), np.float32)
    groups, seqs, acts = (table.column(c).to_pylist() for c in ("interval_group", "interval_seq", "interval_acts"))
    for u in range(n):
        filled = np.zeros(n_groups, np.int64)
        for g, s, a in zip(groups[u], seqs[u], acts[u]):
            slot = filled[g]
            filled[g] += 1
            score[slot, g, u], seq_id[slot, g, u] = key(s), s
            trace[slot, g, u, : len(a)] = a
    return {
        "score": score,
        "seq_id": seq_id,
        "trace": trace,
        "top": table.column("interval_top").to_numpy().astype(np.int64),
    }


def _nested(values: np.ndarray, inner_len: np.ndarray, outer_len: np.ndarray, dtype: pa.DataType) -> pa.Array:
    inner_off = np.concatenate([[0], np.cumsum(inner_len)]).astype(np.int32)
    outer_off = np.concatenate([[0], np.cumsum(outer_len)]).astype(np.int32)
    inner = pa.ListArray.from_arrays(pa.array(inner_off), pa.array(values, dtype))
    return pa.ListArray.from_arrays(pa.array(outer_off), inner)


def _flat_list(values: np.ndarray, lens: np.ndarray, dtype: pa.DataType) -> pa.Array:
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(off), pa.array(values, dtype))


def _concat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)


def _ordered(ext: dict, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort an extremes state best-first; returns score, seq_id (k, n) and trace (k, n, T)."""
    order = stats.select_extremes(ext["score"], ext["seq_id"], k)
    score = np.take_along_axis(ext["score"], order, 0)
    seq_id = np.take_along_axis(ext["seq_id"], order, 0)
    trace = np.take_along_axis(ext["trace"], order[:, :, None], 0)
    return score, seq_id, trace


def _extreme_columns(ext: dict, k: int, seq_length: dict[int, int], sign: float) -> tuple[pa.Array, pa.Array, pa.Array]:
    score, seq_id, trace = _ordered(ext, k)
    score, seq_id, trace = score.T, seq_id.T, trace.transpose(1, 0, 2)  # neuron-major
    present = seq_id >= 0
    lengths = np.where(present, np.vectorize(lambda s: seq_length.get(int(s), 0))(seq_id), 0)
    t_idx = np.arange(trace.shape[2])
    keep = t_idx[None, None, :] < lengths[:, :, None]
    per_neuron = present.sum(1)
    acts = _nested(trace[keep].astype(np.float32), lengths[present], per_neuron, pa.float32())
    ids = _flat_list(seq_id[present], per_neuron, pa.int64())
    vals = _flat_list((sign * score[present]).astype(np.float32), per_neuron, pa.float32())
    return ids, vals, acts


def state_to_table(
    state: dict, top_k: int, n_random: int, seq_length: dict[int, int], seq_len: int | None = None
) -> pa.Table:
    """One row per neuron: ordered extremes with traces trimmed to each sequence's length, raw and
    derived stats; for a gated MLP's state (key "glu"; seq_len then required) the quadrant columns."""
    n = state["sum_fx"].shape[0]
    top_ids, top_max, top_acts = _extreme_columns(state["top"], top_k, seq_length, 1.0)
    bot_ids, bot_min, bot_acts = _extreme_columns(state["bottom"], top_k, seq_length, -1.0)
    rnd = state["random"]
    r_score, r_id, r_trace = _ordered(rnd, n_random)  # (R, 1), (R, 1), (R, 1, n*T)
    r_trace = r_trace[:, 0, :].reshape(len(r_id), n, -1).transpose(1, 0, 2)  # (n, R, T)
    rnd_state = {
        "score": np.repeat(r_score, n, 1),
        "seq_id": np.repeat(r_id, n, 1),
        "trace": r_trace.transpose(1, 0, 2),
    }
    rnd_ids, _, rnd_acts = _extreme_columns(rnd_state, n_random, seq_length, 1.0)
    count = int(state["count"])
    derived = stats.finalise(
        count, state["sum_fx"], state["sumsq_fx"], state["sumsq_lo"], state["hist"], state["vmin"], state["vmax"]
    )
    nb = stats.N_FINE_BINS
    table = pa.table(
        {
            "neuron": pa.array(np.arange(n), pa.int32()),
            "top_seq": top_ids,
            "top_max": top_max,
            "top_acts": top_acts,
            "bottom_seq": bot_ids,
            "bottom_min": bot_min,
            "bottom_acts": bot_acts,
            "random_seq": rnd_ids,
            "random_acts": rnd_acts,
            "count": pa.array(np.full(n, count), pa.int64()),
            "sum_fx": pa.array(state["sum_fx"], pa.int64()),
            "sumsq_fx": pa.array(state["sumsq_fx"], pa.int64()),
            "sumsq_lo": pa.array(state["sumsq_lo"], pa.int64()),
            "n_pos": pa.array(state["n_pos"], pa.int64()),
            "min": pa.array(state["vmin"], pa.float32()),
            "max": pa.array(state["vmax"], pa.float32()),
            "hist_fine": _flat_list(state["hist"].reshape(-1), np.full(n, nb), pa.int64()),
            "mean": pa.array(derived["mean"], pa.float64()),
            "std": pa.array(derived["std"], pa.float64()),
            "frac_pos": pa.array(state["n_pos"] / max(count, 1), pa.float64()),
            "quantiles": _flat_list(
                derived["quantiles"].reshape(-1), np.full(n, len(stats.QUANTILE_LEVELS)), pa.float32()
            ),
            # Display histogram: variable-width bars (edges from min to max) with exact counts.
            "hist_edges": _flat_list(
                _concat(derived["hist_edges"], np.float32),
                np.array([len(e) for e in derived["hist_edges"]]),
                pa.float32(),
            ),
            "hist_counts": _flat_list(
                _concat(derived["hist_counts"], np.int64),
                np.array([len(c) for c in derived["hist_counts"]]),
                pa.int64(),
            ),
        },
        schema=TABLE_SCHEMA,
    )
    if "glu" in state:
        for name, column in glu_columns(state["glu"], seq_len).items():
            table = table.append_column(GLU_SCHEMA.field(name), column)
    if "interval" in state:
        for name, column in interval_columns(state["interval"], state["hist"], seq_length).items():
            table = table.append_column(INTERVAL_SCHEMA.field(name), column)
    return table


def _extremes_from_columns(ids: list, vals: list, acts: list, k: int, seq_len: int, sign: float) -> dict:
    n = len(ids)
    score = np.full((k, n), -np.inf, dtype=np.float32)
    seq_id = np.full((k, n), -1, dtype=np.int64)
    trace = np.zeros((k, n, seq_len), dtype=np.float32)
    for j in range(n):
        for i, (s, v, a) in enumerate(zip(ids[j], vals[j], acts[j])):
            score[i, j] = sign * v
            seq_id[i, j] = s
            trace[i, j, : len(a)] = a
    return {"score": score, "seq_id": seq_id, "trace": trace}


def table_to_state(table: pa.Table, top_k: int, n_random: int, seq_len: int, seed: int = 0) -> dict:
    """Inverse of state_to_table (traces zero-padded to seq_len), for merging stores (`seed`: the
    run's, which orders the interval examples)."""
    col = {
        name: table.column(name).to_pylist()
        for name in (
            "top_seq",
            "top_max",
            "top_acts",
            "bottom_seq",
            "bottom_min",
            "bottom_acts",
            "random_seq",
            "random_acts",
        )
    }
    n = table.num_rows
    top = _extremes_from_columns(col["top_seq"], col["top_max"], col["top_acts"], top_k, seq_len, 1.0)
    bottom = _extremes_from_columns(col["bottom_seq"], col["bottom_min"], col["bottom_acts"], top_k, seq_len, -1.0)
    r_ids = col["random_seq"][0] if n else []
    r_trace = np.zeros((n_random, 1, n * seq_len), dtype=np.float32)
    r_seq = np.full((n_random, 1), -1, dtype=np.int64)
    r_score = np.full((n_random, 1), -np.inf, dtype=np.float32)
    for i, s in enumerate(r_ids):
        r_seq[i, 0] = s
        # The score only orders the sample; recompute it from the sequence id when merging.
        r_score[i, 0] = 0.0
        block = np.zeros((n, seq_len), dtype=np.float32)
        for j in range(n):
            a = col["random_acts"][j][i]
            block[j, : len(a)] = a
        r_trace[i, 0] = block.reshape(-1)
    hist = np.asarray(table.column("hist_fine").combine_chunks().flatten(), dtype=np.int64).reshape(
        n, stats.N_FINE_BINS
    )
    return {
        "top": top,
        "bottom": bottom,
        "random": {"score": r_score, "seq_id": r_seq, "trace": r_trace},
        "count": int(table.column("count")[0].as_py()) if n else 0,
        "sum_fx": table.column("sum_fx").to_numpy(),
        "sumsq_fx": table.column("sumsq_fx").to_numpy(),
        "sumsq_lo": table.column("sumsq_lo").to_numpy(),
        "n_pos": table.column("n_pos").to_numpy(),
        "vmin": table.column("min").to_numpy(),
        "vmax": table.column("max").to_numpy(),
        "hist": hist,
        **({"glu": glu_state(table, seq_len)} if "glu_count" in table.column_names else {}),
        **(
            {"interval": interval_state(table, stats.PER_INTERVAL, seq_len, interval_score(seed))}
            if "interval_top" in table.column_names
            else {}
        ),
    }


def _merge_extremes(parts: list[dict], k: int) -> dict:
    score = np.concatenate([p["score"] for p in parts])
    seq_id = np.concatenate([p["seq_id"] for p in parts])
    trace = np.concatenate([p["trace"] for p in parts])
    order = stats.select_extremes(score, seq_id, k)
    return {
        "score": np.take_along_axis(score, order, 0),
        "seq_id": np.take_along_axis(seq_id, order, 0),
        "trace": np.take_along_axis(trace, order[:, :, None], 0),
    }


def interval_score(seed: int):
    """The interval examples' ordering key of a sequence, as the corpus pass scores it (Batch.interval_score)."""
    from sitegen.corpus_keys import interval_key

    return lambda seq_id: -np.float32(interval_key(seed, int(seq_id)))


def random_score(seed: int):
    """The random sample's ordering key of a sequence, as the corpus pass scores it (Batch.rand_score)."""
    from sitegen.corpus_keys import random_key

    return lambda seq_id: -np.float32(random_key(seed, int(seq_id)))


def merge_states(parts: list[dict], top_k: int, n_random: int, random_score: "callable") -> dict:
    """Exact merge of layer states from disjoint sets of sequences. random_score(seq_id) gives the
    sample's ordering key (the random sample is 'smallest key first', key from the sequence id)."""
    for p in parts:
        rs = p["random"]
        rs["score"] = np.where(
            rs["seq_id"] >= 0, np.vectorize(random_score, otypes=[np.float32])(rs["seq_id"]), -np.inf
        ).astype(np.float32)
    return {
        "top": _merge_extremes([p["top"] for p in parts], top_k),
        "bottom": _merge_extremes([p["bottom"] for p in parts], top_k),
        "random": _merge_extremes([p["random"] for p in parts], n_random),
        "count": sum(int(p["count"]) for p in parts),
        "sum_fx": np.sum([p["sum_fx"] for p in parts], axis=0),
        "sumsq_fx": np.sum([p["sumsq_fx"] for p in parts], axis=0),
        "sumsq_lo": np.sum([p["sumsq_lo"] for p in parts], axis=0),
        "n_pos": np.sum([p["n_pos"] for p in parts], axis=0),
        "vmin": np.min([p["vmin"] for p in parts], axis=0),
        "vmax": np.max([p["vmax"] for p in parts], axis=0),
        "hist": np.sum([p["hist"] for p in parts], axis=0),
        **({"glu": merge_glu([p["glu"] for p in parts])} if all("glu" in p for p in parts) else {}),
        **(
            {"interval": merge_intervals([p["interval"] for p in parts], stats.PER_INTERVAL)}
            if all("interval" in p for p in parts)
            else {}
        ),
    }


def merge_glu(parts: list[dict]) -> dict:
    """Quadrant states of disjoint sequences: counts and sums added, top keys max-reduced."""
    return {
        "count": np.sum([p["count"] for p in parts], axis=0),
        "mass_fx": np.sum([p["mass_fx"] for p in parts], axis=0),
        "top": np.max([p["top"] for p in parts], axis=0),
    }
