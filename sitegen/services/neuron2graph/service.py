"""The neuron2graph service as the build sees it (registered under `sitegen.services`): per-neuron
graphs, token sets and similar neurons, and the model's token search."""

from __future__ import annotations

from pathlib import Path

from markupsafe import Markup

from sitegen.errors import ConfigError, StoreError
from sitegen.services.artefacts import REASONS
from sitegen.services.base import (
    LAYER_NEURON,
    MODEL_COUNT,
    NEURON_INDEX_REF,
    Cell,
    Column,
    EdgeFunction,
    Service,
    TokenIndex,
    api_envelope,
    api_get,
    fmt_num,
    level_paths,
)
from sitegen.services.neuron2graph.data import GRAPH_SCHEMA
from sitegen.services.neuron2graph.provenance import graph_provenance
from sitegen.services.neuron2graph.tokenstore import MEASURE_GRAPHS, MEASURE_TOKENS, SIMILARITY_MEASURES

_N2G_NODE = {
    "type": "object",
    "required": ["token", "required", "importance"],
    "description": "One node of the trie: a token of a pattern, read from the activating token back through its context.",
    "properties": {
        "token": {"type": "string", "description": "The N2G-normalised token, or <IGNORE> where any token may stand."},
        "required": {
            "type": "array",
            "items": {"type": "integer"},
            "description": "Indices into graph of the nodes that extend this one by the token before it (its children in the trie).",
        },
        "importance": {
            "type": "number",
            "description": "The node's value: the normalised activation (activation / the neuron's top "
            "activation) for a root (depth 0) token, the saliency (importance) for a context token; "
            "rounded to 4 decimals.",
        },
        "depth": {
            "type": "integer",
            "description": "Tokens before the activating token (0: the activating token itself).",
        },
        "activating": {
            "type": "boolean",
            "description": "Whether the token's own normalised activation, where it entered the trie, is > 0.5 (it is filed as an activating token).",
        },
        "end": {
            "type": ["number", "null"],
            "description": "Where a pattern ends here: the normalised activation a match predicts; null otherwise.",
        },
    },
}
_F = lambda d: {"type": ["number", "null"], "description": d + " Null where undefined; rounded to 4 decimals."}
_NEURON2GRAPH = {
    "type": "object",
    "required": ["neuron_index", "graph", "graphviz", "similar", "tokens"],
    "description": "A neuron's Neuron2Graph graph (where computed), its activating and important tokens, and its similar neurons.",
    "properties": {
        "neuron_index": {"$ref": NEURON_INDEX_REF, "description": "The neuron."},
        "graph": {
            "description": "The graph, null when `sitegen compute --n2g` did not graph this neuron.",
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["subgraph_indices", "graph"],
                    "properties": {
                        "subgraph_indices": {
                            "type": "array",
                            "items": {"type": "integer"},
                            "description": "Indices into graph of the root nodes: one per activating token.",
                        },
                        "graph": {"type": "array", "items": _N2G_NODE, "description": "Every node of the trie."},
                    },
                },
            ],
        },
        "graphviz": {
            "type": ["string", "null"],
            "description": "The graph as Graphviz DOT source (activating tokens red by activation, context "
            "blue by importance, end nodes with a thick border); null without a graph.",
        },
        "similar": {
            "type": "array",
            "description": "Up to 10 most similar neurons of the model, most similar first; each entry "
            "names the measure that produced its similarity and the tokens the two share",
            "items": {
                "type": "object",
                "required": ["layer", "neuron", "similarity", "measure", "shared"],
                "description": "A similar neuron.",
                "properties": {
                    "layer": {"type": "integer", "description": "Its layer."},
                    "neuron": {"type": "integer", "description": "Its index within the layer."},
                    "similarity": {
                        "type": "number",
                        "description": "The value of `measure` for the two neurons, from 0 to 1.",
                    },
                    "measure": {"enum": [MEASURE_GRAPHS, MEASURE_TOKENS], "description": SIMILARITY_MEASURES},
                    "shared": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "up to 5 normalised tokens both neurons' compared sets hold, rarest first",
                    },
                },
            },
        },
        "tokens": {
            "type": "object",
            "required": ["activating", "important", "source"],
            "description": "The neuron's entry in the model's token store (what token search and similarity read).",
            "properties": {
                "activating": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "N2G-normalised tokens that make it fire.",
                },
                "important": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "N2G-normalised context tokens its graph needs (empty without a graph).",
                },
                "source": {
                    "enum": ["graph", "top-sequences"],
                    "description": "graph: the tokens come from its graph's nodes; top-sequences: no graph, so the "
                    "activating tokens are those at or above half the largest activation of its top texts.",
                },
            },
        },
        "artefact": {
            "enum": [None, "first-position", "whitespace"],
            "description": "Why the neuron's top texts say little about the text, if they do: first-position (it peaks on the first "
            "token after BOS) or whitespace (it peaks on one whitespace token); null otherwise.",
        },
        "evaluation": {
            "description": "The graph's fit on held-out texts (the true activation / the top activation fires at >= 0.5), null "
            "without a graph.",
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["precision", "recall", "f1", "variance_explained"],
                    "properties": {
                        "precision": _F("Token-level precision of the graph's firing predictions."),
                        "recall": _F("Token-level recall of the firing tokens."),
                        "f1": _F(
                            "Harmonic mean of precision and recall; null when nothing fires in the held-out "
                            "texts (not evaluated)."
                        ),
                        "f1_ci": {
                            "description": "[low, high]: the 95% percentile bootstrap interval of F1 over the held-out "
                            "texts (1,000 resamples of the texts with replacement, seeded); null where F1 is null or "
                            "too few resamples have any firing token.",
                            "oneOf": [
                                {"type": "null"},
                                {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
                            ],
                        },
                        "variance_explained": _F("1 - MSE / Var(true activation) of the predicted activations."),
                        "test_texts": {"type": "integer", "description": "Held-out texts the figures are measured on."},
                        "train_texts": {"type": "integer", "description": "Texts the graph was built from."},
                    },
                },
            ],
        },
    },
}


