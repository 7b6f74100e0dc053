"""The neuroscope service as the build sees it (registered under `sitegen.services`)."""

from __future__ import annotations

from markupsafe import Markup
from pydantic import Field, field_validator

from sitegen.services.base import (
    LAYER_NEURON,
    NEURON_INDEX_REF,
    Cell,
    Column,
    Service,
    api_envelope,
    api_get,
    fmt_num,
    fmt_pct,
    level_paths,
    number_cell,
)
from sitegen.services.neuroscope.data import TABLE_SCHEMA
from sitegen.services.tokens import shown
from sitegen.store.manifest import Record

_NUM = lambda d: {"type": "number", "description": d}
_INT = lambda d: {"type": "integer", "description": d}
_TEXT = {
    "type": "object",
    "description": "One sequence of the corpus with the neuron's activation at every token (Neuroscope's text). Activations are rounded "
    "to 4 decimals; a text's minimum, maximum and peak skip the BOS position.",
    "required": [
        "min_range",
        "max_range",
        "min_activation",
        "max_activation",
        "data_index",
        "max_activating_token_index",
        "tokens",
        "activations",
        "token_ids",
    ],
    "properties": {
        "min_range": _NUM(
            "The neuron's lowest activation over the whole corpus (stats.min): the bottom of the colour scale, the same for every text."
        ),
        "max_range": _NUM(
            "The neuron's highest activation over the whole corpus (stats.max): the top of the colour scale, the same for every text."
        ),
        "min_activation": _NUM("The lowest activation within this text."),
        "max_activation": _NUM("The highest activation within this text."),
        "data_index": _INT(
            "The sequence's id in the store (its row in sequences.parquet), the same for every neuron shown that sequence."
        ),
        "max_activating_token_index": _INT(
            "Index into tokens of the text's peak: its highest activation for a top text, its lowest for "
            "a bottom text (the first such token)."
        ),
        "tokens": {
            "type": "array",
            "items": {"type": "string"},
            "description": "The sequence's tokens as the tokenizer decodes each one, BOS first.",
        },
        "activations": {
            "type": "array",
            "items": {"type": "number"},
            "description": "The neuron's activation at each token, aligned with tokens.",
        },
        "token_ids": {
            "type": "array",
            "items": {"type": "integer"},
            "description": "The tokenizer's id of each token, aligned with tokens.",
        },
        "doc_id": {"type": "string", "description": "The corpus document the sequence was cut from."},
        "char_start": _INT("Offset in that document of the sequence's first character."),
        "char_end": _INT("Offset in that document just past the sequence's last character."),
    },
}
_TEXTS = "Up to --top-k sequences (one entry per sequence) with the neuron's {} activations, {} first."
_SIGN = lambda which: {
    "type": "string",
    "enum": ["+", "-"],
    "description": f"The sign of the {which} pre-activation: + above 0, - at or below 0.",
}
_GLU_QUADRANTS = {
    "type": ["array", "null"],
    "description": "A gated MLP's neuron (activation act(gate) * up) by the signs of its gate (x . W_gate) and up (x . W_in) "
    "pre-activations over every counted token, in the order (+, +), (+, -), (-, +), (-, -); exact counts and fixed-point "
    "sums, merged exactly across shards. null: not applicable (a plain MLP's neuron or a dictionary's latent).",
    "items": {
        "type": "object",
        "required": ["gate", "up", "tokens", "token_share", "mass_share", "top"],
        "description": "One quadrant.",
        "properties": {
            "gate": _SIGN("gate"),
            "up": _SIGN("up"),
            "tokens": _INT("Counted tokens in the quadrant."),
            "token_share": _NUM("Its share of the counted tokens, 0 to 1 (6 decimals)."),
            "mass_share": _NUM(
                "Its share of the activation mass, the sum of |activation| over the counted tokens (6 decimals)."
            ),
            "top": {
                "type": ["object", "null"],
                "required": ["data_index", "position", "activation", "tokens"],
                "description": "The quadrant's token of largest |activation| (ties: the lower sequence id, then position); "
                "null when no token fell in the quadrant.",
                "properties": {
                    "data_index": _INT("The sequence's id in the store."),
                    "position": _INT("The token's index in tokens."),
                    "activation": _NUM("The neuron's activation there, rounded to 4 decimals."),
                    "tokens": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "The sequence's tokens as the tokenizer decodes each one, BOS first.",
                    },
                },
            },
        },
    },
}
_INTERVAL_EXAMPLES = {
    "type": "array",
    "description": "Examples across the activation range: the neuron's sequences grouped by their largest activation, "
    "in quarter-octave intervals (edges 2^e x 1, 1.25, 1.5, 1.75: the float32 exponent and top 2 mantissa bits) from "
    "the one holding the neuron's largest sequence maximum down, 8 of them, then one group for everything lower; "
    "highest first. In each, up to 5 sequences: those with the smallest hash of (seed, sequence id), ties to the "
    "lower id, chosen over the whole corpus pass exactly (the same whatever the shard split). Empty for a neuron "
    "that never exceeds 0; absent from stores computed without it.",
    "items": {
        "type": "object",
        "required": ["lo", "hi", "token_share", "texts"],
        "description": "One interval.",
        "properties": {
            "lo": _NUM(
                "Its lower edge, in activation units (a sequence whose maximum equals it belongs here); 0 for "
                "the lowest group, which holds every positive maximum below hi."
            ),
            "hi": _NUM("Its upper edge, in activation units (exclusive; above the neuron's max in the highest group)."),
            "token_share": _NUM(
                "The share of the counted tokens whose own activation lies in [lo, hi) ((0, hi) for the lowest group), "
                "0 to 1 (6 decimals); exact from the fine histogram where the edges lie within 2^-10 .. 2^8."
            ),
            "texts": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/Text"},
                "description": "The interval's sequences, smallest hash first.",
            },
        },
    },
}
_NEUROSCOPE = {
    "type": "object",
    "required": ["neuron_index", "texts"],
    "description": "A neuron's top and bottom texts and exact activation statistics over the corpus. (The random sample of sequences "
    "stays in the store for explanation scoring; it is not in the API.)",
    "properties": {
        "neuron_index": {"$ref": NEURON_INDEX_REF, "description": "The neuron."},
        "texts": {
            "type": "array",
            "items": {"$ref": "#/components/schemas/Text"},
            "description": _TEXTS.format("highest", "highest"),
        },
        "bottom_texts": {
            "type": "array",
            "items": {"$ref": "#/components/schemas/Text"},
            "description": _TEXTS.format("lowest", "lowest"),
        },
        "glu_quadrants": _GLU_QUADRANTS,
        "interval_examples": _INTERVAL_EXAMPLES,
        "stats": {
            "type": "object",
            "required": ["mean", "std", "min", "max", "frac_positive", "quantiles", "histogram"],
            "description": "Exact statistics over every activation of the neuron on the corpus (BOS positions excluded).",
            "properties": {
                "count": _INT("Activations the statistics cover: one per counted token of the corpus."),
                "mean": _NUM("Mean activation."),
                "std": _NUM("Population standard deviation of the activations."),
                "min": _NUM("Lowest activation."),
                "max": _NUM("Highest activation."),
                "frac_positive": _NUM("Fraction of activations above 0."),
                "quantiles": {
                    "type": "object",
                    "required": ["levels", "values"],
                    "description": "Quantiles of the activations, interpolated within the exact fine histogram's bins.",
                    "properties": {
                        "levels": {
                            "type": "array",
                            "items": {"type": "number"},
                            "description": "Quantile levels, fractions in (0, 1), increasing.",
                        },
                        "values": {
                            "type": "array",
                            "items": {"type": "number"},
                            "description": "The activation at each level.",
                        },
                    },
                },
                "histogram": {
                    "type": "object",
                    "required": ["edges", "counts"],
                    "description": "Exact counts in variable-width bins from min to max: counts[i] values lie between edges[i] "
                    "and edges[i + 1] (bins follow the float32 exponent, finer near zero; a zero-width bin [0, 0] "
                    "holds exact zeros). Draw as density, count / width.",
                    "properties": {
                        "edges": {
                            "type": "array",
                            "items": {"type": "number"},
                            "description": "Bin edges, len(counts) + 1, non-decreasing.",
                        },
                        "counts": {
                            "type": "array",
                            "items": {"type": "integer"},
                            "description": "Activations in each bin.",
                        },
                    },
                },
            },
        },
    },
}
_IMPORTANT = {
    "type": "array",
    "description": "[neuron, importance] pairs, highest importance first (ties by layer, then neuron). "
    "Importance is DeepDecipher's: max_activation - min_activation of the neuron's first top text.",
    "items": {
        "type": "array",
        "minItems": 2,
        "maxItems": 2,
        "description": "One neuron and its importance.",
        "prefixItems": [
            {"$ref": NEURON_INDEX_REF, "description": "The neuron."},
            {"type": "number", "description": "Its importance (0 for a neuron with no texts)."},
        ],
    },
}
_LAYER = {
    "type": "object",
    "required": ["num_neurons", "important_neurons"],
    "description": "A layer's neurons ranked by importance.",
    "properties": {"num_neurons": _INT("Neurons in the layer."), "important_neurons": _IMPORTANT},
}
_MODEL = {
    "type": "object",
    "required": ["important_neurons"],
    "description": "Every neuron of the model ranked by importance.",
    "properties": {"important_neurons": _IMPORTANT},
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
    description = "Top and bottom sequences with per-token activations; activation statistics."
    index_blurb = (
        "The sequences with the highest and the lowest activation (one entry per sequence), "
        "per-token activations, statistics, histogram and quantiles."
    )
    column_order = 0  # the activation columns lead the layer table
    activations = True
    table_schema = TABLE_SCHEMA  # data.py: what the corpus pass and merge write (state_to_table)
    complete_layers = True
    always_stored = True  # every corpus pass computes it; the layer pages and the search rank by it
    provenance_order = 5  # the examples' row first, as the panel comes first on the page

    # --- compute half: the corpus pass's top/bottom/random texts and exact statistics --------------

    def accumulator(self, layer, run):
        from sitegen.services.neuroscope.compute import CorpusAccumulator

        return CorpusAccumulator(run)

    def sequences_used(self, table):
        return (
            s
            for col in ("top_seq", "bottom_seq", "random_seq", "glu_top_seq", "interval_seq")
            if col in table.column_names
            for s in table.column(col).combine_chunks().flatten().to_pylist()
            if s >= 0  # glu_top_seq: -1 for a quadrant no token fell in
        )

    def manifest_records(self):
        from sitegen.services.neuroscope import stats

        # The binning the tables were made with (the site reads the quantile levels from here).
        return {
            "stats": {
                "quantile_levels": list(stats.QUANTILE_LEVELS),
                "display_bins": stats.DISPLAY_BINS,
                "fine_bins": stats.N_FINE_BINS,
                "sum_shift": stats.SUM_SHIFT,
                "sq_shift": stats.SQ_SHIFT,
                # the examples across the activation range: float32 bits >> interval_shift file a
                # sequence maximum; groups kept one by one, then one for the rest; examples per group
                "interval_shift": stats.INTERVAL_SHIFT,
                "interval_groups": stats.INTERVAL_GROUPS,
                "per_interval": stats.PER_INTERVAL,
            }
        }

    def manifest_schemas(self):
        return {"stats": StatsRecord}

    def merge_tables(self, tables, run):
        from sitegen.services.neuroscope import data

        states = [data.table_to_state(t, run.top_k, run.n_random, run.seq_len, run.seed) for t in tables]
        merged = data.merge_states(states, run.top_k, run.n_random, data.random_score(run.seed))
        return data.state_to_table(merged, run.top_k, run.n_random, run.seq_lengths, run.seq_len)

    # --- provenance: how the examples across the activation range were chosen ----------------------

    def provenance_records(self, manifest):
        grid = manifest.get("stats") or {}
        if "interval_shift" not in grid:  # a store computed without the examples across the range
            return {}
        return {
            "interval_examples": {
                "interval_shift": grid["interval_shift"],
                "mantissa_bits": 23 - grid["interval_shift"],
                "interval_groups": grid.get("interval_groups"),
                "per_interval": grid.get("per_interval"),
                "key": "sitegen.corpus_keys.interval_key(seed, sequence id)",
            }
        }

    def provenance_schemas(self):
        count = lambda what: {"type": ["integer", "null"], "description": what}
        return {
            "interval_examples": {
                "type": "object",
                "description": "How the examples across the activation range (interval_examples) were chosen: each "
                "sequence with a positive maximum is filed by that maximum's interval (its float32 sign, exponent and "
                "top mantissa bits); the highest intervals from the one holding the neuron's largest sequence maximum "
                "down are kept one by one, every lower one as one more group; per group the sequences with the "
                "smallest key, ties to the lower id, chosen exactly over the whole corpus pass.",
                "properties": {
                    "interval_shift": count(
                        "A sequence maximum's float32 bits shifted right by this give its interval (sign, exponent "
                        "and the top mantissa bits)."
                    ),
                    "mantissa_bits": count("The mantissa bits an interval keeps (2: quarter-octave intervals)."),
                    "interval_groups": count(
                        "Intervals kept one by one, from the one holding the neuron's largest sequence maximum down; "
                        "every lower one is one more group."
                    ),
                    "per_interval": count("Sequences kept per group."),
                    "key": {
                        "type": "string",
                        "description": "The hash of (the run's seed, sequence id) whose smallest values a group keeps.",
                    },
                },
            }
        }

    def neuron_provenance(self, payloads, layer, neuron, model_provenance):
        payload = payloads.get(self.name) or {}
        if "interval_examples" not in payload:
            return None
        record = model_provenance.get("interval_examples") or {}
        return {
            "bits": record.get("mantissa_bits"),
            "groups": record.get("interval_groups"),
            "per_interval": record.get("per_interval"),
            "seed": model_provenance.get("seed"),
        }

    # --- verify: the traces, top-k claims, statistics and random sample against the rerun model ------

    def verifier(self, store, run):
        from sitegen.services.neuroscope.verify import NeuroscopeVerifier

        return NeuroscopeVerifier(store, run)

    # --- render half ------------------------------------------------------------------------------

    def open_layer(self, store, layer, site):
        from sitegen.services.neuroscope.render import NeuroscopeLayer

        return NeuroscopeLayer(store, layer, site)

    def layer_columns(self):
        return [
            Column("Max activation"),
            Column("Min"),
            Column("Mean"),
            Column("Fraction active"),
            Column("Top token", "text"),
        ]

    def layer_cells(self, view, n, payload):
        st = payload["stats"]
        return [
            number_cell(st["max"]),
            number_cell(st["min"]),
            number_cell(st["mean"]),
            Cell(Markup.escape(fmt_pct(st["frac_positive"])), str(st["frac_positive"])),
            Cell(Markup("<code>{}</code>").format(shown(view.top_token(n)))),
        ]

    def neuron_summary(self, view, n, payload):
        st = payload["stats"]
        tokens = Markup(" ").join(Markup("<code>{}</code>").format(t) for t in view.top_tokens(n))
        return [
            ("max", Markup.escape(fmt_num(st["max"]))),
            ("active (>0)", Markup.escape(fmt_pct(st["frac_positive"]))),
            ("top tokens", tokens or Markup("none")),
        ]

    def layer_facts(self, view, n, payload):
        st = payload["stats"]
        return {"max": st["max"], "frac": st["frac_positive"], "top_token": view.top_token(n)}

    def openapi_paths(self):
        return {
            "/api/{model}/neuroscope/{layer}/{neuron}": api_get(
                "Top and bottom texts and statistics of a neuron",
                api_envelope("#/components/schemas/Neuroscope", "The neuron's texts and statistics."),
                LAYER_NEURON,
                "The sequences with the neuron's highest and lowest activations, each with every token's activation, "
                "and exact statistics (mean, std, quantiles, histogram) over the corpus.",
            ),
            **level_paths(
                "neuroscope",
                {"$ref": "#/components/schemas/LayerImportance"},
                _MODEL,
                "The layer's neurons ranked by importance (max - min activation of each neuron's first top text).",
                "Every neuron of the model ranked by importance (max - min activation of each neuron's first top text).",
            ),
        }

    def openapi_schemas(self):
        return {"Text": _TEXT, "Neuroscope": _NEUROSCOPE, "LayerImportance": _LAYER}
