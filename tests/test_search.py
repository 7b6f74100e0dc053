"""Token store, static token search and similar neurons, each against a brute force."""

from __future__ import annotations

import html
import itertools
import json
import os
import shutil
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pytest
import requests

from sitegen.services import registry
from sitegen.services.neuron2graph import graph as g
from sitegen.services.neuron2graph.tokenstore import (
    FALLBACK_CAP,
    MAX_TERMS,
    MEASURE_GRAPHS,
    MEASURE_TOKENS,
    SOURCE_GRAPH,
    SOURCE_TOP,
    build_token_store,
    flat_share,
    parse_query,
    similar_neurons,
)
from sitegen.services.tokens import display
from sitegen.site import search
from sitegen.site.build import build_site
from sitegen.site.publisher import NETLIFY_DIR_LIMIT
from tests.reference import SYNTHETIC_LINES, static_search, write_synthetic_graphs, write_synthetic_store


@pytest.fixture(scope="module")
def wide_site(tmp_path_factory):
    """Three layers x 24 neurons, a small vocabulary (so neurons share tokens), four graphs (two of
    them similar, one with tokens both activating and important) and a posting cap of 3, so capped lists and their "more" files are exercised."""
    root = tmp_path_factory.mktemp("wide")
    vocab = ["<bos>"] + [f" t{i}" for i in range(8)] + ["The", " the", "<script>alert(1)</script>"]
    store = write_synthetic_store(
        root / "store",
        name="wide",
        n_layers=3,
        n_neurons=24,
        n_seqs=30,
        seq_len=10,
        vocab=vocab,
        top_k=4,
        n_random=1,
        with_logits=False,
        with_graphs=False,
    )
    write_synthetic_graphs(
        store,
        {
            (0, 2): SYNTHETIC_LINES,
            (2, 5): [([(" t1", 0.9, 0.9), (" the", 0.9, 0.2)], 0.9)],
            (1, 7): [([(" t1", 0.9, 0.9), (" t2", 0.9, 0.2)], 0.9)],
            # t3 and t4 each activating and important: any: counts them once
            (1, 9): [([(" t3", 0.9, 0.9), (" t4", 0.9, 0.2)], 0.9), ([(" t4", 0.9, 0.9), (" t3", 0.9, 0.2)], 0.9)],
        },
    )
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
    pairs = [
        (a, vocab[seqs[s][p]]) for s, acts in zip(row["top_seq"], row["top_acts"]) for p, a in enumerate(acts) if p >= 1
    ]
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
            assert sorted(keys[k] for k in ts.activating[gid]) == sorted(
                _brute_fallback(store, layer, neuron, vocab)
            ), gid
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


@pytest.mark.parametrize(
    "query, message",
    [("foo:the", "unknown type"), ("any:", "no token"), ("any:the,", "empty term"), ("", "empty term")],
)
def test_malformed_queries_raise_a_message(query, message):
    with pytest.raises(ValueError, match=message):
        parse_query(query)


def test_query_terms_are_deduplicated_after_normalisation():
    assert parse_query("any:the,any:The,any: the,the,activating:the,any:the") == [("any", "the"), ("activating", "the")]
    assert len(parse_query(",".join(f"any:t{i}" for i in range(MAX_TERMS)))) == MAX_TERMS


@pytest.mark.parametrize("n", [MAX_TERMS + 1, 7000])
def test_query_over_the_term_cap_is_refused_with_the_cap_in_the_message(n):
    with pytest.raises(ValueError, match=rf"too many terms \({n}\) in the query: ask for at most {MAX_TERMS} "):
        parse_query(",".join(["any:the"] * n))


def _capped_tokens(site: Path) -> list[str]:
    """Tokens of the wide site whose activating list is capped in its shard (it has a "more" file)."""
    out = []
    for shard in sorted((site / "search/wide/tokens").iterdir()):
        out += [t for t, e in orjson.loads(shard.read_bytes()).items() if e["na"] > len(e["a"])]
    return sorted(out)


