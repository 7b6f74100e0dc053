"""Neuron2Graph's trie, prediction and evaluation on hand-built cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from sitegen.services.neuron2graph.graph import IGNORE, Trie, evaluate, evaluate_texts, normalise


def test_normalise():
    assert normalise("The") == "the" and normalise(" cat") == "cat" and normalise(" The") == "the"
    assert normalise("I") == "I" and normalise(" ,") == " ," and normalise("USA") == "USA" and normalise("\n") == "\n"


def test_context_is_required():
    t = Trie()
    t.insert([("cat", 1.0, 1.0), ("the", 0.9, 0.0)], 1.0)
    assert t.predict(["a", "the", "cat"]) == [0, 0, 1.0]
    assert t.predict(["a", "cat"]) == [0, 0]  # 'cat' alone does not end a line
    assert t.predict(["The", " Cat"]) == [0, 1.0]  # normalised keys


def test_longest_match_wins():
    t = Trie()
    t.insert([("cat", 0.6, 0.6)], 0.6)
    t.insert([("cat", 1.0, 1.0), ("the", 0.8, 0.0)], 1.0)
    assert t.predict(["the", "cat"]) == [0, 1.0]
    assert t.predict(["a", "cat"]) == [0, 0.6]


def test_ignore_matches_any_token_but_needs_one():
    t = Trie()
    t.insert([("cat", 1.0, 1.0), (IGNORE, 0.0, 0.0), ("the", 0.9, 0.0)], 1.0)
    t.merge_ignore()
    assert t.predict(["the", "big", "cat"])[2] == 1.0
    assert t.predict(["the", "cat"])[1] == 0.0


def test_no_backtracking():
    t = Trie()
    t.insert([("cat", 0.6, 0.6), ("big", 0.9, 0.0)], 0.6)
    t.insert([("cat", 1.0, 1.0), (IGNORE, 0.0, 0.0), ("the", 0.9, 0.0)], 1.0)
    t.merge_ignore()
    # 'big' is an exact child that ends a line, so the walk takes it and stops there:
    # the IGNORE path that would have reached 'the' (1.0) is not tried.
    assert t.predict(["the", "big", "cat"])[2] == 0.6
    assert t.predict(["the", "red", "cat"])[2] == 1.0


def test_ignore_merging_copies_sibling_paths_and_drops_non_ending_siblings():
    t = Trie()
    t.insert([("cat", 0.8, 0.8), ("small", 0.9, 0.0), ("a", 0.9, 0.0)], 0.8)
    t.insert([("cat", 1.0, 1.0), (IGNORE, 0.0, 0.0), ("the", 0.9, 0.0)], 1.0)
    t.merge_ignore()
    cat = t.root.children["cat"]
    assert set(cat.children) == {IGNORE}  # 'small' ended no line: dropped, its path lives under IGNORE
    assert set(cat.children[IGNORE].children) == {"the", "a"}
    assert t.predict(["a", "small", "cat"])[2] == 0.8
    assert t.predict(["a", "big", "cat"])[2] == 0.8  # generalised through IGNORE
    assert cat.value == 0.8  # the first insertion's value is kept


def test_evaluate_hand_computed():
    pred = [0.0, 0.9, 0.6, 0.0, 0.7]
    true = [0.0, 1.0, 0.2, 0.8, 0.6]
    m = evaluate(pred, true)
    # predicted firing: 1, 2, 4; truly firing: 1, 3, 4; both: 1, 4
    assert (
        m["precision"] == pytest.approx(2 / 3)
        and m["recall"] == pytest.approx(2 / 3)
        and m["f1"] == pytest.approx(2 / 3)
    )
    mean = sum(true) / 5
    var = sum((t - mean) ** 2 for t in true) / 5
    mse = sum((p - t) ** 2 for p, t in zip(pred, true)) / 5
    assert m["variance_explained"] == pytest.approx(1 - mse / var)


def test_f1_interval_is_a_bootstrap_over_the_held_out_texts():
    """evaluate_texts pools the texts for every figure (as evaluate on their concatenation) and
    gives F1 the percentile interval of 1,000 resamples of the texts, seeded: equal to a plain loop
    that resamples with the same draws and re-evaluates each resample; a resample in which nothing
    fires is left out."""
    rng = np.random.default_rng(3)
    texts = []
    for _ in range(9):
        n = int(rng.integers(3, 9))
        true = rng.uniform(0, 1, n).round(2).tolist()
        pred = [t if rng.random() < 0.7 else 1 - t for t in true]
        texts.append((pred, true))
    texts.append(([0.9, 0.0], [0.1, 0.2]))  # a text that never fires: some resamples hold only such texts
    m = evaluate_texts(texts)
    pooled = evaluate([p for pred, _ in texts for p in pred], [t for _, true in texts for t in true])
    assert {k: m[k] for k in pooled} == pooled

    draws = np.random.default_rng(0).integers(0, len(texts), size=(1000, len(texts)))
    scores = []
    for row in draws:
        f1 = evaluate([p for i in row for p in texts[i][0]], [t for i in row for t in texts[i][1]])["f1"]
        if f1 is not None:
            scores.append(f1)
    lo, hi = np.quantile(scores, [0.025, 0.975])
    assert m["f1_ci"] == [round(lo, 4), round(hi, 4)]
    assert m["f1_ci"][0] < m["f1"] < m["f1_ci"][1]
    assert evaluate_texts(texts) == m  # seeded: the same figures again

    same = [([0.9, 0.1], [0.8, 0.6])] * 6  # every text alike: no spread to resample
    assert evaluate_texts(same)["f1_ci"] == [round(evaluate_texts(same)["f1"], 4)] * 2
    assert evaluate_texts([([0.9], [0.1])] * 4)["f1_ci"] is None  # nothing fires: F1 undefined, no interval


def test_evaluate_never_scores_an_empty_denominator():
    """A metric whose denominator is empty is undefined (None), never a perfect 1.0, and variance
    explained on a constant truth is None, not 1 - mse / (float noise) ~ -5e31."""
    # an empty graph predicts nothing: on held-out texts that fire, precision is undefined and the
    # graph scores recall 0 and F1 0
    m = evaluate(Trie().predict(["a", "b", "c"]), [0.2, 0.9, 0.1])
    assert m["precision"] is None and m["recall"] == 0.0 and m["f1"] == 0.0
    # held-out texts that never reach half the maximum: not evaluated
    for truth in ([0.2, 0.3], [0.1] * 3, [0.3] * 10, [0.0] * 4):
        for pred in ([0.0] * len(truth), [0.9] + [0.0] * (len(truth) - 1)):
            m = evaluate(pred, truth)
            assert m["recall"] is None and m["f1"] is None, (pred, truth)
            assert all(v is None or -1e6 < v < 1.0 for v in m.values()), m  # never a vacuous 1.0 nor -1e31
            assert m["precision"] == (0.0 if pred[0] else None)
    # a constant truth (as a float sum leaves it: var ~ 1e-33, not 0) has no variance to explain
    for truth in ([0.1] * 3, [0.7] * 10, [0.3] * 10):
        assert evaluate([0.0] * len(truth), truth)["variance_explained"] is None
    assert evaluate([], [])["variance_explained"] is None


def test_lines_keep_important_context_and_wildcard_the_rest():
    """Step 4 on a hand-made prompt: the token at 3 fires (0.9); masking 1 matters for it (0.8),
    masking 2 does not (0.1): the line is ' c' <- IGNORE <- ' a', ended with 0.9. Position 2
    fires too (0.6) with no important context: a one-token line. Every element carries the
    token's own activation (which files it activating or important)."""
    import numpy as np

    from sitegen.services.neuron2graph.compute import important_sets, make_lines

    vocab = ["<bos>", " a", " b", " c"]
    tokens = (0, 1, 2, 3)
    norm = np.array([0.0, 0.1, 0.6, 0.9])
    imp = np.zeros((4, 4))
    imp[1, 3], imp[2, 3], imp[3, 3] = 0.8, 0.1, 1.0
    lines = make_lines(vocab, tokens, norm, imp, None, first=1)
    assert lines == [([(" b", 0.6, 0.6)], 0.6), ([(" c", 0.9, 0.9), (IGNORE, 0.1, 0.6), (" a", 0.8, 0.1)], 0.9)]
    sets = important_sets(norm, imp, first=1)
    assert sets == [set(), set(), set(), {1, 3}]
    # a variant keeps context that was important in the original (the set) even if not in itself
    imp_variant = np.zeros((4, 4))
    assert make_lines(vocab, tokens, norm, imp_variant, sets, first=1)[1] == (
        [(" c", 0.9, 0.9), (IGNORE, 0.0, 0.6), (" a", 0.0, 0.1)],
        0.9,
    )


