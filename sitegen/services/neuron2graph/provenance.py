"""How a neuron's graph was made, for the neuron page's Provenance section: which of its top
texts trained the graph and which tested it, and the settings `sitegen compute --n2g` recorded
in the manifest. No torch: the build imports this module, and so does the compute half (one
split rule for both)."""

from __future__ import annotations

import numpy as np


def split(n_texts: int, seed: int, layer: int, neuron: int) -> tuple[list[int], list[int]]:
    """Which of a neuron's `n_texts` top texts train its graph (the first list) and which test it."""
    order = np.random.default_rng([seed, layer, neuron]).permutation(n_texts)
    half = (n_texts + 1) // 2
    return sorted(order[:half].tolist()), sorted(order[half:].tolist())


def graph_provenance(
    graph_payload: dict | None, top_texts: list[dict], layer: int, neuron: int, record: dict | None
) -> dict | None:
    """The row's context: None without a graph; `train`/`test` None for graphs from before the
    settings were recorded (`record`: the manifest's block); `top_texts`: the neuroscope texts."""
    if not graph_payload or graph_payload.get("graph") is None:
        return None
    if not record:
        return {"train": None, "test": None, "record": {}, "thresholds": None}
    top = [t["data_index"] for t in top_texts][: int(record.get("texts", 20))]
    train, test = split(len(top), int(record.get("seed", 0)), layer, neuron)
    return {
        "train": [top[i] for i in train],
        "test": [top[i] for i in test],
        "record": {k: v for k, v in sorted(record.items()) if k != "thresholds"},
        "thresholds": record.get("thresholds"),
    }
