"""Explanations: the scoring core on hand-computed values and planted activations, the importer
of OpenAI's published files, and the explanation on the built page and in the API."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    # P("0") = .5, P("10") = .25; " 10" and "x" are not answers: (0 * .5 + 10 * .25) / .75
    ev = scoring.expected_value({"0": math.log(0.5), "10": math.log(0.25), " 10": math.log(0.2), "x": math.log(0.05)})
    assert ev == pytest.approx(10 / 3)
    # only the exact tokens count, as the reference: (2 * .4 + 3 * .25) / .65, not 4.7 with " 9" merged in
    assert scoring.expected_value({"2": math.log(0.4), " 9": math.log(0.35), "3": math.log(0.25)}) == pytest.approx(
        1.55 / 0.65
    )
    assert scoring.expected_value({"7": math.log(0.2), " 7": math.log(0.2)}) == pytest.approx(7.0)
    assert scoring.expected_value({" 7": 0.0}) is None and scoring.expected_value({"cat": 0.0}) is None
    # [1, 2, 3] vs [2, 4, 7]: cov 5/3, var 2/3 and 38/9 -> r = 5 / sqrt(2 * 38 / 3)
    assert scoring.correlation([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 38 / 3))
    assert scoring.correlation([1, 1, 1], [2, 4, 7]) is None  # constant prediction: no score
    assert scoring.correlation([1, 2], [1, 2, 3]) is None


def test_fallback_parser_reads_levels_or_scores_zeros():
    tokens = [" the", " tax", " cut"]
    assert scoring.parse_rewrite(" the\t0\n tax\t10\n cut\t 3", tokens) == ([0.0, 10.0, 3.0], True)
    # a chat server strips the answer's leading space; a preamble line before the first token's line
    assert scoring.parse_rewrite("Here they are:\nthe\t0\n tax\t10\n cut\t3\n", tokens) == ([0.0, 10.0, 3.0], True)
    assert scoring.parse_rewrite(" the\t0\n tax\tten\n cut\t3", tokens) == (
        [0.0, 0.0, 3.0],
        True,
    )  # not a level: 0 there
    # as the reference, all zeros (scored, not dropped) when a line is not its own token, or lines are missing
    assert scoring.parse_rewrite(" the\t0\n war\t10\n cut\t3", tokens) == ([0.0, 0.0, 0.0], False)
    assert scoring.parse_rewrite(" the\t0\n tax\t10", tokens) == ([0.0, 0.0, 0.0], False)
    assert scoring.parse_rewrite("I cannot tell.", tokens) == ([0.0, 0.0, 0.0], False)


class FakeEndpoint:
    """Endpoint.post without HTTP: no logprobs (the logprob-free path), the explanation
    'the word "<w>"' with w = words[seed], and a simulator that rewrites each line with 10 when its
    token is the quoted word, else 0; `garble(tokens)` may return a malformed answer instead."""

    base = "http://fake/v1"  # named in error messages

    def __init__(self, words, garble=lambda tokens: None):
        self.words, self.garble, self.calls = words, garble, []

    def post(self, path, body):
        self.calls.append(path)
        if path == "/completions":
            return {"choices": [{"text": "", "logprobs": None}]}
        text = body["messages"][-1]["content"]
        if "Neuron B" in text:
            return {"choices": [{"message": {"content": f'the word "{self.words[body["seed"]]}".'}}]}
        word = text.split('"')[1]  # the explanation's quoted word (the made-up examples quote nothing)
        if "\nExcerpts:\n" in text:  # detection or fuzzing: 1 where the word is there (every highlight is it)
            return {"choices": [{"message": {"content": classification_answer(text, word)}}]}
        lines = [ln[:-2] for ln in text.rsplit("<start>\n", 1)[1].split("<end>")[0].splitlines() if ln.endswith("\t?")]
        answer = self.garble(lines) or "\n".join(f"{ln}\t{10 if ln.strip() == word else 0}" for ln in lines)
        return {"choices": [{"message": {"content": answer}}]}


def classification_answer(prompt: str, word: str, answer=lambda truth: truth) -> str:
    """A scripted scorer's list for a detection or fuzzing prompt: per excerpt, `answer(truth)` where
    truth is 1 when the excerpt holds `word` (detection) or every highlighted run is ` word`
    (fuzzing), else 0."""
    lines = prompt.split("\nExcerpts:\n", 1)[1].splitlines()
    out = []
    for line in lines:
        text = line.split(". ", 1)[1]
        marked = re.findall(r"<<(.*?)>>", text)
        truth = all(m and not m.replace(" " + word, "") for m in marked) if marked else (" " + word) in text
        out.append(int(answer(int(truth))))
    return "[" + ", ".join(map(str, out)) + "]"


def _seq(words_acts):
    return [w for w, _ in words_acts], [float(a) for _, a in words_acts]


ZERO = _seq([(" the", 0), (" and", 0), (" is", 0), (" we", 0)])


def test_an_unreadable_simulation_scores_zeros_instead_of_being_dropped():
    """Planted: the test split is top texts 3 and 7 (round-robin by 4); the simulator's answer
    for text 7 lacks a line. Scored as zeros (the reference): pred [0,10,0,10, 0,0,0,0] against
    true [0,1,0,.5, .8,0,.4,0]: cov .825, variances 1.5 and 1.13875 (sums) -> r = 0.6312.
    Dropping text 7 would report 3 / sqrt(11) = 0.9045 from text 3 alone."""
    from sitegen.services.neuron_explainer.explain import explain_neuron

    top = [ZERO] * 8
    top[3] = _seq([(" the", 0), (" tax", 1.0), (" cut", 0), (" tax", 0.5)])
    top[7] = _seq([(" tax", 0.8), (" and", 0), (" peace", 0.4), (" law", 0)])
    ep = FakeEndpoint(
        ["tax"], garble=lambda lines: "\n".join(f"{ln}\t0" for ln in lines[:-1]) if lines[0] == " tax" else None
    )
    record = explain_neuron(ep, {"top": top, "random": []}, 5)
    assert record["method"] == "no-logprobs" and record["error"] is None
    assert record["score"] == pytest.approx(0.825 / math.sqrt(1.5 * 1.13875)) and record["score"] == pytest.approx(
        0.6312, abs=1e-4
    )
    assert [d["tokens"] for d in record["details"]] == [top[3][0], top[7][0]]
    assert record["details"][1]["simulated"] == [0, 0, 0, 0] and record["details"][1].get("unread")


def test_several_samples_are_chosen_on_valid_and_scored_on_test():
    """Three explanations ("tax", "peace", "war"). On the valid split (top 2, 6; random 1, 4) only
    "peace" fires, where it is predicted: valid score 1.0, the best. On the test split (top 3, 7;
    random 2, 5) "tax" would score best (0.928), but choosing there biases the score upward: the
    reported score is "peace"'s on test, pred 10 only at a true .5 among true [1,0,.5,0, 0,1,0,.2,
    0 x 8]: cov .33125, variances .9375 and 1.834375 (sums) -> r = 0.2526."""
    from sitegen.services.neuron_explainer.explain import explain_neuron

    top = [ZERO] * 8
    top[0] = _seq([(" tax", 1), (" cut", 0), (" peace", 0.5), (" war", 0)])  # train
    top[4] = _seq([(" law", 0), (" tax", 1), (" is", 0), (" fair", 0)])  # train
    top[2] = _seq([(" peace", 1), (" the", 0), (" tax", 0), (" and", 0)])  # valid
    top[6] = _seq([(" war", 0), (" peace", 1), (" and", 0), (" the", 0)])  # valid
    top[3] = _seq([(" tax", 1), (" the", 0), (" peace", 0.5), (" and", 0)])  # test
    top[7] = _seq([(" the", 0), (" tax", 1), (" and", 0), (" war", 0.2)])  # test
    random = [ZERO] * 6  # calibration 0, 3; valid 1, 4; test 2, 5
    random[1] = _seq([(" we", 0), (" tax", 0), (" the", 0), (" law", 0)])
    random[5] = _seq([(" nation", 0), (" year", 0), (" the", 0), (" trade", 0)])
    ep = FakeEndpoint(["tax", "peace", "war"])
    record = explain_neuron(ep, {"top": top, "random": random}, 5, samples=3)
    assert record["explanation"] == 'the word "peace".' and record["selected_on"] == "valid"
    assert record["valid_score"] == pytest.approx(1.0)
    assert record["score"] == pytest.approx(0.33125 / math.sqrt(0.9375 * 1.834375)) and record[
        "score"
    ] == pytest.approx(0.2526, abs=1e-4)
    by_word = {x["explanation"].split('"')[1]: x for x in record["samples"]}
    assert by_word["tax"]["score"] == pytest.approx(0.9279, abs=1e-4) and by_word["tax"]["valid_score"] < 0
    assert [d["tokens"] for d in record["details"]] == [top[3][0], top[7][0], random[2][0], random[5][0]]
    # per sample: explanation, valid and test simulations; then detection and fuzzing on 12 held-out
    # excerpts each (activating: top 2, 3, 6, 7; not: top 1, 5 and the 6 random), 5 per request
    assert record["usage"]["requests"] == 3 * (1 + 4 + 4) + 3 + 3
    assert record["scorers"]["detection"]["calls"] == record["scorers"]["fuzzing"]["calls"] == 3


def test_sparse_repeat_uses_the_proportion_pooled_over_all_excerpts():
    from sitegen.services.neuron_explainer.explain import explanation_messages

    def shown(excerpts):
        text = explanation_messages([_seq(e) for e in excerpts])[-1]["content"]
        return text.count("<start>"), text

    dense = [(" tax", 1.0), (" cut", 0.5), (" rate", 0.5), (" the", 0)]  # 3 of 4 fire
    one = [(" peace", 1.0)] + [(" the", 0)] * 9  # 1 of 10 fires: sparse on its own
    # pooled 4 / 14 >= 20%: shown once each, though the second excerpt alone is sparse
    assert shown([dense, one])[0] == 2
    some = [(" tax", 1.0), (" cut", 0.5), (" the", 0), (" a", 0), (" b", 0)]  # 2 of 5: not sparse on its own
    count, text = shown([some, [(" the", 0)] * 20])  # pooled 2 / 25 < 20%: every excerpt again, firing tokens alone
    assert count == 4
    assert (
        text.split("zeros filtered out:\n")[1].split("\nComplete")[0]
        == "<start>\n tax\t10\n cut\t5\n<end>\n<start>\n\n<end>\n"
    )


def _echo_simulator(explanation: str, prompt: str, byte_offsets: bool = False) -> dict:
    """A deterministic stand-in for an OpenAI-compatible completions endpoint with echo=True and
    logprobs: it tokenises the prompt by line parts and, at every placeholder, answers 10 when the
    line's token is a quoted word of the explanation, else 0, as top logprobs. text_offset counts
    characters, or UTF-8 bytes as some servers do."""
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
                tops.append(
                    {level: math.log(0.9), ("0" if level == "10" else "1"): math.log(0.1)} if piece is rest else {}
                )
                at += len(piece.encode("utf-8") if byte_offsets else piece)
        else:
            tokens.append(line)
            offsets.append(at)
            tops.append({})
            at += len(line.encode("utf-8") if byte_offsets else line)
    return {"tokens": tokens, "text_offset": offsets, "top_logprobs": tops}


def test_right_explanation_scores_high_and_wrong_one_low_on_planted_activations():
    """A neuron that fires exactly on ' tax', on top and random excerpts."""
    excerpts = [
        [" we", " cut", " tax", " and", " peace"],
        [" tax", " law", " is", " fair"],
        [" peace", " and", " war", " end"],
        [" the", " tax", " tax", " rate"],
    ]
    true = [[1.0 if t == " tax" else 0.0 for t in ex] for ex in excerpts]

    def score(explanation: str) -> float | None:
        simulated = []
        for ex in excerpts:
            prompt, offsets = scoring.simulation_prompt(explanation, ex)
            simulated.append(scoring.predictions_from_echo(prompt, offsets, _echo_simulator(explanation, prompt)))
        return scoring.score_simulation(simulated, true)

    right, wrong = score('the word "tax"'), score('the word "peace"')
    assert right > 0.95
    assert wrong is not None and wrong < 0.1


def test_echo_alignment_with_offsets_in_characters_or_bytes():
    """Non-ASCII tokens put character and UTF-8 byte offsets apart; both units must align every
    placeholder (10 on ' tax', 0 elsewhere: 0.9 x 0 + 0.1 x 1 = 0.1 and 0.9 x 10 + 0.1 x 0 = 9)."""
    excerpt = [" café", " tax", "—", " 日本", " tax", " naïve", "\n", " tax"]
    prompt, offsets = scoring.simulation_prompt('the word "tax"', excerpt)
    want = [9.0 if t == " tax" else 0.1 for t in excerpt]
    for byte_offsets in (False, True):
        got = scoring.predictions_from_echo(prompt, offsets, _echo_simulator('the word "tax"', prompt, byte_offsets))
        assert got == pytest.approx(want), byte_offsets


def _shifted(answer: dict) -> dict:
    """The same answer as llama-cpp-python's server gives it for a model without a BOS token:
    entry i holds the distribution over token i + 1, with token i's own logprob added."""
    tops = answer["top_logprobs"]
    return {
        **answer,
        "top_logprobs": [
            {**(tops[i + 1] or {} if i + 1 < len(tops) else {}), tok: -7.0} for i, tok in enumerate(answer["tokens"])
        ],
    }