def test_tokens_are_filed_by_their_own_activation_not_their_depth():
    """The reference files a node 'activating' when its own activation is > 0.5, whatever its
    depth: a context token that itself fires is activating; a line's first token always is."""
    t = Trie()
    t.insert([(" cat", 0.9, 0.9), (" big", 0.8, 0.7), (" the", 0.95, 0.1)], 0.9)
    t.merge_ignore()
    assert t.token_sets() == ({"cat", "big"}, {"the"})


# -- differential test against a port of the reference NeuronModel (tests/n2g_reference.py) ----

_VOCAB = [
    "<|endoftext|>",
    " the",
    "The",
    "the",
    " The",
    " cat",
    "Cat",
    " cats",
    "a",
    " A",
    "A",
    ",",
    ".",
    "\n",
    " dog",
    "Dog",
    "I",
    " I",
    " big",
    "Big",
    " of",
    "Of",
    " USA",
]


def _random_group(rng, first: int):
    """One pruned prompt and its variants as (token ids, normalised activations, importance), with
    the masked-token causality of real saliency (I[k, j] = 0 for k > j, rows before `first` = 0).
    Values are drawn so that the thresholds' exact values (0.5, 0.75) occur too."""
    import numpy as np

    def prompt(length):
        tokens = (0,) + tuple(int(t) for t in rng.integers(1, len(_VOCAB), length - 1))
        pick = rng.integers(0, 6, length)
        norm = np.round(np.where(pick == 0, 0.5, rng.uniform(-0.2, 1.2, length)), 3)
        pick = rng.integers(0, 6, (length, length))
        imp = np.where(pick == 0, 0.75, np.where(pick == 1, 0.8, rng.uniform(-0.3, 1.0, (length, length))))
        imp = np.triu(imp)  # causal: masking k changes nothing before k
        imp[:first] = 0
        return tokens, norm, imp

    length = int(rng.integers(2, 11))
    original = prompt(length)
    variants = []
    for _ in range(int(rng.integers(0, 4))):
        if rng.random() < 0.8:  # as augmentation does: one token replaced, the rest kept
            tokens, norm, imp = prompt(length)
            k = int(rng.integers(first, length))
            tokens = original[0][:k] + (tokens[k],) + original[0][k + 1 :]
            variants.append((tokens, norm, imp))
        else:  # a variant of another length (the reference then borrows the original's last set)
            variants.append(prompt(int(rng.integers(2, 13))))
    return original, variants


