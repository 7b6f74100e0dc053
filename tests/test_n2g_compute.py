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
    prompt = tuple(
        [tok.bos_token_id] + tok.encode("The nation shall trade with the world in peace", add_special_tokens=False)
    )
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
        acts = results[i * rows : (i + 1) * rows]
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
    from sitegen.services.artefacts import layer_artefacts
    from sitegen.services.neuron2graph.graph import IGNORE, normalise
    from sitegen.store import Store

    cfg = dict(
        model=str(tiny_model_dir),
        corpus=str(tiny_corpus),
        out=tmp_path / "store",
        tokens=1500,
        seq_len=16,
        seed=1,
        top_k=6,
        n_random=1,
        batch_size=8,
        device="cpu",
        progress=False,
        weights=False,
    )
    logs: list[str] = []
    run_compute(ComputeConfig(**cfg, options={"n2g": "2"}), log=logs.append)
    store = Store.open(tmp_path / "store")
    assert "neuron2graph" in store.manifest["services"]
    assert store.manifest["neuron2graph"]["replacement_source"] == "input-embedding nearest neighbours"
    first = {}
    for layer in range(3):
        t = store.read_layer("neuron2graph", layer).to_pylist()
        maxes = store.read_layer("neuroscope", layer, columns=["max"]).column("max").to_numpy()
        flagged = np.array([a is not None for a in layer_artefacts(store, layer)])  # artefact neurons come last
        assert [r["neuron"] for r in t] == sorted(np.lexsort((np.arange(len(maxes)), -maxes, flagged))[:2].tolist())
        for r in t:
            assert r["n_train"] + r["n_test"] == 6 and r["n_train"] == 3
            assert all(r[k] is None or 0 <= r[k] <= 1 for k in ("precision", "recall", "f1"))  # None: undefined
            assert r["variance_explained"] is None or r["variance_explained"] <= 1
            # F1's interval over the 3 held-out texts: none without an F1
            assert r["f1_ci"] is None or (r["f1"] is not None and 0 <= r["f1_ci"][0] <= r["f1_ci"][1] <= 1)
            assert all(normalise(x) == x for x in r["activating"] + r["important"])
            # filed by each node's own activation; a line's first token always fires
            assert all(n["activating"] == (n["activation"] > 0.5 and n["token"] != IGNORE) for n in r["nodes"])
            assert all(n["activating"] for n in r["nodes"] if n["depth"] == 0)
            assert set(r["activating"]) == {n["token"] for n in r["nodes"] if n["activating"] and n["token"] != IGNORE}
            assert set(r["important"]) == {
                n["token"] for n in r["nodes"] if not n["activating"] and n["token"] != IGNORE
            }
            assert all(n["parent"] < i for i, n in enumerate(r["nodes"]))  # breadth first: parents come first
        first[layer] = t
    assert sum(len(r["nodes"]) for t in first.values() for r in t) > 0, "every graph empty: nothing was exercised"
    assert any("graphs/min" in m for m in logs)
    # rerun on the finished store with a larger selection: old graphs kept as they were, one more per layer
    run_compute(ComputeConfig(**cfg, options={"n2g": "3"}), log=lambda m: None)
    store = Store.open(tmp_path / "store")
    for layer in range(3):
        t = store.read_layer("neuron2graph", layer).to_pylist()
        assert len(t) == 3
        assert [r for r in t if r["neuron"] in {x["neuron"] for x in first[layer]}] == first[layer]
    # a layer written by an older sitegen (nodes without their own activation) is refused, not mixed in
    import pyarrow as pa

    current = store.read_layer("neuron2graph", 1)
    old_node = pa.struct(
        [
            (k, current.schema.field("nodes").type.value_type.field(k).type)
            for k in ("token", "depth", "value", "end", "parent")
        ]
    )
    stale = current.set_column(
        current.schema.get_field_index("nodes"),
        pa.field("nodes", pa.list_(old_node)),
        pa.array(
            [[{k: n[k] for k in old_node.names} for n in r] for r in current.column("nodes").to_pylist()],
            pa.list_(old_node),
        ),
    )
    store.write_layer("neuron2graph", 1, stale)
    # The table no longer has the declared node type: refused at open in one line (nothing mixed in).
    from sitegen.errors import StoreError

    with pytest.raises(StoreError, match=r"neuron2graph/layer=1/data.parquet: damaged table, column 'nodes' holds"):
        run_compute(ComputeConfig(**cfg, options={"n2g": "3"}), log=logs.append)


