"""Which neurons a command works on (`compute --n2g`, `explain --neurons`, `verify --neurons`):
one grammar (GRAMMAR, parse_selection), one error style; N means the most active neurons (from
the store's neuroscope maxima) or a seeded random sample, as the caller says. No torch."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from sitegen.errors import ConfigError
from sitegen.services.artefacts import layer_artefacts, whitespace_ids

# The one grammar of a neuron selection, shared by `compute --n2g`, `explain --neurons` and
# `verify --neurons`; what N means (the most active, or a random sample) is the caller's.
GRAMMAR = "'all', 'layers:0,5', N (N neurons per layer), N@0,5 (N in each of those layers) or LAYER:NEURON pairs such as 3:17,5:2"
_LIST = r"\s*\d+\s*(?:,\s*\d+\s*)*"
_PAIRS = r"\s*\d+\s*:\s*\d+\s*(?:,\s*\d+\s*:\s*\d+\s*)*"


@dataclass(frozen=True)
class Selection:
    """A parsed selection. `layers`: None for every layer; `per_layer`: N, or None for every
    neuron of the layers; `pairs`: the (layer, neuron) pairs of the LAYER:NEURON form."""

    spec: str
    option: str
    layers: tuple[int, ...] | None = None
    per_layer: int | None = None
    pairs: tuple[tuple[int, int], ...] | None = None

    def for_layer(self, layer: int) -> str:
        """This selection restricted to one layer, as a spec (a layer task's store holds only that layer)."""
        if self.pairs is not None:
            return ",".join(f"{lay}:{n}" for lay, n in self.pairs if lay == layer)
        return f"layers:{layer}" if self.per_layer is None else f"{self.per_layer}@{layer}"

    def resolve(self, n_layers: int, d_mlp: int, pick: Callable[[int, int], list[int]]) -> dict[int, list[int]]:
        """{layer: sorted neurons}, layers ascending; pick(layer, N) chooses a layer's N neurons.
        Layers and neurons outside the model are refused."""
        if self.pairs is not None:
            out: dict[int, set[int]] = {}
            for layer, n in self.pairs:
                if not (0 <= layer < n_layers and 0 <= n < d_mlp):
                    raise ConfigError(
                        f"{self.option} {self.spec}: {layer}:{n} is not a neuron of this model ({n_layers} layers x {d_mlp})"
                    )
                out.setdefault(layer, set()).add(n)
            return {k: sorted(v) for k, v in sorted(out.items())}
        if self.layers is not None and any(not 0 <= x < n_layers for x in self.layers):
            raise ConfigError(
                f"{self.option} {self.spec}: layers must be numbers from 0 to {n_layers - 1}, e.g. {self.option} layers:0,{n_layers - 1}"
            )
        layers = range(n_layers) if self.layers is None else self.layers
        if self.per_layer is None:
            return {layer: list(range(d_mlp)) for layer in layers}
        return {layer: sorted(pick(layer, self.per_layer)) for layer in layers}


def parse_selection(spec: str, option: str) -> Selection:
    """The spec's form, checked without the model (so a typo fails before any work); ranges are
    checked by Selection.resolve."""
    text = str(spec).strip()
    numbers = lambda t: tuple(sorted({int(x) for x in t.split(",")}))
    if text == "all":
        return Selection(text, option)
    if m := re.fullmatch(rf"layers:({_LIST})", text):
        return Selection(text, option, layers=numbers(m.group(1)))
    if m := re.fullmatch(rf"(\d+)(?:@({_LIST}))?", text):
        return Selection(text, option, layers=numbers(m.group(2)) if m.group(2) else None, per_layer=int(m.group(1)))
    if re.fullmatch(_PAIRS, text):
        return Selection(text, option, pairs=tuple(tuple(int(x) for x in p.split(":")) for p in text.split(",")))
    raise ConfigError(f"{option} {text}: use {GRAMMAR}, e.g. {option} 10")


def sample_neurons(spec: str, n_layers: int, d_mlp: int, seed: int, option: str = "--neurons") -> dict[int, list[int]]:
    """The selection with N as a random sample of N neurons per layer, seeded by `seed` (verify:
    a check should not favour the neurons a researcher opens first). N must be at least 1."""
    sel = parse_selection(spec, option)
    if sel.per_layer == 0:
        raise ConfigError(f"{option} {sel.spec}: must be at least 1 neuron per layer")
    return sel.resolve(
        n_layers,
        d_mlp,
        lambda layer, n: np.random.default_rng([seed, layer]).choice(d_mlp, min(n, d_mlp), replace=False).tolist(),
    )


def select_neurons(
    spec: str, n_layers: int, d_mlp: int, store, option: str = "--n2g", skip_artefacts: bool = False
) -> dict[int, list[int]]:
    """The selection with N as the N neurons per layer with the largest activation (the ones a
    researcher opens first; `compute --n2g`, `explain --neurons`); layers left with none are
    dropped. skip_artefacts: N ranks the layer's artefact neurons (sitegen/services/artefacts.py)
    after every other neuron, so they are chosen only when the layer has fewer than N others."""
    vocab = blank = None  # the vocabulary and its whitespace token ids, read once

    def most_active(layer: int, per_layer: int) -> list[int]:
        nonlocal vocab, blank
        top = np.asarray(
            store.read_layer("neuroscope", layer, columns=["max"]).column("max").to_numpy(), dtype=np.float64
        )
        flagged = np.zeros(len(top), dtype=bool)
        if skip_artefacts and per_layer:
            if vocab is None:
                vocab = store.vocab()
                blank = whitespace_ids(vocab)
            flagged = np.array([a is not None for a in layer_artefacts(store, layer, vocab, blank)], dtype=bool)
        order = np.lexsort(
            (np.arange(len(top)), -top, flagged)
        )  # ordinary neurons first, then largest first, ties by index
        return order[:per_layer].tolist()

    return {k: v for k, v in parse_selection(spec, option).resolve(n_layers, d_mlp, most_active).items() if v}
