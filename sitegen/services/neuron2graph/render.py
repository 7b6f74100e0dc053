"""The neuron2graph service's render half: DeepDecipher's payload (node list, DOT source, similar
neurons) plus our token sets and held-out evaluation, and the graph as inline SVG laid out here,
at build time, so the browser needs no graph library.

Layout: one column per depth, the activating tokens on the right and their context to the left
(reading order); the same token at the same depth is drawn once; rows in breadth-first order.
"""

from __future__ import annotations

from urllib.parse import quote

from markupsafe import Markup, escape

from sitegen.services.artefacts import REASONS, SHORT, layer_artefacts, whitespace_ids
from sitegen.services.base import fmt_num
from sitegen.services.neuron2graph import graph as g
from sitegen.services.neuron2graph.tokenstore import SOURCE_GRAPH, similar, token_store
from sitegen.services.tokens import display

MAX_DRAWN = 60  # nodes drawn on the page; the JSON has them all
ROW, GAP, PAD, CHAR = 26, 36, 8, 7.3  # px; CHAR: a 12px monospace character
END_CLASS = ' class="end"'


class Neuron2GraphLayer:
    def __init__(self, store, layer: int, site):
        self.layer, self.site = layer, site
        self.rows: dict[int, dict] = {}
        if store.has_service("neuron2graph") and store.layer_path("neuron2graph", layer).exists():
            t = store.read_layer("neuron2graph", layer).to_pylist()
            self.rows = {r["neuron"]: r for r in t}
        self.ts = token_store(site)
        self.similar = similar(site)
        self.base = layer * site.layer_size
        self.search = f"/search.html?model={quote(site.name)}&q="
        self.links = site.cached(
            "neuron2graph.links", dict
        )  # (kind, key id) -> the token's search link, for every page
        # artefact neurons (peaks on the first token after BOS, or on one whitespace token): once per layer
        self.artefacts = layer_artefacts(
            store, layer, site.vocab, site.cached("neuron2graph.blank", lambda: whitespace_ids(site.vocab))
        )

    def _similar(self, n: int) -> list[dict]:
        size, i, keys = self.site.layer_size, self.base + n, self.ts.keys
        return [
            {
                "layer": j // size,
                "neuron": j % size,
                "similarity": s,
                "measure": m,
                "shared": [keys[k] for k in self.similar.shared(i, j, m)],
            }
            for j, s, m in self.similar.lists[i]
        ]

    def _tokens(self, n: int) -> dict:
        i = self.base + n
        keys = self.ts.keys
        return {
            "activating": [keys[k] for k in self.ts.activating[i]],
            "important": [keys[k] for k in self.ts.important[i]],
            "source": self.ts.source[i],
        }

    def payload(self, n: int) -> dict:
        row = self.rows.get(n)
        out = {
            "neuron_index": {"layer": self.layer, "neuron": n},
            "similar": self._similar(n),
            "tokens": self._tokens(n),
            "graph": None,
            "graphviz": None,
            "evaluation": None,
            "artefact": a.code if (a := self.artefacts[n]) else None,
        }
        if row is not None:
            nodes = row["nodes"]
            children: list[list[int]] = [[] for _ in nodes]
            for i, node in enumerate(nodes):
                if node["parent"] >= 0:
                    children[node["parent"]].append(i)
            out["graph"] = {
                "subgraph_indices": [i for i, node in enumerate(nodes) if node["parent"] < 0],
                "graph": [
                    {
                        "token": node["token"],
                        "required": children[i],
                        "importance": round(node["value"], 4),
                        "depth": node["depth"],
                        "activating": _activating(node),
                        "end": None if node["end"] is None else round(node["end"], 4),
                    }
                    for i, node in enumerate(nodes)
                ],
            }
            out["graphviz"] = dot_source(nodes)
            out["evaluation"] = _evaluation(row)
        return out

    def page(self, n: int) -> dict:
        row = self.rows.get(n)
        i = self.base + n
        search = self.search
        links = {
            kind: Markup(" ".join([self._link(kind, k) for k in ids.tolist()]))
            for kind, ids in (("activating", self.ts.activating[i]), ("important", self.ts.important[i]))
        }
        size = self.site.layer_size
        similar = Markup(
            "".join(
                f'<li><a href="/{self.site.name}/{j // size}/{j % size}.html" title="similarity {s:.2f} ({m})">{j // size}:{j % size}</a>'
                f' <span class="sim">{s:.2f}</span> <span class="shared">{self._shared(i, j, m)}</span></li>'
                for j, s, m in self.similar.lists[i]
            )
        )
        return {
            "has_graph": row is not None,
            "svg": graph_svg(row["nodes"], search) if row else Markup(""),
            "evaluation": _evaluation(row) if row else None,
            "links": links,
            "source": self.ts.source[i],
            "graph_source": SOURCE_GRAPH,
            "similar": similar,
            "n_nodes": len(row["nodes"]) if row else 0,
            "artefact": {"reason": REASONS[a.code], "evidence": a.evidence} if (a := self.artefacts[n]) else None,
        }

    def graph_cell(self, n: int) -> tuple[str, str]:
        """The layer table's graph column: (text, sort value): F1 or "not evaluated" (marked when the
        graph has no node), or "—" without a graph."""
        row = self.rows.get(n)
        if row is None:
            return "—", "-2"
        f1 = row["f1"]
        text, sort = ("not evaluated", "-1") if f1 is None else (str(fmt_num(round(f1, 4), 3)), str(round(f1, 4)))
        return (text + " (empty graph)", sort) if not row["nodes"] else (text, sort)

    def artefact_cell(self, n: int) -> Markup:
        """The layer table's artefact marker, its reason and evidence on hover."""
        a = self.artefacts[n]
        return (
            Markup('<span class="artefact" title="{}: {}">{}</span>').format(REASONS[a.code], a.evidence, SHORT[a.code])
            if a
            else Markup("")
        )

    def _shared(self, i: int, j: int, measure: str) -> str:
        """The tokens two similar neurons share, rarest first, escaped."""
        return "shares " + ", ".join(
            f"<code>{escape(display(self.ts.keys[k]))}</code>" for k in self.similar.shared(i, j, measure)
        )

    def _link(self, kind: str, key: int) -> str:
        html = self.links.get((kind, key))
        if html is None:
            t = self.ts.keys[key]
            html = self.links[kind, key] = (
                f'<a class="tok" href="{self.search}{quote(kind + ":" + t, safe="")}"><code>{escape(display(t))}</code></a>'
            )
        return html

    def layer_payload(self) -> dict:
        return {"num_neurons": self.site.layer_size, "graphs": sorted(self.rows)}


