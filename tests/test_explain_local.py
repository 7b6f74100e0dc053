"""`sitegen explain --local`: the in-process explainer, simulator and judges (transformers, no
server) on the tiny random-init model (model tier)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sitegen.services.neuron_explainer import scoring

TOKENS = [" the", " tax", " cut", "\t", " 42", "é", " law", "\n", " peace"]


def _direct_expected_values(model_dir, prompt: str, offsets: list[int]) -> list[float]:
    """Independently of local.py: the model's logits at the position before each placeholder
    token, softmaxed over the single-token levels "0".."10", and their expected level."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = tok(prompt, return_offsets_mapping=True)
    start = {s: i for i, (s, _) in enumerate(enc["offset_mapping"])}
    vocab = tok.get_vocab()
    levels = [(int(lv), vocab[lv]) for lv in map(str, range(11)) if lv in vocab]
    with torch.no_grad():
        logits = lm(torch.tensor([enc["input_ids"]])).logits[0].double().numpy()
    out = []
    for off in offsets:
        row = logits[start[off] - 1, [t for _, t in levels]]
        p = np.exp(row - row.max())
        p /= p.sum()
        out.append(float(sum(lv * q for (lv, _), q in zip(levels, p))))
    return out


@pytest.mark.model
def test_in_process_expected_values_are_a_direct_softmax_over_the_level_tokens(tiny_model_dir):
    from sitegen.services.neuron_explainer.local import LocalModel

    lm = LocalModel(str(tiny_model_dir))
    assert len(lm.levels) >= 10  # every digit is one token of the tiny BPE
    prompt, offsets = scoring.simulation_prompt("numbers and taxes.", TOKENS)
    answer = lm.post("/completions", {"prompt": prompt, "echo": True, "logprobs": 10, "max_tokens": 1})
    logprobs = answer["choices"][0]["logprobs"]
    assert "".join(logprobs["tokens"]) == prompt
    got = scoring.predictions_from_echo(prompt, offsets, logprobs, lm.alignment)
    want = _direct_expected_values(tiny_model_dir, prompt, offsets)
    assert None not in got and got == pytest.approx(want, abs=1e-6)
    # every level token is listed at each placeholder: no top-k truncation
    for top in scoring.placeholder_distributions(prompt, offsets, logprobs, lm.alignment):
        assert set(lm.levels) <= set(top)


@pytest.mark.model
def test_a_judge_held_to_a_list_answers_the_likelier_of_0_and_1_at_each_value(tiny_model_dir):
    """The in-process judge's answer under classify.answer_format: a readable list whose every
    value is the likelier of "0" and "1" after the prompt and the list so far, recomputed here with
    one full forward pass per value (no cache)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sitegen.services.neuron_explainer import classify
    from sitegen.services.neuron_explainer.local import LocalModel

    lm = LocalModel(str(tiny_model_dir))
    assert lm.constrains_answers
    messages = [{"role": "user", "content": "Explanation: taxes.\n\nExcerpts:\n1. the tax cut\n2. peace\n3. 42 laws\n"}]
    size = 7
    answer = lm.post(
        "/chat/completions",
        {"messages": messages, "temperature": 0, "max_tokens": 40, "response_format": classify.answer_format(size)},
    )
    text = answer["choices"][0]["message"]["content"]
    got = classify.parse_answer(text, size)
    assert got is not None and text == "[" + ", ".join(map(str, got)) + "]"

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = lm._chat_ids(messages)[0].tolist()
    zero, one = tok.convert_tokens_to_ids("0"), tok.convert_tokens_to_ids("1")
    want = []
    for k in range(size):
        ids += tok.encode("[" if k == 0 else ", ", add_special_tokens=False)
        with torch.no_grad():
            last = model(torch.tensor([ids])).logits[0, -1]
        want.append(int(last[one] > last[zero]))
        ids.append(one if want[-1] else zero)
    assert got == want


@pytest.fixture(scope="module")
def tiny_store(tiny_model_dir, tiny_corpus, tmp_path_factory):
    from sitegen.compute.runner import ComputeConfig, run_compute

    out = tmp_path_factory.mktemp("local") / "store"
    cfg = ComputeConfig(
        model=str(tiny_model_dir),
        corpus=str(tiny_corpus),
        out=out,
        tokens=1500,
        seq_len=16,
        seed=3,
        top_k=8,
        n_random=12,
        batch_size=4,
        device="cpu",
        progress=False,
    )
    run_compute(cfg, log=lambda m: None)
    return out


@pytest.mark.model
def test_explain_local_writes_the_endpoint_paths_records_and_every_score(tiny_store, tmp_path):
    from sitegen.services.neuron_explainer.explain import ExplainConfig, run_explain
    from sitegen.site.build import build_site
    from sitegen.store import Store

    result = run_explain(ExplainConfig(store=tiny_store, local=True, neurons="1:3"), log=lambda m: None)
    assert result == {"done": 1, "failed": 0}
    row = Store.open(tiny_store).read_layer("neuron_explainer", 1).to_pylist()[0]
    assert row["explainer"].endswith("(in-process)") and row["method"] == "logprobs"
    assert row["logprob_alignment"] == "own"
    scores, made = json.loads(row["scores"]), json.loads(row["scorers"])
    assert set(scores) == {"simulation", "detection", "fuzzing"}
    assert made["simulation"]["calls"] == scores["simulation"]["n"]  # one forward pass per scored sequence
    for name in ("detection", "fuzzing"):  # the in-process judge always answers a readable list
        assert made[name]["method"] == "constrained" and made[name]["unread"] == 0, made[name]
    out = tmp_path / "site"
    build_site([tiny_store], out)
    page = next(out.glob("*/1/3.html")).read_text()
    assert "(in-process)</b>" in page and 'data-scorer="detection"' in page


@pytest.mark.model
def test_local_options_are_one_line_errors(tiny_store, tmp_path):
    from sitegen.errors import ConfigError
    from sitegen.services.neuron_explainer.explain import ExplainConfig, run_explain

    with pytest.raises(ConfigError, match="^--endpoint with --local: the in-process model needs no endpoint"):
        run_explain(ExplainConfig(store=tiny_store, local=True, endpoint="http://127.0.0.1:9/v1"), log=lambda m: None)
    with pytest.raises(ConfigError, match="^give --endpoint URL and --model NAME"):
        run_explain(ExplainConfig(store=tiny_store), log=lambda m: None)
    with pytest.raises(ConfigError, match="^--local-model .*: no such file or folder"):
        run_explain(ExplainConfig(store=tiny_store, local_model=str(tmp_path / "nope")), log=lambda m: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="^--local-model .*: the folder has no config.json"):
        run_explain(ExplainConfig(store=tiny_store, local_model=str(tmp_path / "empty")), log=lambda m: None)
