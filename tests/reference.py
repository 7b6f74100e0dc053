"""Brute-force reference implementations (numpy only) and a synthetic store writer.

`brute_force_state` computes, from a full activation tensor, the state the streaming
accumulators must reach: it is the oracle of the exactness tests, and it also writes synthetic
stores for the site tests (no torch needed there).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa

from sitegen.corpus_keys import random_key
from sitegen.services.logits.data import TABLE_SCHEMA as LOGITS_SCHEMA
from sitegen.services.neuron2graph.graph import IGNORE, Trie
from sitegen.services.neuroscope import data as ns_data
from sitegen.services.neuroscope import stats
from sitegen.store import SEQUENCES_SCHEMA, Store
from sitegen.store.manifest import new_manifest


def brute_force_state(
    acts: np.ndarray, lengths: np.ndarray, seq_ids: np.ndarray, first_valid: int, top_k: int, n_random: int, seed: int
) -> dict:
    """acts (S, T, n) float32 with each sequence's activations in [:length]; everything else ignored."""
    S, T, n = acts.shape
    valid = (np.arange(T)[None, :] >= first_valid) & (np.arange(T)[None, :] < lengths[:, None])
    seq_max = np.where(valid[:, :, None], acts, -np.inf).max(1)  # (S, n)
    seq_min = np.where(valid[:, :, None], acts, np.inf).min(1)

    def extremes(score: np.ndarray, k: int) -> dict:
        order = np.lexsort((np.broadcast_to(seq_ids[:, None], score.shape), -score), axis=0)[:k]  # score desc, id asc
        kk = order.shape[0]
        out_score = np.full((k, score.shape[1]), -np.inf, np.float32)
        out_id = np.full((k, score.shape[1]), -1, np.int64)
        out_trace = np.zeros((k, score.shape[1], T), np.float32)
        out_score[:kk] = np.take_along_axis(score, order, 0)
        out_id[:kk] = seq_ids[order]
        out_trace[:kk] = np.take_along_axis(acts, order[:, None, :], 0).transpose(0, 2, 1) if score.shape[1] == n else 0
        return {"score": out_score, "seq_id": out_id, "trace": out_trace}

    rkeys = np.array([-np.float32(random_key(seed, int(s))) for s in seq_ids], np.float32)[:, None]
    rnd = extremes(rkeys, n_random)
    rtrace = np.zeros((n_random, 1, n * T), np.float32)
    for i, s in enumerate(rnd["seq_id"][:, 0]):
        if s >= 0:
            rtrace[i, 0] = acts[list(seq_ids).index(s)].T.reshape(-1)
    rnd["trace"] = rtrace
    flat = acts[valid]  # (V, n)
    sums = np.array([stats.fixed_sums(flat[:, j]) for j in range(n)], dtype=np.int64).reshape(n, 3)
    hist = np.stack([np.bincount(stats.fine_bins(flat[:, j]), minlength=stats.N_FINE_BINS) for j in range(n)])
    return {
        "top": extremes(seq_max.astype(np.float32), top_k),
        "bottom": extremes((-seq_min).astype(np.float32), top_k),
        "random": rnd,
        "count": int(flat.shape[0]),
        "sum_fx": sums[:, 0],
        "sumsq_fx": sums[:, 1],
        "sumsq_lo": sums[:, 2],
        "n_pos": (flat > 0).sum(0).astype(np.int64),  # equals stats.positive_count(hist): checked in test_stats
        "vmin": flat.min(0).astype(np.float32),
        "vmax": flat.max(0).astype(np.float32),
        "hist": hist.astype(np.int64),
    }


