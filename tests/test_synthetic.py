"""The benchmarks' synthetic store (benchmarks/synthetic.py) holds data for every built-in service
(but those whose tables come only from an option: OPTIONAL) in the shapes the build reads, so the build benchmark measures all of them: a small one is built
here and every service's data is checked to reach the pages and the JSON."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import orjson
import pytest

from sitegen.services import registry
from sitegen.site.build import build_site

ROOT = Path(__file__).resolve().parents[1]
MODEL = "gpt2-small-synthetic"

OPTIONAL = ("dictionary", "correlation")  # services with tables only beside a dictionary / from --correlations


def _synthetic():
    spec = importlib.util.spec_from_file_location("synthetic_bench", ROOT / "benchmarks" / "synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    store = _synthetic().synthetic_store(
        root / "store", 2, 40, n_seqs=300, vocab_size=2000, graphs=3, explained=0.25, scored_share=0.5
    )
    build_site([store.root], root / "site")
    return store, root / "site"


def test_every_service_has_data(small):
    store, site = small
    # every service but `dictionary`, which has tables only beside a sparse dictionary's latents,
    # and `correlation`, which has tables only from `compute --correlations`
    assert sorted(store.manifest["services"]) == sorted(s.name for s in registry() if s.name not in OPTIONAL)
    assert store.manifest["neuron2graph"]["texts"] == 20  # the settings record the provenance section reads
    for layer in range(2):
        assert store.read_layer("neuron2graph", layer).num_rows == 3
        assert store.read_layer("neuron_explainer", layer).num_rows == 10


def test_graphs_and_explanations_reach_the_pages(small):
    store, site = small
    api = site / "api" / MODEL
    graphs = orjson.loads((api / "neuron2graph" / "1.json").read_bytes())["data"]["graphs"]
    assert len(graphs) == 3
    for n in graphs:
        page = (site / MODEL / "1" / f"{n}.html").read_text()
        assert '<svg class="n2g"' in page and "trained on top sequences" in page
        graph = orjson.loads((api / "neuron2graph" / "1" / f"{n}.json").read_bytes())["data"]["graph"]
        assert graph["subgraph_indices"] and all(node["token"] for node in graph["graph"])
    explained = store.read_layer("neuron_explainer", 1).to_pylist()
    assert {r["source"] for r in explained} == {"openai-published", "sitegen explain"}
    for r in explained:
        page = (site / MODEL / "1" / f"{r['neuron']}.html").read_text()
        assert r["explanation"] in page
        assert ("Scoring details" in page) == (r["source"] == "sitegen explain")
        data = orjson.loads((api / "all" / "1" / f"{r['neuron']}.json").read_bytes())
        # every service of the model (all but `dictionary`: no dictionary here), and its metadata
        assert set(data) == {s.name for s in registry() if s.name not in OPTIONAL} | {"metadata"}
        assert data["neuron_explainer"]["data"]["explanation"] == r["explanation"]


def test_same_seed_same_store(tmp_path):
    synthetic = _synthetic()
    a = synthetic.synthetic_store(tmp_path / "a", 1, 30, n_seqs=100, vocab_size=500, graphs=2, explained=5)
    b = synthetic.synthetic_store(tmp_path / "b", 1, 30, n_seqs=100, vocab_size=500, graphs=2, explained=5)
    for service in ("neuroscope", "logits", "neuron2graph", "neuron_explainer"):
        assert a.read_layer(service, 0).equals(b.read_layer(service, 0)), service
    assert a.vocab() == b.vocab() and a.sequences().equals(b.sequences())


@pytest.mark.slow  # ~25 s: writes an XL-shaped store
def test_the_folder_limit_check_on_an_xl_shaped_store(tmp_path, monkeypatch):
    """GPT-2-XL's shape (48 layers, a 50,257-token vocabulary, graphs and explanations for a
    sample) at a width that builds in seconds: the build's largest-folder figure is the real
    maximum over every folder of the site (pages, API, search), it stays under Netlify's limit,
    and a folder over the limit is named in a warning."""
    import os

    import sitegen.site.build as build

    store = _synthetic().synthetic_store(tmp_path / "store", 48, 24, n_seqs=2000, graphs=0.25, explained=0.25)
    report = build_site([store.root], tmp_path / "site", jobs=2)
    on_disk = {os.path.relpath(d, tmp_path / "site"): len(files) for d, _, files in os.walk(tmp_path / "site")}
    folder, count = report.largest_folder
    assert count == max(on_disk.values()) == on_disk[folder or "."]
    assert count < build.NETLIFY_DIR_LIMIT and report.warnings == ()
    assert report.files == sum(on_disk.values())
    monkeypatch.setattr(build, "NETLIFY_DIR_LIMIT", count - 1)  # as if this folder crossed the limit
    report = build_site([store.root], tmp_path / "site", jobs=2)
    assert report.warnings == (
        f"{folder}/ holds {count:,} files, over Netlify's {count - 1:,} per folder: the deploy would fail there "
        "(other hosts are fine)",
    )
