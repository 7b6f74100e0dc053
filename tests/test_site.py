"""Site build on a synthetic store (no torch): targeted assertions on pages and JSON, escaping,
determinism, incremental rebuilds, and the no-torch import contract."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from sitegen.site.build import build_site
from tests.reference import write_synthetic_store

MODEL = "toy-model"


def _json(site: Path, rel: str) -> dict:
    return orjson.loads((site / rel).read_bytes())


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_one_folder_per_model_and_layer(built_site):
    for layer in range(2):
        for n in range(4):
            assert (built_site / MODEL / str(layer) / f"{n}.html").is_file()
            for service in ("neuroscope", "logits"):
                assert (built_site / "api" / MODEL / service / str(layer) / f"{n}.json").is_file()
            assert (built_site / "api" / MODEL / "all" / str(layer) / f"{n}.json").is_file()
        assert (built_site / MODEL / str(layer) / "index.html").is_file()
    for rel in (
        "index.html",
        f"{MODEL}/index.html",
        "api/index.json",
        f"api/{MODEL}.json",
        "api/openapi.json",
        "404.html",
        "about.html",
        "api.html",
    ):
        assert (built_site / rel).is_file(), rel


def test_neuroscope_json_matches_store(built_site, synthetic_store):
    d = _json(built_site, f"api/{MODEL}/neuroscope/1/2.json")
    assert set(d) == {"data", "metadata"}
    data = d["data"]
    assert data["neuron_index"] == {"layer": 1, "neuron": 2}
    row = synthetic_store.read_layer("neuroscope", 1).slice(2, 1).to_pylist()[0]
    assert [t["data_index"] for t in data["texts"]] == row["top_seq"]
    assert [t["data_index"] for t in data["bottom_texts"]] == row["bottom_seq"]
    top = data["texts"][0]
    # the planted token (sequence 1, position 3) is every neuron's top activation: 5 + layer
    assert top["data_index"] == 1 and top["max_activating_token_index"] == 3 and top["max_activation"] == 6.0
    assert top["tokens"][3] == "<script>alert(1)</script>"
    assert len(top["tokens"]) == len(top["activations"]) == len(top["token_ids"])
    vocab = synthetic_store.vocab()
    assert top["tokens"] == [vocab[i] for i in top["token_ids"]]
    assert top["activations"] == [round(a, 4) for a in row["top_acts"][0]]
    for t in data["bottom_texts"]:
        assert t["activations"][t["max_activating_token_index"]] == t["min_activation"]
    stats = data["stats"]
    assert stats["max"] == pytest.approx(row["max"], abs=1e-4) and stats["frac_positive"] == pytest.approx(
        row["frac_pos"]
    )
    assert sum(stats["histogram"]["counts"]) == stats["count"] == row["count"]
    meta = d["metadata"]
    assert (
        meta["name"] == MODEL
        and meta["num_layers"] == 2
        and meta["layer_size"] == 4
        and meta["available_services"] == ["neuroscope", "neuron2graph", "logits"]
    )


def test_layer_and_model_level_api(built_site):
    layer = _json(built_site, f"api/{MODEL}/neuroscope/0.json")["data"]
    assert layer["num_neurons"] == 4
    scores = [s for _, s in layer["important_neurons"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 4
    model = _json(built_site, f"api/{MODEL}/neuroscope.json")["data"]["important_neurons"]
    assert len(model) == 8
    assert _json(built_site, "api/index.json")["models"][0]["name"] == MODEL


def test_all_holds_metadata_and_exactly_the_models_services(built_site):
    meta = _json(built_site, f"api/{MODEL}.json")["metadata"]
    assert "neuron_explainer" not in meta["available_services"]  # the toy store has no explanations
    for url in (f"api/{MODEL}/all/0/1.json", f"api/{MODEL}/all/0.json"):
        all_ = _json(built_site, url)
        assert all_["metadata"] == meta, url
        assert set(all_) - {"metadata"} == set(meta["available_services"]), url
    neuron = _json(built_site, f"api/{MODEL}/all/0/1.json")
    assert neuron["neuroscope"] == {"data": _json(built_site, f"api/{MODEL}/neuroscope/0/1.json")["data"]}
    assert neuron["neuroscope"]["data"]["neuron_index"] == {"layer": 0, "neuron": 1}


def test_neuron_page_content(built_site):
    html = (built_site / MODEL / "1" / "2.html").read_text()
    assert "<title>toy-model 1:2 · sitegen</title>" in html and "<h1>toy-model 1:2</h1>" in html
    assert f'href="/{MODEL}/1/1.html"' in html and f'href="/{MODEL}/1/3.html"' in html  # prev / next
    payload = _json(built_site, f"api/{MODEL}/neuroscope/1/2.json")["data"]
    across = sum(len(group["texts"]) for group in payload["interval_examples"])
    assert across > 0 and html.count('class="seq"') == 6 + across  # 3 top + 3 bottom + across the range
    assert 'class="hist"' in html and "Direct logit effects" in html
    assert f'href="/api/{MODEL}/neuroscope/1/2.json"' in html


def test_prev_next_wrap_across_layers(built_site):
    first = (built_site / MODEL / "0" / "0.html").read_text()
    assert f'id="prev" href="/{MODEL}/1/3.html"' in first  # wraps to the last neuron of the last layer
    last_of_layer0 = (built_site / MODEL / "0" / "3.html").read_text()
    assert f'id="next" href="/{MODEL}/1/0.html"' in last_of_layer0


def test_every_corpus_string_is_escaped(built_site):
    for path in [built_site / MODEL / "0" / "1.html", built_site / MODEL / "0" / "index.html"]:
        html = path.read_text()
        assert "<script>alert(1)" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "<img src=x" not in html and "</textarea>" not in html


def test_missing_service_has_no_page_stub_and_no_api_files(tmp_path):
    store = write_synthetic_store(tmp_path / "store", name="no-logits", with_logits=False)
    out = tmp_path / "site"
    build_site([store.root], out)
    html = (out / "no-logits" / "0" / "0.html").read_text()
    assert 'class="missing"' not in html and "Not available" not in html and "Direct logit effects" not in html
    assert _json(out, "api/no-logits.json")["metadata"]["available_services"] == ["neuroscope", "neuron2graph"]
    # no stub per neuron: DeepDecipher's URL for the missing service answers the API's JSON 404
    assert (
        not (out / "api" / "no-logits" / "logits").exists() and not (out / "api" / "no-logits" / "logits.json").exists()
    )
    assert sorted(p.name for p in (out / "api" / "no-logits").iterdir() if p.is_dir()) == [
        "all",
        "neuron2graph",
        "neuroscope",
    ]
    assert set(_json(out, "api/no-logits/all/0/0.json")) == {"metadata", "neuroscope", "neuron2graph"}


def test_layer_table_lists_every_neuron(built_site):
    html = (built_site / MODEL / "0" / "index.html").read_text()
    assert html.count("<tr><td data-v=") == 4
    assert 'id="layer-table"' in html


def test_build_is_deterministic_and_incremental(tmp_path, synthetic_store):
    a, b = tmp_path / "a", tmp_path / "b"
    build_site([synthetic_store.root], a)
    build_site([synthetic_store.root], b)
    assert _tree(a) == _tree(b)
    mtimes = {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()}
    report = build_site([synthetic_store.root], a)
    assert report.written == 0 and report.unchanged == len(mtimes)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())


def test_rebuild_rewrites_only_what_changed(tmp_path):
    store = write_synthetic_store(tmp_path / "store")
    out = tmp_path / "site"
    build_site([store.root], out)
    manifest = orjson.loads((store.root / "manifest.json").read_bytes())
    # appears in metadata: JSON and model-level pages change, neuron pages do not (the corpus name,
    # used here before, is now in every neuron page's Provenance section)
    manifest["model"]["num_total_parameters"] += 1
    (store.root / "manifest.json").write_bytes(orjson.dumps(manifest))
    before = (out / MODEL / "0" / "0.html").stat().st_mtime_ns
    report = build_site([store.root], out)
    assert 0 < report.written < report.written + report.unchanged
    assert (out / MODEL / "0" / "0.html").stat().st_mtime_ns == before


def test_build_does_not_import_torch(synthetic_store, tmp_path):
    """Runs `sitegen build` in a fresh interpreter where importing torch fails."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformer_lens'] = None; sys.modules['transformers'] = None\n"
        "from sitegen.cli import main\n"
        f"sys.argv = ['sitegen', 'build', {str(synthetic_store.root)!r}, '--out', {str(tmp_path / 'out')!r}]\n"
        "main()"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / MODEL / "0" / "0.html").is_file()


