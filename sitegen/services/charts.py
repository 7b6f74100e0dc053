"""The frame both histograms on a unit's page are drawn in (neuroscope's activations, logits'
direct effects): an SVG with a log count axis (a tick and a grid line at every power of ten), the
value range labelled below, a dashed line and a label at zero. The callers draw their own bars.
Numbers only: nothing here comes from the corpus or the vocabulary."""

from __future__ import annotations

from typing import NamedTuple


class Box(NamedTuple):
    """A plot area of plot_w x plot_h at x = plot_x, in a box_w x box_h box (room for the labels)."""

    plot_x: int
    plot_w: int
    plot_h: int
    box_w: int
    box_h: int


def log_count_svg(
    box: Box, bars: str, lo: float, hi: float, zero_x: float | None, decades: int, aria: str, title: str, x_title: str
) -> str:
    """The chart around `bars` (SVG paths): `decades` powers of ten on the count axis, `lo` and `hi`
    at the ends of the value axis, and at `zero_x` (None: zero is not inside) the zero line."""
    x, w, h = box.plot_x, box.plot_w, box.plot_h
    tick_y = [round(h * (1 - k / (1 + decades))) for k in range(1, decades + 2)]
    ticks = "".join(
        f'<text class="yt" x="{x - 4}" y="{y + 4}" text-anchor="end">{10**k:,}</text>' for k, y in enumerate(tick_y)
    )
    grid = "".join(f"M{x} {y}h{w}" for y in tick_y)
    xlabels = [(x, "start", f"{lo:.3g}"), (x + w, "end", f"{hi:.3g}")]
    zero = ""
    if zero_x is not None:
        zero = f'<path class="zero" d="M{zero_x:g} 0V{h}"/>'
        if x + 30 < zero_x < x + w - 30:  # a 0 label only where it clears the ends' labels
            xlabels.insert(1, (zero_x, "middle", "0"))
    xl = "".join(f'<text x="{a:g}" y="{h + 14}" text-anchor="{anchor}">{t}</text>' for a, anchor, t in xlabels)
    return (
        f'<svg class="hist" viewBox="0 -10 {box.box_w} {box.box_h + 10}" role="img" aria-label="{aria}"><title>{title}</title>'
        f'<path class="grid" d="{grid}"/>{bars}{zero}{ticks}{xl}'
        f'<text x="{x + w // 2}" y="{box.box_h - 4}" text-anchor="middle">{x_title}</text>'
        f'<text x="9" y="{h // 2}" text-anchor="middle" transform="rotate(-90 9 {h // 2})">tokens (log)</text></svg>'
    )
