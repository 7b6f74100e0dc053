"""Issue 17, item 6 and part of item 8: what a store may hold and how it is made.

- non-finite numbers: compute refuses activations that overflow (naming layer and neuron); a
  store with a NaN or an infinity planted in a table is refused in one line by every reader;
- token ids outside the vocabulary are refused when the store is opened;
- model names the build writes under api/ (openapi) are refused before compute starts;
- an interrupted merge can be rerun as its message says, and build names that merge;
- merge refuses shards computed with other weights.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from sitegen.cli import main
from sitegen.errors import ModelError, StoreError
from sitegen.store import Store, write_table
from tests.conftest import HAS_TORCH
from tests.reference import write_synthetic_store


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(res, *needles: str) -> str:
    assert res.exception is None or isinstance(res.exception, SystemExit), (
        f"{type(res.exception).__name__}: {res.exception}"
    )
    assert res.exit_code != 0, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _replace_cell(path: Path, column: str, row: int, value) -> None:
    """Rewrite one cell of a stored Parquet table (through the store's own writer, so only the value is wrong)."""
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    values[row] = value
    i = table.column_names.index(column)
    write_table(path, table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type)))


# -- item 6: non-finite numbers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def overflow_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with one MLP row of layer 1 (neuron 5's up projection) scaled until its
    activations overflow float32; layer 0 stays finite, later layers are swamped by the result."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        row = model.model.layers[1].mlp.up_proj.weight[5]
        row.mul_(3e38 / row.abs().max())  # each product stays finite; their sum over d_model does not
    out = tmp_path_factory.mktemp("overflow") / "overflow-llama"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.mark.skipif(not HAS_TORCH, reason="needs the compute extra")
def test_compute_refuses_activations_that_overflow(overflow_model_dir, tiny_corpus, tmp_path):
    from sitegen.compute.runner import ComputeConfig, run_compute

    out = tmp_path / "store"
    cfg = ComputeConfig(
        model=str(overflow_model_dir),
        corpus=str(tiny_corpus),
        out=out,
        tokens=600,
        seq_len=16,
        top_k=3,
        n_random=2,
        batch_size=4,
        device="cpu",
        progress=False,
    )
    with pytest.raises(ModelError, match=r"layer 1 neuron 5 has a non-finite activation") as e:
        run_compute(cfg, log=lambda m: None)
    assert "\n" not in str(e.value)
    assert not (out / "manifest.json").exists()  # no store with NaN statistics
    assert not list(out.rglob("*.npz"))  # nor a checkpoint holding them
    res = _invoke(
        "compute",
        "--model",
        overflow_model_dir,
        "--corpus",
        tiny_corpus,
        "--out",
        tmp_path / "cli",
        "--tokens",
        600,
        "--seq-len",
        16,
        "--batch-size",
        4,
        "--device",
        "cpu",
        "--no-weights",
        "--quiet",
    )
    _one_line_error(res, "layer 1 neuron 5", "--model")


@pytest.mark.parametrize(
    "column, row, value, shown",
    [
        ("max", 2, float("nan"), "nan"),
        ("mean", 1, float("inf"), "inf"),
        ("top_acts", 3, None, "-inf"),  # inside a list of lists (the traces)
    ],
)
def test_a_store_holding_a_non_finite_number_is_refused_in_one_line(tmp_path, column, row, value, shown):
    store = write_synthetic_store(tmp_path / "store", with_graphs=False)
    path = store.layer_path("neuroscope", 1)
    if value is None:
        traces = pq.read_table(path).column(column)[row].as_py()
        traces[0][4] = float("-inf")
        value = traces
    _replace_cell(path, column, row, value)
    with pytest.raises(StoreError, match=rf"column '{column}' of neuron {row} holds {shown}, not a finite number"):
        Store.open(store.root).read_layer("neuroscope", 1)
    _one_line_error(_invoke("build", store.root, "--out", tmp_path / "site"), str(path), f"neuron {row}", shown)
    assert not (tmp_path / "site" / "api" / "toy-model.json").exists()


