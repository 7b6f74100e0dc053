"""`sitegen explain`'s transport and work log: a whole-request deadline (a trickling server), a
size cap, refused numeric options, two runs on one store, failures that stay per neuron, and the
no-logprobs prompt and parser agreeing on what a line is. Fake servers on loopback, bounded in time."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import orjson
import pytest

from sitegen.services.neuron_explainer import scoring
from sitegen.services.neuron_explainer.explain import Endpoint, EndpointError, ExplainConfig, run_explain, simulate
from tests.conftest import free_port
from tests.reference import explain_argv, write_synthetic_store
from tests.test_explain import WORDS, Stub


@pytest.fixture
def store(tmp_path):
    return write_synthetic_store(tmp_path / "store", name="toy", vocab=WORDS, with_graphs=False, top_k=8, n_random=6)


def _cfg(store, url, **kw):
    return ExplainConfig(
        store=store.root,
        endpoint=url,
        model="stub-model",
        **{"neurons": "0:1,1:2", "concurrency": 2, "timeout": 5, "retries": 0, **kw},
    )


def _work_lines(store) -> list[dict]:
    return [json.loads(line) for line in (store.root / ".work/explain.jsonl").read_text().splitlines() if line.strip()]


def _table(store, layer) -> dict[int, dict]:
    from sitegen.store import Store

    return {r["neuron"]: r for r in Store.open(store.root).read_layer("neuron_explainer", layer).to_pylist()}


class Trickler:
    """A raw TCP server that answers every connection one byte at a time, a byte every `every`
    seconds (for at most `total` seconds): in the status line and headers (phase "headers") or
    after whole headers announcing a JSON body (phase "body"). No per-read timeout ever trips."""

    def __init__(self, phase: str, every: float = 0.3, total: float = 12.0):
        self.phase, self.every, self.total = phase, every, total
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        body = b'{"choices": [{"message": {"content": "the word tax."}}], "pad": "' + b"x" * 200 + b'"}'
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        slow, fast = (head + body, b"") if self.phase == "headers" else (body, head)
        end = time.monotonic() + self.total
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(fast)
                for i in range(len(slow)):
                    if time.monotonic() > end:
                        return
                    conn.sendall(slow[i : i + 1])
                    time.sleep(self.every)
            except OSError:
                return  # the client hung up: what the deadline does

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_timeout_bounds_the_whole_request_against_a_trickling_server(phase):
    """A byte every 0.3 s keeps every read under a 1 s socket timeout; the whole request must
    still end at 1 s (and 2 tries at about 2 s plus the 1 s backoff), as a per-neuron timeout."""
    server = Trickler(phase)
    try:
        ep = Endpoint(server.url, "m", None, timeout=1.0, retries=0, api_key_env=None)
        t0 = time.monotonic()
        with pytest.raises(EndpointError) as e:
            ep.post("/chat/completions", {"messages": []})
        took = time.monotonic() - t0
        assert e.value.kind == "timeout" and not e.value.fatal and "within 1 s" in str(e.value)
        assert 0.9 < took < 2.5, took
        ep.retries = 1
        t0 = time.monotonic()
        with pytest.raises(EndpointError, match="2 tries"):
            ep.post("/chat/completions", {"messages": []})
        assert 2.9 < time.monotonic() - t0 < 5
    finally:
        server.close()


def test_a_trickling_server_fails_its_neurons_and_the_run_ends(store):
    server = Trickler("body")
    logs: list[str] = []
    try:
        t0 = time.monotonic()
        result = run_explain(_cfg(store, server.url, timeout=1.0), log=logs.append)
        took = time.monotonic() - t0
    finally:
        server.close()
    assert result == {"done": 0, "failed": 2}
    assert took < 6, took  # two neurons in parallel, one explanation request each, 1 s apiece
    assert sum("raise --timeout" in m and "asked again on the next run" in m for m in logs) == 2


class BigAnswer(Stub):
    """The stub, except that the first explanation request gets a valid JSON answer of `size`
    bytes, with a Content-Length or streamed without one (closing the connection at its end)."""

    def __init__(self, size: int, announce: bool):
        self.size, self.announce, self.big_sent = size, announce, 0
        super().__init__("ok")
        stub, handler = self, self.server.RequestHandlerClass
        lock = threading.Lock()

        def do_POST(h):
            length = int(h.headers.get("Content-Length") or 0)
            raw = h.rfile.read(length)
            with lock:
                big = b"Neuron B" in raw and stub.big_sent == 0
                stub.big_sent += big
            if not big:  # the stub's own handler answers, reading the body already read from a copy
                h.rfile = io.BytesIO(raw)
                return handler._stub_post(h)
            body = b'{"choices": [{"message": {"content": "x"}}], "pad": "' + b"y" * stub.size + b'"}'
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            if stub.announce:
                h.send_header("Content-Length", str(len(body)))
            h.send_header("Connection", "close")
            h.end_headers()
            h.close_connection = True
            try:
                for i in range(0, len(body), 1 << 16):
                    h.wfile.write(body[i : i + (1 << 16)])
            except OSError:
                pass  # the client stopped reading

        handler._stub_post = handler.do_POST
        handler.do_POST = do_POST
        self.server.handle_error = lambda *a: None  # the client hanging up mid-answer is the point


@pytest.mark.parametrize("announce", [True, False], ids=["content-length", "streamed"])
def test_an_answer_over_the_size_cap_fails_that_neuron_only(store, announce):
    stub = BigAnswer(3 * 2**20, announce)
    logs: list[str] = []
    try:
        result = run_explain(_cfg(store, stub.url, max_response_mb=1), log=logs.append)
        assert result == {"done": 1, "failed": 1}
        assert sum("larger than 1 MB" in m and "--max-response-mb" in m for m in logs) == 1
        # nothing of it reached the work log; the finished neuron is kept and a rerun asks only the other
        assert max(len(line) for line in (store.root / ".work/explain.jsonl").read_bytes().splitlines()) < 2**20
        assert run_explain(_cfg(store, stub.url, max_response_mb=1), log=logs.append) == {"done": 2, "failed": 0}
    finally:
        stub.close()
    assert set(_table(store, 0)) | set(_table(store, 1)) == {1, 2}


def test_the_size_cap_is_read_from_the_default_too():
    """A 50 MB answer stops at the default cap (8 MB) on the Endpoint itself."""
    stub = BigAnswer(50 * 2**20, announce=False)
    try:
        ep = Endpoint(stub.url, "m", None, timeout=10, retries=0, api_key_env=None)
        with pytest.raises(EndpointError) as e:
            ep.post("/chat/completions", {"messages": [{"role": "user", "content": "Neuron B"}]})
    finally:
        stub.close()
    assert e.value.kind == "size" and not e.value.fatal and "larger than 8 MB" in str(e.value)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--timeout", "-1"], "--timeout -1:"),
        (["--timeout", "nan"], "--timeout nan:"),
        (["--timeout", "inf"], "--timeout inf:"),
        (["--timeout", "0"], "--timeout 0:"),
        (["--max-response-mb", "0"], "--max-response-mb 0:"),
        (["--retries", "-1"], "--retries -1:"),
    ],
)
def test_bad_numbers_are_one_line_option_errors(store, args, needle):
    port = free_port()  # nothing listens: the options are refused before any request
    res = subprocess.run(
        explain_argv(store, f"http://127.0.0.1:{port}/v1", "m", "0:1", *args),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
    assert not (store.root / ".work").exists()


class Meeting(Stub):
    """The stub, holding the first explanation request of each of two runs until both have come,
    so that both runs have read the work log before either writes anything."""

    def __init__(self):
        super().__init__("ok")
        self.barrier, self.met, self.seen = threading.Barrier(2, timeout=90), [], 0
        self._lock = threading.Lock()

    def answer(self, path, body, auth):
        if path.endswith("/chat/completions") and "Neuron B" in json.dumps(body):
            with self._lock:
                self.seen += 1
                first_two = self.seen <= 2
            if first_two:
                try:
                    self.barrier.wait()
                    self.met.append(True)
                except threading.BrokenBarrierError:
                    self.met.append(False)
        return super().answer(path, body, auth)


def test_two_runs_on_one_store_keep_each_others_neurons(store):
    stub = Meeting()
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }

    def run(neurons):
        return subprocess.Popen(
            explain_argv(store, stub.url, "stub-model", neurons, "--concurrency", "1", "--retries", "0"),
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    try:
        procs = [run("0:1,1:2"), run("0:2,1:3")]
        errs = [p.communicate(timeout=300)[1] for p in procs]
        assert stub.met == [True, True], "the two runs did not overlap"
        assert [p.returncode for p in procs] == [0, 0], errs
        finished = {(r["layer"], r["neuron"]) for r in _work_lines(store) if r.get("explanation")}
        assert finished == {(0, 1), (1, 2), (0, 2), (1, 3)}
        assert set(_table(store, 0)) == {1, 2} and set(_table(store, 1)) == {2, 3}
        assert all(r["explanation"] == 'the word "tax".' for layer in (0, 1) for r in _table(store, layer).values())
        before = len(stub.calls)
        assert run_explain(_cfg(store, stub.url, neurons="0:1,0:2,1:2,1:3"), log=lambda m: None) == {
            "done": 4,
            "failed": 0,
        }
        assert len(stub.calls) == before  # nothing asked again
    finally:
        stub.close()


class RevokedKey(Stub):
    """The stub; the second explanation request is refused (HTTP 401, which stops the run) while
    the first neuron's simulations are still being answered (slowly)."""

    def __init__(self):
        super().__init__("ok")
        self.explanations = 0
        self._lock = threading.Lock()

    def answer(self, path, body, auth):
        if path.endswith("/chat/completions") and "Neuron B" in json.dumps(body):
            with self._lock:
                self.explanations += 1
                if self.explanations == 2:
                    return 401, {"error": {"message": "key revoked"}}
        elif path.endswith("/completions"):
            time.sleep(0.3)
        return super().answer(path, body, auth)


