"""No data lost (issue 10, items 1-3): `sitegen build --out` deletes only what a build wrote and
refuses folders it cannot vouch for; one build per folder, whole files only, and a build killed at
any point reruns to the same bytes; concurrent manifest updates keep each other's entries."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from sitegen.errors import BuildError
from sitegen.site.build import build_site
from sitegen.store import Store
from tests.reference import write_synthetic_store

ROOT = Path(__file__).resolve().parents[1]
# The output folder's bookkeeping names (sitegen/site/publisher.py), spelled out: docs/guide.md tells users about them.
RECORD, JOURNAL, TMP_SUFFIX = ".sitegen-build.json", ".sitegen-build.journal", ".sitegen-tmp"


def _build(*args, **popen):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "sitegen", "build", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _run_build(*args):
    proc = _build(*args)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _wait_until_writing(proc: subprocess.Popen, out: Path) -> None:
    """Until the build starts writing files (its imports take most of its time), or ends."""
    while not (out.is_dir() and _files_in(out)) and proc.poll() is None:
        time.sleep(0.001)


def _files_in(out: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(out))


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _one_line_error(rc: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _refused(stores: list[Path], out: Path, *needles: str) -> None:
    with pytest.raises(BuildError) as e:
        build_site(stores, out)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("durable") / "store", n_layers=2, n_neurons=3)


# -- item 1: never delete what a build did not write ------------------------------------------


def test_out_is_the_store_refused_and_store_intact(tmp_path):
    store = write_synthetic_store(tmp_path / "store", n_layers=1, n_neurons=2)
    before = _tree(store.root)
    rc, err = _run_build(store.root, "--out", store.root)
    _one_line_error(rc, err, f"--out {store.root}", "is a sitegen store", "--out build")
    assert _tree(store.root) == before


def test_out_holding_the_store_refused_even_after_a_build(tmp_path):
    """A site folder that later got the store put inside it: the store is neither deleted nor published."""
    site = tmp_path / "site"
    store = write_synthetic_store(tmp_path / "elsewhere", n_layers=1, n_neurons=2)
    build_site([store.root], site)
    store = write_synthetic_store(site / "store", n_layers=1, n_neurons=2)
    before = _tree(store.root)
    _refused([store.root], site, f"--out {site}", "contains the store")
    assert _tree(store.root) == before


@pytest.mark.parametrize("marker, needle", [(".git", "source checkout"), ("pyproject.toml", "sitegen's source tree")])
def test_out_source_checkout_refused_and_intact(tmp_path, store, marker, needle):
    checkout = tmp_path / "checkout"
    (checkout / "src").mkdir(parents=True)
    (checkout / "src" / "code.py").write_text("print('mine')\n")
    if marker == ".git":
        (checkout / ".git").mkdir()
        (checkout / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    else:
        (checkout / "pyproject.toml").write_text('[project]\nname = "sitegen"\n')
    before = _tree(checkout)
    _refused([store.root], checkout, f"--out {checkout}", needle)
    assert _tree(checkout) == before


def test_out_non_empty_without_record_refused(tmp_path, store):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work\n")
    _refused([store.root], out, f"--out {out}", "not empty", RECORD)
    assert (out / "thesis.tex").read_text() == "years of work\n" and sorted(p.name for p in out.iterdir()) == [
        "thesis.tex"
    ]


def test_site_of_an_older_version_refused_with_the_way_out(tmp_path, store):
    out = tmp_path / "site"
    build_site([store.root], out)
    (out / RECORD).unlink(missing_ok=True)  # what the previous version left: a site and no record
    before = _tree(out)
    _refused([store.root], out, "older sitegen", f"rm -r {out}")
    assert _tree(out) == before


def test_stale_files_removed_only_from_the_record(tmp_path):
    big = write_synthetic_store(tmp_path / "big", name="m", n_layers=2, n_neurons=4)
    small = write_synthetic_store(tmp_path / "small", name="m", n_layers=1, n_neurons=2)
    out = tmp_path / "site"
    build_site([big.root], out)
    (out / "CNAME").write_text("neurons.example.org\n")  # what a user adds for their host
    (out / "m" / "notes.txt").write_text("mine\n")  # even inside a folder the build owns
    report = build_site([small.root], out)
    assert report.removed > 0 and not (out / "m" / "1").exists() and not (out / "m" / "0" / "3.html").exists()
    assert (out / "CNAME").read_text() == "neurons.example.org\n" and (out / "m" / "notes.txt").read_text() == "mine\n"
    clean = tmp_path / "clean"
    build_site([small.root], clean)
    assert {k: v for k, v in _tree(out).items() if k not in ("CNAME", "m/notes.txt")} == _tree(clean)
    assert sorted(orjson.loads((out / RECORD).read_bytes())["files"]) == sorted(k for k in _tree(clean) if k != RECORD)


# -- item 2: one writer at a time, whole files only --------------------------------------------


def test_kill_9_at_random_points_then_rerun_gives_clean_bytes(tmp_path):
    store = write_synthetic_store(tmp_path / "store", n_layers=2, n_neurons=5)
    clean = tmp_path / "clean"
    build_site([store.root], clean)
    want = _tree(clean)
    out = tmp_path / "site"
    out.mkdir()
    # Kill points: once the folder holds k files (it only grows across the killed runs).
    points = sorted(random.Random(10).sample(range(2, len(want) - 1), 3))
    kills = 0
    for attempt, k in enumerate(points):
        proc = _build(store.root, "--out", out)
        while _files_in(out) < k and proc.poll() is None:
            time.sleep(0.0005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate()
        if attempt == 0:
            (out / "CNAME").write_text("mine\n")  # a user's file, added after a killed first build
    assert kills >= 2, "the builds finished before they could be killed"
    build_site([store.root], out)
    got = _tree(out)
    assert got.pop("CNAME") == hashlib.sha256(b"mine\n").hexdigest()
    assert got == want
    assert not list(out.rglob(f"*{TMP_SUFFIX}")) and not (out / JOURNAL).exists()


def test_a_file_killed_mid_write_in_a_new_folder_is_rewritten_by_the_rerun(tmp_path, store, monkeypatch):
    """A file in a folder the build created is written in place (no old version to keep, no
    rename): a build that dies mid-write there leaves it short, the journal names it, and the rerun
    rewrites it. Files that replace old ones still go through a temporary name (see above)."""
    from sitegen.site import publisher

    clean = tmp_path / "clean"
    build_site([store.root], clean)
    out = tmp_path / "site"
    real_write, real_replace, calls = os.write, os.replace, []

    def dies_mid_write(fd, data):
        if len(data) > 200 and len(calls) == 5:  # the sixth file bigger than a journal line: half of it, then the kill
            real_write(fd, bytes(data)[: len(data) // 2])
            raise KeyboardInterrupt  # not an OSError: nothing cleans up, as after a kill -9
        if len(data) > 200:
            calls.append(fd)
        return real_write(fd, data)

    def no_rename(src, dst):  # the top folder existed before (open_output made it): its files may be renamed
        if Path(dst).parent != out:
            raise AssertionError(f"a fresh folder's file was renamed into place: {dst}")
        return real_replace(src, dst)

    monkeypatch.setattr(publisher.os, "write", dies_mid_write)
    monkeypatch.setattr(publisher.os, "replace", no_rename)
    with pytest.raises(KeyboardInterrupt):
        build_site([store.root], out, jobs=1)
    monkeypatch.undo()
    short = [
        rel
        for rel, digest in _tree(out).items()
        if rel in _tree(clean) and digest != _tree(clean)[rel] and rel != JOURNAL
    ]
    assert len(short) == 1, short  # the file cut short, in place under its own name
    assert not list(out.rglob(f"*{TMP_SUFFIX}"))
    build_site([store.root], out, jobs=1)
    assert _tree(out) == _tree(clean)


def test_second_build_into_the_same_folder_fails_at_once(tmp_path, store):
    out = tmp_path / "site"
    first = _build(store.root, "--out", out)
    _wait_until_writing(first, out)  # it holds the lock before it writes a file
    assert first.poll() is None, first.communicate()
    os.kill(first.pid, signal.SIGSTOP)  # hold it mid-build, whatever the machine's speed
    try:
        t0 = time.monotonic()
        _refused([store.root], out, "another 'sitegen build' is writing", f"--out {out}")
        assert time.monotonic() - t0 < 10  # at once: it does not wait for the lock
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err
    clean = tmp_path / "clean"
    build_site([store.root], clean)
    assert _tree(out) == _tree(clean)


# -- item 3: manifest updates never lose each other --------------------------------------------


def _add_services(root: str, names: list[str], barrier) -> None:
    store = Store.open(root)  # opened (manifest read) before the other process writes
    barrier.wait()
    for name in names:
        store.add_service(name, {"by": name})


def test_concurrent_add_service_keeps_both(tmp_path):
    store = write_synthetic_store(tmp_path / "store", n_layers=1, n_neurons=2, with_graphs=False)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    groups = [[f"explain_{i}" for i in range(15)], [f"n2g_{i}" for i in range(15)]]
    procs = [ctx.Process(target=_add_services, args=(str(store.root), names, barrier)) for names in groups]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    manifest = Store.open(store.root).manifest
    wanted = groups[0] + groups[1]
    assert set(wanted) <= set(manifest["services"]), sorted(set(wanted) - set(manifest["services"]))
    assert all(manifest[name] == {"by": name} for name in wanted)
    assert manifest["services"][:2] == ["neuroscope", "logits"]


def test_store_files_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """Tables, manifest and checkpoints (all through store.atomic_write): the new file's data is
    fsync'ed before it replaces the old one, and the folder after, so a power cut cannot leave an
    empty file where a good one was."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", st.st_ino, stat.S_ISDIR(st.st_mode)))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    Store(tmp_path / "store").write_vocab(["a", "b"])
    renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == "vocab.parquet"]
    assert len(renames) == 1, events
    i, ino = renames[0], events[renames[0]][1]
    assert ("fsync", ino, False) in events[:i], "the file was renamed into place before its data reached the disk"
    assert any(e[0] == "fsync" and e[2] for e in events[i + 1 :]), "the folder holding the rename was not flushed"
