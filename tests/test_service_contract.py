"""The Service contract (sitegen/services/base.py): a fifth service, defined only in
tests/plugins/sitegen_sparsity and registered through the `sitegen.services` entry-point group
(a real *.dist-info folder on sys.path), is computed by `sitegen compute`, merged by `sitegen
merge`, and shown on the neuron page, the layer table, the index page, the API and OpenAPI,
without a line of sitegen naming it. Also: the registry refuses a second service of a taken name."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from sitegen.cli import main
from sitegen.services import registry

PLUGINS = Path(__file__).parent / "plugins"


def _install_entry_points(monkeypatch, tmp: Path, lines: str, dist: str = "sitegen_sparsity_test") -> None:
    """A distribution's metadata as pip would leave it, found by importlib.metadata on sys.path."""
    info = tmp / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[sitegen.services]\n{lines}\n")
    monkeypatch.syspath_prepend(str(tmp))
    monkeypatch.syspath_prepend(str(PLUGINS))
    registry.cache_clear()


@pytest.fixture
def fresh_registry():
    registry.cache_clear()
    yield
    registry.cache_clear()


def _cli(*args) -> None:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_a_fifth_service_is_computed_merged_and_published(
    fresh_registry, monkeypatch, tmp_path, tiny_model_dir, tiny_corpus
):
    from jsonschema import Draft202012Validator

    from sitegen.store import Store

    _install_entry_points(monkeypatch, tmp_path / "site-packages", "sparsity = sitegen_sparsity:Sparsity")
    assert [s.name for s in registry()][-1] == "sparsity"
    common = [
        "--model",
        tiny_model_dir,
        "--corpus",
        tiny_corpus,
        "--tokens",
        600,
        "--seq-len",
        16,
        "--top-k",
        3,
        "--random",
        2,
        "--batch-size",
        4,
        "--device",
        "cpu",
        "--no-weights",
        "--quiet",
    ]
    for i in range(2):
        _cli("compute", *common, "--shard", f"{i}/2", "--out", tmp_path / f"shard{i}")
    _cli("merge", tmp_path / "shard0", tmp_path / "shard1", "--out", tmp_path / "merged")

    shards = [Store.open(tmp_path / f"shard{i}") for i in range(2)]
    merged = Store.open(tmp_path / "merged")
    assert "sparsity" in merged.manifest["services"]
    layers, size = merged.manifest["model"]["num_layers"], merged.manifest["model"]["layer_size"]
    counted = (
        merged.manifest["processed"]["tokens"]
        - merged.manifest["processed"]["sequences"] * merged.manifest["config"]["first_valid_position"]
    )
    for layer in range(layers):
        t = merged.read_layer("sparsity", layer).to_pydict()
        parts = [s.read_layer("sparsity", layer).to_pydict() for s in shards]
        assert t["tokens"] == [counted] * size  # every counted token, BOS and padding left out
        assert t["positive"] == [a + b for a, b in zip(parts[0]["positive"], parts[1]["positive"])]
        assert 0 < sum(t["positive"]) < counted * size

    site = tmp_path / "site"
    _cli("build", tmp_path / "merged", "--out", site)
    model = merged.manifest["model"]["name"]
    doc = orjson.loads((site / f"api/{model}/sparsity/1/2.json").read_bytes())
    t = merged.read_layer("sparsity", 1).to_pydict()
    assert doc["data"]["density"] == round(t["positive"][2] / t["tokens"][2], 6)
    page = (site / f"{model}/1/2.html").read_text()
    assert f"Active on <strong>{100 * doc['data']['density']:.1f}%</strong> of {t['tokens'][2]} tokens" in page
    assert f'href="/api/{model}/sparsity/1/2.json"' in page
    assert (
        f"<dt>Activation density</dt><dd>counted on <code>{t['tokens'][2]}</code> tokens"
        in page[page.index('id="provenance"') :]
    )
    table = (site / f"{model}/1/index.html").read_text()
    assert re.search(r'<button type="button" data-key="\d+">Density</button>', table)
    assert f'<td data-v="{doc["data"]["density"]}">{doc["data"]["density"]:.1%}</td>' in table
    assert "The fraction of tokens on which each neuron is active" in (site / "index.html").read_text()
    assert "sparsity" in orjson.loads((site / f"api/{model}.json").read_bytes())["data"]["available_services"]
    assert "sparsity" in orjson.loads((site / f"api/{model}/all/1/2.json").read_bytes())

    densest = CliRunner().invoke(
        main, ["densest", str(tmp_path / "merged"), "--layer", "1"]
    )  # the service's own command
    best = max(range(size), key=lambda i: (t["positive"][i], -i))
    assert (
        densest.exit_code == 0
        and densest.output == f"layer 1 neuron {best}: {t['positive'][best] / t['tokens'][best]:.6f}\n"
    )
    assert "densest" in CliRunner().invoke(main, ["--help"]).output

    spec = orjson.loads((site / "api/openapi.json").read_bytes())
    assert "sparsity" in spec["x-services"]
    schema = spec["paths"]["/api/{model}/sparsity/{layer}/{neuron}"]["get"]["responses"]["200"]["content"][
        "application/json"
    ]["schema"]
    errors = list(Draft202012Validator({**schema, "components": spec["components"]}).iter_errors(doc))
    assert not errors, errors[0].message


