"""The neuroscope service as the build sees it (registered under `sitegen.services`)."""

from __future__ import annotations

from markupsafe import Markup
from pydantic import Field, field_validator

from sitegen.services.base import (LAYER_NEURON, NEURON_INDEX_REF, Cell, Column, Service, api_envelope, api_get, fmt_num,
                                   fmt_pct, number_cell)
from sitegen.services.neuroscope.data import TABLE_SCHEMA
from sitegen.services.tokens import shown
from sitegen.store.manifest import Record

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
        "neuron_index": {"$ref": NEURON_INDEX_REF},
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


class StatsRecord(Record):
    """The manifest's `stats`: the binning the tables were made with (the pages read the quantile levels)."""

    quantile_levels: list[float] = Field(min_length=1)
    display_bins: int = Field(ge=1)

    @field_validator("quantile_levels")
    @classmethod
    def _levels(cls, levels: list[float]) -> list[float]:
        if any(not 0 < q < 1 for q in levels) or any(a >= b for a, b in zip(levels, levels[1:])):
            raise ValueError("must be increasing fractions between 0 and 1")
        return levels


class Neuroscope(Service):
    name = "neuroscope"
    title = "Max-activating examples"
    description = "Top, bottom and random sequences with per-token activations; activation statistics."
    index_blurb = ("The 20 sequences with the highest and the lowest activation (one entry per sequence), a random sample, "
                   "per-token activations, statistics, histogram and quantiles.")
    column_order = 0  # the activation columns lead the layer table
    activations = True
    store_columns = tuple(TABLE_SCHEMA.names)  # every column: a store lacking one fails at Store.open, in one line
    complete_layers = True
    always_stored = True  # every corpus pass computes it; the layer pages and the search rank by it

    # --- compute half: the corpus pass's top/bottom/random texts and exact statistics --------------

    def accumulator(self, layer, run):
        from sitegen.services.neuroscope.compute import CorpusAccumulator

        return CorpusAccumulator(run)

    def sequences_used(self, table):
        return (s for col in ("top_seq", "bottom_seq", "random_seq") for s in table.column(col).combine_chunks().flatten().to_pylist())

    def manifest_records(self):
        from sitegen.services.neuroscope import stats

        # The binning the tables were made with (the site reads the quantile levels from here).
        return {"stats": {"quantile_levels": list(stats.QUANTILE_LEVELS), "display_bins": stats.DISPLAY_BINS,
                          "fine_bins": stats.N_FINE_BINS, "sum_shift": stats.SUM_SHIFT, "sq_shift": stats.SQ_SHIFT}}

    def manifest_schemas(self):
        return {"stats": StatsRecord}

    def merge_tables(self, tables, run):
        from sitegen.services.neuroscope import data

        states = [data.table_to_state(t, run.top_k, run.n_random, run.seq_len) for t in tables]
        merged = data.merge_states(states, run.top_k, run.n_random, data.random_score(run.seed))
        return data.state_to_table(merged, run.top_k, run.n_random, run.seq_lengths)

    # --- verify: the traces, top-k claims, statistics and random sample against the rerun model ------

    def verifier(self, store, run):
        from sitegen.services.neuroscope.verify import NeuroscopeVerifier

        return NeuroscopeVerifier(store, run)

    # --- render half ------------------------------------------------------------------------------

    def open_layer(self, store, layer, site):
        from sitegen.services.neuroscope.render import NeuroscopeLayer

        return NeuroscopeLayer(store, layer, site)

    def layer_columns(self):
        return [Column("Max activation"), Column("Min"), Column("Mean"), Column("Fraction active"), Column("Top token", "text")]

    def layer_cells(self, view, n, payload):
        st = payload["stats"]
        return [number_cell(st["max"]), number_cell(st["min"]), number_cell(st["mean"]),
                Cell(Markup.escape(fmt_pct(st["frac_positive"])), str(st["frac_positive"])),
                Cell(Markup("<code>{}</code>").format(shown(view.top_token(n))))]

    def neuron_summary(self, view, n, payload):
        st = payload["stats"]
        tokens = Markup(" ").join(Markup("<code>{}</code>").format(t) for t in view.top_tokens(n))
        return [("max", Markup.escape(fmt_num(st["max"]))), ("active (>0)", Markup.escape(fmt_pct(st["frac_positive"]))),
                ("top tokens", tokens or Markup("none"))]

    def layer_facts(self, view, n, payload):
        st = payload["stats"]
        return {"max": st["max"], "frac": st["frac_positive"], "top_token": view.top_token(n)}

    def openapi_paths(self):
        return {
            "/api/{model}/neuroscope/{layer}/{neuron}": api_get("Top, bottom and random texts of a neuron", api_envelope("#/components/schemas/Neuroscope"), LAYER_NEURON),
            "/api/{model}/neuroscope/{layer}": api_get("A layer's neurons ranked by importance", api_envelope("#/components/schemas/LayerImportance"), ["model", "layer"]),
        }

    def openapi_schemas(self):
        return {"Text": _TEXT, "Neuroscope": _NEUROSCOPE,
                "LayerImportance": {"type": "object", "required": ["num_neurons", "important_neurons"],
                                    "properties": {"num_neurons": {"type": "integer"}, "important_neurons": {"type": "array"}}}}
