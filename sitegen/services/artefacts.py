"""Artefact neurons: neurons whose strongest activations say little about the text, found from
the store's neuroscope top texts alone (no torch; the build and `compute --n2g` share it).

A neuron's evidence is its top texts (one per sequence, strongest first); each text's peak is the
first position of its maximum over the counted positions (BOS excluded), as the neuron page shows
it. Texts whose maximum is <= 0 (the neuron does not fire on them) are left out. Checked in this
order; the first that holds names the neuron's artefact:

- `first-position`: at least half of the texts (and at least 2) peak at the first counted position,
  the first token after BOS. The token there is whatever the cut of the document put there, so the
  neuron tracks the position (an attention-sink effect), not the text.
- `whitespace`: at least half of the texts (and at least 2) peak on one token id whose text is
  whitespace only (a space, a newline): the maximum is set by one formatting token.
- `outlier`: the strongest text's maximum is more than 4 times the next strongest's: one text
  sets the maximum, and no other top text comes near the half of it at which Neuron2Graph counts
  a token as firing, so a graph has one example to learn from.

Everything is exact arithmetic on stored values, so the result is deterministic.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import numpy as np

SHARE = 0.5  # the fraction of a neuron's firing top texts that must peak at one place / one token
OUTLIER_RATIO = 4.0  # strongest text max > OUTLIER_RATIO x every other top text's max
MIN_TEXTS = 2  # fewer firing top texts than this: too little evidence to call anything

FIRST_POSITION, WHITESPACE, OUTLIER = "first-position", "whitespace", "outlier"
REASONS = {  # what the site says about a flagged neuron
    FIRST_POSITION: "peaks on the first token after BOS",
    WHITESPACE: "peaks on one whitespace token",
    OUTLIER: "one outlier text sets its maximum",
}
SHORT = {FIRST_POSITION: "first token", WHITESPACE: "whitespace", OUTLIER: "outlier"}  # the layer table's marker


def whitespace_ids(vocab: list[str]) -> frozenset[int]:
    """Token ids whose text is empty or whitespace only."""
    return frozenset(i for i, t in enumerate(vocab) if not t.strip())


class Artefact(NamedTuple):
    code: str  # FIRST_POSITION, WHITESPACE or OUTLIER
    evidence: str  # the counts behind it, in words (plain text: the site escapes it)


def classify(his: list[float], peaks: list[int], peak_tokens: list[int], first_valid: int, vocab: list[str],
             blank: frozenset[int]) -> Artefact | None:
    """One neuron's artefact (or None) from its top texts' maxima, peak positions and the token ids
    at those peaks (parallel lists, in the stored order)."""
    firing = [i for i, h in enumerate(his) if h > 0]
    n = len(firing)
    if n < MIN_TEXTS:
        return None
    need = SHARE * n
    at_first = sum(peaks[i] == first_valid for i in firing)
    if at_first >= need:
        return Artefact(FIRST_POSITION, f"{at_first} of its {n} firing top texts peak at position {first_valid}")
    # the most common peak token (the smallest id among equally common ones)
    token, count = min(Counter(peak_tokens[i] for i in firing).items(), key=lambda kv: (-kv[1], kv[0]))
    if count >= need and token in blank:
        return Artefact(WHITESPACE, f"{count} of its {n} firing top texts peak on {vocab[token]!r} (token id {token})")
    first, second = sorted((his[i] for i in firing), reverse=True)[:2]
    if first > OUTLIER_RATIO * second:
        return Artefact(OUTLIER, f"its strongest top text peaks at {first:.4g}, more than {OUTLIER_RATIO:g} times the next one ({second:.4g})")
    return None


def layer_artefacts(store, layer: int, vocab: list[str] | None = None, blank: frozenset[int] | None = None) -> list[Artefact | None]:
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
    tokens = [int(seq_tokens[s][p]) if h > 0 else -1 for s, p, h in zip(seqs.tolist(), peaks, his)]
    return [classify(his[a:b], peaks[a:b], tokens[a:b], first_valid, vocab, blank) for a, b in zip(outer[:-1].tolist(), outer[1:].tolist())]