def test_a_services_own_compute_option_reaches_its_stage_and_leaves_the_run_alone(
    fresh_registry, monkeypatch, tmp_path, tiny_model_dir, tiny_corpus
):
    """The fifth service's `sitegen compute --dead-below` (hook compute_options) asks for its stage
    on the finished store; a rerun with another value only redoes the stage (the option is no part
    of the run hash); a bad value is refused in one line (hook check_compute_config)."""
    from sitegen.compute.runner import ComputeConfig
    from sitegen.store import Store

    _install_entry_points(monkeypatch, tmp_path / "site-packages", "sparsity = sitegen_sparsity:Sparsity")
    out = tmp_path / "store"
    common = [
        "compute",
        "--model",
        tiny_model_dir,
        "--corpus",
        tiny_corpus,
        "--tokens",
        300,
        "--seq-len",
        16,
        "--top-k",
        3,
        "--random",
        2,
        "--batch-size",
        4,
        "--device",
        "cpu",
        "--no-weights",
        "--out",
        out,
    ]
    assert "--dead-below FRACTION" in CliRunner().invoke(main, ["compute", "--help"]).output
    first = CliRunner().invoke(main, [str(a) for a in [*common, "--dead-below", "0.5"]], catch_exceptions=False)
    assert first.exit_code == 0 and "writing store" in first.output, first.output
    store = Store.open(out)
    tables = [store.read_layer("sparsity", layer).to_pydict() for layer in range(store.manifest["model"]["num_layers"])]

    def dead(fraction):
        return [[n for n, p, k in zip(t["neuron"], t["positive"], t["tokens"]) if p < fraction * k] for t in tables]

    assert store.manifest["sparsity"] == {"early_share": 0.5, "dead_below": 0.5, "dead": dead(0.5)}
    assert dead(0.5) != dead(
        1.0
    )  # the tiny model has neurons active on more than half of the tokens: the two runs differ
    layer_file = store.layer_path("sparsity", 0).read_bytes()
    rerun = CliRunner().invoke(main, [str(a) for a in [*common, "--dead-below", "1"]], catch_exceptions=False)
    assert rerun.exit_code == 0 and "writing store" not in rerun.output, (
        rerun.output
    )  # the same run: only the stage is done again
    assert Store.open(out).manifest["sparsity"] == {"early_share": 0.5, "dead_below": 1.0, "dead": dead(1.0)}
    assert store.layer_path("sparsity", 0).read_bytes() == layer_file

    bad = CliRunner().invoke(main, [str(a) for a in [*common, "--dead-below", "2"]])
    assert bad.exit_code != 0 and bad.output.strip().splitlines() == [
        "error: --dead-below 2.0: must be a fraction of the tokens, above 0 and at most 1, e.g. --dead-below 0.01"
    ]
    cfg = ComputeConfig(options={"dead_below": 0.5, "n2g": "all"})
    assert [s.name for s in registry() if s.stage_requested(cfg)] == ["neuron2graph", "sparsity"]
    assert not any(s.stage_requested(cfg.without_stages()) for s in registry())  # what a Ray shard task runs


def test_a_compute_option_no_service_has_is_refused(fresh_registry):
    from sitegen.compute.runner import ComputeConfig
    from sitegen.errors import ConfigError

    with pytest.raises(ConfigError, match=r"compute options \['n2gg'\]: no registered service has such an option"):
        ComputeConfig(options={"n2gg": "all"}).validate()


