"""The numeric core of explanation scoring, after OpenAI's automated-interpretability (Bills et
al. 2023): discretisation for prompts, the expected activation a simulator predicts from its
logprobs, the logprob-free fallback's parser, and the correlation score. Pure Python + numpy."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

LEVELS = [str(i) for i in range(11)]  # the simulator's answers "0".."10"


def discretise(acts: Sequence[float], max_act: float) -> list[int]:
    """OpenAI's prompt scale: min(10, floor(10 * relu(x) / max_act)); all 0 when max_act <= 0."""
    if max_act <= 0:
        return [0] * len(acts)
    return [min(10, math.floor(10 * max(0.0, float(x)) / max_act)) for x in acts]


def expected_value(top_logprobs: Mapping[str, float]) -> float | None:
    """The expected level over the probabilities of the exact tokens "0".."10" among a position's
    top logprobs, renormalised over those; None (scored as 0) when none of them is there. As the
    reference, only exact tokens count: " 7" is another token than "7" (the prompt puts the level
    right after a tab, so a level token with a space is a different, unlikely answer)."""
    probs = {int(token): math.exp(logprob) for token, logprob in top_logprobs.items() if token in LEVELS}
    total = sum(probs.values())
    if not probs or total <= 0:
        return None
    return sum(level * p for level, p in probs.items()) / total


# Every character str.splitlines() ends a line at ("\r\n" is two of them). A token holding one would
# split its prompt line, and the rewrite the fallback parser reads, into two.
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_SHOWN = str.maketrans({"\t": " ", **dict.fromkeys(LINE_BREAKS, "\u21b5")})


def _shown(token: str) -> str:
    """A token as one prompt line shows it: a tab as a space (it separates the level) and any line
    break as "\u21b5", so each token is exactly one line however the answer is split."""
    return token.translate(_SHOWN)


def parse_rewrite(text: str, tokens: Sequence[str]) -> tuple[list[float], bool]:
    """The logprob-free fallback: the simulator rewrites the excerpt as `token<TAB>level` lines.
    Returns (one level per token, whether the answer could be read). As the reference, an answer
    that cannot be read scores as all zeros (it is scored, not dropped, which would keep only the
    answers that went well): the rewrite must start at the first token's line and have exactly one
    line per token, each starting with its own token (compared without surrounding whitespace,
    which chat servers often strip); a level other than "0".."10" counts as 0 for that token."""
    zeros = [0.0] * len(tokens)
    lines = [ln for ln in text.splitlines() if ln.strip() and ln.strip() not in ("<start>", "<end>")]
    if not tokens:
        return [], True

    def split(line: str) -> tuple[str, str] | None:
        head, tab, level = line.rpartition("\t")
        return (head.strip(), level.strip()) if tab else None

    first = _shown(tokens[0]).strip()
    start = next((i for i, ln in enumerate(lines) if (part := split(ln)) is not None and part[0] == first), None)
    if start is None or len(lines) - start != len(tokens):
        return zeros, False
    levels = []
    for token, line in zip(tokens, lines[start:]):
        part = split(line)
        if part is None or part[0] != _shown(token).strip():
            return zeros, False
        levels.append(float(part[1]) if part[1] in LEVELS else 0.0)
    return levels, True


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
    head = (
        "We study neurons of a neural network. Each neuron looks for one kind of thing in short texts. From an "
        "explanation of what a neuron looks for, predict its activation on each token, from 0 (none) to 10 (strongest).\n\n"
        # a made-up example, so that even a small simulator expects a number after each tab
        "Neuron explanation: the main thing this neuron does is find numbers, especially amounts of money.\n"
        "Activations:\n<start>\n the\t0\n price\t0\n rose\t0\n to\t0\n $\t3\n40\t10\n million\t7\n.\t0\n<end>\n"
        "<start>\n about\t0\n 12\t9\n percent\t4\n of\t0\n voters\t0\n<end>\n\n"
        "Neuron explanation: the main thing this neuron does is find words about the weather.\n"
        "Activations:\n<start>\n heavy\t2\n rain\t10\n fell\t1\n on\t0\n the\t0\n city\t0\n<end>\n\n"
        f"Neuron explanation: the main thing this neuron does is find {explanation.strip()}\n"
        "Activations:\n<start>\n"
    )
    parts, offsets, at = [head], [], len(head)
    for tok in tokens:
        line_head = _shown(tok) + "\t"
        offsets.append(at + len(line_head))
        parts.append(line_head + PLACEHOLDER + "\n")
        at += len(line_head) + len(PLACEHOLDER) + 1
    parts.append("<end>\n")
    return "".join(parts), offsets


def _offsets_in_bytes(prompt: str, logprobs: Mapping) -> bool:
    """Whether the server's text_offset counts UTF-8 bytes rather than characters (the two differ
    only after a non-ASCII character): the unit under which more echoed tokens sit at their
    reported offset in the prompt wins; characters on a tie."""
    if prompt.isascii():
        return False
    raw = prompt.encode("utf-8")
    as_chars = as_bytes = 0
    for token, off in zip(logprobs.get("tokens") or [], logprobs.get("text_offset") or []):
        if not isinstance(token, str) or not isinstance(off, int) or not token or token.startswith("bytes:"):
            continue  # a piece of a multi-byte character, written differently by each server
        as_chars += prompt.startswith(token, off)
        as_bytes += raw.startswith(token.encode("utf-8"), off)
    return as_bytes > as_chars