def _activating(node: dict) -> bool:
    """Filed by the node's own activation (stores written before that was kept: by depth)."""
    flag = node.get("activating")
    return node["token"] != g.IGNORE and (node["depth"] == 0 if flag is None else bool(flag))


def _evaluation(row: dict) -> dict:
    """The held-out figures; null where undefined (F1 null: nothing in the held-out texts reaches
    half the maximum, so the graph is not evaluated), and F1's bootstrap interval over the texts."""
    return (
        {k: None if row[k] is None else round(row[k], 4) for k in ("precision", "recall", "f1", "variance_explained")}
        | {"f1_ci": row["f1_ci"]}
        | {"test_texts": row["n_test"], "train_texts": row["n_train"]}
    )


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def dot_source(nodes: list[dict]) -> str:
    """Graphviz DOT: activating tokens red by activation, context blue by importance, ends doubled,
    edges from each token back to its context."""
    lines = ["digraph neuron {", "  rankdir=RL;", '  node [shape=box, style="rounded,filled", fontname="Helvetica"];']
    for i, node in enumerate(nodes):
        activating = _activating(node)
        value = max(0.0, min(1.0, node.get("activation", node["value"]) if activating else node["value"]))
        colour = f"#ff0000{int(255 * value):02x}" if activating else f"#0000ff{int(255 * value):02x}"
        label = "*" if node["token"] == g.IGNORE else node["token"]
        extra = ", penwidth=3" if node["end"] is not None else ""
        lines.append(f'  n{i} [label="{_dot_escape(label)}", fillcolor="{colour}"{extra}];')
    for i, node in enumerate(nodes):
        if node["parent"] >= 0:
            lines.append(f"  n{node['parent']} -> n{i};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def graph_svg(nodes: list[dict], search_url: str) -> Markup:
    """Inline SVG of the graph; every label escaped; each token links to a search for it."""
    drawn: dict[tuple[str, int], dict] = {}  # (token, depth) -> merged node
    edges: set[tuple[tuple[str, int], tuple[str, int]]] = set()
    keys = []
    for node in nodes:
        key = (node["token"], node["depth"])
        keys.append(key)
        if key not in drawn:
            if len(drawn) >= MAX_DRAWN:
                continue
            drawn[key] = {
                "token": node["token"],
                "depth": node["depth"],
                "value": node["value"],
                "end": node["end"],
                "activating": _activating(node),
                "activation": node.get("activation", node["value"]),
            }
        elif drawn[key]["end"] is None and node["end"] is not None:
            drawn[key]["end"] = node["end"]
        if node["parent"] >= 0 and keys[node["parent"]] in drawn:
            edges.add((keys[node["parent"]], key))
    if not drawn:
        return Markup(
            '<p class="muted">The graph is empty: no line of the training texts reached half the neuron\'s maximum.</p>'
        )
    depths = sorted({d for _, d in drawn})
    width_of = {k: max(28, round(CHAR * len(display(k[0] if k[0] != g.IGNORE else "…"))) + 2 * PAD) for k in drawn}
    col_w = {d: max(width_of[k] for k in drawn if k[1] == d) for d in depths}
    x_of, x = {}, 0
    for d in reversed(depths):  # deepest context on the left
        x_of[d] = x
        x += col_w[d] + GAP
    total_w = x - GAP + 2
    rows: dict[int, int] = {}
    pos = {}
    for k in drawn:
        r = rows.get(k[1], 0)
        rows[k[1]] = r + 1
        pos[k] = (x_of[k[1]] + col_w[k[1]] - width_of[k], 4 + r * ROW)
    total_h = 4 + max(rows.values()) * ROW + 2
    out = [
        f'<svg class="n2g" viewBox="0 0 {total_w} {total_h}" width="{total_w}" height="{total_h}" role="img" aria-label="Neuron2Graph graph">'
    ]
    for a, b in sorted(edges, key=lambda e: (pos[e[0]], pos[e[1]])):
        (ax, ay), (bx, by) = pos[a], pos[b]
        out.append(f'<line x1="{bx + width_of[b]}" y1="{by + 10}" x2="{ax}" y2="{ay + 10}"/>')
    for k, node in drawn.items():
        px, py = pos[k]
        activating = node["activating"]
        value = max(
            0.0, min(1.0, node["activation"] if activating else node["value"])
        )  # red by activation, blue by importance
        ignore = node["token"] == g.IGNORE
        fill = "#888" if ignore else ("#e0301e" if activating else "#2a6fdb")
        label = "…" if ignore else display(node["token"])
        what = "wildcard (any token)" if ignore else f"importance {node['value']:.3f}"
        if activating:
            what = f"activation {node['activation']:.3f}" + (
                f", importance {node['value']:.3f}" if node["depth"] > 0 else ""
            )
        end = f", line ends here ({node['end']:.3f})" if node["end"] is not None else ""
        title = escape(f"{'any token' if ignore else repr(node['token'])}: {what}{end}")
        rect = (
            f'<rect x="{px}" y="{py}" width="{width_of[k]}" height="20" rx="4" fill="{fill}" fill-opacity="{0.25 + 0.75 * value:.2f}"'
            f'{END_CLASS if node["end"] is not None else ""}/><text x="{px + PAD}" y="{py + 14}">{escape(label)}</text>'
        )
        body = f'<g class="{"act" if activating else "ctx"}" data-token="{escape(node["token"])}"><title>{title}</title>{rect}</g>'
        if not ignore:
            body = f'<a href="{search_url}{quote("any:" + node["token"], safe="")}">{body}</a>'
        out.append(body)
    out.append("</svg>")
    return Markup("".join(out))
