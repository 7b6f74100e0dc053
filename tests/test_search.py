"""Token store, static token search and similar neurons, each against a brute force."""

from __future__ import annotations

import itertools
import json
import urllib.error
import urllib.request

import orjson
import pytest

from sitegen.services.neuron2graph import graph as g
from sitegen.services.neuron2graph.tokenstore import (FALLBACK_CAP, SOURCE_GRAPH, SOURCE_TOP, build_token_store, parse_query,
                                                      similar_neurons)
from sitegen.site import search
from sitegen.site.build import build_site
from tests.reference import SYNTHETIC_LINES, static_search, write_synthetic_graphs, write_synthetic_store


@pytest.fixture(scope="module")
def wide_site(tmp_path_factory):
    """Three layers x 24 neurons, a small vocabulary (so neurons share tokens), two graphs and a
    posting cap of 3, so capped lists and their "more" files are exercised."""
    root = tmp_path_factory.mktemp("wide")
    vocab = ["<bos>"] + [f" t{i}" for i in range(8)] + ["The", " the", "<script>alert(1)</script>"]
    store = write_synthetic_store(root / "store", name="wide", n_layers=3, n_neurons=24, n_seqs=30, seq_len=10, vocab=vocab,
                                  top_k=4, n_random=1, with_logits=False, with_graphs=False)
    write_synthetic_graphs(store, {(0, 2): SYNTHETIC_LINES, (2, 5): [([(" t1", 0.9, 0.9), (" the", 0.9, 0.2)], 0.9)]})
    from sitegen.store import Store

    store = Store.open(store.root)
    old_cap = search.CAP
    search.CAP = 3
    try:
        build_site([store.root], root / "site")
    finally:
        search.CAP = old_cap
    return store, root / "site"


def _brute_fallback(store, layer: int, neuron: int, vocab: list[str]) -> list[str]:
    """The fallback token set straight from the stored top texts, one neuron at a time."""
    row = store.read_layer("neuroscope", layer).to_pylist()[neuron]
    seqs = {s["seq_id"]: s["token_ids"] for s in store.sequences().to_pylist()}
    pairs = [(a, vocab[seqs[s][p]]) for s, acts in zip(row["top_seq"], row["top_acts"]) for p, a in enumerate(acts) if p >= 1]
    peak = max(a for a, _ in pairs)
    best: dict[str, float] = {}
    for a, tok in pairs:
        if peak > 0 and a >= 0.5 * peak:
            key = g.normalise(tok)
            best[key] = max(best.get(key, -1e9), a)
    return [k for k, _ in sorted(best.items(), key=lambda kv: -kv[1])][:FALLBACK_CAP]


def test_token_store_uses_graphs_and_falls_back_to_top_sequences(wide_site):
    store, _ = wide_site
    ts = build_token_store(store, first_valid=1)
    vocab = store.vocab()
    assert ts.n_neurons == 72
    keys = ts.keys
    assert ts.source[2] == SOURCE_GRAPH and ts.source[2 * 24 + 5] == SOURCE_GRAPH
    assert sorted(keys[k] for k in ts.activating[2]) == ["<script>alert(1)</script>", "w5"]
    assert sorted(keys[k] for k in ts.important[2]) == ["w3", "w6"]  # IGNORE is not a token
    assert [keys[k] for k in ts.important[2 * 24 + 5]] == ["the"]
    for gid in range(72):
        if ts.source[gid] == SOURCE_TOP:
            layer, neuron = divmod(gid, 24)
            assert sorted(keys[k] for k in ts.activating[gid]) == sorted(_brute_fallback(store, layer, neuron, vocab)), gid
            assert len(ts.important[gid]) == 0


def _brute_answer(ts, kind: str, key: str) -> set[int]:
    out = set()
    for gid in range(ts.n_neurons):
        a = {ts.keys[k] for k in ts.activating[gid]}
        i = {ts.keys[k] for k in ts.important[gid]}
        if (kind in ("any", "activating") and key in a) or (kind in ("any", "important") and key in i):
            out.add(gid)
    return out


def test_static_search_equals_brute_force_for_every_token_and_kind(wide_site):
    store, site = wide_site
    ts = build_token_store(store, first_valid=1)
    assert list((site / "search/wide/more").iterdir()), "the cap of 3 should have produced 'more' files"
    for key in ts.keys:
        for kind in ("any", "activating", "important"):
            assert static_search(site, "wide", f"{kind}:{key}") == sorted(_brute_answer(ts, kind, key)), (kind, key)


def test_and_of_terms_is_the_intersection(wide_site):
    store, site = wide_site
    ts = build_token_store(store, first_valid=1)
    keys = [k for k in ts.keys if _brute_answer(ts, "any", k)][:6]
    checked = 0
    for a, b in itertools.combinations(keys, 2):
        want = _brute_answer(ts, "any", a) & _brute_answer(ts, "activating", b)
        assert static_search(site, "wide", f"any:{a},activating:{b}") == sorted(want)
        checked += bool(want)
    assert checked, "no pair shared a neuron: the AND check would be vacuous"


def test_search_normalises_the_query_and_unknown_tokens_give_nothing(wide_site):
    store, site = wide_site
    assert static_search(site, "wide", "any:The") == static_search(site, "wide", "any:the")  # Title-case lower-cased
    assert static_search(site, "wide", "any: t1") == static_search(site, "wide", "any:t1")  # space stripped
    assert static_search(site, "wide", "any:nowhere") == []
    assert static_search(site, "wide", "t1") == static_search(site, "wide", "any:t1")  # bare token: any


