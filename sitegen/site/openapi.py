"""The OpenAPI 3.1 description of the static JSON API (published at /api/openapi.json and checked
against the built files by the tests)."""

from __future__ import annotations

_META = {
    "type": "object",
    "required": ["name", "num_layers", "layer_size", "activation_function", "num_total_neurons", "num_total_parameters", "dataset", "available_services"],
    "properties": {
        "name": {"type": "string"}, "num_layers": {"type": "integer"}, "layer_size": {"type": "integer"},
        "activation_function": {"type": "string"}, "num_total_neurons": {"type": "integer"},
        "num_total_parameters": {"type": "integer"}, "dataset": {"type": "string"},
        "available_services": {"type": "array", "items": {"type": "string"}},
        "provenance": {
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
        },
    },
}
_NEURON_INDEX = {"type": "object", "required": ["layer", "neuron"], "properties": {"layer": {"type": "integer"}, "neuron": {"type": "integer"}}}
_TEXT = {
    "type": "object",
    "required": ["min_range", "max_range", "min_activation", "max_activation", "data_index", "max_activating_token_index", "tokens", "activations", "token_ids"],
    "properties": {
        "min_range": {"type": "number"}, "max_range": {"type": "number"},
        "min_activation": {"type": "number"}, "max_activation": {"type": "number"},
        "data_index": {"type": "integer"}, "max_activating_token_index": {"type": "integer"},
        "tokens": {"type": "array", "items": {"type": "string"}},
        "activations": {"type": "array", "items": {"type": "number"}},
        "token_ids": {"type": "array", "items": {"type": "integer"}},
        "doc_id": {"type": "string"}, "char_start": {"type": "integer"}, "char_end": {"type": "integer"},
    },
}
_NEUROSCOPE = {
    "type": "object", "required": ["neuron_index", "texts"],
    "properties": {
        "neuron_index": {"$ref": "#/components/schemas/NeuronIndex"},
        "texts": {"type": "array", "items": {"$ref": "#/components/schemas/Text"}},
        "bottom_texts": {"type": "array", "items": {"$ref": "#/components/schemas/Text"}},
        "random_texts": {"type": "array", "items": {"$ref": "#/components/schemas/Text"}},
        "stats": {"type": "object", "required": ["mean", "std", "min", "max", "frac_positive", "quantiles", "histogram"],
                  "properties": {"histogram": {
                      "type": "object", "required": ["edges", "counts"],
                      "description": "Exact counts in variable-width bins from min to max: counts[i] values lie between edges[i] "
                                     "and edges[i + 1] (bins follow the float32 exponent, finer near zero; a zero-width bin [0, 0] "
                                     "holds exact zeros). Draw as density, count / width.",
                      "properties": {"edges": {"type": "array", "items": {"type": "number"}},
                                     "counts": {"type": "array", "items": {"type": "integer"}}}}}},
    },
}
_TOKEN_VALUE = {"type": "object", "required": ["token", "token_id", "value"],
                "properties": {"token": {"type": "string"}, "token_id": {"type": "integer"}, "value": {"type": "number"}}}
_LOGITS = {
    "type": "object", "required": ["neuron_index", "promoted", "suppressed"],
    "properties": {"neuron_index": {"$ref": "#/components/schemas/NeuronIndex"},
                   "promoted": {"type": "array", "items": _TOKEN_VALUE}, "suppressed": {"type": "array", "items": _TOKEN_VALUE},
                   "input_tokens": {"type": "array", "items": _TOKEN_VALUE}},
}
_N2G_NODE = {"type": "object", "required": ["token", "required", "importance"],
             "properties": {"token": {"type": "string"}, "required": {"type": "array", "items": {"type": "integer"}},
                            "importance": {"type": "number"}, "depth": {"type": "integer"}, "activating": {"type": "boolean"},
                            "end": {"type": ["number", "null"]}}}
_NEURON2GRAPH = {
    "type": "object", "required": ["neuron_index", "graph", "graphviz", "similar", "tokens"],
    "properties": {
        "neuron_index": {"$ref": "#/components/schemas/NeuronIndex"},
        "graph": {"oneOf": [{"type": "null"}, {"type": "object", "required": ["subgraph_indices", "graph"], "properties": {
            "subgraph_indices": {"type": "array", "items": {"type": "integer"}}, "graph": {"type": "array", "items": _N2G_NODE}}}]},
        "graphviz": {"type": ["string", "null"]},
        "similar": {"type": "array", "items": {"type": "object", "required": ["layer", "neuron", "similarity"],
                                               "properties": {"layer": {"type": "integer"}, "neuron": {"type": "integer"}, "similarity": {"type": "number"}}}},
        "tokens": {"type": "object", "required": ["activating", "important", "source"],
                   "properties": {"activating": {"type": "array", "items": {"type": "string"}}, "important": {"type": "array", "items": {"type": "string"}},
                                  "source": {"enum": ["graph", "top-sequences"]}}},
        # each figure null where undefined (f1 null: the held-out texts never fire, not evaluated)
        "evaluation": {"oneOf": [{"type": "null"}, {"type": "object", "required": ["precision", "recall", "f1", "variance_explained"],
                                                    "properties": {k: {"type": ["number", "null"]} for k in ("precision", "recall", "f1", "variance_explained")}}]},
    },
}
_EXPLAINER = {
    "type": "object", "required": ["explanation", "score"],
    "properties": {"explanation": {"type": ["string", "null"]}, "score": {"type": ["number", "null"]}, "explainer": {"type": ["string", "null"]},
                   "source": {"type": ["string", "null"]}, "method": {"type": ["string", "null"]}},
}
_MISSING = {"type": "object", "required": ["missing_data_types", "metadata"],
            "properties": {"missing_data_types": {"type": "array", "items": {"type": "string"}}, "metadata": {"$ref": "#/components/schemas/Metadata"}}}


