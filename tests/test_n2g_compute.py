"""Neuron2Graph's model half on the tiny random-init model: batched saliency against a direct
masked computation, and the --n2g stage end to end (selection, resume, evaluation ranges)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import HAS_TORCH

pytestmark = [pytest.mark.model, pytest.mark.skipif(not HAS_TORCH, reason="needs the compute extra")]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from sitegen.compute.models import load_model

    return load_model(str(tiny_model_dir), device="cpu")


def _direct(model, tokens: list[int], layer: int) -> np.ndarray:
    """All neurons' activations at every position of one unpadded prompt, run alone."""
    import torch

    name = model.hook_name(layer)
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(torch.tensor([tokens]), names_filter=lambda n: n == name)
    return cache[name][0].float().numpy()


def test_batched_saliency_equals_direct_masked_computation(tiny):
    from sitegen.services.neuron2graph.compute import LayerForward, importance, masked_copies, neutral_token

    tok = tiny.tokenizer
    prompt = tuple([tok.bos_token_id] + tok.encode("The nation shall trade with the world in peace", add_special_tokens=False))
    neutral = neutral_token(tok)
    layer = 1
    direct_base = _direct(tiny, list(prompt), layer)
    neurons = [int(n) for n in np.argsort(-direct_base[1:].max(0))[:4]]  # neurons that fire somewhere here
    upto = len(prompt) - 1
    fwd = LayerForward(tiny, layer, token_budget=64, pad_id=neutral)  # small budget: several padded batches
    requests = [(r, n) for n in neurons for r in [prompt] + masked_copies(prompt, upto, neutral)]
    results = fwd.run(requests)
    rows = len(prompt)
    for i, n in enumerate(neurons):
        acts = results[i * rows:(i + 1) * rows]
        got = importance(acts[0], acts[1:])
        base = direct_base[:, n]
        want = np.zeros_like(got)
        for k in range(1, len(prompt)):
            masked = list(prompt)
            masked[k] = neutral
            a = _direct(tiny, masked, layer)[:, n]
            want[k] = np.where(base > 0, 1 - a / np.where(base > 0, base, 1), 0)
        np.testing.assert_allclose(got, want, atol=2e-4, err_msg=f"neuron {n}")
        assert np.abs(got).max() > 0.05, "a vacuous comparison: nothing mattered"
        # causality: masking k never changes positions before k
        assert np.allclose(np.tril(got, -1).T[np.triu_indices(len(prompt), 1)], 0, atol=2e-4)


def test_n2g_stage_selects_resumes_and_evaluates(tiny_model_dir, tiny_corpus, tmp_path):
    from sitegen.compute.runner import ComputeConfig, run_compute
    from sitegen.services.neuron2graph.graph import normalise
    from sitegen.store import Store

    cfg = dict(model=str(tiny_model_dir), corpus=str(tiny_corpus), out=tmp_path / "store", tokens=1500, seq_len=16, seed=1, top_k=6,
               n_random=1, batch_size=8, device="cpu", progress=False, weights=False)
    logs: list[str] = []
    run_compute(ComputeConfig(**cfg, n2g="2"), log=logs.append)
    store = Store.open(tmp_path / "store")
    assert "neuron2graph" in store.manifest["services"]
    assert store.manifest["neuron2graph"]["replacement_source"] == "input-embedding nearest neighbours"
    first = {}
    for layer in range(3):
        t = store.read_layer("neuron2graph", layer).to_pylist()
        maxes = store.read_layer("neuroscope", layer, columns=["max"]).column("max").to_numpy()
        assert [r["neuron"] for r in t] == sorted(np.lexsort((np.arange(len(maxes)), -maxes))[:2].tolist())
        for r in t:
            assert r["n_train"] + r["n_test"] == 6 and r["n_train"] == 3
            assert all(0 <= r[k] <= 1 for k in ("precision", "recall", "f1"))
            assert r["variance_explained"] <= 1
            assert all(normalise(x) == x for x in r["activating"] + r["important"])
            depth0 = {n["token"] for n in r["nodes"] if n["depth"] == 0}
            assert set(r["activating"]) == depth0
            assert all(n["parent"] < i for i, n in enumerate(r["nodes"]))  # breadth first: parents come first
        first[layer] = t
    assert sum(len(r["nodes"]) for t in first.values() for r in t) > 0, "every graph empty: nothing was exercised"
    assert any("graphs/min" in m for m in logs)
    # rerun on the finished store with a larger selection: old graphs kept as they were, one more per layer
    run_compute(ComputeConfig(**cfg, n2g="3"), log=lambda m: None)
    store = Store.open(tmp_path / "store")
    for layer in range(3):
        t = store.read_layer("neuron2graph", layer).to_pylist()
        assert len(t) == 3
        assert [r for r in t if r["neuron"] in {x["neuron"] for x in first[layer]}] == first[layer]


def test_n2g_options_are_checked_before_any_work(tmp_path):
    from sitegen.compute.runner import ComputeConfig
    from sitegen.errors import ConfigError

    with pytest.raises(ConfigError, match="--n2g some"):
        ComputeConfig(n2g="some").validate()
    with pytest.raises(ConfigError, match="merge the shards first"):
        ComputeConfig(n2g="2", shard=(0, 2)).validate()


def test_interrupted_n2g_keeps_finished_layers(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    from sitegen.compute.runner import ComputeConfig, run_compute
    from sitegen.errors import StoreError
    from sitegen.services.neuron2graph import compute as n2g
    from sitegen.store import Store

    cfg = dict(model=str(tiny_model_dir), corpus=str(tiny_corpus), out=tmp_path / "store", tokens=800, seq_len=16, seed=2, top_k=4,
               n_random=1, batch_size=8, device="cpu", progress=False, weights=False)
    run_compute(ComputeConfig(**cfg), log=lambda m: None)
    real = n2g.build_layer

    def interrupted(model, store, layer, *args, **kw):
        if layer == 1:
            raise KeyboardInterrupt
        return real(model, store, layer, *args, **kw)

    monkeypatch.setattr(n2g, "build_layer", interrupted)
    with pytest.raises(StoreError, match="keeps every finished layer"):
        run_compute(ComputeConfig(**cfg, n2g="1"), log=lambda m: None)
    store = Store.open(tmp_path / "store")
    assert "neuron2graph" in store.manifest["services"]
    assert store.layer_path("neuron2graph", 0).exists() and not store.layer_path("neuron2graph", 1).exists()
    layer0 = store.layer_path("neuron2graph", 0).read_bytes()
    monkeypatch.setattr(n2g, "build_layer", real)
    run_compute(ComputeConfig(**cfg, n2g="1"), log=lambda m: None)
    store = Store.open(tmp_path / "store")
    assert all(store.layer_path("neuron2graph", layer).exists() for layer in range(3))
    assert store.layer_path("neuron2graph", 0).read_bytes() == layer0  # finished work not redone
