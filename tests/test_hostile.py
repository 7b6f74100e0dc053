"""Hostile input (issue 10, items 7 and 9): model names that are not URL-safe or that collide with
the site's own top-level paths, and corpora built to break things (a 10 MB line without
whitespace, NUL bytes, lone surrogates, right-to-left and zero-width characters, markup in texts
and file names). Each must compute and build, or fail with one line, and every page escapes it all."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from sitegen.cli import main
from sitegen.errors import BuildError, ConfigError
from sitegen.site.build import build_site
from tests.conftest import HAS_TORCH
from tests.reference import write_synthetic_store

MARKUP = "<img src=x onerror=alert(1)>"
SCRIPT = "<script>alert(1)</script>"


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(res, *needles: str) -> str:
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- item 7: model names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "toy\n",
        "toy\r\n",
        " toy",
        "to/y",
        "..",
        "-toy",
        "",
        "t" * 101,
        "api",
        "API",
        "assets",
        "search",
        "index",
        "index.html",
        "404",
        "about",
        "about.html",
        "Search.html",
    ],
)
def test_compute_refuses_bad_names_before_any_work(name, tmp_path):
    """--name is checked first: the model folder and the corpus here do not even exist."""
    from sitegen.compute.runner import ComputeConfig

    with pytest.raises(ConfigError, match="--name"):
        ComputeConfig(name=name).validate()
    res = _invoke(
        "compute",
        "--model",
        tmp_path / "no-model",
        "--corpus",
        tmp_path / "no-corpus",
        "--out",
        tmp_path / "store",
        "--name",
        name,
    )
    _one_line_error(res, "--name")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("name", ["api", "about", "Assets", "404", "index", "search.html"])
def test_build_refuses_a_store_named_like_a_site_path(name, tmp_path):
    store = write_synthetic_store(tmp_path / "store", name=name, with_graphs=False)
    with pytest.raises(BuildError, match="taken by the site's own pages"):
        build_site([store.root], tmp_path / "site")
    _one_line_error(_invoke("build", store.root, "--out", tmp_path / "site2"), str(store.root))


def test_reserved_names_cover_every_top_level_entry_of_a_build(built_site, synthetic_store):
    """Derived from a real build: whatever the build writes at the top of the site (but the
    model's own folder) is a name no model may take, with or without its extension."""
    from sitegen.names import model_name_problem

    model = synthetic_store.manifest["model"]["name"]
    entries = [p.name for p in built_site.iterdir() if p.name != model]
    assert {"api", "assets", "search", "index.html", "404.html", "about.html"} <= set(entries)
    for entry in entries:
        for name in {entry, entry.rsplit(".", 1)[0], entry.upper()}:
            assert model_name_problem(name) is not None, name
    for good in (model, "toy", "gpt2-small", "SmolLM2-135M-Instruct", "pythia_70m.v2", "apiary", "searcher", "404x"):
        assert model_name_problem(good) is None, good


# -- item 9: hostile corpora --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


class _Recording:
    """A tokenizer that records the length of every text it is asked to tokenise."""

    def __init__(self, inner):
        self.inner, self.lengths = inner, []
        self.bos_token_id = inner.bos_token_id

    def __call__(self, text, **kw):
        self.lengths.append(len(text))
        return self.inner(text, **kw)


@pytest.mark.model
@pytest.mark.skipif(not HAS_TORCH, reason="needs the compute extra")
def test_a_huge_document_is_tokenised_only_as_far_as_the_budget(tiny_tokenizer):
    from sitegen.compute.packing import pack_sequences
    from sitegen.corpus import Corpus, Document

    doc = Document("huge", "ab<x>" * 2_000_000)  # 10 MB, one line, no whitespace
    tok = _Recording(tiny_tokenizer)
    seqs = list(pack_sequences(Corpus("c", [doc], "sha256:0"), tok, 16, 2000, 0))
    assert sum(len(s.token_ids) for s in seqs) >= 2000
    assert sum(tok.lengths) <= 200_000, tok.lengths[:5]  # a few windows, not the 10 MB
    for s in seqs:  # character ranges still point into the whole document
        assert 0 <= s.char_start < s.char_end <= len(doc.text)


@pytest.mark.model
@pytest.mark.skipif(not HAS_TORCH, reason="needs the compute extra")
def test_windows_tokenise_like_the_whole_text(tiny_tokenizer, tiny_corpus):
    """Cut before whitespace, the windows give the very sequences whole-document tokenisation gives."""
    from sitegen.compute.packing import pack_sequences
    from sitegen.corpus import load_corpus

    corpus = load_corpus(str(tiny_corpus))
    corpus.documents.append(type(corpus.documents[0])("spaces", "one  two\n\nthree \t four   five\n" * 200))
    whole = list(pack_sequences(corpus, tiny_tokenizer, 16, 10**9, 0, window=10**9))
    small = list(pack_sequences(corpus, tiny_tokenizer, 16, 10**9, 0, window=97))
    assert len(whole) == len(small) > 100
    for a, b in zip(whole, small):
        assert (a.doc_id, a.char_start, a.char_end, a.token_ids.tolist()) == (
            b.doc_id,
            b.char_start,
            b.char_end,
            b.token_ids.tolist(),
        )


def test_lone_surrogates_become_replacement_characters(tmp_path):
    from sitegen.corpus import load_corpus

    (tmp_path / "a.jsonl").write_bytes(b'{"text": "left \\ud800 right \\udfff end"}\n')
    (tmp_path / "b.txt").write_bytes(b"invalid \xff\xfe utf-8")
    docs = {d.doc_id: d.text for d in load_corpus(str(tmp_path)).documents}
    assert docs["a.jsonl:1"] == "left \ufffd right \ufffd end"  # one for one: character offsets hold
    assert docs["b.txt"] == "invalid \ufffd\ufffd utf-8"


def _hostile_corpus(root: Path) -> Path:
    root.mkdir()
    rtl, zw = "\u202e\u200f", "\u200b\u200d\ufeff"
    text = f"The nation {SCRIPT} shall {MARKUP} have\x00peace {rtl}war{zw} and trade &amp; law \"quoted\" 'q' "
    (root / f"{MARKUP}-1.txt").write_text(text * 40)
    (root / f"{SCRIPT.replace('/', '')}{rtl}-2.txt").write_text(("people " + zw + " & < > " + text) * 30)
    (root / f"{MARKUP}-3.jsonl").write_bytes(
        b'{"text": "lone \\ud800 surrogate '
        + text.replace('"', '\\"').encode("utf-8").replace(b"\x00", b"\\u0000") * 20
        + b'"}\n'
    )
    (root / f"{MARKUP}-big.txt").write_text("x<b>" * 2_500_000)  # 10 MB, one line, no whitespace
    return root


@pytest.mark.model
@pytest.mark.skipif(not HAS_TORCH, reason="needs the compute extra")
def test_hostile_corpus_computes_builds_and_is_escaped(tiny_model_dir, tmp_path):
    corpus = _hostile_corpus(tmp_path / "corpus")
    store, site = tmp_path / "store", tmp_path / "site"
    res = _invoke(
        "compute",
        "--model",
        tiny_model_dir,
        "--corpus",
        corpus,
        "--out",
        store,
        "--tokens",
        "3000",
        "--seq-len",
        "16",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--quiet",
        "--name",
        "tiny",
    )
    assert res.exit_code == 0, (res.output, res.exception)
    res = _invoke("build", store, "--out", site)
    assert res.exit_code == 0, (res.output, res.exception)
    pages = {p: p.read_text(encoding="utf-8") for p in site.rglob("*.html")}
    shown = 0
    for path, html in pages.items():
        for raw in ("<script>alert", "<img src=x", "<b>", "onerror=alert(1)>"):
            assert raw not in html, (path, raw)
        shown += "&lt;img src=x onerror=alert(1)&gt;" in html
    assert shown, "no page names a document (the doc ids carry the markup)"
    from sitegen.store import Store

    seqs = Store.open(store).sequences().to_pydict()
    assert any("\ufffd" in d or MARKUP in d for d in seqs["doc_id"])  # ids kept (escaped only on the page)
