"""A synthetic store of realistic shape and random content for every built-in service, written
through the real store API and the services' own table writers (no model, no torch):

- neuroscope: `top_k` top and bottom texts and `n_random` random texts of `seq_len` tokens per
  neuron, heavy-tailed (Student t) activations, full statistics and histograms;
- logits: 10 promoted, suppressed and input tokens per neuron;
- neuron2graph: graphs for a sample of each layer's neurons (`graphs`: a fraction, or a count per
  layer), built as `sitegen compute --n2g` builds them (lines of activating token + context with
  wildcards into a Trie, merged, walked into the table by `graphs_table`), held-out figures;
- neuron_explainer: explanations for a sample (`explained`), sentences of 4-18 words with
  correlation scores, most of them as `sitegen import-explanations` writes them and a share
  (`scored_share`) as `sitegen explain` writes them (usage, prompt hash, scored sequences);
- token sequences drawn from a Zipf law over a GPT-2-sized vocabulary of word-like tokens, so
  token search and similar neurons see realistic overlaps.

    from synthetic import synthetic_store        # benchmarks/ on sys.path
    synthetic_store(root, n_layers=12, n=3072)   # GPT-2 small's shape
    synthetic_store(root, 32, 14336)             # Llama-3-8B's MLP shape
    python benchmarks/synthetic.py STORE [--layers 12] [--neurons 3072] [--graphs 0.02] [--explained 0.1]

Per-layer work is vectorised with numpy; the graphs (a few percent of neurons) go through the real
Trie one by one. Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import orjson
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sitegen.services.neuroscope import data as ns_data  # noqa: E402
from sitegen.services.neuroscope import stats  # noqa: E402
from sitegen.store import SEQUENCES_SCHEMA, Store  # noqa: E402
from sitegen.store.manifest import new_manifest  # noqa: E402

LETTERS = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
WORDS = (
    "the a of to and in is that for it on with as at by this from or an be are was were has have not but which one all "
    "word token phrase name number date year city country person company text code quote list sentence verb noun adjective "
    "plural past tense capital letter punctuation comma period bracket parenthesis question answer legal medical sports "
    "music science politics money time place after before following preceding end start beginning line html python "
    "function variable string digit percent dollar first second third repeated context mentions references"
).split()
EXPLAINER = "gpt-4o-mini"


def _vocab(rng: np.random.Generator, size: int) -> list[str]:
    """Word-like tokens, two thirds with a leading space (as in a BPE vocabulary), plus a few that
    need escaping; token 0 is the end-of-text marker (the sequences' BOS)."""
    lengths = rng.integers(1, 9, size)
    chars = rng.choice(LETTERS, int(lengths.sum()))
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    joined = "".join(chars.tolist())
    vocab = [("" if i % 3 == 0 else " ") + joined[bounds[i] : bounds[i + 1]] for i in range(size)]
    vocab[0] = "<|endoftext|>"
    for i, special in zip(range(1, 6), ["<script>", " &amp;", '"', "\n", " Ünïcode"]):
        vocab[i * 997 % size or 1] = special
    return vocab


def _zipf_tokens(rng: np.random.Generator, shape, vocab_size: int, a: float = 1.1) -> np.ndarray:
    """Token ids 1..vocab_size-1 by a Zipf law over a random permutation of the vocabulary."""
    ranks = rng.zipf(a, size=shape)
    ranks = np.where(ranks < vocab_size, ranks, rng.integers(1, vocab_size, size=shape))  # the tail: uniform
    perm = np.concatenate([[0], rng.permutation(np.arange(1, vocab_size))])
    return perm[ranks].astype(np.int32)


def _distinct_rows(rng: np.random.Generator, n_rows: int, k: int, high: int) -> np.ndarray:
    """(n_rows, k) integers in [0, high), distinct within each row (vectorised: redraw rows with a repeat)."""
    out = rng.integers(0, high, size=(n_rows, k))
    while True:
        s = np.sort(out, 1)
        bad = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(1))
        if not len(bad):
            return out
        out[bad] = rng.integers(0, high, size=(len(bad), k))


