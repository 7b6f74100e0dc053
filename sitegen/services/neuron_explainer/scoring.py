"""The numeric core of explanation scoring, from ../shared/reference/neuron-explainer.md:
discretisation for prompts, the expected activation a simulator predicts from its logprobs, the
logprob-free fallback's parser, and the correlation score. Pure Python + numpy."""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import numpy as np

LEVELS = [str(i) for i in range(11)]  # the simulator's answers "0".."10"


def discretise(acts: Sequence[float], max_act: float) -> list[int]:
    """OpenAI's prompt scale: min(10, floor(10 * relu(x) / max_act)); all 0 when max_act <= 0."""
    if max_act <= 0:
        return [0] * len(acts)
    return [min(10, math.floor(10 * max(0.0, float(x)) / max_act)) for x in acts]


def expected_value(top_logprobs: Mapping[str, float]) -> float | None:
    """The expected level over the probabilities of "0".."10" among a position's top logprobs,
    renormalised over those answers; None when none of them is there. Tokens are compared after
    stripping whitespace (" 7" and "7" are the same answer; their probabilities add)."""
    probs = dict.fromkeys(range(11), 0.0)
    found = False
    for token, logprob in top_logprobs.items():
        t = token.strip()
        if t in LEVELS:
            probs[int(t)] += math.exp(logprob)
            found = True
    total = sum(probs.values())
    if not found or total <= 0:
        return None
    return sum(level * p for level, p in probs.items()) / total


_LINE = re.compile(r"^(.*)\t\s*(\d{1,2})\s*$")


def parse_rewrite(text: str, n_tokens: int) -> list[float] | None:
    """The logprob-free fallback: the simulator rewrites the excerpt as `token<TAB>level` lines.
    Returns one level per token, in order; None when the answer does not have exactly n_tokens
    such lines (a malformed answer is not scored rather than scored wrongly)."""
    levels = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            levels.append(float(min(10, int(m.group(2)))))
    return levels if len(levels) == n_tokens else None


def correlation(predicted: Sequence[float], true: Sequence[float]) -> float | None:
    """Pearson correlation pooled over every token of every scored excerpt ("ev_correlation_score");
    None (no score) when either side is constant or the lengths differ."""
    p = np.asarray(predicted, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    if p.shape != t.shape or p.size < 2 or p.std() == 0 or t.std() == 0:
        return None
    return float(np.corrcoef(p, t)[0, 1])


PLACEHOLDER = "unknown"


def simulation_prompt(explanation: str, tokens: Sequence[str]) -> tuple[str, list[int]]:
    """The all-at-once simulation prompt: the explanation, then the excerpt as `token<TAB>unknown`
    lines. Returns the prompt and the character offset of every placeholder: with echo and
    logprobs, the distribution the model gives at each offset over "0".."10" is its prediction."""
    head = ("We study neurons of a neural network. Each neuron looks for one kind of thing in short texts. From an "
            "explanation of what a neuron looks for, predict its activation on each token, from 0 (none) to 10 (strongest).\n\n"
            # a made-up example, so that even a small simulator expects a number after each tab
            "Neuron explanation: the main thing this neuron does is find numbers, especially amounts of money.\n"
            "Activations:\n<start>\n the\t0\n price\t0\n rose\t0\n to\t0\n $\t3\n40\t10\n million\t7\n.\t0\n<end>\n"
            "<start>\n about\t0\n 12\t9\n percent\t4\n of\t0\n voters\t0\n<end>\n\n"
            "Neuron explanation: the main thing this neuron does is find words about the weather.\n"
            "Activations:\n<start>\n heavy\t2\n rain\t10\n fell\t1\n on\t0\n the\t0\n city\t0\n<end>\n\n"
            f"Neuron explanation: the main thing this neuron does is find {explanation.strip()}\n"
            "Activations:\n<start>\n")
    parts, offsets, at = [head], [], len(head)
    for tok in tokens:
        line_head = tok.replace("\t", " ").replace("\n", "\u21b5") + "\t"
        offsets.append(at + len(line_head))
        parts.append(line_head + PLACEHOLDER + "\n")
        at += len(line_head) + len(PLACEHOLDER) + 1
    parts.append("<end>\n")
    return "".join(parts), offsets


def predictions_from_echo(offsets: Sequence[int], logprobs: Mapping) -> list[float | None]:
    """Per placeholder: the expected level under the top logprobs of the echoed token that starts
    at its offset (an OpenAI completions `logprobs` object: tokens, text_offset, top_logprobs)."""
    index = {off: i for i, off in enumerate(logprobs.get("text_offset") or [])}
    tops = logprobs.get("top_logprobs") or []
    out: list[float | None] = []
    for off in offsets:
        i = index.get(off)
        out.append(expected_value(tops[i]) if i is not None and i < len(tops) and tops[i] else None)
    return out


def score_simulation(simulated: Sequence[Sequence[float | None]], true: Sequence[Sequence[float]]) -> float | None:
    """The correlation score pooled over every token of the scored excerpts; a position the
    simulator gave no answer for counts as level 0."""
    pred = [0.0 if p is None else p for seq in simulated for p in seq]
    real = [float(t) for seq in true for t in seq]
    return correlation(pred, real)
