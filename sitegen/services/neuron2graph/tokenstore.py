"""A model's token store and similar neurons (numpy, no torch), read by the build.

Token store: for every neuron, its 'activating' and 'important' token keys (N2G-normalised). A
neuron with a graph takes them from its graph nodes; a neuron without one takes the activating
tokens of its top sequences (positions at or above half its largest activation there; the
strongest FALLBACK_CAP kept) and no important tokens, marked source 'top-sequences'. So search and
similarity cover every neuron of every layer. Each activating token of a neuron also carries its
support: in how many distinct top sequences of the neuron it reaches that same half-peak level on
the token (0 for a graph token the top sequences never fire on), and its strength: the neuron's
largest activation on the token in those sequences as a share of its largest there (0 where the
token never occurs there; the search page ranks by it); and the store counts every token
key over the stored sequences (positions from first_valid on), so search can say how often a
token no neuron has occurs.

Similarity between two neurons with graphs: the measure DeepDecipher's paper describes, symmetric,
    (|A_i & A_j| + |I_i & I_j|) / (min(|A_i|, |A_j|) + min(|I_i|, |I_j|));
between any other two: the rarity-weighted Jaccard index of their activating sets (see
similar_neurons), since dividing by the smaller set made a one-token neuron 1.00-similar to every
neuron holding its token. Both are computed through an inverted index: for each neuron, the
posting lists of its tokens are concatenated and counted, so only pairs that share a token are
ever looked at. DeepDecipher's
deployed server (src/data/neuron_store.rs) divides by |A_j| + |I_j| instead, j the later neuron
of the pair (the minimum is taken against the length of the list of all neurons), keeps every
neighbour >= 0.4 rather than the top 10, and once divided by the larger of the two neurons' sizes;
sitegen computes the intended formula.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from sitegen.services.neuron2graph import graph as g

FALLBACK_THRESHOLD = 0.5  # of the neuron's largest activation on its top sequences (N2G's firing level)
FALLBACK_CAP = 20
SIMILARITY_THRESHOLD = 0.4
SIMILAR_TOP = 10
# Similar neurons of a neuron without a graph come from its top-sequence tokens (sitegen's own
# extension: DeepDecipher has similar neurons only for graphs). There, a token in the sets of more
# than max(STOP_MIN, STOP_SHARE x neurons) neurons (" the", ",") is a stop token: it says nothing
# about what a neuron does, and counting it made the pass quadratic (every neuron with " the"
# compared with every other: hours at 307,200 neurons). Graphs' own sets are never cut.
STOP_MIN = 1000
STOP_SHARE = 0.01
DENSE_LIMIT = 150_000  # neurons; also ids must stay below 2**20 for the ranking key (1M neurons)
SOURCE_GRAPH, SOURCE_TOP = "graph", "top-sequences"
# The name each similar-neuron entry carries (the API's `similar[k].measure`).
MEASURE_GRAPHS, MEASURE_TOKENS = "deepdecipher-intended", "rarity-weighted-jaccard"
SIMILARITY_MEASURES = (
    "deepdecipher-intended (both neurons have a graph): (|A_i & A_j| + |I_i & I_j|) / (min(|A_i|, |A_j|) + "
    "min(|I_i|, |I_j|)) over the graphs' activating (A) and important (I) token sets, the formula DeepDecipher's "
    "paper describes (its server divides by |A_j| + |I_j| of the later neuron j instead), kept at >= 0.4; "
    "rarity-weighted-jaccard (any other pair): W(A_i & A_j) / W(A_i | A_j) over the activating sets, each token "
    "weighted ln(H / df) (df: neurons whose set holds it, H: neurons with a set), listed only when the sets "
    "share at least 2 tokens and it is >= 0.2, so one shared token never makes a neighbour"
)
TOKEN_THRESHOLD = 0.2  # rarity-weighted Jaccard: a neighbour shares a fair part of the weight of both sets
MIN_SHARED = 2  # one shared token is no evidence that two neurons do the same thing
SHARED_SHOWN = 5  # shared tokens shown per similar neuron (page and API)


@dataclass
class TokenStore:
    keys: list[str]  # key id -> normalised token
    layer_size: int
    activating: list[np.ndarray]  # global neuron id -> key ids (int32), strongest first
    important: list[np.ndarray]
    source: list[str]
    f1: list[float | None]  # held-out F1 of the neuron's graph (None: no graph)
    max_act: list[float]  # largest activation seen (neuroscope), for result previews
    # Per neuron, aligned with `activating`: in how many distinct top sequences of the neuron it
    # reaches FALLBACK_THRESHOLD of its peak on that token (the evidence behind a search result).
    support: list[np.ndarray] = field(default_factory=list)
    counts: np.ndarray = field(
        default_factory=lambda: np.zeros(0, np.int64)
    )  # key id -> occurrences in the stored sequences (positions from first_valid on)
    f1_ci: list[list[float] | None] = field(default_factory=list)  # F1's bootstrap interval (None: none)
    # Per neuron, aligned with `activating`: its largest activation on the token in its top
    # sequences over its largest there, 0 to 1 in hundredths (0: never on the token there).
    strength: list[np.ndarray] = field(default_factory=list)
    corpus: dict | None = (
        None  # what `counts` counts: {"sequences": stored, "tokens": counted, "processed": the corpus pass's sequences}
    )

    @property
    def n_neurons(self) -> int:
        return len(self.activating)

    def postings(self, kind: str) -> dict[int, np.ndarray]:
        """key id -> sorted global neuron ids whose `kind` set holds it."""
        return _postings(self.activating if kind == "activating" else self.important)

    def search_postings(self) -> dict[str, tuple[list[int], list[int]]]:
        """token -> (activating ids, important ids), each sorted: the site's token search."""
        a, i = self.postings("activating"), self.postings("important")
        return {
            self.keys[k]: (a[k].tolist() if k in a else [], i[k].tolist() if k in i else [])
            for k in sorted(set(a) | set(i))
        }

    def search_strength(self) -> dict[str, list[float]]:
        """token -> the strength (see `strength`) of each neuron in its activating list, in the
        list's order (neuron order, as `postings`); none for a store built without strengths."""
        return self._by_token(self.strength, np.float64)

    def search_support(self) -> dict[str, list[int]]:
        """token -> the support (see `support`) of each neuron in its activating list, in the
        list's order (neuron order, as `postings`); none for a store built without supports."""
        return self._by_token(self.support, np.int64)

    def _by_token(self, per_neuron: list[np.ndarray], dtype) -> dict[str, list]:
        """Values aligned with each neuron's activating keys, regrouped by key: token -> the values
        of the neurons holding it, in neuron order ({} when the store has none)."""
        if len(per_neuron) != self.n_neurons:
            return {}
        owners = np.repeat(np.arange(self.n_neurons, dtype=np.int64), [len(s) for s in self.activating])
        keys = np.concatenate(self.activating) if self.activating else np.zeros(0, np.int64)
        values = np.concatenate(per_neuron) if per_neuron else np.zeros(0, dtype)
        order = np.lexsort((owners, keys))
        keys, values = keys[order], values[order]
        bounds = np.flatnonzero(np.diff(keys)) + 1
        return {
            self.keys[int(k[0])]: v.tolist() for k, v in zip(np.split(keys, bounds), np.split(values, bounds)) if len(k)
        }

    def token_counts(self) -> dict[str, int]:
        """token -> its occurrences in the stored sequences, for every token that occurs."""
        return {self.keys[int(k)]: int(self.counts[k]) for k in np.flatnonzero(self.counts)}

    def preview(self, g: int, n_tokens: int = 5) -> list:
        """A search result's start: [top tokens, largest activation, graph F1 or None, F1's
        interval or None]."""
        graph = self.source[g] == SOURCE_GRAPH
        return [
            [self.keys[k] for k in self.activating[g][:n_tokens]],
            self.max_act[g],
            self.f1[g] if graph else None,
            self.f1_ci[g] if graph and self.f1_ci else None,
        ]