def test_a_fatal_error_keeps_the_neurons_the_pool_finishes(store):
    stub = RevokedKey()
    try:
        with pytest.raises(EndpointError, match="refused the API key") as e:
            run_explain(_cfg(store, stub.url), log=lambda m: None)
    finally:
        stub.close()
    assert e.value.fatal
    finished = [(r["layer"], r["neuron"]) for r in _work_lines(store) if r.get("explanation")]
    assert len(finished) == 1  # the neuron in flight when the key was refused finished, and is kept
    layer, n = finished[0]
    assert set(_table(store, layer)) == {n}


class ListBody(Stub):
    """The stub; the first explanation request is answered with valid JSON that is not an object."""

    def __init__(self):
        super().__init__("ok")
        self.sent = False
        self._lock = threading.Lock()

    def answer(self, path, body, auth):
        if path.endswith("/chat/completions") and "Neuron B" in json.dumps(body):
            with self._lock:
                first, self.sent = not self.sent, True
            if first:
                return 200, [{"message": {"content": "a list, not an object"}}]
        return super().answer(path, body, auth)


def test_a_malformed_answer_fails_its_neuron_and_a_rerun_resumes(store):
    # a line cut by a crash of an earlier run: the next record still starts a line of its own
    (store.root / ".work").mkdir()
    (store.root / ".work/explain.jsonl").write_bytes(b'{"layer": 0, "neuron": 1, "expl')
    stub = ListBody()
    logs: list[str] = []
    try:
        assert run_explain(_cfg(store, stub.url), log=logs.append) == {"done": 1, "failed": 1}
        assert sum("asked again on the next run" in m for m in logs) == 1
        finished = [
            (r["layer"], r["neuron"])
            for r in (orjson.loads(x) for x in (store.root / ".work/explain.jsonl").read_bytes().splitlines()[1:])
            if r.get("explanation")
        ]
        assert len(finished) == 1
        calls = len(stub.calls)
        assert run_explain(_cfg(store, stub.url), log=logs.append) == {"done": 2, "failed": 0}
        assert (
            sum("Neuron B" in json.dumps(b) for _, b, _ in stub.calls[calls:]) == 1
        )  # only the failed neuron asked again
    finally:
        stub.close()
    assert {(layer, n) for layer in (0, 1) for n in _table(store, layer)} == {(0, 1), (1, 2)}


