"""`sitegen explain`: write and score explanations with any OpenAI-compatible endpoint (OpenAI,
vLLM, llama.cpp's server, Ollama). No torch: it reads the store's top and random sequences.

Per neuron (as OpenAI's automated-interpretability, Bills et al. 2023):
    top sequences dealt round-robin into train / calibration / valid / test, random sequences
    into calibration / valid / test (as the reference; calibration is kept aside, unused); the
    explainer sees train (5 with the default 20), discretised 0-10 -> one chat request per
    explanation -> simulation from the explanation alone: all at once per sequence with echo +
    logprobs on /v1/completions (expected value over "0".."10"), or, when the endpoint gives no
    logprobs, the logprob-free fallback (the model rewrites the lines with integers at
    temperature 0) -> pooled correlation = the score. The reported score is on the test split;
    with several samples the explanation is chosen on the valid split, so the test score carries
    no selection bias.

Results are appended to STORE/.work/explain.jsonl as each neuron finishes (a rerun skips them) and
written into STORE/neuron_explainer/ at the end, both under a lock, so concurrent runs on one
store keep each other's neurons. Each request is bounded in wall-clock time and size. The API key is read from an environment variable,
sent only to the endpoint named (no redirects; https unless loopback or --allow-insecure-http) and
never written anywhere.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import http.client
import ipaddress
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import orjson
import pyarrow as pa
from pydantic import Field, ValidationError

from sitegen.errors import ConfigError, SitegenError, StoreError
from sitegen.services import bootstrap
from sitegen.services.neuron_explainer import answers, classify, scoring
from sitegen.services.neuron_explainer.published import SERVICE, TABLE_SCHEMA
from sitegen.services.selection import select_neurons
from sitegen.store.manifest import Record

SOURCE_EXPLAIN = "sitegen explain"
PRIMER = "the main thing this neuron does is find"
SYSTEM = (
    "You study one neuron of a neural network. Each neuron looks for one kind of thing in short texts. You are shown "
    "texts as one token per line, `token<TAB>activation`, between <start> and <end>; activations go from 0 (nothing) to "
    "10 (the strongest match). Say in one short phrase what the neuron responds to. Do not list the example words one "
    "by one; describe what they have in common."
)
# A made-up neuron shows the format (our own example, not from any dataset).
FEW_SHOT = [
    (
        "<start>\n the\t0\n price\t0\n rose\t0\n to\t0\n $\t2\n40\t10\n million\t6\n.\t0\n<end>\n"
        "<start>\n about\t0\n 12\t9\n percent\t3\n of\t0\n voters\t0\n<end>\n",
        "numbers, especially amounts of money and percentages.",
    )
]


class EndpointError(SitegenError):
    """An endpoint failure. `kind` says what failed, and `fatal` whether every other neuron would
    fail the same way (stop the run) rather than only this one (asked again on the next run)."""

    stage = "endpoint"
    FATAL_KINDS = frozenset({"unreachable", "auth", "model", "redirect", "alignment"})

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind

    @property
    def fatal(self) -> bool:
        return self.kind in self.FATAL_KINDS


OPENAI_HOST = "api.openai.com"
MAX_RESPONSE_MB = (
    8.0  # default --max-response-mb: the largest answer read (an echo of a 128-token excerpt: about 0.2 MB)
)
OPENAI_KEY_ENV = "OPENAI_API_KEY"
SCORERS = ("simulation", *classify.SCORERS)


@dataclass
class ExplainConfig:
    store: Path
    endpoint: str | None = None  # None with `local`
    model: str | None = None
    api_key_env: str | None = None  # None: $OPENAI_API_KEY for api.openai.com, no key elsewhere
    neurons: str = "5"
    concurrency: int = 4
    timeout: float = 60.0
    retries: int = 4
    max_response_mb: float = MAX_RESPONSE_MB  # a larger answer fails its neuron
    explainer_excerpts: int = 5
    samples: int = 1  # explanations sampled per neuron; chosen on the valid split, reported on test
    allow_insecure_http: bool = False  # send the key over plain http to a non-loopback host
    contrastive: bool = False  # show the explainer hard negatives beside its top excerpts
    dry_run: bool = False
    scorers: tuple[str, ...] = SCORERS  # simulation always; detection and fuzzing as chosen
    # activating and non-activating held-out excerpts per classification scorer
    scorer_excerpts: int = classify.PER_CLASS
    local: bool = False  # explain and score in-process with the store's own model (local.py)
    local_model: str | None = None  # another model in-process: a checkpoint folder or .gguf file


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: not resolved here (it could point anywhere)


def endpoint_key(endpoint: str, api_key_env: str | None, allow_insecure_http: bool) -> tuple[str | None, str | None]:
    """(the API key to send or None, the variable it came from), refusing before any request what
    would send the key somewhere the user did not mean: $OPENAI_API_KEY goes only to
    api.openai.com unless --api-key-env names a variable, and never over plain http to a host
    other than loopback unless --allow-insecure-http."""
    url = urllib.parse.urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(
            f"--endpoint {endpoint}: give an http(s) URL, e.g. https://api.openai.com/v1 or http://127.0.0.1:8080/v1"
        )
    host = url.hostname
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise ConfigError(
                f"--api-key-env {api_key_env}: the environment variable ${api_key_env} is not set; export it or name another one"
            )
        env = api_key_env
    elif host.lower() == OPENAI_HOST:
        key, env = os.environ.get(OPENAI_KEY_ENV) or None, OPENAI_KEY_ENV
    else:
        return None, None  # another provider's key is never guessed
    if key and url.scheme == "http" and not _is_loopback(host) and not allow_insecure_http:
        raise ConfigError(
            f"--endpoint {endpoint}: the API key would travel unencrypted to {host}; use https, "
            "or pass --allow-insecure-http if that network is trusted"
        )
    return key, env


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are refused: urllib would follow one with the Authorization header to wherever it
    points, turning the POST into a GET. The 3xx then surfaces as an HTTPError."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class _Deadline:
    """One request's wall-clock limit, over connect, TLS, headers and body. A socket timeout bounds
    each read, not the request: a server sending a byte every 2 s never trips one. So the connect
    and TLS handshake get the time left, and then a timer shuts the socket down at the deadline,
    which wakes a blocked read; the caller sees `expired` and reports a timeout."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.expired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline")
        return left

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            expired = self.expired
        if expired:
            raise TimeoutError("deadline")

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sock = self._sock
        if sock is not None:
            try:  # the plain socket's shutdown, also for TLS: it leaves the SSL object to the reading thread
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass  # already closed: the request is over


