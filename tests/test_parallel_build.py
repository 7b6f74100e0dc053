"""`sitegen build --jobs N`: layers rendered in forked worker processes give the very same site as
one process (every file, the build record included), a rebuild over it is a no-op, and a worker's
failure reaches the user as the same one-line error."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from sitegen.cli import main
from sitegen.errors import BuildError
from sitegen.services import registry
from sitegen.services.neuron_explainer.published import import_explanations
from sitegen.site.build import build_site
from sitegen.site.publisher import JOURNAL, RECORD
from tests.reference import write_synthetic_store


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Five layers (more than the workers, so a worker renders several) with graphs and explanations."""
    root = tmp_path_factory.mktemp("parallel")
    store = write_synthetic_store(root / "store", name="parallel-model", n_layers=5, n_neurons=6)
    published = root / "published"
    published.mkdir()
    (published / "all.jsonl").write_bytes(
        b"".join(
            orjson.dumps(
                {
                    "neuron_id": {"layer_index": layer, "neuron_index": layer % 6},
                    "scored_explanations": [
                        {
                            "explanation": f"tokens about topic {layer}",
                            "scored_simulation": {"ev_correlation_score": 0.1 * layer},
                        }
                    ],
                }
            )
            + b"\n"
            for layer in range(5)
        )
    )
    import_explanations(published, store.root, log=lambda m: None)
    return store


def test_two_jobs_write_the_same_site_as_one(store, tmp_path, monkeypatch):
    one = build_site([store.root], tmp_path / "one", jobs=1)
    lines: list[str] = []
    renderers = tmp_path / "renderers"  # the process that opened each layer
    service = next(s for s in registry() if s.name == "neuroscope")
    real = type(service).open_layer

    def noted(self, st, layer, site):
        with open(renderers, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(self, st, layer, site)

    monkeypatch.setattr(type(service), "open_layer", noted)
    two = build_site([store.root], tmp_path / "two", jobs=2, log=lines.append)
    pids = renderers.read_text().split()
    assert len(pids) == 5 and len(set(pids)) <= 2 and str(os.getpid()) not in pids  # the workers, not this process
    got, want = _files(tmp_path / "two"), _files(tmp_path / "one")
    assert sorted(got) == sorted(want)
    assert [rel for rel in want if got[rel] != want[rel]] == []
    assert RECORD in got and JOURNAL not in got
    assert (two.files, two.bytes, two.written, two.largest_folder) == (
        one.files,
        one.bytes,
        one.written,
        one.largest_folder,
    )
    assert two.files == len(want) and two.bytes == sum(len(b) for b in want.values())
    assert (
        lines and lines[-1].startswith("parallel-model: layer ") and "30/30 neurons" in lines[-1] and "ETA" in lines[-1]
    )


def test_a_parallel_rebuild_changes_nothing_and_removes_what_went_away(store, tmp_path):
    out = tmp_path / "site"
    first = build_site([store.root], out, jobs=1)
    again = build_site([store.root], out, jobs=3)
    assert (again.written, again.unchanged, again.removed) == (0, first.files, 0)
    stale = out / "parallel-model" / "4" / "99.html"  # a page an earlier build wrote for a neuron that went away
    stale.write_text("old")
    record = orjson.loads((out / RECORD).read_bytes())
    (out / RECORD).write_bytes(
        orjson.dumps({**record, "files": sorted(record["files"] + ["parallel-model/4/99.html"])})
    )
    assert build_site([store.root], out, jobs=2).removed == 1 and not stale.exists()


def test_a_failure_in_a_worker_is_the_same_one_line_error(store, tmp_path, monkeypatch):
    service = next(s for s in registry() if s.name == "neuroscope")
    real = type(service).open_layer

    def broken(self, st, layer, site):
        if layer == 3:
            raise BuildError(f"{st.root}: layer {layer} is damaged; recompute the store")
        return real(self, st, layer, site)

    monkeypatch.setattr(type(service), "open_layer", broken)  # the forked workers inherit the patch
    with pytest.raises(BuildError, match="layer 3 is damaged"):
        build_site([store.root], tmp_path / "site", jobs=2)
    monkeypatch.undo()
    build_site([store.root], tmp_path / "site", jobs=2)  # the rerun finishes the folder the failed build left
    assert _files(tmp_path / "site") == _files(_one_job_site(store, tmp_path))


def _one_job_site(store, tmp_path) -> Path:
    out = tmp_path / "reference-site"
    build_site([store.root], out, jobs=1)
    return out


def test_cli_jobs_option(store, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(main, ["build", str(store.root), "--out", str(tmp_path / "a"), "--jobs", "0"])
    assert bad.exit_code != 0 and "--jobs 0" in bad.output and "Traceback" not in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    ok = runner.invoke(main, ["build", str(store.root), "--out", str(tmp_path / "b"), "--jobs", "2"])
    assert ok.exit_code == 0, ok.output
    assert "neurons/s, 2 jobs" in ok.output and "files" in ok.output and "peak memory" in ok.output


def test_a_folder_another_worker_creates_meanwhile_is_no_error(tmp_path, monkeypatch):
    """Two workers creating the same new folder: one finds the parent missing, makes it, and by
    the time it makes the folder the other has. The file is written, and the folder is not taken
    for one this process created (its files are still compared with what is there)."""
    import sitegen.site.publisher as publisher

    real = os.mkdir
    target = str(tmp_path / "site" / "api" / "shared")

    def racing(path, *args, **kwargs):
        if path == target and os.path.isdir(os.path.dirname(path)) and not os.path.exists(path):
            real(path)  # the other worker, just before this one
        return real(path, *args, **kwargs)

    monkeypatch.setattr(publisher.os, "mkdir", racing)
    (tmp_path / "site").mkdir()
    pub = publisher.Publisher(tmp_path / "site")
    pub.publish("api/shared/0.json", b"{}")
    assert (tmp_path / "site/api/shared/0.json").read_bytes() == b"{}"
    assert target not in pub._fresh and str(tmp_path / "site" / "api") in pub._fresh


def test_a_worker_that_dies_is_a_one_line_error_not_a_hang(store, tmp_path, monkeypatch):
    import signal

    service = next(s for s in registry() if s.name == "neuroscope")
    real = type(service).open_layer

    def killed(self, st, layer, site):
        if layer == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would
        return real(self, st, layer, site)

    monkeypatch.setattr(type(service), "open_layer", killed)
    with pytest.raises(BuildError, match="a build worker died while rendering parallel-model"):
        build_site([store.root], tmp_path / "site", jobs=2)
    monkeypatch.undo()
    build_site([store.root], tmp_path / "site", jobs=2)  # the rerun finishes the folder
    assert _files(tmp_path / "site") == _files(_one_job_site(store, tmp_path))
