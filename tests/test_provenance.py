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
