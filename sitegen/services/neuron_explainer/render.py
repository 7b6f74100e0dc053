"""The neuron_explainer service's render half: DeepDecipher's payload {"explanation", "score"}
plus who wrote it and how it was scored, and the page context (the template escapes the text)."""

from __future__ import annotations

from sitegen.services.neuron_explainer.published import SERVICE


class ExplainerLayer:
    def __init__(self, store, layer: int, site):
        self.layer, self.size = layer, site.layer_size
        self.rows: dict[int, dict] = {}
        if store.layer_path(SERVICE, layer).exists():
            self.rows = {r["neuron"]: r for r in store.read_layer(SERVICE, layer).to_pylist()}

    def payload(self, n: int) -> dict:
        r = self.rows.get(n)
        if r is None:
            return {"explanation": None, "score": None, "explainer": None, "source": None, "method": None}
        score = None if r["score"] is None else round(r["score"], 4)
        return {"explanation": r["explanation"], "score": score, "explainer": r["explainer"], "source": r["source"], "method": r["method"]}

    def page(self, n: int) -> dict:
        return self.payload(n)

    def layer_payload(self) -> dict:
        return {"num_neurons": self.size, "explained": len(self.rows)}