def test_a_fifth_service_is_verified(fresh_registry, monkeypatch, tmp_path, tiny_model_dir, tiny_corpus):
    """`sitegen verify` asks the fifth service too (hook `verifier`): it recounts its densities from
    the rerun activations, passes on a fresh store and fails, naming the neuron, on a store whose
    sparsity table was changed; the built-in checks run beside it in the same pass."""
    import pyarrow as pa

    from sitegen.store import Store

    _install_entry_points(monkeypatch, tmp_path / "site-packages", "sparsity = sitegen_sparsity:Sparsity")
    store = tmp_path / "store"
    _cli(
        "compute",
        "--model",
        tiny_model_dir,
        "--corpus",
        tiny_corpus,
        "--tokens",
        400,
        "--seq-len",
        16,
        "--top-k",
        5,
        "--random",
        3,
        "--batch-size",
        4,
        "--device",
        "cpu",
        "--no-weights",
        "--quiet",
        "--out",
        store,
    )
    size = Store.open(store).manifest["model"]["layer_size"]
    report = tmp_path / "report.json"
    ok = CliRunner().invoke(main, ["verify", str(store), "--neurons", "all", "--json", str(report)])
    assert ok.exit_code == 0, ok.output
    assert f"sparsity: densities of {3 * size} neurons recounted, largest difference 0, 0 failed" in ok.output
    assert (
        f"OK: {3 * size} neurons checked, 0 failed" in ok.output
        and f"; densities of {3 * size} neurons checked, 0 failed;" in ok.output
    )
    r = orjson.loads(report.read_bytes())
    assert r["sparsity"] == {"checked": 3 * size, "failed": [], "max_density_error": 0.0} and len(r["layers"]) == 3

    layer, neuron = 1, 7
    st = Store.open(store)
    t = st.read_layer("sparsity", layer)
    positive = t.column("positive").to_pylist()
    positive[neuron] += 3
    st.write_layer(
        "sparsity",
        layer,
        t.set_column(t.schema.get_field_index("positive"), "positive", pa.array(positive, pa.int64())),
    )
    bad = CliRunner().invoke(main, ["verify", str(store), "--neurons", "all"])
    assert bad.exit_code == 1, bad.output
    fails = [line for line in bad.output.splitlines() if "FAIL layer" in line]
    assert fails == [
        f"  FAIL layer {layer} neuron {neuron}: sparsity: positive stored {positive[neuron]}, recomputed {positive[neuron] - 3}"
    ]
    assert f"1 of {3 * size} neurons differ" in bad.output


def _store_with_sparsity_tables(monkeypatch, tmp_path):
    """A synthetic store holding the fifth service's tables (ones in every count) in every layer,
    not yet listed in its manifest; returns (store, the layer table, layer size)."""
    import numpy as np
    import pyarrow as pa

    from tests.reference import write_synthetic_store

    _install_entry_points(monkeypatch, tmp_path / "site-packages", "sparsity = sitegen_sparsity:Sparsity")
    store = write_synthetic_store(tmp_path / "store")
    size = store.manifest["model"]["layer_size"]
    full = pa.table(
        {
            "neuron": pa.array(np.arange(size), pa.int64()),
            **{k: pa.array(np.ones(size, np.int64)) for k in ("tokens", "positive", "early_tokens", "early_positive")},
        }
    )
    for layer in range(store.manifest["model"]["num_layers"]):
        store.write_layer("sparsity", layer, full)
    return store, full, size


def test_a_services_declared_columns_and_complete_layers_are_checked_on_open(fresh_registry, monkeypatch, tmp_path):
    """The fifth service says what its tables hold (table_schema, complete_layers); Store.open
    checks a store's tables against it as against a built-in's: one line naming the file."""
    from sitegen.errors import StoreError
    from sitegen.store import Store

    store, full, size = _store_with_sparsity_tables(monkeypatch, tmp_path)
    store.add_service("sparsity", {"early_share": 0.5})
    assert "sparsity" in Store.open(store.root).manifest["services"]

    store.write_layer("sparsity", 1, full.drop_columns(["positive"]))
    with pytest.raises(StoreError, match=r"sparsity/layer=1/data.parquet: damaged table, column\(s\) positive missing"):
        Store.open(store.root)
    store.write_layer("sparsity", 1, full.set_column(2, "positive", full.column("positive").cast("float64")))
    with pytest.raises(
        StoreError,
        match=r"sparsity/layer=1/data.parquet: damaged table, column 'positive' holds double, not the declared int64",
    ):
        Store.open(store.root)
    store.write_layer("sparsity", 1, full.slice(0, size - 1))
    with pytest.raises(
        StoreError, match=rf"field 'model.layer_size' is {size} but .*sparsity/layer=1/data.parquet has {size - 1} rows"
    ):
        Store.open(store.root)
    store.layer_path("sparsity", 1).unlink()
    with pytest.raises(StoreError, match=r"sparsity/layer=1/data.parquet is missing, but .* lists service 'sparsity'"):
        Store.open(store.root)