def test_n2g_options_are_checked_before_any_work(tmp_path):
    from sitegen.compute.runner import ComputeConfig
    from sitegen.errors import ConfigError

    with pytest.raises(ConfigError, match="--n2g some"):
        ComputeConfig(options={"n2g": "some"}).validate()
    with pytest.raises(ConfigError, match="merge the shards first"):
        ComputeConfig(options={"n2g": "2"}, shard=(0, 2)).validate()


def test_interrupted_n2g_keeps_finished_layers(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    from sitegen.compute.runner import ComputeConfig, run_compute
    from sitegen.errors import StoreError
    from sitegen.services.neuron2graph import compute as n2g
    from sitegen.store import Store

    cfg = dict(
        model=str(tiny_model_dir),
        corpus=str(tiny_corpus),
        out=tmp_path / "store",
        tokens=800,
        seq_len=16,
        seed=2,
        top_k=4,
        n_random=1,
        batch_size=8,
        device="cpu",
        progress=False,
        weights=False,
    )
    run_compute(ComputeConfig(**cfg), log=lambda m: None)
    real = n2g.build_layer

    def interrupted(model, store, layer, *args, **kw):
        if layer == 1:
            raise KeyboardInterrupt
        return real(model, store, layer, *args, **kw)

    monkeypatch.setattr(n2g, "build_layer", interrupted)
    with pytest.raises(StoreError, match="keeps every finished layer"):
        run_compute(ComputeConfig(**cfg, options={"n2g": "1"}), log=lambda m: None)
    store = Store.open(tmp_path / "store")
    assert "neuron2graph" in store.manifest["services"]
    assert store.layer_path("neuron2graph", 0).exists() and not store.layer_path("neuron2graph", 1).exists()
    layer0 = store.layer_path("neuron2graph", 0).read_bytes()
    monkeypatch.setattr(n2g, "build_layer", real)
    run_compute(ComputeConfig(**cfg, options={"n2g": "1"}), log=lambda m: None)
    store = Store.open(tmp_path / "store")
    assert all(store.layer_path("neuron2graph", layer).exists() for layer in range(3))
    assert store.layer_path("neuron2graph", 0).read_bytes() == layer0  # finished work not redone


def test_prune_windows_are_k_tokens_including_the_peak():
    """The reference's candidates are the last k tokens up to and including the peak, k = 5, 10,
    ..., 30, then the whole prefix when shorter: for a peak at 20 after a BOS, 5, 10, 15 and 20
    tokens (the last is the whole prefix, tokens 1..20), each with the BOS prepended."""
    from sitegen.services.neuron2graph.compute import prune_candidates

    tokens = np.arange(100, 140)
    cands = prune_candidates(tokens, 20, bos=7)
    assert [len(c) - 1 for c in cands] == [5, 10, 15, 20]
    assert all(c[0] == 7 and c[-1] == 120 for c in cands)  # BOS first, the peak last
    assert cands[0][1:] == (116, 117, 118, 119, 120)
    assert cands[-1][1:] == tuple(range(101, 121))  # the whole prefix after the BOS
    # no BOS: position 0 is a real token, so the whole prefix (21 tokens) comes after k = 20
    assert [len(c) for c in prune_candidates(tokens, 20, bos=None)] == [5, 10, 15, 20, 21]
    # a late peak: six windows, the longest 30 tokens
    assert [len(c) - 1 for c in prune_candidates(tokens, 35, bos=7)] == [5, 10, 15, 20, 25, 30]


def test_without_bos_position_0_is_masked_too():
    """A model with no BOS token has a real token at position 0: saliency masks it as well, and its
    importance row is computed (with a BOS, position 0 is never masked)."""
    from sitegen.services.neuron2graph.compute import importance, masked_copies

    tokens = (5, 6, 7)
    assert masked_copies(tokens, 2, 9, first=0) == [(9, 6, 7), (5, 9, 7), (5, 6, 9)]
    assert masked_copies(tokens, 2, 9, first=1) == [(5, 9, 7), (5, 6, 9)]
    base = np.array([1.0, 2.0, 4.0])
    masked = [np.array([0.5, 1.0, 1.0]), np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 2.0])]
    imp = importance(base, masked, first=0)
    np.testing.assert_allclose(imp, [[0.5, 0.5, 0.75], [0, 0, 0.25], [0, 0, 0.5]])
    np.testing.assert_allclose(importance(base, masked[1:], first=1), [[0, 0, 0], [0, 0, 0.25], [0, 0, 0.5]])


