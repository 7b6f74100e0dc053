"""The neuron2graph service as the build sees it (registered under `sitegen.services`): per-neuron
graphs, token sets and similar neurons, and the model's token search."""

from __future__ import annotations

from sitegen.services.base import LAYER_NEURON, NEURON_INDEX_REF, Service, api_envelope, api_get

_N2G_NODE = {"type": "object", "required": ["token", "required", "importance"],
             "properties": {"token": {"type": "string"}, "required": {"type": "array", "items": {"type": "integer"}},
                            "importance": {"type": "number"}, "depth": {"type": "integer"}, "activating": {"type": "boolean"},
                            "end": {"type": ["number", "null"]}}}
_NEURON2GRAPH = {
    "type": "object", "required": ["neuron_index", "graph", "graphviz", "similar", "tokens"],
    "properties": {
        "neuron_index": {"$ref": NEURON_INDEX_REF},
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


def _search() -> dict:
    op = api_get("Neurons whose token store holds every term's token (DeepDecipher's search), sorted by layer and neuron",
                 {"type": "array", "items": {"$ref": NEURON_INDEX_REF}}, ["model"])
    op["get"]["parameters"].append({"name": "query", "in": "query", "required": True, "schema": {"type": "string"},
                                    "description": "type:token[,type:token...] with type any, activating or important; terms combine by AND; "
                                                   "a token no neuron has gives []"})
    op["get"]["responses"]["400"] = {"description": "a malformed query: {\"error\": message}"}
    op["get"]["responses"]["404"] = {"description": "no query parameter, or no such model: {\"error\": message}"}
    return op


class Neuron2Graph(Service):
    name = "neuron2graph"
    title = "Neuron2Graph"
    description = ("A graph of the token patterns that make the neuron fire, with held-out precision/recall; "
                   "its activating and important tokens; similar neurons.")
    # Every neuron gets token sets and similar neurons (from its graph, else from its top
    # sequences), so the service is there whenever neuroscope data is; graphs where computed.
    needs = ("neuroscope", "neuron2graph")

    def prepare(self, site):
        from sitegen.services.neuron2graph.tokenstore import similar

        similar(site)  # the model's token store, then every neuron's similar neurons

    def open_layer(self, store, layer, site):
        from sitegen.services.neuron2graph.render import Neuron2GraphLayer

        return Neuron2GraphLayer(store, layer, site)

    def openapi_paths(self):
        return {
            "/api/{model}/neuron2graph/{layer}/{neuron}": api_get("A neuron's Neuron2Graph graph (null when not computed), tokens and similar neurons",
                                                                   api_envelope("#/components/schemas/Neuron2Graph"), LAYER_NEURON),
            "/api/{model}/neuron2graph-search": _search(),
        }

    def openapi_schemas(self):
        return {"Neuron2Graph": _NEURON2GRAPH}