def test_graph_matches_the_reference_neuron_model_on_random_graphs():
    """Thousands of seeded random graphs through sitegen's lines -> trie -> IGNORE merging ->
    prediction and through the reference port: the same predictions, END values and
    activating / important token sets, with 0 mismatches."""
    import numpy as np

    from sitegen.services.neuron2graph.compute import group_lines
    from tests.n2g_reference import IGNORE as REF_IGNORE
    from tests.n2g_reference import ReferenceNeuronModel

    first = 1
    graphs = 2000
    checked = {"predictions": 0, "ends": 0, "tokens": 0, "firing predictions": 0, "context activating": 0}
    for seed in range(graphs):
        rng = np.random.default_rng(seed)
        groups = [_random_group(rng, first) for _ in range(int(rng.integers(1, 4)))]
        trie = Trie()
        for original, variants in groups:
            for line, act in group_lines(_VOCAB, original, variants, first):
                trie.insert(line, act)
        trie.merge_ignore()
        ref = ReferenceNeuronModel()
        ref.fit(
            [
                [
                    (imp, [(_VOCAB[t], float(a)) for t, a in zip(tokens, norm)])
                    for tokens, norm, imp in [original] + variants
                ]
                for original, variants in groups
            ]
        )

        # END values: every path that ends a line (the reference's END child of the root, made by
        # a firing BOS, is never read by its search: left out)
        ours_ends = {}
        for path, node in _paths(trie.root, ()):
            if node.end is not None:  # (the two spell the wildcard differently)
                ours_ends[tuple(REF_IGNORE if k == IGNORE else k for k in path)] = node.end
        ref_ends = {p: v for p, v in ref.end_values().items() if p}
        assert ours_ends == ref_ends, f"seed {seed}: END values differ"
        checked["ends"] += len(ours_ends)

        assert trie.token_sets() == ref.token_sets(), f"seed {seed}: token sets differ"
        checked["tokens"] += sum(map(len, trie.token_sets()))
        checked["context activating"] += any(n.activating and n.depth > 0 and n.token != IGNORE for n in trie.nodes())

        texts = [
            [_VOCAB[t] for t in tokens[first:]]
            for original, variants in groups
            for tokens, _, _ in [original] + variants
        ]
        texts += [[_VOCAB[int(t)] for t in rng.integers(1, len(_VOCAB), int(rng.integers(1, 15)))] for _ in range(3)]
        for text in texts:
            ours, theirs = trie.predict(text), ref.forward(text)
            assert ours == theirs, f"seed {seed}: predictions differ on {text}"
            checked["predictions"] += len(ours)
            checked["firing predictions"] += sum(p > 0.5 for p in ours)
    # the comparison is not vacuous: lines, predictions that fire, and context tokens filed activating
    assert (
        checked["ends"] > graphs
        and checked["firing predictions"] > graphs
        and checked["context activating"] > graphs // 10
    ), checked


