"""Explanations: the scoring core on hand-computed values and planted activations, the importer
of OpenAI's published files, and the explanation on the built page and in the API."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import orjson
import pytest

from sitegen.services.neuron_explainer import scoring
from sitegen.site.build import build_site
from tests.reference import write_synthetic_store


def test_discretisation_matches_hand_computed_levels():
    assert scoring.discretise([0.0, -1.0, 0.5, 1.0, 2.0, 0.99, 0.1], 1.0) == [0, 0, 5, 10, 10, 9, 1]
    assert scoring.discretise([0.3, 0.7], 0.7) == [4, 10]  # floor(10 * 0.3 / 0.7) = floor(4.29)
    assert scoring.discretise([1.0, 2.0], 0.0) == [0, 0]


def test_expected_value_and_correlation_match_hand_computed_values():
    # P("0") = .5, P(" 10") = .25, the rest not an answer: (0 * .5 + 10 * .25) / .75
    ev = scoring.expected_value({"0": math.log(0.5), " 10": math.log(0.25), "x": math.log(0.25)})
    assert ev == pytest.approx(10 / 3)
    assert scoring.expected_value({"7": math.log(0.2), " 7": math.log(0.2)}) == pytest.approx(7.0)
    assert scoring.expected_value({"cat": 0.0}) is None
    # [1, 2, 3] vs [2, 4, 7]: cov 5/3, var 2/3 and 38/9 -> r = 5 / sqrt(2 * 38 / 3)
    assert scoring.correlation([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 38 / 3))
    assert scoring.correlation([1, 1, 1], [2, 4, 7]) is None  # constant prediction: no score
    assert scoring.correlation([1, 2], [1, 2, 3]) is None


def test_fallback_parser_reads_levels_or_refuses():
    assert scoring.parse_rewrite(" the\t0\n tax\t10\n cut\t 3", 3) == [0.0, 10.0, 3.0]
    assert scoring.parse_rewrite(" the\t0\n tax\tten", 2) is None  # malformed: not scored
    assert scoring.parse_rewrite(" the\t0", 2) is None


def _echo_simulator(explanation: str, prompt: str) -> dict:
    """A deterministic stand-in for an OpenAI-compatible completions endpoint with echo=True and
    logprobs: it tokenises the prompt by line parts and, at every placeholder, answers 10 when the
    line's token is a quoted word of the explanation, else 0, as top logprobs."""
    words = {w.lower() for w in explanation.split('"')[1::2]}
    tokens, offsets, tops = [], [], []
    at = 0
    for line in prompt.splitlines(keepends=True):
        token, tab, rest = line.partition("\t")
        if tab:
            for piece in (token + tab, rest):
                tokens.append(piece)
                offsets.append(at)
                level = "10" if token.strip().lower() in words else "0"
                tops.append({level: math.log(0.9), ("0" if level == "10" else "1"): math.log(0.1)} if piece is rest else {})
                at += len(piece)
        else:
            tokens.append(line)
            offsets.append(at)
            tops.append({})
            at += len(line)
    return {"tokens": tokens, "text_offset": offsets, "top_logprobs": tops}


def test_right_explanation_scores_high_and_wrong_one_low_on_planted_activations():
    """A neuron that fires exactly on ' tax', on top and random excerpts."""
    excerpts = [[" we", " cut", " tax", " and", " peace"], [" tax", " law", " is", " fair"], [" peace", " and", " war", " end"],
                [" the", " tax", " tax", " rate"]]
    true = [[1.0 if t == " tax" else 0.0 for t in ex] for ex in excerpts]

    def score(explanation: str) -> float | None:
        simulated = []
        for ex in excerpts:
            prompt, offsets = scoring.simulation_prompt(explanation, ex)
            simulated.append(scoring.predictions_from_echo(offsets, _echo_simulator(explanation, prompt)))
        return scoring.score_simulation(simulated, true)

    right, wrong = score('the word "tax"'), score('the word "peace"')
    assert right > 0.95
    assert wrong is not None and wrong < 0.1


def _published(tmp_path, records: list[dict], name="0.jsonl"):
    folder = tmp_path / "explanations"
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(b"\n".join(orjson.dumps(r) for r in records) + b"\n")
    return folder