_LAYER = {
    "type": "object",
    "required": ["num_neurons", "graphs"],
    "description": "The layer's graphs.",
    "properties": {
        "num_neurons": {"type": "integer", "description": "Neurons in the layer."},
        "graphs": {
            "type": "array",
            "items": {"type": "integer"},
            "description": "The neurons of the layer with a Neuron2Graph graph, ascending.",
        },
    },
}


def _search() -> dict:
    from sitegen.services.neuron2graph.tokenstore import MAX_TERMS

    op = api_get(
        "Neurons whose token store holds every term's token (DeepDecipher's search), sorted by layer and neuron",
        {
            "type": "array",
            "items": {"$ref": NEURON_INDEX_REF, "description": "A matching neuron."},
            "description": "The matching neurons, sorted by layer, then neuron; [] when none.",
        },
        ["model"],
        "DeepDecipher's token search over the model's token store (every neuron's activating and important tokens): "
        "answered by an edge function, not a static file.",
    )
    op["get"]["parameters"].append(
        {
            "name": "query",
            "in": "query",
            "required": True,
            "schema": {"type": "string"},
            "description": "type:token[,type:token...] with type any, activating or important; terms combine by AND; "
            f"at most {MAX_TERMS} terms, a repeated term counts once; a token no neuron has gives []",
        }
    )
    op["get"]["responses"]["400"] = {
        "description": f'a malformed query, or one of more than {MAX_TERMS} terms: {{"error": message}}'
    }
    op["get"]["responses"]["404"] = {"description": 'no query parameter, or no such model: {"error": message}'}
    return op


