"""Neuron2Graph's graph core (Foote et al. 2023), after the reference implementation
(arXiv 2305.19911):
token normalisation, the trie built from activation 'lines' with IGNORE merging, prediction by
walking backwards without backtracking, and the held-out evaluation (with a bootstrap interval
of F1 over the held-out texts, numpy). No torch:
the model-dependent steps (prune, saliency, augment) produce the lines this module consumes.

A line starts at the activating token and walks backwards through its context; every element
carries the token, its importance for position i and its own normalised activation:
    [(token_i, I[i, i], a_i), (token_{i-1} | IGNORE, I[i-1, i], a_{i-1}), ...]  ending with END = a_i
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from sitegen.services import bootstrap

IGNORE = "<IGNORE>"
FIRING = 0.5  # normalised activation at which a neuron counts as firing (evaluation: >=)
ACTIVATING = 0.5  # a node whose own normalised activation is above this is an 'activating' token


def normalise(token: str) -> str:
    """N2G's token key: lower-case a Title-case token longer than one character; strip
    whitespace from a token longer than one character that contains a letter."""
    if len(token) > 1 and token.istitle():
        token = token.lower()
    if len(token) > 1 and any(c.isalpha() for c in token):
        token = token.strip()
    return token


@dataclass
class Node:
    token: str
    depth: int
    value: float  # activation for the activating token (depth 0), importance for context tokens
    activation: float  # the token's own normalised activation where it was first inserted
    end: float | None = None  # activation recorded by a line ending here (N2G's END child)
    children: dict[str, "Node"] = field(default_factory=dict)

    @property
    def activating(self) -> bool:
        """N2G files a node by its own activation, whatever its depth: a context token that itself
        fires is 'activating' too (the reference's `activator` flag). The wildcard is neither."""
        return self.token != IGNORE and self.activation > ACTIVATING


def _copy_into(target: Node, source: Node) -> None:
    """Merge source's sub-paths under target; existing nodes keep their (first) values."""
    for key, child in source.children.items():
        mine = target.children.get(key)
        if mine is None:
            mine = target.children[key] = Node(child.token, target.depth + 1, child.value, child.activation, child.end)
        elif mine.end is None and child.end is not None:
            mine.end = child.end
        _copy_into(mine, child)


class Trie:
    def __init__(self) -> None:
        self.root = Node("", -1, 0.0, 0.0)

    def insert(self, line: Sequence[tuple[str, float, float]], activation: float) -> None:
        """Add one line of (token, value, own activation), activating token first, then context
        walking backwards (IGNORE allowed); `activation` is the END value."""
        node = self.root
        for token, value, own in line:
            key = token if token == IGNORE else normalise(token)
            child = node.children.get(key)
            if child is None:  # the first insertion's values are kept
                child = node.children[key] = Node(key, node.depth + 1, value, own)
            node = child
        if node.end is None:
            node.end = activation

    def merge_ignore(self) -> None:
        """Breadth first: where a node has an IGNORE child, copy every sibling's sub-paths under it
        (IGNORE also matches the sibling's token) and drop siblings that do not end a line."""
        queue = deque([self.root])
        while queue:
            node = queue.popleft()
            ignore = node.children.get(IGNORE)
            if ignore is not None and node is not self.root:
                for key in [k for k in node.children if k != IGNORE]:
                    sibling = node.children[key]
                    _copy_into(ignore, sibling)
                    if sibling.end is None:
                        del node.children[key]
            queue.extend(node.children.values())

    def predict(self, tokens: Sequence[str]) -> list[float]:
        """Predicted (normalised) activation at every position: walk back from each token, exact
        child first, else IGNORE, else stop (no backtracking); the last END passed wins."""
        keys = [normalise(t) for t in tokens]
        out = []
        for j in range(len(keys)):
            node = self.root.children.get(keys[j])
            found = 0.0
            if node is not None and node.activating:
                if node.end is not None:
                    found = node.end
                for k in range(j - 1, -1, -1):
                    node = node.children.get(keys[k]) or node.children.get(IGNORE)
                    if node is None:
                        break
                    if node.end is not None:
                        found = node.end
            out.append(found)
        return out

    def nodes(self) -> Iterable[Node]:
        queue = deque(self.root.children.values())
        while queue:
            node = queue.popleft()
            yield node
            queue.extend(node.children.values())

    def token_sets(self) -> tuple[set[str], set[str]]:
        """The token store's (activating, important) keys: every node but IGNORE, filed by its own
        activation (a key can be in both sets when it appears in two roles)."""
        activating: set[str] = set()
        important: set[str] = set()
        for node in self.nodes():
            if node.token != IGNORE:
                (activating if node.activating else important).add(node.token)
        return activating, important


def evaluate_texts(
    texts: Sequence[tuple[Sequence[float], Sequence[float]]], firing: float = FIRING
) -> dict[str, float | list[float] | None]:
    """evaluate() over the held-out texts pooled, plus `f1_ci`: the 95% bootstrap interval of F1
    over the texts (sitegen/services/bootstrap.py: texts resampled with replacement, each
    resample's F1 from its pooled counts; a resample in which nothing fires is undefined and left
    out). None where F1 is undefined or there is no text."""
    predicted = [p for pred, _ in texts for p in pred]
    true = [t for _, real in texts for t in real]
    out: dict[str, float | list[float] | None] = dict(evaluate(predicted, true, firing))
    out["f1_ci"] = None
    if out["f1"] is not None:
        counts = [
            (
                sum(1 for p, t in zip(pred, real) if p >= firing and t >= firing),
                sum(1 for p in pred if p >= firing),
                sum(1 for t in real if t >= firing),
            )
            for pred, real in texts
        ]
        ci = bootstrap.bootstrap_sums(
            [counts], lambda s: 2 * s[:, 0] / np.where(s[:, 2] > 0, s[:, 1] + s[:, 2], np.nan)
        )
        out["f1_ci"] = None if ci is None else [round(ci[0], 4), round(ci[1], 4)]
    return out


def evaluate(predicted: Sequence[float], true: Sequence[float], firing: float = FIRING) -> dict[str, float | None]:
    """Token-level precision, recall and F1 of the firing class, pooled over all tokens, and the
    variance explained 1 - MSE / Var(true). A metric whose denominator is empty is undefined
    (None), never perfect: precision when nothing is predicted to fire, recall and F1 when nothing
    truly fires (the graph is 'not evaluated'), variance explained when the truth is constant.
    F1 = 2 TP / (predicted + true firing), so an empty graph on texts that fire scores 0."""
    if len(predicted) != len(true):
        raise ValueError("predicted and true activations differ in length")
    tp = sum(1 for p, t in zip(predicted, true) if p >= firing and t >= firing)
    pred_pos = sum(1 for p in predicted if p >= firing)
    true_pos = sum(1 for t in true if t >= firing)
    precision = tp / pred_pos if pred_pos else None
    recall = tp / true_pos if true_pos else None
    f1 = 2 * tp / (pred_pos + true_pos) if true_pos else None
    n = len(true)
    explained = None
    if n:
        mean = sum(true) / n
        var = sum((t - mean) ** 2 for t in true) / n
        mse = sum((p - t) ** 2 for p, t in zip(predicted, true)) / n
        # a truth constant up to float noise has no variance to explain (1 - mse/1e-32 is no figure)
        if var > 1e-12 * max(1.0, mean * mean):
            explained = 1 - mse / var
    return {"precision": precision, "recall": recall, "f1": f1, "variance_explained": explained}
