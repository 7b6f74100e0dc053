"""The correlation service's render half (no torch): each neuron's most correlated neurons of its
layer, Pearson's r from the layer's exact sums."""

from __future__ import annotations

import numpy as np
from markupsafe import Markup, escape

from sitegen.services.correlation.data import TABLE_SCHEMA, table_sums

TOP_N = 10


def pearson(tokens: int, sums: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """(d, d) Pearson r from the sums on the grid (r does not depend on the grid's scale); NaN
    where a neuron is constant over the counted tokens (or there are fewer than 2). Computed in
    float64 from the exact integers: cov = G - s s^T / n."""
    if tokens < 2:
        return np.full(gram.shape, np.nan)
    s = sums.astype(np.float64)
    cov = gram.astype(np.float64) - np.outer(s, s) / tokens
    var = np.diagonal(cov).copy()
    var[var <= 0] = np.nan  # constant: no correlation defined
    sd = np.sqrt(var)
    return np.clip(cov / sd[:, None] / sd[None, :], -1.0, 1.0)


def top_correlated(r: np.ndarray, top_n: int = TOP_N) -> list[list[tuple[int, float]]]:
    """Per neuron, the TOP_N other neurons of highest r, descending, ties to the lower index;
    neurons with no defined r (constant ones) are left out."""
    d = r.shape[0]
    ranked = np.where(np.isnan(r), -np.inf, r)
    np.fill_diagonal(ranked, -np.inf)
    order = np.argsort(-ranked, axis=1, kind="stable")[:, :top_n]
    out = []
    for n in range(d):
        out.append([(int(j), float(ranked[n, j])) for j in order[n] if np.isfinite(ranked[n, j])])
    return out


class CorrelationLayer:
    def __init__(self, store, layer: int, site):
        self.layer, self.site = layer, site
        t = store.read_layer("correlation", layer, columns=TABLE_SCHEMA.names)  # Store.open checked them
        self.tokens, sums, self.clamped, gram = table_sums(t)
        self.top = top_correlated(pearson(self.tokens, sums, gram))

    def correlated(self, n: int) -> list[dict]:
        return [{"layer": self.layer, "neuron": j, "r": round(r, 4)} for j, r in self.top[n]]

    def payload(self, n: int) -> dict:
        return {
            "neuron_index": {"layer": self.layer, "neuron": n},
            "tokens": self.tokens,
            "clamped": int(self.clamped[n]),
            "correlated": self.correlated(n),
        }

    def page(self, n: int) -> dict:
        """The list pre-rendered (escaped here): thousands of pages, few template loops."""
        model = escape(self.site.name)
        items = "".join(
            f'<li><a href="/{model}/{e["layer"]}/{e["neuron"]}.html">{e["layer"]}:{e["neuron"]}</a> '
            f"<small>r = {e['r']:.2f}</small></li>"
            for e in self.correlated(n)
        )
        return {"links": Markup(items), "tokens": self.tokens, "clamped": int(self.clamped[n])}

    def layer_payload(self) -> dict:
        return {"num_neurons": len(self.top), "tokens": self.tokens}