def _envelope(data_ref: str) -> dict:
    return {"oneOf": [
        {"type": "object", "required": ["data", "metadata"], "properties": {"data": {"$ref": data_ref}, "metadata": {"$ref": "#/components/schemas/Metadata"}}},
        {"$ref": "#/components/schemas/Missing"},
    ]}


def _get(summary: str, schema: dict, params: list[str]) -> dict:
    return {"get": {
        "summary": summary,
        "parameters": [{"name": p, "in": "path", "required": True, "schema": {"type": "string" if p in ("model", "service") else "integer"}} for p in params],
        "responses": {"200": {"description": "OK (Access-Control-Allow-Origin: *)", "content": {"application/json": {"schema": schema}}},
                      "404": {"description": "no such model, layer or neuron"}},
    }}


def _search() -> dict:
    op = _get("Neurons whose token store holds every term's token (DeepDecipher's search), sorted by layer and neuron",
              {"type": "array", "items": {"$ref": "#/components/schemas/NeuronIndex"}}, ["model"])
    op["get"]["parameters"].append({"name": "query", "in": "query", "required": True, "schema": {"type": "string"},
                                    "description": "type:token[,type:token...] with type any, activating or important; terms combine by AND; "
                                                   "a token no neuron has gives []"})
    op["get"]["responses"]["400"] = {"description": "a malformed query: {\"error\": message}"}
    op["get"]["responses"]["404"] = {"description": "no query parameter, or no such model: {\"error\": message}"}
    return op


def openapi_document(models, services: list[str]) -> dict:
    layer_neuron = ["model", "layer", "neuron"]
    return {
        "openapi": "3.1.0",
        "info": {"title": "sitegen neuron API", "version": "1",
                 "description": "Static JSON files at DeepDecipher's URLs. Each URL also answers with a .json suffix."},
        "paths": {
            "/api": _get("Every model's metadata", {"type": "object", "required": ["models"],
                                                     "properties": {"models": {"type": "array", "items": {"$ref": "#/components/schemas/Metadata"}}}}, []),
            "/api/{model}": _get("One model's metadata", _envelope("#/components/schemas/Metadata"), ["model"]),
            "/api/{model}/neuroscope/{layer}/{neuron}": _get("Top, bottom and random texts of a neuron", _envelope("#/components/schemas/Neuroscope"), layer_neuron),
            "/api/{model}/logits/{layer}/{neuron}": _get("Weight-based logit effects of a neuron", _envelope("#/components/schemas/Logits"), layer_neuron),
            "/api/{model}/neuroscope/{layer}": _get("A layer's neurons ranked by importance", _envelope("#/components/schemas/LayerImportance"), ["model", "layer"]),
            "/api/{model}/neuron2graph/{layer}/{neuron}": _get("A neuron's Neuron2Graph graph (null when not computed), tokens and similar neurons",
                                                                _envelope("#/components/schemas/Neuron2Graph"), layer_neuron),
            "/api/{model}/neuron2graph-search": _search(),
            "/api/{model}/neuron_explainer/{layer}/{neuron}": _get("A neuron's explanation and its simulation score (nulls when it has none)",
                                                                    _envelope("#/components/schemas/NeuronExplainer"), layer_neuron),
            "/api/{model}/all/{layer}/{neuron}": _get("Every service for a neuron", {"type": "object", "additionalProperties": {"type": "object"}}, layer_neuron),
        },
        "components": {"schemas": {
            "Metadata": _META, "NeuronIndex": _NEURON_INDEX, "Text": _TEXT, "Neuroscope": _NEUROSCOPE, "Logits": _LOGITS, "Missing": _MISSING, "Neuron2Graph": _NEURON2GRAPH, "NeuronExplainer": _EXPLAINER,
            "LayerImportance": {"type": "object", "required": ["num_neurons", "important_neurons"],
                                "properties": {"num_neurons": {"type": "integer"}, "important_neurons": {"type": "array"}}},
        }},
        "x-models": [m.name for m in models],
        "x-services": services,
    }
