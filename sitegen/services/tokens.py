"""Token display shared by the services' render halves: escaped once per vocabulary entry,
coloured by a diverging scale centred on zero."""

from __future__ import annotations

from markupsafe import escape

BUCKETS = 9  # colour steps per sign (classes p1..p9, n1..n9)


def display(token: str) -> str:
    return token.replace("\n", "\u21b5").replace("\r", "\u240d").replace("\t", "\u2192")


def escaped_vocab(vocab: list[str]) -> list[str]:
    return [str(escape(display(t))) for t in vocab]


def colour_class(value: float, scale: float) -> str:
    if scale <= 0:
        return ""
    b = int(round(BUCKETS * value / scale))
    if b == 0:
        return ""
    b = max(-BUCKETS, min(BUCKETS, b))
    return f"p{b}" if b > 0 else f"n{-b}"


def tokens_html(ids: list[int], acts: list[float], esc_vocab: list[str], scale: float, muted: int = -1) -> str:
    """<i> per token, class by activation; `muted` marks the BOS position (not counted)."""
    out = []
    for i, (t, a) in enumerate(zip(ids, acts)):
        cls = "bos" if i == muted else colour_class(a, scale)
        out.append(f"<i class={cls}>{esc_vocab[t]}</i>" if cls else f"<i>{esc_vocab[t]}</i>")
    return "".join(out)
