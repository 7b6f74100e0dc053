"""The neuron_explainer service as the build sees it (registered under `sitegen.services`)."""

from __future__ import annotations

from markupsafe import Markup

from sitegen.services.base import (
    LAYER_NEURON,
    MODEL_COUNT,
    Cell,
    Column,
    Service,
    api_envelope,
    api_get,
    level_paths,
)
from sitegen.services.neuron_explainer.published import TABLE_SCHEMA

# what each score measures, in one line (the API schema and the trust panel say it)
SCORER_MEANS = {
    "simulation": "How well a simulator reading only the explanation predicts each token's activation: the "
    "correlation of simulated with real activations over held-out excerpts (1 perfect, 0 none).",
    "detection": "Whether a model reading the explanation tells held-out excerpts where the neuron fires from ones "
    "where it does not: balanced accuracy (1 perfect, 0.5 chance, 0 inverted).",
    "fuzzing": "Whether a model reading the explanation tells the tokens where the neuron fires from tokens marked "
    "at random: balanced accuracy (1 perfect, 0.5 chance, 0 inverted).",
}
SCORER_NAMES = tuple(SCORER_MEANS)
_SCORE = {
    "type": "object",
    "required": ["value", "ci", "n"],
    "description": "One score of an explanation.",
    "properties": {
        "value": {"type": ["number", "null"], "description": "The score (null: undefined). Rounded to 4 decimals."},
        "ci": {
            "type": ["array", "null"],
            "items": {"type": "number"},
            "minItems": 2,
            "maxItems": 2,
            "description": "[low, high]: the 95% percentile bootstrap interval over the scored excerpts (1,000 "
            "resamples, seed 0); null where there is none.",
        },
        "n": {"type": ["integer", "null"], "description": "Excerpts scored (null: not known, for an imported score)."},
    },
}


_S = lambda d: {"type": ["string", "null"], "description": d}
_EXPLAINER = {
    "type": "object",
    "required": ["explanation", "score", "scores"],
    "description": "A neuron's explanation and its simulation score; every field null for a neuron with no explanation.",
    "properties": {
        "explanation": _S(
            "One sentence, written by a language model from the neuron's top texts, saying what makes it fire."
        ),
        "score": {
            "type": ["number", "null"],
            "description": "How well the explanation predicts the activations: the correlation between "
            "the simulator's predicted and the real activations, pooled over every token of the "
            "scored texts (1: perfect; 0: no correlation); for `sitegen explain`, on "
            "the held-out test texts. Rounded to 4 decimals.",
        },
        "scores": {
            "type": ["object", "null"],
            "description": "Every score of the explanation with its 95% bootstrap confidence interval over the "
            "scored excerpts (seeded: the same store gives the same interval). `simulation` is `score`; `detection` "
            "and `fuzzing` (`sitegen explain` only, with those scorers) are balanced accuracies on held-out excerpts "
            "(1: perfect, 0.5: chance, 0: inverted). An imported score has no interval.",
            "properties": {name: {**_SCORE, "description": what} for name, what in SCORER_MEANS.items()},
            "additionalProperties": False,
        },
        "scorers": {
            "type": "object",
            "description": "`sitegen explain` only: how each score was made (and `explanation`, the explainer's request).",
            "additionalProperties": {
                "type": "object",
                "properties": {
                    "calls": {"type": "integer", "description": "Requests to the language model."},
                    "prompt_hash": _S("SHA-256 over every prompt this scorer sent (null: none sent)."),
                    "method": _S(
                        'simulation: as `method`; detection and fuzzing: "constrained" where the judge\'s '
                        "answers were held to a list of 0/1 (the in-process model picks the likelier of 0 and 1 at "
                        "each value), absent where the judge wrote free text."
                    ),
                    "unread": {
                        "type": "integer",
                        "description": "detection and fuzzing: answers that could not be read, scored as 0 for "
                        "every excerpt of their request.",
                    },
                    "why": _S("Why the scorer scored nothing (e.g. no held-out excerpt where the neuron fires)."),
                },
            },
        },
        "explainer": _S("The language model that wrote the explanation (and, for `sitegen explain`, simulated it)."),
        "source": _S(
            'Where the explanation comes from: "sitegen explain" (written and scored here) or "openai-published" '
            "(imported from OpenAI's published explanations)."
        ),
        "method": _S(
            "How it was scored: the simulation method(s) used, joined by '+', or \"published\" for an imported score."
        ),
        "valid_score": {
            "type": ["number", "null"],
            "description": "`sitegen explain` only: the score on the validation texts the explanation "
            "was chosen on (with --samples > 1).",
        },
        "usage": {
            "type": "object",
            "description": "`sitegen explain` only: what writing and scoring this explanation cost.",
            "properties": {
                "prompt_tokens": {"type": "integer", "description": "Prompt tokens sent to the language model."},
                "completion_tokens": {"type": "integer", "description": "Tokens the language model answered with."},
                "requests": {"type": "integer", "description": "Requests made."},
            },
        },
        "explainer_prompt": _S(
            '`sitegen explain` only: what the explainer was shown: "top excerpts" (the neuron\'s train top '
            'excerpts), or "contrastive" (those and hard negatives: excerpts sharing their firing words where the neuron '
            "does not fire; `--contrastive`)."
        ),
        "prompt_hash": _S(
            "`sitegen explain` only: SHA-256 of the prompt messages that asked for the explanation, so a rerun can be checked against them."
        ),
    },
}


