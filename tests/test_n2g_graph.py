"""Neuron2Graph's trie, prediction and evaluation on hand-built cases with known answers."""

from __future__ import annotations

import pytest

from sitegen.services.neuron2graph.graph import IGNORE, Trie, evaluate, normalise


def test_normalise():
    assert normalise("The") == "the" and normalise(" cat") == "cat" and normalise(" The") == "the"
    assert normalise("I") == "I" and normalise(" ,") == " ," and normalise("USA") == "USA" and normalise("\n") == "\n"


def test_context_is_required():
    t = Trie()
    t.insert([("cat", 1.0), ("the", 0.9)], 1.0)
    assert t.predict(["a", "the", "cat"]) == [0, 0, 1.0]
    assert t.predict(["a", "cat"]) == [0, 0]  # 'cat' alone does not end a line
    assert t.predict(["The", " Cat"]) == [0, 1.0]  # normalised keys


def test_longest_match_wins():
    t = Trie()
    t.insert([("cat", 0.5)], 0.5)
    t.insert([("cat", 0.5), ("the", 0.8)], 1.0)
    assert t.predict(["the", "cat"]) == [0, 1.0]
    assert t.predict(["a", "cat"]) == [0, 0.5]


def test_ignore_matches_any_token_but_needs_one():
    t = Trie()
    t.insert([("cat", 1.0), (IGNORE, 0.0), ("the", 0.9)], 1.0)
    t.merge_ignore()
    assert t.predict(["the", "big", "cat"])[2] == 1.0
    assert t.predict(["the", "cat"])[1] == 0.0


def test_no_backtracking():
    t = Trie()
    t.insert([("cat", 0.3), ("big", 0.9)], 0.3)
    t.insert([("cat", 1.0), (IGNORE, 0.0), ("the", 0.9)], 1.0)
    t.merge_ignore()
    # 'big' is an exact child that ends a line, so the walk takes it and stops there:
    # the IGNORE path that would have reached 'the' (1.0) is not tried.
    assert t.predict(["the", "big", "cat"])[2] == 0.3
    assert t.predict(["the", "red", "cat"])[2] == 1.0


def test_ignore_merging_copies_sibling_paths_and_drops_non_ending_siblings():
    t = Trie()
    t.insert([("cat", 0.8), ("small", 0.9), ("a", 0.9)], 0.8)
    t.insert([("cat", 1.0), (IGNORE, 0.0), ("the", 0.9)], 1.0)
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
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    mean = sum(true) / 5
    var = sum((t - mean) ** 2 for t in true) / 5
    mse = sum((p - t) ** 2 for p, t in zip(pred, true)) / 5
    assert m["variance_explained"] == pytest.approx(1 - mse / var)


def test_evaluate_nothing_fires():
    m = evaluate([0.1, 0.0], [0.2, 0.3])
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert evaluate([0.9, 0.0], [0.2, 0.3])["precision"] == 0.0


def test_lines_keep_important_context_and_wildcard_the_rest():
    """Step 4 on a hand-made prompt: the token at 3 fires (0.9); masking 1 matters for it (0.8),
    masking 2 does not (0.1): the line is ' c' <- IGNORE <- ' a', ended with 0.9. Position 2
    fires too (0.6) with no important context: a one-token line."""
    import numpy as np

    from sitegen.services.neuron2graph.compute import make_lines

    vocab = ["<bos>", " a", " b", " c"]
    tokens = (0, 1, 2, 3)
    norm = np.array([0.0, 0.1, 0.6, 0.9])
    imp = np.zeros((4, 4))
    imp[1, 3], imp[2, 3], imp[3, 3] = 0.8, 0.1, 1.0
    sets = [set(np.nonzero(imp[:, i] > 0.75)[0].tolist()) for i in range(4)]
    lines = make_lines(vocab, tokens, norm, imp, sets, first=1)
    assert lines == [([(" b", 0.6)], 0.6), ([(" c", 0.9), (IGNORE, 0.0), (" a", 0.8)], 0.9)]
    # a variant keeps context that was important in the original (the set) even if not in itself
    imp_variant = np.zeros((4, 4))
    assert make_lines(vocab, tokens, norm, imp_variant, sets, first=1)[1] == ([(" c", 0.9), (IGNORE, 0.0), (" a", 0.0)], 0.9)