ALIGN_OWN = "own"  # entry i is the distribution over token i given the tokens before it (OpenAI's convention)
ALIGN_NEXT = "next"  # entry i is the distribution over token i + 1 (llama-cpp-python without a BOS token, abetlen/llama-cpp-python#1983)
ALIGNMENTS = (ALIGN_OWN, ALIGN_NEXT)
ALIGN_MIN_TOKENS = 8  # echoed tokens that must agree before the token evidence decides
ALIGN_MIN_PLACEHOLDERS = 2  # placeholders that must agree before the level evidence decides
ALIGN_RATIO = 3  # the winning reading must agree at least this many times as often as the other


def _placeholder_tokens(prompt: str, offsets: Sequence[int], logprobs: Mapping) -> list[int | None]:
    """Per placeholder, the index of the echoed token starting at its offset (None: no token does,
    e.g. a tokenizer that merged it with the tab before it)."""
    if _offsets_in_bytes(prompt, logprobs):
        offsets = [len(prompt[:off].encode("utf-8")) for off in offsets]
    # the last token at an offset: an empty piece of a split character may share it with the next
    index = {off: i for i, off in enumerate(logprobs.get("text_offset") or [])}
    return [index.get(off) for off in offsets]


def echoes_placeholders(prompt: str, offsets: Sequence[int], logprobs: Mapping) -> bool:
    """Whether the answer echoes the prompt's tokens at all: an echoed token starts at some
    placeholder (a server giving logprobs for the generated token only, as llama.cpp's own
    llama-server, does not)."""
    return any(i is not None for i in _placeholder_tokens(prompt, offsets, logprobs))


def _decisive(a: int, b: int, least: int) -> bool:
    return a >= least and a >= ALIGN_RATIO * b


def echo_alignment(prompt: str, offsets: Sequence[int], logprobs: Mapping) -> tuple[str | None, dict]:
    """Which entry of an echo + logprobs answer holds the distribution that predicts each echoed
    token, read from the answer itself: (ALIGN_OWN, ALIGN_NEXT or None when it cannot be
    established, the evidence counted).

    Two independent signs. Tokens: how often the most likely token of entry i is token i (the
    entry predicts its own token) versus token i + 1 (it predicts the next one); the prompt is
    regular enough that any language model predicts many of its tokens. Levels: how often the
    entry of the placeholder token holds a level "0".."10" versus the entry before it. The token
    sign decides when it is clear; the level sign decides when the tokens are unclear; when the
    two point different ways, or neither is clear, nothing is established."""
    tokens = list(logprobs.get("tokens") or [])
    tops = list(logprobs.get("top_logprobs") or [])
    own = nxt = 0
    for i, top in enumerate(tops[: len(tokens)]):
        if not top or len(top) < 2:
            continue  # nothing but the echoed token itself (which both conventions add): no sign
        best = max(top.items(), key=lambda kv: kv[1])[0]
        own += best == tokens[i]
        nxt += i + 1 < len(tokens) and best == tokens[i + 1]
    levels_own = levels_next = 0
    for i in _placeholder_tokens(prompt, offsets, logprobs):
        if i is None:
            continue
        levels_own += i < len(tops) and _has_level(tops[i])
        levels_next += 0 < i <= len(tops) and _has_level(tops[i - 1])
    evidence = {"own": own, "next": nxt, "levels_own": levels_own, "levels_next": levels_next}
    by_tokens = (
        ALIGN_OWN
        if _decisive(own, nxt, ALIGN_MIN_TOKENS)
        else ALIGN_NEXT
        if _decisive(nxt, own, ALIGN_MIN_TOKENS)
        else None
    )
    by_levels = (
        ALIGN_OWN
        if _decisive(levels_own, levels_next, ALIGN_MIN_PLACEHOLDERS)
        else ALIGN_NEXT
        if _decisive(levels_next, levels_own, ALIGN_MIN_PLACEHOLDERS)
        else None
    )
    if by_tokens and by_levels and by_tokens != by_levels:
        return None, evidence
    return by_tokens or by_levels, evidence


def _has_level(top: Mapping[str, float] | None) -> bool:
    return bool(top) and any(token in LEVELS for token in top)


def placeholder_distributions(
    prompt: str, offsets: Sequence[int], logprobs: Mapping, alignment: str = ALIGN_OWN
) -> list[Mapping[str, float] | None]:
    """Per placeholder, the top logprobs of the distribution that predicts the placeholder token
    itself: the entry of the echoed token starting at its offset under OpenAI's convention, the
    entry before it where each entry predicts the next token. None where no echoed token starts at
    the placeholder or the entry is missing."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"unknown logprob alignment {alignment!r}")
    shift = 1 if alignment == ALIGN_NEXT else 0
    tops = logprobs.get("top_logprobs") or []
    out: list[Mapping[str, float] | None] = []
    for i in _placeholder_tokens(prompt, offsets, logprobs):
        j = None if i is None else i - shift
        out.append(tops[j] if j is not None and 0 <= j < len(tops) and tops[j] else None)
    return out


def predictions_from_echo(
    prompt: str, offsets: Sequence[int], logprobs: Mapping, alignment: str = ALIGN_OWN
) -> list[float | None]:
    """Per placeholder: the expected level under its own distribution's top logprobs (an OpenAI
    completions `logprobs` object: tokens, text_offset, top_logprobs; `alignment` from
    echo_alignment). Servers that count text_offset in UTF-8 bytes are recognised and the
    placeholders' offsets converted; a placeholder no echoed token starts at gets None (0)."""
    return [
        None if top is None else expected_value(top)
        for top in placeholder_distributions(prompt, offsets, logprobs, alignment)
    ]


def score_simulation(simulated: Sequence[Sequence[float | None]], true: Sequence[Sequence[float]]) -> float | None:
    """The correlation score pooled over every token of the scored excerpts; a position the
    simulator gave no answer for counts as level 0."""
    pred = [0.0 if p is None else p for seq in simulated for p in seq]
    real = [float(t) for seq in true for t in seq]
    return correlation(pred, real)
