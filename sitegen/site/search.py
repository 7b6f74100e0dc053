"""Token search as static files (written by the build; answered in the browser by app.js).

    search/<model>/meta.json                 shard count, cap, layer size, preview chunk size
    search/<model>/tokens/<shard>.json       {token: {"a": ids, "i": ids, "na": n, "ni": n[, "m": k]}}
    search/<model>/more/<shard>-<k>.json     the full lists of a token whose lists were capped
    search/<model>/preview/<layer>/<chunk>.json   per neuron: [top tokens, max activation, graph F1 or null, explanation or null]
    search/<model>/words/<shard>.json        explanation search: {stem: [ids, term counts]} (lunr's analysis)

A token's shard is FNV-1a (32-bit, over its UTF-8 bytes) modulo the shard count (a power of two),
so the client fetches exactly one small file per term. Ids are global neuron ids (layer *
layer_size + neuron), sorted and delta-encoded; each list keeps its first CAP ids and counts the
rest, which sit in the token's "more" file. DeepDecipher's search URL,
/api/<model>/neuron2graph-search?query=..., is answered from these same files by an edge function
(netlify/edge-functions/neuron2graph-search.ts; sitegen/site/edge.py in `sitegen serve`), so no
file name ever derives from a token and no folder grows with the vocabulary beyond MAX_SHARDS.
"""

from __future__ import annotations

import orjson

from sitegen.site.publisher import NETLIFY_DIR_LIMIT  # noqa: F401  (the limit its figures are checked against)

from sitegen.services.neuron2graph.tokenstore import token_store
from sitegen.services.neuron2graph.tokenstore import SOURCE_GRAPH, TokenStore, parse_query
from sitegen.services.neuron_explainer.service import explanations as explanations_of

CAP = 200  # ids per list in a shard file
KEYS_PER_SHARD = 8  # target; the shard count is the next power of two, at most MAX_SHARDS
MAX_SHARDS = 4096
PREVIEW_CHUNK = 32  # neurons per preview file: results spread over layers, so small files waste least
PREVIEW_TOKENS = 5


def fnv1a(text: str) -> int:
    h = 0x811C9DC5
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def shard_count(n_keys: int) -> int:
    s = 1
    while s < MAX_SHARDS and s * KEYS_PER_SHARD < n_keys:
        s *= 2
    return s


def _delta(ids) -> list[int]:
    out, prev = [], 0
    for x in ids:
        out.append(int(x) - prev)
        prev = int(x)
    return out


def postings(ts: TokenStore) -> dict[str, tuple[list[int], list[int]]]:
    """token -> (activating ids, important ids), each sorted."""
    a, i = ts.postings("activating"), ts.postings("important")
    out = {}
    for k in sorted(set(a) | set(i)):
        out[ts.keys[k]] = (a[k].tolist() if k in a else [], i[k].tolist() if k in i else [])
    return out


def answer(lists: dict[str, tuple[list[int], list[int]]], query: str) -> list[int]:
    """Sorted global ids matching a query, straight from the postings (the reference the static
    files are checked against)."""
    result: set[int] | None = None
    for kind, key in parse_query(query):
        a, i = lists.get(key, ([], []))
        ids = set(a) if kind == "activating" else set(i) if kind == "important" else set(a) | set(i)
        result = ids if result is None else result & ids
    return sorted(result or ())


def publish_text_search(pub, base: str, explanations: dict[int, str]) -> dict:
    """Explanation search: each stem's postings (ids delta-encoded, with the stem's count in each
    explanation) in the shard FNV-1a picks; returns what the client needs to know (shard count,
    number of explanations for idf, lunr's stop words)."""
    from sitegen.services.neuron_explainer.textindex import stop_words, term_frequencies

    terms = term_frequencies(explanations)
    shards = shard_count(len(terms))
    grouped: dict[int, dict[str, list]] = {s: {} for s in range(shards)}
    for term, docs in terms.items():
        ids = sorted(docs)
        grouped[fnv1a(term) % shards][term] = [_delta(ids), [docs[i] for i in ids]]
    for s, body in grouped.items():
        pub.publish(f"{base}/words/{s}.json", orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    return {"shards": shards, "documents": len(explanations), "stop_words": stop_words()}


def has_search(model) -> bool:
    """Whether the model's neurons have tokens to search: the neuron2graph service gives every
    neuron token sets (from its graph, else from its top sequences)."""
    return any(s.name == "neuron2graph" for s in model.services)


def publish_search(pub, model) -> dict:
    """Write the model's search files (the site-wide search page and DeepDecipher's search URL
    read them); returns figures for the build report."""
    pub = _FolderCount(pub)
    ts = token_store(model)
    explanations = explanations_of(model)
    lists = postings(ts)
    base = f"search/{model.name}"
    shards = shard_count(len(lists))
    grouped: dict[int, dict[str, dict]] = {s: {} for s in range(shards)}
    for key, (a, i) in lists.items():
        grouped[fnv1a(key) % shards][key] = (a, i)
    more_files = 0
    for s, entries in grouped.items():
        body = {}
        for k, key in enumerate(sorted(entries)):
            a, i = entries[key]
            entry = {"a": _delta(a[:CAP]), "i": _delta(i[:CAP]), "na": len(a), "ni": len(i)}
            if len(a) > CAP or len(i) > CAP:
                entry["m"] = k
                pub.publish(f"{base}/more/{s}-{k}.json", orjson.dumps({"a": _delta(a), "i": _delta(i)}))
                more_files += 1
            body[key] = entry
        pub.publish(f"{base}/tokens/{s}.json", orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    size = model.layer_size
    for layer in range(model.num_layers):
        for start in range(0, size, PREVIEW_CHUNK):
            rows = []
            for n in range(start, min(start + PREVIEW_CHUNK, size)):
                g = layer * size + n
                rows.append([[ts.keys[k] for k in ts.activating[g][:PREVIEW_TOKENS]], ts.max_act[g], ts.f1[g] if ts.source[g] == SOURCE_GRAPH else None,
                             explanations.get(g)])
            pub.publish(f"{base}/preview/{layer}/{start // PREVIEW_CHUNK}.json", orjson.dumps(rows))
    meta = {"shards": shards, "cap": CAP, "layer_size": size, "num_layers": model.num_layers, "preview_chunk": PREVIEW_CHUNK, "hash": "fnv1a-32"}
    if explanations:
        meta["text"] = publish_text_search(pub, base, explanations)
    pub.publish(f"{base}/meta.json", orjson.dumps(meta, option=orjson.OPT_SORT_KEYS))
    return {"tokens": len(lists), "shards": shards, "more_files": more_files, "largest_folder": pub.largest()}


class _FolderCount:
    """Passes files on to the Publisher, counting them per folder (Netlify refuses a deploy with
    more than NETLIFY_DIR_LIMIT files in one folder)."""

    def __init__(self, pub):
        self.pub, self.counts = pub, {}

    def publish(self, rel: str, data) -> None:
        self.pub.publish(rel, data)
        folder = rel.rsplit("/", 1)[0]
        self.counts[folder] = self.counts.get(folder, 0) + 1

    def largest(self) -> tuple[str, int]:
        return max(self.counts.items(), key=lambda kv: (kv[1], kv[0]))