def _watched(base: type) -> type:
    """An http.client connection class whose socket lives under the request's _Deadline."""

    class Connection(base):
        def __init__(self, *args, deadline: _Deadline, **kwargs):
            super().__init__(*args, **kwargs)
            self._deadline = deadline
            self._create_connection = self._connect_in_time

        def _connect_in_time(self, address, timeout, source_address=None):
            # (name resolution inside cannot be interrupted; the deadline is checked after it)
            sock = socket.create_connection(address, self._deadline.left(), source_address)
            try:
                sock.settimeout(self._deadline.left())  # the TLS handshake (one timed call) gets what is left
            except TimeoutError:
                sock.close()
                raise
            return sock

        def connect(self):
            super().connect()
            self._deadline.watch(self.sock)

    return Connection


_HTTPConnection = _watched(http.client.HTTPConnection)
_HTTPSConnection = _watched(http.client.HTTPSConnection)


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_HTTPConnection, req, deadline=req.deadline)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        kwargs = {"context": self._context}
        if getattr(self, "_check_hostname", None) is not None:  # Python < 3.12 only
            kwargs["check_hostname"] = self._check_hostname
        return self.do_open(_HTTPSConnection, req, deadline=req.deadline, **kwargs)


_CHUNK = 64 * 1024


class Endpoint:
    """A minimal OpenAI-compatible client (stdlib only): JSON POST; each try bounded by `timeout`
    seconds of wall clock (connect to last byte) and `max_bytes` of answer; retries with
    exponential backoff on 429, 5xx, timeouts and dropped connections; one-line errors for the
    rest; no redirects followed."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None,
        timeout: float,
        retries: int,
        api_key_env: str | None,
        max_bytes: int = int(MAX_RESPONSE_MB * 2**20),
    ):
        self.base = base_url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.model, self.key, self.timeout, self.retries, self.key_env = model, api_key, timeout, retries, api_key_env
        self.max_bytes = max_bytes
        self._opener = urllib.request.build_opener(_NoRedirect, _DeadlineHTTPHandler, _DeadlineHTTPSHandler)

    def _exchange(self, url: str, data: bytes, headers: dict, deadline: _Deadline) -> tuple[int, object, bytes]:
        """(status, headers, body) of one try: a 2xx body whole, at most max_bytes (else EndpointError
        "size"); an error status's first 300 bytes, for the message."""
        req = urllib.request.Request(url, data=data, headers=headers, method="POST")
        req.deadline = deadline
        try:
            r = self._opener.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            r = e  # an error status is a response too: its body is read under the same deadline
        with r:
            if not 200 <= r.status < 300:
                return r.status, r.headers, r.read(300)
            length = r.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > self.max_bytes:
                raise self._too_large(url)
            body = bytearray()
            while chunk := r.read(_CHUNK):
                body += chunk
                if len(body) > self.max_bytes:
                    raise self._too_large(url)
            if r.length:  # bytes announced but never sent (a read in pieces does not raise this itself)
                raise http.client.IncompleteRead(bytes(body), r.length)
        if deadline.expired:  # the shutdown may have ended the body early: not an answer
            raise TimeoutError("deadline")
        return r.status, r.headers, bytes(body)

    def _too_large(self, url: str) -> EndpointError:
        # one answer this large fails this neuron only (asked again on the next run)
        return EndpointError(
            f"{url}: the answer is larger than {self.max_bytes / 2**20:g} MB; stopped reading it "
            "(raise --max-response-mb if the endpoint's answers are that large)",
            "size",
        )

    def post(self, path: str, body: dict) -> dict:
        data = orjson.dumps({"model": self.model, **body})
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        delay = 1.0
        for attempt in range(self.retries + 1):
            retry = attempt < self.retries
            with _Deadline(self.timeout) as deadline:
                try:
                    status, resp_headers, raw = self._exchange(self.base + path, data, headers, deadline)
                except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
                    if isinstance(e, ValueError) and not deadline.expired:
                        raise  # not a transport failure (a closed TLS socket's ValueError follows only the deadline's shutdown)
                    reason = getattr(e, "reason", e)
                    if deadline.expired or isinstance(e, TimeoutError) or isinstance(reason, TimeoutError):
                        if retry:
                            time.sleep(delay)
                            delay *= 2
                            continue
                        # a slow answer fails this neuron only (asked again on the next run)
                        raise EndpointError(
                            f"{self.base}{path}: no whole answer within {self.timeout:g} s, {self.retries + 1} tries; "
                            "raise --timeout",
                            "timeout",
                        ) from None
                    if isinstance(e, http.client.HTTPException) and not isinstance(e, OSError):
                        if retry:
                            time.sleep(delay)
                            delay *= 2
                            continue
                        # a broken answer (cut short, not HTTP): this neuron only
                        raise EndpointError(
                            f"{self.base}{path}: broken HTTP answer ({type(e).__name__}), {self.retries + 1} tries",
                            "protocol",
                        ) from None
                    if retry and not isinstance(reason, ConnectionRefusedError):
                        time.sleep(delay)
                        delay *= 2
                        continue
                    raise EndpointError(
                        f"{self.base}: unreachable ({reason}); check --endpoint and that the server runs", "unreachable"
                    ) from None
            if 300 <= status < 400:
                where = " ".join(str(resp_headers.get("Location") or "elsewhere").split())[:200]
                raise EndpointError(
                    f"{self.base}{path}: the endpoint redirects (HTTP {status} to {where}); sitegen follows no "
                    "redirect (the API key would go along): pass the final URL as --endpoint",
                    "redirect",
                )
            if status >= 400:
                detail = raw.decode("utf-8", "replace")
                if status == 401 or status == 403:
                    fix = (
                        f"set ${self.key_env} to a valid key"
                        if self.key_env
                        else "name the variable holding the key with --api-key-env"
                    )
                    raise EndpointError(f"{self.base}: the endpoint refused the API key (HTTP {status}); {fix}", "auth")
                if status == 404 and "model" in detail.lower():
                    raise EndpointError(
                        f"{self.base}: unknown model {self.model!r} (HTTP 404); pass a model the endpoint serves with --model",
                        "model",
                    )
                if (status == 429 or status >= 500) and retry:
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise EndpointError(f"{self.base}{path}: HTTP {status}: {' '.join(detail.split())[:200]}", "http")
            try:
                return orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise EndpointError(
                    f"{self.base}{path}: the answer is not JSON; is --endpoint an OpenAI-compatible API?", "json"
                ) from None
        raise EndpointError(f"{self.base}{path}: no answer after {self.retries + 1} tries", "http")


