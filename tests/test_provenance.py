"""The Provenance section of the neuron page and metadata.provenance in the API (no torch): every
recorded field is shown, escaped, and a graph's train/test sequences follow Neuron2Graph's split."""

from __future__ import annotations

import orjson
import pyarrow as pa
import pytest

from sitegen.site.build import build_site
from sitegen.store import Store
from tests.reference import write_synthetic_store

EVIL = '<script>alert("x")</script>'
MODEL = "prov-model"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("prov")
    store = write_synthetic_store(root / "store", name=MODEL)
    m = {k: v for k, v in store.manifest.items() if k not in ("schema_version", "sitegen_version")}
    m["corpus"] |= {
        "name": f"corpus {EVIL}",
        "source": f"hub/{EVIL}",
        "source_kind": "hub",
        "content_hash": "sha256:c0ffee",
    }
    m["model"] |= {
        "source": "org/tiny<b>",
        "source_kind": "hub",
        "fingerprint": "sha256:f1f1",
        "weights_sha256": "sha256:beef",
        "hook": "blocks.{layer}.mlp.hook_post",
    }
    m["versions"] = {"sitegen": "9.9.9", "torch": "2.13.0", "transformers": EVIL}
    m["neuron2graph"] = {
        "texts": 20,
        "seed": 4,
        "replacements": 5,
        "thresholds": {"firing": 0.5, "important_for_line": 0.75},
    }
    store.write_manifest(m)
    schema = pa.schema(
        [
            ("neuron", pa.int32()),
            ("explanation", pa.string()),
            ("score", pa.float64()),
            ("explainer", pa.string()),
            ("source", pa.string()),
            ("method", pa.string()),
            ("prompt_hash", pa.string()),
            ("usage", pa.string()),
            ("details", pa.string()),
            ("raw", pa.string()),
        ]
    )
    store.write_layer(
        "neuron_explainer",
        0,
        pa.Table.from_pylist(
            [
                {
                    "neuron": 1,
                    "explanation": "tags",
                    "score": 0.5,
                    "explainer": f"llm {EVIL}",
                    "source": "sitegen explain",
                    "method": "logprobs",
                    "prompt_hash": "sha256:abc<i>",
                    "usage": "{}",
                    "details": "[]",
                    "raw": "[]",
                }
            ],
            schema=schema,
        ),
    )
    Store.open(store.root).add_service("neuron_explainer")
    out = root / "site"
    build_site([store.root], out)
    return out


def test_page_states_how_it_was_made_escaped(site):
    html = (site / MODEL / "0" / "1.html").read_text()
    assert '<details class="provenance"' in html
    section = html[
        html.index('<details class="provenance"') : html.index("</details>", html.index('<details class="provenance"'))
    ]
    for text in (
        "sha256:c0ffee",
        "sha256:f1f1",
        "sha256:beef",
        "9.9.9",
        "blocks.0.mlp.hook_post",
        "logprobs",
        "sha256:abc&lt;i&gt;",
        "org/tiny&lt;b&gt;",
        "corpus &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;",
        "llm &lt;script&gt;",
        "important_for_line",
    ):
        assert text in section, text
    assert "<script>" not in section and "<b>" not in section and "<i>" not in section
    assert "{layer}" not in section  # the hook pattern is filled in with this page's layer
    assert "blocks.1.mlp.hook_post" in (site / MODEL / "1" / "0.html").read_text()
    # explainer and simulator are the same model for `sitegen explain`
    assert section.count("llm &lt;script&gt;") == 2
    # tokens processed and sequence length, from the manifest
    m = Store.open(site.parent / "store").manifest
    assert (
        f"<code>{m['processed']['tokens']}</code> tokens" in section
        and f"up to <code>{m['config']['seq_len']}</code> tokens" in section
    )


def test_graph_train_and_test_sequences(site):
    from sitegen.services.neuron2graph.compute import _split

    html = (site / MODEL / "0" / "1.html").read_text()
    top = [
        t["data_index"]
        for t in orjson.loads((site / "api" / MODEL / "neuroscope" / "0" / "1.json").read_bytes())["data"]["texts"]
    ]
    train, test = _split(len(top), 4, 0, 1)  # the compute half's own rule, with the recorded seed
    assert (
        f"trained on top sequences {', '.join(str(top[i]) for i in train)}; tested on {', '.join(str(top[i]) for i in test)}"
        in html
    )
    assert "Graph</dt>" not in (site / MODEL / "0" / "0.html").read_text()  # no graph there: no graph provenance
    assert "Explanation</dt>" not in (site / MODEL / "1" / "1.html").read_text()


def test_split_rule_matches_compute():
    from sitegen.services.neuron2graph.compute import _split
    from sitegen.services.neuron2graph.provenance import split

    for n, seed, layer, neuron in [(20, 0, 0, 0), (20, 3, 5, 17), (7, 1, 2, 3), (2, 0, 1, 1)]:
        assert split(n, seed, layer, neuron) == _split(n, seed, layer, neuron)