def test_merge_keeps_the_infinite_extremes_of_a_shard_that_saw_no_token(tmp_path):
    """The identity of min and max (+-inf) of a neuron that saw no token is no damage to merge."""
    shards = []
    for i in range(2):
        st = write_synthetic_store(tmp_path / f"shard{i}", seed=i, with_graphs=False)
        Store(st.root).write_manifest({**st.manifest, "shard": {"index": i, "count": 2}})
        shards.append(st.root)
    clean = tmp_path / "clean"
    assert _invoke("merge", *shards, "--out", clean).exit_code == 0
    path = Store.open(shards[1]).layer_path("neuroscope", 0)
    _replace_cell(path, "min", 1, float("inf"))
    _replace_cell(path, "max", 1, float("-inf"))
    res = _invoke("merge", *shards, "--out", tmp_path / "merged")
    assert res.exit_code == 0, res.output
    merged = Store.open(tmp_path / "merged").read_layer("neuroscope", 0).column("max")[1].as_py()
    assert merged == Store.open(shards[0]).read_layer("neuroscope", 0).column("max")[1].as_py()
    _replace_cell(path, "max", 2, float("nan"))  # a NaN is damage wherever it is
    _one_line_error(_invoke("merge", *shards, "--out", tmp_path / "merged2"), str(path), "neuron 2", "nan")


# -- item 8: token ids outside the vocabulary -------------------------------------------------------


@pytest.mark.parametrize("bad", [10**6, -1, 35])  # 35: one past the synthetic vocabulary's last id
def test_sequence_token_ids_outside_the_vocabulary_are_refused_at_open(tmp_path, bad):
    store = write_synthetic_store(tmp_path / "store", with_graphs=False)
    path = store.root / "sequences.parquet"
    ids = pq.read_table(path).column("token_ids")[4].as_py()
    ids[2] = bad
    _replace_cell(path, "token_ids", 4, ids)
    with pytest.raises(
        StoreError,
        match=rf"sequences.parquet: column 'token_ids' of seq_id 4 holds token id {bad}, outside the vocabulary",
    ):
        Store.open(store.root)
    _one_line_error(_invoke("build", store.root, "--out", tmp_path / "site"), str(path), f"token id {bad}")


def test_service_token_ids_outside_the_vocabulary_are_refused_at_open(tmp_path):
    store = write_synthetic_store(tmp_path / "store", with_graphs=False)
    path = store.layer_path("logits", 0)
    ids = pq.read_table(path).column("input_ids")[3].as_py()
    ids[1] = -1
    _replace_cell(path, "input_ids", 3, ids)
    with pytest.raises(
        StoreError,
        match=r"column 'input_ids' of neuron 3 holds token id -1, outside the vocabulary \(vocab.parquet has ids 0 to 34\)",
    ):
        Store.open(store.root)


# -- item 8: names the build writes under api/ --------------------------------------------------------


def test_reserved_names_cover_every_entry_the_build_writes_under_api(built_site, synthetic_store):
    from sitegen.names import model_name_problem

    model = synthetic_store.manifest["model"]["name"]
    entries = [p.name for p in (built_site / "api").iterdir() if p.name not in (model, f"{model}.json")]
    assert {"index.json", "openapi.json"} <= set(entries)
    for entry in entries:
        for name in {entry, entry.rsplit(".", 1)[0], entry.upper()}:
            assert model_name_problem(name) is not None, name


def test_compute_refuses_name_openapi_before_loading_anything(tmp_path):
    # The model does not exist: the name is checked first, so its error is the one reported.
    res = _invoke(
        "compute",
        "--model",
        tmp_path / "no-such-model",
        "--corpus",
        tmp_path / "no-such-corpus",
        "--out",
        tmp_path / "s",
        "--name",
        "openapi",
    )
    _one_line_error(res, "--name", "'openapi' is taken")
    assert not (tmp_path / "s").exists()
    store = write_synthetic_store(tmp_path / "store", name="OpenAPI", with_graphs=False)
    _one_line_error(_invoke("build", store.root, "--out", tmp_path / "site"), "'OpenAPI' is taken")


@pytest.mark.parametrize("names", [("toy", "toy.json"), ("TOY.JSON", "toy")])
def test_build_refuses_a_model_whose_folder_is_another_models_metadata_file(tmp_path, names):
    roots = [write_synthetic_store(tmp_path / f"s{i}", name=n, with_graphs=False).root for i, n in enumerate(names)]
    _one_line_error(_invoke("build", *roots, "--out", tmp_path / "site"), "would be both model", "--name")
    assert not (tmp_path / "site" / "api").exists()  # refused before anything is written