def _excerpt(tokens: list[str], levels: list[int], nonzero_only: bool = False) -> str:
    lines = [f"{scoring._shown(t)}\t{lv}" for t, lv in zip(tokens, levels) if lv or not nonzero_only]
    return "<start>\n" + "\n".join(lines) + "\n<end>\n"


SPARSE = 0.2  # below this proportion of non-zero levels, the excerpts are repeated with their firing tokens alone


CONTRASTIVE = (
    "The last {k} texts are ones where the neuron does not fire although they share words with the texts where it "
    "does; say what the texts where it fires have that these lack."
)


def explanation_messages(
    excerpts: list[tuple[list[str], list[float]]], negatives: list[tuple[list[str], list[float]]] = ()
) -> list[dict]:
    """Chat messages asking for the explanation of a neuron from its train excerpts and, for the
    contrastive explainer, hard negatives shown after them (on the same 0-10 scale)."""
    max_act = max((max(a) for _, a in excerpts if a), default=0.0)
    levels = [scoring.discretise(acts, max_act) for _, acts in excerpts]
    body = [_excerpt(tokens, lv) for (tokens, _), lv in zip(excerpts, levels)]
    # One proportion pooled over every excerpt shown, as the reference: when few tokens fire,
    # every excerpt is repeated listing only its non-zero tokens.
    n_levels = sum(len(lv) for lv in levels)
    if n_levels and sum(1 for lvs in levels for lv in lvs if lv) < SPARSE * n_levels:
        body.append("Same activations, with all zeros filtered out:\n")
        body.extend(_excerpt(tokens, lv, nonzero_only=True) for (tokens, _), lv in zip(excerpts, levels))
    messages = [{"role": "system", "content": SYSTEM}]
    for shown, answer in FEW_SHOT:
        messages.append({"role": "user", "content": f"Neuron A\n{shown}\nComplete the sentence: {PRIMER} ..."})
        messages.append({"role": "assistant", "content": answer})
    contrast = ""
    if negatives:
        body.append("Texts where it does not fire:\n")
        body.extend(_excerpt(tokens, scoring.discretise(acts, max_act)) for tokens, acts in negatives)
        contrast = "\n" + CONTRASTIVE.format(k=len(negatives))
    messages.append(
        {"role": "user", "content": "Neuron B\n" + "".join(body) + f"{contrast}\nComplete the sentence: {PRIMER} ..."}
    )
    return messages


def hard_negatives(texts: dict, n: int) -> tuple[list[int], int]:
    """(random excerpt indices, how many of them are hard) for the contrastive explainer: random
    excerpts of the calibration split (never simulated or scored on: sitegen uses no calibration)
    where the neuron does not fire (below classify.THRESHOLD x its top activation) that hold the
    most of the tokens where the train excerpts fire; hard means at least one such token. With
    fewer hard ones, the calibration split's other quiet excerpts fill up to n."""
    train = [texts["top"][i] for i in deal(len(texts["top"]), TOP_SPLITS)["train"]]
    top_max = max((max(a) for _, a in texts["top"] if a), default=0.0)
    threshold = classify.THRESHOLD * top_max
    firing = {
        t.strip().lower() for tokens, acts in train for t, a in zip(tokens, acts) if a >= threshold and top_max > 0
    }
    ranked = []
    for i in deal(len(texts["random"]), RANDOM_SPLITS)["calibration"]:
        tokens, acts = texts["random"][i]
        if acts and max(acts) < threshold:
            shared = sum(1 for t in tokens if t.strip().lower() in firing)
            ranked.append((-shared, i))
    ranked.sort()
    chosen = ranked[:n]
    return [i for _, i in chosen], sum(1 for shared, _ in chosen if shared < 0)


def clean_explanation(text: str) -> str:
    text = " ".join((text or "").strip().splitlines()[:1]).strip() if text else ""
    low = text.lower()
    for prefix in (PRIMER, "the main thing this neuron does is", "this neuron finds", "it finds"):
        if low.startswith(prefix):
            text = text[len(prefix) :].strip()
            break
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":  # a wholly quoted answer
        text = text[1:-1].strip()
    text = text.rstrip(" .…").strip()
    return text + "." if text else ""


TOP_SPLITS = ("train", "calibration", "valid", "test")
RANDOM_SPLITS = ("calibration", "valid", "test")


def deal(n: int, splits: tuple[str, ...]) -> dict[str, list[int]]:
    """The reference's round-robin dealing: item i goes to splits[i % len(splits)] (top sequences:
    train 0, 4, 8, ..., calibration 1, 5, ..., valid 2, 6, ..., test 3, 7, ...). Unlike the
    reference, which cuts every split to the size of the smallest, no item is left out."""
    return {name: list(range(k, n, len(splits))) for k, name in enumerate(splits)}


