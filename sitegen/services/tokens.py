"""Token display shared by the services' render halves: each vocabulary entry escaped once, and
the number of colour steps per sign of the diverging activation scale."""

from __future__ import annotations

from markupsafe import escape

BUCKETS = 9  # colour steps per sign (classes p1..p9, n1..n9)


def display(token: str) -> str:
    return token.replace("\n", "\u21b5").replace("\r", "\u240d").replace("\t", "\u2192")


def escaped_vocab(vocab: list[str]) -> list[str]:
    return [str(escape(display(t))) for t in vocab]
