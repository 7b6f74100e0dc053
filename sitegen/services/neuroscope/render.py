"""The neuroscope service's render half: DeepDecipher's neuroscope payload and the page context.

Speed matters here (one call per neuron, tens of thousands per model): a layer's traces are
rounded once with numpy, token strings are cached per sequence (neurons share sequences), and
each sequence's token spans are joined in Python rather than looped over in the template.
"""

from __future__ import annotations

import numpy as np
from markupsafe import Markup, escape

from sitegen.services.tokens import BUCKETS

WINDOW_BEFORE = 12  # tokens shown before the peak token on the page (the JSON has every token)
WINDOW_AFTER = 4
# Opening tag per colour bucket -9..9 (index + BUCKETS); unquoted class values are valid HTML.
_OPEN = [f"<i class=n{-b}>" for b in range(-BUCKETS, 0)] + ["<i>"] + [f"<i class=p{b}>" for b in range(1, BUCKETS + 1)]


def _short(x: float) -> str:
    """A rounded activation for a data attribute, without the leading zero ('-.1234')."""
    text = repr(x)
    return text.replace("0.", ".", 1) if text.startswith(("0.", "-0.")) else text


def _r(x: float) -> float:
    return round(float(x), 4)


def _ragged(column, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[float], list[float], list[int]]:
    """A list<list<float>> column as (texts-per-neuron offsets, values-per-text offsets, exact values,
    4-decimal values, colour bucket -9..9 of each value on its neuron's page scale)."""
    arr = column.combine_chunks()
    outer = np.asarray(arr.offsets)
    inner_arr = arr.values
    inner = np.asarray(inner_arr.offsets)
    values = np.asarray(inner_arr.values.to_numpy(zero_copy_only=False), dtype=np.float64)
    neuron_of_text = np.repeat(np.arange(len(outer) - 1), np.diff(outer))
    neuron_of_value = np.repeat(neuron_of_text, np.diff(inner))
    buckets = np.clip(np.rint(values * (BUCKETS / scale[neuron_of_value])), -BUCKETS, BUCKETS).astype(np.int64) + BUCKETS
    return outer, inner, values.tolist(), np.round(values, 4).tolist(), buckets.tolist()