def brute_force_intervals(
    acts: np.ndarray, lengths: np.ndarray, seq_ids: np.ndarray, first_valid: int, seed: int
) -> dict:
    """An IntervalExamples state from full (seqs, T, n) activations, by the rule itself: each
    neuron's sequences with a positive maximum, filed by stats.interval_code, groups hung from the
    highest code, per group the PER_INTERVAL smallest interval_keys (ties to the lower id)."""
    from sitegen.corpus_keys import interval_key

    S, T, n = acts.shape
    groups, per = stats.INTERVAL_GROUPS + 1, stats.PER_INTERVAL
    valid = (np.arange(T)[None, :] >= first_valid) & (np.arange(T)[None, :] < lengths[:, None])
    seq_max = np.where(valid[:, :, None], acts, -np.inf).max(1)  # (S, n)
    keys = [interval_key(seed, int(s)) for s in seq_ids]
    out = {
        "score": np.full((per, groups, n), -np.inf, np.float32),
        "seq_id": np.full((per, groups, n), -1, np.int64),
        "trace": np.zeros((per, groups, n, T), np.float32),
        "top": np.full(n, -1, np.int64),
    }
    for u in range(n):
        filed = [r for r in range(S) if seq_max[r, u] > 0]
        if not filed:
            continue
        codes = {r: int(stats.interval_code(np.float32(seq_max[r, u]))) for r in filed}
        top = max(codes.values())
        out["top"][u] = top
        for g in range(groups):
            members = [r for r in filed if min(top - codes[r], groups - 1) == g]
            for slot, r in enumerate(sorted(members, key=lambda r: (keys[r], int(seq_ids[r])))[:per]):
                out["score"][slot, g, u] = -np.float32(keys[r])
                out["seq_id"][slot, g, u] = seq_ids[r]
                out["trace"][slot, g, u] = acts[r, :, u]
    return out


def brute_force_glu(acts, gate_neg, up_neg, lengths, seq_ids, first_valid: int) -> dict:
    """A GluQuadrants state from full (seqs, T, n) arrays: gate_neg/up_neg say where gate and up are
    <= 0. Loops over every counted token: a reference, not fast."""
    n_seqs, T, n = acts.shape
    count, mass = np.zeros((4, n), np.int64), np.zeros((4, n), np.int64)
    top = np.full((4, n), -1, np.int64)
    for r in range(n_seqs):
        for t in range(first_valid, int(lengths[r])):
            for j in range(n):
                q = 2 * int(gate_neg[r, t, j]) + int(up_neg[r, t, j])
                magnitude = np.abs(np.float32(acts[r, t, j]))
                count[q, j] += 1
                mass[q, j] += int(np.rint(magnitude * np.float32(2**24)))
                key = (int(magnitude.view(np.int32)) << 32) | (0xFFFFFFFF - (int(seq_ids[r]) * T + t))
                top[q, j] = max(top[q, j], key)
    return {"count": count, "mass_fx": mass, "top": top}


def _synthetic_weight_columns(layer: int, n_layers: int, n_neurons: int, n_vocab: int, seed: int) -> dict:
    """The logits table's histogram and connected-unit columns, from a generator of their own (the
    other draws, and so the rest of the synthetic store, stay as they were)."""
    from sitegen.services.logits.render import HIST_BINS

    rng = np.random.default_rng((seed, layer, 1))
    effects = rng.normal(size=(n_neurons, n_vocab)).astype(np.float32)
    counts = np.stack([np.histogram(row, HIST_BINS)[0] for row in effects]).astype(np.int32)
    lists = lambda rows, t: pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int32)),
        pa.array([v for r in rows for v in r], t),
    )
    connected = {}
    for side, layers in (("upstream", range(layer)), ("downstream", range(layer + 1, n_layers))):
        units = [u for m in layers for u in range(m * n_neurons, (m + 1) * n_neurons)]
        weights = [
            sorted(rng.normal(size=len(units)).astype(np.float32).tolist(), reverse=True) for _ in range(n_neurons)
        ]
        connected[f"{side}_units"] = lists([rng.permutation(units).tolist() for _ in range(n_neurons)], pa.int32())
        connected[f"{side}_weights"] = lists(weights, pa.float32())
    return {
        **connected,
        "logit_hist_lo": pa.array(effects.min(1), pa.float32()),
        "logit_hist_hi": pa.array(effects.max(1), pa.float32()),
        "logit_hist_counts": pa.ListArray.from_arrays(
            pa.array(np.arange(0, counts.size + 1, HIST_BINS, dtype=np.int32)), pa.array(counts.reshape(-1), pa.int32())
        ),
    }


