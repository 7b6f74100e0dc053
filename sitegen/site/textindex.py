"""Explanation text analysed with lunr's pipeline (its tokeniser, trimmer, English stop-word
filter and Porter stemmer, from the `lunr` package): the build indexes each explanation's stems,
and the search page runs the same steps on the query in JavaScript (app.js; the stop words reach
it through the index's meta file, generated from lunr's own list).

One step of ours, between the trimmer and the stop words: a word longer than MAX_WORD_LENGTH
characters (after trimming) is dropped, from the index and from a query alike. No word of a
language is that long, and lunr's Porter stemmer recurses once per character in a run of 'y's, so
a 1,500-character run stops the build with a RecursionError."""

from __future__ import annotations

from collections import Counter

from lunr.pipeline import Pipeline
from lunr.stemmer import stemmer
from lunr.stop_word_filter import WORDS as STOP_WORDS
from lunr.stop_word_filter import stop_word_filter
from lunr.tokenizer import Tokenizer
from lunr.trimmer import trimmer

MAX_WORD_LENGTH = 64  # characters (code points); app.js drops the same words from a query


def _long_word_filter(token, i=None, tokens=None):  # noqa: ARG001 - lunr's pipeline function signature
    return None if len(str(token)) > MAX_WORD_LENGTH else token


Pipeline.register_function(_long_word_filter, "sitegenLongWordFilter")
_PIPELINE = Pipeline()
_PIPELINE.add(trimmer, _long_word_filter, stop_word_filter, stemmer)


def analyse(text: str) -> list[str]:
    """lunr's indexing pipeline: lower-case, split on whitespace and hyphens, trim non-word
    characters at both ends, drop words over MAX_WORD_LENGTH characters and English stop words,
    Porter-stem."""
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
