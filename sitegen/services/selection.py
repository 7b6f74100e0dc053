"""Which neurons a per-neuron stage works on (`compute --n2g`, `explain --neurons`), from the
store's neuroscope maxima. No torch."""

from __future__ import annotations

import numpy as np

from sitegen.errors import ConfigError
from sitegen.services.artefacts import layer_artefacts, whitespace_ids


def _layers(text: str, n_layers: int, spec: str, option: str) -> list[int]:
    try:
        layers = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        layers = [-1]
    if not layers or any(not 0 <= x < n_layers for x in layers):
        raise ConfigError(f"{option} {spec}: layers must be comma-separated numbers from 0 to {n_layers - 1}, e.g. {option} layers:0,5")
    return layers


def select_neurons(spec: str, n_layers: int, d_mlp: int, store, option: str = "--n2g", skip_artefacts: bool = False) -> dict[int, list[int]]:
    """--n2g: 'all'; 'layers:0,5' (every neuron of those layers); N (the N neurons per layer with
    the largest activation: the ones a researcher opens first); N@0,5 (those, in layers 0 and 5).
    skip_artefacts: N ranks the layer's artefact neurons (sitegen/services/artefacts.py) after
    every other neuron, so they are chosen only when the layer has fewer than N others."""
    spec = spec.strip()
    if spec == "all":
        return {layer: list(range(d_mlp)) for layer in range(n_layers)}
    if spec.startswith("layers:"):
        return {layer: list(range(d_mlp)) for layer in _layers(spec[len("layers:"):], n_layers, spec, option)}
    count, _, where = spec.partition("@")
    try:
        per_layer = int(count)
    except ValueError:
        raise ConfigError(f"{option} {spec}: use 'all', 'layers:0,5', N or N@0,5 (N neurons per layer), e.g. {option} 10") from None
    if per_layer < 0:
        raise ConfigError(f"{option} {spec}: must be 0 or more neurons per layer")
    out = {}
    vocab = blank = None  # the vocabulary and its whitespace token ids, read once
    for layer in (_layers(where, n_layers, spec, option) if where else range(n_layers)):
        top = np.asarray(store.read_layer("neuroscope", layer, columns=["max"]).column("max").to_numpy(), dtype=np.float64)
        flagged = np.zeros(len(top), dtype=bool)
        if skip_artefacts and per_layer:
            if vocab is None:
                vocab = store.vocab()
                blank = whitespace_ids(vocab)
            flagged = np.array([a is not None for a in layer_artefacts(store, layer, vocab, blank)], dtype=bool)
        order = np.lexsort((np.arange(len(top)), -top, flagged))  # ordinary neurons first, then largest first, ties by index
        out[layer] = sorted(order[:per_layer].tolist())
    return {k: v for k, v in out.items() if v}
