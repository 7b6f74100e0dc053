"""Token search as static files (written by the build; answered in the browser by app.js).

    search/<model>/meta.json                 shard count, cap, layer size, preview chunk size
    search/<model>/tokens/<shard>.json       {token: {"a": ids, "i": ids, "na": n, "ni": n, "n": n, "s": support, "w": strength, "c": count[, "m": k]}}
    search/<model>/more/<shard>-<k>.json     the full lists of a token whose lists were capped ({"a", "i"})
    search/<model>/support/<shard>-<k>.json  its full support and strength lists ({"s", "w"}; only the page reads them)
    search/<model>/preview/<layer>/<chunk>.json   per neuron: [top tokens, max activation, graph F1 or null,
                                                  explanation or null, F1's interval or null, scores or null]
    search/<model>/words/<shard>.json        explanation search: {stem: [ids, term counts]} (lunr's analysis)

A token's shard is FNV-1a (32-bit, over its UTF-8 bytes) modulo the shard count (a power of two),
so the client fetches exactly one small file per term. Ids are global neuron ids (layer *
layer_size + neuron), sorted and delta-encoded; each list keeps its first CAP ids and counts the
rest, which sit in the token's "more" file. "na", "ni" and "n" are the exact sizes of the
activating list, the important list and their union (what `any:` finds); "s" is, per id of "a", in
how many distinct sequences that neuron fires on the token (its evidence), "w" how strongly it
responds to the token (its largest activation on it in its top sequences over its largest there,
0 to 1: the search page ranks by it); "c" is how often the
token occurs in the sequences meta.json's "corpus" describes, so a token no neuron has still has an
entry (empty lists) when it occurs, and a token without an entry never occurs. DeepDecipher's search URL,
/api/<model>/neuron2graph-search?query=..., is answered from these same files by the edge function
its service declares (hook `edge_functions`; its Python port in `sitegen serve`), so no file name
ever derives from a token and no folder grows with the vocabulary beyond MAX_SHARDS.
"""

from __future__ import annotations

import orjson

from sitegen.services.base import Service, fnv1a

CAP = 200  # ids per list in a shard file
KEYS_PER_SHARD = 8  # target; the shard count is the next power of two, at most MAX_SHARDS
MAX_SHARDS = 4096
PREVIEW_CHUNK = 32  # neurons per preview file: results spread over layers, so small files waste least


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


def publish_text_search(pub, base: str, explanations: dict[int, str]) -> dict:
    """Explanation search: each stem's postings (ids delta-encoded, with the stem's count in each
    explanation) in the shard FNV-1a picks; returns what the client needs to know (shard count,
    number of explanations for idf, lunr's stop words)."""
    from sitegen.site.textindex import stop_words, term_frequencies

    terms = term_frequencies(explanations)
    shards = shard_count(len(terms))
    grouped: dict[int, dict[str, list]] = {s: {} for s in range(shards)}
    for term, docs in terms.items():
        ids = sorted(docs)
        grouped[fnv1a(term) % shards][term] = [_delta(ids), [docs[i] for i in ids]]
    for s, body in grouped.items():
        pub.publish(f"{base}/words/{s}.json", orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    return {"shards": shards, "documents": len(explanations), "stop_words": stop_words()}


def _token_services(model) -> list[Service]:
    return [s for s in model.services if type(s).search_tokens is not Service.search_tokens]


def has_search(model) -> bool:
    """Whether some service of the model supplies search tokens (hook `search_tokens`)."""
    return bool(_token_services(model))


def publish_search(pub, model) -> dict:
    """Write the model's search files (the site-wide search page and DeepDecipher's search URL
    read them) from what the model's services supply: the first one with `search_tokens` gives
    the token postings and previews, every one with `search_texts` the free texts; returns
    figures for the build report (none when no service supplies tokens after all)."""
    index = next((ix for s in _token_services(model) if (ix := s.search_tokens(model)) is not None), None)
    if index is None:
        return {}
    explanations: dict[int, str] = {}
    notes: dict[int, str] = {}
    for s in model.services:
        explanations.update(s.search_texts(model))
        notes.update(s.search_notes(model))
    lists = index.postings
    empty: tuple[list[int], list[int]] = ([], [])
    keys = set(lists) | set(index.counts)
    base = f"search/{model.name}"
    shards = shard_count(len(keys))
    grouped: dict[int, list[str]] = {s: [] for s in range(shards)}
    for key in keys:
        grouped[fnv1a(key) % shards].append(key)
    more_files = 0
    for s, entries in grouped.items():
        body = {}
        for k, key in enumerate(sorted(entries)):
            a, i = lists.get(key, empty)
            support = index.support.get(key, [])
            strength = index.strength.get(key, [])
            entry = {
                "a": _delta(a[:CAP]),
                "i": _delta(i[:CAP]),
                "na": len(a),
                "ni": len(i),
                "n": len(set(a) | set(i)),
                "s": support[:CAP],
                "w": strength[:CAP],
                "c": index.counts.get(key, 0),
            }
            if len(a) > CAP or len(i) > CAP:
                entry["m"] = k
                pub.publish(f"{base}/more/{s}-{k}.json", orjson.dumps({"a": _delta(a), "i": _delta(i)}))
                # apart from the lists: DeepDecipher's search URL reads "more" files within 50 ms of CPU
                pub.publish(f"{base}/support/{s}-{k}.json", orjson.dumps({"s": support, "w": strength}))
                more_files += 1
            body[key] = entry
        pub.publish(f"{base}/tokens/{s}.json", orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    size = model.layer_size
    for layer in range(model.num_layers):
        for start in range(0, size, PREVIEW_CHUNK):
            rows = []
            for n in range(start, min(start + PREVIEW_CHUNK, size)):
                g = layer * size + n
                tokens, top, f1, f1_ci = index.preview(g)
                rows.append([tokens, top, f1, explanations.get(g), f1_ci, notes.get(g)])
            pub.publish(f"{base}/preview/{layer}/{start // PREVIEW_CHUNK}.json", orjson.dumps(rows))
    meta = {
        "shards": shards,
        "cap": CAP,
        "layer_size": size,
        "num_layers": model.num_layers,
        "preview_chunk": PREVIEW_CHUNK,
        "hash": "fnv1a-32",
        "corpus": index.corpus,
    }
    if explanations:
        meta["text"] = publish_text_search(pub, base, explanations)
    pub.publish(f"{base}/meta.json", orjson.dumps(meta, option=orjson.OPT_SORT_KEYS))
    return {"tokens": len(keys), "shards": shards, "more_files": more_files}