@pytest.fixture(scope="module")
def relu_model_dir(tiny_model_dir, tmp_path_factory):
    """A tiny random-init GPT-2-style model with a plain ReLU MLP (activations exactly 0.0 where a
    neuron does not fire) and negative first-layer biases on most neurons, so that many neurons'
    top texts include texts where they never fire; the tiny model's tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_inner=48,
        n_layer=2,
        n_head=4,
        n_positions=128,
        activation_function="relu",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.bias.copy_(
                torch.linspace(-0.45, 0.0, 48)
            )  # pre-activations have std ~0.1: from rarely to often firing
    out = tmp_path_factory.mktemp("relu-model") / "tiny-relu-gpt2"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_relu_model_with_exact_zero_texts(relu_model_dir, tiny_corpus, tmp_path, monkeypatch):
    """Train texts whose maximum is exactly 0.0 (a ReLU neuron that never fires there) are dropped
    as DeepDecipher's fork does, instead of dividing by zero; every neuron of a layer gets its
    graph (or none when it never fires at all); undefined figures are stored as null."""
    from sitegen.compute.runner import ComputeConfig, run_compute
    from sitegen.services.neuron2graph.compute import _split
    from sitegen.store import Store

    cfg = dict(
        model=str(relu_model_dir),
        corpus=str(tiny_corpus),
        out=tmp_path / "store",
        tokens=1200,
        seq_len=16,
        seed=1,
        top_k=6,
        n_random=1,
        batch_size=8,
        device="cpu",
        progress=False,
        weights=False,
    )
    run_compute(ComputeConfig(**cfg, options={"n2g": "layers:0"}), log=lambda m: None)
    store = Store.open(tmp_path / "store")
    scope = store.read_layer("neuroscope", 0, columns=["neuron", "top_acts"]).to_pylist()
    graphs = {r["neuron"]: r for r in store.read_layer("neuron2graph", 0).to_pylist()}
    first = store.manifest["config"]["first_valid_position"]
    zero_texts = dropped = 0
    for row in scope:
        maxes = [max(a[first:]) for a in row["top_acts"]]
        zero_texts += sum(m == 0.0 for m in maxes)
        if max(maxes) <= 0:
            assert row["neuron"] not in graphs  # never fires: no graph
            continue
        r = graphs[row["neuron"]]
        train, _ = _split(len(maxes), 0, 0, row["neuron"])
        kept = sum(maxes[i] > 0 for i in train)
        dropped += len(train) - kept
        assert r["n_train"] == kept
        for key in ("precision", "recall", "f1"):
            assert r[key] is None or 0 <= r[key] <= 1
        assert r["variance_explained"] is None or -1e6 < r["variance_explained"] <= 1
    assert zero_texts > 0 and dropped > 0, "no text with an exact-zero maximum: the case was not exercised"

    # saliency cut after the last position read: recomputing with full masked copies (every
    # position masked, the whole prompt kept) changes no stored value
    from sitegen.compute.models import load_model
    from sitegen.services.neuron2graph import compute as n2g

    model = load_model(str(relu_model_dir), device="cpu")
    real = n2g.masked_copies
    monkeypatch.setattr(
        n2g, "masked_copies", lambda tokens, upto, neutral, first=1: real(tokens, len(tokens) - 1, neutral, first)
    )
    some = sorted(graphs)[::4]
    full, _ = n2g.build_layer(model, store, 0, some, n2g.N2GConfig(seed=1), n2g.ModelTokens.prepare(model, store))
    assert full.to_pylist() == [graphs[n] for n in some]
    assert sum(r["n_lines"] for r in full.to_pylist()) > 0


def test_every_compute_stage_reports_progress(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    """Each stage of `sitegen compute` says it is running and shows done/total with a rate and ETA:
    the corpus pass (tokens), the weight-based tables (layers) and the graphs (every graph to make)."""
    import re

    from sitegen.compute.runner import ComputeConfig, run_compute

    logs: list[str] = []
    run_compute(
        ComputeConfig(
            model=str(tiny_model_dir),
            corpus=str(tiny_corpus),
            out=tmp_path / "store",
            tokens=600,
            seq_len=16,
            seed=1,
            top_k=4,
            n_random=1,
            batch_size=8,
            device="cpu",
            progress=True,
            options={"n2g": "2"},
        ),
        log=logs.append,
    )
    err = capsys.readouterr().err
    assert any(line.startswith("corpus pass: ") and " tokens, 3 layers" in line for line in logs), logs
    assert re.search(r"corpus pass: 100%.*\d+/\d+", err), err
    assert "computing logits from the weights" in logs
    assert re.search(r"logits from the weights: 100%.* 3/3 ", err), err
    assert re.search(r"neuron2graph graphs: 100%.* 6/6 ", err), err  # 2 graphs in each of 3 layers, one bar over all


def test_similar_lists_are_not_flat_on_a_real_model_store(tiny_model_dir, tiny_corpus, tmp_path):
    """On a store computed from a model (the tiny one, on its own pseudo-English corpus of ~35
    words, where neurons share tokens all the time): at most 5% of neurons list five or more
    similar neurons all at 1.00, and a neuron with a single token is 1.00-similar to nobody."""
    from sitegen.compute.runner import ComputeConfig, run_compute
    from sitegen.services.neuron2graph.tokenstore import build_token_store, flat_share, similar_neurons
    from sitegen.store import Store

    cfg = dict(
        model=str(tiny_model_dir),
        corpus=str(tiny_corpus),
        out=tmp_path / "store",
        tokens=1500,
        seq_len=16,
        seed=1,
        top_k=20,
        n_random=1,
        batch_size=8,
        device="cpu",
        progress=False,
        weights=False,
    )
    run_compute(ComputeConfig(**cfg, options={"n2g": "2"}), log=lambda m: None)
    ts = build_token_store(Store.open(tmp_path / "store"), first_valid=1)
    sim = similar_neurons(ts)
    assert flat_share(sim) <= 0.05
    assert sum(map(len, sim.lists)) > 2 * ts.n_neurons  # neurons do have neighbours
    one_token = [i for i in range(ts.n_neurons) if len(sim.activating[i]) == 1 and not len(sim.important[i])]
    assert one_token and all(s < 1.0 for i in one_token for _, s, _ in sim.lists[i])


@pytest.fixture(scope="module")
def tiny_store(tiny_model_dir, tiny_corpus, tmp_path_factory):
    from sitegen.compute.runner import ComputeConfig, run_compute

    out = tmp_path_factory.mktemp("n2g-fast") / "store"
    run_compute(
        ComputeConfig(
            model=str(tiny_model_dir),
            corpus=str(tiny_corpus),
            out=out,
            tokens=3000,
            seq_len=24,
            seed=3,
            top_k=12,
            n_random=1,
            batch_size=8,
            device="cpu",
            progress=False,
            weights=False,
        ),
        log=lambda m: None,
    )
    return out


def _ipc(table) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def test_fast_path_graphs_are_byte_identical_to_the_reference_path(tiny, tiny_store):
    """The fast path (least-cost batches, prompts reused across stages, no saliency pass for a
    variant that fires only before its replaced token) writes the same bytes as the reference path
    for a sample of every layer, runs fewer tokens, and its skip and reuse rules do fire. A skipped
    variant's borrowed importance is also checked against its own masked copies wherever its lines
    read it (the trie keeps the first of equal paths, so the graph alone could hide a wrong one)."""
    from sitegen.services.neuron2graph import compute as n2g
    from sitegen.store import Store

    store = Store.open(tiny_store)
    mt = n2g.ModelTokens.prepare(tiny, store)
    skipped = reused = checked = 0
    for layer in range(3):
        neurons = list(range(0, tiny.d_mlp, 3))
        logs: list[str] = []
        fast, fast_tokens = n2g.build_layer(tiny, store, layer, neurons, n2g.N2GConfig(), mt, logs.append)
        ref, ref_tokens = n2g.build_layer(tiny, store, layer, neurons, n2g.N2GConfig(reference=True), mt)
        assert fast.num_rows > 5 and sum(r["n_lines"] for r in fast.to_pylist()) > 0
        assert _ipc(fast) == _ipc(ref), f"layer {layer}: a graph changed"
        assert fast_tokens < ref_tokens
        skipped += int(logs[-1].split(" variant saliency")[0].rsplit(" ", 1)[1])
        reused += int(logs[-1].split(" prompts reused")[0].rsplit(" ", 1)[1])

        # each skipped variant: its borrowed importance equals its own masked copies' where lines read it
        cfg = n2g.N2GConfig()
        work = n2g._neuron_work(store, layer, neurons, cfg, 1)
        fwd = n2g.LayerForward(tiny, layer, cfg.token_budget, mt.neutral)
        n2g._prune(fwd, work, mt, 1)
        for group in n2g._groups(fwd, work, mt, cfg, 1):
            for v in group.variants:
                if v.importance is not group.original.importance:
                    continue
                firing = [i for i in range(1, len(v.tokens)) if v.norm[i] > n2g.ACTIVATING_FOR_LINE]
                upto = firing[-1]
                acts = fwd.run([(v.tokens, group.work.neuron)])[0]
                copies = fwd.run([(c, group.work.neuron) for c in n2g.masked_copies(v.tokens, upto, mt.neutral)])
                own = n2g.importance(acts, copies)
                for i in firing:
                    np.testing.assert_allclose(v.importance[1 : i + 1, i], own[1 : i + 1, i], atol=1e-4)
                checked += 1
    assert skipped > 0, "no variant fired only before its replacement: the skip was not exercised"
    assert reused > 0, "no prompt was reused across stages"
    assert checked == skipped


def test_least_cost_batches_cover_every_prompt_within_the_budget():
    """_batches splits prompts sorted by length into contiguous spans, each within the budget once
    padded to its longest (a longer prompt alone), at no more cost (padded tokens plus the per-call
    overhead) than the greedy split, and less where greedy pads short prompts to a long one."""
    from sitegen.services.neuron2graph.compute import CALL_OVERHEAD_TOKENS, _batches, _greedy_batches

    def cost(lengths, spans):
        return sum(CALL_OVERHEAD_TOKENS + (stop - start) * lengths[stop - 1] for start, stop in spans)

    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = sorted(rng.integers(2, 40, size=int(rng.integers(1, 300))).tolist())
        budget = int(rng.choice([64, 512, 4096]))
        spans = _batches(lengths, budget)
        assert [s for s, _ in spans] == [0] + [stop for _, stop in spans[:-1]] and spans[-1][1] == len(lengths)
        assert all(
            stop > start and (stop - start == 1 or (stop - start) * lengths[stop - 1] <= budget)
            for start, stop in spans
        )
        assert cost(lengths, spans) <= cost(lengths, _greedy_batches(lengths, budget))
    lengths = [5] * 60 + [40] * 10  # greedy pads 60 short prompts with 10 long ones in one batch
    assert cost(lengths, _batches(lengths, 4096)) < cost(lengths, _greedy_batches(lengths, 4096))
    assert _batches(lengths, 4096) == [(0, 60), (60, 70)]
    assert _batches([50, 60], 40) == [(0, 1), (1, 2)]  # longer than the budget: alone
