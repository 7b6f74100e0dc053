"""The neuroscope service's render half: DeepDecipher's neuroscope payload and the page context.

Speed matters here (one call per neuron, tens of thousands per model): a layer's traces are
rounded once with numpy; what belongs to a sequence rather than a neuron (its token strings and
ids already serialised as JSON, its escaped tokens for the page) is made once per sequence, since
neurons share sequences; and each sequence's token spans are joined in Python rather than looped
over in the template.
"""

from __future__ import annotations

import itertools
from collections import Counter
from itertools import chain

import numpy as np
import orjson
import pyarrow.parquet as pq
from markupsafe import Markup

from sitegen.services.charts import Box, log_count_svg
from sitegen.services.neuroscope import stats
from sitegen.services.tokens import BUCKETS, shown

WINDOW_BEFORE = 12  # tokens shown before the peak token on the page (the JSON has every token)
WINDOW_AFTER = 4
# Opening tag per colour bucket -9..9 (index + BUCKETS); unquoted class values are valid HTML.
_OPEN = [f"<i class=n{-b}>" for b in range(-BUCKETS, 0)] + ["<i>"] + [f"<i class=p{b}>" for b in range(1, BUCKETS + 1)]
_COLUMNS = [
    "top_seq",
    "top_acts",
    "bottom_seq",
    "bottom_acts",
    "mean",
    "std",
    "min",
    "max",
    "frac_pos",
    "count",
    "quantiles",
    "hist_edges",
    "hist_counts",
]
_PEAK = (
    [f'<i class="n{-b} x">' for b in range(-BUCKETS, 0)]
    + ['<i class="x">']
    + [f'<i class="p{b} x">' for b in range(1, BUCKETS + 1)]
)
_ELL = '<span class="ell">…</span>'


_GLU_COLUMNS = ["glu_count", "glu_mass_fx", "glu_top_seq", "glu_top_pos", "glu_top_act"]
_INTERVAL_COLUMNS = ["interval_top", "interval_group", "interval_seq", "interval_acts", "interval_tokens"]
_QUADRANTS = (("+", "+"), ("+", "-"), ("-", "+"), ("-", "-"))  # (gate, up) signs: + is > 0, - is <= 0
GLU_BEFORE, GLU_AFTER = 8, 3  # tokens shown around a quadrant's top example


def _r(x: float) -> float:
    return round(float(x), 4)


class Traces:
    """One kind of text (top or bottom) for a whole layer, flattened: offsets, values rounded for
    JSON, colour buckets, and each text's min, max and peak over its counted positions, all
    computed with numpy once per layer rather than per text."""

    def __init__(self, column, scale: np.ndarray, first_valid: int, lowest: bool):
        arr = column.combine_chunks()
        self.outer = np.asarray(arr.offsets)  # texts of neuron n: outer[n]:outer[n+1]
        inner_arr = arr.values
        self.inner = np.asarray(inner_arr.offsets)  # values of text j: inner[j]:inner[j+1]
        values = np.asarray(inner_arr.values.to_numpy(zero_copy_only=False), dtype=np.float64)
        n_texts = len(self.inner) - 1
        lengths = np.diff(self.inner)
        text_of_value = np.repeat(np.arange(n_texts), lengths)
        neuron_of_value = np.repeat(np.repeat(np.arange(len(self.outer) - 1), np.diff(self.outer)), lengths)
        self.rounded = np.round(values, 4)  # numpy: a text's activations go to orjson as a view, no Python floats
        self.buckets = (
            np.clip(np.rint(values * (BUCKETS / scale[neuron_of_value])), -BUCKETS, BUCKETS).astype(np.int64) + BUCKETS
        ).tolist()
        if n_texts == 0:
            self.lo = self.hi = self.peak = []
            self.outer, self.inner = self.outer.tolist(), self.inner.tolist()
            return
        position = np.arange(len(values)) - self.inner[:-1][text_of_value]
        counted = (position >= first_valid) | (lengths[text_of_value] <= first_valid)
        starts = self.inner[:-1]
        hi = np.maximum.reduceat(np.where(counted, values, -np.inf), starts)
        lo = np.minimum.reduceat(np.where(counted, values, np.inf), starts)
        target = (lo if lowest else hi)[text_of_value]
        first_hit = np.where(counted & (values == target), position, np.iinfo(np.int64).max)
        self.peak = np.minimum.reduceat(first_hit, starts).tolist()
        self.lo, self.hi = np.round(lo, 4).tolist(), np.round(hi, 4).tolist()
        # plain ints from here on: the per-text loops index and slice lists with them
        self.outer, self.inner = self.outer.tolist(), self.inner.tolist()