def test_a_services_declared_manifest_record_is_checked_on_open_and_before_a_write(
    fresh_registry, monkeypatch, tmp_path
):
    """The fifth service types the manifest field it writes (manifest_schemas); Store.open and
    every manifest write check a store listing it against that type: one line naming the field."""
    from sitegen.errors import StoreError
    from sitegen.store import Store

    store, full, size = _store_with_sparsity_tables(monkeypatch, tmp_path)
    with pytest.raises(
        StoreError, match=r"manifest.json: field 'sparsity' is missing \(service 'sparsity' records it\)"
    ):
        store.add_service("sparsity")  # listed without its record: refused before the write
    assert "sparsity" not in Store.open(store.root).manifest["services"]
    store.add_service("sparsity", {"early_share": 0.5})
    assert Store.open(store.root).manifest["sparsity"] == {"early_share": 0.5}

    path = store.root / "manifest.json"
    for bad, problem in (
        ({"early_share": "0.5"}, "sparsity.early_share' is '0.5'"),
        ({"early_share": 2.0}, "sparsity.early_share' is 2.0"),
        ({}, "sparsity.early_share' is missing"),
        ([], "sparsity' is \\[\\]"),
    ):
        path.write_bytes(orjson.dumps({**orjson.loads(path.read_bytes()), "sparsity": bad}))
        with pytest.raises(StoreError, match=rf"manifest.json: field '{problem}"):
            Store.open(store.root)


def test_a_manifest_field_two_writers_claim_is_refused(fresh_registry):
    """manifest_records: a service may add top-level manifest fields, but not one the runner, a
    service's record or another service already writes (the store would silently lose one)."""
    from sitegen.compute.runner import _service_records
    from sitegen.errors import ConfigError
    from sitegen.services import by_name
    from sitegen.services.base import Service

    class Claims(Service):
        name = "claims"

        def __init__(self, field):
            self.field = field

        def manifest_records(self):
            return {self.field: {}}

    neuroscope = by_name()["neuroscope"]
    assert set(_service_records([neuroscope, Claims("binning")])) == {"stats", "binning"}
    for field, owner in (("stats", "neuroscope"), ("model", "sitegen"), ("neuron2graph", "neuron2graph")):
        with pytest.raises(
            ConfigError, match=f"service 'claims' writes the manifest field '{field}', which '{owner}' writes"
        ):
            _service_records([neuroscope, Claims(field)])


def test_the_registry_refuses_a_second_service_of_a_taken_name(fresh_registry, monkeypatch, tmp_path):
    from sitegen.errors import ConfigError

    _install_entry_points(monkeypatch, tmp_path / "a", "neuroscope = sitegen_sparsity:Sparsity", dist="impostor")
    with pytest.raises(
        ConfigError, match="'neuroscope' is built in; a package declares it again as sitegen_sparsity:Sparsity"
    ):
        registry()


def test_a_taken_built_in_name_is_refused_alike_when_sitegen_declares_its_own_entry_points(fresh_registry, monkeypatch):
    """An install with sitegen's own entry-point metadata (a fresh `pip install`) gives the same answer."""
    from importlib import metadata

    from sitegen.errors import ConfigError
    from sitegen.services import BUILTIN

    own = [metadata.EntryPoint("neuroscope", BUILTIN["neuroscope"], "sitegen.services")]
    impostor = [metadata.EntryPoint("neuroscope", "sitegen_sparsity:Sparsity", "sitegen.services")]
    for order in (own + impostor, impostor + own):
        monkeypatch.setattr(metadata, "entry_points", lambda order=order, **kw: order)
        registry.cache_clear()
        with pytest.raises(
            ConfigError, match="'neuroscope' is built in; a package declares it again as sitegen_sparsity:Sparsity"
        ):
            registry()


def test_a_service_command_that_takes_a_taken_name_is_refused_in_one_line(fresh_registry, monkeypatch):
    import click

    from sitegen.services.neuroscope.service import Neuroscope

    monkeypatch.setattr(Neuroscope, "cli_commands", lambda self: [click.Command("import-explanations")])
    result = CliRunner().invoke(main, ["import-explanations", "x", "--store", "y"])
    assert result.exit_code != 0 and result.output.strip().splitlines() == [
        "error: services 'neuron_explainer' and 'neuroscope' both add a command 'import-explanations': rename one"
    ]
    monkeypatch.setattr(Neuroscope, "cli_commands", lambda self: [click.Command("build")])
    result = CliRunner().invoke(main, ["explain", "x"])
    assert (
        result.exit_code != 0
        and "adds a command 'build', which is sitegen's own" in result.output
        and "Traceback" not in result.output
    )
    assert (
        CliRunner().invoke(main, ["build", "--help"]).exit_code == 0
    )  # sitegen's own commands never look at the services


