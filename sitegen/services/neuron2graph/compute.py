"""Neuron2Graph's model-dependent half (torch), batched per layer: prune, saliency, augmentation,
then lines -> trie -> held-out evaluation (graph.py). Follows the reference implementation
(Foote et al. 2023, arXiv 2305.19911).

Batching: every prompt of every selected neuron of a layer is collected per stage, identical
prompts are run once (one pass gives every neuron of the layer), prompts are packed by length into
right-padded batches (causal: padding after a prompt cannot change its positions), and each
forward pass stops right after the layer's MLP hook.

    stage 1    prune       candidates [BOS] + tokens[p-k+1..p] (k tokens, the peak included) for
               (_prune)    k = 5, 10, ..., 30 (and the whole prefix when shorter)
    stages 2-3 saliency    each pruned prompt, then one copy per position with that token masked
               (_groups)
    stages 4-5 augment     variants replacing each important token by its embedding neighbours,
               (_groups)   then the masked copies of those that still fire (saliency of the variant)
    then       lines, trie with IGNORE merging, evaluation on the held-out texts (CPU; _graph)

build_layer runs the stages for one layer; the records between them (PruneCase, Run, Saliency,
Group, Variant, Graph) are defined below.

Replacement tokens (the reference uses DistilBERT, which cannot be downloaded here) are the token's
nearest neighbours by cosine similarity in the studied model's own input embedding matrix: offline,
deterministic, in the model's own vocabulary, and free (no extra forward pass). Neighbours that
normalise to the same trie key (' The' for 'the') are skipped, since they would add nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple

import numpy as np
import pyarrow as pa

from sitegen.services.neuron2graph import graph as g
from sitegen.services.neuron2graph.data import GRAPH_SCHEMA
from sitegen.services.neuron2graph.provenance import (
    split as _split,
)  # the page's Provenance section shows the same split
from sitegen.services.selection import select_neurons

SERVICE = "neuron2graph"

PRUNE_STEPS = (5, 10, 15, 20, 25, 30)
PRUNE_DROP = -0.5  # accept a truncation when (trunc_max - m) / m > PRUNE_DROP
APPEND_TOKENS = 5  # tokens kept after the max token, within its sentence
IMPORTANT_FOR_AUGMENT = 0.8
IMPORTANT_FOR_LINE = 0.75
ACTIVATING_FOR_LINE = 0.5
SENTENCE_END = (".", "!", "\n")


@dataclass
class N2GConfig:
    texts: int = 20  # top texts per neuron, split 50/50 into train and held-out test
    replacements: int = 5  # variants per important token
    max_augmented: int = 3  # important tokens augmented per prompt (the strongest first); bounds CPU cost
    seed: int = 0
    token_budget: int = 4096  # padded tokens per forward batch
    # True: the plain path (one batch per budget's worth of prompts, no reuse across stages, every
    # firing variant's saliency run); the reference the fast path's graphs are tested against
    reference: bool = False


@dataclass
class Prompt:
    """A model input and where its interesting positions are."""

    tokens: tuple[int, ...]
    max_pos: int  # position of the text's max token inside the prompt


@dataclass
class NeuronWork:
    neuron: int
    base_max: float
    train: list[tuple[np.ndarray, np.ndarray]]  # (token ids, activations) with BOS at 0
    test: list[tuple[np.ndarray, np.ndarray]]
    pruned: list[tuple[Prompt, float]] = field(default_factory=list)  # (prompt, scale)
    lines: list[tuple[list[tuple[str, float, float]], float]] = field(default_factory=list)


class PruneCase(NamedTuple):
    """Stage 1: one train text being pruned to a short prompt around its peak."""

    work: NeuronWork
    tokens: np.ndarray  # the whole text
    peak: int  # position of the text's max activation
    peak_act: float
    candidates: list[tuple[int, ...]]  # prune_candidates, shortest first


class Run(NamedTuple):
    """A prompt run for its neuron (stage 2: a pruned prompt, stage 4: a variant)."""

    work: NeuronWork
    tokens: tuple[int, ...]
    acts: np.ndarray  # the neuron's raw activation at every position
    norm: np.ndarray  # acts scaled to the unpruned text, over the neuron's base max, 3 places
    upto: int  # the last position its saliency needs (masked copies are cut after it)


class Saliency(NamedTuple):
    """What a prompt's lines are made of (group_lines)."""

    tokens: tuple[int, ...]
    norm: np.ndarray
    importance: np.ndarray  # importance[k, j]: how much masking position k lowers position j