def test_alignment_detector_on_constructed_answers_of_both_conventions():
    """Constructed answers (the recorded real ones are in test_alignment_detector_on_recorded_answers):
    the level sign alone (entries empty but at placeholders), the token sign (every entry predicts
    its token), both conventions of each; a contradiction or no sign at all establishes nothing."""
    excerpt = [" the", " tax", " cut", " tax", " rate"]
    prompt, offsets = scoring.simulation_prompt('the word "tax"', excerpt)
    levels_only = _echo_simulator('the word "tax"', prompt)
    want = scoring.predictions_from_echo(prompt, offsets, levels_only)
    assert want == pytest.approx([0.1, 9.0, 0.1, 9.0, 0.1])
    predicting = {
        **levels_only,
        "top_logprobs": [
            top or {tok: -0.2, "<other>": -2.0} for tok, top in zip(levels_only["tokens"], levels_only["top_logprobs"])
        ],
    }
    for own in (levels_only, predicting):
        found, evidence = scoring.echo_alignment(prompt, offsets, own)
        assert found == "own" and evidence["levels_own"] == 5 and evidence["levels_next"] == 0
        found, evidence = scoring.echo_alignment(prompt, offsets, _shifted(own))
        assert found == "next" and evidence["levels_next"] == 5 and evidence["levels_own"] == 0
        assert scoring.predictions_from_echo(prompt, offsets, _shifted(own), "next") == pytest.approx(want)
        assert (
            scoring.predictions_from_echo(prompt, offsets, _shifted(own)) == [None] * 5
        )  # the entry after: no level there
    # tokens say "own" but the levels sit one entry early: contradictory, nothing established
    tops = list(predicting["top_logprobs"])
    for i in scoring._placeholder_tokens(prompt, offsets, predicting):
        tops[i - 1], tops[i] = {**tops[i], **tops[i - 1]}, {"unknown": -0.1}
    assert scoring.echo_alignment(prompt, offsets, {**predicting, "top_logprobs": tops})[0] is None
    noise = {**levels_only, "top_logprobs": [{"<noise>": -0.1} for _ in levels_only["tokens"]]}
    assert scoring.echo_alignment(prompt, offsets, noise)[0] is None