def uses_logprobs(row: dict) -> bool:
    """Whether `sitegen explain` scored the explanation from echo logprobs (method "logprobs",
    alone or with the fallback)."""
    return row.get("source") == "sitegen explain" and "logprobs" in (row.get("method") or "").split("+")


def needs_rescoring(row: dict) -> bool:
    """A score read from echo logprobs with no recorded alignment (which entry predicts each
    token): made before alignment detection, possibly from the wrong entry."""
    return uses_logprobs(row) and not row.get("logprob_alignment")


def explanations(site) -> dict[int, str]:
    """Global neuron id -> explanation (search indexes and result previews read it), cached per model."""

    def read() -> dict[int, str]:
        out = {}
        if site.store.has_service("neuron_explainer"):
            for layer in range(site.num_layers):
                if site.store.layer_path("neuron_explainer", layer).exists():
                    t = site.store.read_layer("neuron_explainer", layer, columns=["neuron", "explanation"]).to_pydict()
                    for n, text in zip(t["neuron"], t["explanation"]):
                        if text:
                            out[layer * site.layer_size + n] = text
        return out

    return site.cached("neuron_explainer.explanations", read)


def score_notes(site) -> dict[int, str]:
    """Global neuron id -> "simulation 0.62 [0.31, 0.80] · detection 0.71 [0.60, 0.80]": every
    score of the neuron's explanation with its interval, for the search results' previews."""
    from sitegen.services.neuron_explainer.render import ExplainerLayer, score_text

    def read() -> dict[int, str]:
        out = {}
        if site.store.has_service("neuron_explainer"):
            for layer in range(site.num_layers):
                view = ExplainerLayer(site.store, layer, site)
                for n in sorted(view.rows):
                    payload = view.payload(n)
                    scores = (payload["scores"] or {}).items() if payload["explanation"] else ()
                    parts = [f"{name} {score_text(s)}" for name, s in scores if score_text(s)]
                    if parts:
                        out[layer * site.layer_size + n] = " · ".join(parts)
        return out

    return site.cached("neuron_explainer.score_notes", read)


_LAYER = {
    "type": "object",
    "required": ["num_neurons", "explained"],
    "description": "The layer's explanation count.",
    "properties": {
        "num_neurons": {"type": "integer", "description": "Neurons in the layer."},
        "explained": {"type": "integer", "description": "Neurons of the layer with an explanation."},
    },
}


