"""The detection and fuzzing scorers (EleutherAI's delphi, Paulo et al. 2024), on held-out excerpts.

Both ask the scorer model yes/no questions about excerpts the explainer never saw, BATCH excerpts
per request, and report the balanced accuracy (the mean of the recall on the activating and on the
non-activating excerpts: 1 perfect, 0.5 chance or a constant answer, 0 inverted):

- detection: "does the unit fire somewhere in this excerpt?", on activating excerpts drawn from
  INTERVALS activation intervals of the held-out stored excerpts and on non-activating ones;
- fuzzing: "are the highlighted tokens the ones where it fires?", on the activating excerpts with
  their firing tokens highlighted (yes) and non-activating excerpts with as many tokens
  highlighted at random (no), as delphi's default.

An excerpt fires when its largest activation reaches THRESHOLD x the neuron's largest stored
activation (delphi's highlight threshold); its highlighted tokens are those reaching it. An answer
that cannot be read (no list of BATCH 0/1 values) counts as 0 for every excerpt of its batch: it is
scored, as a constant answer (chance), and counted in `unread`. A judge that can be held to the
answer's shape (the in-process model: `answer_format`) always answers a readable list. Pure
Python + numpy; the caller makes the requests (`ask`).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import orjson

from sitegen.services import bootstrap
from sitegen.services.neuron_explainer.scoring import _shown

THRESHOLD = 0.3  # an excerpt fires where it reaches this share of the neuron's largest activation
WINDOW = 32  # tokens shown per excerpt (delphi's example length)
BATCH = 5  # excerpts per request (delphi's default for detection)
INTERVALS = 3  # activation intervals the activating excerpts are drawn from
PER_CLASS = 10  # default activating and non-activating excerpts per scorer
SCORERS = ("detection", "fuzzing")


@dataclass(frozen=True)
class Excerpt:
    source: str  # "top" or "random": which stored list it comes from
    index: int  # its position in that list
    tokens: tuple[str, ...]  # the window shown
    acts: tuple[float, ...]
    interval: int | None  # activating: 0 (highest) .. INTERVALS - 1; None: non-activating

    @property
    def fires(self) -> bool:
        return self.interval is not None


def _peak_window(acts: Sequence[float], rng: np.random.Generator, fires: bool) -> tuple[int, int]:
    """WINDOW tokens: around the peak for a firing excerpt (three quarters of the window before
    it: the model reads left to right), at a seeded random place otherwise."""
    n = len(acts)
    if n <= WINDOW:
        return 0, n
    if fires:
        peak = int(np.argmax(acts))
        start = min(max(0, peak - (3 * WINDOW) // 4), n - WINDOW)
    else:
        start = int(rng.integers(0, n - WINDOW + 1))
    return start, start + WINDOW


def held_out(
    texts: dict, shown: set, per_class: int = PER_CLASS, seed: int = 0
) -> tuple[list[Excerpt], list[Excerpt], float]:
    """(activating, non-activating excerpts, the firing threshold) for the classification scorers:
    every stored excerpt (top and random) not among `shown` (what the explainer saw: ("top", i)
    pairs, and, where `texts` carries sequence ids, every excerpt of those sequences), split by
    THRESHOLD; at most `per_class` of each. Activating excerpts are drawn round-robin from
    INTERVALS equal-count intervals of their peak activation (highest first), so weak firing is
    judged too, not only the top; non-activating ones at random (seeded)."""
    rng = np.random.default_rng(seed)
    top_max = max((max(a) for _, a in texts["top"] if a), default=0.0)
    threshold = THRESHOLD * top_max
    shown_seqs = {texts[f"{kind}_seq"][i] for kind, i in shown if f"{kind}_seq" in texts}
    pool = []
    for kind in ("top", "random"):
        seqs = texts.get(f"{kind}_seq")
        for i, (tokens, acts) in enumerate(texts[kind]):
            if (kind, i) in shown or (seqs is not None and seqs[i] in shown_seqs) or not acts:
                continue
            pool.append((kind, i, tokens, acts, max(acts)))
    if top_max <= 0:
        return [], [], threshold
    firing = sorted((p for p in pool if p[4] >= threshold), key=lambda p: (-p[4], p[0], p[1]))
    quiet = [p for p in pool if p[4] < threshold]
    chunks = [list(c) for c in np.array_split(np.arange(len(firing)), INTERVALS)] if firing else []
    for c in chunks:
        rng.shuffle(c)
    picked: list[tuple[int, int]] = []  # (interval, index into firing)
    while len(picked) < min(per_class, len(firing)):
        for k, c in enumerate(chunks):
            if c and len(picked) < per_class:
                picked.append((k, int(c.pop(0))))
    activating = []
    for k, j in sorted(picked, key=lambda kj: kj[1]):
        kind, i, tokens, acts, _ = firing[j]
        a, b = _peak_window(acts, rng, True)
        activating.append(Excerpt(kind, i, tuple(tokens[a:b]), tuple(acts[a:b]), k))
    order = rng.permutation(len(quiet))[:per_class]
    non_activating = []
    for j in sorted(int(x) for x in order):
        kind, i, tokens, acts, _ = quiet[j]
        a, b = _peak_window(acts, rng, False)
        non_activating.append(Excerpt(kind, i, tuple(tokens[a:b]), tuple(acts[a:b]), None))
    return activating, non_activating, threshold


def _text(tokens: Sequence[str], marked: Sequence[bool] | None = None) -> str:
    """An excerpt on one line (line breaks as "\u21b5"), runs of marked tokens between << and >>."""
    out, inside = [], False
    for k, tok in enumerate(tokens):
        m = bool(marked and marked[k])
        if m and not inside:
            out.append("<<")
        if not m and inside:
            out.append(">>")
        inside = m
        out.append(_shown(tok))
    if inside:
        out.append(">>")
    return "".join(out)


@dataclass(frozen=True)
class Item:
    excerpt: Excerpt
    label: int  # 1: the right answer is yes
    shown: str  # the excerpt as the prompt shows it
    highlighted: tuple[int, ...] = ()  # fuzzing: the token positions highlighted


def detection_items(activating: list[Excerpt], non_activating: list[Excerpt]) -> list[Item]:
    return [Item(e, int(e.fires), _text(e.tokens)) for e in activating + non_activating]


def fuzzing_items(
    activating: list[Excerpt], non_activating: list[Excerpt], threshold: float, seed: int = 0
) -> list[Item]:
    """Activating excerpts with their firing tokens highlighted (label 1); non-activating ones
    with ceil(mean highlighted count) tokens highlighted at random (label 0), as delphi's default."""
    rng = np.random.default_rng(seed)
    items, counts = [], []
    for e in activating:
        marked = [a >= threshold for a in e.acts]
        counts.append(sum(marked))
        items.append(Item(e, 1, _text(e.tokens, marked), tuple(k for k, m in enumerate(marked) if m)))
    k = max(1, math.ceil(sum(counts) / len(counts))) if counts else 1
    for e in non_activating:
        pos = sorted(int(x) for x in rng.choice(len(e.tokens), size=min(k, len(e.tokens)), replace=False))
        marked = [i in pos for i in range(len(e.tokens))]
        items.append(Item(e, 0, _text(e.tokens, marked), tuple(pos)))
    return items