def splits(texts: dict, n_excerpts: int) -> dict[str, list]:
    """train (top only, at most n_excerpts), valid and test (top then random) excerpts; `shown`:
    the ("top", i) of every excerpt the explainer sees (the classification scorers never use them)."""
    top, rnd = deal(len(texts["top"]), TOP_SPLITS), deal(len(texts["random"]), RANDOM_SPLITS)
    pick = lambda kind, idx: [texts[kind][i] for i in idx]
    return {
        "shown": {("top", i) for i in top["train"][:n_excerpts]},
        "train": pick("top", top["train"])[:n_excerpts],
        "valid": pick("top", top["valid"]) + pick("random", rnd["valid"]),
        "valid_top": pick("top", top["valid"]),
        "test": pick("top", top["test"]) + pick("random", rnd["test"]),
    }


def read_answer(model: type[answers._Answer], resp: object, where: str):
    """An endpoint's answer read as the typed model of what sitegen reads from it; one of the
    wrong shape fails the neuron being explained (kind "malformed": reported, asked again)."""
    parsed, why = answers.problem(model, resp)
    if parsed is None:
        raise EndpointError(f"{where}: malformed answer ({why}); is --endpoint an OpenAI-compatible API?", "malformed")
    return parsed


def _chat_text(answer: answers.ChatAnswer) -> str:
    return answer.choices[0].message.content or ""


def _usage(answer: answers.ChatAnswer | answers.CompletionAnswer) -> tuple[int, int]:
    u = answer.usage
    return (u.prompt_tokens or 0, u.completion_tokens or 0) if u is not None else (0, 0)


def _alignment(ep: Endpoint, prompt: str, offsets: list[int], lp: dict, state: dict) -> str:
    """The endpoint's logprob alignment (scoring.echo_alignment) established from this answer;
    an endpoint where it cannot be, or where it changes between answers, is refused (fatal: every
    neuron would be scored from entries that may not be the placeholders' own)."""
    if getattr(ep, "alignment", None):  # the in-process model: it made the answer, so it knows
        state["alignment"] = ep.alignment
        return ep.alignment
    found, ev = scoring.echo_alignment(prompt, offsets, lp)
    seen = (
        f"top token = the echoed token {ev['own']} times, = the next token {ev['next']} times; levels at the placeholder's entry "
        f"{ev['levels_own']} times, at the entry before {ev['levels_next']} times"
    )
    if found is None:
        raise EndpointError(
            f"{ep.base}: cannot establish which echo logprob entry predicts each token ({seen}); sitegen does not score "
            "with these logprobs: use a server following OpenAI's convention or llama-cpp-python, or another --model",
            "alignment",
        )
    if state.setdefault("alignment", found) != found:
        raise EndpointError(
            f"{ep.base}: the echo logprob alignment changed between answers ({state['alignment']}, then {found}: {seen}); "
            "sitegen does not score with these logprobs",
            "alignment",
        )
    return found


