"""A built-in service is one folder: its code and its template partials live in
sitegen/services/<name>/, it is listed once (sitegen.services.BUILTIN, which pyproject's entry
points and the import-linter contracts must agree with), and a theme still overrides any of its
partials by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from sitegen.resources import default_theme
from sitegen.services import BUILTIN, GROUP, by_name
from sitegen.site.build import _environment

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_entry_points_declare_exactly_the_built_ins():
    assert _pyproject()["project"]["entry-points"][GROUP] == BUILTIN


def test_the_import_contracts_name_exactly_the_built_ins():
    contracts = {c["name"]: c for c in _pyproject()["tool"]["importlinter"]["contracts"]}
    independent = next(c for c in contracts.values() if c.get("containers") == ["sitegen.services"])
    assert set(independent["layers"][0].split(" | ")) == set(BUILTIN)
    forbidden = [
        c
        for c in contracts.values()
        if c["type"] == "forbidden" and any(m.startswith("sitegen.services.") for m in c["forbidden_modules"])
    ]
    assert forbidden, "no contract keeps the build and the runners from importing a service's own modules"
    for c in forbidden:
        assert set(c["forbidden_modules"]) == {f"sitegen.services.{name}" for name in BUILTIN}, c["name"]


def test_a_built_in_service_is_one_folder_with_its_partials():
    assert not (default_theme() / "templates" / "services").exists()  # no partial of a service in the theme
    assert not (default_theme() / "templates" / "provenance").exists()
    env = _environment({}, [default_theme()])
    for name, service in by_name().items():
        if name not in BUILTIN:
            continue
        folder = ROOT / "sitegen" / "services" / name
        assert BUILTIN[name].startswith(f"sitegen.services.{name}.")
        assert service.template_dir() == folder / "templates"
        assert Path(env.get_template(service.template).filename) == folder / "templates" / "services" / f"{name}.html"
        if (folder / "templates" / service.provenance_template).exists():
            assert Path(env.get_template(service.provenance_template).filename).is_relative_to(folder)


def test_a_theme_overrides_a_built_in_partial_by_name(tmp_path):
    theme = tmp_path / "mytheme"
    for rel in ("services/neuroscope.html", "provenance/neuron2graph.html"):
        (theme / "templates" / rel).parent.mkdir(parents=True, exist_ok=True)
        (theme / "templates" / rel).write_text(f"<p>{rel} by my theme</p>\n")
    env = _environment({}, [theme, default_theme()])
    assert env.get_template("services/neuroscope.html").render() == "<p>services/neuroscope.html by my theme</p>"
    assert (
        env.get_template("provenance/neuron2graph.html").render() == "<p>provenance/neuron2graph.html by my theme</p>"
    )
    # the partials the theme lacks still come from their service's folder
    assert (
        Path(env.get_template("services/logits.html").filename)
        == ROOT / "sitegen/services/logits/templates/services/logits.html"
    )


def test_a_services_edge_function_is_in_its_folder_and_declared_for_netlify():
    """A service owns its edge functions (hook edge_functions): the Deno module lives in its folder
    and ships in the wheel (package data); netlify.toml declares each with the hook's path and cache
    before the site's own functions, and netlify/edge-functions/ holds its entry module (Netlify
    bundles from there only) and nothing else but the site's own functions."""
    import tomllib

    from sitegen.site.edge import NOT_FOUND_FUNCTIONS, netlify_entry, service_functions

    functions = service_functions()
    assert functions, "no service declares an edge function: nothing checked"
    declared = [
        (d["function"], d["path"], d.get("cache"))
        for d in tomllib.loads((ROOT / "netlify.toml").read_text())["edge_functions"]
    ]
    folder = ROOT / "netlify" / "edge-functions"
    for name, (owner, fn) in functions.items():
        assert fn.source.is_file() and fn.source.is_relative_to(ROOT / "sitegen" / "services" / owner), fn.source
        assert fn.source.name == f"{name}.ts"
        assert (name, fn.path, fn.cache) in declared, f"netlify.toml does not declare {name} as its service does"
        assert declared.index((name, fn.path, fn.cache)) < min(
            i for i, d in enumerate(declared) if d[0] in NOT_FOUND_FUNCTIONS
        ), f"netlify.toml declares {name} after the site's own functions, which would see its answers"
        assert (folder / f"{name}.ts").read_text() == netlify_entry(fn, folder), (
            f"write {folder / f'{name}.ts'} as sitegen.site.edge.netlify_entry says"
        )
    assert {p.stem for p in folder.iterdir()} == {*functions, *NOT_FOUND_FUNCTIONS}
    package_data = _pyproject()["tool"]["setuptools"]["package-data"]["sitegen"]
    for _owner, fn in functions.values():
        assert any(fn.source.relative_to(ROOT / "sitegen").match(glob) for glob in package_data), fn.source


