"""`sitegen explain`: write and score explanations with any OpenAI-compatible endpoint (OpenAI,
vLLM, llama.cpp's server, Ollama). No torch: it reads the store's top and random sequences.

Per neuron (../shared/reference/neuron-explainer.md):
    top sequences dealt round-robin into train / calibration / valid / test; the explainer sees
    train (5 with the default 20), discretised 0-10 -> one chat request for the explanation
    -> simulation of the 5 test top + 5 random sequences from the explanation alone: all at once
       per sequence with echo + logprobs on /v1/completions (expected value over "0".."10"), or,
       when the endpoint gives no logprobs, the logprob-free fallback (the model rewrites the
       lines with integers at temperature 0) -> pooled correlation = the score.

Results are appended to STORE/.work/explain.jsonl as each neuron finishes (a rerun skips them) and
written into STORE/neuron_explainer/ at the end. The API key is read from an environment variable
and never written anywhere.
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import orjson
import pyarrow as pa

from sitegen.errors import ConfigError, SitegenError
from sitegen.services.neuron_explainer import scoring
from sitegen.services.neuron_explainer.published import SERVICE, TABLE_SCHEMA
from sitegen.services.selection import select_neurons

SOURCE_EXPLAIN = "sitegen explain"
PRIMER = "the main thing this neuron does is find"
SYSTEM = ("You study one neuron of a neural network. Each neuron looks for one kind of thing in short texts. You are shown "
          "texts as one token per line, `token<TAB>activation`, between <start> and <end>; activations go from 0 (nothing) to "
          "10 (the strongest match). Say in one short phrase what the neuron responds to. Do not list the example words one "
          "by one; describe what they have in common.")
# A made-up neuron shows the format (our own example, not from any dataset).
FEW_SHOT = [("<start>\n the\t0\n price\t0\n rose\t0\n to\t0\n $\t2\n40\t10\n million\t6\n.\t0\n<end>\n"
             "<start>\n about\t0\n 12\t9\n percent\t3\n of\t0\n voters\t0\n<end>\n", "numbers, especially amounts of money and percentages.")]


class EndpointError(SitegenError):
    stage = "endpoint"


@dataclass
class ExplainConfig:
    store: Path
    endpoint: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    neurons: str = "5"
    concurrency: int = 4
    timeout: float = 60.0
    retries: int = 4
    explainer_excerpts: int = 5
    samples: int = 1  # explanations sampled per neuron; each is scored, the best kept
    dry_run: bool = False


class Endpoint:
    """A minimal OpenAI-compatible client (stdlib only): JSON POST with a timeout, retries with
    exponential backoff on 429, 5xx and dropped connections, one-line errors for the rest."""

    def __init__(self, base_url: str, model: str, api_key: str | None, timeout: float, retries: int, api_key_env: str):
        self.base = base_url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.model, self.key, self.timeout, self.retries, self.key_env = model, api_key, timeout, retries, api_key_env

    def post(self, path: str, body: dict) -> dict:
        data = orjson.dumps({"model": self.model, **body})
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        delay = 1.0
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.base + path, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return orjson.loads(r.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code == 401 or e.code == 403:
                    raise EndpointError(f"{self.base}: the endpoint refused the API key (HTTP {e.code}); set ${self.key_env} to a valid key") from None
                if e.code == 404 and "model" in detail.lower():
                    raise EndpointError(f"{self.base}: unknown model {self.model!r} (HTTP 404); pass a model the endpoint serves with --model") from None
                if (e.code == 429 or e.code >= 500) and attempt < self.retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise EndpointError(f"{self.base}{path}: HTTP {e.code}: {' '.join(detail.split())[:200]}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                if attempt < self.retries and not isinstance(getattr(e, "reason", None), ConnectionRefusedError):
                    time.sleep(delay)
                    delay *= 2
                    continue
                if isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError):
                    # a slow answer fails this neuron only (asked again on the next run)
                    raise EndpointError(f"{self.base}{path}: no answer within {self.timeout:g} s, {self.retries + 1} tries; raise --timeout") from None
                raise EndpointError(f"{self.base}: unreachable ({getattr(e, 'reason', e)}); check --endpoint and that the server runs") from None
            except orjson.JSONDecodeError:
                raise EndpointError(f"{self.base}{path}: the answer is not JSON; is --endpoint an OpenAI-compatible API?") from None
        raise EndpointError(f"{self.base}{path}: no answer after {self.retries + 1} tries")


def _excerpt(tokens: list[str], levels: list[int], nonzero_only: bool = False) -> str:
    lines = [f"{t.replace(chr(9), ' ').replace(chr(10), chr(0x21B5))}\t{lv}" for t, lv in zip(tokens, levels) if lv or not nonzero_only]
    return "<start>\n" + "\n".join(lines) + "\n<end>\n"


def explanation_messages(excerpts: list[tuple[list[str], list[float]]]) -> list[dict]:
    """Chat messages asking for the explanation of a neuron from its train excerpts."""
    max_act = max((max(a) for _, a in excerpts if a), default=0.0)
    body = []
    for tokens, acts in excerpts:
        levels = scoring.discretise(acts, max_act)
        body.append(_excerpt(tokens, levels))
        if sum(1 for lv in levels if lv) < 0.2 * len(levels) and any(levels):  # sparse: repeat the firing tokens alone
            body.append("Same text, only the non-zero activations:\n" + _excerpt(tokens, levels, nonzero_only=True))
    messages = [{"role": "system", "content": SYSTEM}]
    for shown, answer in FEW_SHOT:
        messages.append({"role": "user", "content": f"Neuron A\n{shown}\nComplete the sentence: {PRIMER} ..."})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": "Neuron B\n" + "".join(body) + f"\nComplete the sentence: {PRIMER} ..."})
    return messages


def clean_explanation(text: str) -> str:
    text = " ".join((text or "").strip().splitlines()[:1]).strip() if text else ""
    low = text.lower()
    for prefix in (PRIMER, "the main thing this neuron does is", "this neuron finds", "it finds"):
        if low.startswith(prefix):
            text = text[len(prefix):].strip()
            break
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":  # a wholly quoted answer
        text = text[1:-1].strip()
    text = text.rstrip(" .…").strip()
    return text + "." if text else ""


def _split(n_top: int) -> tuple[list[int], list[int]]:
    """Round-robin: train gets texts 0, 4, 8, ...; test gets 3, 7, 11, ... (calibration and
    valid, 1 and 2 mod 4, are kept aside as in the reference)."""
    return list(range(0, n_top, 4)), list(range(3, n_top, 4))


def _chat_text(resp: dict) -> str:
    try:
        return resp["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        return ""


def _usage(resp: dict) -> tuple[int, int]:
    u = resp.get("usage") or {}
    return int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)


def simulate(ep: Endpoint, explanation: str, tokens: list[str], state: dict) -> tuple[list[float | None] | None, str, dict]:
    """Predicted levels for one sequence; (None, method, raw) when the answer cannot be read.
    state["logprobs"] remembers, per run, whether the endpoint gave usable logprobs."""
    prompt, offsets = scoring.simulation_prompt(explanation, tokens)
    if state.get("logprobs", True):
        try:
            resp = ep.post("/completions", {"prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 10})
            lp = (resp.get("choices") or [{}])[0].get("logprobs") or {}
            if lp.get("top_logprobs") and lp.get("text_offset"):
                # A position whose top logprobs hold no level at all is a prediction of (near) no
                # activation; it scores as 0 (score_simulation).
                state["logprobs"] = True
                return scoring.predictions_from_echo(offsets, lp), "logprobs", resp
        except EndpointError as e:
            if "unreachable" in str(e) or "API key" in str(e) or "unknown model" in str(e):
                raise
        state["logprobs"] = False  # no usable logprobs here: the fallback from now on
    ask = prompt.replace(f"\t{scoring.PLACEHOLDER}\n", "\t?\n")
    resp = ep.post("/chat/completions", {"temperature": 0, "max_tokens": 12 * len(tokens) + 40, "messages": [
        {"role": "user", "content": ask + "\nRewrite the lines of the last excerpt (the one with ?), replacing each ? with the activation "
                                          "(an integer from 0 to 10) you predict. Reply with the lines only."}]})
    levels = scoring.parse_rewrite(_chat_text(resp).replace("<start>", "").replace("<end>", ""), len(tokens))
    return levels, "no-logprobs", resp


def _score_one(ep: Endpoint, explanation: str, scored: list, state: dict, raw: list, usage: list) -> dict:
    """Simulate and score one explanation on the scored sequences."""
    simulated, true, details, methods = [], [], [], set()
    for tokens, acts in scored:
        pred, method, r = simulate(ep, explanation, tokens, state)
        raw.append(r)
        p, c = _usage(r)
        usage[0] += p
        usage[1] += c
        methods.add(method)
        if pred is None:
            continue
        simulated.append(pred)
        true.append(acts)
        details.append({"tokens": tokens, "true": [round(float(a), 4) for a in acts], "simulated": [None if x is None else round(x, 3) for x in pred]})
    return {"explanation": explanation, "score": scoring.score_simulation(simulated, true) if simulated else None,
            "method": "+".join(sorted(methods)), "details": details, "read": bool(simulated)}


def explain_neuron(ep: Endpoint, texts: dict, n_excerpts: int, samples: int = 1) -> dict:
    """texts: {"top": [(tokens, acts)], "random": [(tokens, acts)]} -> one result record. With
    several samples (temperature 1), each explanation is scored and the best one kept."""
    train_i, test_i = _split(len(texts["top"]))
    train = [texts["top"][i] for i in train_i][:n_excerpts]
    messages = explanation_messages(train)
    prompt_hash = "sha256:" + hashlib.sha256(orjson.dumps(messages)).hexdigest()
    raw: list = []
    usage = [0, 0]
    scored = [texts["top"][i] for i in test_i] + list(texts["random"])
    state: dict = {}
    candidates = []
    for sample in range(samples):
        resp = ep.post("/chat/completions", {"messages": messages, "temperature": 1.0, "max_tokens": 60, "seed": sample})
        raw.append(resp)
        p, c = _usage(resp)
        usage[0] += p
        usage[1] += c
        explanation = clean_explanation(_chat_text(resp))
        if explanation and explanation not in {x["explanation"] for x in candidates}:
            candidates.append(_score_one(ep, explanation, scored, state, raw, usage))
    record = {"explanation": None, "score": None, "method": None, "prompt_hash": prompt_hash, "error": None,
              "samples": [{"explanation": x["explanation"], "score": x["score"]} for x in candidates]}
    readable = [x for x in candidates if x["read"]]
    if not candidates:
        record["error"] = "the explainer's answer was empty or malformed"
    elif not readable:
        record["error"] = "no simulation answer could be read"
    else:
        best = max(readable, key=lambda x: -2.0 if x["score"] is None else x["score"])  # first on ties
        record.update({k: best[k] for k in ("explanation", "score", "method", "details")})
    record["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "requests": len(raw)}
    record["raw"] = raw
    return record


def _texts(store, layer: int, neurons: list[int], vocab: list[str], seq_tokens: dict) -> dict[int, dict]:
    t = store.read_layer("neuroscope", layer, columns=["neuron", "top_seq", "top_acts", "random_seq", "random_acts"]).to_pydict()
    first = int(store.manifest["config"]["first_valid_position"])
    out = {}
    for n in neurons:
        def pairs(kind):
            return [([vocab[i] for i in seq_tokens[s][first:]], [float(a) for a in acts[first:]]) for s, acts in zip(t[f"{kind}_seq"][n], t[f"{kind}_acts"][n])]
        out[n] = {"top": pairs("top"), "random": pairs("random")}
    return out


def run_explain(cfg: ExplainConfig, log: Callable[[str], None] = print) -> dict:
    from sitegen.store import Store, atomic_write_bytes

    if cfg.concurrency < 1:
        raise ConfigError(f"--concurrency {cfg.concurrency}: must be at least 1")
    if cfg.samples < 1:
        raise ConfigError(f"--samples {cfg.samples}: must be at least 1")
    store = Store.open(cfg.store)
    m = store.manifest["model"]
    selection = _parse_neurons(cfg.neurons, int(m["num_layers"]), int(m["layer_size"]), store)
    vocab = store.vocab()
    seq_tokens = store.sequence_tokens()
    work = store.work_dir / "explain.jsonl"
    done: dict[tuple[int, int], dict] = {}
    if work.exists():
        for line in work.read_bytes().splitlines():
            try:
                r = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a line cut by a crash: that neuron is asked again
            if r.get("model") == cfg.model and r.get("error") is None:
                done[(r["layer"], r["neuron"])] = r
    todo = [(layer, n) for layer, ns in sorted(selection.items()) for n in ns if (layer, n) not in done]
    texts: dict[tuple[int, int], dict] = {}
    for layer in sorted({layer for layer, _ in todo}):
        for n, tx in _texts(store, layer, [n for lay, n in todo if lay == layer], vocab, seq_tokens).items():
            texts[(layer, n)] = tx
    per_neuron = cfg.samples * (1 + 5 + 5)
    if cfg.dry_run:
        if todo:
            first = todo[0]
            train_i, _ = _split(len(texts[first]["top"]))
            messages = explanation_messages([texts[first]["top"][i] for i in train_i][:cfg.explainer_excerpts])
            for msg in messages:
                log(f"--- {msg['role']}\n{msg['content']}")
        log(f"dry run: {len(todo)} neurons to explain ({len(done)} already done), about {len(todo) * per_neuron} requests "
            f"({cfg.samples} x (1 explanation + up to 10 simulations) each) to {cfg.endpoint} as model {cfg.model!r}")
        return {"todo": len(todo), "requests": len(todo) * per_neuron}
    ep = Endpoint(cfg.endpoint, cfg.model, os.environ.get(cfg.api_key_env), cfg.timeout, cfg.retries, cfg.api_key_env)
    store.work_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    with open(work, "ab") as out, ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        futures = {pool.submit(explain_neuron, ep, texts[key], cfg.explainer_excerpts, cfg.samples): key for key in todo}
        try:
            for fut in as_completed(futures):
                layer, n = futures[fut]
                try:
                    record = fut.result()
                except EndpointError as e:
                    if "unreachable" in str(e) or "API key" in str(e) or "unknown model" in str(e):
                        for f in futures:
                            f.cancel()
                        raise  # every other neuron would fail the same way
                    record = {"explanation": None, "score": None, "error": str(e)}
                record.update({"layer": layer, "neuron": n, "model": cfg.model})
                out.write(orjson.dumps(record) + b"\n")
                out.flush()
                if record.get("error"):
                    failures += 1
                    log(f"{layer}:{n}: {record['error']} (asked again on the next run)")
                else:
                    done[(layer, n)] = record
        finally:
            out.flush()
    _write_tables(store, done, cfg.model)
    if failures == 0:
        atomic_write_bytes(work, b"".join(orjson.dumps(r) + b"\n" for r in done.values()))
    log(f"explained {len(done)} neurons ({failures} failed) into {cfg.store}")
    return {"done": len(done), "failed": failures}


def _parse_neurons(spec: str, n_layers: int, size: int, store) -> dict[int, list[int]]:
    """--neurons: '3:17,5:2' (those), or the --n2g forms ('all', 'layers:0,5', N, N@0,5)."""
    if ":" in spec and not spec.startswith("layers:"):
        out: dict[int, list[int]] = {}
        for part in spec.split(","):
            try:
                layer, n = (int(x) for x in part.split(":"))
            except ValueError:
                raise ConfigError(f"--neurons {spec}: write LAYER:NEURON pairs, e.g. --neurons 3:17,5:2") from None
            if not (0 <= layer < n_layers and 0 <= n < size):
                raise ConfigError(f"--neurons {spec}: {layer}:{n} is not a neuron of this model ({n_layers} layers x {size})")
            out.setdefault(layer, []).append(n)
        return {k: sorted(set(v)) for k, v in out.items()}
    return select_neurons(spec, n_layers, size, store, option="--neurons")


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
            rows[n] = {"neuron": n, "explanation": r["explanation"], "score": r["score"], "explainer": model, "source": SOURCE_EXPLAIN,
                       "method": r.get("method"), "prompt_hash": r.get("prompt_hash"), "usage": orjson.dumps(r.get("usage")).decode(),
                       "details": orjson.dumps(r.get("details") or []).decode(), "raw": orjson.dumps(r.get("raw") or []).decode()}
        schema = pa.schema([*TABLE_SCHEMA, ("prompt_hash", pa.string()), ("usage", pa.string()), ("details", pa.string()), ("raw", pa.string())])
        ordered = [rows[n] for n in sorted(rows)]
        store.write_layer(SERVICE, layer, pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in ordered], schema=schema))
    store.add_service(SERVICE)