@pytest.mark.parametrize("query, message", [("foo:the", "unknown type"), ("any:", "no token"), ("any:the,", "empty term"), ("", "empty term")])
def test_malformed_queries_raise_a_message(query, message):
    with pytest.raises(ValueError, match=message):
        parse_query(query)


def test_shards_are_small_and_found_by_hash(wide_site):
    store, site = wide_site
    meta = orjson.loads((site / "search/wide/meta.json").read_bytes())
    assert meta["shards"] & (meta["shards"] - 1) == 0  # a power of two
    for shard in (site / "search/wide/tokens").iterdir():
        for key in orjson.loads(shard.read_bytes()):
            assert search.fnv1a(key) % meta["shards"] == int(shard.stem)
    assert search.fnv1a("") == 0x811C9DC5 and search.fnv1a("a") == 0xE40C292C  # the published FNV-1a test vectors


def test_similarity_equals_brute_force_all_pairs(wide_site):
    store, _ = wide_site
    ts = build_token_store(store, first_valid=1)
    got = similar_neurons(ts, threshold=0.4, top=1000)
    sets = [({ts.keys[k] for k in a}, {ts.keys[k] for k in i}) for a, i in zip(ts.activating, ts.important)]
    nonempty = 0
    for x in range(ts.n_neurons):
        want = {}
        for y in range(ts.n_neurons):
            if x == y:
                continue
            (ax, ix), (ay, iy) = sets[x], sets[y]
            denom = min(len(ax), len(ay)) + min(len(ix), len(iy))
            if denom == 0:
                continue
            sim = (len(ax & ay) + len(ix & iy)) / denom
            if sim >= 0.4:
                want[y] = round(sim, 4)
        assert dict(got[x]) == want, x
        assert all(dict(got[y]).get(x) == s for y, s in got[x])  # symmetric
        nonempty += bool(want)
    assert nonempty > 10


def test_similar_neurons_are_in_the_neuron_json_and_page(wide_site):
    store, site = wide_site
    ts = build_token_store(store, first_valid=1)
    top = similar_neurons(ts)
    for gid in (2, 30, 53):
        layer, n = divmod(gid, 24)
        data = json.loads((site / f"api/wide/neuron2graph/{layer}/{n}.json").read_text())["data"]
        assert [(s["layer"] * 24 + s["neuron"], s["similarity"]) for s in data["similar"]] == top[gid]
        page = (site / f"wide/{layer}/{n}.html").read_text()
        for other, sim in top[gid]:
            assert f'href="/wide/{other // 24}/{other % 24}.html" title="similarity {sim:.2f}"' in page


def test_graph_payload_and_svg(wide_site):
    store, site = wide_site
    data = json.loads((site / "api/wide/neuron2graph/0/2.json").read_text())["data"]
    nodes = data["graph"]["graph"]
    assert [nodes[i]["token"] for i in data["graph"]["subgraph_indices"]] == ["<script>alert(1)</script>", "w5"]
    assert data["graphviz"].startswith("digraph") and '"<script>alert(1)</script>"' in data["graphviz"]
    assert data["evaluation"]["f1"] == 0.6
    page = (site / "wide/0/2.html").read_text()
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    svg = page[page.index('<svg class="n2g"'):page.index("</svg>", page.index('<svg class="n2g"'))]
    assert svg.count("<rect") == 5 and svg.count('class="end"') == 2
    assert 'href="/search.html?model=wide&amp;q=any%3Aw5"' in svg or 'href="/search.html?model=wide&q=any%3Aw5"' in svg
    assert "precision <b>0.75</b>" in page
    no_graph = json.loads((site / "api/wide/neuron2graph/0/3.json").read_text())["data"]
    assert no_graph["graph"] is None and no_graph["tokens"]["source"] == "top-sequences"


def _get(url: str):
    try:
        with urllib.request.urlopen(url) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_deepdecipher_search_url_answers_from_static_files(wide_site):
    from sitegen.site.serve import make_server
    import threading
    from tests.conftest import free_port

    store, site = wide_site
    server = make_server(site, "127.0.0.1", free_port())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/api/wide/neuron2graph-search"
    try:
        ts = build_token_store(store, first_valid=1)
        for query in ("any:the", "activating:t1", "important:w3"):
            status, body = _get(f"{base}?query={urllib.parse.quote(query)}")
            kind, key = query.split(":")
            assert status == 200 and json.loads(body) == [{"layer": x // 24, "neuron": x % 24} for x in sorted(_brute_answer(ts, kind, key))]
            assert json.loads(body)
        assert _get(f"{base}?query=any:nothing-has-this") == (200, b"[]")
        status, body = _get(base)
        assert status == 404 and "query" in json.loads(body)["error"]
    finally:
        server.shutdown()
        server.server_close()


def test_build_warns_when_a_search_folder_would_break_netlifys_limit(tmp_path, monkeypatch):
    store = write_synthetic_store(tmp_path / "store", name="tiny")
    report = build_site([store.root], tmp_path / "site")
    assert report.warnings == ()
    monkeypatch.setattr(search, "NETLIFY_DIR_LIMIT", 5)
    report = build_site([store.root], tmp_path / "site2")
    assert len(report.warnings) == 1 and "54,000 per folder" in report.summary()