@pytest.mark.parametrize(
    "edit, message",
    [
        (('path = "/api/*/neuron2graph-search"', 'path = "/api/*/n2g-search"'), "make them equal"),
        (('  cache = "manual"\n', ""), "make them equal"),
        (('function = "neuron2graph-search"', 'function = "graph-search"'), "'graph-search' is declared, but no"),
    ],
)
def test_serve_refuses_a_netlify_toml_that_disagrees_with_the_hook(tmp_path, edit, message):
    """netlify.toml is what Netlify reads, the hook what serve runs: serve refuses, in one line
    naming the file and the fix, a declaration that differs from its service's, one no service has,
    and a service's function left undeclared."""
    from sitegen.errors import BuildError
    from sitegen.site.edge import declarations

    text = (ROOT / "netlify.toml").read_text()
    assert edit[0] in text
    toml = tmp_path / "netlify.toml"
    toml.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(BuildError, match=message) as e:
        declarations(toml)
    assert str(toml) in str(e.value) and "\n" not in str(e.value)
    start = text.index("[[edge_functions]]")
    toml.write_text(text[:start] + text[text.index("[[edge_functions]]", start + 1) :])  # the search URL's dropped
    with pytest.raises(BuildError, match=r"'neuron2graph-search', which is not declared; add \[\[edge_functions\]\]"):
        declarations(toml)


def test_no_service_and_no_runner_reaches_into_the_model_bridge():
    """Services read the model through LoadedModel's methods only (run_mlp_activations,
    input_embeddings, unembed, mlp_weights, ...), never transformer-lens's bridge."""
    files = [
        *(ROOT / "sitegen" / "services").rglob("*.py"),
        *(ROOT / "sitegen" / "compute" / f for f in ("runner.py", "verify.py", "distributed.py")),
    ]
    for path in files:
        assert "bridge" not in path.read_text(), f"{path.relative_to(ROOT)} reaches into the model's bridge"


@pytest.mark.model
def test_loaded_model_hands_out_the_weights_services_read(tiny_model_dir):
    torch = pytest.importorskip("torch")
    from sitegen.compute.models import load_model

    model = load_model(str(tiny_model_dir), device="cpu")
    hf = model.bridge.original_model
    assert model.d_vocab == hf.config.vocab_size and model.gated_mlp and model.act_fn == "silu"
    assert model.normalization.startswith("RMS") and model.norm_eps == hf.config.rms_norm_eps
    assert torch.equal(model.input_embeddings(), hf.model.embed_tokens.weight)
    assert torch.equal(model.unembed(), hf.lm_head.weight.T)
    assert torch.equal(model.final_norm()[0], hf.model.norm.weight) and model.final_norm()[1] is None
    for layer in range(model.n_layers):
        mlp, block = model.mlp_weights(layer), hf.model.layers[layer]
        assert torch.equal(mlp.W_in, block.mlp.up_proj.weight.T) and torch.equal(
            mlp.W_gate, block.mlp.gate_proj.weight.T
        )
        assert torch.equal(mlp.W_out, block.mlp.down_proj.weight.T)
        assert mlp.b_in is None or not mlp.b_in.any()  # Llama's MLP has no bias
        assert torch.equal(mlp.norm[0], block.post_attention_layernorm.weight)


def test_the_runner_seams_are_parameters_not_patches_or_config_fields():
    """Tests inject failures through run_compute's progress/on_checkpoint parameters: no test knob
    in a production config, and distributed.py swaps nothing in the runner module at run time."""
    import dataclasses
    import re

    from sitegen.compute.runner import ComputeConfig

    assert not {"max_batches", "die_after_checkpoint"} & {f.name for f in dataclasses.fields(ComputeConfig)}
    for path in (ROOT / "sitegen").rglob("*.py"):
        text = path.read_text()
        for knob in ("max_batches", "die_after_checkpoint", "test-died"):
            assert knob not in text, f"{path.relative_to(ROOT)} holds the test knob {knob}"
    assert not re.search(r"runner\.\w+\s*=", (ROOT / "sitegen/compute/distributed.py").read_text())