class NeuronExplainer(Service):
    name = "neuron_explainer"
    title = "Explanation"
    description = "A one-sentence explanation written by a language model, with its simulation score."
    column_order = 10
    text_search = True
    table_schema = TABLE_SCHEMA  # published.py; explained neurons only (explain adds columns after these)

    def neuron_provenance(self, payloads, layer, neuron, model_provenance):
        ex = payloads.get(self.name)
        if not ex or not ex.get("explanation"):
            return None
        # `sitegen explain` asks one model to write and to simulate; imported ones say whose they are.
        simulator = ex.get("explainer") if ex.get("source") == "sitegen explain" else None
        return {
            "explainer": ex.get("explainer"),
            "simulator": simulator,
            "source": ex.get("source"),
            "method": ex.get("method"),
            "prompt_hash": ex.get("prompt_hash"),
            "explainer_prompt": ex.get("explainer_prompt"),
            "logprobs": uses_logprobs(ex),
            "logprob_alignment": ex.get("logprob_alignment"),
            "needs_rescoring": needs_rescoring(ex),
            # per scorer: its LLM calls and the hash over every prompt it sent
            "scorers": [
                (name, made.get("calls"), made.get("prompt_hash"))
                for name, made in (ex.get("scorers") or {}).items()
                if name != "explanation"
            ],
        }

    def build_notes(self, store) -> list[str]:
        """One line when explanations scored from echo logprobs carry no logprob alignment: the
        entry read at each placeholder may have been the next token's (llama-cpp-python), so the
        score may measure nothing; rerunning `sitegen explain` on them re-scores them."""
        import pyarrow.parquet as pq

        stale = []
        for layer in range(int(store.manifest["model"]["num_layers"])):
            path = store.layer_path(self.name, layer)
            if not path.exists():
                continue
            names = pq.read_schema(path).names
            columns = [c for c in ("neuron", "source", "method", "logprob_alignment") if c in names]
            t = store.read_layer(self.name, layer, columns=columns).to_pylist()
            stale += [f"{layer}:{r['neuron']}" for r in t if needs_rescoring(r)]
        if not stale:
            return []
        shown = ",".join(stale[:5]) + (f",... ({len(stale)} in all)" if len(stale) > 5 else "")
        return [
            f"{store.root}: {len(stale)} explanation score{'s' if len(stale) != 1 else ''} ({shown}) were read from echo logprobs with no "
            f"recorded logprob alignment and may measure nothing; re-score: sitegen explain {store.root} --neurons {','.join(stale)} "
            "--endpoint URL --model NAME"
        ]

    def cli_commands(self):
        from sitegen.services.neuron_explainer.cli import explain, import_explanations_cmd

        return [explain, import_explanations_cmd]

    def open_layer(self, store, layer, site):
        from sitegen.services.neuron_explainer.render import ExplainerLayer

        return ExplainerLayer(store, layer, site)

    def search_texts(self, site):
        return explanations(site)

    def search_notes(self, site):
        return score_notes(site)

    def layer_columns(self):
        return [Column("Explanation score"), Column("Explanation", None)]

    def neuron_summary(self, view, n, payload):
        from sitegen.services.neuron_explainer.render import score_text

        if not payload["explanation"]:
            return []
        text = score_text((payload.get("scores") or {}).get("simulation"))
        score = f" (score {text})" if text else ""
        return [("explanation", Markup('<a href="#explanation">{}</a>{}').format(payload["explanation"], score))]

    def layer_cells(self, view, n, payload):
        from sitegen.services.neuron_explainer.render import score_text

        score = payload["score"]
        text = score_text((payload.get("scores") or {}).get("simulation"))
        return [
            Cell(Markup.escape(text), str(-2 if score is None else score)),
            Cell(Markup.escape(payload["explanation"] or "")),
        ]

    def openapi_paths(self):
        return {
            "/api/{model}/neuron_explainer/{layer}/{neuron}": api_get(
                "A neuron's explanation and its simulation score (nulls when it has none)",
                api_envelope("#/components/schemas/NeuronExplainer", "The neuron's explanation."),
                LAYER_NEURON,
                "DeepDecipher's {explanation, score} plus who wrote it and how it was scored; nulls for a neuron with no explanation.",
            ),
            **level_paths(
                "neuron_explainer",
                _LAYER,
                MODEL_COUNT,
                "How many of the layer's neurons have an explanation.",
                "The model's layer count (the data is per neuron).",
            ),
        }

    def openapi_schemas(self):
        return {"NeuronExplainer": _EXPLAINER}