def test_alignment_detector_on_recorded_answers():
    """Real answers (tests/data/record_echo_answers.py): llama-cpp-python's server with SmolLM2
    answers one entry ahead; the same model's logits written in OpenAI's convention answer at the
    token's own entry. Each is detected, and both give the same predictions, which the wrong
    reading does not (no level token where it looks)."""
    data = Path(__file__).parent / "data"
    answers = {name: orjson.loads((data / f"echo_{name}.json").read_bytes()) for name in ("llama_next", "openai_own")}
    predictions = {}
    for name, want in (("llama_next", "next"), ("openai_own", "own")):
        a = answers[name]
        found, evidence = scoring.echo_alignment(a["prompt"], a["offsets"], a["logprobs"])
        assert found == want, evidence
        other = "own" if want == "next" else "next"
        assert (
            evidence[want] > 5 * evidence[other]
            and evidence[f"levels_{want}"] == len(a["offsets"])
            and evidence[f"levels_{other}"] == 0
        )
        predictions[name] = scoring.predictions_from_echo(a["prompt"], a["offsets"], a["logprobs"], want)
        assert scoring.predictions_from_echo(a["prompt"], a["offsets"], a["logprobs"], other) == [None] * len(
            a["offsets"]
        )
    assert all(p is not None for p in predictions["llama_next"])
    assert predictions["llama_next"] == pytest.approx(predictions["openai_own"], abs=1e-3)