def _store_of_every_service(root: Path):
    """A synthetic store holding a table of every built-in service: neuroscope and logits in every
    layer, a graph in layer 0, an explanation in layer 1, each written by the service's own writer."""
    import numpy as np
    import pyarrow as pa

    from sitegen.services.dictionary.data import dictionary_table
    from sitegen.services.neuron_explainer.published import tables
    from sitegen.store import Store
    from tests.reference import write_synthetic_store

    store = write_synthetic_store(root)
    store.write_layer("neuron_explainer", 1, tables({1: {0: ("fires on w3", 0.5)}})[1])
    store.add_service("neuron_explainer")
    size = store.manifest["model"]["layer_size"]  # a neuron table of the dictionary service: no latents linked
    empty = pa.array([[]] * size, pa.list_(pa.int32()))
    empty_cos = pa.array([[]] * size, pa.list_(pa.float32()))
    links = {
        f"{side}{suffix}": (empty_cos if suffix == "_cos" else empty)
        for side in ("reads", "writes")
        for suffix in ("_dict", "", "_cos")
    }
    store.write_layer("dictionary", 1, dictionary_table({"neuron": pa.array(range(size), pa.int32()), **links}))
    store.add_service("dictionary")
    from sitegen.services.correlation.data import sums_table

    zeros = np.zeros(size, dtype=np.int64)  # a layer of the correlation service, as the corpus pass writes it
    for layer in range(store.manifest["model"]["num_layers"]):
        store.write_layer("correlation", layer, sums_table(0, zeros, zeros, np.zeros((size, size), dtype=np.int64)))
    store.add_service("correlation")
    return Store.open(root)


# (service, layer holding a table, a declared column)
_DECLARED = [
    ("neuroscope", 1, "hist_edges"),
    ("neuroscope", 1, "sumsq_lo"),
    ("neuroscope", 1, "top_acts"),
    ("logits", 1, "input_ids"),
    ("logits", 1, "promoted_vals"),
    ("neuron2graph", 0, "nodes"),
    ("neuron2graph", 0, "variance_explained"),
    ("neuron_explainer", 1, "explanation"),
    ("neuron_explainer", 1, "score"),
    ("dictionary", 1, "writes_cos"),
    ("correlation", 1, "gram"),
]


def test_every_service_declares_its_table_once_and_writes_it(tmp_path):
    """Each built-in declares its layer table's columns and types (table_schema); the tables its
    own writers make are exactly that schema, followed only by the optional column groups it
    declares beside it (neuroscope's interval examples and a gated MLP's quadrants; the explainer's
    `explain` adds columns after it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sitegen.services.neuroscope import data as ns_data

    optional = {"neuroscope": pa.schema([*ns_data.GLU_SCHEMA, *ns_data.INTERVAL_SCHEMA])}
    store = _store_of_every_service(tmp_path / "store")
    for name, service in by_name().items():
        if name not in BUILTIN:
            continue
        declared = service.table_schema
        assert declared is not None and "neuron" in declared.names, name
        layer = next(layer for svc, layer, _ in _DECLARED if svc == name)
        written = pq.read_schema(store.layer_path(name, layer))
        fields = list(written)
        assert pa.schema(fields[: len(declared)]).equals(declared), name
        for field in fields[len(declared) :]:
            assert name in optional and optional[name].field(field.name).equals(field), (name, field)


@pytest.mark.parametrize("service, layer, column", _DECLARED)
def test_a_store_lacking_a_declared_column_is_one_line(tmp_path, service, layer, column):
    """Store.open checks every column of a service's declared schema, so `sitegen build` on a
    store without one says so in one line naming the file and the column (no Arrow error)."""
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from sitegen.cli import main
    from sitegen.errors import StoreError
    from sitegen.store import Store

    store = _store_of_every_service(tmp_path / "store")
    path = store.layer_path(service, layer)
    pq.write_table(pq.read_table(path).drop_columns([column]), path)
    with pytest.raises(
        StoreError,
        match=rf"{service}/layer={layer}/data.parquet: damaged table, column\(s\) {column} missing; recompute",
    ):
        Store.open(store.root)
    result = CliRunner().invoke(main, ["build", str(store.root), "--out", str(tmp_path / "site")])
    assert result.exit_code != 0 and "Traceback" not in result.output and "FieldRef" not in result.output
    assert f"column(s) {column} missing" in result.output and len(result.output.strip().splitlines()) == 1, (
        result.output
    )


@pytest.mark.parametrize("service, layer, column", _DECLARED)
def test_a_declared_column_of_another_type_is_one_line(tmp_path, service, layer, column):
    """A column the service declares, stored as another type (a hand-written or foreign table), is
    refused when the store opens, naming the file, the column and both types."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sitegen.errors import StoreError
    from sitegen.store import Store

    store = _store_of_every_service(tmp_path / "store")
    path = store.layer_path(service, layer)
    table = pq.read_table(path)
    declared = by_name()[service].table_schema.field(column).type
    other = pa.int64() if declared == pa.string() else pa.string()
    i = table.schema.get_field_index(column)
    pq.write_table(table.set_column(i, column, pa.array([None] * table.num_rows, other)), path)
    with pytest.raises(StoreError) as e:
        Store.open(store.root)
    assert str(e.value) == (
        f"{path}: damaged table, column '{column}' holds {other}, not the declared {declared}; "
        "recompute the store (or restore the file from a copy)"
    )


