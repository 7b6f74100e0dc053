"""The correlation service's render half (no torch): each neuron's most correlated neurons of its
layer, Pearson's r from the layer's exact sums."""

from __future__ import annotations

import numpy as np
from markupsafe import Markup, escape

from sitegen.errors import BuildError
from sitegen.services.correlation.data import TABLE_SCHEMA, model_store, table_cross, table_sums

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


def pearson_cross(tokens: int, a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], cross) -> np.ndarray:
    """(d_a, d_b) Pearson r between two unit sets counted over the same tokens, from each set's
    (sums, Gram diagonal) and their products `cross` (d_a, d_b); NaN where either unit is constant."""
    if tokens < 2:
        return np.full(cross.shape, np.nan)
    sa, sb = (x[0].astype(np.float64) for x in (a, b))
    cov = cross.astype(np.float64) - np.outer(sa, sb) / tokens
    sd = []
    for (_, diag), s in ((a, sa), (b, sb)):
        var = diag.astype(np.float64) - s * s / tokens
        var[var <= 0] = np.nan
        sd.append(np.sqrt(var))
    return np.clip(cov / (sd[0][:, None] * sd[1][None, :]), -1.0, 1.0)  # one product: r(b, a) is r(a, b).T exactly


def top_correlated(r: np.ndarray, top_n: int = TOP_N, others: bool = True) -> list[list[tuple[int, float]]]:
    """Per row, the TOP_N columns of highest r, descending, ties to the lower index; columns with no
    defined r (constant units) are left out, and so is the row's own unit when `others` (r of a
    layer with itself)."""
    ranked = np.where(np.isnan(r), -np.inf, r)
    if others:
        np.fill_diagonal(ranked, -np.inf)
    order = np.argsort(-ranked, axis=1, kind="stable")[:, :top_n]
    out = []
    for n in range(r.shape[0]):
        out.append([(int(j), float(ranked[n, j])) for j in order[n] if np.isfinite(ranked[n, j])])
    return out


def _moments(table) -> tuple[int, tuple[np.ndarray, np.ndarray]]:
    tokens, sums, _, gram = table_sums(table)
    return tokens, (sums, np.diagonal(gram).copy())


def _same_tokens(a: int, b: int, what: str) -> None:
    if a != b:
        raise BuildError(f"{what}: {a} counted tokens against {b}; the stores are not of one corpus pass, recompute")


def _base_neurons(store, layer: int, record: dict):
    """A dictionary's latents against the neurons of the layer it reads at: (base model name, that
    layer, r (d_sae, d_mlp)), or None when the table has no products or its model's store (the folder
    two levels up, <model store>/dictionaries/<name>) is not there."""
    table = store.read_layer("correlation", layer)
    cross = table_cross(table)
    base = None if cross is None else model_store(store)
    if base is None:
        return None
    tokens, latents = _moments(table)
    base_tokens, neurons = _moments(base.read_layer("correlation", int(record["layer"]), columns=TABLE_SCHEMA.names))
    _same_tokens(
        tokens, base_tokens, f"{store.layer_path('correlation', layer)} and its model's layer {record['layer']}"
    )
    return base.manifest["model"]["name"], int(record["layer"]), pearson_cross(tokens, latents, neurons, cross)


def _dictionary_latents(store, layer: int, tokens: int, neurons) -> list[tuple[str, np.ndarray]]:
    """The neurons of LAYER against the latents of each dictionary reading at it: (its model name,
    r (d_mlp, d_sae)) per dictionary whose store has the products."""
    out = []
    for sub in store.dictionary_stores():
        record = sub.manifest["dictionary"]
        if int(record["layer"]) != layer or not sub.has_service("correlation"):
            continue
        table = sub.read_layer("correlation", 0)
        cross = table_cross(table)
        if cross is None:
            continue
        sub_tokens, latents = _moments(table)
        _same_tokens(
            sub_tokens, tokens, f"{sub.layer_path('correlation', 0)} and {store.layer_path('correlation', layer)}"
        )
        out.append((sub.manifest["model"]["name"], pearson_cross(tokens, neurons, latents, cross.T)))
    return out