_SYSTEM = {
    "detection": (
        "You study one neuron of a neural network, given an explanation of what makes it fire. You are shown text "
        "excerpts, numbered. For each excerpt in turn, answer 1 if the neuron fires somewhere in it according to the "
        "explanation, else 0. Reply with a Python list of 0s and 1s, one per excerpt, and nothing else."
    ),
    "fuzzing": (
        "You study one neuron of a neural network, given an explanation of what makes it fire. You are shown text "
        "excerpts, numbered, with some tokens marked between << and >>. For each excerpt in turn, answer 1 if every "
        "marked token is one where the neuron fires according to the explanation, else 0. Reply with a Python list of "
        "0s and 1s, one per excerpt, and nothing else."
    ),
}
# our own made-up example, one per scorer
_EXAMPLE = {
    "detection": (
        "Explanation: amounts of money.\n\nExcerpts:\n1. the ticket cost $40 at the door\n2. she walked home in the rain\n"
        "3. a budget of 2 million euros\n",
        "[1, 0, 1]",
    ),
    "fuzzing": (
        "Explanation: amounts of money.\n\nExcerpts:\n1. the ticket cost<< $40>> at the door\n2. she<< walked>> home in the "
        "rain\n3. a budget of<< 2 million euros>>\n",
        "[1, 0, 1]",
    ),
}