def test_search_url_reads_each_file_once_per_request(wide_site):
    """Repeated and overlapping terms of a capped token: one read of meta, shard and "more" file
    each (not one per term), and the right answer; over the cap, 400 before any read."""
    from sitegen.services.neuron2graph.edge import neuron2graph_search

    store, site = wide_site
    ts = build_token_store(store, first_valid=1)
    token = _capped_tokens(site)[0]
    reads: list[str] = []

    def read(path: str) -> bytes | None:
        reads.append(path)
        file = site / urllib.parse.unquote(path).lstrip("/")
        return file.read_bytes() if file.is_file() else None

    api = "/api/wide/neuron2graph-search"
    query = ",".join([f"any:{token}", f"activating:{token}"] * (MAX_TERMS // 2))
    r = neuron2graph_search(api, "query=" + urllib.parse.quote(query, safe=""), read)
    want = _brute_answer(ts, "any", token) & _brute_answer(ts, "activating", token)
    assert (r.status, orjson.loads(r.body)) == (200, _neurons(want)) and want
    assert len(reads) == len(set(reads)) == 3 and any("/more/" in p for p in reads), reads
    reads.clear()
    r = neuron2graph_search(api, "query=" + urllib.parse.quote(",".join([f"any:{token}"] * 7000), safe=""), read)
    assert r.status == 400 and orjson.loads(r.body)["error"].startswith(
        f"too many terms (7000) in the query: ask for at most {MAX_TERMS} "
    )
    assert reads == []


def test_shards_are_small_and_found_by_hash(wide_site):
    store, site = wide_site
    meta = orjson.loads((site / "search/wide/meta.json").read_bytes())
    assert meta["shards"] & (meta["shards"] - 1) == 0  # a power of two
    for shard in (site / "search/wide/tokens").iterdir():
        for key in orjson.loads(shard.read_bytes()):
            assert search.fnv1a(key) % meta["shards"] == int(shard.stem)
    assert search.fnv1a("") == 0x811C9DC5 and search.fnv1a("a") == 0xE40C292C  # the published FNV-1a test vectors


@pytest.mark.parametrize("stop_min", [1000, 8])
def test_similarity_equals_brute_force_all_pairs(wide_site, stop_min):
    """Every pair, by the definitions: two graphs by DeepDecipher's formula (>= 0.4); any other
    pair by the rarity-weighted Jaccard index of the activating sets (>= 0.2, at least 2 shared
    tokens). With stop_min=8 a token in more than 8 graphless neurons' sets is left out of theirs
    (never out of a graph's)."""
    import math

    store, _ = wide_site
    ts = build_token_store(store, first_valid=1)
    got = similar_neurons(ts, top=1000, stop_min=stop_min, stop_share=0.0).lists
    graphless = [g for g in range(ts.n_neurons) if ts.source[g] == SOURCE_TOP]
    users = Counter(ts.keys[k] for g in graphless for k in ts.activating[g])
    stop = {key for key, count in users.items() if count > stop_min}
    assert bool(stop) == (stop_min == 8) and any(ts.source[g] == SOURCE_GRAPH for g in range(ts.n_neurons))
    assert (got == similar_neurons(ts, top=1000).lists) == (not stop)  # the stop tokens change some neurons' lists
    sets = [
        ({ts.keys[k] for k in a} - (stop if ts.source[g] == SOURCE_TOP else set()), {ts.keys[k] for k in i})
        for g, (a, i) in enumerate(zip(ts.activating, ts.important))
    ]
    df = Counter(t for a, _ in sets for t in a)
    holders = sum(1 for a, _ in sets if a)
    weight = {t: math.log(holders / c) for t, c in df.items()}
    measures = Counter()
    for x in range(ts.n_neurons):
        want = {}
        for y in range(ts.n_neurons):
            (ax, ix), (ay, iy) = sets[x], sets[y]
            if x == y:
                continue
            if ts.source[x] == ts.source[y] == SOURCE_GRAPH:
                denom = min(len(ax), len(ay)) + min(len(ix), len(iy))
                sim = (len(ax & ay) + len(ix & iy)) / denom if denom else 0
                if sim >= 0.4:
                    want[y] = (round(sim, 4), MEASURE_GRAPHS)
            elif len(ax & ay) >= 2:
                sim = sum(weight[t] for t in ax & ay) / sum(weight[t] for t in ax | ay)
                if sim >= 0.2 - 1e-12:
                    want[y] = (round(sim, 4), MEASURE_TOKENS)
        assert {y: (s, m) for y, s, m in got[x]} == want, x
        assert [s for _, s, _ in got[x]] == sorted((s for _, s, _ in got[x]), reverse=True)
        assert all({y2: s2 for y2, s2, _ in got[y]}.get(x) == s for y, s, _ in got[x])  # symmetric
        measures.update(m for _, _, m in got[x])
    assert measures[MEASURE_TOKENS] > 4 and measures[MEASURE_GRAPHS] >= 2, measures


def test_one_shared_token_is_never_a_neighbour_and_shared_tokens_are_shown():
    """A neuron whose only token is ` union` is not similar to the neurons that hold ` union`
    among others (DeepDecipher's formula, dividing by the smaller set, made it 1.00 with each);
    neurons sharing several rare tokens are, and `shared` names those tokens, rarest first."""
    import numpy as np

    from sitegen.services.neuron2graph.tokenstore import TokenStore

    keys = [" union", " the", " tax", " school", " war", " peace", " law", " trade"]
    sets = [[0]] + [[0, 1, 2 + i] for i in range(6)] + [[2, 3, 4, 5], [2, 3, 4, 6], [2, 3, 4, 5, 7]]
    n = len(sets)
    ts = TokenStore(
        keys,
        n,
        [np.array(s, np.int64) for s in sets],
        [np.zeros(0, np.int64)] * n,
        [SOURCE_TOP] * n,
        [None] * n,
        [0.0] * n,
    )
    sim = similar_neurons(ts)
    assert sim.lists[0] == []  # one shared token: no neighbour at all
    assert all(s < 1.0 for entries in sim.lists for _, s, _ in entries)  # no two sets are equal
    first = dict((j, s) for j, s, _ in sim.lists[7])
    assert set(first) >= {8, 9} and first[9] > first[8] >= 0.4
    assert [keys[k] for k in sim.shared(7, 9, MEASURE_TOKENS)] == [" peace", " tax", " school", " war"]
    assert all(len(sim.lists[i]) == 5 for i in range(1, 7))  # the six that share ` union` and ` the` are neighbours
    assert flat_share(sim) == 0.0


def test_similar_neurons_are_in_the_neuron_json_and_page(wide_site):
    store, site = wide_site
    ts = build_token_store(store, first_valid=1)
    sim = similar_neurons(ts)
    top = sim.lists
    seen = set()
    for gid in (2, 31, 53, 58):
        layer, n = divmod(gid, 24)
        data = json.loads((site / f"api/wide/neuron2graph/{layer}/{n}.json").read_text())["data"]
        assert [(s["layer"] * 24 + s["neuron"], s["similarity"], s["measure"]) for s in data["similar"]] == top[gid]
        page = (site / f"wide/{layer}/{n}.html").read_text()
        for entry, (other, s, m) in zip(data["similar"], top[gid]):
            shared = [ts.keys[k] for k in sim.shared(gid, other, m)]
            assert (
                entry["shared"] == shared
                and shared
                and set(shared) <= {ts.keys[k] for k in ts.activating[gid]} | {ts.keys[k] for k in ts.important[gid]}
            )
            assert f'href="/wide/{other // 24}/{other % 24}.html" title="similarity {s:.2f} ({m})"' in page
            assert (
                f'<span class="shared">shares {", ".join(f"<code>{html.escape(display(t), quote=True)}</code>" for t in shared)}</span>'
                in page
            )
            seen.add(m)
    assert seen == {MEASURE_GRAPHS, MEASURE_TOKENS}


def test_the_api_names_the_similarity_measure_and_the_docs_state_deepdeciphers_own(wide_site):
    """`similar` records its measure in the payload and the OpenAPI schema; docs/methods.md says how
    DeepDecipher's server differs (denominator of the later neuron, every neighbour >= 0.4, the
    earlier larger-size denominator) rather than claiming to be exactly DeepDecipher's."""
    _, site = wide_site
    schema = json.loads((site / "api/openapi.json").read_text())["components"]["schemas"]["Neuron2Graph"]["properties"][
        "similar"
    ]
    measure = schema["items"]["properties"]["measure"]
    assert (
        "measure" in schema["items"]["required"]
        and MEASURE_GRAPHS in measure["enum"]
        and "|A_j| + |I_j|" in measure["description"]
    )
    readme = " ".join((Path(__file__).parents[1] / "docs" / "methods.md").read_text().split())
    for fact in (
        "`|A_j| + |I_j|`, j the later neuron",
        "keeps every neighbour >= 0.4 instead of the top 10",
        "divided by the larger of the two neurons' token counts",
        '`"measure": "deepdecipher-intended"`',
    ):
        assert fact in readme, fact
    assert "exactly DeepDecipher's" not in readme


def test_graph_payload_and_svg(wide_site):
    store, site = wide_site
    data = json.loads((site / "api/wide/neuron2graph/0/2.json").read_text())["data"]
    nodes = data["graph"]["graph"]
    assert [nodes[i]["token"] for i in data["graph"]["subgraph_indices"]] == ["<script>alert(1)</script>", "w5"]
    assert data["graphviz"].startswith("digraph") and '"<script>alert(1)</script>"' in data["graphviz"]
    assert data["evaluation"]["f1"] == 0.6
    page = (site / "wide/0/2.html").read_text()
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    svg = page[page.index('<svg class="n2g"') : page.index("</svg>", page.index('<svg class="n2g"'))]
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


def _neurons(ids, size: int = 24) -> list[dict]:
    return [{"layer": x // size, "neuron": x % size} for x in sorted(ids)]


@pytest.fixture(scope="module")
def wide_server(wide_site):
    from sitegen.site.serve import make_server
    from tests.conftest import free_port

    _, site = wide_site
    server = make_server(site, "127.0.0.1", free_port())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_sitegen_serve_answers_lists_empty_and_intersections(wide_site, wide_server):
    store, _ = wide_site
    base = f"{wide_server}/api/wide/neuron2graph-search"
    ts = build_token_store(store, first_valid=1)
    for query in ("any:the", "activating:t1", "important:w3"):
        kind, key = query.split(":")
        status, body = _get(f"{base}?query={urllib.parse.quote(query)}")
        assert (status, json.loads(body)) == (200, _neurons(_brute_answer(ts, kind, key))) and json.loads(body)
    for a, b in (("t3", "t7"), ("<script>alert(1)</script>", "t3")):  # the second's lists are capped: "more" files
        both = _brute_answer(ts, "any", a) & _brute_answer(ts, "activating", b)
        assert both and both != _brute_answer(ts, "any", a), "the AND check needs a proper, non-empty intersection"
        status, body = _get(f"{base}?query={urllib.parse.quote(f'any:{a},activating:{b}')}")
        assert (status, json.loads(body)) == (200, _neurons(both))
    assert _get(f"{base}?query=any:nothing-has-this") == (200, b"[]")
    assert _get(f"{base}?query=any:the,any:nothing-has-this") == (200, b"[]")
    status, body = _get(f"{base}?query=foo:the")
    assert status == 400 and "unknown type" in json.loads(body)["error"]
    status, body = _get(base)
    assert status == 404 and "query" in json.loads(body)["error"]
    r = urllib.request.urlopen(f"{base}?query=any:the")
    assert r.headers["Access-Control-Allow-Origin"] == "*" and r.headers["Content-Type"] == "application/json"


def _deno() -> str | None:
    try:
        import deno

        return deno.find_deno_bin()
    except (ImportError, FileNotFoundError):
        return shutil.which("deno")


# Strings where JavaScript's and Python's string functions differ (istitle, isalpha, strip, lower).
NORMALISE_CASES = [
    "The",
    "THE",
    "the",
    " The ",
    "\u00a0the\u00a0",
    "\x1cthe\x1f",
    "\ufeffthe",
    "\x85the",
    "Ǆemo",
    "ǅemo",
    "Σας",
    "ΣΑΣ",
    "İstanbul",
    "Straße",
    " ",
    "  ",
    "T",
    " 1 ",
    "ⅷ",
    "Ⅷx",
    "Hello World",
    "hello World",
    "A1b",
    "ß",
    "ﬁle",
    "Ǉ",
    "\u2003x\u2003",
    "\u200bX\u200b",
    "Ωmega",
    "ᾼx",
    "x\u0301",
]


needs_deno = pytest.mark.skipif(
    _deno() is None, reason="needs Deno: pip install deno (in the test extra, so `make test` has it)"
)


def test_edge_function_carries_the_site_security_headers():
    """Netlify adds no [[headers]] to an edge function's own response, so the function sets
    netlify.toml's site-wide security headers itself (the Deno test checks both ports agree)."""
    import tomllib

    from sitegen.services.neuron2graph.edge import HEADERS

    doc = tomllib.loads((Path(__file__).resolve().parents[1] / "netlify.toml").read_text())
    site = next(h["values"] for h in doc["headers"] if h["for"] == "/*")
    assert site and set(site.items()) <= set(HEADERS)


@pytest.mark.deno
@needs_deno
def test_edge_function_under_deno_answers_like_sitegen_serve(wide_site, wide_server, tmp_path):
    """The deployed edge function (Deno) and its Python port in `sitegen serve` give the same
    status, headers and bytes for every query of a small site, and the lists are right."""
    from sitegen.services.neuron2graph.edge import HEADERS

    store, _site = wide_site
    ts = build_token_store(store, first_valid=1)
    q = lambda text: "?query=" + urllib.parse.quote(text, safe="")
    api = "/api/wide/neuron2graph-search"
    urls = [f"{api}{q(f'{kind}:{key}')}" for key in ts.keys for kind in ("any", "activating", "important")]
    present = [k for k in ts.keys if _brute_answer(ts, "any", k)][:6]
    urls += [f"{api}{q(f'any:{a},activating:{b}')}" for a, b in itertools.permutations(present, 2)]
    urls += [
        f"{api}{q(t)}"
        for t in (
            "any:nothing-has-this",
            "important:t1",
            "t1",
            "any:The",
            "ANY:the",
            " any : the",
            "any:the,any:zzz",
            "foo:the",
            "any:",
            "any:the,",
            ",",
            "",
            'any:\x01\t"x"',
            "Ünknown:ß",
            "any:日本",
            "any:\u00a0the",
            # terms joined by a space are refused; a token's own leading space is not
            "any:the any:t1",
            "t1 ACTIVATING:the",
            "any:t1,any:the\tImportant:t2",
            "any:t1, any:the",
            "any:the company:",
        )
    ]
    urls += [
        api,
        api + "/",
        api + "?query",
        api + "?query=",
        api + "?q=any:the",
        api + "?query=any:t1&query=any:the",
        api + "?query=any%3At1",
        api + "?query=any:+t1",
        api + "?query=any:%E2%82",
        api + "?query=any:%zz",
        "/api/nomodel/neuron2graph-search?query=any:the",
        "/api/no%2Fmodel/neuron2graph-search?query=any:the",
        "/api/%E2%82/neuron2graph-search?query=any:the",
        "/api/a/b/neuron2graph-search?query=any:the",
    ]
    # repeated terms of a capped token, the term cap and one over it: same answer, each file fetched once
    capped = _capped_tokens(_site)[0]
    repeated = ",".join([f"any:{capped}", f"activating:{capped}", f" Any : {capped}"] * 5)
    at_cap = ",".join(f"any:t{i % 8}" for i in range(MAX_TERMS))
    bounded = {repeated: 200, at_cap: 200, ",".join(["any:the"] * (MAX_TERMS + 1)): 400}
    urls += [f"{api}{q(t)}" for t in bounded]
    flood = ",".join(["any:t1"] * 7000)  # unencoded, to stay under serve's 64 KiB request line
    bounded[flood] = 400
    urls.append(f"{api}?query={flood}")
    done = subprocess.run(
        [_deno(), "run", "--quiet", "--no-prompt", "--allow-net=127.0.0.1", "tests/edge_harness.ts"],
        input=json.dumps({"base": wide_server, "urls": urls, "normalise": NORMALISE_CASES}),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DENO_DIR": str(tmp_path / "deno"), "DENO_NO_UPDATE_CHECK": "1", "NO_COLOR": "1"},
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["normalised"] == [g.normalise(t) for t in NORMALISE_CASES]
    names = {name.lower() for name, _ in HEADERS}
    statuses = set()
    for url, deno_response in zip(urls, out["responses"], strict=True):
        r = requests.get(wide_server + url)
        assert (deno_response["status"], bytes.fromhex(deno_response["body"])) == (r.status_code, r.content), url
        assert {k: v for k, v in deno_response["headers"]} == {
            k.lower(): v for k, v in r.headers.items() if k.lower() in names
        }, url
        statuses.add(r.status_code)
    assert statuses == {200, 400, 404}
    for text in ("any:the any:t1", "t1 ACTIVATING:the", "any:t1,any:the\tImportant:t2"):
        body = json.loads(bytes.fromhex(out["responses"][urls.index(f"{api}{q(text)}")]["body"]))
        assert body["error"].endswith("with no comma between them: join terms with commas, e.g. any:the,any:of"), (
            text,
            body,
        )
    assert json.loads(bytes.fromhex(out["responses"][urls.index(f"{api}{q('any:t1, any:the')}")]["body"])) == _neurons(
        _brute_answer(ts, "any", "t1") & _brute_answer(ts, "any", "the")
    )
    for text, status in bounded.items():
        response = out["responses"][urls.index(f"{api}?query={text}" if text == flood else f"{api}{q(text)}")]
        body = json.loads(bytes.fromhex(response["body"]))
        fetched = response["fetched"]
        assert len(fetched) == len(set(fetched)), (text[:60], fetched)  # no file fetched twice
        if status == 400:
            assert response["status"] == 400 and fetched == [], fetched
            assert body["error"].startswith(
                f"too many terms ({text.count(',') + 1}) in the query: ask for at most {MAX_TERMS} "
            )
    response = out["responses"][urls.index(f"{api}{q(repeated)}")]
    want = _brute_answer(ts, "any", capped) & _brute_answer(ts, "activating", capped)
    assert json.loads(bytes.fromhex(response["body"])) == _neurons(want) and want
    assert len(response["fetched"]) == 3 and any("/more/" in p for p in response["fetched"]), response["fetched"]
    want = set.intersection(*(_brute_answer(ts, "any", f"t{i}") for i in range(8)))
    assert json.loads(bytes.fromhex(out["responses"][urls.index(f"{api}{q(at_cap)}")]["body"])) == _neurons(want)
    for key in ts.keys:  # and the lists are the right ones
        for kind in ("any", "activating", "important"):
            body = bytes.fromhex(out["responses"][urls.index(f"{api}{q(f'{kind}:{key}')}")]["body"])
            assert json.loads(body) == _neurons(_brute_answer(ts, kind, key)), (kind, key)
    checked = 0
    for a, b in itertools.permutations(present, 2):
        want = _brute_answer(ts, "any", a) & _brute_answer(ts, "activating", b)
        assert json.loads(
            bytes.fromhex(out["responses"][urls.index(f"{api}{q(f'any:{a},activating:{b}')}")]["body"])
        ) == _neurons(want)
        checked += bool(want)
    assert checked


@pytest.mark.deno
@needs_deno
def test_edge_function_type_checks_under_deno():
    done = subprocess.run(
        [
            _deno(),
            "check",
            "--quiet",
            "sitegen/services/neuron2graph/neuron2graph-search.ts",
            "netlify/edge-functions/neuron2graph-search.ts",  # Netlify's entry, re-exporting it
            "tests/edge_harness.ts",
            "benchmarks/search_edge.ts",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "DENO_NO_UPDATE_CHECK": "1", "NO_COLOR": "1"},
    )
    assert done.returncode == 0, done.stderr + done.stdout


def test_build_warns_when_a_folder_would_break_netlifys_limit(tmp_path, monkeypatch):
    import sitegen.site.build as build

    store = write_synthetic_store(tmp_path / "store", name="tiny")
    report = build_site([store.root], tmp_path / "site")
    assert report.warnings == ()
    folder, count = report.largest_folder
    assert count == sum(1 for p in (tmp_path / "site" / folder).iterdir() if p.is_file())
    monkeypatch.setattr(build, "NETLIFY_DIR_LIMIT", count - 1)
    report = build_site([store.root], tmp_path / "site2")
    assert len(report.warnings) == 1 and f"holds {count} files, over Netlify's" in report.summary()


class _CountingPublisher:
    """Counts files per folder without writing them."""

    def __init__(self):
        self.folders: dict[str, int] = {}

    def publish(self, rel: str, data) -> None:
        folder = rel.rsplit("/", 1)[0]
        self.folders[folder] = self.folders.get(folder, 0) + 1


def test_search_folders_stay_under_netlifys_limit_for_a_large_vocabulary():
    """30,000 distinct tokens over 2,048 neurons: one file per (type, token) put 60,000 files in one
    folder (Netlify refuses more than 54,000); the sharded layout stays far below at any vocabulary."""
    from types import SimpleNamespace

    import numpy as np

    from sitegen.services.neuron2graph.tokenstore import TokenStore

    vocab, layers, size = 30_000, 2, 1024
    n = layers * size
    activating = [np.array(sorted({(g * 20 + j) % vocab for j in range(20)}), dtype=np.int64) for g in range(n)]
    ts = TokenStore(
        [f"tok{i}" for i in range(vocab)],
        size,
        activating,
        [np.zeros(0, np.int64)] * n,
        [SOURCE_TOP] * n,
        [None] * n,
        [1.0] * n,
    )
    assert 2 * len(ts.search_postings()) > NETLIFY_DIR_LIMIT  # what one file per term (any: and activating:) would need
    pub = _CountingPublisher()
    cached = {  # what SiteModel.cached would hold
        "neuron2graph.token_store": ts,
        "neuron_explainer.explanations": {},
        "neuron_explainer.score_notes": {},
    }
    search.publish_search(
        pub,
        SimpleNamespace(
            name="wide-vocab",
            layer_size=size,
            num_layers=layers,
            cached=lambda key, make: cached[key],
            services=list(registry()),
        ),
    )
    folder, count = max(pub.folders.items(), key=lambda kv: kv[1])
    assert count < NETLIFY_DIR_LIMIT, (folder, count)


# ---- exact counts, support, corpus counts, terms joined by a space --------------------------------


def _shard_entry(site: Path, key: str, model: str = "wide") -> dict | None:
    base = site / "search" / model
    meta = json.loads((base / "meta.json").read_text())
    return json.loads((base / "tokens" / f"{search.fnv1a(key) % meta['shards']}.json").read_text()).get(key)


def _whole(site: Path, key: str, entry: dict, model: str = "wide", folder: str = "more") -> dict:
    if "m" not in entry:
        return entry
    meta = json.loads((site / "search" / model / "meta.json").read_text())
    return json.loads(
        (site / "search" / model / folder / f"{search.fnv1a(key) % meta['shards']}-{entry['m']}.json").read_text()
    )


def test_shards_carry_exact_counts_of_every_kind(wide_site):
    """ "n" is the exact size of what any: finds (the union), so the page never estimates."""
    store, site = wide_site
    ts = build_token_store(store, first_valid=1)
    overlapping = 0
    for key in ts.keys:
        want = {kind: len(_brute_answer(ts, kind, key)) for kind in ("any", "activating", "important")}
        entry = _shard_entry(site, key)
        if not want["any"]:
            assert entry is None or (entry["n"], entry["na"], entry["ni"]) == (0, 0, 0), key
            continue
        assert (entry["n"], entry["na"], entry["ni"]) == (want["any"], want["activating"], want["important"]), key
        overlapping += want["any"] < want["activating"] + want["important"]
    assert overlapping, "no token is both activating and important for one neuron: n would equal na + ni"


def _brute_support(store, layer: int, neuron: int, key: str, vocab: list[str]) -> int:
    """Distinct top sequences of the neuron where it reaches half its peak on a token of KEY."""
    row = store.read_layer("neuroscope", layer).to_pylist()[neuron]
    seqs = {s["seq_id"]: s["token_ids"] for s in store.sequences().to_pylist()}
    hits = [
        (s, a, vocab[seqs[s][p]])
        for s, acts in zip(row["top_seq"], row["top_acts"])
        for p, a in enumerate(acts)
        if p >= 1
    ]
    peak = max(a for _, a, _ in hits)
    return len({s for s, a, tok in hits if peak > 0 and a >= 0.5 * peak and g.normalise(tok) == key})


def test_shards_carry_each_results_support(wide_site):
    """ "s" holds, per neuron of the activating list, in how many distinct top sequences it fires
    on the token: checked against the stored top texts for every token (capped ones from "more")."""
    store, site = wide_site
    ts = build_token_store(store, first_valid=1)
    vocab = store.vocab()
    checked = ones = 0
    for key in ts.keys:
        entry = _shard_entry(site, key)
        if entry is None or not entry["na"]:
            continue
        ids = np.cumsum(_whole(site, key, entry)["a"]).tolist()
        support = _whole(site, key, entry, folder="support")["s"] if "m" in entry else entry["s"]
        assert len(support) == len(ids) and entry["s"] == support[: len(entry["a"])], key
        for gid, s in zip(ids, support):
            assert s == _brute_support(store, *divmod(gid, 24), key, vocab), (key, gid)
            checked += 1
            ones += s == 1
    assert checked > 50 and ones and ones < checked, (checked, ones)


def _brute_strength(store, layer: int, neuron: int, key: str, vocab: list[str]) -> float:
    """The neuron's largest activation on a token of KEY in its top sequences over its largest there
    (0 when it is never above 0 on it), in hundredths."""
    row = store.read_layer("neuroscope", layer).to_pylist()[neuron]
    seqs = {s["seq_id"]: s["token_ids"] for s in store.sequences().to_pylist()}
    hits = [
        (a, vocab[seqs[s][p]]) for s, acts in zip(row["top_seq"], row["top_acts"]) for p, a in enumerate(acts) if p >= 1
    ]
    peak = max(a for a, _ in hits)
    on_key = [a for a, tok in hits if g.normalise(tok) == key and a > 0]
    return round(max(on_key) / peak, 2) if on_key and peak > 0 else 0.0


def test_shards_carry_each_results_strength(wide_site):
    """ "w" holds, per neuron of the activating list, how strongly it fires on the token: checked
    against the stored top texts for every token (capped ones from the support file)."""
    store, site = wide_site
    ts = build_token_store(store, first_valid=1)
    vocab = store.vocab()
    values = []
    for key in ts.keys:
        entry = _shard_entry(site, key)
        if entry is None or not entry["na"]:
            continue
        ids = np.cumsum(_whole(site, key, entry)["a"]).tolist()
        strength = _whole(site, key, entry, folder="support")["w"] if "m" in entry else entry["w"]
        assert len(strength) == len(ids) and entry["w"] == strength[: len(entry["a"])], key
        for gid, w in zip(ids, strength):
            assert w == _brute_strength(store, *divmod(gid, 24), key, vocab), (key, gid)
            values.append(w)
    assert len(values) > 50 and len(set(values)) > 10 and 1.0 in values, values[:20]


def test_shards_count_every_token_of_the_stored_sequences(wide_site):
    """ "c": the token's occurrences in the stored sequences (BOS positions left out), also for a
    token no neuron has; meta.json says what was counted."""
    _count_check(*wide_site, "wide", need_unheld=False)


def test_a_token_no_neuron_has_still_carries_its_count(tall_site):
    _count_check(*tall_site, "tall", need_unheld=True)


@pytest.fixture(scope="module")
def tall_site(tmp_path_factory):
    from tests.reference import write_tall_site

    root = tmp_path_factory.mktemp("tall")
    return write_tall_site(root)


def _count_check(store, site, model, need_unheld):
    vocab = store.vocab()
    vocab = store.vocab()
    want: Counter = Counter()
    seqs = store.sequences().to_pylist()
    for s in seqs:
        want.update(g.normalise(vocab[t]) for t in s["token_ids"][1:])
    meta = json.loads((site / f"search/{model}/meta.json").read_text())
    assert meta["corpus"] == {
        "sequences": len(seqs),
        "tokens": sum(want.values()),
        "processed": store.manifest["processed"]["sequences"],
    }
    ts = build_token_store(store, first_valid=1)
    unheld = [k for k in want if not _brute_answer(ts, "any", k)]
    assert unheld or not need_unheld, "every token is some neuron's: the count of a miss would go unchecked"
    for key in unheld:
        assert _shard_entry(site, key, model)["a"] == [] and _shard_entry(site, key, model)["n"] == 0, key
    for key, count in want.items():
        assert _shard_entry(site, key, model)["c"] == count, key
    assert _shard_entry(site, "<bos>", model) is None  # only ever at position 0
    assert _shard_entry(site, "hello", model) is None


@pytest.mark.parametrize(
    "query", ["any:the any:of", "the any:of", "any:the ACTIVATING:of", "t1\timportant:t2", "any:t1,any:the  Any:t2"]
)
def test_terms_joined_by_a_space_are_refused(query):
    with pytest.raises(ValueError, match="with no comma between them: join terms with commas, e.g. any:the,any:of"):
        parse_query(query)


def test_a_token_may_start_with_a_space():
    assert parse_query(" the") == [("any", "the")]
    assert parse_query("any: any") == [("any", "any")]
    assert parse_query("any:t1, any:the") == [("any", "t1"), ("any", "the")]
    assert parse_query("any:the company:") == [("any", "the company:")]  # no type after the space
