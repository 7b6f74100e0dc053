"""Artefact neurons (sitegen/services/artefacts.py): the detector on planted neurons, `--n2g N`
skipping them, and the site's flags, graph column and graph count (no torch)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import orjson
import pytest

from sitegen.services.artefacts import FIRST_POSITION, WHITESPACE, layer_artefacts
from sitegen.services.neuroscope import data as ns_data
from sitegen.services.selection import select_neurons
from sitegen.store import Store
from tests.reference import SYNTHETIC_LINES, brute_force_state, write_synthetic_graphs, write_synthetic_store

VOCAB = ["<bos>"] + [f" w{i}" for i in range(12)] + ["<script>alert(1)</script>", "\n"]
TOP_K = 10
# layer 0's planted neurons; the rest are ordinary
ORDINARY, FIRST, BLANK, SPIKE, WORD, FIRST_WORD = range(6)


def _planted_store(root):
    """A synthetic store whose layer 0 is replaced by planted neurons. Artefacts: FIRST peaks on the
    first token after BOS (and has the layer's highest max), BLANK on the newline token. Not
    artefacts: SPIKE's maximum is one outlier text (the layer's second highest max); WORD fires on
    the word ' w3' (one token, but a word); FIRST_WORD fires on ' w5' and ' w6', most at the first
    position (a token neuron that fires most without context); ORDINARY is noise."""
    store = write_synthetic_store(
        root, n_layers=2, n_neurons=6, n_seqs=40, seq_len=24, vocab=VOCAB, top_k=TOP_K, with_graphs=False
    )
    seqs = store.sequences()
    seq_ids = np.asarray(seqs.column("seq_id").to_pylist())
    ids = seqs.column("token_ids").to_pylist()
    lengths = np.array([len(t) for t in ids])
    tokens = np.zeros((len(ids), 24), np.int64)
    for i, t in enumerate(ids):
        tokens[i, : len(t)] = t
    rng = np.random.default_rng(7)
    acts = rng.normal(0, 1, size=(len(ids), 24, 6)).astype(np.float32)
    acts[:, 1, FIRST] = 50 + rng.random(len(ids))  # position 1: the first counted position
    acts[:, :, BLANK] += np.where(tokens == VOCAB.index("\n"), 6.0, 0.0)
    acts[:, :, SPIKE] *= 0.5
    acts[5, 9, SPIKE] = 40.0
    acts[:, :, WORD] += np.where(tokens == VOCAB.index(" w3"), 6.0, 0.0)
    w56 = np.isin(tokens, [VOCAB.index(" w5"), VOCAB.index(" w6")])
    acts[:, :, FIRST_WORD] += np.where(w56, 6.0, 0.0)
    acts[:, 1, FIRST_WORD] += np.where(w56[:, 1], 4.0, 0.0)
    st = brute_force_state(acts, lengths, seq_ids, 1, TOP_K, 2, 0)
    store.write_layer(
        "neuroscope", 0, ns_data.state_to_table(st, TOP_K, 2, dict(zip(seq_ids.tolist(), lengths.tolist())))
    )
    return Store.open(root)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return _planted_store(tmp_path_factory.mktemp("planted") / "store")


def test_detector_flags_planted_artefacts_and_no_ordinary_neuron(planted):
    codes = [a.code if a else None for a in layer_artefacts(planted, 0)]
    assert codes == [None, FIRST_POSITION, WHITESPACE, None, None, None]
    # layer 1 and the default synthetic store hold only noise (plus one shared top token): nothing flagged
    assert layer_artefacts(planted, 1) == [None] * 6
    # the planted neurons do what they claim: FIRST_WORD peaks at position 1 on most of its texts
    t = planted.read_layer("neuroscope", 0, columns=["top_acts"]).column("top_acts").to_pylist()
    assert sum(1 + int(np.argmax(a[1:])) == 1 for a in t[FIRST_WORD]) * 2 >= TOP_K
    assert sum(1 + int(np.argmax(a[1:])) == 1 for a in t[FIRST]) == TOP_K
    evidence = layer_artefacts(planted, 0)[BLANK].evidence
    assert "'\\n'" in evidence and f"token id {VOCAB.index(chr(10))}" in evidence


def test_detector_flags_nothing_in_the_default_synthetic_store(tmp_path):
    store = write_synthetic_store(tmp_path / "store", n_layers=2, n_neurons=8, top_k=5)
    assert all(a is None for layer in range(2) for a in layer_artefacts(store, layer))


def test_n2g_count_skips_artefacts_even_with_the_highest_max(planted):
    maxes = planted.read_layer("neuroscope", 0, columns=["max"]).column("max").to_pylist()
    assert int(np.argmax(maxes)) == FIRST and sorted(range(6), key=lambda n: -maxes[n])[1] == SPIKE
    ordinary = sorted((n for n in range(6) if n not in (FIRST, BLANK)), key=lambda n: (-maxes[n], n))
    assert ordinary[0] == SPIKE  # an outlier text is no artefact
    assert select_neurons("2@0", 2, 6, planted, skip_artefacts=True) == {0: sorted(ordinary[:2])}
    # more than the layer's ordinary neurons: the artefacts come last, largest max first
    assert select_neurons("5@0", 2, 6, planted, skip_artefacts=True) == {0: sorted(ordinary + [FIRST])}
    # `explain --neurons N` keeps ranking by the maximum alone
    assert select_neurons("1@0", 2, 6, planted, option="--neurons") == {0: [FIRST]}


@pytest.mark.model  # the n2g stage imports torch
def test_n2g_stage_and_run_select_without_artefacts(planted, tmp_path, monkeypatch):
    """The compute stage's plan (which layers have missing graphs) and run_n2g's graph list both
    use the artefact-aware ranking."""
    from sitegen.services.neuron2graph import compute as n2g
    from sitegen.services.neuron2graph.service import Neuron2Graph

    maxes = planted.read_layer("neuroscope", 0, columns=["max"]).column("max").to_pylist()
    best = max((n for n in range(6) if n not in (FIRST, BLANK)), key=lambda n: (maxes[n], -n))
    store = _planted_store(tmp_path / "store")
    write_synthetic_graphs(store, {(0, best): SYNTHETIC_LINES})
    store = Store.open(store.root)
    cfg = SimpleNamespace(options={"n2g": "1@0"}, seed=0)
    assert Neuron2Graph().stage_layers(store, cfg) == {}  # the layer's choice already has its graph
    seen = []
    monkeypatch.setattr(n2g.ModelTokens, "prepare", classmethod(lambda cls, model, store: SimpleNamespace(neutral=0)))
    monkeypatch.setattr(
        n2g,
        "build_layer",
        lambda model, store, layer, neurons, cfg, mt, log: (
            seen.append((layer, list(neurons))),
            (n2g.graphs_table([]), 0),
        )[1],
    )
    n2g.run_n2g(None, _planted_store(tmp_path / "fresh"), "2@0", n2g.N2GConfig(seed=0), log=lambda m: None)
    assert seen == [(0, select_neurons("2@0", 2, 6, planted, skip_artefacts=True)[0])] and FIRST not in seen[0][1]


def test_site_flags_artefacts_graph_column_and_graph_count(planted, tmp_path):
    from sitegen.site.build import build_site

    store = _planted_store(tmp_path / "store")
    write_synthetic_graphs(store, {(0, ORDINARY): SYNTHETIC_LINES, (0, WORD): [], (1, 2): SYNTHETIC_LINES})
    out = tmp_path / "site"
    build_site([store.root], out)
    model = "toy-model"
    layer = (out / model / "0" / "index.html").read_text()
    header = re.findall(r'<th scope="col">(?:<button[^>]*>)?([^<]+)', layer)
    graph_col, artefact_col = header.index("Graph F1") + 1, header.index("Artefact") + 1  # +1: the neuron column
    rows = {
        int(m.group(1)): re.findall(r"<td[^>]*>(.*?)</td>", m.group(0), re.S)
        for m in re.finditer(r'<tr><td data-v="(\d+)">.*?</tr>', layer, re.S)
    }
    assert rows[ORDINARY][graph_col] == "0.6" and rows[WORD][graph_col] == "0.6 (empty graph)"
    assert all(rows[n][graph_col] == "—" for n in (FIRST, BLANK, SPIKE, FIRST_WORD))
    marks = {n: re.sub(r"<[^>]+>", "", rows[n][artefact_col]) for n in rows}
    assert marks == {ORDINARY: "", FIRST: "first token", BLANK: "whitespace", SPIKE: "", WORD: "", FIRST_WORD: ""}
    assert 'title="peaks on the first token after BOS: ' in rows[FIRST][artefact_col]
    page = (out / model / "0" / f"{FIRST}.html").read_text()
    assert (
        "this neuron peaks on the first token after BOS (10 of its 10 firing top texts peak at position 1, on " in page
    )
    assert "Likely artefact" not in (out / model / "0" / f"{WORD}.html").read_text()
    api = orjson.loads((out / "api" / model / "neuron2graph" / "0" / f"{BLANK}.json").read_bytes())["data"]
    assert api["artefact"] == WHITESPACE
    home = (out / model / "index.html").read_text()
    assert "<dt>Graphs</dt><dd>3 of 12 neurons have a Neuron2Graph graph</dd>" in home
    # the model page's layer row names its strongest neuron and says when it is an artefact
    assert re.search(
        rf'<a href="/{model}/0/{FIRST}.html">0:{FIRST}</a></td><td><code>[^<]*</code> '
        r'<span class="artefact">artefact: peaks on the first token after BOS</span>',
        home,
    )


def test_a_missing_sequence_is_a_one_line_store_error(tmp_path):
    import pyarrow.compute as pc

    from sitegen.errors import StoreError
    from sitegen.store import SEQUENCES_SCHEMA

    store = _planted_store(tmp_path / "store")
    seqs = store.sequences()
    store.write_sequences(seqs.filter(pc.not_equal(seqs.column("seq_id"), 5)).cast(SEQUENCES_SCHEMA))
    with pytest.raises(
        StoreError, match=r"sequence 5 is referenced but missing from sequences.parquet; recompute the store"
    ):
        layer_artefacts(Store.open(store.root), 0)
