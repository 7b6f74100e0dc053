"""The OpenAPI 3.1 description of the static JSON API (published at /api/openapi.json and checked
against the built files by the tests)."""

from __future__ import annotations

from sitegen.errors import BuildError
from sitegen.services.base import LAYER_NEURON, api_envelope, api_get
from sitegen.site.provenance import PROVENANCE_SCHEMA

_META = {
    "type": "object",
    "required": ["name", "num_layers", "layer_size", "activation_function", "num_total_neurons", "num_total_parameters", "dataset", "available_services"],
    "properties": {
        "name": {"type": "string"}, "num_layers": {"type": "integer"}, "layer_size": {"type": "integer"},
        "activation_function": {"type": "string"}, "num_total_neurons": {"type": "integer"},
        "num_total_parameters": {"type": "integer"}, "dataset": {"type": "string"},
        "available_services": {"type": "array", "items": {"type": "string"}},
    },  # + "provenance": PROVENANCE_SCHEMA with each service's provenance_schemas(), in openapi_document
}
_NEURON_INDEX = {"type": "object", "required": ["layer", "neuron"], "properties": {"layer": {"type": "integer"}, "neuron": {"type": "integer"}}}
_MISSING = {"type": "object", "required": ["missing_data_types", "metadata"],
            "properties": {"missing_data_types": {"type": "array", "items": {"type": "string"}}, "metadata": {"$ref": "#/components/schemas/Metadata"}}}


def openapi_document(models, services) -> dict:
    """The document: the model-level paths here, each registered service's paths and schemas from
    its own hooks (a service may not redefine another's schema)."""
    paths = {
        "/api": api_get("Every model's metadata", {"type": "object", "required": ["models"],
                                                   "properties": {"models": {"type": "array", "items": {"$ref": "#/components/schemas/Metadata"}}}}, []),
        "/api/{model}": api_get("One model's metadata", api_envelope("#/components/schemas/Metadata"), ["model"]),
        "/api/{model}/all/{layer}/{neuron}": api_get("Every service for a neuron", {"type": "object", "additionalProperties": {"type": "object"}}, LAYER_NEURON),
    }
    provenance = {**PROVENANCE_SCHEMA, "properties": dict(PROVENANCE_SCHEMA["properties"])}
    meta = {**_META, "properties": {**_META["properties"], "provenance": provenance}}
    schemas = {"Metadata": meta, "NeuronIndex": _NEURON_INDEX, "Missing": _MISSING}
    for s in services:
        if clash := sorted(set(s.provenance_schemas()) & set(provenance["properties"])):
            raise BuildError(f"service {s.name!r} declares the provenance record {clash[0]!r} that another part of the API already has; rename it")
        provenance["properties"].update(s.provenance_schemas())
        for kind, mine, theirs in (("path", s.openapi_paths(), paths), ("schema", s.openapi_schemas(), schemas)):
            if clash := sorted(set(mine) & set(theirs)):
                raise BuildError(f"service {s.name!r} declares the OpenAPI {kind} {clash[0]!r} that another part of the API already has; rename it")
            theirs.update(mine)
    return {
        "openapi": "3.1.0",
        "info": {"title": "sitegen neuron API", "version": "1",
                 "description": "Static JSON files at DeepDecipher's URLs. Each URL also answers with a .json suffix."},
        "paths": paths,
        "components": {"schemas": schemas},
        "x-models": [m.name for m in models],
        "x-services": [s.name for s in services],
    }