def _published(tmp_path, records: list[dict], name="0.jsonl"):
    folder = tmp_path / "explanations"
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(b"\n".join(orjson.dumps(r) for r in records) + b"\n")
    return folder


def test_importer_reads_the_published_format_and_the_site_shows_it(tmp_path):
    from sitegen.services.neuron_explainer.published import import_explanations

    store = write_synthetic_store(tmp_path / "store", name="gpt2-toy", with_graphs=False)
    folder = _published(
        tmp_path,
        [
            {
                "neuron_id": {"layer_index": 1, "neuron_index": 2},
                "scored_explanations": [
                    {
                        "explanation": " mentions of <b>tax</b> cuts",
                        "scored_simulation": {"ev_correlation_score": 0.61, "scored_sequence_simulations": []},
                    },
                    {"explanation": "worse one", "scored_simulation": {"ev_correlation_score": 0.2}},
                ],
            },
            {
                "neuron_id": {"layer_index": 0, "neuron_index": 0},
                "scored_explanations": [{"explanation": "unscored", "scored_simulation": {}}],
            },
        ],
    )
    assert import_explanations(folder, store.root, log=lambda m: None) == 2
    out = tmp_path / "site"
    build_site([store.root], out)
    data = json.loads((out / "api/gpt2-toy/neuron_explainer/1/2.json").read_text())["data"]
    assert (
        data["explanation"] == "mentions of <b>tax</b> cuts"
        and data["score"] == 0.61
        and data["source"] == "openai-published"
    )
    assert json.loads((out / "api/gpt2-toy/neuron_explainer/0/0.json").read_text())["data"]["score"] is None
    assert json.loads((out / "api/gpt2-toy/neuron_explainer/0/1.json").read_text())["data"]["explanation"] is None
    page = (out / "gpt2-toy/1/2.html").read_text()
    assert "mentions of &lt;b&gt;tax&lt;/b&gt; cuts" in page and "<b>tax</b>" not in page and "<b>0.61</b>" in page
    assert "neuron_explainer" in json.loads((out / "api/gpt2-toy.json").read_text())["data"]["available_services"]