def test_import_contract():
    """import-linter, every contract in pyproject.toml: the layers (cli, site | compute, merge,
    services, store, leaves), independent services, no cycles, and the site side and the services'
    render halves never importing torch or sitegen.compute, even indirectly."""
    res = subprocess.run(
        ["lint-imports"], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], env={**os.environ}
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "KEPT" in res.stdout and "BROKEN" not in res.stdout


@pytest.mark.parametrize("command", [["ruff", "format", "--check"], ["ruff", "check"]])
def test_formatted_and_linted(command):
    """`ruff format` and `ruff check` (the rule set in pyproject.toml) leave the code as it is."""
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [*command, "sitegen", "tests", "benchmarks", "setup.py"], capture_output=True, text=True, cwd=root
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_no_import_cycles(tmp_path):
    """No two sibling modules or packages anywhere in sitegen import each other, even through
    others (e.g. compute.runner -> services.neuron2graph.compute -> compute.runner): checked with
    this test's own import-linter contract, so it holds whatever pyproject.toml says."""
    config = tmp_path / "cycles.toml"
    config.write_text(
        '[tool.importlinter]\nroot_package = "sitegen"\n\n'
        '[[tool.importlinter.contracts]]\nname = "no cycles"\ntype = "acyclic_siblings"\nancestors = ["sitegen"]\n'
    )
    res = subprocess.run(
        ["lint-imports", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no cycles KEPT" in res.stdout


def test_build_errors_are_one_line(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "sitegen", "build", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0
    assert res.stderr.strip().count("\n") == 0 and "not a sitegen store" in res.stderr and "Traceback" not in res.stderr


def test_negative_texts_have_their_own_scale_and_marked_extremes(built_site):
    """The most negative texts are coloured on their own scale (|min|), so each one's minimum is
    dark blue even when the maximum is far larger; every text's extreme token is marked (class x)."""
    payload = _json(built_site, f"api/{MODEL}/neuroscope/1/2.json")["data"]
    assert abs(payload["stats"]["min"]) < payload["stats"]["max"] / 2, "a vacuous check: min and max of one size"
    html = (built_site / MODEL / "1" / "2.html").read_text()
    top = html.split('data-kind="top"')[1].split("</section>")[0]
    bottom = html.split('data-kind="bottom"')[1]
    assert top.count(' x">') == len(payload["texts"])  # the maximum of each top text, marked
    lowest = min(t["min_activation"] for t in payload["bottom_texts"])
    assert lowest == payload["stats"]["min"]
    assert '<i class="n9 x">' in bottom  # the neuron's minimum: the darkest blue of the bottom scale


def test_whitespace_tokens_are_visible_on_their_own():
    from markupsafe import escape

    from sitegen.services.tokens import shown

    assert (
        shown(" ") == "\u2423"
        and shown("  ") == "\u2423\u2423"
        and shown("\n") == "\u21b5"
        and shown(" \t") == "\u2423\u2192"
    )
    assert shown(" the") == " the" and shown("") == ""  # a token with text keeps its leading space (the text shows it)
    assert str(escape(shown(" <"))) == " &lt;"


@pytest.mark.parametrize("layer, neuron", [(1, 2), (0, 1)])  # without and with a graph
def test_neuron_page_opens_with_a_summary(built_site, layer, neuron):
    """Max, density, top tokens and the graph's F1 (when there is a graph), from the neuron's own data."""
    html = (built_site / MODEL / str(layer) / f"{neuron}.html").read_text()
    start = html.index('<dl class="meta inline summary"')
    summary = html[start : html.index("</dl>", start)]
    payload = _json(built_site, f"api/{MODEL}/neuroscope/{layer}/{neuron}.json")["data"]
    assert f"<dt>max</dt><dd>{payload['stats']['max']:.4g}</dd>" in summary
    assert f"{100 * payload['stats']['frac_positive']:.2f}%" in summary
    peak = payload["texts"][0]
    from markupsafe import escape

    assert (
        f"<code>{escape(peak['tokens'][peak['max_activating_token_index']])}</code>" in summary
    )  # escaped: corpus text
    graph = _json(built_site, f"api/{MODEL}/neuron2graph/{layer}/{neuron}.json")["data"]
    assert ("graph F1" in summary) == (graph["graph"] is not None), summary
    if graph["graph"] is not None:
        ev = graph["evaluation"]
        lo, hi = ev["f1_ci"]
        assert f'<dt>graph F1</dt><dd><a href="#graph">{ev["f1"]:.2g} [{lo:.2f}, {hi:.2f}]</a></dd>' in summary
    assert start < html.index('aria-label="Activation statistics"')


def test_histogram_has_a_labelled_log_count_axis():
    """Bar heights follow log10 of the count, and each bar of 10**k tokens reaches the 10**k tick."""
    import re

    from sitegen.services.neuroscope.render import PLOT_H, histogram_svg

    svg = histogram_svg([1, 10, 100, 0, 7], [-2.0, -1.0, 0.0, 1.0, 2.0, 3.0])
    ticks = {
        t: int(y) - 4
        for y, t in re.findall(r'<text class="yt" x="\d+" y="(\d+)" text-anchor="end">([\d,]+)</text>', svg)
    }
    assert list(ticks) == ["1", "10", "100"]
    bars = [(float(x), int(h)) for x, h in re.findall(r"M([\d.]+) \d+v-(\d+)h", svg)]
    assert len(bars) == 4  # the empty bar is a gap
    heights = [h for _, h in sorted(bars)]
    assert [PLOT_H - h for h in heights[:3]] == [ticks["1"], ticks["10"], ticks["100"]]
    assert heights[0] < heights[3] < heights[1]  # 7 tokens: between the 1 and 10 bars
    assert ">activation</text>" in svg and ">tokens (log)</text>" in svg and ">0</text>" in svg


def test_api_and_home_pages_list_every_service_of_the_site(built_site):
    from sitegen.services import registry

    services = [s.name for s in registry() if (built_site / "api" / MODEL / s.name / "0" / "0.json").exists()]
    assert "neuron2graph" in services
    api = (built_site / "api.html").read_text()
    home = (built_site / "index.html").read_text()
    for name in services:
        assert f"<code>{name}</code>:" in api, name
        assert f"<tr><td>{name}</td>" in home, name
    assert "neuron2graph-search?query=" in api
    assert "127.0.0.1" not in api and "https://&lt;your-site&gt;" in api  # no --base-url: app.js fills in the origin
