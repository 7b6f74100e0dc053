"""How each figure on a neuron page was produced, from the store's manifest and the services'
payloads, so a reader can reproduce it (or check it with `sitegen verify`). No torch.

Model-level facts (corpus and its hash, tokens, sequence length, model fingerprints, versions,
the Neuron2Graph settings) go into the API's metadata object; per neuron the page adds the
graph's train/test sequences and the explanation's explainer, simulator, method and prompt hash.
Every value here is plain data: the template escapes it.
"""

from __future__ import annotations

from pathlib import PurePath

import numpy as np

NOT_RECORDED = None  # a field an older store did not record: shown as "not recorded"


# The OpenAPI schema of model_provenance's record (site/openapi.py publishes it), next to the code writing it.
PROVENANCE_SCHEMA = {
    "type": "object", "description": "How the data was made: corpus and its content hash, tokens, sequence length, model fingerprints "
                                     "(checkpoint files and weights), sitegen and library versions, Neuron2Graph settings. "
                                     "`sitegen verify STORE` checks a store against its model.",
    "required": ["corpus", "tokens_processed", "sequence_length", "model", "sitegen_version"],
    "properties": {
        "corpus": {"type": "object", "properties": {"name": {"type": ["string", "null"]}, "source": {"type": ["string", "null"]},
                                                    "content_hash": {"type": ["string", "null"]}}},
        "tokens_processed": {"type": ["integer", "null"]}, "sequence_length": {"type": ["integer", "null"]},
        "model": {"type": "object", "properties": {"source": {"type": ["string", "null"]}, "fingerprint": {"type": ["string", "null"]},
                                                   "weights_sha256": {"type": ["string", "null"]}, "hook": {"type": ["string", "null"]}}},
        "sitegen_version": {"type": ["string", "null"]},
        "neuron2graph": {"type": "object"},
    },
}


def _public_source(source: str | None) -> str | None:
    """A model or corpus spec as the page may show it: built-in and hub names, not local paths
    (a private checkpoint's location says nothing to a reader and may say too much)."""
    if not source:
        return None
    if source.startswith((".", "/", "~")) or PurePath(source).suffix in (".gguf", ".txt", ".jsonl", ".parquet") or "\\" in source:
        return None
    return source


def model_provenance(manifest: dict) -> dict:
    """The model-level record, also published as metadata.provenance in every API response."""
    model, corpus, config = manifest.get("model", {}), manifest.get("corpus", {}), manifest.get("config", {})
    versions = manifest.get("versions") or {}
    out = {
        "corpus": {"name": corpus.get("name"), "source": _public_source(corpus.get("source")), "content_hash": corpus.get("content_hash")},
        "tokens_processed": manifest.get("processed", {}).get("tokens"),
        "sequences_processed": manifest.get("processed", {}).get("sequences"),
        "sequence_length": config.get("seq_len"),
        "seed": config.get("seed"),
        "top_k": config.get("top_k"),
        "random_sequences": config.get("n_random"),
        "model": {"source": _public_source(model.get("source")), "fingerprint": model.get("fingerprint"),
                  "weights_sha256": model.get("weights_sha256"), "hook": model.get("hook")},
        # the version that computed the activations; the manifest's sitegen_version is its last writer's
        "sitegen_version": versions.get("sitegen") or manifest.get("sitegen_version"),
        "versions": {k: v for k, v in sorted(versions.items()) if k != "sitegen"} or None,
        "run_hash": manifest.get("run_hash"),
    }
    if manifest.get("neuron2graph"):
        out["neuron2graph"] = manifest["neuron2graph"]
    return out


def n2g_split(n_texts: int, seed: int, layer: int, neuron: int) -> tuple[list[int], list[int]]:
    """Which of a neuron's top texts trained its graph and which tested it: the same rule as
    services/neuron2graph/compute.py's _split (a test holds the two equal); repeated here because
    the site side may not import the compute half."""
    order = np.random.default_rng([seed, layer, neuron]).permutation(n_texts)
    half = (n_texts + 1) // 2
    return sorted(order[:half].tolist()), sorted(order[half:].tolist())


def neuron_provenance(model_record: dict, layer: int, neuron: int, payloads: dict) -> dict:
    """Page context for the Provenance section: the model-level record plus what is this neuron's."""
    out: dict = {"graph": None, "explanation": None}
    n2g = payloads.get("neuron2graph")
    record = model_record.get("neuron2graph")
    if n2g and n2g.get("graph") is not None and not record:  # graphs from before the settings were recorded
        out["graph"] = {"train": None, "test": None, "record": {}, "thresholds": None}
    elif n2g and n2g.get("graph") is not None:
        top = [t["data_index"] for t in payloads.get("neuroscope", {}).get("texts", [])][:int(record.get("texts", 20))]
        train, test = n2g_split(len(top), int(record.get("seed", 0)), layer, neuron)
        out["graph"] = {"train": [top[i] for i in train], "test": [top[i] for i in test],
                        "record": {k: v for k, v in sorted(record.items()) if k != "thresholds"}, "thresholds": record.get("thresholds")}
    ex = payloads.get("neuron_explainer")
    if ex and ex.get("explanation"):
        # `sitegen explain` asks one model to write and to simulate; imported ones say whose they are.
        simulator = ex.get("explainer") if ex.get("source") == "sitegen explain" else None
        out["explanation"] = {"explainer": ex.get("explainer"), "simulator": simulator, "source": ex.get("source"),
                              "method": ex.get("method"), "prompt_hash": ex.get("prompt_hash")}
    return out