def test_no_token_splits_a_prompt_line():
    every = "".join(map(chr, range(0x110000)))
    assert len(scoring._shown(every).splitlines()) == 1 and "\t" not in scoring._shown(every)


class Rewriter:
    """Endpoint.post for the logprob-free simulation: a perfect simulator that copies each line of
    the last excerpt as sent (lines end at "\\n", the only line end the prompt writes) and puts the
    planted level in place of the "?"."""

    base = "http://127.0.0.1:9/v1"  # named in messages only

    def __init__(self, levels):
        self.levels, self.asked = levels, None

    def post(self, path, body):
        if path == "/completions":
            return {"choices": [{"text": "", "logprobs": None}]}
        self.asked = body["messages"][-1]["content"]
        excerpt = self.asked.rsplit("<start>\n", 1)[1].split("<end>")[0]
        lines = [ln for ln in excerpt.split("\n") if ln.endswith("\t?")]
        return {
            "choices": [{"message": {"content": "\n".join(ln[:-1] + str(lv) for ln, lv in zip(lines, self.levels))}}]
        }


# every character str.splitlines() ends a line at, and the two-character "\r\n"
@pytest.mark.parametrize(
    "brk", ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"], ids=repr
)
def test_a_perfect_rewrite_of_tokens_holding_line_breaks_is_read(brk):
    tokens = [" the", f" a{brk}b", brk, f"{brk} tax", " cut"]
    levels = [0, 7, 3, 10, 1]
    ep = Rewriter(levels)
    pred, method, _, read = simulate(ep, "the word tax.", tokens, {})
    assert method == "no-logprobs" and read and pred == [float(x) for x in levels]
    assert ep.asked.count("\t?\n") == len(tokens)


