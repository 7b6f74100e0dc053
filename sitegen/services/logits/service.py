"""The logits service as the build sees it (registered under `sitegen.services`)."""

from __future__ import annotations

from sitegen.services.base import LAYER_NEURON, NEURON_INDEX_REF, Service, api_envelope, api_get

_TOKEN_VALUE = {"type": "object", "required": ["token", "token_id", "value"],
                "properties": {"token": {"type": "string"}, "token_id": {"type": "integer"}, "value": {"type": "number"}}}
_LOGITS = {
    "type": "object", "required": ["neuron_index", "promoted", "suppressed"],
    "properties": {"neuron_index": {"$ref": NEURON_INDEX_REF},
                   "promoted": {"type": "array", "items": _TOKEN_VALUE}, "suppressed": {"type": "array", "items": _TOKEN_VALUE},
                   "input_tokens": {"type": "array", "items": _TOKEN_VALUE}},
}


class Logits(Service):
    name = "logits"
    title = "Weight-based logit effects"
    description = "Tokens the neuron's output promotes and suppresses (W_out . W_U) and the input tokens that drive it (W_E . W_in)."
    index_blurb = "Output tokens the neuron promotes and suppresses through the unembedding, and the input tokens that drive it directly."
    from_weights = True
    store_columns = ("neuron", "promoted_ids", "promoted_vals", "suppressed_ids", "suppressed_vals", "input_ids", "input_vals")
    complete_layers = True
    store_token_columns = ("promoted_ids", "suppressed_ids", "input_ids")

    def weight_tables(self, model):
        from sitegen.services.logits.compute import weight_tables

        return weight_tables(model)

    def open_layer(self, store, layer, site):
        from sitegen.services.logits.render import LogitsLayer

        return LogitsLayer(store, layer, site)

    def openapi_paths(self):
        return {"/api/{model}/logits/{layer}/{neuron}": api_get("Weight-based logit effects of a neuron", api_envelope("#/components/schemas/Logits"), LAYER_NEURON)}

    def openapi_schemas(self):
        return {"Logits": _LOGITS}