def _interval_state(rng, n: int, seq_len: int, n_seqs: int, vmax: np.ndarray) -> dict:
    """Examples across the activation range shaped as a real pass leaves them (compute.IntervalExamples):
    each neuron's groups hang from its maximum's interval; about two thirds of the neurons fill all
    groups, the others a random number of them; each example's trace peaks inside its group's interval."""
    per, groups = stats.PER_INTERVAL, stats.INTERVAL_GROUPS + 1
    top = stats.interval_code(vmax)
    filled = np.where(rng.random(n) < 2 / 3, groups, rng.integers(1, groups + 1, n))  # groups with examples
    present = (np.arange(groups)[None, :, None] < filled[None, None, :]) & (rng.random((per, groups, n)) < 0.9)
    seq_id = np.where(present, rng.integers(0, n_seqs, (per, groups, n)), -1)
    score = np.where(present, -rng.random((per, groups, n)), -np.inf).astype(np.float32)
    peak = np.stack([stats.interval_edge(int(c)) for c in np.maximum(top, 1)])  # (n,): top interval's lower edge
    scale = peak[None, :] * 2.0 ** (-np.arange(groups) / 4)[:, None]  # (groups, n)
    trace = (rng.random((per, groups, n, seq_len)) * scale[None, :, :, None]).astype(np.float32)
    trace[..., 0] = 0.0  # BOS
    return {"score": score, "seq_id": seq_id.astype(np.int64), "trace": trace, "top": top}


def _neuroscope_table(
    rng, n: int, k: int, r: int, seq_len: int, n_seqs: int, lengths: dict[int, int], intervals: bool = True
) -> pa.Table:
    def extremes():
        ids = _distinct_rows(rng, n, k, n_seqs).T  # (k, n)
        trace = (rng.standard_t(4, size=(k, n, seq_len)) * 0.3).astype(np.float32)
        trace[:, :, 0] = 0.0  # BOS
        score = np.sort(np.abs(trace).max(2), axis=0)[::-1].astype(np.float32)
        return {"score": np.ascontiguousarray(score), "seq_id": ids.astype(np.int64), "trace": trace}

    hist = rng.integers(0, 50, size=(n, stats.N_FINE_BINS)).astype(np.int64)
    rid = np.sort(rng.choice(n_seqs, r, replace=False))
    state = {
        "top": extremes(),
        "bottom": extremes(),
        "random": {
            "score": -np.arange(r, dtype=np.float32)[:, None],
            "seq_id": rid[:, None].astype(np.int64),
            "trace": (rng.normal(size=(r, 1, n * seq_len)) * 0.1).astype(np.float32),
        },
        "count": int(hist[0].sum()),
        "sum_fx": rng.integers(-(2**40), 2**40, n),
        "sumsq_fx": rng.integers(0, 2**44, n),
        "sumsq_lo": rng.integers(0, 2**30, n),
        "n_pos": rng.integers(0, 1000, n),
        "vmin": -rng.random(n).astype(np.float32) - 0.5,
        "vmax": rng.random(n).astype(np.float32) * 5 + 1,
        "hist": hist,
    }
    if intervals:
        state["interval"] = _interval_state(rng, n, seq_len, n_seqs, state["vmax"])
    return ns_data.state_to_table(state, k, r, lengths)


