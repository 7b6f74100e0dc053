"""Token display shared by the services' render halves: each vocabulary entry escaped once, and
the number of colour steps per sign of the diverging activation scale."""

from __future__ import annotations

from markupsafe import escape

BUCKETS = 9  # colour steps per sign (classes p1..p9, n1..n9)


def display(token: str) -> str:
    return token.replace("\n", "\u21b5").replace("\r", "\u240d").replace("\t", "\u2192")


def shown(token: str) -> str:
    """A token shown on its own (a table cell, a list), not inside its text: a token of whitespace
    alone gets visible marks (spaces as "␣"), which would otherwise be an empty-looking cell."""
    return display(token.replace(" ", "␣") if token and not token.strip() else token)


def escaped_vocab(vocab: list[str]) -> list[str]:
    return [str(escape(display(t))) for t in vocab]


def escaped_shown_vocab(vocab: list[str]) -> list[str]:
    return [str(escape(shown(t))) for t in vocab]