class NeuroscopeLayer:
    def __init__(self, store, layer: int, site):
        self.layer, self.site = layer, site
        # the columns the pages and JSON show (not the raw sums and fine histogram kept for merging)
        # A gated MLP's quadrant columns, where the store has them (compute.GluQuadrants).
        self.gated = bool(store.manifest["model"].get("gated_mlp", False))
        names = set(pq.read_schema(store.layer_path("neuroscope", layer)).names)
        has_glu = set(_GLU_COLUMNS) <= names
        # examples across the activation range, where the store has them (compute.IntervalExamples)
        has_intervals = set(_INTERVAL_COLUMNS) <= names
        t = store.read_layer(
            "neuroscope",
            layer,
            columns=_COLUMNS + (_GLU_COLUMNS if has_glu else []) + (_INTERVAL_COLUMNS if has_intervals else []),
        )
        self.n = t.num_rows
        col = lambda name: t.column(name).to_pylist()
        self.glu = {name: col(name) for name in _GLU_COLUMNS} if has_glu else None
        self.kinds = ("top", "bottom", "interval") if has_intervals else ("top", "bottom")
        self.seq = {k: col(f"{k}_seq") for k in self.kinds}
        if has_intervals:
            self.interval_top, self.interval_group = col("interval_top"), col("interval_group")
            self.interval_tokens = col("interval_tokens")
        self.mean, self.std, self.vmin, self.vmax = col("mean"), col("std"), col("min"), col("max")
        # Colour scales centred on zero: the top texts on the neuron's largest absolute activation,
        # the most negative texts on their own (|min|), so a small negative range is still visible.
        vmax, vmin = (
            np.abs(t.column("max").to_numpy()).astype(np.float64),
            np.abs(t.column("min").to_numpy()).astype(np.float64),
        )
        scales = {"top": np.maximum(np.maximum(vmax, vmin), 1e-9), "bottom": np.maximum(vmin, 1e-9)}
        scales["interval"] = scales["top"]  # the interval examples on the top texts' scale
        self.traces = {
            k: Traces(t.column(f"{k}_acts"), scales[k], site.first_valid, lowest=(k == "bottom")) for k in self.kinds
        }
        self.frac_pos, self.count = col("frac_pos"), col("count")
        self.quantiles, self.hist_edges, self.hist = col("quantiles"), col("hist_edges"), col("hist_counts")
        # Edges to 6 significant digits, once per distinct value: most are the fine grid's and
        # recur in every neuron. Zero is left out (0.0 and -0.0 are one key) and kept as it is.
        self.edges6 = {e: float(f"{e:.6g}") for e in set(itertools.chain.from_iterable(self.hist_edges)) if e}
        self.fv = site.first_valid
        self.quantile_levels = site.cached(
            "neuroscope.quantile_levels", lambda: list(store.manifest["stats"]["quantile_levels"])
        )
        self.per_seq = site.cached("neuroscope.per_seq", dict)  # seq_id -> _Sequence
        self._texts: dict | None = None
        self._texts_for = -1
        self._stats: dict = {}
        self._stats_for = -1
        self._intervals: list[dict] = []
        self._intervals_for = -1

    # -- per neuron, computed once and shared by payload() and page() --
    def _texts_of(self, n: int) -> dict[str, list[dict]]:
        if self._texts_for == n:
            return self._texts
        vmin, vmax = _r(self.vmin[n]), _r(self.vmax[n])
        per_seq = self.per_seq
        out = {}
        for kind in self.kinds:
            tr = self.traces[kind]
            peak, lo, hi, inner, rounded = tr.peak, tr.lo, tr.hi, tr.inner, tr.rounded
            texts = []
            for j, seq_id in zip(range(tr.outer[n], tr.outer[n + 1]), self.seq[kind][n]):
                s = per_seq.get(seq_id)
                if s is None:
                    s = per_seq[seq_id] = _Sequence(self.site, seq_id)
                texts.append(
                    {
                        "data_index": seq_id,
                        "max_activating_token_index": peak[j],
                        "min_activation": lo[j],
                        "max_activation": hi[j],
                        "min_range": vmin,
                        "max_range": vmax,
                        "tokens": s.tokens_json,
                        "activations": rounded[inner[j] : inner[j + 1]],
                        "token_ids": s.ids_json,
                        "doc_id": s.doc_id,
                        "char_start": s.char_start,
                        "char_end": s.char_end,
                    }
                )
            out[kind] = texts
        self._texts, self._texts_for = out, n
        return out

    def _stats_of(self, n: int) -> dict:
        """stats(n), computed once per neuron for both the JSON and the page."""
        if self._stats_for != n:
            self._stats, self._stats_for = self.stats(n), n
        return self._stats

    def stats(self, n: int) -> dict:
        return {
            "count": self.count[n],
            "mean": _r(self.mean[n]),
            "std": _r(self.std[n]),
            "min": _r(self.vmin[n]),
            "max": _r(self.vmax[n]),
            "frac_positive": round(self.frac_pos[n], 6),
            "quantiles": {"levels": self.quantile_levels, "values": [_r(v) for v in self.quantiles[n]]},
            # Variable-width bars: counts[i] values lie in [edges[i], edges[i + 1]) (exact counts).
            "histogram": {"edges": [self.edges6[e] if e else e for e in self.hist_edges[n]], "counts": self.hist[n]},
        }

    def _seq(self, seq_id: int) -> "_Sequence":
        s = self.per_seq.get(seq_id)
        if s is None:
            s = self.per_seq[seq_id] = _Sequence(self.site, seq_id)
        return s

    def glu_quadrants(self, n: int) -> list[dict] | None:
        """The four (gate sign, up sign) quadrants of a gated MLP's neuron: tokens, shares of the
        tokens and of the activation mass (sum of |activation|), and the top example; None where the
        store has no quadrants."""
        if self.glu is None:
            return None
        g = self.glu
        counts, mass = g["glu_count"][n], g["glu_mass_fx"][n]
        total, total_mass = max(sum(counts), 1), max(sum(mass), 1)
        out = []
        for q, (gate, up) in enumerate(_QUADRANTS):
            seq_id = g["glu_top_seq"][n][q]
            top = None
            if seq_id >= 0:
                s = self._seq(seq_id)
                top = {
                    "data_index": seq_id,
                    "position": g["glu_top_pos"][n][q],
                    "activation": _r(g["glu_top_act"][n][q]),
                    "tokens": s.tokens_json,
                }
            out.append(
                {
                    "gate": gate,
                    "up": up,
                    "tokens": counts[q],
                    "token_share": round(counts[q] / total, 6),
                    "mass_share": round(mass[q] / total_mass, 6),
                    "top": top,
                }
            )
        return out

    def interval_examples(self, n: int) -> list[dict] | None:
        """The examples across the activation range, highest interval first: per group its
        interval [lo, hi) of the sequence maximum in activation units (the lowest group: (0, hi)),
        the share of the counted tokens whose activation lies in it, and its texts (as the top
        texts); [] for a neuron that never exceeds 0; None where the store has none."""
        if "interval" not in self.kinds:
            return None
        if self._intervals_for != n:  # once per neuron for both the JSON and the page
            self._intervals, self._intervals_for = self._grouped_intervals(n), n
        return self._intervals

    def _grouped_intervals(self, n: int) -> list[dict]:
        top = self.interval_top[n]
        if top < 0:
            return []
        groups = stats.INTERVAL_GROUPS + 1
        texts = self._texts_of(n)["interval"]
        count = max(self.count[n], 1)
        out = []
        for g in range(groups):
            hi = stats.interval_edge(top + 1 - g)
            lo = stats.interval_edge(top - g) if g < groups - 1 else 0.0
            out.append(
                {
                    "lo": _r(lo),
                    "hi": _r(hi),
                    "token_share": round(self.interval_tokens[n][g] / count, 6),
                    "texts": [t for t, tg in zip(texts, self.interval_group[n]) if tg == g],
                }
            )
        return out

    # -- API --
    def payload(self, n: int) -> dict:
        texts = self._texts_of(n)
        # The random sample stays in the store (explanation scoring reads it there): the per-neuron
        # JSON carries what the page shows, to keep one neuron's files small.
        out = {
            "neuron_index": {"layer": self.layer, "neuron": n},
            "texts": texts["top"],
            "bottom_texts": texts["bottom"],
            "stats": self._stats_of(n),
        }
        if self.glu is not None or not self.gated:  # null: not applicable (not a gated MLP's neuron)
            out["glu_quadrants"] = self.glu_quadrants(n)
        if "interval" in self.kinds:
            out["interval_examples"] = self.interval_examples(n)
        return out

    def score(self, n: int) -> float:
        """DeepDecipher's importance: max - min activation of the neuron's top text."""
        tr = self.traces["top"]
        if tr.outer[n] == tr.outer[n + 1]:
            return 0.0
        j = tr.outer[n]
        return _r(tr.hi[j] - tr.lo[j])

    def layer_payload(self) -> dict:
        scores = [self.score(i) for i in range(self.n)]
        ranked = sorted(range(self.n), key=lambda i: (-scores[i], i))
        return {
            "num_neurons": self.n,
            "important_neurons": [[{"layer": self.layer, "neuron": i}, scores[i]] for i in ranked],
        }

    def _peak_token(self, text: dict) -> str:
        return self.per_seq[text["data_index"]].tokens[text["max_activating_token_index"]]

    def top_token(self, n: int) -> str:
        texts = self._texts_of(n)["top"]
        return self._peak_token(texts[0]) if texts else ""

    def top_tokens(self, n: int, k: int = 5) -> list[str]:
        """The distinct peak tokens of the top texts, most frequent first (ties: first seen), shown
        as a cell of their own shows them (tokens.shown)."""
        counts = Counter(self._peak_token(t) for t in self._texts_of(n)["top"])
        return [shown(tok) for tok, _ in counts.most_common(k)]

    # -- page --
    def _sequence_items(self, n: int, kind: str, texts: list[dict]) -> Markup:
        """One <li> per text: the window around the peak as coloured spans and the text's source.
        JavaScript reads exact values from the neuron's JSON and adds the whole-sequence toggle."""
        return Markup("\n".join(self._sequence_item_list(n, kind, texts)))

    def _sequence_item_list(self, n: int, kind: str, texts: list[dict]) -> list[str]:
        per_seq = self.per_seq
        tr = self.traces[kind]
        inner, buckets = tr.inner, tr.buckets
        first = tr.outer[n]
        fv = self.fv
        items = []
        for i, t in enumerate(texts):
            s = per_seq[t["data_index"]]
            acts, peak, length = t["activations"], t["max_activating_token_index"], len(s.closed)
            lo, hi = max(0, peak - WINDOW_BEFORE), min(length, peak + WINDOW_AFTER + 1)
            base = inner[first + i]
            opens = list(map(_OPEN.__getitem__, buckets[base + lo : base + hi]))
            if lo < fv:
                opens[: fv - lo] = ["<i class=bos>"] * (fv - lo)
            if lo <= peak < hi and peak >= fv:  # the text's extreme token (max for top, min for bottom) is marked
                opens[peak - lo] = _PEAK[buckets[base + peak]]
            spans = "".join(chain.from_iterable(zip(opens, s.closed[lo:hi])))
            items.append(
                f'<li><div class="seq" tabindex="0" data-start="{lo}">{_ELL if lo else ""}{spans}{_ELL if hi < length else ""}'
                f"</div><details><summary>{acts[peak]} at {peak}</summary>{s.source}{t['min_activation']} to {t['max_activation']}</details></li>"
            )
        return items

    def _interval_groups(self, n: int) -> list[dict]:
        """The page's interval groups that hold texts, highest first: index (into the payload's
        list), the interval as text, the token share and the <li> items."""
        groups = self.interval_examples(n)
        if not groups:
            return []
        items = iter(self._sequence_item_list(n, "interval", self._texts_of(n)["interval"]))
        vmax = max(self.vmax[n], 1e-9)
        out = []
        for g, group in enumerate(groups):
            mine = [next(items) for _ in group["texts"]]
            if not mine:
                continue
            lo, hi = group["lo"], min(group["hi"], _r(self.vmax[n]))  # the highest interval ends at the max
            if not lo:
                label, of_max = f"above 0, below {hi:.4g}", f"below {hi / vmax:.2f}"
            elif lo == hi:
                label, of_max = f"{lo:.4g}", "1.00"
            else:
                label, of_max = f"{lo:.4g} to {hi:.4g}", f"{lo / vmax:.2f}–{hi / vmax:.2f}"
            out.append(
                {
                    "index": g,
                    "label": label,
                    "of_max": of_max,
                    "share": group["token_share"],
                    "html": Markup("\n".join(mine)),
                }
            )
        return out

    def _glu_rows(self, n: int) -> Markup:
        """One table row per quadrant: shares, and the top example's window with its token marked."""
        scale = max(abs(self.vmax[n]), abs(self.vmin[n]), 1e-9)
        fv = self.fv
        rows = []
        for quad in self.glu_quadrants(n):
            example = "—"
            if quad["top"] is not None:
                top = quad["top"]
                s, pos, value = self._seq(top["data_index"]), top["position"], top["activation"]
                lo, hi = max(0, pos - GLU_BEFORE), min(len(s.closed), pos + GLU_AFTER + 1)
                bucket = int(np.clip(np.rint(value * BUCKETS / scale), -BUCKETS, BUCKETS)) + BUCKETS
                opens = ["<i class=bos>" if i < fv else "<i>" for i in range(lo, hi)]
                opens[pos - lo] = _PEAK[bucket]
                spans = "".join(chain.from_iterable(zip(opens, s.closed[lo:hi])))
                example = (
                    f'<span class="glu-ex">{_ELL if lo else ""}{spans}{_ELL if hi < len(s.closed) else ""}</span> '
                    f"<small>{value} (sequence {top['data_index']}, token {pos})</small>"
                )
            rows.append(
                f"<tr><th scope=row>gate {quad['gate']}, up {quad['up']}</th><td>{quad['token_share']:.1%}</td>"
                f"<td>{quad['mass_share']:.1%}</td><td>{example}</td></tr>"
            )
        return Markup("".join(rows))

    def page(self, n: int) -> dict:
        texts = self._texts_of(n)
        return {
            "glu": self._glu_rows(n) if self.glu is not None else None,
            "glu_not_applicable": self.glu is None and not self.gated,
            "top": self._sequence_items(n, "top", texts["top"]),
            "bottom": self._sequence_items(n, "bottom", texts["bottom"]),
            "intervals": self._interval_groups(n) if "interval" in self.kinds else None,
            "intervals_per": stats.PER_INTERVAL,
            "stats": self._stats_of(n),
            "histogram_svg": Markup(histogram_svg(self.hist[n], self.hist_edges[n])),
            "quantiles_csv": ",".join(f"{v:.4g}" for v in self.quantiles[n]),
        }