def test_a_service_compute_option_that_takes_a_taken_name_is_refused_in_one_line(fresh_registry, monkeypatch):
    import click

    from sitegen.services.neuroscope.service import Neuroscope

    monkeypatch.setattr(Neuroscope, "compute_options", lambda self: [click.Option(["--n2g"])])
    result = CliRunner().invoke(main, ["compute", "--n2g", "all"])
    assert result.exit_code != 0 and result.output.strip().splitlines() == [
        "error: services 'neuroscope' and 'neuron2graph' both add a compute option '--n2g': rename one"
    ]
    monkeypatch.setattr(Neuroscope, "compute_options", lambda self: [click.Option(["--top-k"])])
    registry.cache_clear()
    result = CliRunner().invoke(main, ["compute", "--help"])
    assert result.exit_code != 0 and result.output.strip().splitlines() == [
        "error: service 'neuroscope' adds a compute option '--top-k', which is sitegen's own: rename it"
    ]
    monkeypatch.setattr(
        Neuroscope, "compute_options", lambda self: [click.Option(["--topk", "top_k"])]
    )  # the same parameter name
    registry.cache_clear()
    result = CliRunner().invoke(main, ["compute"])
    assert (
        result.exit_code != 0
        and "adds a compute option 'top_k', which is sitegen's own" in result.output
        and "Traceback" not in result.output
    )
    assert CliRunner().invoke(main, ["build", "--help"]).exit_code == 0  # the other commands never look at them


def test_the_built_ins_are_there_without_entry_point_metadata(fresh_registry, monkeypatch):
    """An install whose metadata predates the entry points (or lacks them) still has every built-in."""
    from importlib import metadata

    monkeypatch.setattr(metadata, "entry_points", lambda **kw: [])
    assert [s.name for s in registry()] == [
        "neuron_explainer",
        "neuroscope",
        "neuron2graph",
        "logits",
        "dictionary",
        "correlation",
    ]


def test_the_build_serve_merge_compute_verify_store_search_openapi_and_the_page_templates_name_no_service():
    root = Path(__file__).parent.parent
    templates = sorted((root / "themes/default/templates").glob("*.html"))
    modules = [
        "cli.py",
        "site/build.py",
        "site/openapi.py",
        "site/provenance.py",
        "site/search.py",
        "site/edge.py",
        "site/serve.py",
        "merge.py",
        "compute/runner.py",
        "compute/distributed.py",
        "compute/verify.py",
        "store/manifest.py",
        "store/__init__.py",
    ]
    for path in [*(root / "sitegen" / m for m in modules), *templates]:
        rel = path.relative_to(root)
        text = path.read_text()
        # DeepDecipher's search URL (a URL fact), quoted for readers without JavaScript and in search.py's doc
        text = re.sub(
            r"/api/(&lt;model&gt;|<model>)/neuron2graph-search|(netlify/edge-functions/)?neuron2graph-search\.ts",
            "",
            text,
        )
        for name in ("neuroscope", "neuron2graph", "neuron_explainer", "logits"):
            assert not re.search(rf"['\"/]{name}\b", text), f"{rel} names the service {name}"
        if rel.name in (
            "runner.py",
            "cli.py",
            "distributed.py",
        ):  # nor one of a service's own compute options (neuron2graph's --n2g)
            assert "n2g" not in text, f"{rel} names neuron2graph's option --n2g"


def test_a_manifest_sitegen_would_refuse_is_never_written(tmp_path, synthetic_store):
    """The manifest is built and checked in one place (sitegen.store.manifest): a writer passing a
    wrong field gets the same one-line error opening the store would give, and no file."""
    from sitegen.errors import StoreError
    from sitegen.store import Store
    from sitegen.store.manifest import new_manifest

    m = synthetic_store.manifest
    fields = {k: m[k] for k in ("model", "corpus", "processed", "config", "stats", "run_hash", "shard", "services")}
    target = Store(tmp_path / "store")
    target.root.mkdir()
    with pytest.raises(StoreError, match="field 'model.layer_size'"):
        target.write_manifest(new_manifest(**{**fields, "model": {**m["model"], "layer_size": "4"}}))
    assert not (target.root / "manifest.json").exists()
    target.write_manifest(new_manifest(**fields))
    assert {
        k: v for k, v in orjson.loads((target.root / "manifest.json").read_bytes()).items() if k in fields
    } == fields