def _postings(sets: list[np.ndarray]) -> dict[int, np.ndarray]:
    owners = np.repeat(np.arange(len(sets), dtype=np.int64), [len(s) for s in sets])
    keys = np.concatenate(sets) if sets else np.zeros(0, np.int64)
    order = np.lexsort((owners, keys))
    keys, owners = keys[order], owners[order]
    bounds = np.flatnonzero(np.diff(keys)) + 1
    return {int(k[0]): o for k, o in zip(np.split(keys, bounds), np.split(owners, bounds)) if len(k)}


class _Keys:
    def __init__(self):
        self.ids: dict[str, int] = {}
        self.keys: list[str] = []

    def __call__(self, key: str) -> int:
        i = self.ids.get(key)
        if i is None:
            i = self.ids[key] = len(self.keys)
            self.keys.append(key)
        return i


def build_token_store(store, first_valid: int) -> TokenStore:
    manifest = store.manifest
    n_layers, size = int(manifest["model"]["num_layers"]), int(manifest["model"]["layer_size"])
    vocab = store.vocab()
    intern = _Keys()
    vocab_key = np.array([intern(g.normalise(t)) for t in vocab], dtype=np.int64)
    seqs = store.sequences()
    seq_index = {int(s): i for i, s in enumerate(seqs.column("seq_id").to_numpy())}
    tok_col = seqs.column("token_ids").combine_chunks()
    tok_off, tok_val = np.asarray(tok_col.offsets), np.asarray(tok_col.values)
    # positions before first_valid (BOS) are no text: not counted, as everywhere else
    position = np.arange(len(tok_val)) - np.repeat(tok_off[:-1], np.diff(tok_off))
    counted = tok_val[position >= first_valid]
    counts = (
        np.bincount(vocab_key[counted], minlength=len(intern.keys))
        if len(counted)
        else np.zeros(len(intern.keys), np.int64)
    )
    processed = manifest.get("processed", {}).get("sequences")
    corpus = {
        "sequences": len(seq_index),
        "tokens": int(len(counted)),
        "processed": None if processed is None else int(processed),
    }
    activating: list[np.ndarray] = []
    important: list[np.ndarray] = []
    source: list[str] = []
    f1: list[float | None] = []
    f1_ci: list[list[float] | None] = []
    max_act: list[float] = []
    support: list[np.ndarray] = []
    strength: list[np.ndarray] = []
    has_graphs = store.has_service("neuron2graph")
    for layer in range(n_layers):
        graphs = {}
        if has_graphs and store.layer_path("neuron2graph", layer).exists():
            t = store.read_layer(
                "neuron2graph", layer, columns=["neuron", "activating", "important", "f1", "f1_ci"]
            ).to_pydict()
            graphs = {
                n: (a, i, f, ci)
                for n, a, i, f, ci in zip(t["neuron"], t["activating"], t["important"], t["f1"], t["f1_ci"])
            }
        max_act.extend(
            round(float(x), 4) for x in store.read_layer("neuroscope", layer, columns=["max"]).column("max").to_numpy()
        )
        fallback, fired, peak_share = _fallback_keys(
            store, layer, size, first_valid, seq_index, tok_off, tok_val, vocab_key
        )
        for n in range(size):
            if n in graphs:
                a, i, f, ci = graphs[n]
                activating.append(np.array([intern(k) for k in a], dtype=np.int64))
                important.append(np.array([intern(k) for k in i], dtype=np.int64))
                source.append(SOURCE_GRAPH)
                f1.append(None if f is None else round(f, 3))
                f1_ci.append(None if f is None or ci is None else [round(x, 3) for x in ci])
            else:
                activating.append(fallback[n])
                important.append(np.zeros(0, np.int64))
                source.append(SOURCE_TOP)
                f1.append(None)
                f1_ci.append(None)
            support.append(np.array([fired.get((n, int(k)), 0) for k in activating[-1]], dtype=np.int64))
            strength.append(peak_share(n, activating[-1]))
    return TokenStore(
        intern.keys,
        size,
        activating,
        important,
        source,
        f1,
        max_act,
        support,
        counts,
        f1_ci=f1_ci,
        strength=strength,
        corpus=corpus,
    )


