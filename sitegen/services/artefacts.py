"""Artefact neurons: neurons whose strongest activations say little about the text, found from
the store's neuroscope top texts alone (no torch; the build and `compute --n2g` share it).

A neuron's evidence is its top texts (one per sequence) whose maximum is > 0, at least 2 of them
(else nothing is flagged); each text's peak is the first position of its maximum over the counted
positions (BOS excluded), as the neuron page marks it. Checked in this order; the first that
holds names the neuron's artefact:

- `first-position`: at least half of those texts peak at the first counted position, the first
  token after BOS, on at least 3 different tokens. The token there is wherever the cut of the
  document fell, so the neuron tracks the position (an attention-sink effect), not the text. (A
  neuron whose first-position peaks are one or two tokens, ' of' or ' control', is a token neuron
  that fires most without context: not flagged.)
- `whitespace`: more than half of its 5 strongest texts (the ones that set its maximum) peak on
  one token id whose text is whitespace only (a space, a newline): the maximum is set by a
  formatting token, such as the space before digits.

A maximum set by one outlier text is not flagged: on a small corpus that is mostly a rare,
specific feature (' sense' after ' common'), which a graph shows well.

Everything is exact arithmetic on stored values, so the result is deterministic.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import numpy as np

from sitegen.errors import StoreError

HANDFUL = 5  # the strongest firing top texts, the ones that set the neuron's maximum
MIN_TEXTS = 2  # fewer firing top texts than this: too little evidence to call anything
MIN_FIRST_TOKENS = 3  # distinct tokens among the first-position peaks: fewer is a token neuron, not a position one

FIRST_POSITION, WHITESPACE = "first-position", "whitespace"
REASONS = {  # what the site says about a flagged neuron
    FIRST_POSITION: "peaks on the first token after BOS",
    WHITESPACE: "peaks on one whitespace token",
}
SHORT = {FIRST_POSITION: "first token", WHITESPACE: "whitespace"}  # the layer table's marker


def whitespace_ids(vocab: list[str]) -> frozenset[int]:
    """Token ids whose text is empty or whitespace only."""
    return frozenset(i for i, t in enumerate(vocab) if not t.strip())


class Artefact(NamedTuple):
    code: str  # FIRST_POSITION or WHITESPACE
    evidence: str  # the counts behind it, in words (plain text: the site escapes it)


def classify(
    his: list[float],
    peaks: list[int],
    peak_tokens: list[int],
    first_valid: int,
    vocab: list[str],
    blank: frozenset[int],
) -> Artefact | None:
    """One neuron's artefact (or None) from its top texts' maxima, peak positions and the token ids
    at those peaks (parallel lists, in the stored order)."""
    firing = [i for i, h in enumerate(his) if h > 0]
    n = len(firing)
    if n < MIN_TEXTS:
        return None
    at_first = [i for i in firing if peaks[i] == first_valid]
    distinct = len({peak_tokens[i] for i in at_first})
    if 2 * len(at_first) >= n and distinct >= MIN_FIRST_TOKENS:
        return Artefact(
            FIRST_POSITION,
            f"{len(at_first)} of its {n} firing top texts peak at position {first_valid}, "
            f"on {distinct} different tokens",
        )
    strongest = sorted(firing, key=lambda i: (-his[i], i))[:HANDFUL]  # ties: the stored order
    # the most common peak token among them (the smallest id among equally common ones)
    token, count = min(Counter(peak_tokens[i] for i in strongest).items(), key=lambda kv: (-kv[1], kv[0]))
    if 2 * count > len(strongest) and token in blank:
        return Artefact(
            WHITESPACE,
            f"{count} of its {len(strongest)} strongest top texts peak on {vocab[token]!r}, token id {token}",
        )
    return None


def layer_artefacts(
    store, layer: int, vocab: list[str] | None = None, blank: frozenset[int] | None = None
) -> list[Artefact | None]:
    """Every neuron's artefact (or None) in one layer, in neuron order, from the neuroscope table,
    the stored sequences' token ids and the vocabulary (`blank`: whitespace_ids(vocab), if known)."""
    if vocab is None:
        vocab = store.vocab()
    if blank is None:
        blank = whitespace_ids(vocab)
    first_valid = int(store.manifest["config"]["first_valid_position"])
    t = store.read_layer("neuroscope", layer, columns=["top_seq", "top_acts"])
    seq_tokens = store.sequence_tokens()
    acts = t.column("top_acts").combine_chunks()
    outer = np.asarray(acts.offsets)  # texts of neuron n: outer[n]:outer[n+1]
    inner = np.asarray(acts.values.offsets)  # values of text j: inner[j]:inner[j+1]
    values = np.asarray(acts.values.values.to_numpy(zero_copy_only=False), dtype=np.float64)
    seqs = t.column("top_seq").combine_chunks().values.to_numpy()
    # each text's max over its counted positions and the first position of it, for the whole layer
    # at once (numpy over the flattened texts; the appended -inf keeps every reduceat start in range)
    lengths = np.diff(inner)
    position = np.arange(len(values)) - np.repeat(inner[:-1], lengths)
    counted = np.append(np.where(position >= first_valid, values, -np.inf), -np.inf)
    starts = inner[:-1]
    hi = np.maximum.reduceat(counted, starts) if len(starts) else np.zeros(0)
    hi[lengths <= first_valid] = -np.inf  # no counted position (reduceat gave a neighbour's value): no evidence
    last = np.iinfo(np.int64).max
    hit = np.append(np.where(counted[:-1] == np.repeat(hi, lengths), position, last), last)
    peak = np.minimum.reduceat(hit, starts) if len(starts) else np.zeros(0, np.int64)
    his, peaks = hi.tolist(), peak.tolist()
    try:
        tokens = [int(seq_tokens[s][p]) if h > 0 else -1 for s, p, h in zip(seqs.tolist(), peaks, his)]
    except KeyError as e:
        raise StoreError(
            f"{store.root}: sequence {e.args[0]} is referenced but missing from sequences.parquet; recompute the store"
        ) from None
    return [
        classify(his[a:b], peaks[a:b], tokens[a:b], first_valid, vocab, blank)
        for a, b in zip(outer[:-1].tolist(), outer[1:].tolist())
    ]