def _list(a: np.ndarray, t: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(
        pa.array(np.arange(0, a.size + 1, a.shape[1], dtype=np.int32)), pa.array(a.reshape(-1), t)
    )


def _logits_table(rng, n: int, vocab_size: int) -> pa.Table:
    cols = {"neuron": pa.array(np.arange(n), pa.int32())}
    for kind, sign in (("promoted", -1), ("suppressed", 1), ("input", -1)):
        ids = rng.integers(1, vocab_size, size=(n, 10))
        vals = np.sort(rng.normal(size=(n, 10)).astype(np.float32) * 2, axis=1)[:, ::sign]
        cols[f"{kind}_ids"], cols[f"{kind}_vals"] = (
            _list(ids, pa.int32()),
            _list(np.ascontiguousarray(vals), pa.float32()),
        )
    effects = rng.normal(size=(n, 40)).astype(np.float32)  # a stand-in row of logit effects per neuron
    cols["logit_hist_lo"] = pa.array(effects.min(1), pa.float32())
    cols["logit_hist_hi"] = pa.array(effects.max(1), pa.float32())
    cols["logit_hist_counts"] = _list(rng.integers(0, 1000, size=(n, 40)).astype(np.int32), pa.int32())
    from sitegen.services.logits.data import TABLE_SCHEMA

    # connected units (global ids across layers) are left null: the synthetic layers are independent
    return pa.table({f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in TABLE_SCHEMA}, schema=TABLE_SCHEMA)


def _sample(rng, n: int, amount: float) -> np.ndarray:
    """Sorted neuron ids: `amount` < 1 is a fraction of the layer, otherwise a count."""
    count = min(n, round(amount * n) if amount < 1 else int(amount))
    return np.sort(rng.choice(n, count, replace=False)) if count else np.zeros(0, np.int64)


def _graph_rows(rng, neurons: np.ndarray, vocab: list[str], vocab_size: int) -> list:
    """One (work, trie, evaluation) per neuron, as neuron2graph's compute hands them to graphs_table:
    4-16 lines of an activating token and 0-5 context tokens (some wildcards) from a small
    per-neuron pool of Zipf-drawn tokens, so lines share prefixes as real ones do."""
    from sitegen.services.neuron2graph.graph import IGNORE, Trie

    rows = []
    for neuron in neurons.tolist():
        pool = [vocab[i] for i in _zipf_tokens(rng, 12, vocab_size).tolist()]
        n_lines = int(rng.integers(4, 17))
        lines = []
        for _ in range(n_lines):
            act = round(float(rng.uniform(0.5, 1.0)), 3)
            line = [(pool[int(rng.integers(0, 3))], act, act)]  # activating: few distinct tokens
            for _ in range(int(rng.integers(0, 6))):
                if rng.random() < 0.15:
                    line.append((IGNORE, 0.0, 0.0))
                else:
                    imp = round(float(rng.uniform(0.75, 1.0)), 3)
                    line.append((pool[int(rng.integers(3, len(pool)))], imp, round(float(rng.uniform(0, 0.6)), 3)))
            while line[-1][0] == IGNORE:  # a line ends on a kept token
                line.pop()
            lines.append((line, act))
        trie = Trie()
        for line, act in lines:
            trie.insert(line, act)
        trie.merge_ignore()
        p, rc = float(rng.uniform(0.3, 1)), float(rng.uniform(0.2, 1))
        ev = (
            None
            if rng.random() < 0.05
            else {
                "precision": p,
                "recall": rc,
                "f1": 2 * p * rc / (p + rc),
                "variance_explained": float(rng.uniform(-0.5, 0.9)),
            }
        )
        work = SimpleNamespace(
            neuron=neuron, base_max=float(rng.uniform(1, 6)), train=[None] * 10, test=[None] * 10, lines=lines
        )
        rows.append((work, trie, ev))
    return rows


def _sentences(rng, count: int, low: int = 4, high: int = 19) -> list[str]:
    words = np.array(WORDS)
    lengths = rng.integers(low, high, count)
    flat = rng.choice(words, int(lengths.sum())).tolist()
    out, at = [], 0
    for length in lengths.tolist():
        out.append(" ".join(flat[at : at + length]))
        at += length
    return out


def _explainer_table(
    rng, neurons: np.ndarray, scored_share: float, vocab: list[str], seq_len: int, vocab_size: int
) -> pa.Table:
    """Published-style rows for most, `sitegen explain` rows (5 scored test sequences each) for a share."""
    from sitegen.services.neuron_explainer.published import TABLE_SCHEMA

    count = len(neurons)
    texts = _sentences(rng, count)
    scores = np.clip(rng.normal(0.3, 0.2, count), -0.2, 0.95).round(6)
    ours = rng.random(count) < scored_share
    rows = []
    for i, n in enumerate(neurons.tolist()):
        row = {
            "neuron": n,
            "explanation": texts[i],
            "score": float(scores[i]),
            "explainer": "OpenAI (published, GPT-4 explainer)",
            "source": "openai-published",
            "method": "published",
            "valid_score": None,
            "prompt_hash": None,
            "usage": None,
            "details": None,
            "raw": None,
        }
        if ours[i]:
            details = []
            for _ in range(5):
                ids = _zipf_tokens(rng, seq_len - 1, vocab_size).tolist()
                true = np.maximum(rng.standard_t(4, seq_len - 1) * 0.3, 0).round(4).tolist()
                details.append(
                    {
                        "tokens": [vocab[t] for t in ids],
                        "true": true,
                        "simulated": rng.integers(0, 11, seq_len - 1).tolist(),
                    }
                )
            row.update(
                explainer=EXPLAINER,
                source="sitegen explain",
                method="all_at_once",
                valid_score=float(scores[i]) - 0.05,
                prompt_hash="sha256:" + "%064x" % int(rng.integers(0, 2**62)),
                usage=orjson.dumps({"prompt_tokens": 4000, "completion_tokens": 900, "requests": 11}).decode(),
                details=orjson.dumps(details).decode(),
                raw="[]",
            )
        rows.append(row)
    schema = pa.schema(
        [
            *TABLE_SCHEMA,
            ("valid_score", pa.float64()),
            ("prompt_hash", pa.string()),
            ("usage", pa.string()),
            ("details", pa.string()),
            ("raw", pa.string()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def synthetic_store(
    root: Path,
    n_layers: int = 12,
    n: int = 3072,
    *,
    seq_len: int = 32,
    n_seqs: int = 20000,
    vocab_size: int = 50257,
    top_k: int = 20,
    n_random: int = 5,
    graphs: float = 0.02,
    explained: float = 0.1,
    scored_share: float = 0.1,
    seed: int = 0,
    name: str = "gpt2-small-synthetic",
    interval_examples: bool = True,
    log=lambda s: None,
) -> Store:
    """Write the store at `root` (created) and return it opened. `graphs` and `explained`: a
    fraction of each layer's neurons (< 1) or a count per layer (>= 1); 0 leaves the service out."""
    from sitegen.services.neuron2graph.compute import SERVICE as N2G
    from sitegen.services.neuron2graph.compute import graphs_table
    from sitegen.services.neuron_explainer.published import SERVICE as EXPLAIN

    rng = np.random.default_rng(seed)
    vocab = _vocab(rng, vocab_size)
    token_ids = _zipf_tokens(rng, (n_seqs, seq_len), vocab_size)
    token_ids[:, 0] = 0
    lengths = {i: seq_len for i in range(n_seqs)}
    store = Store(root)
    n_graphs = n_explained = 0
    for layer in range(n_layers):
        t0 = time.perf_counter()
        store.write_layer(
            "neuroscope", layer, _neuroscope_table(rng, n, top_k, n_random, seq_len, n_seqs, lengths, interval_examples)
        )
        store.write_layer("logits", layer, _logits_table(rng, n, vocab_size))
        if graphs and len(sample := _sample(rng, n, graphs)):
            store.write_layer(N2G, layer, graphs_table(_graph_rows(rng, sample, vocab, vocab_size)))
            n_graphs += len(sample)
        if explained and len(sample := _sample(rng, n, explained)):
            store.write_layer(EXPLAIN, layer, _explainer_table(rng, sample, scored_share, vocab, seq_len, vocab_size))
            n_explained += len(sample)
        log(f"layer {layer}: {time.perf_counter() - t0:.1f} s")
    store.write_sequences(
        pa.table(
            {
                "seq_id": pa.array(np.arange(n_seqs, dtype=np.int64)),
                "doc_id": pa.array([f"doc-{i // 50}" for i in range(n_seqs)]),
                "char_start": pa.array(np.arange(n_seqs) * 150),
                "char_end": pa.array(np.arange(n_seqs) * 150 + 140),
                "token_ids": pa.ListArray.from_arrays(
                    pa.array(np.arange(0, token_ids.size + 1, seq_len, dtype=np.int32)),
                    pa.array(token_ids.reshape(-1), pa.int32()),
                ),
            },
            schema=SEQUENCES_SCHEMA,
        )
    )
    store.write_vocab(vocab)
    services = ["neuroscope", "logits"]
    store.write_manifest(
        new_manifest(
            model={
                "name": name,
                "num_layers": n_layers,
                "layer_size": n,
                "activation_function": "gelu",
                "num_total_neurons": n_layers * n,
                "num_total_parameters": 124_000_000,
            },
            corpus={
                "name": "synthetic",
                "content_hash": "none",
                "sequences_total": n_seqs,
                "tokens_total": n_seqs * seq_len,
            },
            processed={"sequences": n_seqs, "tokens": n_seqs * seq_len},
            config={
                "seq_len": seq_len,
                "seed": seed,
                "tokens": n_seqs * seq_len,
                "top_k": top_k,
                "n_random": n_random,
                "bos_token_id": 0,
                "first_valid_position": 1,
            },
            stats={"quantile_levels": list(stats.QUANTILE_LEVELS), "display_bins": stats.DISPLAY_BINS},
            run_hash="benchmark",
            shard=None,
            services=services,
        )
    )
    store = Store.open(root)
    if n_graphs:  # with the settings record `sitegen compute --n2g` keeps (the pages' provenance reads it)
        store.add_service(
            N2G,
            {
                "texts": top_k,
                "replacements": 5,
                "max_augmented": 20,
                "seed": seed,
                "replacement_source": "input-embedding nearest neighbours",
                "neutral_token_id": 0,
                "thresholds": {
                    "prune_drop": 0.5,
                    "append_tokens": 5,
                    "important_for_augment": 0.8,
                    "important_for_line": 0.75,
                    "activating_for_line": 0.5,
                    "firing": 0.5,
                },
            },
        )
    if n_explained:
        store.add_service(EXPLAIN)
    return Store.open(root)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", type=Path, help="folder to write (must not hold a store yet)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument(
        "--neurons", type=int, default=3072, help="neurons per layer (48 x 6400: --layers 48 --neurons 6400)"
    )
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument(
        "--graphs", type=float, default=0.02, help="neuron2graph graphs per layer: a fraction (< 1) or a count"
    )
    ap.add_argument("--explained", type=float, default=0.1, help="explanations per layer: a fraction (< 1) or a count")
    ap.add_argument(
        "--scored-share",
        type=float,
        default=0.1,
        help="share of explanations with `sitegen explain`'s scored sequences",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if (args.store / "manifest.json").exists():
        sys.exit(f"{args.store}: already holds a store; pass a new folder")
    t0 = time.perf_counter()
    synthetic_store(
        args.store,
        args.layers,
        args.neurons,
        vocab_size=args.vocab,
        graphs=args.graphs,
        explained=args.explained,
        scored_share=args.scored_share,
        seed=args.seed,
        log=print,
    )
    print(f"synthetic store {args.layers} x {args.neurons} in {time.perf_counter() - t0:.1f} s: {args.store}")


if __name__ == "__main__":
    main()
