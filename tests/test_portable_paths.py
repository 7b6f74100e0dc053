"""Every output path is portable: no file name derives from a vocabulary token (so a token of any
length or spelling builds), and no two paths are one file on macOS or Windows (equal under case
folding and Unicode normalisation): the Publisher refuses those."""

from __future__ import annotations

import os
import unicodedata

import pytest

from sitegen.errors import BuildError
from sitegen.services.neuron2graph.tokenstore import build_token_store
from sitegen.site.build import build_site
from sitegen.site.publisher import Publisher
from sitegen.store import Store
from tests.reference import write_synthetic_graphs, write_synthetic_store

LONG_ASCII = "x" * 300  # 300 UTF-8 bytes: over every file system's 255-byte name limit
LONG_ACCENTED = "é" * 150  # 300 UTF-8 bytes as well
NFC, NFD = "café", unicodedata.normalize("NFD", "café")
SPELLINGS = ["The", "the", "THE", NFC, NFD, LONG_ASCII, LONG_ACCENTED]


def _caseless(path: str) -> str:
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", path).casefold())


def test_publisher_refuses_paths_equal_under_case_folding_or_normalisation(tmp_path):
    pub = Publisher(tmp_path)
    pub.publish("api/m/The.json", b"1")
    pub.publish(f"p/{NFC}.html", b"1")
    for clash in ("api/m/the.json", "api/M/x.json", f"p/{NFD}.html", f"P/{NFC.upper()}.html"):
        with pytest.raises(BuildError, match="letter case or Unicode normalisation"):
            pub.publish(clash, b"2")
    pub.publish("api/m/Thé.json", b"3")  # a different name is fine
    assert sorted(os.listdir(tmp_path / "api" / "m")) == ["The.json", "Thé.json"]


def test_vocabulary_of_long_and_case_or_normalisation_variants_builds(tmp_path):
    """A vocabulary holding The / the / THE, NFC and NFD spellings of one word and 300-byte tokens:
    the whole build succeeds, no two output paths are one file on macOS or Windows, and DeepDecipher's
    search URL finds each spelling as the exact token it is."""
    vocab = ["<bos>"] + [f" w{i}" for i in range(6)] + ["<script>alert(1)</script>"] + SPELLINGS
    store = write_synthetic_store(
        tmp_path / "store",
        name="spell",
        n_layers=2,
        n_neurons=8,
        n_seqs=12,
        seq_len=10,
        vocab=vocab,
        with_logits=False,
        with_graphs=False,
    )
    # (token, importance or activation, its own activation): the spelling fires, its context does not
    graphs = {(0, k): [([(tok, 0.9, 0.9), (" w1", 0.5, 0.1)], 0.9)] for k, tok in enumerate(SPELLINGS)}
    graphs[(1, 0)] = [([(LONG_ACCENTED, 0.9, 0.9), (NFD, 0.5, 0.1)], 0.9)]
    write_synthetic_graphs(store, graphs)
    site = tmp_path / "site"
    build_site([store.root], site)

    paths = [os.path.relpath(os.path.join(d, f), site) for d, _, files in os.walk(site) for f in files]
    folded: dict[str, str] = {}
    for p in paths:
        assert folded.setdefault(_caseless(p), p) == p, f"{p} and {folded[_caseless(p)]} are one file on macOS/Windows"
    assert max(len(part.encode()) for p in paths for part in p.split(os.sep)) <= 255

    from sitegen.services.neuron2graph import edge

    def read(site_path: str) -> bytes | None:
        f = site / edge.unquote(site_path).lstrip("/")
        return f.read_bytes() if f.is_file() else None

    ts = build_token_store(Store.open(store.root), first_valid=1)
    answers = {}
    for spelling in SPELLINGS:
        key = spelling if spelling != "The" else "the"  # Neuron2Graph lower-cases a Title-case token
        want = sorted(g for g in range(ts.n_neurons) if key in {ts.keys[k] for k in ts.activating[g]})
        assert want, spelling
        r = edge.neuron2graph_search(
            "/api/spell/neuron2graph-search", "query=" + edge.quote(f"activating:{spelling}", safe=""), read
        )
        assert (r.status, r.body) == (200, edge.orjson.dumps([{"layer": x // 8, "neuron": x % 8} for x in want])), (
            spelling
        )
        answers[spelling] = r.body
    assert (
        len({answers[s] for s in ("the", "THE", NFC, NFD, LONG_ASCII, LONG_ACCENTED)}) == 6
    )  # distinct tokens, distinct answers
