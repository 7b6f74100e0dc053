"""How each figure on a neuron page was produced, from the store's manifest and the services'
payloads, so a reader can reproduce it (or check it with `sitegen verify`). No torch.

Model-level facts (corpus and its hash, tokens, sequence length, model fingerprints, versions,
plus each service's records, hook `provenance_records`) go into the API's metadata object; per
neuron the page adds each service's row (hook `neuron_provenance`, partial
`provenance/<name>.html`). Every value here is plain data: the templates escape it.
"""

from __future__ import annotations

from pathlib import PurePath

from sitegen.errors import BuildError
from sitegen.services import Service, registry

_SOURCE_KIND = {
    "enum": ["embedded", "hub", "local", None],
    "description": "Where the source came from; a local path is shown as given only when computed with --publish-source, "
    "else as its last component (file or folder name) next to the content hash.",
}

# The OpenAPI schema of model_provenance's record (site/openapi.py publishes it), next to the code writing it.
PROVENANCE_SCHEMA = {
    "type": "object",
    "description": "How the data was made: corpus and its content hash, tokens, sequence length, model fingerprints "
    "(checkpoint files and weights), sitegen and library versions, Neuron2Graph settings. "
    "`sitegen verify STORE` checks a store against its model. A null is a value the store did not record.",
    "required": ["corpus", "tokens_processed", "sequence_length", "model", "sitegen_version"],
    "properties": {
        "corpus": {
            "type": "object",
            "description": "The corpus the activations were recorded on.",
            "properties": {
                "name": {"type": ["string", "null"], "description": "Its name (Metadata.dataset)."},
                "source": {
                    "type": ["string", "null"],
                    "description": "The --corpus it was read from (a local path only as its last component "
                    "unless computed with --publish-source).",
                },
                "source_kind": _SOURCE_KIND,
                "content_hash": {
                    "type": ["string", "null"],
                    "description": "A hash of the corpus documents as read, so a copy can be checked "
                    '("hub:<name>" for a dataset streamed from the hub).',
                },
            },
        },
        "tokens_processed": {"type": ["integer", "null"], "description": "Corpus tokens the model was run on."},
        "sequences_processed": {"type": ["integer", "null"], "description": "Packed sequences the model was run on."},
        "sequence_length": {
            "type": ["integer", "null"],
            "description": "Tokens per packed sequence, BOS included (--seq-len).",
        },
        "seed": {
            "type": ["integer", "null"],
            "description": "The compute run's --seed (the random sample of sequences, Neuron2Graph).",
        },
        "top_k": {"type": ["integer", "null"], "description": "Top and bottom sequences kept per neuron (--top-k)."},
        "random_sequences": {
            "type": ["integer", "null"],
            "description": "Random sequences kept per neuron (--n-random) for explanation "
            "scoring; they stay in the store, not in the API.",
        },
        "model": {
            "type": "object",
            "description": "The model the activations came from.",
            "properties": {
                "source": {
                    "type": ["string", "null"],
                    "description": "The --model it was loaded from (a hub id, or a local path's last "
                    "component unless computed with --publish-source).",
                },
                "source_kind": _SOURCE_KIND,
                "fingerprint": {
                    "type": ["string", "null"],
                    "description": 'Identifies the checkpoint: "sha256:" and a hash of its file(s), '
                    'or "hub:<id>" for a hub model.',
                },
                "weights_sha256": {
                    "type": ["string", "null"],
                    "description": "SHA-256 over the loaded weights (every tensor's name, dtype, shape "
                    "and bytes), which `sitegen verify` recomputes.",
                },
                "hook": {
                    "type": ["string", "null"],
                    "description": "The activation read in each layer ({layer} stands for the layer index).",
                },
            },
        },
        "sitegen_version": {
            "type": ["string", "null"],
            "description": "The sitegen version that computed the activations.",
        },
        "versions": {
            "type": ["object", "null"],
            "additionalProperties": {"type": "string"},
            "description": "Library name -> version, of the libraries the activations were computed with.",
        },
        "run_hash": {
            "type": ["string", "null"],
            "description": "A hash of the compute run's inputs and settings (model fingerprint, corpus "
            "hash, --seq-len, --seed, --tokens, --top-k, --n-random): the shards of one run share it.",
        },
    },  # + each service's provenance_schemas() (site/openapi.py adds them)
}


def public_source(record: dict, publish: bool | None) -> str | None:
    """A --model or --corpus spec as the site shows it. Hub names and the embedded defaults as
    given; a local path (a private checkpoint's location says nothing to a reader and may say too
    much) as given only when compute was run with --publish-source, else only its last component
    (file or folder name), which the page shows next to the content hash. A store that did not
    record the kind (`source_kind`) is read conservatively: anything path-like (a '/', a '\\', a
    leading '.' or '~', a file suffix) counts as local, so a hub id `org/name` shows as `name`."""
    source, kind = record.get("source"), record.get("source_kind")
    if not source:
        return None
    if kind is None and (
        source.startswith((".", "~"))
        or "/" in source
        or "\\" in source
        or PurePath(source).suffix in (".gguf", ".txt", ".jsonl", ".parquet")
    ):
        kind = "local"
    if kind != "local" or publish:
        return source
    return source.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or None


def model_provenance(manifest: dict) -> dict:
    """The model-level record, also published as metadata.provenance in every API response."""
    model, corpus, config = manifest.get("model", {}), manifest.get("corpus", {}), manifest.get("config", {})
    publish = manifest.get("publish_source")
    versions = manifest.get("versions") or {}
    out = {
        "corpus": {
            "name": corpus.get("name"),
            "source": public_source(corpus, publish),
            "source_kind": corpus.get("source_kind"),
            "content_hash": corpus.get("content_hash"),
        },
        "tokens_processed": manifest.get("processed", {}).get("tokens"),
        "sequences_processed": manifest.get("processed", {}).get("sequences"),
        "sequence_length": config.get("seq_len"),
        "seed": config.get("seed"),
        "top_k": config.get("top_k"),
        "random_sequences": config.get("n_random"),
        "model": {
            "source": public_source(model, publish),
            "source_kind": model.get("source_kind"),
            "fingerprint": model.get("fingerprint"),
            "weights_sha256": model.get("weights_sha256"),
            "hook": model.get("hook"),
        },
        # the version that computed the activations; the manifest's sitegen_version is its last writer's
        "sitegen_version": versions.get("sitegen") or manifest.get("sitegen_version"),
        "versions": {k: v for k, v in sorted(versions.items()) if k != "sitegen"} or None,
        "run_hash": manifest.get("run_hash"),
    }
    for s in registry():
        records = s.provenance_records(manifest)
        if clash := sorted(set(records) & set(out)):
            raise BuildError(
                f"service {s.name!r} adds the provenance record {clash[0]!r} that sitegen or another service already has; rename it"
            )
        out.update(records)
    return out


def neuron_provenance(
    services: list[Service], model_record: dict, layer: int, neuron: int, payloads: dict
) -> list[tuple[str, dict]]:
    """The page's per-neuron Provenance rows: (partial, its `row` context) of each of `services`
    (ordered by provenance_order) that has one for this neuron."""
    rows = []
    for s in services:
        row = s.neuron_provenance(payloads, layer, neuron, model_record)
        if row is not None:
            rows.append((s.provenance_template, row))
    return rows