@pytest.mark.parametrize(
    "records, message",
    [
        (
            [{"neuron_id": {"layer_index": 9, "neuron_index": 0}, "scored_explanations": [{"explanation": "x"}]}],
            "does not exist in this store",
        ),
        ([{"scored_explanations": []}], "without neuron_id"),
        ([{"neuron_id": {"layer_index": 0, "neuron_index": 0}, "scored_explanations": []}], "no explanation"),
    ],
)
def test_importer_errors_are_one_line(tmp_path, records, message):
    store = write_synthetic_store(tmp_path / "store", with_graphs=False)
    folder = _published(tmp_path, records)
    res = subprocess.run(
        [sys.executable, "-m", "sitegen", "import-explanations", str(folder), "--store", str(store.root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (
        res.returncode != 0
        and message in res.stderr
        and res.stderr.strip().count("\n") == 0
        and "Traceback" not in res.stderr
    )
    assert not (store.root / "neuron_explainer").exists()  # nothing half-imported


EXPLAINED = {
    (0, 1): "mentions of taxes and tax cuts",
    (0, 3): "numbers, especially amounts of money",
    (1, 2): "the word tax in legal texts",
    (1, 0): "generalizations about nations",
}


def explained_store(root, name="explained"):
    """A synthetic store with a few published-format explanations imported."""
    from sitegen.services.neuron_explainer.published import import_explanations

    store = write_synthetic_store(root / "store", name=name)
    folder = root / "published"
    folder.mkdir()
    (folder / "all.jsonl").write_bytes(
        b"".join(
            orjson.dumps(
                {
                    "neuron_id": {"layer_index": layer, "neuron_index": n},
                    "scored_explanations": [
                        {"explanation": text, "scored_simulation": {"ev_correlation_score": 0.5 + 0.1 * n}}
                    ],
                }
            )
            + b"\n"
            for (layer, n), text in EXPLAINED.items()
        )
    )
    import_explanations(folder, store.root, log=lambda m: None)
    return store


def test_explanation_search_equals_brute_force(tmp_path):
    from sitegen.site.textindex import analyse
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


def test_bootstrap_intervals_are_seeded_and_reproducible():
    from sitegen.services import bootstrap

    rng = np.random.default_rng(1)
    labels = [1] * 12 + [0] * 12
    predictions = rng.integers(0, 2, size=24).tolist()
    first = bootstrap.balanced_accuracy_ci(labels, predictions)
    assert first == bootstrap.balanced_accuracy_ci(labels, predictions)  # seed 0 by default: the same interval
    value = bootstrap.balanced_accuracy(labels, predictions)
    assert first[0] < value < first[1]
    true = [rng.normal(size=8).tolist() for _ in range(10)]
    simulated = [[t + rng.normal() for t in seq] for seq in true]
    ci = bootstrap.simulation_ci(simulated, true)
    assert ci == bootstrap.simulation_ci(simulated, true) and ci != bootstrap.simulation_ci(simulated, true, seed=5)
    # the pooled correlation from per-excerpt sums is the score's own correlation
    sums = bootstrap.correlation_sums(simulated, true).sum(0)
    assert bootstrap.pooled_correlation(sums) == pytest.approx(scoring.score_simulation(simulated, true), abs=1e-12)
    assert ci[0] < scoring.score_simulation(simulated, true) < ci[1]
    # no interval without both classes, or for a constant side
    assert bootstrap.balanced_accuracy_ci([1, 1], [1, 0]) is None
    assert bootstrap.simulation_ci([[0.0, 0.0]] * 3, [[1.0, 2.0]] * 3) is None


@pytest.mark.slow  # ~6 s: 1,000 intervals of 1,000 resamples each
def test_bootstrap_intervals_cover_the_truth_95_percent_of_the_time():
    """Detection's statistic on a known sampling distribution: 100 activating excerpts each judged
    right with probability 0.8 and 100 non-activating ones with 0.6, so the true balanced
    accuracy is 0.7. Over 1,000 repetitions the 95% interval must cover 0.7 in 95% +- 3% of them
    (960 with these seeds)."""
    from sitegen.services import bootstrap

    rng = np.random.default_rng(2024)
    labels = [1] * 100 + [0] * 100
    covered = 0
    for rep in range(1000):
        right = np.concatenate([rng.random(100) < 0.8, rng.random(100) < 0.6])
        predictions = np.where(right, labels, 1 - np.asarray(labels))
        lo, hi = bootstrap.balanced_accuracy_ci(labels, predictions, seed=rep)
        covered += lo <= 0.7 <= hi
    assert 920 <= covered <= 980, covered
    print(f"coverage {covered / 10:.1f}%")


HOSTILE = '<img src=x onerror=alert(1)> dates & "times"'


def _explained_by_hand(tmp_path, scores: dict, unread: dict | None = None):
    """A synthetic store whose neuron 0:1 has a hand-written `sitegen explain` record."""
    from sitegen.services.neuron_explainer.explain import _write_tables

    store = write_synthetic_store(tmp_path / "store", name="toy")
    made = {name: {"calls": 4, "prompt_hash": "sha256:" + "ab" * 32} for name in scores}
    for name, count in (unread or {}).items():
        made[name]["unread"] = count
    record = {
        "explanation": HOSTILE,
        "score": scores["simulation"]["value"],
        "method": "logprobs",
        "logprob_alignment": "own",
        "prompt_hash": "sha256:" + "cd" * 32,
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "requests": 13},
        "scores": scores,
        "scorers": {"explanation": {"calls": 1, "prompt_hash": "sha256:" + "cd" * 32}, **made},
    }
    _write_tables(store, {(0, 1): record}, "<b>model</b>")
    out = tmp_path / "site"
    build_site([store.root], out)
    return out


def test_the_trust_panel_shows_every_score_escapes_the_explanation_and_flags_disagreement(tmp_path):
    scores = {
        "simulation": {"value": 0.62, "ci": [0.31, 0.8], "n": 10},
        "detection": {"value": 0.55, "ci": [0.45, 0.6], "n": 20},  # 2 x .55 - 1 = .1: far below simulation
        "fuzzing": {"value": 0.9, "ci": [0.8, 0.97], "n": 20},
    }
    out = _explained_by_hand(tmp_path, scores)
    page = (out / "toy/0/1.html").read_text()
    panel = page.split('id="trust"', 1)[1].split("</div>", 1)[0]
    for name, text in (
        ("simulation", "0.62 [0.31, 0.80]"),
        ("detection", "0.55 [0.45, 0.60]"),
        ("fuzzing", "0.90 [0.80, 0.97]"),
    ):
        row = panel.split(f'data-scorer="{name}"', 1)[1].split("</tr>", 1)[0]
        assert f'<td class="num">{text}</td>' in row and "</td><td>" in row, (
            row
        )  # the score, its interval, what it measures
    graph_row = panel.split('data-scorer="graph-f1"', 1)[1].split("</tr>", 1)[0]
    assert '<td class="num">0.60 [0.35, 0.80]</td>' in graph_row  # the synthetic graph of 0:1, with its interval
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt; dates &amp; &#34;times&#34;" in page
    assert "&lt;b&gt;model&lt;/b&gt;" in panel and "<b>model</b>" not in page  # the explainer's name, escaped too
    flags = [f for f in panel.split('<p class="flag"')[1:]]
    assert len(flags) == 2  # no interval is wider than its score; detection disagrees with both others
    assert any("disagree: simulation rates" in f and "than detection" in f for f in flags)
    assert any("disagree: fuzzing rates" in f and "than detection" in f for f in flags)
    # the layer table and the summary line show the score with its interval
    assert "0.62 [0.31, 0.80]" in (out / "toy/0/index.html").read_text()
    assert "(score 0.62 [0.31, 0.80])" in page
    # the search preview: the explanation, then every score with its interval; F1 with its interval
    preview = json.loads((out / "search/toy/preview/0/0.json").read_text())[1]
    assert preview[3] == HOSTILE and preview[4] == [0.35, 0.8]
    assert preview[5] == "simulation 0.62 [0.31, 0.80] · detection 0.55 [0.45, 0.60] · fuzzing 0.90 [0.80, 0.97]"


def test_the_trust_panel_flags_an_interval_wider_than_the_score_and_nothing_when_scores_agree(tmp_path):
    scores = {
        "simulation": {"value": 0.3, "ci": [-0.1, 0.6], "n": 4},  # width .7 > .3
        "detection": {"value": 0.6, "ci": [0.4, 0.8], "n": 20},
        "fuzzing": {"value": 0.62, "ci": [0.45, 0.8], "n": 20},
    }
    panel = (_explained_by_hand(tmp_path, scores) / "toy/0/1.html").read_text().split('id="trust"', 1)[1]
    flags = panel.split("</div>", 1)[0].split('<p class="flag"')[1:]
    assert len(flags) == 1 and "simulation interval (-0.10 to 0.60) is wider than the score (0.30)" in flags[0]


def test_the_trust_panel_says_when_a_judge_s_answers_could_not_be_read(tmp_path):
    scores = {
        "simulation": {"value": 0.5, "ci": [0.4, 0.6], "n": 10},
        "detection": {"value": 0.5, "ci": [0.5, 0.5], "n": 10},
    }
    out = _explained_by_hand(tmp_path, scores, unread={"detection": 2})
    panel = (out / "toy/0/1.html").read_text().split('id="trust"', 1)[1].split("</div>", 1)[0]
    assert "2 of 4 detection answers could not be read" in panel


def test_hard_negatives_are_quiet_calibration_excerpts_sharing_the_firing_words():
    """Train top 0 and 4 fire on " tax". Random excerpts are dealt calibration 0, 3 / valid 1, 4 /
    test 2, 5: the hard negative is random 0 (quiet, holds " tax"); random 1 holds it too but is
    simulated on (valid), so it is never shown; random 3 (quiet, no shared word) only fills up."""
    from sitegen.services.neuron_explainer.explain import explanation_messages, hard_negatives

    fires = _seq([(" the", 0), (" tax", 1.0), (" cut", 0.2)])
    top = [fires] * 8
    random = [ZERO] * 6
    random[0] = _seq([(" a", 0), (" tax", 0.05), (" form", 0)])
    random[1] = _seq([(" tax", 0.0), (" the", 0)])
    random[5] = _seq([(" tax", 0.9)])  # fires: never a negative
    texts = {"top": top, "random": random}
    assert hard_negatives(texts, 1) == ([0], 1)
    assert hard_negatives(texts, 5) == ([0, 3], 1)
    text = explanation_messages([fires], [random[0]])[-1]["content"]
    assert "Texts where it does not fire:\n<start>\n a\t0\n tax\t0\n form\t0\n<end>\n" in text
    assert "The last 1 texts are ones where the neuron does not fire" in text


def test_the_contrastive_explainer_is_recorded_and_its_negatives_are_never_judged():
    from sitegen.services.neuron_explainer.explain import explain_neuron

    fires = _seq([(" the", 0), (" tax", 1.0), (" cut", 0.2)])
    random = [_seq([(" a", 0), (" tax", 0.0), (" form", i / 100)]) for i in range(12)]
    ep = FakeEndpoint(["tax"])
    record = explain_neuron(ep, {"top": [fires] * 8, "random": random}, 2, contrastive=True)
    prompt = record["explainer_prompt"]
    assert prompt["kind"] == "contrastive" and prompt["hard"] == 2 and prompt["negatives"] == [0, 3]
    for name in ("detection", "fuzzing"):
        judged = {(x["source"], x["index"]) for x in record["scorers"][name]["excerpts"]}
        assert judged and not judged & {("random", 0), ("random", 3), ("top", 0), ("top", 4)}
    plain = explain_neuron(FakeEndpoint(["tax"]), {"top": [fires] * 8, "random": random}, 2)
    assert plain["explainer_prompt"] == {"kind": "top excerpts"} and plain["prompt_hash"] != record["prompt_hash"]