def write_synthetic_store(
    root: Path,
    *,
    name: str = "toy-model",
    n_layers: int = 2,
    n_neurons: int = 4,
    n_seqs: int = 12,
    seq_len: int = 24,
    vocab: list[str] | None = None,
    seed: int = 0,
    top_k: int = 3,
    n_random: int = 2,
    with_logits: bool = True,
    doc_texts: list[str] | None = None,
    with_graphs: bool = True,
    plant=None,
    gated: bool = False,
) -> Store:
    """A small, deterministic store written through the real store API (no model). `plant(layer,
    token_ids, acts) -> acts` may replace a layer's random activations (planted units). `gated`: a
    gated MLP's store, with quadrant columns from random gate and up signs."""
    rng = np.random.default_rng(seed)
    vocab = vocab or ["<bos>"] + [f" w{i}" for i in range(30)] + [
        "<script>alert(1)</script>",
        '"><img src=x onerror=alert(1)>',
        "</textarea>",
        "\n",
    ]
    lengths = np.full(n_seqs, seq_len)
    lengths[-1] = seq_len - 3  # one short document tail
    token_ids = rng.integers(1, len(vocab), size=(n_seqs, seq_len)).astype(np.int32)
    token_ids[:, 0] = 0
    token_ids[1, 3] = vocab.index("<script>alert(1)</script>")
    seq_ids = np.arange(n_seqs, dtype=np.int64)
    store = Store(root)
    for layer in range(n_layers):
        acts = rng.normal(0, 1, size=(n_seqs, seq_len, n_neurons)).astype(np.float32)
        acts[1, 3, :] = 5.0 + layer  # the <script> token is every neuron's top activation
        if plant is not None:
            acts = plant(layer, token_ids, acts)
        st = brute_force_state(acts, lengths, seq_ids, 1, top_k, n_random, seed)
        st["interval"] = brute_force_intervals(acts, lengths, seq_ids, 1, seed)
        if gated:
            signs = np.random.default_rng((seed, layer, 2)).integers(0, 2, size=(2, *acts.shape))
            st["glu"] = brute_force_glu(acts, signs[0], signs[1], lengths, seq_ids, 1)
        store.write_layer(
            "neuroscope",
            layer,
            ns_data.state_to_table(st, top_k, n_random, dict(zip(seq_ids.tolist(), lengths.tolist())), seq_len),
        )
        if with_logits:
            ids = rng.integers(0, len(vocab), size=(n_neurons, 3))
            vals = rng.normal(size=(n_neurons, 3)).astype(np.float32)
            lst = lambda a, t: pa.ListArray.from_arrays(
                pa.array(np.arange(0, a.size + 1, a.shape[1], dtype=np.int32)), pa.array(a.reshape(-1), t)
            )
            store.write_layer(
                "logits",
                layer,
                pa.table(
                    {
                        "neuron": pa.array(np.arange(n_neurons), pa.int32()),
                        "promoted_ids": lst(ids, pa.int32()),
                        "promoted_vals": lst(np.sort(vals)[:, ::-1].copy(), pa.float32()),
                        "suppressed_ids": lst(ids, pa.int32()),
                        "suppressed_vals": lst(np.sort(vals), pa.float32()),
                        "input_ids": lst(ids, pa.int32()),
                        "input_vals": lst(vals, pa.float32()),
                        **_synthetic_weight_columns(layer, n_layers, n_neurons, len(vocab), seed),
                    }
                ).select(LOGITS_SCHEMA.names),
            )
    docs = doc_texts or [f"doc-{i}" for i in range(n_seqs)]
    store.write_sequences(
        pa.table(
            {
                "seq_id": pa.array(seq_ids),
                "doc_id": pa.array([docs[i % len(docs)] for i in range(n_seqs)]),
                "char_start": pa.array(np.arange(n_seqs) * 100),
                "char_end": pa.array(np.arange(n_seqs) * 100 + 90),
                "token_ids": pa.array(
                    [t[:length].tolist() for t, length in zip(token_ids, lengths)], pa.list_(pa.int32())
                ),
            },
            schema=SEQUENCES_SCHEMA,
        )
    )
    store.write_vocab(vocab)
    store.write_manifest(
        new_manifest(
            model={
                "name": name,
                "num_layers": n_layers,
                "layer_size": n_neurons,
                "activation_function": "silu",
                "num_total_neurons": n_layers * n_neurons,
                "num_total_parameters": 1234,
                "d_model": 8,
                "vocab_size": len(vocab),
                **({"gated_mlp": True} if gated else {}),
            },
            corpus={
                "name": "toy-corpus",
                "content_hash": "sha256:0",
                "sequences_total": n_seqs,
                "tokens_total": int(lengths.sum()),
            },
            processed={"sequences": n_seqs, "tokens": int(lengths.sum())},
            config={
                "seq_len": seq_len,
                "seed": seed,
                "tokens": int(lengths.sum()),
                "top_k": top_k,
                "n_random": n_random,
                "bos_token_id": 0,
                "first_valid_position": 1,
            },
            stats={
                "quantile_levels": list(stats.QUANTILE_LEVELS),
                "display_bins": stats.DISPLAY_BINS,
                # the examples across the activation range, as brute_force_intervals chose them
                "interval_shift": stats.INTERVAL_SHIFT,
                "interval_groups": stats.INTERVAL_GROUPS,
                "per_interval": stats.PER_INTERVAL,
            },
            run_hash="synthetic",
            shard=None,
            services=["neuroscope", "logits"] if with_logits else ["neuroscope"],
        )
    )
    if with_graphs:
        write_synthetic_graphs(store, {(0, 1): SYNTHETIC_LINES})
    return Store.open(root)