def messages(scorer: str, explanation: str, batch: Sequence[Item]) -> list[dict]:
    body = "".join(f"{k + 1}. {item.shown}\n" for k, item in enumerate(batch))
    example, answer = _EXAMPLE[scorer]
    return [
        {"role": "system", "content": _SYSTEM[scorer]},
        {"role": "user", "content": example},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": f"Explanation: {explanation.strip()}\n\nExcerpts:\n{body}"},
    ]


def answer_format(size: int) -> dict:
    """The answer's shape as an OpenAI `response_format` (a JSON schema): a list of `size` 0/1
    values. Sent to a judge that honours it (`constrains_answers`): the in-process model decodes
    under it, choosing at each value the likelier of "0" and "1"."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "answers",
            "schema": {
                "type": "array",
                "items": {"type": "integer", "enum": [0, 1]},
                "minItems": size,
                "maxItems": size,
            },
        },
    }


_LIST = re.compile(r"\[([^\[\]]*)\]")


def parse_answer(text: str, size: int) -> list[int] | None:
    """The first [..] list in the answer as `size` 0/1 values; None when there is none of that shape."""
    for m in _LIST.finditer(text or ""):
        parts = [p.strip().strip("'\"") for p in m.group(1).split(",")]
        if len(parts) == size and all(p in ("0", "1") for p in parts):
            return [int(p) for p in parts]
    return None


def order(items: list[Item], seed: int = 0) -> list[Item]:
    """The items in a seeded random order, so a batch mixes both classes."""
    return [items[int(i)] for i in np.random.default_rng(seed).permutation(len(items))]


def run(
    scorer: str,
    explanation: str,
    items: list[Item],
    ask: Callable[[list[dict], int], str],
    seed: int = 0,
) -> dict:
    """Ask `ask(messages, size) -> answer text` (size: the 0/1 values the answer lists) about every
    item, BATCH per request; the
    scorer's record: value (balanced accuracy), ci, n, calls, prompt_hash (over every prompt sent),
    unread batches, and per excerpt its source, index, interval, label and prediction."""
    ordered = order(items, seed)
    labels, predictions, prompts, unread, rows = [], [], [], 0, []
    for start in range(0, len(ordered), BATCH):
        batch = ordered[start : start + BATCH]
        msgs = messages(scorer, explanation, batch)
        prompts.append(msgs)
        answer = parse_answer(ask(msgs, len(batch)), len(batch))
        if answer is None:
            unread += 1
            answer = [0] * len(batch)
        for item, p in zip(batch, answer):
            labels.append(item.label)
            predictions.append(p)
            rows.append(
                {
                    "source": item.excerpt.source,
                    "index": item.excerpt.index,
                    "interval": item.excerpt.interval,
                    "label": item.label,
                    "prediction": p,
                    **({"highlighted": list(item.highlighted)} if scorer == "fuzzing" else {}),
                }
            )
    value = bootstrap.balanced_accuracy(labels, predictions) if labels else None
    return {
        **bootstrap.score_entry(
            value, bootstrap.balanced_accuracy_ci(labels, predictions) if value is not None else None, len(labels)
        ),
        "calls": len(prompts),
        "prompt_hash": "sha256:" + hashlib.sha256(orjson.dumps(prompts)).hexdigest() if prompts else None,
        "unread": unread,
        "excerpts": rows,
    }
