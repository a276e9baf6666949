"""Plots drawn in Python as inline SVG: no JavaScript, no fonts or scripts to fetch.

Every plot is an <svg class="plot" id=... data-marks=N> whose data points are elements of
class "mark", each with a <title> tooltip, so a browser check can count what was drawn.
Three kinds: `line_plot` (series of points, optionally log2 x and categorical x labels),
`bar_plot` (grouped horizontal bars) and `range_plot` (min-max ranges with a median dot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000")
REFERENCE_COLOUR = "#777777"

WIDTH, HEIGHT = 740, 340
LEFT, RIGHT, TOP, BOTTOM = 70, 220, 34, 52  # margins; the legend sits in the right one


@dataclass
class Series:
    name: str
    points: list[tuple[float, float, str]] = field(default_factory=list)  # (x, y, tooltip)
    reference: bool = False  # a floor or a bandwidth ceiling: dashed grey, no marks


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    first -= first * step > lo  # lo / step may round across an integer
    last += last * step < hi
    return [round(i * step, 12) for i in range(first, last + 1)]


def log2_ticks(lo: float, hi: float) -> list[float]:
    """Powers of two covering [lo, hi] (lo > 0): every one, or every n-th so that at most 10 remain."""
    first, last = math.floor(math.log2(lo)), math.ceil(math.log2(hi))
    stride = max(1, math.ceil((last - first + 1) / 9))
    return [2.0**e for e in range(first, last + stride, stride)]


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.3g}"
    return f"{value:.6g}"


def _open(plot_id: str, title: str, marks: int, height: int = HEIGHT) -> list[str]:
    return [
        f'<svg class="plot" id="{escape(plot_id)}" data-marks="{marks}" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img" aria-label="{escape(title)}">',
        f'<text class="title" x="{LEFT}" y="20">{escape(title)}</text>',
    ]


def _legend(names: list[tuple[str, str, bool]], top: int = TOP) -> list[str]:
    """Swatches at the right: (name, colour, dashed)."""
    out = []
    x = WIDTH - RIGHT + 16
    for i, (name, colour, dashed) in enumerate(names):
        y = top + 8 + 18 * i
        dash = ' stroke-dasharray="5 4"' if dashed else ""
        out.append(f'<line x1="{x}" y1="{y}" x2="{x + 18}" y2="{y}" stroke="{colour}" stroke-width="2.5"{dash}/>')
        out.append(f'<text class="legend" x="{x + 24}" y="{y + 4}">{escape(_shorten(name, 28))}</text>')
    return out


def line_plot(
    plot_id: str,
    title: str,
    series: list[Series],
    *,
    x_label: str,
    y_label: str,
    log_x: bool = False,
    x_names: dict[float, str] | None = None,
) -> str:
    """Lines through each series' points; `x_names` labels categorical x positions instead of numbers."""
    drawn = [s for s in series if s.points]
    xs = [p[0] for s in drawn for p in s.points]
    ys = [p[1] for s in drawn for p in s.points]
    log_x = log_x and min(xs) > 0 and max(xs) / min(xs) >= 4
    if x_names:
        x_ticks = sorted(x_names)[:: max(1, math.ceil(len(x_names) / 10))]
    elif log_x:
        x_ticks = log2_ticks(min(xs), max(xs))
    else:
        x_ticks = nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(min(0.0, min(ys)), max(ys))
    x_lo, x_hi = (min(xs + x_ticks), max(xs + x_ticks)) if not x_names else (min(xs) - 0.5, max(xs) + 0.5)
    y_lo, y_hi = y_ticks[0], y_ticks[-1]

    def tx(x: float) -> float:
        if log_x:
            x, lo, hi = math.log2(x), math.log2(x_lo), math.log2(x_hi)
        else:
            lo, hi = x_lo, x_hi
        return LEFT + (x - lo) / ((hi - lo) or 1) * (WIDTH - LEFT - RIGHT)

    def ty(y: float) -> float:
        return HEIGHT - BOTTOM - (y - y_lo) / ((y_hi - y_lo) or 1) * (HEIGHT - TOP - BOTTOM)

    marks = sum(len(s.points) for s in drawn if not s.reference)
    out = _open(plot_id, title, marks)
    out += _axes(
        [(tx(x), (x_names or {}).get(x, _fmt(x))) for x in x_ticks],
        [(ty(y), _fmt(y)) for y in y_ticks],
        x_label,
        y_label,
    )
    legend = []
    colours = iter(PALETTE * 4)
    for s in drawn:
        colour = REFERENCE_COLOUR if s.reference else next(colours)
        legend.append((s.name, colour, s.reference))
        points = sorted(s.points)
        path = " ".join(f"{'M' if i == 0 else 'L'}{tx(x):.1f},{ty(y):.1f}" for i, (x, y, _) in enumerate(points))
        dash = ' stroke-dasharray="5 4"' if s.reference else ""
        out.append(f'<path class="series" d="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        if not s.reference:
            for x, y, tip in points:
                out.append(
                    f'<circle class="mark" cx="{tx(x):.1f}" cy="{ty(y):.1f}" r="3.5" fill="{colour}">'
                    f"<title>{escape(tip)}</title></circle>"
                )
    out += _legend(legend)
    out.append("</svg>")
    return "\n".join(out)


def _axes(
    x_ticks: list[tuple[float, str]], y_ticks: list[tuple[float, str]], x_label: str, y_label: str, height: int = HEIGHT
) -> list[str]:
    right, bottom = WIDTH - RIGHT, height - BOTTOM
    out = [f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{right - LEFT}" height="{bottom - TOP}"/>']
    for x, label in x_ticks:
        out.append(f'<line class="grid" x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{bottom}"/>')
        out.append(f'<text class="tick" x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{escape(label)}</text>')
    for y, label in y_ticks:
        out.append(f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}"/>')
        out.append(f'<text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(label)}</text>')
    out.append(
        f'<text class="axis" x="{(LEFT + right) / 2}" y="{height - 10}" text-anchor="middle">{escape(x_label)}</text>'
    )
    out.append(
        f'<text class="axis" x="14" y="{(TOP + bottom) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {(TOP + bottom) / 2})">{escape(y_label)}</text>'
    )
    return out


def _category_height(rows: int, per_row: int) -> int:
    return TOP + BOTTOM + max(rows, 1) * per_row


CATEGORY_LEFT = LEFT + 150  # horizontal plots: room for the category names


def _value_axis(ticks: list[float], tx, height: int, x_label: str) -> list[str]:
    """Frame, vertical grid and x ticks of a horizontal plot."""
    right, bottom = WIDTH - RIGHT, height - BOTTOM
    out = [
        f'<rect class="frame" x="{CATEGORY_LEFT}" y="{TOP}" width="{right - CATEGORY_LEFT}" height="{bottom - TOP}"/>'
    ]
    for x in ticks:
        out.append(f'<line class="grid" x1="{tx(x):.1f}" y1="{TOP}" x2="{tx(x):.1f}" y2="{bottom}"/>')
        out.append(f'<text class="tick" x="{tx(x):.1f}" y="{bottom + 16}" text-anchor="middle">{_fmt(x)}</text>')
    out.append(
        f'<text class="axis" x="{(CATEGORY_LEFT + right) / 2}" y="{height - 10}" text-anchor="middle">{escape(x_label)}</text>'
    )
    return out


def bar_plot(
    plot_id: str,
    title: str,
    categories: list[str],
    series: list[tuple[str, list[float | None], list[str]]],
    *,
    x_label: str,
    x_max: float | None = None,
) -> str:
    """Grouped horizontal bars: one group per category, one bar per series (name, values, tooltips).
    A None value draws no bar."""
    per_row = 10 + 12 * len(series)
    height = _category_height(len(categories), per_row)
    values = [v for _, vals, _ in series for v in vals if v is not None]
    x_ticks = nice_ticks(0.0, max([*values, x_max or 0.0, 1e-9]))
    x_hi = x_ticks[-1]

    def tx(x: float) -> float:
        return CATEGORY_LEFT + x / x_hi * (WIDTH - CATEGORY_LEFT - RIGHT)

    out = _open(plot_id, title, len(values), height)
    out += _value_axis(x_ticks, tx, height, x_label)
    for row, category in enumerate(categories):
        top = TOP + row * per_row + 5
        out.append(
            f'<text class="tick" x="{CATEGORY_LEFT - 6}" y="{top + per_row / 2:.1f}" text-anchor="end">'
            f"<title>{escape(category)}</title>{escape(_shorten(category, 30))}</text>"
        )
        for k, (_, vals, tips) in enumerate(series):
            if vals[row] is None:
                continue
            y = top + 12 * k
            out.append(
                f'<rect class="mark" x="{CATEGORY_LEFT}" y="{y}" width="{max(tx(vals[row]) - CATEGORY_LEFT, 1):.1f}" height="10" '
                f'fill="{PALETTE[k % len(PALETTE)]}"><title>{escape(tips[row])}</title></rect>'
            )
    out += _legend([(name, PALETTE[k % len(PALETTE)], False) for k, (name, _, _) in enumerate(series)])
    out.append("</svg>")
    return "\n".join(out)


def range_plot(plot_id: str, title: str, rows: list[tuple[str, float, float, float, str]], *, x_label: str) -> str:
    """One line per row from min to max with a dot at the median: (label, min, median, max, tooltip)."""
    per_row = 18
    height = _category_height(len(rows), per_row)
    x_ticks = nice_ticks(min(r[1] for r in rows) * 0.95, max(r[3] for r in rows) * 1.02)
    x_lo, x_hi = x_ticks[0], x_ticks[-1]

    def tx(x: float) -> float:
        return CATEGORY_LEFT + (x - x_lo) / ((x_hi - x_lo) or 1) * (WIDTH - CATEGORY_LEFT - RIGHT)

    out = _open(plot_id, title, len(rows), height)
    out += _value_axis(x_ticks, tx, height, x_label)
    for i, (label, lo, mid, hi, tip) in enumerate(rows):
        y = TOP + i * per_row + per_row / 2 + 2
        out.append(
            f'<text class="tick" x="{CATEGORY_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"<title>{escape(label)}</title>{escape(_shorten(label, 30))}</text>"
        )
        out.append(
            f'<line x1="{tx(lo):.1f}" y1="{y:.1f}" x2="{tx(hi):.1f}" y2="{y:.1f}" stroke="{PALETTE[0]}" stroke-width="3"/>'
        )
        out.append(
            f'<circle class="mark" cx="{tx(mid):.1f}" cy="{y:.1f}" r="4.5" fill="{PALETTE[1]}">'
            f"<title>{escape(tip)}</title></circle>"
        )
    out += _legend([("min to max", PALETTE[0], False), ("median", PALETTE[1], False)])
    out.append("</svg>")
    return "\n".join(out)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