def test_deepdeciphers_fork_files_other_tokens_and_the_readme_says_so():
    """The fork port (no normalisation, important sets at every position) gives other token sets
    than the script sitegen follows on most random graphs with a case-varied vocabulary, and the
    docs/methods.md states both differences."""
    from pathlib import Path

    import numpy as np

    from sitegen.services.neuron2graph.compute import group_lines
    from tests.n2g_reference import ForkNeuronModel, ReferenceNeuronModel

    class _SetsOnly(ForkNeuronModel):  # the fork's every-position sets, the script's keys
        key = staticmethod(normalise)

    class _KeysOnly(ReferenceNeuronModel):  # the script's sets, the fork's raw keys
        key = staticmethod(lambda token: token)

    first, graphs, same = 1, 300, 0
    differs = {"fork's sets only": 0, "fork's keys only": 0}  # each difference alone changes graphs
    for seed in range(graphs):
        rng = np.random.default_rng(seed)
        groups = [_random_group(rng, first) for _ in range(int(rng.integers(1, 4)))]
        fit = [
            [
                (imp, [(_VOCAB[t], float(a)) for t, a in zip(tokens, norm)])
                for tokens, norm, imp in [original] + variants
            ]
            for original, variants in groups
        ]
        trie = Trie()
        for original, variants in groups:
            for line, act in group_lines(_VOCAB, original, variants, first):
                trie.insert(line, act)
        trie.merge_ignore()
        models = {
            "fork": ForkNeuronModel(),
            "script": ReferenceNeuronModel(),
            "fork's sets only": _SetsOnly(),
            "fork's keys only": _KeysOnly(),
        }
        for m in models.values():
            m.fit(fit)
        assert trie.token_sets() == models["script"].token_sets()  # sitegen is the script
        same += trie.token_sets() == models["fork"].token_sets()
        for what in differs:
            differs[what] += trie.token_sets() != models[what].token_sets()
    assert same < graphs // 2 and min(differs.values()) > graphs // 10, (same, differs)
    readme = " ".join((Path(__file__).parents[1] / "docs" / "methods.md").read_text().split())
    assert "Foote et al.'s script, not DeepDecipher's fork" in readme
    assert "does **not normalise tokens**" in readme and "**important sets at every position**" in readme


def _paths(node, path):
    for key, child in node.children.items():
        yield path + (key,), child
        yield from _paths(child, path + (key,))


