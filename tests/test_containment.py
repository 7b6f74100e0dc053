"""A build touches nothing outside --out: the build record and journal are input (a restored cache,
a shared folder) and a path they list outside the folder is refused; no write or delete goes
through a symbolic link planted inside the folder (docs/guide.md: 'What --out accepts')."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from sitegen.errors import BuildError
from sitegen.site.build import build_site
from tests.reference import write_synthetic_store

ROOT = Path(__file__).resolve().parents[1]
RECORD, JOURNAL = ".sitegen-build.json", ".sitegen-build.journal"  # docs/guide.md names them


def _tree(root: Path) -> dict[str, str]:
    """Every entry under root, links as links: a file's hash, a link's target, a folder's mark."""
    tree = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        tree[rel] = (
            ("-> " + os.readlink(p))
            if p.is_symlink()
            else ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
        )
    return tree


def _cli_build(store: Path, out: Path) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "sitegen", "build", str(store), "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    return proc.returncode, proc.stderr


def _one_line_error(rc: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _add_to_record(out: Path, *rels) -> None:
    record = orjson.loads((out / RECORD).read_bytes())
    record["files"] += list(rels)
    (out / RECORD).write_bytes(orjson.dumps(record))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same model twice: a big store, then a small one whose build deletes the big one's extra files."""
    base = tmp_path_factory.mktemp("contain")
    big = write_synthetic_store(base / "big", name="m", n_layers=2, n_neurons=3)
    small = write_synthetic_store(base / "small", name="m", n_layers=1, n_neurons=2)
    return big.root, small.root


# -- the record and the journal list only paths inside the folder -------------------------------------


@pytest.mark.parametrize("attack", ["../victim.txt", "absolute", "../keep/file"])
def test_record_listing_a_path_outside_is_refused_and_the_victim_kept(tmp_path, stores, attack):
    big, _ = stores
    out = tmp_path / "site"
    build_site([big], out)
    (tmp_path / "victim.txt").write_text("precious\n")
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "file").write_text("also precious\n")
    rel = str(tmp_path / "victim.txt") if attack == "absolute" else attack
    _add_to_record(out, rel)
    site_before = _tree(out)
    rc, err = _cli_build(big, out)
    assert (tmp_path / "victim.txt").read_text() == "precious\n"
    assert (tmp_path / "keep" / "file").read_text() == "also precious\n"
    _one_line_error(rc, err, str(out / RECORD), repr(rel), f"rm -r {out}")
    assert _tree(out) == site_before  # refused before anything was written or deleted


@pytest.mark.parametrize(
    "rel", ["", ".", "m/./0.html", "m//0.html", "m/0/..", "m\\..\\..\\victim.txt", "m/\x00.html", 7, None, ["m"]]
)
def test_record_entries_that_are_not_plain_relative_paths_are_refused(tmp_path, stores, rel):
    big, _ = stores
    out = tmp_path / "site"
    build_site([big], out)
    _add_to_record(out, rel)
    with pytest.raises(BuildError, match="not a plain relative path inside --out|unreadable build record"):
        build_site([big], out)


def test_journal_listing_a_path_outside_is_refused_and_the_victim_kept(tmp_path, stores):
    """The journal of a killed build (or one planted in a restored cache) lists ../victim.txt."""
    big, _ = stores
    out = tmp_path / "site"
    build_site([big], out)
    (tmp_path / "victim.txt").write_text("precious\n")
    (out / JOURNAL).write_bytes(orjson.dumps("../victim.txt") + b"\n")
    rc, err = _cli_build(big, out)
    assert (tmp_path / "victim.txt").read_text() == "precious\n"
    _one_line_error(rc, err, str(out / JOURNAL), "'../victim.txt'")


# -- no write or delete through a link inside --out ---------------------------------------------------


def test_a_symlinked_folder_inside_out_is_refused_and_its_target_untouched(tmp_path, stores):
    """out/m, the model's folder, replaced by a link to a folder elsewhere: the rebuild would both
    delete the big build's extra files there and overwrite the rest."""
    big, small = stores
    out = tmp_path / "site"
    build_site([big], out)
    elsewhere = tmp_path / "elsewhere"
    (out / "m").rename(elsewhere)
    (elsewhere / "0" / "0.html").write_text("not the build's any more\n")
    (out / "m").symlink_to(elsewhere)
    before = _tree(elsewhere)
    rc, err = _cli_build(small, out)
    assert _tree(elsewhere) == before
    _one_line_error(rc, err, f"--out {out}", "m is a symbolic link", f"(to {elsewhere})", f"rm {out / 'm'}")


