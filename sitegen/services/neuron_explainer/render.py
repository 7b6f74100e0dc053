"""The neuron_explainer service's render half: DeepDecipher's payload {"explanation", "score"}
plus who wrote it and how it was scored, and the page context (the template escapes the text)."""

from __future__ import annotations

import orjson

from sitegen.services.neuron_explainer.published import SERVICE
from sitegen.services.neuron_explainer.scoring import discretise

SCORER_FIELDS = ("calls", "prompt_hash", "method", "unread", "why")


def _scores(row: dict, score: float | None) -> dict:
    """The payload's `scores`: what `sitegen explain` stored, or, for a score without its
    excerpts (imported from OpenAI, or explained before scorers were stored), the simulation score
    alone with no interval."""
    if row.get("scores"):
        return orjson.loads(row["scores"])
    return {"simulation": {"value": score, "ci": None, "n": None}}


# What each score measures, in one line, for the trust panel.
MEANS = {
    "simulation": "how well a simulator reading only the explanation predicts each token's activation "
    "(correlation; 1 perfect, 0 none)",
    "detection": "whether a model reading the explanation tells excerpts where the neuron fires from ones where "
    "it does not (balanced accuracy; 0.5 chance)",
    "fuzzing": "whether it tells the tokens where the neuron fires from tokens marked at random "
    "(balanced accuracy; 0.5 chance)",
}
# balanced accuracies put on the correlation's footing (0 chance, 1 perfect) to compare scorers
_CHANCE_SCALE = {"simulation": lambda x: x, "detection": lambda x: 2 * x - 1, "fuzzing": lambda x: 2 * x - 1}


def _two(x: float) -> str:
    return f"{x:.2f}"


def score_text(entry: dict | None) -> str:
    """ "0.62 [0.31, 0.80]": a score with its interval; "0.62" without one; "" without a score."""
    if not entry or entry.get("value") is None:
        return ""
    ci = entry.get("ci")
    return _two(entry["value"]) + ("" if not ci else f" [{_two(ci[0])}, {_two(ci[1])}]")


def flags(scores: dict | None, scorers: dict | None = None) -> list[str]:
    """Plain warnings about a neuron's scores: answers a judge gave that could not be read (they
    count as chance), an interval wider than its score, and two scorers whose intervals do not
    overlap once put on one footing (0 chance, 1 perfect: a balanced accuracy b counts as 2b - 1)."""
    out = []
    for name, made in (scorers or {}).items():
        if made.get("unread"):
            out.append(
                f"{made['unread']} of {made.get('calls')} {name} answers could not be read (no list of 0s and 1s); "
                f"their excerpts count as answered 0, so the {name} score leans towards chance (0.5)."
            )
    done = {k: v for k, v in (scores or {}).items() if v and v.get("value") is not None}
    for name, s in done.items():
        if s.get("ci") and s["ci"][1] - s["ci"][0] > s["value"]:
            out.append(
                f"The {name} interval ({_two(s['ci'][0])} to {_two(s['ci'][1])}) is wider than the score "
                f"({_two(s['value'])}): too few excerpts, or too noisy, to trust this number."
            )
    names = [n for n in MEANS if n in done and done[n].get("ci")]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            la, ha = (_CHANCE_SCALE[a](x) for x in done[a]["ci"])
            lb, hb = (_CHANCE_SCALE[b](x) for x in done[b]["ci"])
            if la > hb or lb > ha:
                high, low = (a, b) if la > hb else (b, a)
                out.append(
                    f"The scorers disagree: {high} rates the explanation clearly higher than {low} "
                    "(their intervals do not overlap, measured from chance), so it captures one side of the "
                    "neuron better than the other."
                )
    return out


class ExplainerLayer:
    def __init__(self, store, layer: int, site):
        self.layer, self.size = layer, site.layer_size
        self.rows: dict[int, dict] = {}
        if store.layer_path(SERVICE, layer).exists():
            self.rows = {r["neuron"]: r for r in store.read_layer(SERVICE, layer).to_pylist()}

    def payload(self, n: int) -> dict:
        r = self.rows.get(n)
        if r is None:
            return {
                "explanation": None,
                "score": None,
                "scores": None,
                "explainer": None,
                "source": None,
                "method": None,
            }
        score = None if r["score"] is None else round(r["score"], 4)
        out = {
            "explanation": r["explanation"],
            "score": score,
            "scores": _scores(r, score),
            "explainer": r["explainer"],
            "source": r["source"],
            "method": r["method"],
        }
        if r.get("usage"):  # scored by `sitegen explain`: "score" is on the test split
            out["valid_score"] = (
                None if r.get("valid_score") is None else round(r["valid_score"], 4)
            )  # the choice's, with --samples
            out["usage"] = orjson.loads(r["usage"])
            out["prompt_hash"] = r.get("prompt_hash")
            # which echo logprob entry was read as each placeholder's distribution ("own" or "next");
            # None with logprobs: scored without alignment detection, to be re-scored (needs_rescoring)
            out["logprob_alignment"] = r.get("logprob_alignment")
            # what the explainer was shown: "top excerpts" or "contrastive" (with hard negatives)
            out["explainer_prompt"] = r.get("explainer_prompt") or "top excerpts"
            if r.get("scorers"):  # how each score was made: LLM calls and the hash of every prompt sent
                out["scorers"] = {
                    name: {k: v for k, v in made.items() if k in SCORER_FIELDS}
                    for name, made in orjson.loads(r["scorers"]).items()
                }
        return out

    def page(self, n: int) -> dict:
        """The payload plus, for explanations sitegen scored, the scored sequences: real and
        simulated activations side by side (both on the 0-10 scale of the prompts)."""
        out = self.payload(n)
        r = self.rows.get(n)
        details = orjson.loads(r["details"]) if r is not None and r.get("details") else []
        rows = []
        for d in details:
            top = max((a for a in d["true"]), default=0.0)
            real = discretise(d["true"], top) if top > 0 else [0] * len(d["true"])
            rows.append(
                [(tok, lv, None if s is None else round(s, 1)) for tok, lv, s in zip(d["tokens"], real, d["simulated"])]
            )
        out["scored"] = rows
        scores = out.get("scores") or {}
        out["panel"] = [
            {"name": name, "text": score_text(scores[name]) or "undefined", "n": scores[name].get("n"), "what": what}
            for name, what in MEANS.items()
            if name in scores
        ]
        out["flags"] = flags(scores, out.get("scorers"))
        return out

    def layer_payload(self) -> dict:
        return {"num_neurons": self.size, "explained": len(self.rows)}