def test_saliency_cut_after_the_last_firing_position_changes_nothing():
    """compute.py computes importance only up to max(peak, last firing position) of each prompt.
    Lines read I[k, i] for firing positions i only, and a variant borrows the original's set for a
    position the original does not fire at, which is empty (the reference makes sets only while
    making lines): so the lines from the cut matrices equal those from the full ones."""
    import numpy as np

    from sitegen.services.neuron2graph.compute import group_lines

    def cut(norm, imp, first):
        hits = np.nonzero(norm[first:] > 0.5)[0]
        upto = first + int(hits[-1]) if len(hits) else first
        out = imp.copy()
        out[upto + 1 :, :] = 0  # no masked copy past upto ...
        out[:, upto + 1 :] = 0  # ... and the copies stop at upto
        return out

    differ = 0
    for seed in range(800):
        original, variants = _random_group(np.random.default_rng(seed), 1)
        full = group_lines(_VOCAB, original, variants, 1)
        trimmed = group_lines(
            _VOCAB,
            (original[0], original[1], cut(original[1], original[2], 1)),
            [(t, n, cut(n, i, 1)) for t, n, i in variants],
            1,
        )
        assert full == trimmed, f"seed {seed}"
        differ += not np.array_equal(original[2], cut(original[1], original[2], 1))
    assert differ > 100  # the cut did remove values


def test_undefined_metrics_are_null_in_the_api_page_and_search_previews(tmp_path):
    """A graph whose held-out texts never fire is 'not evaluated': null F1 / recall in the store,
    the API's evaluation object and the search preview, a sentence on the page (never 'None' or a
    score); a graph that predicts nothing on texts that fire has a null precision and F1 0."""
    import json
    from types import SimpleNamespace

    from sitegen.services.neuron2graph.compute import SERVICE, graphs_table
    from sitegen.site.build import build_site
    from sitegen.store import Store
    from tests.reference import SYNTHETIC_LINES, write_synthetic_store

    store = write_synthetic_store(tmp_path / "store", name="nulls", n_layers=1, n_neurons=3, with_graphs=False)
    never_fires = evaluate([0.0, 0.9, 0.0], [0.1, 0.2, 0.3])
    predicts_nothing = evaluate(Trie().predict(["a", "b"]), [0.9, 0.1])
    rows = []
    for neuron, ev in ((0, never_fires), (1, predicts_nothing)):
        trie = Trie()
        for line, act in SYNTHETIC_LINES:
            trie.insert(line, act)
        trie.merge_ignore()
        rows.append(
            (
                SimpleNamespace(neuron=neuron, base_max=1.0, train=[None] * 3, test=[None] * 2, lines=SYNTHETIC_LINES),
                trie,
                ev,
            )
        )
    store.write_layer(SERVICE, 0, graphs_table(rows))
    Store.open(store.root).add_service(SERVICE)
    table = Store.open(store.root).read_layer(SERVICE, 0).to_pylist()
    assert [(r["precision"], r["recall"], r["f1"]) for r in table] == [(0.0, None, None), (None, 0.0, 0.0)]
    assert table[0]["variance_explained"] is not None and table[1]["variance_explained"] is not None

    out = tmp_path / "site"
    build_site([store.root], out)
    api = [json.loads((out / f"api/nulls/neuron2graph/0/{n}.json").read_text())["data"]["evaluation"] for n in (0, 1)]
    assert (
        api[0]["f1"] is None and api[0]["recall"] is None and api[0]["precision"] == 0.0 and api[0]["test_texts"] == 2
    )
    assert api[1]["precision"] is None and api[1]["recall"] == 0.0 and api[1]["f1"] == 0.0
    page0, page1 = ((out / f"nulls/0/{n}.html").read_text() for n in (0, 1))
    assert "not evaluated" in page0 and "F1 <b>" not in page0 and "None" not in page0
    assert "precision <b>undefined</b>" in page1 and "F1 <b>0</b>" in page1 and "None" not in page1
    preview = json.loads((out / "search/nulls/preview/0/0.json").read_text())
    assert preview[0][2] is None and preview[1][2] == 0.0