def _fallback_keys(
    store, layer, size, first_valid, seq_index, tok_off, tok_val, vocab_key
) -> tuple[list[np.ndarray], dict[tuple[int, int], int], Callable[[int, np.ndarray], np.ndarray]]:
    """Per neuron: the distinct token keys where it reaches FALLBACK_THRESHOLD of its largest
    activation on its top sequences, strongest first, at most FALLBACK_CAP (vectorised per layer);
    (neuron, key) -> the number of distinct top sequences where it does so on that key; and
    and peak_share(neuron, keys) -> its largest activation on each key there over that largest
    activation, in hundredths (looked up in the sorted (neuron, key) pairs it is above 0 on)."""
    t = store.read_layer("neuroscope", layer, columns=["top_seq", "top_acts"])
    seq_col = t.column("top_seq").combine_chunks()
    acts_col = t.column("top_acts").combine_chunks()
    outer = np.asarray(acts_col.offsets)
    inner = np.asarray(acts_col.values.offsets)
    values = np.asarray(acts_col.values.values.to_numpy(zero_copy_only=False), dtype=np.float64)
    seq_ids = np.asarray(seq_col.values.to_numpy())
    lengths = np.diff(inner)
    n_texts = len(lengths)
    text_neuron = np.repeat(np.arange(len(outer) - 1), np.diff(outer))
    value_text = np.repeat(np.arange(n_texts), lengths)
    position = np.arange(len(values)) - inner[:-1][value_text]
    rows = np.array([seq_index[int(s)] for s in seq_ids], dtype=np.int64)
    token = tok_val[tok_off[rows][value_text] + position] if len(values) else np.zeros(0, np.int64)
    neuron = text_neuron[value_text]
    counted = position >= first_valid
    peak = np.full(size, -np.inf)
    np.maximum.at(peak, neuron[counted], values[counted])
    above = counted & (peak[neuron] > 0) & (values > 0)
    share = np.zeros(0)
    pair_key = np.zeros(0, np.int64)
    if above.any():
        pair = neuron[above] * len(vocab_key) + vocab_key[token[above]]  # (neuron, key) as one int
        pair_key, where = np.unique(pair, return_inverse=True)
        share = np.zeros(len(pair_key))
        np.maximum.at(share, where, values[above] / peak[neuron[above]])

    def peak_share(n: int, keys: np.ndarray) -> np.ndarray:
        """Neuron n's share on each key, in hundredths; 0 for a key it is never above 0 on (or
        one no vocabulary token normalises to)."""
        keys = np.asarray(keys, dtype=np.int64)
        pair = n * len(vocab_key) + keys
        at = np.minimum(np.searchsorted(pair_key, pair), max(len(pair_key) - 1, 0))
        found = (keys < len(vocab_key)) & (pair_key[at] == pair) if len(pair_key) else np.zeros(len(keys), bool)
        return np.array([round(float(share[i]), 2) if f else 0.0 for i, f in zip(at, found)], dtype=np.float64)

    keep = counted & (peak[neuron] > 0) & (values >= FALLBACK_THRESHOLD * peak[neuron])
    neuron, key, value = neuron[keep], vocab_key[token[keep]], values[keep]
    triples = (
        np.unique(np.stack([neuron, key, rows[value_text[keep]]]), axis=1)
        if len(neuron)
        else np.zeros((3, 0), np.int64)
    )
    pairs, fired = np.unique(triples[:2], axis=1, return_counts=True)
    fired_at = {(int(n), int(k)): int(c) for n, k, c in zip(pairs[0], pairs[1], fired)}
    order = np.lexsort((key, -value, neuron))  # per neuron: strongest first, ties by key id
    neuron, key = neuron[order], key[order]
    out: list[np.ndarray] = [np.zeros(0, np.int64)] * size
    bounds = np.flatnonzero(np.diff(neuron)) + 1
    for part_n, part_k in zip(np.split(neuron, bounds), np.split(key, bounds)):
        if len(part_n):
            _, first = np.unique(part_k, return_index=True)  # distinct keys, each at its strongest
            out[int(part_n[0])] = part_k[np.sort(first)][:FALLBACK_CAP]
    return out, fired_at, peak_share