def _selection(cfg) -> str:
    """`sitegen compute --n2g`: which neurons get a graph ("0": none, the default)."""
    return str(cfg.options.get("n2g", "0")).strip()


class Neuron2Graph(Service):
    name = "neuron2graph"
    title = "Neuron2Graph"
    description = (
        "A graph of the token patterns that make the neuron fire, with held-out precision/recall; "
        "its activating and important tokens; similar neurons."
    )
    # Every neuron gets token sets and similar neurons (from its graph, else from its top
    # sequences), so the service is there whenever neuroscope data is; graphs where computed.
    needs = ("neuroscope", "neuron2graph")
    table_schema = GRAPH_SCHEMA  # data.py; graphs cover some neurons of some layers

    def prepare(self, site):
        from sitegen.services.neuron2graph.tokenstore import similar

        similar(site)  # the model's token store, then every neuron's similar neurons
        site.store.sequence_tokens()  # read once here, so parallel build workers share it (the artefact flags read it)

    def open_layer(self, store, layer, site):
        from sitegen.services.neuron2graph.render import Neuron2GraphLayer

        return Neuron2GraphLayer(store, layer, site)

    def layer_columns(self):
        return [Column("Graph F1"), Column("Artefact", "text")]

    def layer_cells(self, view, n, payload):
        text, sort = view.graph_cell(n)
        return [Cell(Markup.escape(text), sort), Cell(view.artefact_cell(n))]

    def layer_facts(self, view, n, payload):
        a = view.artefacts[n]
        return {"artefact": REASONS[a.code] if a else None}

    def model_facts(self, site, layer_payloads):
        graphs, total = sum(len(lp["graphs"]) for lp in layer_payloads), site.num_layers * site.layer_size
        return {"Graphs": f"{graphs:,} of {total:,} neurons have a Neuron2Graph graph"}

    provenance_order = 10  # the graph's row comes before the explanation's

    def provenance_records(self, manifest):
        # the settings `sitegen compute --n2g` ran with (texts, seed, replacements, thresholds)
        return {"neuron2graph": manifest["neuron2graph"]} if manifest.get("neuron2graph") else {}

    def provenance_schemas(self):
        return {
            "neuron2graph": {
                "type": "object",
                "description": "The settings `sitegen compute --n2g` ran with: texts per neuron, "
                "replacements and augmented texts, seed, the replacement source and thresholds.",
            }
        }

    def neuron_provenance(self, payloads, layer, neuron, model_provenance):
        return graph_provenance(
            payloads.get("neuron2graph"),
            payloads.get("neuroscope", {}).get("texts", []),
            layer,
            neuron,
            model_provenance.get("neuron2graph"),
        )

    def search_tokens(self, site):
        from sitegen.services.neuron2graph.tokenstore import token_store

        ts = token_store(site)
        return TokenIndex(
            ts.search_postings(),
            ts.preview,
            ts.search_support(),
            ts.token_counts(),
            ts.corpus,
            strength=ts.search_strength(),
        )

    def edge_functions(self):
        # DeepDecipher's search URL: a Deno module beside this file on Netlify, its Python port in serve
        from sitegen.services.neuron2graph import edge

        source = Path(__file__).resolve().parent / f"{edge.NAME}.ts"
        return [EdgeFunction(edge.NAME, edge.PATH, source, edge.neuron2graph_search, cache="manual")]

    # --- compute half: graphs for the neurons `sitegen compute --n2g` selects, on the whole store -----

    def compute_options(self):
        import click

        return [
            click.Option(
                ["--n2g"],
                default="0",
                show_default=True,
                help="Neuron2Graph graphs to compute: 'all', 'layers:0,5', N (the N most active neurons per layer, "
                "artefact neurons last: see docs/methods.md), N@0,5 (in those layers) or LAYER:NEURON pairs such as 3:17,5:2. "
                "Rerun on a finished store to add graphs.",
            )
        ]

    def check_compute_config(self, cfg):
        from sitegen.services.selection import parse_selection

        n2g = str(cfg.options.get("n2g", "0"))
        parse_selection(n2g, "--n2g")  # its form, before any work (the ranges once the store is there)
        if n2g.strip() != "0" and cfg.shard[1] > 1:
            raise ConfigError(
                "--n2g cannot run on a --shard: merge the shards first, then run 'sitegen compute' with the same "
                "arguments and --out MERGED --n2g ..."
            )

    def neuron_summary(self, view, n, payload):
        items = []
        if payload.get("artefact"):
            items.append(("likely artefact", Markup.escape(REASONS[payload["artefact"]])))
        row = view.rows.get(n)
        if row is not None:
            f1, ci = row.get("f1"), row.get("f1_ci")
            text = "undefined" if f1 is None else fmt_num(f1, 2)
            if f1 is not None and ci:
                text = f"{text} [{ci[0]:.2f}, {ci[1]:.2f}]"
            items.append(("graph F1", Markup('<a href="#graph">{}</a>').format(text)))
        return items

    def stage_requested(self, cfg):
        return _selection(cfg) != "0"

    def run_stage(self, model, store, cfg, log):
        from sitegen.services.neuron2graph.compute import N2GConfig, run_n2g

        log(f"neuron2graph: {_selection(cfg)} (resumes per layer; each layer's graphs are saved as it finishes)")
        try:
            totals = run_n2g(model, store, _selection(cfg), N2GConfig(seed=cfg.seed), log, progress=cfg.progress)
        except KeyboardInterrupt:
            raise StoreError(
                f"interrupted during neuron2graph; {cfg.out} keeps every finished layer: rerun the same command to go on"
            ) from None
        if totals["graphs"]:
            log(
                f"neuron2graph: {totals['graphs']} graphs in {totals['seconds']:.0f} s "
                f"({60 * totals['graphs'] / max(totals['seconds'], 1e-9):.1f} graphs/min, {totals['tokens_run'] // totals['graphs']} tokens run per graph)"
            )

    def stage_layers(self, store, cfg):
        from sitegen.services.selection import parse_selection, select_neurons

        m = store.manifest["model"]
        todo = {}
        for layer, neurons in select_neurons(
            _selection(cfg), m["num_layers"], m["layer_size"], store, skip_artefacts=True
        ).items():
            path = store.layer_path(self.name, layer)
            have = (
                set(store.read_layer(self.name, layer, columns=["neuron"]).column("neuron").to_pylist())
                if path.exists()
                else set()
            )
            if set(neurons) - have:
                todo[layer] = parse_selection(_selection(cfg), "--n2g").for_layer(
                    layer
                )  # a layer task's store holds only that layer
        return todo

    def run_stage_layer(self, model, store, cfg, layer, arg, log):
        from sitegen.services.neuron2graph.compute import N2GConfig, run_n2g

        totals = run_n2g(model, store, arg, N2GConfig(seed=cfg.seed), log)
        return {"made": totals["graphs"], "seconds": totals["seconds"]}

    def openapi_paths(self):
        return {
            "/api/{model}/neuron2graph/{layer}/{neuron}": api_get(
                "A neuron's Neuron2Graph graph (null when not computed), tokens and similar neurons",
                api_envelope("#/components/schemas/Neuron2Graph", "The neuron's graph, tokens and similar neurons."),
                LAYER_NEURON,
                "DeepDecipher's {graph, graphviz, similar} plus the graph's held-out evaluation, the neuron's token-store entry and its artefact flag.",
            ),
            **level_paths(
                "neuron2graph",
                _LAYER,
                MODEL_COUNT,
                "Which of the layer's neurons have a graph.",
                "The model's layer count (the data is per neuron and per layer).",
            ),
            "/api/{model}/neuron2graph-search": _search(),
        }

    def openapi_schemas(self):
        return {"Neuron2Graph": _NEURON2GRAPH}