class _Sequence:
    """What every text of one corpus sequence shows, whichever neuron it is a text of: made once
    per sequence and build (per worker). The JSON parts are orjson fragments, serialised here once
    rather than in every neuron's file that holds the sequence."""

    __slots__ = ("tokens", "tokens_json", "ids_json", "doc_id", "char_start", "char_end", "closed", "source")

    def __init__(self, site, seq_id: int):
        seq = site.sequence(seq_id)
        self.tokens = site.tokens(seq_id)
        self.tokens_json = orjson.Fragment(_compact(orjson.dumps(self.tokens)))
        self.ids_json = orjson.Fragment(_compact(orjson.dumps(seq["token_ids"])))
        self.doc_id, self.char_start, self.char_end = seq["doc_id"], seq["char_start"], seq["char_end"]
        closed = site.esc_vocab_closed
        self.closed = [
            closed[i] for i in seq["token_ids"]
        ]  # escaped tokens with their closing tag, for the page's spans
        self.source = (
            f"<code>{site.escaped_doc(seq_id)}</code> chars {self.char_start}–{self.char_end}, "
            f"sequence {seq_id}, {len(self.closed)} tokens, "
        )


def _compact(data: bytes) -> bytes:
    """A copy of its own size: orjson's result keeps its ~8 KB output buffer's place in the heap, so
    tens of thousands of kept results would pin ~8 KB each (measured: +290 MB for 20,000 sequences)."""
    return memoryview(data).tobytes()