@dataclass
class Group:
    """One pruned prompt and its augmentation: its lines come first, then its variants' (stage 5)."""

    work: NeuronWork
    scale: float  # pruned prompt -> unpruned text activation scale, shared by the variants
    original: Saliency
    variants: list[Saliency] = field(default_factory=list)


class Variant(NamedTuple):
    """Stage 3: a pruned prompt with one important token replaced by an embedding neighbour."""

    group: Group
    tokens: tuple[int, ...]
    at: int  # the replaced position: before it the variant is the pruned prompt


class Graph(NamedTuple):
    """One neuron's finished graph: a row of the service's table (graphs_table)."""

    work: NeuronWork
    trie: g.Trie
    evaluation: dict | None  # graph.evaluate on the held-out texts; None without any


# What one forward call costs beyond its tokens, in tokens: SmolLM2 on 2 CPU cores runs a call of n
# tokens in about (n + 200) token-times at any depth (the model's per-module work), so a batch is
# worth splitting only where that saves more padding than this.
CALL_OVERHEAD_TOKENS = 192


class LayerForward:
    """Runs prompts through the model up to one layer's MLP hook; identical prompts run once (and,
    unless `reference`, once per layer: a prompt asked for again in a later stage is not rerun)."""

    def __init__(self, model, layer: int, token_budget: int, pad_id: int, reference: bool = False):
        self.model, self.layer, self.token_budget, self.pad_id = model, layer, token_budget, pad_id
        self.reference = reference
        self.tokens_run = 0  # model-input tokens actually run (padding included)
        self.calls = 0  # forward calls
        self.skipped = 0  # variant saliency passes skipped (_groups: firing only before the replacement)
        self.reused = 0  # requests answered from an earlier stage's pass
        self.done: dict[tuple[tuple[int, ...], int], np.ndarray] = {}  # (prompt, neuron) -> activations

    def run(self, requests: list[tuple[tuple[int, ...], int]]) -> list[np.ndarray]:
        """requests: (prompt tokens, neuron) -> that neuron's activation at every prompt position."""
        wanted: dict[tuple[int, ...], set[int]] = {}
        for tokens, neuron in requests:
            if (tokens, neuron) in self.done:
                self.reused += 1
            else:
                wanted.setdefault(tokens, set()).add(neuron)
        unique = sorted(wanted, key=lambda t: (len(t), t))  # similar lengths share a batch: little padding
        found = {} if self.reference else self.done  # the reference path keeps nothing between calls
        spans = _greedy_batches if self.reference else _batches
        for start, stop in spans([len(t) for t in unique], self.token_budget):
            batch = unique[start:stop]
            longest = len(batch[-1])
            ids = np.full((len(batch), longest), self.pad_id, dtype=np.int64)
            for row, tokens in enumerate(batch):
                ids[row, : len(tokens)] = tokens
            captured: list = []
            self.model.run_mlp_activations(ids, [self.layer], lambda layer, acts: captured.append(acts))
            self.tokens_run += ids.size
            self.calls += 1
            acts = captured[0]
            for row, tokens in enumerate(batch):
                cols = sorted(wanted[tokens])
                values = acts[row, : len(tokens), cols].float().cpu().numpy()
                for j, neuron in enumerate(cols):
                    found[(tokens, neuron)] = values[:, j]
        return [found[(tokens, neuron)] for tokens, neuron in requests]