def test_a_symlinked_folder_only_the_deletes_pass_through_is_refused(tmp_path, stores):
    """The small build writes nothing under m/1/, only deletes the big build's files there."""
    big, small = stores
    out = tmp_path / "site"
    build_site([big], out)
    elsewhere = tmp_path / "elsewhere"
    (out / "m" / "1").rename(elsewhere)
    (out / "m" / "1").symlink_to(elsewhere)
    before = _tree(elsewhere)
    assert before
    with pytest.raises(BuildError, match="m/1 is a symbolic link"):
        build_site([small], out)
    assert _tree(elsewhere) == before


def test_a_symlinked_page_inside_out_is_refused_and_its_target_untouched(tmp_path, stores):
    big, _ = stores
    out = tmp_path / "site"
    build_site([big], out)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / "m" / "0" / "0.html").unlink()
    (out / "m" / "0" / "0.html").symlink_to(victim)
    with pytest.raises(BuildError, match=r"m/0/0\.html is a symbolic link .*remove the link"):
        build_site([big], out)
    assert victim.read_text() == "precious\n" and (out / "m" / "0" / "0.html").is_symlink()


def test_a_symlinked_journal_is_refused_and_its_target_untouched(tmp_path, stores):
    """A journal planted as a link: the build appends every new file's name to it."""
    big, small = stores
    out = tmp_path / "site"
    build_site([small], out)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / JOURNAL).symlink_to(victim)
    with pytest.raises(BuildError, match=r"\.sitegen-build\.journal is a symbolic link"):
        build_site([big], out)
    assert victim.read_text() == "precious\n"


def test_a_symlinked_or_fifo_record_is_refused(tmp_path, stores):
    big, _ = stores
    out = tmp_path / "site"
    build_site([big], out)
    (out / RECORD).rename(tmp_path / "record.json")
    (out / RECORD).symlink_to(tmp_path / "record.json")
    with pytest.raises(BuildError, match=r"\.sitegen-build\.json is a symbolic link"):
        build_site([big], out)
    (out / RECORD).unlink()
    os.mkfifo(out / RECORD)  # reading it would block forever
    with pytest.raises(BuildError, match="not a regular file"):
        build_site([big], out)


def test_a_stale_file_that_became_a_link_is_unlinked_not_its_target(tmp_path, stores):
    big, small = stores
    out = tmp_path / "site"
    build_site([big], out)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / "m" / "1" / "0.html").unlink()
    (out / "m" / "1" / "0.html").symlink_to(victim)
    build_site([small], out)
    assert victim.read_text() == "precious\n" and not (out / "m" / "1").exists()


# -- a corpus folder never publishes what it merely links to --------------------------------------------


def test_compute_never_stores_what_a_corpus_folder_links_to(tmp_path, tiny_model_dir, tiny_corpus):
    """readme.txt -> a file outside holding a secret: every token of the corpus is computed, and no
    sequence of the store comes from the link or decodes to the secret."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from sitegen.compute.runner import ComputeConfig, run_compute

    secret = "APIKEY sk live zebra quartz"
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "secret.txt").write_text(secret)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "speech.txt").write_text((tiny_corpus / "speech-0.txt").read_text())
    (corpus / "readme.txt").symlink_to(tmp_path / "private" / "secret.txt")
    logged = []
    out = tmp_path / "store"
    run_compute(
        ComputeConfig(
            model=str(tiny_model_dir),
            corpus=str(corpus),
            out=out,
            tokens=100_000,
            seq_len=16,
            seed=0,
            top_k=3,
            n_random=2,
            batch_size=4,
            device="cpu",
            progress=False,
        ),
        log=logged.append,
    )
    sequences = pq.read_table(out / "sequences.parquet").to_pylist()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "".join(tokenizer.decode(row["token_ids"]) for row in sequences)
    assert {row["doc_id"] for row in sequences} == {"speech.txt"} and "zebra" not in text
    assert "zebra" not in "".join(p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file())
    notes = [m for m in logged if "skipped" in m]
    assert notes == [
        f"--corpus corpus: skipped 1 entry that is a link to outside the folder or not regular files "
        f"(first: readme.txt -> {tmp_path / 'private' / 'secret.txt'}); copy a file into the folder to read it"
    ], logged


@pytest.mark.parametrize("rel", ["../escape.txt", "m/../../escape.txt", "m/./../../escape.txt"])
def test_the_publisher_refuses_a_path_of_its_own_that_leaves_the_folder(tmp_path, rel):
    """What the build itself asks to write (a name from a store) is held to the same rule."""
    from sitegen.site.publisher import Publisher

    pub = Publisher(tmp_path / "site")
    with pytest.raises(BuildError, match="not a plain path inside --out"):
        pub.publish(rel, b"x")
    assert not (tmp_path / "escape.txt").exists()
