"""The logits service as the build sees it (registered under `sitegen.services`)."""

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
from sitegen.services.logits.data import TABLE_SCHEMA


def _token_value(value: str) -> dict:
    return {
        "type": "object",
        "required": ["token", "token_id", "value"],
        "description": "A vocabulary token and its score.",
        "properties": {
            "token": {"type": "string", "description": "The token as the tokenizer decodes it."},
            "token_id": {"type": "integer", "description": "Its id in the tokenizer's vocabulary."},
            "value": {"type": "number", "description": value},
        },
    }


_DIRECT = (
    "The neuron's output weights W_out[n] read through the unembedding (W_out[n] . W_U, with the final norm's weight folded "
    "in, centred first for LayerNorm; the per-position norm scale and biases left out), rounded to 4 decimals"
)
_LOGITS = {
    "type": "object",
    "required": ["neuron_index", "promoted", "suppressed"],
    "description": "What the neuron's weights say, with no corpus: the output tokens its activation pushes up and down, and the input "
    "tokens that drive it directly.",
    "properties": {
        "neuron_index": {"$ref": NEURON_INDEX_REF, "description": "The neuron."},
        "promoted": {
            "type": "array",
            "items": _token_value(_DIRECT + "."),
            "description": "The 10 tokens whose logits a positive activation raises most, highest first.",
        },
        "suppressed": {
            "type": "array",
            "items": _token_value(_DIRECT + " (negative: the logit falls)."),
            "description": "The 10 tokens whose logits a positive activation lowers most, lowest value first.",
        },
        "input_tokens": {
            "type": "array",
            "items": _token_value(
                "The neuron's activation if the residual stream held only this token's embedding (W_E[token] through the "
                "layer's pre-MLP norm, W_in and the MLP's nonlinearity), rounded to 4 decimals."
            ),
            "description": "The 10 tokens whose embedding alone activates the neuron most, highest first "
            "(absent for an activation function sitegen cannot evaluate).",
        },
        "connected": {
            "type": "object",
            "required": ["upstream", "downstream"],
            "description": "Neurons of other layers connected to this one by virtual weights through the residual stream: "
            "an earlier neuron's output direction W_out dotted with a later neuron's input direction (the later layer's "
            "pre-MLP norm weight folded in, centred for LayerNorm; for a gated MLP the up projection W_in, not the gate). "
            "Absent for a model of one layer and for a dictionary's latents.",
            "properties": {
                side: {
                    "type": "array",
                    "description": f"{what}: the 10 largest and the 10 most negative weights (fewer where fewer neurons "
                    "exist), largest first.",
                    "items": {
                        "type": "object",
                        "required": ["layer", "neuron", "weight"],
                        "description": "A connected neuron and the weight.",
                        "properties": {
                            "layer": {"type": "integer", "minimum": 0, "description": "Its layer."},
                            "neuron": {"type": "integer", "minimum": 0, "description": "Its index in the layer."},
                            "weight": {"type": "number", "description": "The virtual weight, rounded to 4 decimals."},
                        },
                    },
                }
                for side, what in (
                    ("upstream", "Neurons of earlier layers whose output this neuron reads"),
                    ("downstream", "Neurons of later layers that read this neuron's output"),
                )
            },
        },
        "logit_histogram": {
            "type": "object",
            "required": ["edges", "counts"],
            "description": "The distribution of the neuron's direct effect on every vocabulary logit (the values 'promoted' and "
            "'suppressed' are the ends of): 40 equal-width bins from its smallest to its largest effect, np.histogram's rule "
            "(absent from a store computed before it existed).",
            "properties": {
                "edges": {
                    "type": "array",
                    "items": {"type": "number"},
                    "description": "The 41 bin edges, ascending, to 6 significant digits; bin i is [edges[i], edges[i + 1]), "
                    "the last bin closed.",
                },
                "counts": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0},
                    "description": "Vocabulary tokens per bin; they add up to the vocabulary size.",
                },
            },
        },
    },
}


class Logits(Service):
    name = "logits"
    title = "Weight-based logit effects"
    description = "Tokens the neuron's output promotes and suppresses (W_out . W_U) and the input tokens that drive it (W_E . W_in)."
    index_blurb = "Output tokens the neuron promotes and suppresses through the unembedding, and the input tokens that drive it directly."
    from_weights = True
    table_schema = TABLE_SCHEMA
    complete_layers = True
    store_token_columns = ("promoted_ids", "suppressed_ids", "input_ids")

    def weight_tables(self, model):
        from sitegen.services.logits.compute import weight_tables

        return weight_tables(model)

    def open_layer(self, store, layer, site):
        from sitegen.services.logits.render import LogitsLayer

        return LogitsLayer(store, layer, site)

    def openapi_paths(self):
        return {
            "/api/{model}/logits/{layer}/{neuron}": api_get(
                "Weight-based logit effects of a neuron",
                api_envelope("#/components/schemas/Logits", "The neuron's logit effects."),
                LAYER_NEURON,
                "The tokens the neuron promotes and suppresses through the unembedding, and its top input tokens, from the weights alone.",
            ),
            **level_paths(
                "logits",
                LAYER_COUNT,
                MODEL_COUNT,
                "The layer's size (the data is per neuron).",
                "The model's layer count (the data is per neuron).",
            ),
        }

    def openapi_schemas(self):
        return {"Logits": _LOGITS}
