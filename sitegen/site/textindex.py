"""Explanation text analysed with lunr's pipeline (its tokeniser, trimmer, English stop-word
filter and Porter stemmer, from the `lunr` package): the build indexes each explanation's stems,
and the search page runs the same steps on the query in JavaScript (app.js; the stop words reach
it through the index's meta file, generated from lunr's own list)."""

from __future__ import annotations

from collections import Counter

from lunr.pipeline import Pipeline
from lunr.stemmer import stemmer
from lunr.stop_word_filter import WORDS as STOP_WORDS
from lunr.stop_word_filter import stop_word_filter
from lunr.tokenizer import Tokenizer
from lunr.trimmer import trimmer

_PIPELINE = Pipeline()
_PIPELINE.add(trimmer, stop_word_filter, stemmer)


def analyse(text: str) -> list[str]:
    """lunr's indexing pipeline: lower-case, split on whitespace and hyphens, trim non-word
    characters at both ends, drop English stop words, Porter-stem."""
    return [str(t) for t in _PIPELINE.run(Tokenizer(text)) if str(t)]


def term_frequencies(explanations: dict[int, str]) -> dict[str, dict[int, int]]:
    """stem -> global neuron id -> how often the stem occurs in that neuron's explanation."""
    out: dict[str, dict[int, int]] = {}
    for gid in sorted(explanations):
        for term, tf in sorted(Counter(analyse(explanations[gid])).items()):
            out.setdefault(term, {})[gid] = tf
    return out


def stop_words() -> list[str]:
    return sorted(STOP_WORDS)
