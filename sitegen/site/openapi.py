"""The OpenAPI 3.1 description of the static JSON API (published at /api/openapi.json and checked
against the built files by the tests: every file the build writes under api/ answers a path here,
and every path, parameter and schema property carries a description)."""

from __future__ import annotations

from sitegen.errors import BuildError
from sitegen.services.base import LAYER_NEURON, METADATA_REF, api_envelope, api_get
from sitegen.site.provenance import PROVENANCE_SCHEMA

_META = {
    "type": "object",
    "description": "DeepDecipher's Metadata object for one model, plus the corpus size and the provenance record.",
    "required": [
        "name",
        "num_layers",
        "layer_size",
        "activation_function",
        "num_total_neurons",
        "num_total_parameters",
        "dataset",
        "available_services",
    ],
    "properties": {
        "name": {
            "type": "string",
            "description": "The model's name: the {model} segment of every URL (`sitegen compute --name`).",
        },
        "num_layers": {
            "type": "integer",
            "description": "Number of transformer blocks whose MLP neurons the site covers.",
        },
        "layer_size": {"type": "integer", "description": "MLP neurons per layer (the MLP's hidden width)."},
        "activation_function": {
            "type": "string",
            "description": "The MLP's activation function as the model's configuration names it (e.g. gelu_new, silu).",
        },
        "num_total_neurons": {"type": "integer", "description": "num_layers * layer_size."},
        "num_total_parameters": {"type": "integer", "description": "The model's parameter count."},
        "dataset": {
            "type": "string",
            "description": "Name of the corpus the activations were recorded on (provenance.corpus has its source and hash).",
        },
        "available_services": {
            "type": "array",
            "items": {"type": "string"},
            "description": "The services this model has, in the site's order: each answers /api/{model}/{service}/...; "
            "any other service's URLs answer 404.",
        },
        "tokens_processed": {
            "type": "integer",
            "description": "Corpus tokens the model was run on to record the activations.",
        },
        "sequence_length": {
            "type": "integer",
            "description": "Tokens per packed sequence, BOS included (`sitegen compute --seq-len`).",
        },
    },  # + "provenance": PROVENANCE_SCHEMA with each service's provenance_schemas(), in openapi_document
}
_NEURON_INDEX = {
    "type": "object",
    "required": ["layer", "neuron"],
    "description": "One neuron's address.",
    "properties": {
        "layer": {"type": "integer", "description": "Layer index, 0-based."},
        "neuron": {"type": "integer", "description": "Neuron index within the layer, 0-based."},
    },
}
_ERROR = {
    "type": "object",
    "required": ["error"],
    "description": "The answer to an API URL the site does not have (status 404).",
    "properties": {
        "error": {"type": "string", "description": "What was not found and where the valid URLs are listed."}
    },
}


def _data_schema(paths: dict, template: str) -> dict | None:
    """The `data` schema of TEMPLATE's 200 answer in PATHS, or None."""
    try:
        return paths[template]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["properties"]["data"]
    except KeyError:
        return None


def _all_schema(services, paths: dict, level: str) -> dict:
    """DeepDecipher's `all` object at LEVEL ("/{layer}" or "/{layer}/{neuron}"): metadata, then one
    {"data": ...} per service the model has (only those: a key for each of its available_services)."""
    props = {"metadata": {"$ref": METADATA_REF, "description": "The model's metadata, as at /api/{model}."}}
    for s in services:
        data = _data_schema(paths, f"/api/{{model}}/{s.name}{level}")
        if data is not None:
            props[s.name] = {
                "type": "object",
                "required": ["data"],
                "description": f"Present when the model has {s.name}: "
                f"its answer at /api/{{model}}/{s.name}{level}, without metadata.",
                "properties": {"data": data},
            }
    return {
        "type": "object",
        "required": ["metadata"],
        "additionalProperties": False,
        "properties": props,
        "description": "Every service of the model for this URL: the keys are `metadata` and exactly the model's available_services.",
    }


def openapi_document(models, services) -> dict:
    """The document: the model-level paths here, each registered service's paths and schemas from
    its own hooks (a service may not redefine another's schema)."""
    paths = {
        "/api": api_get(
            "Every model's metadata",
            {
                "type": "object",
                "required": ["models"],
                "description": "The site's models.",
                "properties": {
                    "models": {
                        "type": "array",
                        "items": {"$ref": METADATA_REF},
                        "description": "One Metadata object per model the site serves.",
                    }
                },
            },
            [],
            "The models this site serves, each with its Metadata (available_services lists the URLs it answers).",
        ),
        "/api/openapi": api_get(
            "This OpenAPI document",
            {"type": "object", "description": "An OpenAPI 3.1 document."},
            [],
            "This document (also at /api/openapi.json): every URL of the API and the schema of its answer.",
        ),
        "/api/{model}": api_get(
            "One model's metadata",
            api_envelope(METADATA_REF, "The model's metadata (the same object as `metadata`)."),
            ["model"],
            "One model's Metadata, as `data` and as `metadata`.",
        ),
        "/api/{model}/all": api_get(
            "The model's services",
            {
                "type": "object",
                "required": ["metadata", "services"],
                "description": "The model's metadata and the services it has.",
                "properties": {
                    "metadata": {"$ref": METADATA_REF, "description": "The model's metadata, as at /api/{model}."},
                    "services": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "The model's available_services: each has the URLs /api/{model}/{service}[/{layer}[/{neuron}]].",
                    },
                },
            },
            ["model"],
            "Which services the model has; /api/{model}/all/{layer}[/{neuron}] gathers their answers.",
        ),
    }
    provenance = {**PROVENANCE_SCHEMA, "properties": dict(PROVENANCE_SCHEMA["properties"])}
    meta = {**_META, "properties": {**_META["properties"], "provenance": provenance}}
    schemas = {"Metadata": meta, "NeuronIndex": _NEURON_INDEX, "ApiError": _ERROR}
    for s in services:
        if clash := sorted(set(s.provenance_schemas()) & set(provenance["properties"])):
            raise BuildError(
                f"service {s.name!r} declares the provenance record {clash[0]!r} that another part of the API already has; rename it"
            )
        provenance["properties"].update(s.provenance_schemas())
        for kind, mine, theirs in (("path", s.openapi_paths(), paths), ("schema", s.openapi_schemas(), schemas)):
            if clash := sorted(set(mine) & set(theirs)):
                raise BuildError(
                    f"service {s.name!r} declares the OpenAPI {kind} {clash[0]!r} that another part of the API already has; rename it"
                )
            theirs.update(mine)
    paths["/api/{model}/all/{layer}"] = api_get(
        "Every service of the model for a layer",
        _all_schema(services, paths, "/{layer}"),
        ["model", "layer"],
        "Each of the model's services' layer-level data under its name, with the model's metadata.",
    )
    paths["/api/{model}/all/{layer}/{neuron}"] = api_get(
        "Every service of the model for a neuron",
        _all_schema(services, paths, "/{layer}/{neuron}"),
        LAYER_NEURON,
        "Each of the model's services' neuron-level data under its name, "
        "with the model's metadata (DeepDecipher's `all`).",
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sitegen neuron API",
            "version": "1",
            "description": "Static JSON files at DeepDecipher's URLs. Each URL also answers with a .json suffix; "
            'a URL the site lacks answers 404 with {"error": message}.',
        },
        "paths": paths,
        "components": {"schemas": schemas},
        "x-models": [m.name for m in models],
        "x-services": [s.name for s in services],
    }