def _top_across(rs: list[tuple[str, np.ndarray]], top_n: int = TOP_N) -> list[list[tuple[str, int, float]]]:
    """Per row, the TOP_N (model, column, r) of highest r across several matrices of the same rows,
    descending; ties to the earlier matrix, then the lower index."""
    per = [top_correlated(r, top_n, others=False) for _, r in rs]
    out = []
    for n in range(rs[0][1].shape[0] if rs else 0):
        merged = sorted(((-r, k, j) for k, top in enumerate(per) for j, r in top[n]))[:top_n]
        out.append([(rs[k][0], j, -neg) for neg, k, j in merged])
    return out


class CorrelationLayer:
    def __init__(self, store, layer: int, site):
        self.layer, self.site = layer, site
        t = store.read_layer("correlation", layer, columns=TABLE_SCHEMA.names)  # Store.open checked them
        self.tokens, sums, self.clamped, gram = table_sums(t)
        self.top = top_correlated(pearson(self.tokens, sums, gram))
        # Across unit kinds (compute --correlations --sae): a latent's neurons of the layer its
        # dictionary reads at, or a neuron's latents of the dictionaries reading at its layer.
        self.base = self.top_neurons = self.top_latents = None
        record = store.manifest.get("dictionary")
        if record is not None:
            found = _base_neurons(store, layer, record)
            if found is not None:
                self.base, self.base_layer, r = found
                self.top_neurons = top_correlated(r, others=False)
        elif store.manifest.get("dictionaries"):
            rs = _dictionary_latents(store, layer, self.tokens, (sums, np.diagonal(gram).copy()))
            if rs:
                self.top_latents = _top_across(rs)

    def correlated(self, n: int) -> list[dict]:
        return [{"layer": self.layer, "neuron": j, "r": round(r, 4)} for j, r in self.top[n]]

    def correlated_neurons(self, n: int) -> list[dict]:
        return [{"layer": self.base_layer, "neuron": j, "r": round(r, 4)} for j, r in self.top_neurons[n]]

    def correlated_latents(self, n: int) -> list[dict]:
        return [{"model": m, "latent": j, "r": round(r, 4)} for m, j, r in self.top_latents[n]]

    def payload(self, n: int) -> dict:
        out = {
            "neuron_index": {"layer": self.layer, "neuron": n},
            "tokens": self.tokens,
            "clamped": int(self.clamped[n]),
            "correlated": self.correlated(n),
        }
        if self.top_neurons is not None:
            out["correlated_neurons"] = self.correlated_neurons(n)
        if self.top_latents is not None:
            out["correlated_latents"] = self.correlated_latents(n)
        return out

    def page(self, n: int) -> dict:
        """The lists pre-rendered (escaped here): thousands of pages, few template loops."""
        model = escape(self.site.name)
        items = "".join(
            f'<li><a href="/{model}/{e["layer"]}/{e["neuron"]}.html">{e["layer"]}:{e["neuron"]}</a> '
            f"<small>r = {e['r']:.2f}</small></li>"
            for e in self.correlated(n)
        )
        out = {"links": Markup(items), "tokens": self.tokens, "clamped": int(self.clamped[n])}
        out["neuron_links"] = out["latent_links"] = None
        if self.top_neurons is not None:
            base = escape(self.base)
            out["base"], out["base_layer"] = self.base, self.base_layer
            out["neuron_links"] = Markup(
                "".join(
                    f'<li><a href="/{base}/{e["layer"]}/{e["neuron"]}.html">{e["layer"]}:{e["neuron"]}</a> '
                    f"<small>r = {e['r']:.2f}</small></li>"
                    for e in self.correlated_neurons(n)
                )
            )
        if self.top_latents is not None:
            out["latent_links"] = Markup(
                "".join(
                    f'<li><a href="/{escape(e["model"])}/0/{e["latent"]}.html">{escape(e["model"])} {e["latent"]}</a> '
                    f"<small>r = {e['r']:.2f}</small></li>"
                    for e in self.correlated_latents(n)
                )
            )
        return out

    def layer_payload(self) -> dict:
        return {"num_neurons": len(self.top), "tokens": self.tokens}