_G: dict[
    float, str
] = {}  # float -> f"{v:g}": bar positions and widths are tenths of a pixel in a 500-pixel box, so few


def _g(v: float) -> str:
    text = _G.get(v)
    if text is None:
        text = f"{v:g}"
        if v and len(_G) < 100_000:  # 0.0 and -0.0 are one key but print differently
            _G[v] = text
    return text


# The histogram's box: a plot area of PLOT_W x PLOT_H with room for the axes' labels around it (and 10 units above for the top tick's label).
BOX = Box(62, 580, 120, 660, 160)
PLOT_X, PLOT_W, PLOT_H = BOX.plot_x, BOX.plot_w, BOX.plot_h


def histogram_svg(counts: list[int], edges: list[float]) -> str:
    """The display histogram as an SVG chart: variable-width bars on a linear activation axis, bar
    height the number of tokens in the bar on a log axis (ticks at every power of ten, labelled),
    values <= 0 blue, > 0 red, a dashed line at zero and the range and zero labelled below. Bars
    touch: a gap is an interval that holds no value."""
    if not counts or max(counts) == 0:
        return ""
    lo, hi = edges[0], edges[-1]
    scale = PLOT_W / (hi - lo) if hi > lo else 0.0
    decades = max(1, int(np.ceil(np.log10(max(counts)))))  # the axis runs from 1 to 10**decades tokens
    # Positions with Python's round() (numpy rounds tenths differently), in Python floats; heights
    # with numpy: a count c >= 1 stands (1 + log10 c) / (1 + decades) of the plot's height, so one
    # token is still a visible bar.
    x = [round(PLOT_X + (v - lo) * scale, 1) for v in edges] if scale else [float(PLOT_X), float(PLOT_X + PLOT_W)]
    widths = np.maximum(np.diff(x[: len(counts) + 1]), 1.0)
    c = np.asarray(counts, dtype=np.float64)
    heights = np.rint(PLOT_H * (1 + np.log10(np.maximum(c, 1))) / (1 + decades)).astype(np.int64).tolist()
    cached = _G.get
    neg: list[str] = []
    pos: list[str] = []
    for i, (n, h, w) in enumerate(zip(counts, heights, widths.tolist())):
        if n:
            a = x[i]
            (pos if edges[i] >= 0 and edges[i + 1] > 0 else neg).append(
                f"M{cached(a) or _g(a)} {PLOT_H}v-{h}h{cached(w) or _g(w)}v{h}z"
            )
    parts = "".join(f'<path class="{k}" d="{"".join(v)}"/>' for k, v in (("neg", neg), ("pos", pos)) if v)
    zero_x = round(PLOT_X + (0 - lo) * scale, 1) if lo < 0 < hi else None
    return log_count_svg(
        BOX,
        parts,
        lo,
        hi,
        zero_x,
        decades,
        "activation histogram: tokens per variable-width bin, log count axis",
        "Exact token counts in variable-width bins (finer near zero); bar height: tokens, log scale",
        "activation",
    )