# Lines (activating token first, then context walking back; each element (token, importance or
# activation, its own activation)) of a hand-made graph: it fires on the <script> token after
# ' w3', and on ' w5' two tokens after ' w6'.
SYNTHETIC_LINES = [
    ([("<script>alert(1)</script>", 0.9, 0.9), (" w3", 0.8, 0.1)], 0.9),
    ([(" w5", 0.7, 0.7), (IGNORE, 0.0, 0.0), (" w6", 0.95, 0.2)], 0.7),
]


def write_synthetic_graphs(
    store: Store, graphs: dict[tuple[int, int], list], f1: dict[tuple[int, int], float] | None = None
) -> None:
    """neuron2graph tables for hand-made graphs, through the service's own table writer. `f1`: a
    graph's test F1 where it is not 0.6."""
    from sitegen.services.neuron2graph.compute import SERVICE, graphs_table

    by_layer: dict[int, list] = {}
    for (layer, neuron), lines in sorted(graphs.items()):
        trie = Trie()
        for line, act in lines:
            trie.insert(line, act)
        trie.merge_ignore()
        work = SimpleNamespace(neuron=neuron, base_max=1.0, train=[None] * 3, test=[None] * 2, lines=lines)
        f = (f1 or {}).get((layer, neuron), 0.6)
        ci = [round(max(0.0, f - 0.25), 4), round(min(1.0, f + 0.2), 4)]
        ev = {"precision": 0.75, "recall": 0.5, "f1": f, "f1_ci": ci, "variance_explained": 0.25}
        by_layer.setdefault(layer, []).append((work, trie, ev))
    for layer, rows in by_layer.items():
        store.write_layer(SERVICE, layer, graphs_table(rows))
    if store.exists:
        Store.open(store.root).add_service(SERVICE)