def test_importer_reads_the_published_format_and_the_site_shows_it(tmp_path):
    from sitegen.services.neuron_explainer.published import import_explanations

    store = write_synthetic_store(tmp_path / "store", name="gpt2-toy", with_graphs=False)
    folder = _published(tmp_path, [
        {"neuron_id": {"layer_index": 1, "neuron_index": 2},
         "scored_explanations": [{"explanation": " mentions of <b>tax</b> cuts", "scored_simulation": {"ev_correlation_score": 0.61,
                                                                                                    "scored_sequence_simulations": []}},
                                 {"explanation": "worse one", "scored_simulation": {"ev_correlation_score": 0.2}}]},
        {"neuron_id": {"layer_index": 0, "neuron_index": 0}, "scored_explanations": [{"explanation": "unscored", "scored_simulation": {}}]},
    ])
    assert import_explanations(folder, store.root, log=lambda m: None) == 2
    out = tmp_path / "site"
    build_site([store.root], out)
    data = json.loads((out / "api/gpt2-toy/neuron_explainer/1/2.json").read_text())["data"]
    assert data["explanation"] == "mentions of <b>tax</b> cuts" and data["score"] == 0.61 and data["source"] == "openai-published"
    assert json.loads((out / "api/gpt2-toy/neuron_explainer/0/0.json").read_text())["data"]["score"] is None
    assert json.loads((out / "api/gpt2-toy/neuron_explainer/0/1.json").read_text())["data"]["explanation"] is None
    page = (out / "gpt2-toy/1/2.html").read_text()
    assert "mentions of &lt;b&gt;tax&lt;/b&gt; cuts" in page and "<b>tax</b>" not in page and "<b>0.61</b>" in page
    assert "neuron_explainer" in json.loads((out / "api/gpt2-toy.json").read_text())["data"]["available_services"]


@pytest.mark.parametrize("records, message", [
    ([{"neuron_id": {"layer_index": 9, "neuron_index": 0}, "scored_explanations": [{"explanation": "x"}]}], "does not exist in this store"),
    ([{"scored_explanations": []}], "without neuron_id"),
    ([{"neuron_id": {"layer_index": 0, "neuron_index": 0}, "scored_explanations": []}], "no explanation"),
])
def test_importer_errors_are_one_line(tmp_path, records, message):
    store = write_synthetic_store(tmp_path / "store", with_graphs=False)
    folder = _published(tmp_path, records)
    res = subprocess.run([sys.executable, "-m", "sitegen", "import-explanations", str(folder), "--store", str(store.root)],
                         capture_output=True, text=True, check=False)
    assert res.returncode != 0 and message in res.stderr and res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert not (store.root / "neuron_explainer").exists()  # nothing half-imported


EXPLAINED = {(0, 1): "mentions of taxes and tax cuts", (0, 3): "numbers, especially amounts of money", (1, 2): "the word tax in legal texts",
             (1, 0): "generalizations about nations"}


def explained_store(root, name="explained"):
    """A synthetic store with a few published-format explanations imported."""
    from sitegen.services.neuron_explainer.published import import_explanations

    store = write_synthetic_store(root / "store", name=name)
    folder = root / "published"
    folder.mkdir()
    (folder / "all.jsonl").write_bytes(b"".join(orjson.dumps({
        "neuron_id": {"layer_index": layer, "neuron_index": n},
        "scored_explanations": [{"explanation": text, "scored_simulation": {"ev_correlation_score": 0.5 + 0.1 * n}}]}) + b"\n"
        for (layer, n), text in EXPLAINED.items()))
    import_explanations(folder, store.root, log=lambda m: None)
    return store


def test_explanation_search_equals_brute_force(tmp_path):
    from sitegen.services.neuron_explainer.textindex import analyse
    from tests.reference import static_text_search

    store = explained_store(tmp_path)
    out = tmp_path / "site"
    build_site([store.root], out)
    stems = {layer * 4 + n: set(analyse(text)) for (layer, n), text in EXPLAINED.items()}
    for query in ("tax", "taxes", "Taxation cuts", "numbers money", "nation", "the tax", "nothing here", "legal tax"):
        terms = set(analyse(query))
        want = sorted(g for g, s in stems.items() if terms and terms <= s)
        assert static_text_search(out, "explained", query) == want, query
    assert static_text_search(out, "explained", "taxes") == [1, 6]  # stemming: 'taxes' finds 'tax' and 'taxes'
    layer_page = (out / "explained/0/index.html").read_text()
    assert "<td>mentions of taxes and tax cuts</td>" in layer_page and "Explanation score" in layer_page
    preview = json.loads((out / "search/explained/preview/0/0.json").read_text())
    assert preview[1][3] == "mentions of taxes and tax cuts" and preview[0][3] is None
