"""The logits service's render half: promoted/suppressed output tokens and top input tokens."""

from __future__ import annotations

from markupsafe import Markup

from sitegen.services.logits.data import TABLE_SCHEMA


class LogitsLayer:
    def __init__(self, store, layer: int, site):
        self.layer, self.site = layer, site
        t = store.read_layer("logits", layer, columns=TABLE_SCHEMA.names)  # Store.open checked them
        self.cols = {name: t.column(name).to_pylist() for name in t.column_names}

    def _pairs(self, n: int, kind: str) -> list[dict]:
        ids, vals = self.cols[f"{kind}_ids"], self.cols[f"{kind}_vals"]
        if ids[n] is None:  # no input tokens: an activation function sitegen cannot evaluate
            return []
        vocab = self.site.vocab
        return [{"token": vocab[i], "token_id": i, "value": round(v, 4)} for i, v in zip(ids[n], vals[n])]

    def payload(self, n: int) -> dict:
        return {
            "neuron_index": {"layer": self.layer, "neuron": n},
            "promoted": self._pairs(n, "promoted"),
            "suppressed": self._pairs(n, "suppressed"),
            "input_tokens": self._pairs(n, "input"),
        }

    def page(self, n: int) -> dict:
        """Table rows pre-rendered (escaped here) per list: thousands of pages, few template loops."""
        rows = {}
        esc_vocab = self.site.esc_shown_vocab
        for kind in ("promoted", "suppressed", "input"):
            ids, vals = self.cols[f"{kind}_ids"], self.cols[f"{kind}_vals"]
            if ids[n] is None:
                continue
            rows[kind] = Markup(
                "".join(
                    [f"<tr><td><code>{esc_vocab[i]}</code></td><td>{v:.3g}</td></tr>" for i, v in zip(ids[n], vals[n])]
                )
            )
        return rows

    def layer_payload(self) -> dict:
        return {"num_neurons": len(self.cols["neuron"])}
