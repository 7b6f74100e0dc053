"""The logits service's render half: promoted/suppressed output tokens, top input tokens and the
logit histogram."""

from __future__ import annotations

import numpy as np
from markupsafe import Markup, escape

from sitegen.services.charts import Box, log_count_svg
from sitegen.services.logits.data import TABLE_SCHEMA

HIST_BINS = 40  # bins of the logit histogram, as SAEDashboard's


def logit_hist_edges(lo: float, hi: float, bins: int = HIST_BINS) -> np.ndarray:
    """The float32 edges np.histogram(values, bins) uses for float32 values whose min is lo and max
    hi (they depend on nothing else; a constant row gets [lo - 0.5, hi + 0.5], as numpy's)."""
    return np.histogram_bin_edges(np.array([lo, hi], dtype=np.float32), bins)


class LogitsLayer:
    def __init__(self, store, layer: int, site):
        self.layer, self.site = layer, site
        t = store.read_layer("logits", layer, columns=TABLE_SCHEMA.names)  # Store.open checked them
        self.cols = {name: t.column(name).to_pylist() for name in t.column_names}
        self.size = int(store.manifest["model"]["layer_size"])  # connected units are global ids: layer * size + neuron
        self.gated = bool(store.manifest["model"].get("gated_mlp", False))

    def connected(self, n: int) -> dict | None:
        """{"upstream", "downstream"}: lists of {"layer", "neuron", "weight"}, largest weight first;
        None where the store has no connected units (one layer, a dictionary's latents)."""
        if self.cols["upstream_units"][n] is None:  # null: a one-layer model or a dictionary's latents
            return None
        size = self.size
        return {
            side: [
                {"layer": u // size, "neuron": u % size, "weight": round(w, 4)}
                for u, w in zip(self.cols[f"{side}_units"][n], self.cols[f"{side}_weights"][n])
            ]
            for side in ("upstream", "downstream")
        }

    def _pairs(self, n: int, kind: str) -> list[dict]:
        ids, vals = self.cols[f"{kind}_ids"], self.cols[f"{kind}_vals"]
        if ids[n] is None:  # no input tokens: an activation function sitegen cannot evaluate
            return []
        vocab = self.site.vocab
        return [{"token": vocab[i], "token_id": i, "value": round(v, 4)} for i, v in zip(ids[n], vals[n])]

    def histogram(self, n: int) -> dict | None:
        """{"edges", "counts"} of the neuron's direct effects on every vocabulary logit. Edges to 6
        significant digits."""
        counts = self.cols["logit_hist_counts"]
        edges = logit_hist_edges(self.cols["logit_hist_lo"][n], self.cols["logit_hist_hi"][n], len(counts[n]))
        return {"edges": [float(f"{e:.6g}") for e in edges.tolist()], "counts": counts[n]}

    def payload(self, n: int) -> dict:
        out = {
            "neuron_index": {"layer": self.layer, "neuron": n},
            "promoted": self._pairs(n, "promoted"),
            "suppressed": self._pairs(n, "suppressed"),
            "input_tokens": self._pairs(n, "input"),
        }
        hist = self.histogram(n)
        if hist is not None:
            out["logit_histogram"] = hist
        connected = self.connected(n)
        if connected is not None:
            out["connected"] = connected
        return out

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
        hist = self.histogram(n)
        if hist is not None:
            rows["histogram_svg"] = Markup(histogram_svg(hist["counts"], hist["edges"]))
        connected = self.connected(n)
        if connected is not None:
            rows["gated"] = self.gated
            model = escape(self.site.name)
            for side, units in connected.items():
                rows[side] = Markup(
                    "".join(
                        f'<li><a href="/{model}/{e["layer"]}/{e["neuron"]}.html">{e["layer"]}:{e["neuron"]}</a> '
                        f"<small>{e['weight']:.3g}</small></li>"
                        for e in units
                    )
                )
        return rows

    def layer_payload(self) -> dict:
        return {"num_neurons": len(self.cols["neuron"])}


# The chart's box: a plot area of PLOT_W x PLOT_H, room for the axes' labels around it.
BOX = Box(62, 400, 100, 470, 140)
PLOT_X, PLOT_W, PLOT_H = BOX.plot_x, BOX.plot_w, BOX.plot_h


def histogram_svg(counts: list[int], edges: list[float]) -> str:
    """Equal-width bars (tokens per bin of the direct logit effect) on a log count axis with a tick
    at every power of ten, so the few tokens in the tails (the promoted and suppressed ones) stay
    visible: a count c >= 1 stands (1 + log10 c) / (1 + decades) of the plot's height. Bars whose
    bin lies below zero are blue, the others red; a dashed line marks zero. Numbers only: nothing
    here comes from the corpus or the vocabulary."""
    if not counts or max(counts) == 0:
        return ""
    lo, hi = edges[0], edges[-1]
    width = PLOT_W / len(counts)
    decades = max(1, int(np.ceil(np.log10(max(counts)))))
    c = np.maximum(np.asarray(counts, dtype=np.float64), 1)
    heights = np.rint(PLOT_H * (1 + np.log10(c)) / (1 + decades)).astype(np.int64).tolist()
    neg, pos = [], []
    for i, (n, h) in enumerate(zip(counts, heights)):
        if n:
            (neg if edges[i + 1] <= 0 else pos).append(
                f"M{round(PLOT_X + i * width, 1):g} {PLOT_H}v-{h}h{width:g}v{h}z"
            )
    bars = "".join(f'<path class="{k}" d="{"".join(v)}"/>' for k, v in (("neg", neg), ("pos", pos)) if v)
    zero_x = round(PLOT_X + (0 - lo) * PLOT_W / (hi - lo), 1) if lo < 0 < hi else None
    return log_count_svg(
        BOX,
        bars,
        lo,
        hi,
        zero_x,
        decades,
        "logit histogram: vocabulary tokens per bin of the direct logit effect, log count axis",
        f"The direct effect on every vocabulary logit, {len(counts)} equal-width bins; bar height: tokens, log scale",
        "direct logit effect",
    )