def similarity_sets(
    ts: TokenStore, stop_min: int = STOP_MIN, stop_share: float = STOP_SHARE
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The activating and important sets similarity compares: a graph's as they are; a neuron
    without a graph, its top-sequence tokens less the stop tokens (in more than
    max(stop_min, stop_share x neurons) such sets)."""
    without_graph = [n for n, source in enumerate(ts.source) if source != SOURCE_GRAPH and len(ts.activating[n])]
    if not without_graph:
        return ts.activating, ts.important
    counts = np.bincount(np.concatenate([ts.activating[n] for n in without_graph]), minlength=len(ts.keys))
    stop = counts > max(stop_min, int(stop_share * ts.n_neurons))
    if not stop.any():
        return ts.activating, ts.important
    activating = list(ts.activating)
    for n in without_graph:
        activating[n] = activating[n][~stop[activating[n]]]
    return activating, ts.important


def rarity_weights(activating: list[np.ndarray], n_keys: int) -> np.ndarray:
    """Key id -> ln(H / df): df the number of neurons whose activating set holds the key, H the
    number of neurons with a non-empty set (a key every neuron holds weighs 0)."""
    df = np.bincount(np.concatenate(activating) if activating else np.zeros(0, np.int64), minlength=n_keys)
    holders = max(1, sum(1 for a in activating if len(a)))
    return np.log(holders / np.maximum(df, 1))


@dataclass
class Similarity:
    """Every neuron's similar neurons, and the sets and weights they were measured on."""

    lists: list[list[tuple[int, float, str]]]  # global id -> [(other, similarity, measure), ...], most similar first
    activating: list[np.ndarray]
    important: list[np.ndarray]
    weight: np.ndarray  # key id -> rarity weight (rarity_weights)

    def shared(self, i: int, j: int, measure: str, limit: int = SHARED_SHOWN) -> list[int]:
        """The key ids two listed neurons share (for the graph measure, activating or important),
        rarest first: what made them similar."""
        both = np.intersect1d(self.activating[i], self.activating[j])
        if measure == MEASURE_GRAPHS:
            both = np.union1d(both, np.intersect1d(self.important[i], self.important[j]))
        return both[np.lexsort((both, -self.weight[both]))][:limit].tolist()


def similar_neurons(
    ts: TokenStore,
    threshold: float = SIMILARITY_THRESHOLD,
    top: int = SIMILAR_TOP,
    stop_min: int = STOP_MIN,
    stop_share: float = STOP_SHARE,
    token_threshold: float = TOKEN_THRESHOLD,
    min_shared: int = MIN_SHARED,
) -> Similarity:
    """Per global neuron id: up to `top` (other neuron, similarity, measure), most similar first
    (ties: larger overlap first, then neuron order), over similarity_sets(). Two graphs: the
    DeepDecipher formula, kept at >= threshold. Any other pair: the rarity-weighted Jaccard index
    of the activating sets, W(A_i & A_j) / W(A_i | A_j) with W the sum of rarity_weights, kept when
    the sets share at least `min_shared` tokens and it is >= token_threshold."""
    activating, important = similarity_sets(ts, stop_min, stop_share)
    n = ts.n_neurons
    graph = np.array([source == SOURCE_GRAPH for source in ts.source], dtype=bool)
    weight = rarity_weights(activating, len(ts.keys))
    post_a, post_i = _postings(activating), _postings(important)
    size_a = np.array([len(s) for s in activating], dtype=np.int64)
    size_i = np.array([len(s) for s in important], dtype=np.int64)
    weight_a = np.array([weight[s].sum() for s in activating], dtype=np.float64)
    out: list[list[tuple[int, float, str]]] = []
    # Counting the candidates: a dense bincount (O(N) per neuron, ~1 ns per posting) beats sorting
    # them (np.unique) until N is large; above DENSE_LIMIT neurons the sort is used.
    dense = n <= DENSE_LIMIT
    for i in range(n):
        ks = activating[i]
        if not size_a[i] and not size_i[i]:
            out.append([])
            continue
        lists = [post_a[int(k)] for k in ks]
        cand_a = np.concatenate(lists) if lists else np.zeros(0, np.int64)
        cand_i = np.concatenate([post_i[int(k)] for k in important[i]]) if size_i[i] else np.zeros(0, np.int64)
        if dense:
            count_a = np.bincount(cand_a, minlength=n)
            shared_all = count_a + np.bincount(cand_i, minlength=n) if len(cand_i) else count_a
            # the graph measure needs one shared token, the token measure min_shared activating ones
            idx = np.flatnonzero(
                np.where(graph, shared_all > 0, count_a >= min_shared) if graph[i] else count_a >= min_shared
            )
            others, shared, count_a = idx, shared_all[idx], count_a[idx]
        else:
            others, inverse = np.unique(np.concatenate([cand_a, cand_i]), return_inverse=True)
            n_unique = len(others)
            count_a = np.bincount(inverse[: len(cand_a)], minlength=len(others))
            shared = count_a + np.bincount(inverse[len(cand_a) :], minlength=len(others))
            idx = np.flatnonzero(np.where(graph[others] & graph[i], shared > 0, count_a >= min_shared))
            others, shared, count_a = others[idx], shared[idx], count_a[idx]
        mine = others != i
        others, shared, idx = others[mine], shared[mine], idx[mine]
        pair_graph = graph[others] & graph[i]
        sim = np.zeros(len(others))
        if pair_graph.any():
            j = others[pair_graph]
            denom = np.minimum(size_a[i], size_a[j]) + np.minimum(size_i[i], size_i[j])
            sim[pair_graph] = np.where(denom > 0, shared[pair_graph] / np.maximum(denom, 1), 0.0)
        if (~pair_graph).any():
            j = others[~pair_graph]
            cand_w = np.repeat(weight[ks], [len(p) for p in lists])
            if dense:
                common = np.bincount(cand_a, weights=cand_w, minlength=n)[j]
            else:
                common = np.bincount(inverse[: len(cand_a)], weights=cand_w, minlength=n_unique)[idx[~pair_graph]]
            union = weight_a[i] + weight_a[j] - common
            sim[~pair_graph] = np.where(union > 1e-12, common / np.maximum(union, 1e-12), 0.0)
        ok = sim >= np.where(pair_graph, threshold, token_threshold) - 1e-12
        others, sim, shared, pair_graph = others[ok], sim[ok], shared[ok], pair_graph[ok]
        # most similar first, then larger overlap, then lower id: one int64 key, so the top few
        # are picked by a partition instead of sorting thousands of ties
        key = (
            (np.rint(sim * 1e6).astype(np.int64) << 40)
            | (np.minimum(shared, (1 << 20) - 1) << 20)
            | ((1 << 20) - 1 - others)
        )
        if len(key) > top:
            part = np.argpartition(-key, top - 1)[:top]
            others, sim, key, pair_graph = others[part], sim[part], key[part], pair_graph[part]
        order = np.argsort(-key, kind="stable")
        out.append(
            [
                (int(others[j]), round(float(sim[j]), 4), MEASURE_GRAPHS if pair_graph[j] else MEASURE_TOKENS)
                for j in order
            ]
        )
    return Similarity(out, activating, important, weight)


def flat_share(sim: Similarity, neighbours: int = 5) -> float:
    """The fraction of neurons that list `neighbours` or more similar neurons all at 1.00: lists
    that say nothing about which neighbour is closer (a quality figure, tested on real stores)."""
    flat = sum(1 for entries in sim.lists if len(entries) >= neighbours and all(s >= 0.995 for _, s, _ in entries))
    return flat / max(1, len(sim.lists))


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


# Two terms written with a space, not a comma, between them ("any:the any:of"): refused, since the
# second would silently become part of the first's token. Matched on the ASCII-lower-cased term
# (the same in JavaScript); a token may itself start with a space (" the"), so only whitespace
# after some other character counts.
_JOINED = re.compile(r"[^ \t\r\n][ \t\r\n]+(?:any|activating|important):")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

# Terms in one search query. Each distinct term costs up to two file reads (its shard, its "more"
# file), so a query is refused above this many terms rather than read 7,000 times over.
MAX_TERMS = 16


def parse_query(query: str) -> list[tuple[str, str]]:
    """DeepDecipher's search syntax: type:token[,type:token...] with type any, activating or
    important (a bare token means any:token); each token is N2G-normalised. At most MAX_TERMS
    terms as written; repeated terms (after normalisation) are kept once, in first-seen order, as
    AND makes them redundant. Raises ValueError with a message for the user (the search URL's edge
    function writes the same messages, so strings are quoted as JSON, as JavaScript's
    JSON.stringify quotes them)."""
    n = query.count(",") + 1
    if n > MAX_TERMS:
        raise ValueError(
            f"too many terms ({n}) in the query: ask for at most {MAX_TERMS} type:token terms, e.g. any:the,activating:of"
        )
    terms: list[tuple[str, str]] = []
    for raw in query.split(","):
        if not raw.strip():
            raise ValueError(f"empty term in {_quoted(query)}: write type:token, e.g. any:the")
        if _JOINED.search(raw.translate(_ASCII_LOWER)):
            raise ValueError(
                f"two terms in {_quoted(raw)} with no comma between them: join terms with commas, e.g. any:the,any:of"
            )
        kind, sep, token = raw.partition(":")
        if not sep:
            kind, token = "any", raw
        kind = kind.strip().lower()
        if kind not in ("any", "activating", "important"):
            raise ValueError(
                f"unknown type {_quoted(kind)} in {_quoted(raw)}: use any, activating or important, e.g. any:the"
            )
        if token == "":
            raise ValueError(f"no token after {_quoted(kind)}: write {kind}:token")
        term = (kind, g.normalise(token))
        if term not in terms:
            terms.append(term)
    return terms


def token_store(site):
    """Every neuron's activating/important tokens (search and similarity read it), cached per model."""
    return site.cached("neuron2graph.token_store", lambda: build_token_store(site.store, site.first_valid))


def similar(site) -> Similarity:
    """Similar neurons of the whole model, cached per model."""
    return site.cached("neuron2graph.similar", lambda: similar_neurons(token_store(site)))
