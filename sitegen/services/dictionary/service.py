"""The dictionary service as the build sees it (registered under `sitegen.services`)."""

from __future__ import annotations

from sitegen.services.base import (
    LAYER_COUNT,
    LAYER_NEURON,
    MODEL_COUNT,
    NEURON_INDEX_REF,
    Service,
    api_envelope,
    api_get,
    level_paths,
)
from sitegen.services.dictionary.data import TABLE_SCHEMA


def _link(what: str, index: str, index_what: str) -> dict:
    keys = [*filter(None, what.split(",")), index]
    return {
        "type": "object",
        "required": [*keys, "cosine"],
        "description": index_what,
        "properties": {
            **{
                key: {"type": "string" if key == "model" else "integer", "description": desc}
                for key, desc in {
                    "model": "The latents' name at /api (<model>.<dictionary>).",
                    "layer": "The neuron's layer in the base model.",
                    "latent": "The latent's index (its `neuron` in the dictionary's URLs, at layer 0).",
                    "neuron": "The neuron's index in its layer.",
                }.items()
                if key in keys
            },
            "cosine": {
                "type": "number",
                "description": "The cosine between the two directions, rounded to 4 decimals.",
            },
        },
    }


_DICTIONARY = {
    "type": "object",
    "required": ["neuron_index"],
    "description": "For a dictionary's latent: similar latents by decoder cosine and the base model's neurons it reads from and "
    "writes along. For a model's neuron: the latents of the dictionaries at its layer that read from and write along its output "
    "direction. Directions: a neuron's output row W_out[L][n] (for a dictionary over MLP activations, its unit vector); a latent's "
    "encoder column W_enc[:, j] (reads) and decoder row W_dec[j] (writes). Top 10 each, highest cosine first.",
    "properties": {
        "neuron_index": {"$ref": NEURON_INDEX_REF, "description": "The latent (layer 0) or the neuron."},
        "base_model": {
            "type": "string",
            "description": "Latents only: the model whose activations the dictionary reads.",
        },
        "similar": {
            "type": "array",
            "items": _link("", "latent", "A latent of the same dictionary."),
            "description": "Latents only: the 10 latents whose decoder rows are most parallel to this one's.",
        },
        "reads": {
            "type": "array",
            "items": {"oneOf": [_link("layer", "neuron", "A neuron."), _link("model", "latent", "A latent.")]},
            "description": "A latent: the neurons its encoder reads from most. A neuron: the latents whose encoder reads "
            "most from its direction.",
        },
        "writes": {
            "type": "array",
            "items": {"oneOf": [_link("layer", "neuron", "A neuron."), _link("model", "latent", "A latent.")]},
            "description": "A latent: the neurons its decoder writes along most. A neuron: the latents whose decoder "
            "writes most along its direction.",
        },
    },
}


def _density_line(h: dict | None) -> str:
    """The density histogram over latents as one line, latents per decade of density."""
    if not h:
        return "not measured"
    edges = h["edges"]
    bins = [f"1e{lo}–1e{hi}: {n:,}" for lo, hi, n in zip(edges, edges[1:], h["counts"])]
    return (
        "; ".join([f"dead: {h['dead']:,}", f"below 1e{edges[0]}: {h['below']:,}", *bins])
        + " (latents per density range)"
    )


class Dictionary(Service):
    name = "dictionary"
    title = "Dictionary latents and neurons"
    description = "Which dictionary latents read from and write along a neuron, and for a latent, the neurons it reads from and writes to and its most similar latents (decoder cosine)."
    index_blurb = (
        "Links between neurons and the latents of sparse dictionaries (SAEs, transcoders), from their weights."
    )
    from_weights = True
    table_schema = TABLE_SCHEMA
    column_order = 300

    def weight_tables(self, model):
        from sitegen.services.dictionary.compute import weight_tables

        return weight_tables(model)

    def open_layer(self, store, layer, site):
        from sitegen.services.dictionary.render import DictionaryLayer

        return DictionaryLayer(store, layer, site)

    def model_facts(self, site, layer_payloads):
        record = site.store.manifest.get("dictionary")
        if record is None:
            return {}
        q = record.get("quality") or {}
        num = lambda v, fmt: "not measured" if v is None else format(v, fmt)
        kind = "transcoder" if record["transcoder"] else "SAE"
        hooks = record["hook_name"] + (f" → {record['hook_out']}" if record.get("hook_out") else "")
        return {
            "Dictionary": f"{record['architecture']} {kind}, {record['d_in']} → {record['d_sae']} latents"
            + (f", k = {record['k']}" if record.get("k") else "")
            + f", of {record['base_model']} at {hooks}",
            "Quality": f"L0 {num(q.get('l0'), '.1f')}, FVU {num(q.get('fvu'), '.3f')} over {q.get('tokens', 0):,} tokens; "
            f"next-token loss {num(q.get('loss_clean'), '.3f')} → {num(q.get('loss_spliced'), '.3f')} "
            f"(+{num(q.get('loss_increase'), '.3f')}) with the reconstruction spliced in, on {q.get('loss_tokens', 0):,} tokens",
            "Dead latents": f"{q.get('dead', 0):,} of {record['d_sae']:,} never active over the corpus pass",
            "Latent density": _density_line(q.get("density_histogram")),
        }

    def provenance_records(self, manifest):
        """A dictionary's store: what the dictionary is and where it came from (a local folder as its
        last component unless computed with --publish-source, like --model and --corpus)."""
        record = manifest.get("dictionary")
        if record is None:
            return {}
        source = record.get("source", "")
        if not manifest.get("publish_source") and source.startswith("/"):
            source = source.rstrip("/").rsplit("/", 1)[-1]
        keep = ("name", "sha256", "architecture", "transcoder", "hook_name", "hook_out", "layer", "d_in", "d_sae", "k")
        return {"dictionary": {**{k: record.get(k) for k in keep}, "source": source, "cfg": record.get("cfg", {})}}

    def provenance_schemas(self):
        return {
            "dictionary": {
                "type": "object",
                "description": "A dictionary's latents: the dictionary (name, sha256 of cfg.json then the weights file, "
                "architecture, hooks, the base model's layer, widths, TopK's k), where it was read from, and its cfg.json.",
            }
        }

    def neuron_provenance(self, payloads, layer, neuron, model_provenance):
        record = model_provenance.get("dictionary")
        return None if record is None else {k: record[k] for k in ("name", "source", "sha256", "hook_name", "hook_out")}

    def openapi_paths(self):
        return {
            "/api/{model}/dictionary/{layer}/{neuron}": api_get(
                "Latents and neurons linked by weights",
                api_envelope("#/components/schemas/Dictionary", "The unit's links."),
                LAYER_NEURON,
                "For a latent (model <model>.<dictionary>, layer 0): similar latents and the neurons it reads from and writes "
                "along; for a neuron: the latents reading from and writing along it.",
            ),
            **level_paths(
                "dictionary",
                LAYER_COUNT,
                MODEL_COUNT,
                "The layer's size (the data is per unit).",
                "The model's layer count (the data is per unit).",
            ),
        }

    def openapi_schemas(self):
        return {"Dictionary": _DICTIONARY}
