"""The correlation service as the build sees it (registered under `sitegen.services`): Pearson
correlation between the neurons of a layer over the corpus pass, from exact mergeable sums. It
runs only in a pass computed with `sitegen compute --correlations` (ComputeConfig.correlations)."""

from __future__ import annotations

from sitegen.services.base import (
    LAYER_NEURON,
    MODEL_COUNT,
    NEURON_INDEX_REF,
    Service,
    api_envelope,
    api_get,
    level_paths,
)
from sitegen.services.correlation.data import CLAMP, GRID_SHIFT, TABLE_SCHEMA

_COUNTED = (
    "the counted positions of the corpus pass, as neuroscope's statistics (every real token after the BOS; no padding)"
)
_METHOD = (
    f"Pearson's r between two neurons' activations over {_COUNTED}, from int64 sums kept exactly: each activation "
    f"rounded to a grid of 2^-{GRID_SHIFT} and cut to +-{CLAMP >> GRID_SHIFT}, then the Gram matrix, the sums and the "
    "token count added over the corpus (shards merge by adding them)"
)
_TOKENS = {"type": "integer", "minimum": 0, "description": "The counted tokens r is computed over."}
_R = {
    "type": "number",
    "minimum": -1,
    "maximum": 1,
    "description": "Pearson's r of the two activations, rounded to 4 decimals.",
}

_CORRELATION = {
    "type": "object",
    "required": ["neuron_index", "tokens", "clamped", "correlated"],
    "description": f"The neurons of the same layer whose activations correlate most with this one's: {_METHOD}.",
    "properties": {
        "neuron_index": {"$ref": NEURON_INDEX_REF, "description": "The neuron."},
        "tokens": _TOKENS,
        "clamped": {
            "type": "integer",
            "minimum": 0,
            "description": f"Counted tokens where this neuron's activation was beyond +-{CLAMP >> GRID_SHIFT} and cut to it.",
        },
        "correlated": {
            "type": "array",
            "description": "The 10 other neurons of the layer with the highest r, sorted by r descending (ties to the lower "
            "index); neurons constant over the counted tokens have no r and are left out (so is every neuron, for a "
            "constant one).",
            "items": {
                "type": "object",
                "required": ["layer", "neuron", "r"],
                "description": "A correlated neuron.",
                "properties": {
                    "layer": {"type": "integer", "minimum": 0, "description": "Its layer (this neuron's)."},
                    "neuron": {"type": "integer", "minimum": 0, "description": "Its index in the layer."},
                    "r": _R,
                },
            },
        },
        "correlated_neurons": {
            "type": "array",
            "description": "A dictionary's latent (stores computed with --correlations --sae): the 10 neurons of the model "
            "layer the dictionary reads at with the highest r with this latent, over the same counted tokens, sorted by r "
            "descending (ties to the lower index); absent where the model's store is not beside the dictionary's.",
            "items": {
                "type": "object",
                "required": ["layer", "neuron", "r"],
                "description": "A correlated neuron of the base model.",
                "properties": {
                    "layer": {"type": "integer", "minimum": 0, "description": "The layer the dictionary reads at."},
                    "neuron": {"type": "integer", "minimum": 0, "description": "Its index in the layer."},
                    "r": _R,
                },
            },
        },
        "correlated_latents": {
            "type": "array",
            "description": "A neuron of a layer some dictionary reads at (stores computed with --correlations --sae): the 10 "
            "latents of those dictionaries with the highest r with this neuron, over the same counted tokens, sorted by r "
            "descending (ties to the dictionary listed first, then the lower index).",
            "items": {
                "type": "object",
                "required": ["model", "latent", "r"],
                "description": "A correlated latent.",
                "properties": {
                    "model": {"type": "string", "description": "The dictionary's model name, <model>.<dictionary>."},
                    "latent": {"type": "integer", "minimum": 0, "description": "The latent's index (its layer is 0)."},
                    "r": _R,
                },
            },
        },
    },
}

_LAYER = {
    "type": "object",
    "required": ["num_neurons", "tokens"],
    "description": "The layer's size and the counted tokens.",
    "properties": {
        "num_neurons": {"type": "integer", "description": "Neurons in the layer (the model's layer_size)."},
        "tokens": _TOKENS,
    },
}


class Correlation(Service):
    name = "correlation"
    title = "Correlated neurons"
    description = (
        "The neurons of the same layer whose activations over the corpus correlate most with this one's (Pearson's r)."
    )
    index_blurb = (
        "The 10 neurons of the same layer most correlated with each neuron over the corpus pass "
        "(`sitegen compute --correlations`)."
    )
    table_schema = TABLE_SCHEMA
    complete_layers = True

    def in_corpus_pass(self, cfg):
        return bool(getattr(cfg, "correlations", False))

    def accumulator(self, layer, run):
        from sitegen.services.correlation.compute import GramAccumulator

        return GramAccumulator(run)

    def merge_tables(self, tables, run):
        from sitegen.services.correlation.data import merge

        return merge(tables)

    def verifier(self, store, run):
        from sitegen.services.correlation.verify import CorrelationVerifier

        return CorrelationVerifier(store, run)

    def open_layer(self, store, layer, site):
        from sitegen.services.correlation.render import CorrelationLayer

        return CorrelationLayer(store, layer, site)

    def provenance_records(self, manifest):
        if self.name not in manifest.get("services", ()):
            return {}
        return {
            "correlation": {
                "method": _METHOD,
                "grid": 2.0**-GRID_SHIFT,
                "clamp": float(CLAMP >> GRID_SHIFT),
                "counted": _COUNTED,
            }
        }

    def provenance_schemas(self):
        return {
            "correlation": {
                "type": "object",
                "description": "How the correlated neurons were computed (stores computed with --correlations).",
                "properties": {
                    "method": {"type": "string", "description": "What r is and how its sums were kept."},
                    "grid": {"type": "number", "description": "The fixed-point grid activations were rounded to."},
                    "clamp": {"type": "number", "description": "Activations beyond +-clamp were cut to it."},
                    "counted": {"type": "string", "description": "Which token positions the sums count."},
                },
            }
        }

    def neuron_provenance(self, payloads, layer, neuron, model_provenance):
        record, payload = model_provenance.get("correlation"), payloads.get(self.name)
        if record is None or payload is None:
            return None
        return {"tokens": payload["tokens"], "grid_shift": GRID_SHIFT, "clamp": CLAMP >> GRID_SHIFT}

    def openapi_paths(self):
        return {
            "/api/{model}/correlation/{layer}/{neuron}": api_get(
                "A neuron's most correlated neurons of its layer",
                api_envelope("#/components/schemas/Correlation", "The neuron's correlated neurons."),
                LAYER_NEURON,
                "The 10 neurons of the same layer with the highest Pearson correlation over the corpus pass "
                "(models computed with --correlations).",
            ),
            **level_paths(
                "correlation",
                _LAYER,
                MODEL_COUNT,
                "The layer's size and the tokens counted (the data is per neuron).",
                "The model's layer count (the data is per neuron).",
            ),
        }

    def openapi_schemas(self):
        return {"Correlation": _CORRELATION}