@pytest.fixture
def tls_server(tmp_path, monkeypatch):
    """A TLS server on loopback with a self-signed certificate the client trusts (SSL_CERT_FILE):
    mode "ok" answers at once, "trickle" a byte every 0.3 s, "handshake" never speaks TLS."""
    import shutil
    import ssl

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    state = {"mode": "ok"}

    def answer(conn):
        try:
            if state["mode"] == "handshake":
                time.sleep(10)
                return
            with context.wrap_socket(conn, server_side=True) as s:
                s.recv(65536)
                body = b'{"choices": [{"message": {"content": "over TLS"}}]}'
                data = (
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                    + body
                )
                for i in range(len(data)):
                    s.sendall(data[i : i + 1])
                    time.sleep(0.3 if state["mode"] == "trickle" else 0)
                time.sleep(1)  # let the client read before the close
        except OSError:
            pass

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield f"https://127.0.0.1:{listener.getsockname()[1]}/v1", state
    listener.close()


def test_the_deadline_holds_over_tls(tls_server):
    url, state = tls_server
    ep = Endpoint(url, "m", None, timeout=1.5, retries=0, api_key_env=None)
    assert ep.post("/chat/completions", {"messages": []})["choices"][0]["message"]["content"] == "over TLS"
    for mode in ("trickle", "handshake"):
        state["mode"] = mode
        t0 = time.monotonic()
        with pytest.raises(EndpointError) as e:
            ep.post("/chat/completions", {"messages": []})
        assert e.value.kind == "timeout" and 1.4 < time.monotonic() - t0 < 3, mode


def test_an_unreadable_work_log_is_one_line(store):
    (store.root / ".work/explain.jsonl").mkdir(parents=True)  # a folder where the log should be
    port = free_port()
    res = subprocess.run(
        explain_argv(store, f"http://127.0.0.1:{port}/v1", "m", "0:1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ") and "explain.jsonl" in lines[0], (
        res.stderr
    )


def test_a_run_with_another_model_keeps_the_first_models_log(store):
    stub = Stub("ok")
    try:
        run_explain(_cfg(store, stub.url, neurons="0:1"), log=lambda m: None)
        run_explain(
            ExplainConfig(
                store=store.root, endpoint=stub.url, model="other-model", neurons="1:2", timeout=5, retries=0
            ),
            log=lambda m: None,
        )
        assert {(r["model"], r["layer"], r["neuron"]) for r in _work_lines(store)} == {
            ("stub-model", 0, 1),
            ("other-model", 1, 2),
        }
        before = len(stub.calls)
        assert run_explain(_cfg(store, stub.url, neurons="0:1"), log=lambda m: None) == {"done": 1, "failed": 0}
        assert len(stub.calls) == before
    finally:
        stub.close()


def test_an_answer_cut_short_is_retried_then_fails_its_neuron_only():
    """Content-Length 1000, 40 bytes sent, connection closed: retried, then a per-neuron failure."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    connections = []

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            connections.append(conn)
            with conn:
                conn.recv(65536)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                    + b'{"choices": ['
                    + b" " * 27
                )

    threading.Thread(target=serve, daemon=True).start()
    try:
        ep = Endpoint(
            f"http://127.0.0.1:{listener.getsockname()[1]}/v1", "m", None, timeout=5, retries=1, api_key_env=None
        )
        with pytest.raises(EndpointError) as e:
            ep.post("/chat/completions", {"messages": []})
    finally:
        listener.close()
    assert e.value.kind == "protocol" and not e.value.fatal and "2 tries" in str(e.value) and len(connections) == 2