def simulate(
    ep: Endpoint, explanation: str, tokens: list[str], state: dict
) -> tuple[list[float | None], str, dict, bool]:
    """(predicted levels, method, raw answer, whether the answer could be read) for one sequence.
    An answer that cannot be read predicts 0 everywhere (scored, as the reference). state["logprobs"]
    remembers, per run, whether the endpoint gave usable logprobs; state["alignment"] which entry
    of its echo logprobs predicts each token (scoring.echo_alignment); state["usage"] this
    answer's (prompt, completion) tokens."""
    prompt, offsets = scoring.simulation_prompt(explanation, tokens)
    if state.get("logprobs", True):
        resp = None
        try:
            resp = ep.post(
                "/completions", {"prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 10}
            )
        except EndpointError as e:
            # A refused or unreadable completions request means no logprobs here. The model was
            # accepted by the explanation request already, so a 404 naming it here means this
            # endpoint has no completions for it (OpenAI's chat models), not an unknown model.
            if e.kind not in ("http", "json", "model"):
                raise
        if resp is not None:
            answer = read_answer(answers.CompletionAnswer, resp, f"{ep.base}/completions")
            lp = answer.choices[0].logprobs
            lp_dict = lp.model_dump() if lp is not None and lp.usable else None
            if lp_dict is not None and scoring.echoes_placeholders(prompt, offsets, lp_dict):
                # A position whose top logprobs hold no level at all is a prediction of (near) no
                # activation; it scores as 0 (score_simulation).
                state["logprobs"] = True
                state["usage"] = _usage(answer)
                alignment = _alignment(ep, prompt, offsets, lp_dict, state)
                pred = scoring.predictions_from_echo(prompt, offsets, lp_dict, alignment)
                return pred, "logprobs", resp, any(p is not None for p in pred)
        state["logprobs"] = (
            False  # no usable logprobs here (none, or not for the prompt's tokens): the fallback from now on
        )
    ask = prompt.replace(f"\t{scoring.PLACEHOLDER}\n", "\t?\n")
    resp = ep.post(
        "/chat/completions",
        {
            "temperature": 0,
            "max_tokens": 12 * len(tokens) + 40,
            "messages": [
                {
                    "role": "user",
                    "content": ask
                    + "\nRewrite the lines of the last excerpt (the one with ?), replacing each ? with the activation "
                    "(an integer from 0 to 10) you predict. Reply with the lines only.",
                }
            ],
        },
    )
    answer = read_answer(answers.ChatAnswer, resp, f"{ep.base}/chat/completions")
    state["usage"] = _usage(answer)
    levels, read = scoring.parse_rewrite(_chat_text(answer), tokens)
    return list(levels), "no-logprobs", resp, read


def _score_one(ep: Endpoint, explanation: str, scored: list, state: dict, raw: list, usage: list) -> dict:
    """Simulate and score one explanation on one split's sequences (every sequence counts; one
    whose answer could not be read predicts 0 and is marked `unread` in the details)."""
    simulated, true, details, methods, prompts = [], [], [], set(), []
    for tokens, acts in scored:
        prompts.append(scoring.simulation_prompt(explanation, tokens)[0])
        pred, method, r, read = simulate(ep, explanation, tokens, state)
        raw.append(r)
        p, c = state.pop("usage")
        usage[0] += p
        usage[1] += c
        methods.add(method)
        simulated.append(pred)
        true.append(acts)
        detail = {
            "tokens": tokens,
            "true": [round(float(a), 4) for a in acts],
            "simulated": [None if x is None else round(x, 3) for x in pred],
        }
        if not read:
            detail["unread"] = True
        details.append(detail)
    return {
        "score": scoring.score_simulation(simulated, true) if simulated else None,
        "method": "+".join(sorted(methods)) or None,
        "details": details,
        "read": any(not d.get("unread") for d in details),
        "prompt_hash": "sha256:" + hashlib.sha256(orjson.dumps(prompts)).hexdigest() if prompts else None,
    }


def _asker(ep: Endpoint, raw: list, usage: list) -> Callable[[list[dict], int], str]:
    """A classification scorer's request: the messages at temperature 0, held to a list of `size`
    0/1 values where the judge honours it; returns the answer's text."""

    def ask(messages: list[dict], size: int) -> str:
        body = {"messages": messages, "temperature": 0, "max_tokens": 4 * size + 8}
        if getattr(ep, "constrains_answers", False):
            body["response_format"] = classify.answer_format(size)
        resp = ep.post("/chat/completions", body)
        raw.append(resp)
        answer = read_answer(answers.ChatAnswer, resp, f"{ep.base}/chat/completions")
        p, c = _usage(answer)
        usage[0] += p
        usage[1] += c
        return _chat_text(answer)

    return ask


def classification_items(texts: dict, shown: set, per_class: int) -> dict[str, list[classify.Item]]:
    """Each classification scorer's items on the neuron's held-out excerpts; none (the scorer is
    not run) without both activating and non-activating excerpts."""
    activating, quiet, threshold = classify.held_out(texts, shown, per_class)
    if not activating or not quiet:
        return {name: [] for name in classify.SCORERS}
    return {
        "detection": classify.detection_items(activating, quiet),
        "fuzzing": classify.fuzzing_items(activating, quiet, threshold),
    }


def score_explanation(
    ep: Endpoint,
    best: dict,
    texts: dict,
    shown: set,
    scorers: tuple[str, ...],
    per_class: int,
    raw: list,
    usage: list,
) -> tuple[dict, dict]:
    """(scores, scorers) of the kept explanation: every score with its bootstrap interval over
    excerpts ({"value", "ci", "n"}), and per scorer how it was made (calls, prompt hash; for the
    classification scorers also the excerpts, answers and unread batches)."""
    details = best["details"]
    sim_ci = (
        bootstrap.simulation_ci([d["simulated"] for d in details], [d["true"] for d in details])
        if best["score"] is not None
        else None
    )
    scores = {"simulation": bootstrap.score_entry(best["score"], sim_ci, len(details))}
    made = {"simulation": {"calls": best["calls"], "prompt_hash": best["prompt_hash"], "method": best["method"]}}
    wanted = [name for name in classify.SCORERS if name in scorers]
    items = classification_items(texts, shown, per_class) if wanted else {}
    for name in wanted:
        if items[name]:
            made[name] = classify.run(name, best["explanation"], items[name], _asker(ep, raw, usage))
            if getattr(ep, "constrains_answers", False):
                made[name]["method"] = "constrained"  # answers held to a list of 0/1 (classify.answer_format)
        else:
            made[name] = {
                **bootstrap.score_entry(None, None, 0),
                "calls": 0,
                "prompt_hash": None,
                "why": "no held-out excerpts where the neuron fires, or none where it does not",
            }
        scores[name] = {k: made[name][k] for k in ("value", "ci", "n")}
    return scores, made


def explain_neuron(
    ep: Endpoint,
    texts: dict,
    n_excerpts: int,
    samples: int = 1,
    scorers: tuple[str, ...] = SCORERS,
    per_class: int = classify.PER_CLASS,
    contrastive: bool = False,
) -> dict:
    """texts: {"top": [(tokens, acts)], "random": [(tokens, acts)]} (and "top_seq"/"random_seq",
    their sequence ids, where known) -> one result record. With several samples (temperature 1),
    each explanation is scored on the valid split, the best there is kept (the first on ties) and
    its score on the test split is the one reported, free of the choice's bias. Without a valid top
    sequence (fewer than 3 top sequences) nothing is chosen: the first sample is kept. The kept
    explanation is then scored by the other `scorers` on held-out excerpts (classify.py), and every
    score gets its bootstrap interval (bootstrap.py)."""
    split = splits(texts, n_excerpts)
    negatives, hard = hard_negatives(texts, n_excerpts) if contrastive else ([], 0)
    split["shown"] |= {("random", i) for i in negatives}  # never judged by detection or fuzzing
    messages = explanation_messages(split["train"], [texts["random"][i] for i in negatives])
    prompt_hash = "sha256:" + hashlib.sha256(orjson.dumps(messages)).hexdigest()
    raw: list = []
    usage = [0, 0]
    choose = samples > 1 and bool(split["valid_top"])
    state: dict = {}
    candidates = []
    for sample in range(samples):
        resp = ep.post(
            "/chat/completions", {"messages": messages, "temperature": 1.0, "max_tokens": 60, "seed": sample}
        )
        raw.append(resp)
        answer = read_answer(answers.ChatAnswer, resp, f"{ep.base}/chat/completions")
        p, c = _usage(answer)
        usage[0] += p
        usage[1] += c
        explanation = clean_explanation(_chat_text(answer))
        if explanation and explanation not in {x["explanation"] for x in candidates}:
            before = len(raw)
            valid = _score_one(ep, explanation, split["valid"], state, raw, usage) if choose else None
            test = _score_one(ep, explanation, split["test"], state, raw, usage)
            candidates.append(
                {
                    "explanation": explanation,
                    "valid_score": None if valid is None else valid["score"],
                    **test,
                    "calls": len(raw) - before,
                }
            )
    record = {
        "explanation": None,
        "score": None,
        "valid_score": None,
        "method": None,
        "prompt_hash": prompt_hash,
        "error": None,
        # which echo logprob entry was read as each placeholder's distribution (None: no logprobs used)
        "logprob_alignment": state.get("alignment") if state.get("logprobs") else None,
        "selected_on": "valid" if choose else None,
        # what the explainer was shown: top excerpts alone, or with hard negatives (random indices)
        "explainer_prompt": (
            {"kind": "contrastive", "negatives": negatives, "hard": hard} if contrastive else {"kind": "top excerpts"}
        ),
        "samples": [
            {"explanation": x["explanation"], "valid_score": x["valid_score"], "score": x["score"]} for x in candidates
        ],
    }
    if not candidates:
        record["error"] = "the explainer's answer was empty or malformed"
    elif not any(x["read"] for x in candidates):  # all zeros everywhere: no score either way, so ask again next run
        record["error"] = "no simulation answer could be read"
    else:
        best = (
            max(candidates, key=lambda x: -2.0 if x["valid_score"] is None else x["valid_score"])
            if choose
            else candidates[0]
        )
        record.update({k: best[k] for k in ("explanation", "score", "valid_score", "method", "details")})
        # every sample's simulations are the simulation scorer's calls
        best = {**best, "calls": sum(x["calls"] for x in candidates)}
        record["scores"], scorers_made = score_explanation(
            ep, best, texts, split["shown"], scorers, per_class, raw, usage
        )
        record["scorers"] = {"explanation": {"calls": samples, "prompt_hash": prompt_hash}, **scorers_made}
    record["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "requests": len(raw)}
    record["raw"] = raw
    return record


def requests_per_neuron(
    texts: dict,
    n_excerpts: int,
    samples: int,
    scorers: tuple[str, ...] = SCORERS,
    per_class: int = classify.PER_CLASS,
    contrastive: bool = False,
) -> int:
    """The most requests explain_neuron makes for one neuron (fewer when samples repeat)."""
    split = splits(texts, n_excerpts)
    if contrastive:
        split["shown"] |= {("random", i) for i in hard_negatives(texts, n_excerpts)[0]}
    valid = len(split["valid"]) if samples > 1 and split["valid_top"] else 0
    items = classification_items(texts, split["shown"], per_class) if set(scorers) & set(classify.SCORERS) else {}
    classified = sum(-(-len(items[name]) // classify.BATCH) for name in classify.SCORERS if name in scorers)
    return samples * (1 + valid + len(split["test"])) + classified


def _texts(store, layer: int, neurons: list[int], vocab: list[str], seq_tokens: dict) -> dict[int, dict]:
    t = store.read_layer(
        "neuroscope", layer, columns=["neuron", "top_seq", "top_acts", "random_seq", "random_acts"]
    ).to_pydict()
    first = int(store.manifest["config"]["first_valid_position"])
    out = {}
    for n in neurons:

        def pairs(kind):
            return [
                ([vocab[i] for i in seq_tokens[s][first:]], [float(a) for a in acts[first:]])
                for s, acts in zip(t[f"{kind}_seq"][n], t[f"{kind}_acts"][n])
            ]

        out[n] = {
            "top": pairs("top"),
            "random": pairs("random"),
            "top_seq": [int(s) for s in t["top_seq"][n]],
            "random_seq": [int(s) for s in t["random_seq"][n]],
        }
    return out


MAX_TIMEOUT = 86400.0  # a day: longer is a mistake (and past what a timer can wait on some systems)


def _check_numbers(cfg: ExplainConfig) -> None:
    """The numeric options, refused in one line before anything is read or sent."""
    if cfg.concurrency < 1:
        raise ConfigError(f"--concurrency {cfg.concurrency}: must be at least 1")
    if cfg.samples < 1:
        raise ConfigError(f"--samples {cfg.samples}: must be at least 1")
    if cfg.retries < 0:
        raise ConfigError(f"--retries {cfg.retries}: must be 0 or more")
    if cfg.scorer_excerpts < 1:
        raise ConfigError(f"--scorer-excerpts {cfg.scorer_excerpts}: must be at least 1, e.g. --scorer-excerpts 10")
    unknown = [x for x in cfg.scorers if x not in SCORERS]
    if unknown or "simulation" not in cfg.scorers:
        raise ConfigError(
            f"--scorers {','.join(cfg.scorers)}: give a comma-separated subset of {','.join(SCORERS)} that includes "
            "simulation, e.g. --scorers simulation,detection"
        )
    if not (math.isfinite(cfg.timeout) and 0 < cfg.timeout <= MAX_TIMEOUT):
        raise ConfigError(
            f"--timeout {cfg.timeout:g}: give the seconds one request may take in all, a number above 0 and at most "
            f"{MAX_TIMEOUT:g}, e.g. --timeout 60"
        )
    if not (math.isfinite(cfg.max_response_mb) and 0 < cfg.max_response_mb <= 2**20):
        raise ConfigError(
            f"--max-response-mb {cfg.max_response_mb:g}: give the largest answer to read in MB, a number above 0, "
            f"e.g. --max-response-mb {MAX_RESPONSE_MB}"
        )


class _WorkLog:
    """STORE/.work/explain.jsonl, shared by every explain run on the store (one JSON record per line,
    a neuron's last finished line wins). Every append and the end-of-run merge hold an exclusive
    flock on STORE/.work/explain.lock, and each append opens the log afresh (a compaction renames a
    new file into place; a descriptor opened before it would write into the replaced file), so two
    runs on one store never lose each other's neurons."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / "explain.jsonl"

    @contextmanager
    def locked(self) -> Iterator[None]:
        lock = self.folder / "explain.lock"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            f = open(lock, "ab")  # never deleted: a waiter would lock a file nobody else sees
        except OSError as e:
            raise StoreError(f"cannot lock {lock}: {e.strerror or e}; make {self.folder} writable") from None
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield  # closing the file releases the lock (the kernel releases a killed process's)

    def append(self, record: dict) -> None:
        line = orjson.dumps(record) + b"\n"
        with self.locked():
            try:
                with open(self.path, "a+b") as f:
                    end = f.seek(0, os.SEEK_END)
                    if end and (f.seek(end - 1), f.read(1))[1] != b"\n":
                        line = b"\n" + line  # a line cut by a crash stays a (skipped) line of its own
                    f.write(line)
            except OSError as e:
                fix = "free space and rerun" if e.errno == errno.ENOSPC else "rerun once it is writable"
                raise StoreError(
                    f"cannot write {self.path}: {e.strerror or e}; {fix} (finished neurons are kept)"
                ) from None

    def finished(self, model: str, n_layers: int, size: int) -> dict[tuple[str, int, int], dict]:
        """Every finished neuron in the log, `model`'s and any other explainer's (a compaction keeps
        them all): {(model, layer, neuron): record}."""
        out: dict[tuple[str, int, int], dict] = {}
        try:
            lines = self.path.read_bytes().splitlines() if self.path.exists() else []
        except OSError as e:
            raise StoreError(
                f"cannot read {self.path}: {e.strerror or e}; make it a readable file (or delete it: its neurons are "
                "then asked again)"
            ) from None
        for line in lines:
            r = _finished_record(line, model, n_layers, size)
            if r is None and (other := _model_of(line)) not in (None, model):
                r = _finished_record(line, other, n_layers, size)
            if r is not None:
                out[(r["model"], r["layer"], r["neuron"])] = r
        return out

    def compact(self, finished: dict[tuple[str, int, int], dict]) -> None:
        """Rewrite the log as its finished lines alone (call under `locked`, with `finished` read under it)."""
        from sitegen.store import atomic_write_bytes

        atomic_write_bytes(self.path, b"".join(orjson.dumps(r) + b"\n" for r in finished.values()))


def _model_of(line: bytes) -> str | None:
    try:
        r = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return r.get("model") if isinstance(r, dict) and isinstance(r.get("model"), str) else None


def _mine(finished: dict[tuple[str, int, int], dict], model: str) -> dict[tuple[int, int], dict]:
    return {(layer, n): r for (m, layer, n), r in finished.items() if m == model}


# An answer of a shape nothing checked (a bug, or a server's surprise) fails its neuron, not the run.
_UNREADABLE = (ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError)


def run_explain(cfg: ExplainConfig, log: Callable[[str], None] = print) -> dict:
    from sitegen.store import Store

    _check_numbers(cfg)
    local = cfg.local or cfg.local_model is not None
    if local and (cfg.endpoint or cfg.model):
        raise ConfigError(
            f"{'--endpoint' if cfg.endpoint else '--model'} with {'--local' if cfg.local else '--local-model'}: the in-process "
            "model needs no endpoint; drop one of them"
        )
    if not local and not (cfg.endpoint and cfg.model):
        raise ConfigError(
            "give --endpoint URL and --model NAME (an OpenAI-compatible server), or --local (the store's own model, "
            "in-process) or --local-model PATH"
        )
    key, key_env = (None, None) if local else endpoint_key(cfg.endpoint, cfg.api_key_env, cfg.allow_insecure_http)
    store = Store.open(cfg.store)
    if local:  # its name is the explainer's (the work log's key); the model loads when there is work
        from sitegen.services.neuron_explainer.local import LocalModel, resolve

        option = "--local-model" if cfg.local_model else "--local"
        spec = cfg.local_model or str(store.manifest["model"].get("source") or "")
        if not spec:
            raise ConfigError(
                "--local: the store's manifest names no model source; pass the model with --local-model PATH"
            )
        name = resolve(spec, option)[1]
        cfg = dataclasses.replace(cfg, model=f"{name} (in-process)", endpoint=f"in-process {name}", concurrency=1)
    m = store.manifest["model"]
    n_layers, size = int(m["num_layers"]), int(m["layer_size"])
    selection = select_neurons(cfg.neurons, n_layers, size, store, option="--neurons")
    vocab = store.vocab()
    seq_tokens = store.sequence_tokens()
    worklog = _WorkLog(store.work_dir)
    done = _mine(worklog.finished(cfg.model, n_layers, size), cfg.model)
    todo = [(layer, n) for layer, ns in sorted(selection.items()) for n in ns if (layer, n) not in done]
    texts: dict[tuple[int, int], dict] = {}
    for layer in sorted({layer for layer, _ in todo}):
        for n, tx in _texts(store, layer, [n for lay, n in todo if lay == layer], vocab, seq_tokens).items():
            texts[(layer, n)] = tx
    if cfg.samples > 1:
        short = next((k for k in todo if not splits(texts[k], cfg.explainer_excerpts)["valid_top"]), None)
        if short is not None:
            raise ConfigError(
                f"--samples {cfg.samples}: neuron {short[0]}:{short[1]} has {len(texts[short]['top'])} top sequences, too few for "
                "a valid split to choose the explanation on (the 3rd, 7th, ... top sequences); use --samples 1, or compute "
                "with --top-k 8 or more"
            )
    n_requests = sum(
        requests_per_neuron(
            texts[k], cfg.explainer_excerpts, cfg.samples, cfg.scorers, cfg.scorer_excerpts, cfg.contrastive
        )
        for k in todo
    )
    if cfg.dry_run:
        if todo:
            first = texts[todo[0]]
            negatives = hard_negatives(first, cfg.explainer_excerpts)[0] if cfg.contrastive else []
            shown = explanation_messages(
                splits(first, cfg.explainer_excerpts)["train"], [first["random"][i] for i in negatives]
            )
            for msg in shown:
                log(f"--- {msg['role']}\n{msg['content']}")
        log(
            f"dry run: {len(todo)} neurons to explain ({len(done)} already done), at most {n_requests} requests "
            f"({cfg.samples} x (1 explanation + {'valid and ' if cfg.samples > 1 else ''}test simulations) each, then "
            f"{' and '.join(x for x in cfg.scorers if x != 'simulation') or 'no other scorer'}) to {cfg.endpoint} "
            f"as model {cfg.model!r}"
        )
        return {"todo": len(todo), "requests": n_requests}
    if local:
        ep = LocalModel(spec, option)
    else:
        ep = Endpoint(
            cfg.endpoint, cfg.model, key, cfg.timeout, cfg.retries, key_env, max_bytes=int(cfg.max_response_mb * 2**20)
        )
    failures, fatal = 0, None
    with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        futures = {
            pool.submit(
                explain_neuron,
                ep,
                texts[key],
                cfg.explainer_excerpts,
                cfg.samples,
                cfg.scorers,
                cfg.scorer_excerpts,
                cfg.contrastive,
            ): key
            for key in todo
        }
        for fut in as_completed(futures):
            if fut.cancelled():
                continue
            layer, n = futures[fut]
            try:
                record = fut.result()
            except EndpointError as e:
                if e.fatal:  # every other neuron would fail the same way: stop asking, keep what the pool finishes
                    if fatal is None:
                        fatal = e
                        for f in futures:
                            f.cancel()
                    continue
                record = {"explanation": None, "score": None, "error": str(e)}
            except _UNREADABLE as e:
                record = {
                    "explanation": None,
                    "score": None,
                    "error": f"unreadable answer ({type(e).__name__}: {' '.join(str(e).split())[:200]})",
                }
            record.update({"layer": layer, "neuron": n, "model": cfg.model})
            worklog.append(record)
            if record.get("error"):
                failures += 1
                log(f"{layer}:{n}: {record['error']} (asked again on the next run)")
    with worklog.locked():
        # Re-read under the lock: the log also holds what another run on this store finished meanwhile.
        finished = worklog.finished(cfg.model, n_layers, size)
        done = _mine(finished, cfg.model)
        if done or fatal is None:  # a run stopped before any neuron finished leaves the store as it was
            _write_tables(store, done, cfg.model)
        if failures == 0 and fatal is None:
            worklog.compact(finished)
    if fatal is not None:
        raise fatal
    log(f"explained {len(done)} neurons ({failures} failed) into {cfg.store}")
    return {"done": len(done), "failed": failures}


class _Finished(Record):
    """A finished neuron's line of .work/explain.jsonl, as run_explain writes it (strict: no bool for an int)."""

    layer: int = Field(ge=0)
    neuron: int = Field(ge=0)
    model: str
    explanation: str
    score: Optional[float] = None
    valid_score: Optional[float] = None
    error: None = None


def _finished_record(line: bytes, model: str, n_layers: int, size: int) -> dict | None:
    """A line of .work/explain.jsonl as a finished neuron of `model`, or None: a failed neuron, another
    explainer's, a line cut by a crash, one scored from echo logprobs with no recorded alignment, or
    one edited into something explain never writes. None
    means the neuron is asked again, so a damaged log costs requests, never the run."""
    try:
        r = orjson.loads(line)
        f = _Finished.model_validate(r)
    except (orjson.JSONDecodeError, ValidationError):
        return None
    if "logprobs" in (r.get("method") or "").split("+") and not r.get("logprob_alignment"):
        return None  # scored from echo logprobs before alignment detection: re-scored
    return r if f.model == model and f.layer < n_layers and f.neuron < size else None


def _write_tables(store, done: dict[tuple[int, int], dict], model: str) -> None:
    """Merge finished records into neuron_explainer/layer=L/data.parquet (a neuron's new record
    replaces an older one) and list the service in the manifest."""
    by_layer: dict[int, dict[int, dict]] = {}
    for (layer, n), r in done.items():
        by_layer.setdefault(layer, {})[n] = r
    for layer, recs in by_layer.items():
        rows: dict[int, dict] = {}
        path = store.layer_path(SERVICE, layer)
        if path.exists():
            rows = {r["neuron"]: r for r in store.read_layer(SERVICE, layer).to_pylist()}
        for n, r in recs.items():
            rows[n] = {
                "neuron": n,
                "explanation": r["explanation"],
                "score": r["score"],
                "valid_score": r.get("valid_score"),
                "explainer": model,
                "source": SOURCE_EXPLAIN,
                "method": r.get("method"),
                "logprob_alignment": r.get("logprob_alignment"),
                "prompt_hash": r.get("prompt_hash"),
                "usage": orjson.dumps(r.get("usage")).decode(),
                "details": orjson.dumps(r.get("details") or []).decode(),
                "raw": orjson.dumps(r.get("raw") or []).decode(),
                "scores": None if r.get("scores") is None else orjson.dumps(r["scores"]).decode(),
                "scorers": None if r.get("scorers") is None else orjson.dumps(r["scorers"]).decode(),
                "explainer_prompt": (r.get("explainer_prompt") or {}).get("kind"),
            }
        schema = pa.schema(
            [
                *TABLE_SCHEMA,
                ("valid_score", pa.float64()),
                ("logprob_alignment", pa.string()),
                ("prompt_hash", pa.string()),
                ("usage", pa.string()),
                ("details", pa.string()),
                ("raw", pa.string()),
                ("scores", pa.string()),
                ("scorers", pa.string()),
                ("explainer_prompt", pa.string()),
            ]
        )
        ordered = [rows[n] for n in sorted(rows)]
        store.write_layer(
            SERVICE, layer, pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in ordered], schema=schema)
        )
    store.add_service(SERVICE)