# -- item 8: merge ---------------------------------------------------------------------------------------


def _shards(root: Path, **model) -> list[Path]:
    out = []
    for i in range(2):
        st = write_synthetic_store(root / f"shard{i}", seed=i, with_graphs=False)
        m = st.manifest
        Store(st.root).write_manifest(
            {**m, "shard": {"index": i, "count": 2}, "model": {**m["model"], **model.get(f"shard{i}", {})}}
        )
        out.append(st.root)
    return out


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in ("manifest.json", ".manifest.lock")
    }


def test_an_interrupted_merge_is_finished_by_the_command_its_messages_name(tmp_path, monkeypatch):
    import errno

    import sitegen.store as store_mod

    shards = _shards(tmp_path)
    clean = tmp_path / "clean"
    assert _invoke("merge", *shards, "--out", clean).exit_code == 0
    real, calls = store_mod.atomic_write, [0]

    def disk_full_on_the_third_file(path, write):
        calls[0] += 1
        if calls[0] == 3:

            def no_space(tmp):
                raise OSError(errno.ENOSPC, "No space left on device")

            return real(path, no_space)
        return real(path, write)

    out = tmp_path / "merged"
    monkeypatch.setattr(store_mod, "atomic_write", disk_full_on_the_third_file)
    line = _one_line_error(
        _invoke("merge", *shards, "--out", out),
        "disk full",
        f"rerun the same command (sitegen merge {shards[0]} {shards[1]} --out {out})",
    )
    assert "finished work is kept" not in line  # a merge keeps nothing: the rerun starts over
    monkeypatch.setattr(store_mod, "atomic_write", real)
    assert any(out.rglob("data.parquet")) and not (out / "manifest.json").exists()  # half-merged
    line = _one_line_error(
        _invoke("build", out, "--out", tmp_path / "site"),
        "unfinished 'sitegen merge'",
        f"sitegen merge {shards[0]} {shards[1]} --out {out}",
    )
    assert "compute" not in line
    res = _invoke("merge", *shards, "--out", out)  # the command the messages name
    assert res.exit_code == 0, res.output
    assert _tree(out) == _tree(clean)
    assert not (out / ".merging").exists()
    assert _invoke("build", out, "--out", tmp_path / "site").exit_code == 0


def test_an_interrupted_merge_does_not_clear_a_folder_holding_other_files(tmp_path):
    shards = _shards(tmp_path)
    out = tmp_path / "merged"
    out.mkdir()
    (out / ".merging").write_text("{}")
    (out / "notes.txt").write_text("mine")
    _one_line_error(_invoke("merge", *shards, "--out", out), "is not empty")
    assert (out / "notes.txt").read_text() == "mine"


def test_merge_refuses_shards_of_other_weights(tmp_path):
    shards = _shards(tmp_path, shard0={"weights_sha256": "sha256:aaaa"}, shard1={"weights_sha256": "sha256:bbbb"})
    _one_line_error(
        _invoke("merge", *shards, "--out", tmp_path / "merged"),
        str(shards[0]),
        str(shards[1]),
        "sha256:aaaa",
        "sha256:bbbb",
    )
    assert not (tmp_path / "merged").exists()


# -- item 8: words lunr's stemmer cannot take -------------------------------------------------------

LONG_RUN = "y" * 1500 + "ing"  # lunr's Porter stemmer recurses once per 'y': a RecursionError at the default limit
MAX_WORD_LENGTH = 64  # docs/reference.md's rule: longer words are left out of the index and of a query


def _explained(root: Path, text: str):
    import orjson

    from sitegen.services.neuron_explainer.published import import_explanations

    store = write_synthetic_store(root / "store", name="explained", with_graphs=False)
    folder = root / "published"
    folder.mkdir()
    (folder / "all.jsonl").write_bytes(
        orjson.dumps(
            {
                "neuron_id": {"layer_index": 0, "neuron_index": 1},
                "scored_explanations": [{"explanation": text, "scored_simulation": {"ev_correlation_score": 0.5}}],
            }
        )
        + b"\n"
    )
    import_explanations(folder, store.root, log=lambda m: None)
    return store