def test_logits_without_input_tokens_open_and_build(tmp_path):
    """For an activation function sitegen cannot evaluate, logits' input lists are null (the
    table keeps its declared schema): the store opens, and the page and the API show no input tokens."""
    import orjson
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sitegen.site.build import build_site
    from tests.reference import write_synthetic_store

    store = write_synthetic_store(tmp_path / "store", with_graphs=False)
    for layer in range(store.manifest["model"]["num_layers"]):
        path = store.layer_path("logits", layer)
        table = pq.read_table(path)
        for name in ("input_ids", "input_vals"):
            i = table.schema.get_field_index(name)
            table = table.set_column(i, name, pa.nulls(table.num_rows, table.schema.field(name).type))
        store.write_layer("logits", layer, table)
    build_site([store.root], tmp_path / "site")
    data = orjson.loads((tmp_path / "site/api/toy-model/logits/1/2.json").read_bytes())["data"]
    assert data["input_tokens"] == [] and len(data["promoted"]) == 3
    page = (tmp_path / "site/toy-model/1/2.html").read_text()
    assert "Driven by input tokens" not in page and "Promotes" in page


@pytest.mark.model
def test_logits_compute_writes_the_declared_table(tiny_model_dir):
    """weight_tables builds its tables against the declared schema, with null input lists for an
    activation function sitegen cannot evaluate (so the store still opens)."""
    pytest.importorskip("torch")
    from sitegen.compute.models import load_model
    from sitegen.services.logits.compute import weight_tables
    from sitegen.services.logits.data import TABLE_SCHEMA

    model = load_model(str(tiny_model_dir), device="cpu")
    _, table = next(iter(weight_tables(model)))
    assert table.schema.equals(TABLE_SCHEMA) and table.column("input_ids").null_count == 0

    class UnknownActivation:
        act_fn = "solu"

        def __getattr__(self, name):
            return getattr(model, name)

    _, table = next(iter(weight_tables(UnknownActivation())))
    assert table.schema.equals(TABLE_SCHEMA) and table.column("input_ids").null_count == table.num_rows


def test_every_reader_of_a_service_table_names_declared_columns():
    """Readers name a table's columns as strings (another service may not import the owner's
    module): each name a `read_layer(<service>, ..., columns=[...])` call asks for, and
    neuroscope's own readers' lists, are in that service's declared schema."""
    import ast

    from sitegen.services.neuroscope.render import _COLUMNS
    from sitegen.services.neuroscope.verify import LayerCheck

    schemas = {name: set(s.table_schema.names) for name, s in by_name().items() if name in BUILTIN}
    assert set(_COLUMNS) <= schemas["neuroscope"] and set(LayerCheck.COLUMNS) <= schemas["neuroscope"]
    found = set()
    for path in (ROOT / "sitegen").rglob("*.py"):
        rel = path.relative_to(ROOT / "sitegen")
        own = rel.parts[1] if rel.parts[0] == "services" and rel.parts[1] in schemas else None
        for call in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)):
            if not (isinstance(call.func, ast.Attribute) and call.func.attr == "read_layer" and call.args):
                continue
            arg = call.args[0]
            if isinstance(arg, ast.Constant):
                service = arg.value
            elif own and (
                (isinstance(arg, ast.Name) and arg.id in ("NAME", "SERVICE"))
                or (isinstance(arg, ast.Attribute) and arg.attr == "name")
            ):
                service = own  # the service's own name, in its own folder
            else:
                continue
            for kw in call.keywords:
                if kw.arg == "columns" and isinstance(kw.value, ast.List):
                    names = {e.value for e in kw.value.elts}
                    assert names <= schemas[service], (
                        f"{rel}:{call.lineno} reads {sorted(names - schemas[service])}, not in {service}'s table"
                    )
                    found.add(service)
    assert found >= {"neuroscope", "neuron2graph", "neuron_explainer"}