def test_api_metadata_carries_provenance(site):
    for rel in (f"api/{MODEL}.json", f"api/{MODEL}/neuroscope/0/1.json", f"api/{MODEL}/logits/1/0.json"):
        meta = orjson.loads((site / rel).read_bytes())["metadata"]
        pv = meta["provenance"]
        assert pv["corpus"] == {
            "name": f"corpus {EVIL}",
            "source": f"hub/{EVIL}",
            "source_kind": "hub",
            "content_hash": "sha256:c0ffee",
        }
        assert pv["model"]["fingerprint"] == "sha256:f1f1" and pv["model"]["weights_sha256"] == "sha256:beef"
        assert pv["sitegen_version"] == "9.9.9" and pv["versions"]["torch"] == "2.13.0"
        assert pv["neuron2graph"]["thresholds"]["firing"] == 0.5
    assert orjson.loads((site / "api" / "index.json").read_bytes())["models"][0]["provenance"]["tokens_processed"] > 0


def test_local_paths_are_not_published(tmp_path):
    from sitegen.site.provenance import model_provenance

    # A store that did not record where its sources came from: anything path-like shows only its last component.
    pv = model_provenance(
        {"model": {"source": "/home/alice/secret-ckpt"}, "corpus": {"name": "texts", "source": "./private/texts.jsonl"}}
    )
    assert pv["model"]["source"] == "secret-ckpt" and pv["corpus"]["source"] == "texts.jsonl"
    assert (
        model_provenance({"model": {"source": "EleutherAI/pythia-70m", "source_kind": "hub"}})["model"]["source"]
        == "EleutherAI/pythia-70m"
    )


def test_the_examples_across_the_range_say_how_they_were_chosen(site, tmp_path):
    """The neuron page's row states the rule with the recorded settings (the interval's mantissa
    bits, the groups kept one by one, examples per group, the key and the run's seed), the API's
    metadata carries them, and the key is the one the examples follow: each group's texts come
    smallest interval_key(seed, sequence id) first. A store whose manifest does not record the
    settings says so ("not recorded"); a store without the examples has no row."""
    from sitegen.corpus_keys import interval_key
    from sitegen.services.neuroscope import stats

    html = (site / MODEL / "0" / "1.html").read_text()
    assert (
        "<dt>Across the activation range</dt><dd>sequences with a positive maximum, filed by that maximum's float32 "
        "exponent and top <code>2</code> mantissa bits (quarter-octave intervals, edges 2<sup>e</sup> × 1, 1.25, 1.5, "
        "1.75); the <code>8</code> highest intervals, from the one holding the neuron's largest sequence maximum down, "
        "kept one by one, every lower one as one more group; per group the <code>5</code> sequences with the smallest "
        "<code>corpus_keys.interval_key(seed, sequence id)</code>, seed <code>0</code> (ties to the lower id)</dd>"
    ) in html
    data = orjson.loads((site / "api" / MODEL / "neuroscope" / "0" / "1.json").read_bytes())
    assert data["metadata"]["provenance"]["interval_examples"] == {
        "interval_shift": stats.INTERVAL_SHIFT,
        "mantissa_bits": 23 - stats.INTERVAL_SHIFT,
        "interval_groups": stats.INTERVAL_GROUPS,
        "per_interval": stats.PER_INTERVAL,
        "key": "sitegen.corpus_keys.interval_key(seed, sequence id)",
    }
    seed = data["metadata"]["provenance"]["seed"]
    groups = [[t["data_index"] for t in g["texts"]] for g in data["data"]["interval_examples"]]
    assert sum(len(g) >= 2 for g in groups) >= 1, groups  # a group with an order to check
    for ids in groups:
        assert len(ids) <= stats.PER_INTERVAL
        assert ids == sorted(ids, key=lambda s: (interval_key(seed, s), s)), ids
    assert len(groups) <= stats.INTERVAL_GROUPS + 1

    store = write_synthetic_store(tmp_path / "store", name=MODEL)
    m = {k: v for k, v in store.manifest.items() if k not in ("schema_version", "sitegen_version")}
    m["stats"] = {k: v for k, v in m["stats"].items() if k in ("quantile_levels", "display_bins")}
    store.write_manifest(m)
    build_site([store.root], tmp_path / "site")
    html = (tmp_path / "site" / MODEL / "0" / "1.html").read_text()
    row = html[html.index("<dt>Across the activation range</dt>") :]
    row = row[: row.index("</dd>")]
    assert row.count('<span class="muted">not recorded</span>') == 3 and "seed <code>0</code>" in row
    api = orjson.loads((tmp_path / "site" / "api" / MODEL / "neuroscope" / "0" / "1.json").read_bytes())
    assert "interval_examples" not in api["metadata"]["provenance"]

    from sitegen.services.neuroscope.data import INTERVAL_SCHEMA

    for layer in range(2):  # the store's tables without the examples' columns
        store.write_layer(
            "neuroscope", layer, store.read_layer("neuroscope", layer).drop_columns(INTERVAL_SCHEMA.names)
        )
    build_site([store.root], tmp_path / "site2")
    html = (tmp_path / "site2" / MODEL / "0" / "1.html").read_text()
    assert "Across the activation range" not in html and '<details class="provenance"' in html
