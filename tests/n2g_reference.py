"""A port of the reference Neuron2Graph `NeuronModel` (Foote et al. 2023, the notebook
src/neuron-activation-dev.ipynb of github.com/alexjfoote/Neuron2Graph), kept deliberately close
to the reference's own data structures so that sitegen's graph (sitegen/services/neuron2graph)
can be checked against it: a trie of (node, edge) tuples whose children are keyed by token, END
as a real child node, lines made with `make_line`, merged with `merge_ignores` by re-adding each
sibling's paths under the IGNORE child, prediction by `search`, and token filing by
`save_neurons`. Written here from the reference's logic (not copied); the graphviz drawing and
the on-disk neuron store are left out. Test code only.

Thresholds are the published run's (reference doc): activation 0.5, importance 0.75.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple, Sequence

ROOT, IGNORE, END = "**ROOT**", "**IGNORE**", "**END**"
SPECIAL = {ROOT, IGNORE, END}
BOS_STRING = "<|endoftext|>"  # skipped in the walk back, as the reference does for GPT-2's BOS


class Element(NamedTuple):
    importance: float
    activation: float
    token: str
    important: bool
    activator: bool
    ignore: bool
    is_end: bool


@dataclass
class RefNode:
    ident: int
    value: Element
    depth: int
    children: dict = field(default_factory=dict)  # token -> RefNode (edges carry nothing used here)

    def paths(self) -> list[list[Element]]:
        """Every root-to-leaf list of element values under (and including) this node."""
        if not self.children:
            return [[self.value]]
        return [[self.value] + path for child in self.children.values() for path in child.paths()]


@lru_cache(maxsize=None)
def normalise(token: str) -> str:
    token = token.lower() if token.istitle() and len(token) > 1 else token
    return token.strip() if len(token) > 1 and any(c.isalpha() for c in token) else token


class ReferenceNeuronModel:
    key = staticmethod(normalise)  # the trie key of a token

    def __init__(self, activation_threshold: float = 0.5, importance_threshold: float = 0.75):
        self.activation_threshold = activation_threshold
        self.importance_threshold = importance_threshold
        self.count = 0
        self.root = RefNode(-1, Element(0, 0, ROOT, False, False, True, False), -1)

    # -- fitting -------------------------------------------------------------------------------
    def fit(self, groups: Sequence[Sequence[tuple]]) -> None:
        """groups: per pruned prompt, [original, variant, ...]; each an `info` =
        (importances[k][j], [(token string, normalised activation), ...])."""
        for group in groups:
            sets = None
            for j, info in enumerate(group):
                if j == 0:
                    lines, sets = self.make_line(info)
                else:
                    lines, _ = self.make_line(info, sets)
                for line in lines:
                    self.add(self.root, line)
        self.merge_ignores()

    def make_line(self, info, important_index_sets=None):
        create = important_index_sets is None
        if create:
            important_index_sets = []
        importances, tokens_and_activations = info
        lines = []
        for i, (_token, activation) in enumerate(tokens_and_activations):
            if create:
                important_index_sets.append(set())
            if not activation > self.activation_threshold:
                continue
            before = tokens_and_activations[: i + 1]
            line = []
            last_kept = 0
            if create:
                important_indices = set()
            else:  # a variant longer than the original borrows the last set
                important_indices = (
                    important_index_sets[i] if i < len(important_index_sets) else important_index_sets[-1]
                )
            for j, (seq_token, seq_activation) in enumerate(reversed(before)):
                if seq_token == BOS_STRING:
                    continue
                seq_index = len(before) - j - 1
                importance = float(importances[seq_index][i])
                important = importance > self.importance_threshold or (not create and seq_index in important_indices)
                activator = seq_activation > self.activation_threshold
                if important and create:
                    important_indices.add(seq_index)
                ignore = not important and j != 0
                if not ignore:
                    last_kept = j
                line.append(
                    Element(
                        importance, seq_activation, IGNORE if ignore else seq_token, important, activator, ignore, False
                    )
                )
            line = line[: last_kept + 1]
            line.append(Element(0, activation, END, False, False, True, True))
            lines.append(line)
            if create:
                important_index_sets[i] = important_indices
        return lines, important_index_sets

    def add(self, start: RefNode, line: Sequence[Element]) -> RefNode:
        """Walk/extend the trie along line; existing children are reused unchanged (first values kept)."""
        current = start
        for count, element in enumerate(line, start=1):
            element = element._replace(token=self.key(element.token))
            if element.token in current.children:
                current = current.children[element.token]
                continue
            node = RefNode(self.count, element, start.depth + count)
            self.count += 1
            current.children[element.token] = node
            current = node
        return current

    def merge_ignores(self) -> None:
        visited = {self.root.ident}
        queue = [self.root]
        while queue:
            node = queue.pop(0)
            if IGNORE in node.children:
                ignore = node.children[IGNORE]
                to_remove = []
                for token, child in node.children.items():
                    if token == IGNORE:
                        continue
                    for path in child.paths():
                        if len(path) <= 1 or (len(path) == 2 and path[-1].token == END):
                            continue
                        self.add(ignore, path[1:])
                    if not child.value.is_end and END not in child.children:
                        to_remove.append(token)
                for token in to_remove:
                    node.children.pop(token)
            for child in node.children.values():
                if child.ident not in visited:
                    visited.add(child.ident)
                    queue.append(child)

    # -- prediction ----------------------------------------------------------------------------
    def search(self, tokens: Sequence[str]) -> float:
        """Predicted activation on the last token of tokens (longest matching line wins)."""
        current = self.root
        activations = [0]
        for i, token in enumerate(reversed(tokens)):
            token = self.key(token)
            if token in current.children or IGNORE in current.children:
                current = current.children[token] if token in current.children else current.children[IGNORE]
                if i == 0 and not current.value.activator:
                    break
                if END in current.children:
                    activations.append(current.children[END].value.activation)
            else:
                break
        return activations[-1]

    def forward(self, tokens: Sequence[str]) -> list[float]:
        return [self.search(tokens[: j + 1]) for j in range(len(tokens))]

    # -- outputs -------------------------------------------------------------------------------
    def token_sets(self) -> tuple[set[str], set[str]]:
        """save_neurons: every non-special node filed activating (own activation above the
        threshold) or important."""
        activating: set[str] = set()
        important: set[str] = set()
        queue = [self.root]
        while queue:
            node = queue.pop(0)
            if node.value.token not in SPECIAL:
                (activating if node.value.activator else important).add(node.value.token)
            queue.extend(node.children.values())
        return activating, important

    def end_values(self) -> dict[tuple[str, ...], float]:
        """Token path from the root -> the activation of the END child there."""
        out: dict[tuple[str, ...], float] = {}

        def walk(node: RefNode, path: tuple[str, ...]) -> None:
            for token, child in node.children.items():
                if token == END:
                    out[path] = child.value.activation
                else:
                    walk(child, path + (token,))

        walk(self.root, ())
        return out


class ForkNeuronModel(ReferenceNeuronModel):
    """DeepDecipher's fork of the script (github.com/albertsgarde/Neuron2Graph, n2g/neuron_model.py),
    written here from its logic: tokens are trie keys as they are (no normalisation), and the
    original prompt's important sets are built at every position i (every k <= i, BOS aside, with
    I[k, i] above the threshold), not only where the prompt fires."""

    key = staticmethod(lambda token: token)

    def make_line(self, info, important_index_sets=None):
        importances, tokens_and_activations = info
        if important_index_sets is None:
            important_index_sets = [
                {
                    k
                    for k in range(i + 1)
                    if tokens_and_activations[k][0] != BOS_STRING
                    and float(importances[k][i]) > self.importance_threshold
                }
                for i in range(len(tokens_and_activations))
            ]
        lines, _ = super().make_line(info, important_index_sets)  # as a variant: the given sets are read, not built
        return lines, important_index_sets