def _greedy_batches(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """(start, stop) spans of prompts sorted by length: each batch as many prompts as fit in the
    budget once padded to its longest (a longer prompt alone)."""
    spans, start = [], 0
    while start < len(lengths):
        stop = start
        while stop < len(lengths) and (stop - start + 1) * lengths[stop] <= max(budget, lengths[stop]):
            stop += 1
        spans.append((start, stop))
        start = stop
    return spans


def _batches(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """(start, stop) spans of prompts sorted by length that minimise the padded tokens plus
    CALL_OVERHEAD_TOKENS per batch, each within the budget (a longer prompt alone): a shortest path
    over the split points. Right padding changes no prompt position (causal), so any split is
    exact; this one only costs least."""
    n = len(lengths)
    cost = np.full(n + 1, np.inf)
    cost[0] = 0.0
    back = np.zeros(n + 1, dtype=np.int64)
    for stop in range(1, n + 1):
        width = lengths[stop - 1]  # sorted: the batch's last prompt is its longest
        first = max(0, stop - max(1, budget // width))
        starts = np.arange(first, stop)
        total = cost[first:stop] + CALL_OVERHEAD_TOKENS + (stop - starts) * width
        best = int(np.argmin(total))
        cost[stop], back[stop] = total[best], first + best
    spans, stop = [], n
    while stop > 0:
        spans.append((int(back[stop]), stop))
        stop = int(back[stop])
    return spans[::-1]


def masked_copies(tokens: tuple[int, ...], upto: int, neutral: int, first: int = 1) -> list[tuple[int, ...]]:
    """One copy per position first <= k <= upto with token k replaced by the neutral token (first =
    1 skips the BOS; a model without BOS has a real token at 0, masked too), cut after position
    upto: in a causal model masking k changes nothing before k. upto is at least the last position
    whose line is made (and the max token), so no value read afterwards lies past the cut (see
    `group_lines`: only firing positions are read)."""
    head = tokens[: upto + 1]
    return [head[:k] + (neutral,) + head[k + 1 :] for k in range(first, upto + 1)]


def importance(base: np.ndarray, masked: list[np.ndarray], first: int = 1) -> np.ndarray:
    """I[k, j] = 1 - A_k[j] / A[j]: how much masking position k lowers the activation at j (base =
    the unmasked prompt, masked[k - first] = masked_copies' row for k). Rows before `first` (the
    BOS) stay 0, as do pairs past the masked rows' length. 0 where A[j] <= 0: only firing
    positions are read."""
    t = len(base)
    imp = np.zeros((t, t), dtype=np.float64)
    for k, row in enumerate(masked, start=first):
        b = base[: len(row)]
        imp[k, : len(row)] = np.where(b > 0, 1.0 - row / np.where(b > 0, b, 1.0), 0.0)
    return imp


def _last_firing(norm: np.ndarray, first: int) -> int:
    """Last position whose normalised activation makes a line (-1 when none)."""
    hits = np.nonzero(norm[first:] > ACTIVATING_FOR_LINE)[0]
    return first + int(hits[-1]) if len(hits) else -1


def prune_candidates(tokens: np.ndarray, p: int, bos: int | None) -> list[tuple[int, ...]]:
    """The last k tokens up to and including the peak p, tokens[p-k+1 .. p], for k in PRUNE_STEPS,
    shortest first, each with BOS prepended; the whole prefix (and no longer k) once k reaches it."""
    first = 1 if bos is not None else 0
    head = (bos,) if bos is not None else ()
    out = []
    for k in PRUNE_STEPS:
        start = p - k + 1
        if start <= first:
            out.append(head + tuple(int(x) for x in tokens[first : p + 1]))
            break
        out.append(head + tuple(int(x) for x in tokens[start : p + 1]))
    return out


def sentence_tail(tokens: np.ndarray, p: int, vocab: list[str]) -> tuple[int, ...]:
    """Up to APPEND_TOKENS tokens after p in the same sentence (a sentence ends after a token
    containing '.', '!' or a newline)."""
    out: list[int] = []
    q = p + 1
    while q < len(tokens) and len(out) < APPEND_TOKENS:
        if any(c in vocab[int(tokens[q - 1])] for c in SENTENCE_END):
            break
        out.append(int(tokens[q]))
        q += 1
    return tuple(out)


class Neighbours:
    """Replacement tokens: nearest neighbours in the input embedding matrix (cosine), cached."""

    def __init__(self, embed: np.ndarray, vocab: list[str], special: set[int]):
        norms = np.linalg.norm(embed, axis=1, keepdims=True)
        self.unit = embed / np.where(norms > 0, norms, 1.0)
        self.vocab, self.special, self.cache = vocab, special, {}

    def of(self, token: int, n: int) -> list[int]:
        if token not in self.cache:
            sims = self.unit @ self.unit[token]
            order = np.argsort(-sims, kind="stable")
            key = g.normalise(self.vocab[token])
            picked: list[int] = []
            for cand in order[: 64 + n]:
                cand = int(cand)
                if (
                    cand == token
                    or cand in self.special
                    or g.normalise(self.vocab[cand]) == key
                    or not self.vocab[cand].strip()
                ):
                    continue
                picked.append(cand)
                if len(picked) == n:
                    break
            self.cache[token] = picked
        return self.cache[token]


def important_sets(norm_acts: np.ndarray, imp: np.ndarray, first: int) -> list[set[int]]:
    """The original prompt's important_index_sets: for each firing position i (normalised
    activation > 0.5), the context positions k with I[k, i] > 0.75 (i itself included when so);
    empty for positions that do not fire (the reference builds them while making lines)."""
    sets: list[set[int]] = []
    for i in range(len(norm_acts)):
        if i >= first and norm_acts[i] > ACTIVATING_FOR_LINE:
            sets.append({k for k in range(first, i + 1) if imp[k, i] > IMPORTANT_FOR_LINE})
        else:
            sets.append(set())
    return sets


def make_lines(
    vocab: list[str],
    tokens: tuple[int, ...],
    norm_acts: np.ndarray,
    imp: np.ndarray,
    orig_sets: list[set[int]] | None,
    first: int,
) -> list[tuple[list[tuple[str, float, float]], float]]:
    """Step 4: one line per firing position of a prompt, each element (token or IGNORE, importance
    for i, the token's own normalised activation). orig_sets: the original prompt's important
    sets (None for the original itself); a variant longer than the original uses the last set."""
    lines = []
    for i in range(first, len(tokens)):
        act = float(norm_acts[i])
        if act <= ACTIVATING_FOR_LINE:
            continue
        allowed = set() if not orig_sets else orig_sets[i] if i < len(orig_sets) else orig_sets[-1]
        line: list[tuple[str, float, float]] = []
        last_kept = 0
        for k in range(i, first - 1, -1):
            # + 0.0 stores a zero as +0.0: masking a token that does not matter gives I ~ +-1e-9,
            # whose sign is rounding noise of how the prompts were batched, not a property of the text
            value, own = round(float(imp[k, i]), 3) + 0.0, float(norm_acts[k])
            if k == i:
                line.append((vocab[tokens[k]], act, own))
                last_kept = len(line)
            elif imp[k, i] > IMPORTANT_FOR_LINE or k in allowed:
                line.append((vocab[tokens[k]], value, own))
                last_kept = len(line)
            else:
                line.append((g.IGNORE, value, own))
        lines.append((line[:last_kept], act))
    return lines


def group_lines(
    vocab: list[str], original: Saliency, variants: list[Saliency], first: int
) -> list[tuple[list[tuple[str, float, float]], float]]:
    """The lines of one pruned prompt's group in the reference's order: the original's, then each
    variant's (which keep context that was important in the original). original and each variant:
    a Saliency, or any (tokens, normalised activations, importance matrix) triple."""
    tokens, norm, imp = original
    sets = important_sets(norm, imp, first)
    lines = make_lines(vocab, tokens, norm, imp, None, first)
    for v_tokens, v_norm, v_imp in variants:
        lines.extend(make_lines(vocab, v_tokens, v_norm, v_imp, sets, first))
    return lines


@dataclass
class ModelTokens:
    """What every layer's graphs need from the model's vocabulary, prepared once per run."""

    vocab: list[str]
    bos: int | None
    neutral: int  # the masking token
    special: set[int]
    neighbours: Neighbours

    @classmethod
    def prepare(cls, model, store) -> "ModelTokens":
        vocab = store.vocab()
        tokenizer = model.tokenizer
        special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
        embed = model.input_embeddings().float().cpu().numpy()
        return cls(vocab, model.bos, neutral_token(tokenizer), special, Neighbours(embed[: len(vocab)], vocab, special))


def _normalised(work: NeuronWork, acts: np.ndarray, scale: float) -> np.ndarray:
    return np.round(acts * scale / work.base_max, 3)


def _neuron_work(store, layer: int, neurons: Iterable[int], cfg: N2GConfig, first: int) -> list[NeuronWork]:
    """Each neuron's top texts split into train and held-out test; neurons that never fire on them have none."""
    table = store.read_layer("neuroscope", layer, columns=["neuron", "top_seq", "top_acts"]).to_pydict()
    seq_tokens = store.sequence_tokens()
    work: list[NeuronWork] = []
    for n in sorted({int(n) for n in neurons}):
        seqs = table["top_seq"][n][: cfg.texts]
        acts = [np.asarray(a, dtype=np.float32) for a in table["top_acts"][n][: cfg.texts]]
        texts = [(seq_tokens[s], a) for s, a in zip(seqs, acts) if len(a) > first]
        base = max((float(a[first:].max()) for _, a in texts), default=0.0)
        if base <= 0 or len(texts) < 2:
            continue  # never positive on its top texts: nothing to normalise by, no graph
        train_i, test_i = _split(len(texts), cfg.seed, layer, n)
        # a train text whose maximum is <= 0 has no peak to prune to (and would divide by it, or flip
        # the scale's sign): dropped, as DeepDecipher's fork does; held-out texts all stay
        train = [texts[i] for i in train_i if float(texts[i][1][first:].max()) > 0]
        work.append(NeuronWork(n, base, train, [texts[i] for i in test_i]))
    return work


def _prune(fwd: LayerForward, work: list[NeuronWork], mt: ModelTokens, first: int) -> None:
    """Stage 1: each train text's pruned prompt (with its scale) into its neuron's `pruned`. The
    candidates run shortest first: each round runs the next candidate only for the texts whose
    shorter candidates all failed (most texts settle early)."""
    cases = []
    for w in work:
        for tokens, acts in w.train:
            p = first + int(np.argmax(acts[first:]))
            cases.append(PruneCase(w, tokens, p, float(acts[p]), prune_candidates(tokens, p, mt.bos)))
    chosen: dict[int, tuple[tuple[int, ...], float]] = {}  # case index -> (candidate, its max activation)
    for step in range(len(PRUNE_STEPS)):
        live = [(i, c) for i, c in enumerate(cases) if i not in chosen and step < len(c.candidates)]
        if not live:
            break
        results = fwd.run([(c.candidates[step], c.work.neuron) for _, c in live])
        for (i, c), acts in zip(live, results):
            body, m = acts[first:], c.peak_act
            passed = len(body) and int(np.argmax(body)) == len(body) - 1 and (float(body[-1]) - m) / m > PRUNE_DROP
            if passed or step == len(c.candidates) - 1:  # else the longest candidate
                chosen[i] = (c.candidates[step], float(body[-1]) if passed else float(body.max()) if len(body) else m)
    for i, c in enumerate(cases):
        cand, trunc_max = chosen[i]
        scale = c.peak_act / trunc_max if trunc_max > 0 else 1.0
        c.work.pruned.append((Prompt(cand + sentence_tail(c.tokens, c.peak, mt.vocab), len(cand) - 1), scale))


def _importances(fwd: LayerForward, runs: list[Run], neutral: int, first: int) -> list[np.ndarray]:
    """Stages 3 and 5: each run's importance matrix, from one batched pass over all their masked copies."""
    requests, spans = [], []
    for r in runs:
        rows = masked_copies(r.tokens, r.upto, neutral, first)
        spans.append((len(requests), len(rows)))
        requests.extend((row, r.work.neuron) for row in rows)
    results = fwd.run(requests)
    return [importance(r.acts, results[at : at + count], first) for r, (at, count) in zip(runs, spans)]


def _groups(fwd: LayerForward, work: list[NeuronWork], mt: ModelTokens, cfg: N2GConfig, first: int) -> list[Group]:
    """Stages 2 to 5: every pruned prompt (in train order) with its saliency, and the saliency of
    its augmented variants that still fire."""
    # stage 2: the pruned prompts themselves (which positions fire)
    pruned = [(w, prompt, scale) for w in work for prompt, scale in w.pruned]
    runs = []
    for (w, prompt, scale), acts in zip(pruned, fwd.run([(prompt.tokens, w.neuron) for w, prompt, _ in pruned])):
        norm = _normalised(w, acts, scale)
        runs.append(Run(w, prompt.tokens, acts, norm, max(prompt.max_pos, _last_firing(norm, first))))

    # stage 3: saliency of the pruned prompts, masked up to the max token or the last firing
    # position (group_lines reads no importance past it); variants of their important tokens
    groups: list[Group] = []
    variants: list[Variant] = []
    for (w, prompt, scale), run, imp in zip(pruned, runs, _importances(fwd, runs, mt.neutral, first)):
        group = Group(w, scale, Saliency(prompt.tokens, run.norm, imp))
        groups.append(group)
        p = prompt.max_pos
        important = [
            k for k in range(first, p + 1) if imp[k, p] >= IMPORTANT_FOR_AUGMENT and prompt.tokens[k] not in mt.special
        ]
        important.sort(key=lambda k: (-imp[k, p], k))
        for k in important[: cfg.max_augmented]:
            for rep in mt.neighbours.of(prompt.tokens[k], cfg.replacements):
                variants.append(Variant(group, prompt.tokens[:k] + (rep,) + prompt.tokens[k + 1 :], k))

    # stage 4: augmentation: the variants; those where nothing fires any more (the informative
    # negatives) add no line, so only the others need stage 5
    firing: list[tuple[Group, Run | Saliency]] = []
    for v, acts in zip(variants, fwd.run([(v.tokens, v.group.work.neuron) for v in variants])):
        norm = _normalised(v.group.work, acts, v.group.scale)
        upto = _last_firing(norm, first)
        if upto >= 0 and upto < v.at and not cfg.reference:
            # fires only before its replaced position: there the variant and every masked copy of
            # it read the same tokens as the pruned prompt and its copies (causal), so I[k, i] for
            # k <= i <= upto (all its lines read) is the pruned prompt's: no pass of its own
            firing.append((v.group, Saliency(v.tokens, norm, v.group.original.importance)))
            fwd.skipped += 1
        elif upto >= 0:
            firing.append((v.group, Run(v.group.work, v.tokens, acts, norm, upto)))

    # stage 5: saliency of the variants that still fire (in stage-4 order: the lines' order)
    runs = [r for _, r in firing if isinstance(r, Run)]
    computed = iter(_importances(fwd, runs, mt.neutral, first))
    for group, r in firing:
        group.variants.append(r if isinstance(r, Saliency) else Saliency(r.tokens, r.norm, next(computed)))
    return groups


def _graph(w: NeuronWork, vocab: list[str], first: int) -> Graph:
    """The neuron's trie from its lines, evaluated on its held-out texts."""
    trie = g.Trie()
    for line, act in w.lines:
        trie.insert(line, act)
    trie.merge_ignore()
    texts = [
        (trie.predict([vocab[int(t)] for t in tokens[first:]]), (acts[first:] / w.base_max).tolist())
        for tokens, acts in w.test
    ]
    return Graph(w, trie, g.evaluate_texts(texts) if any(real for _, real in texts) else None)


def build_layer(
    model,
    store,
    layer: int,
    neurons: Iterable[int],
    cfg: N2GConfig,
    mt: ModelTokens,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[pa.Table, int]:
    """Graphs for the given neurons of one layer, as the service's table, plus tokens run."""
    first = 1 if mt.bos is not None else 0
    work = _neuron_work(store, layer, neurons, cfg, first)
    fwd = LayerForward(model, layer, cfg.token_budget, pad_id=mt.neutral, reference=cfg.reference)
    _prune(fwd, work, mt, first)
    # lines in the reference's insertion order (each prompt, then its variants): the trie keeps
    # the first insertion's values, so the order decides END values
    for group in _groups(fwd, work, mt, cfg, first):
        group.work.lines.extend(group_lines(mt.vocab, group.original, group.variants, first))
    graphs = [_graph(w, mt.vocab, first) for w in work]
    log(
        f"layer {layer}: {len(graphs)} graphs, {fwd.tokens_run} tokens run in {fwd.calls} forward calls, "
        f"{fwd.reused} prompts reused from an earlier stage, {fwd.skipped} variant saliency passes skipped"
    )
    return graphs_table(graphs), fwd.tokens_run


def graphs_table(rows: Iterable[Graph]) -> pa.Table:
    """One row per graph: its nodes breadth-first with parent indices (-1 for the trie's first
    tokens), each filed activating or not by its own activation, its token sets (for search and
    similarity, as the reference files them) and its held-out evaluation."""
    out: dict[str, list] = {name: [] for name in GRAPH_SCHEMA.names}
    for w, trie, ev in rows:
        nodes, index = [], {}
        for parent, node in _walk(trie):
            index[id(node)] = len(nodes)
            nodes.append(
                {
                    "token": node.token,
                    "depth": node.depth,
                    "value": float(node.value),
                    "end": None if node.end is None else float(node.end),
                    "parent": -1 if parent is None else index[id(parent)],
                    "activation": float(node.activation),
                    "activating": node.activating,
                }
            )
        out["neuron"].append(w.neuron)
        out["base_max_act"].append(w.base_max)
        out["nodes"].append(nodes)
        activating, important = trie.token_sets()
        out["activating"].append(sorted(activating))
        out["important"].append(sorted(important))
        for key in ("precision", "recall", "f1", "variance_explained"):
            out[key].append(None if ev is None else ev[key])
        out["f1_ci"].append(None if ev is None else ev.get("f1_ci"))
        out["n_train"].append(len(w.train))
        out["n_test"].append(len(w.test))
        out["n_lines"].append(len(w.lines))
    return pa.table(out, schema=GRAPH_SCHEMA)


def _walk(trie: g.Trie):
    """Breadth first from the activating tokens, children in key order (deterministic)."""
    queue = [(None, trie.root.children[k]) for k in sorted(trie.root.children)]
    while queue:
        nxt = []
        for parent, node in queue:
            yield parent, node
            nxt.extend((node, node.children[k]) for k in sorted(node.children))
        queue = nxt


def neutral_token(tokenizer) -> int:
    """The masking token for saliency: the single-space token when there is one (neutral text),
    else id 0. The reference uses id 1, which for many tokenizers (SmolLM2's included) is a special token."""
    ids = tokenizer.encode(" ", add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 else 0


def run_n2g(
    model, store, spec: str, cfg: N2GConfig, log: Callable[[str], None] = print, progress: bool = False
) -> dict:
    """Compute the selected graphs layer by layer into store/neuron2graph/, skipping neurons whose
    graph is already there (so an interrupted run resumes per layer). Returns cost figures.
    `progress` shows a bar over every graph still to make (done/total and an ETA, updated per layer)."""
    import torch
    from tqdm.auto import tqdm

    manifest = store.manifest
    n_layers, d_mlp = manifest["model"]["num_layers"], manifest["model"]["layer_size"]
    selection = select_neurons(spec, n_layers, d_mlp, store, skip_artefacts=True)
    mt = ModelTokens.prepare(model, store)
    totals = {"graphs": 0, "tokens_run": 0, "seconds": 0.0}
    torch.manual_seed(cfg.seed)
    n2g_record = {
        "texts": cfg.texts,
        "replacements": cfg.replacements,
        "max_augmented": cfg.max_augmented,
        "seed": cfg.seed,
        "replacement_source": "input-embedding nearest neighbours",
        "neutral_token_id": mt.neutral,
        "thresholds": {
            "prune_drop": PRUNE_DROP,
            "append_tokens": APPEND_TOKENS,
            "important_for_augment": IMPORTANT_FOR_AUGMENT,
            "important_for_line": IMPORTANT_FOR_LINE,
            "activating_for_line": ACTIVATING_FOR_LINE,
            "firing": g.FIRING,
        },
    }
    plan = []  # (layer, neurons to graph, the layer's table as it stands): known up front, so the bar has a total
    for layer, neurons in selection.items():
        path = store.layer_path(SERVICE, layer)
        old = store.read_layer(SERVICE, layer) if path.exists() else None
        if old is not None and not old.schema.equals(GRAPH_SCHEMA):
            # graphs from an older sitegen (nodes without their own activation) were filed and
            # evaluated differently: recomputed with this layer's selection rather than mixed in
            log(f"layer {layer}: recomputing {old.num_rows} graphs written by an older sitegen")
            neurons = sorted(set(neurons) | set(old.column("neuron").to_pylist()))
            old = None
        have = set(old.column("neuron").to_pylist()) if old is not None else set()
        todo = [n for n in neurons if n not in have]
        if todo:
            plan.append((layer, todo, old is not None))
    bar = tqdm(
        total=sum(len(todo) for _, todo, _ in plan),
        unit="graph",
        desc="neuron2graph graphs",
        disable=not progress,
        smoothing=0.3,
    )
    try:
        for layer, todo, extend in plan:
            start = time.perf_counter()
            table, tokens_run = build_layer(model, store, layer, todo, cfg, mt, log)
            if extend:
                table = pa.concat_tables([store.read_layer(SERVICE, layer), table]).sort_by("neuron")
            store.write_layer(SERVICE, layer, table)
            store.add_service(
                SERVICE, n2g_record
            )  # after every layer: an interrupted run's finished layers are part of the store
            totals["graphs"] += len(todo)
            totals["tokens_run"] += tokens_run
            totals["seconds"] += time.perf_counter() - start
            bar.update(len(todo))
    finally:
        bar.close()
    return totals