class NeuroscopeLayer:
    def __init__(self, store, layer: int, site):
        self.layer, self.site = layer, site
        t = store.read_layer("neuroscope", layer)
        self.n = t.num_rows
        col = lambda name: t.column(name).to_pylist()  # noqa: E731
        self.seq = {k: col(f"{k}_seq") for k in ("top", "bottom")}
        self.mean, self.std, self.vmin, self.vmax = col("mean"), col("std"), col("min"), col("max")
        # One colour scale per page, centred on zero: the neuron's largest absolute activation.
        self.scale = np.maximum(np.maximum(np.abs(t.column("max").to_numpy()), np.abs(t.column("min").to_numpy())), 1e-9).astype(np.float64)
        self.traces = {k: _ragged(t.column(f"{k}_acts"), self.scale) for k in ("top", "bottom")}
        self.frac_pos, self.count = col("frac_pos"), col("count")
        self.quantiles, self.hist = col("quantiles"), col("hist_counts")
        self.fv = site.first_valid
        self._texts: dict | None = None
        self._texts_for = -1

    # -- per neuron, computed once and shared by payload() and page() --
    def _texts_of(self, n: int) -> dict[str, list[dict]]:
        if self._texts_for == n:
            return self._texts
        vmin, vmax, fv = _r(self.vmin[n]), _r(self.vmax[n]), self.fv
        out = {}
        for kind in ("top", "bottom"):
            outer, inner, exact, rounded, _ = self.traces[kind]
            texts = []
            for j, seq_id in zip(range(outer[n], outer[n + 1]), self.seq[kind][n]):
                s, e = inner[j], inner[j + 1]
                body = exact[s + fv:e] or exact[s:e]
                lo, hi = min(body), max(body)
                peak = body.index(lo if kind == "bottom" else hi) + (fv if e - s > fv else 0)
                seq = self.site.sequence(seq_id)
                texts.append({
                    "data_index": seq_id, "max_activating_token_index": peak,
                    "min_activation": _r(lo), "max_activation": _r(hi), "min_range": vmin, "max_range": vmax,
                    "tokens": self.site.tokens(seq_id), "activations": rounded[s:e], "token_ids": seq["token_ids"],
                    "doc_id": seq["doc_id"], "char_start": seq["char_start"], "char_end": seq["char_end"],
                })
            out[kind] = texts
        self._texts, self._texts_for = out, n
        return out

    def stats(self, n: int) -> dict:
        return {
            "count": self.count[n], "mean": _r(self.mean[n]), "std": _r(self.std[n]), "min": _r(self.vmin[n]), "max": _r(self.vmax[n]),
            "frac_positive": round(self.frac_pos[n], 6),
            "quantiles": {"levels": self.site.quantile_levels, "values": [_r(v) for v in self.quantiles[n]]},
            "histogram": {"lo": _r(self.vmin[n]), "hi": _r(self.vmax[n]), "counts": self.hist[n]},
        }

    # -- API --
    def payload(self, n: int) -> dict:
        texts = self._texts_of(n)
        # The random sample stays in the store (explanation scoring reads it there): the per-neuron
        # JSON carries what the page shows, to keep one neuron's files small.
        return {"neuron_index": {"layer": self.layer, "neuron": n}, "texts": texts["top"], "bottom_texts": texts["bottom"],
                "stats": self.stats(n)}

    def score(self, n: int) -> float:
        """DeepDecipher's importance: max - min activation of the neuron's top text."""
        outer, inner, exact, _, _ = self.traces["top"]
        if outer[n] == outer[n + 1]:
            return 0.0
        s, e = inner[outer[n]], inner[outer[n] + 1]
        body = exact[s + self.fv:e] or exact[s:e]
        return _r(max(body) - min(body))

    def layer_payload(self) -> dict:
        scores = [self.score(i) for i in range(self.n)]
        ranked = sorted(range(self.n), key=lambda i: (-scores[i], i))
        return {"num_neurons": self.n, "important_neurons": [[{"layer": self.layer, "neuron": i}, scores[i]] for i in ranked]}

    def top_token(self, n: int) -> str:
        texts = self._texts_of(n)["top"]
        return texts[0]["tokens"][texts[0]["max_activating_token_index"]] if texts else ""

    # -- page --
    def _sequence_items(self, n: int, kind: str, texts: list[dict]) -> Markup:
        """One <li> per text: the window around the peak as coloured spans, the window's activations
        (data-a, for hover), and its source. JavaScript adds the whole-sequence toggle to cut ones."""
        esc = self.site.esc_vocab
        outer, inner, _, _, buckets = self.traces[kind]
        items = []
        for i, t in enumerate(texts):
            ids, acts, peak = t["token_ids"], t["activations"], t["max_activating_token_index"]
            lo, hi = max(0, peak - WINDOW_BEFORE), min(len(ids), peak + WINDOW_AFTER + 1)
            base = inner[outer[n] + i]
            opens = [_OPEN[b] for b in buckets[base + lo:base + hi]]
            if lo < self.fv:
                opens[: self.fv - lo] = ["<i class=bos>"] * (self.fv - lo)
            spans = "</i>".join([o + esc[tok] for o, tok in zip(opens, ids[lo:hi])]) + "</i>"
            cut = hi < len(ids)
            items.append(
                f'<li><div class="seq" tabindex="0" data-start="{lo}" data-a="' + ",".join(map(_short, acts[lo:hi])) + '">'
                + ('<span class="ell">…</span>' if lo else "") + spans + ('<span class="ell">…</span>' if cut else "")
                + f'</div><details><summary>{acts[peak]:.4g} at {peak}</summary><code>{escape(t["doc_id"])}</code> '
                f'chars {t["char_start"]}–{t["char_end"]}, sequence {t["data_index"]}, {len(ids)} tokens, {t["min_activation"]:.4g} to {t["max_activation"]:.4g}</details></li>'
            )
        return Markup("\n".join(items))

    def page(self, n: int) -> dict:
        texts = self._texts_of(n)
        return {
            "top": self._sequence_items(n, "top", texts["top"]),
            "bottom": self._sequence_items(n, "bottom", texts["bottom"]),
            "stats": self.stats(n),
            "histogram_svg": Markup(histogram_svg(self.hist[n], self.vmin[n], self.vmax[n])),
            "quantiles_csv": ",".join(f"{v:.4g}" for v in self.quantiles[n]),
        }


def histogram_svg(counts: list[int], lo: float, hi: float, width: int = 300, height: int = 64) -> str:
    """50 bars on a log count axis, negative values blue and positive red (two paths, few bytes)."""
    if not counts or max(counts) == 0:
        return ""
    n = len(counts)
    bar = width / n
    top = np.log1p(max(counts))
    base = height - 12
    paths: dict[str, list[str]] = {"neg": [], "pos": []}
    for i, c in enumerate(counts):
        if c == 0:
            continue
        h = max(1.0, base * float(np.log1p(c)) / top)
        centre = lo + (i + 0.5) * (hi - lo) / n
        paths["pos" if centre >= 0 else "neg"].append(f"M{i * bar:.1f} {base}v-{h:.1f}h{bar - 0.5:.1f}v{h:.1f}z")
    zero = f'<path class="zero" d="M{(0 - lo) / (hi - lo) * width:.1f} 0V{base}"/>' if lo < 0 < hi else ""
    parts = "".join(f'<path class="{k}" d="{"".join(v)}"/>' for k, v in paths.items() if v)
    return (f'<svg class="hist" viewBox="0 0 {width} {height}" role="img" aria-label="activation histogram, log counts">{parts}{zero}'
            f'<text x="0" y="{height - 1}">{lo:.3g}</text><text x="{width}" y="{height - 1}" text-anchor="end">{hi:.3g}</text></svg>')