def write_tall_site(root: Path, cap: int = 60):
    """3 layers x 40 neurons of the default vocabulary, built with a posting cap of CAP: every
    neuron fires on the <script> token (120 results, capped lists, a graph where the token is both
    activating and important), most other tokens occur but no neuron has them, no explanations.
    Returns (store, site folder); the model is "tall"."""
    from sitegen.site import search
    from sitegen.site.build import build_site

    store = write_synthetic_store(
        root / "store",
        name="tall",
        n_layers=3,
        n_neurons=40,
        n_seqs=12,
        seq_len=12,
        with_logits=False,
        with_graphs=False,
    )
    write_synthetic_graphs(
        store,
        {
            (0, 2): SYNTHETIC_LINES,
            (1, 3): [
                ([("<script>alert(1)</script>", 0.9, 0.9), (" w3", 0.9, 0.2)], 0.9),
                ([(" w3", 0.9, 0.9), ("<script>alert(1)</script>", 0.9, 0.2)], 0.9),
            ],
        },
    )
    old_cap, search.CAP = search.CAP, cap
    try:
        build_site([store.root], root / "site")
    finally:
        search.CAP = old_cap
    return Store.open(store.root), root / "site"


def static_search(site: Path, model: str, query: str) -> list[int]:
    """What the browser's search computes, done in Python from the published files only: the
    meta file, one shard per term, and a term's "more" file when its lists were capped."""
    import orjson

    from sitegen.services.neuron2graph.tokenstore import parse_query
    from sitegen.site.search import fnv1a

    base = site / "search" / model
    meta = orjson.loads((base / "meta.json").read_bytes())
    result: set[int] | None = None
    for kind, key in parse_query(query):
        shard = fnv1a(key) % meta["shards"]
        entry = orjson.loads((base / "tokens" / f"{shard}.json").read_bytes()).get(key)
        if entry is None:
            ids: set[int] = set()
        else:
            lists = entry
            if "m" in entry:
                lists = orjson.loads((base / "more" / f"{shard}-{entry['m']}.json").read_bytes())
            a, i = np.cumsum(lists["a"]).tolist(), np.cumsum(lists["i"]).tolist()
            ids = set(a) if kind == "activating" else set(i) if kind == "important" else set(a) | set(i)
        result = ids if result is None else result & ids
    return sorted(result or ())


def static_text_search(site: Path, model: str, query: str) -> list[int]:
    """The explanation search as the page runs it (same analysis, AND, shards only), ids sorted."""
    import orjson

    from sitegen.site.search import fnv1a
    from sitegen.site.textindex import analyse

    base = site / "search" / model
    meta = orjson.loads((base / "meta.json").read_bytes())["text"]
    result: set[int] | None = None
    for term in analyse(query):
        entry = orjson.loads((base / "words" / f"{fnv1a(term) % meta['shards']}.json").read_bytes()).get(term, [[], []])
        ids = set(np.cumsum(entry[0]).tolist())
        result = ids if result is None else result & ids
    return sorted(result or ())


def interrupt_after(batches: int):
    """run_compute's `progress` seam: a bar that stops the corpus pass with a Ctrl-C after `batches`
    batches, as an interrupted run would stop (run_compute then saves its checkpoint and says so)."""

    class Bar:
        def __init__(self, total: int, initial: int):
            self.seen = 0

        def update(self, n: int) -> None:
            self.seen += 1
            if self.seen >= batches:
                raise KeyboardInterrupt

        def close(self) -> None:
            pass

    return Bar


def explain_argv(store, endpoint: str, model: str, neurons: str, *extra: str) -> list[str]:
    """`python -m sitegen explain STORE --endpoint E --model M --neurons N ...` as a subprocess's argv."""
    return [
        sys.executable,
        "-m",
        "sitegen",
        "explain",
        str(store.root),
        "--endpoint",
        endpoint,
        "--model",
        model,
        "--neurons",
        neurons,
        *extra,
    ]