def test_words_over_the_cap_are_left_out_of_the_explanation_analysis():
    from sitegen.site import textindex
    from sitegen.site.textindex import analyse

    assert analyse(f"taxes {LONG_RUN} cuts") == ["tax", "cut"]
    assert analyse("b" * MAX_WORD_LENGTH) == ["b" * MAX_WORD_LENGTH]
    assert analyse("b" * (MAX_WORD_LENGTH + 1)) == []
    assert analyse(f"({'b' * MAX_WORD_LENGTH}).") == ["b" * MAX_WORD_LENGTH]  # counted after trimming
    assert textindex.MAX_WORD_LENGTH == MAX_WORD_LENGTH  # app.js has the same number


def test_an_explanation_with_a_long_run_of_one_letter_builds_and_is_found(tmp_path):
    from sitegen.site.build import build_site
    from tests.reference import static_text_search

    store = _explained(tmp_path, f"taxes {LONG_RUN}")
    build_site([store.root], tmp_path / "site")
    assert static_text_search(tmp_path / "site", "explained", "taxes") == [1]
    assert static_text_search(tmp_path / "site", "explained", f"taxes {LONG_RUN}") == [1]  # the long word is no term


@pytest.mark.browser
def test_browser_drops_the_same_long_words_as_the_index(tmp_path):
    """app.js' analysis of a query against textindex.analyse, on words around the cap."""
    import os
    import threading

    from sitegen.site.build import build_site
    from sitegen.site.serve import make_server
    from sitegen.site.textindex import analyse, stop_words
    from tests.conftest import free_port
    from tests.test_browser import ARGS, CHROMIUM

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install chromium (or set SITEGEN_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    build_site([_explained(tmp_path, "taxes").root], tmp_path / "site")
    server = make_server(tmp_path / "site", "127.0.0.1", free_port())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    words = " ".join(
        [
            "taxes",
            LONG_RUN,
            "b" * MAX_WORD_LENGTH,
            "c" * (MAX_WORD_LENGTH + 1),
            f"({'d' * MAX_WORD_LENGTH})",
            "é" * MAX_WORD_LENGTH,
            "😀" * MAX_WORD_LENGTH + "a",
            "cuts",
        ]
    )
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/search.html")
            got = page.evaluate("([t, s]) => window.sitegenAnalyse(t, s)", [words, stop_words()])
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    assert got == analyse(words)
    assert LONG_RUN not in " ".join(got) and "c" * (MAX_WORD_LENGTH + 1) not in got


# -- item 8: local source paths ------------------------------------------------------------------------

SECRET_MODEL, SECRET_CORPUS = "private/acme-secret-model-v3", "/home/alice/private/acme-texts.jsonl"


def _built_with_sources(root: Path, *, kinds: bool = True, publish: bool | None = None) -> Path:
    from sitegen.site.build import build_site

    store = write_synthetic_store(root / "store", with_graphs=False)
    m = {k: v for k, v in store.manifest.items() if k not in ("schema_version", "sitegen_version")}
    m["model"] = {
        **m["model"],
        "source": SECRET_MODEL,
        "fingerprint": "sha256:f1f1",
        **({"source_kind": "local"} if kinds else {}),
    }
    m["corpus"] = {**m["corpus"], "source": SECRET_CORPUS, **({"source_kind": "local"} if kinds else {})}
    if publish is not None:
        m["publish_source"] = publish
    Store(store.root).write_manifest(m)
    build_site([store.root], root / "site")
    return root / "site"


def _files_containing(site: Path, text: str) -> list[str]:
    return [
        p.relative_to(site).as_posix()
        for p in sorted(site.rglob("*"))
        if p.is_file() and text.encode() in p.read_bytes()
    ]


@pytest.mark.parametrize("kinds", [True, False], ids=["recorded", "not-recorded"])
def test_a_local_source_path_is_published_as_its_last_component(tmp_path, kinds):
    site = _built_with_sources(tmp_path, kinds=kinds)
    assert _files_containing(site, "private/") == []
    assert _files_containing(site, "alice") == []
    pv = orjson_loads(site / "api" / "toy-model.json")["metadata"]["provenance"]
    assert pv["model"]["source"] == "acme-secret-model-v3" and pv["model"]["fingerprint"] == "sha256:f1f1"
    assert pv["corpus"]["source"] == "acme-texts.jsonl" and pv["corpus"]["content_hash"] == "sha256:0"
    assert (
        "<code>acme-secret-model-v3</code> · checkpoint <code>sha256:f1f1</code>"
        in (site / "toy-model" / "0" / "1.html").read_text()
    )
    _conforms(site, "/api/{model}", site / "api" / "toy-model.json")


def test_publish_source_shows_the_path_as_given(tmp_path):
    site = _built_with_sources(tmp_path, publish=True)
    pv = orjson_loads(site / "api" / "toy-model.json")["metadata"]["provenance"]
    assert (pv["model"]["source"], pv["corpus"]["source"]) == (SECRET_MODEL, SECRET_CORPUS)
    assert pv["model"]["source_kind"] == pv["corpus"]["source_kind"] == "local"


def test_hub_and_embedded_sources_are_shown_as_given():
    from sitegen.site.provenance import public_source

    assert public_source({"source": "EleutherAI/pythia-70m", "source_kind": "hub"}, None) == "EleutherAI/pythia-70m"
    assert (
        public_source({"source": "wikitext:wikitext-2-raw-v1", "source_kind": "hub"}, False)
        == "wikitext:wikitext-2-raw-v1"
    )
    assert public_source({"source": "smollm2", "source_kind": "embedded"}, None) == "smollm2"
    assert public_source({"source": "gpt2"}, None) == "gpt2"  # not recorded, not path-like
    assert public_source({"source": "./ckpts/run-7/"}, None) == "run-7"


@pytest.mark.skipif(not HAS_TORCH, reason="needs the compute extra")
def test_compute_records_a_local_model_and_corpus_so_the_build_hides_their_paths(tiny_model_dir, tiny_corpus, tmp_path):
    from sitegen.site.build import build_site

    out = tmp_path / "store"
    res = _invoke(
        "compute",
        "--model",
        tiny_model_dir,
        "--corpus",
        tiny_corpus,
        "--out",
        out,
        "--tokens",
        300,
        "--seq-len",
        16,
        "--batch-size",
        4,
        "--device",
        "cpu",
        "--no-weights",
        "--quiet",
    )
    assert res.exit_code == 0, res.output
    m = Store.open(out).manifest
    assert (m["model"]["source_kind"], m["corpus"]["source_kind"], m["publish_source"]) == ("local", "local", False)
    assert m["model"]["source"] == str(tiny_model_dir)  # the store keeps the path: verify reruns that model
    build_site([out], tmp_path / "site")
    assert _files_containing(tmp_path / "site", str(tiny_model_dir.parent)) == []
    assert _files_containing(tmp_path / "site", str(tiny_corpus)) == []
    pv = orjson_loads(tmp_path / "site" / "api" / "tiny-llama.json")["metadata"]["provenance"]
    assert pv["model"]["source"] == tiny_model_dir.name and pv["corpus"]["source"] == tiny_corpus.name


def orjson_loads(path: Path):
    import orjson

    return orjson.loads(path.read_bytes())


def _conforms(site: Path, template: str, path: Path) -> None:
    from jsonschema import Draft202012Validator

    spec = orjson_loads(site / "api" / "openapi.json")
    schema = spec["paths"][template]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    errors = list(
        Draft202012Validator({**schema, "components": {"schemas": spec["components"]["schemas"]}}).iter_errors(
            orjson_loads(path)
        )
    )
    assert not errors, errors[0].message


def test_a_merge_stopped_by_ctrl_c_says_which_command_finishes_it(tmp_path, monkeypatch):
    import sitegen.merge as merge_mod

    shards = _shards(tmp_path)
    calls, real = [0], merge_mod._merge_service

    def interrupted(*args):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(merge_mod, "_merge_service", interrupted)
    out = tmp_path / "merged"
    _one_line_error(
        _invoke("merge", *shards, "--out", out),
        "merge interrupted",
        f"sitegen merge {shards[0]} {shards[1]} --out {out}",
    )
    monkeypatch.setattr(merge_mod, "_merge_service", real)
    assert _invoke("merge", *shards, "--out", out).exit_code == 0
    assert Store.open(out).manifest["processed"]["sequences"] == 24
