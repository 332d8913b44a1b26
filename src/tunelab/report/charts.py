"""Charts of the report as inline SVG: no script, no network, readable in any browser.

Long runs stay light: a curve is cut into at most `bins` consecutive runs of points and each run
keeps its lowest and its highest point, in step order (`minmax_bins`). A spike survives however
long the run; the first and last points always stay; a curve never has more than
2 x bins + 2 points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

import numpy as np

MAX_BINS = 300  # per curve: at most 600 points in any chart
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22")


def minmax_bins(x: np.ndarray, y: np.ndarray, bins: int = MAX_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Per bin of consecutive points, its minimum and maximum (in x order), and both end points:
    at most 2 x `bins` + 2 points; a curve that short already is returned whole.

    Non-finite values are dropped (a chart cannot place them; the report counts them elsewhere)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) <= 2 * bins:
        return x, y
    edges = np.linspace(0, len(x), bins + 1).round().astype(np.int64)
    picks: list[int] = []
    for a, b in zip(edges[:-1], edges[1:]):
        lo, hi = a + int(np.argmin(y[a:b])), a + int(np.argmax(y[a:b]))
        picks.extend(sorted({lo, hi}))
    idx = np.array(sorted(set(picks) | {0, len(x) - 1}), dtype=np.int64)
    return x[idx], y[idx]


@dataclass
class Curve:
    label: str
    x: np.ndarray
    y: np.ndarray
    color: str = PALETTE[0]
    dash: str = ""  # SVG stroke-dasharray, e.g. "4 3"
    width: float = 1.6
    opacity: float = 1.0
    markers: bool = False  # a dot per point (few points: probes, checkpoints)


@dataclass
class Chart:
    title: str
    xlabel: str
    ylabel: str
    curves: list[Curve] = field(default_factory=list)
    log_y: bool = False
    width: int = 560
    height: int = 260
    note: str = ""  # one line under the chart


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float, digits: int = 4) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if float(v).is_integer() and a < 1e7:
        return f"{int(v):,}"
    if a >= 1e5 or a < 1e-3:
        return f"{v:.{max(2, digits - 1)}g}"
    return f"{v:.{digits}g}"


def _labels(ticks: list[float]) -> list[str]:
    """Tick labels with as few digits as keep them apart (1e-4 and 1.05e-4 must not both read 0.0001)."""
    for digits in range(2, 8):
        labels = [_fmt(t, digits) for t in ticks]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def svg(chart: Chart) -> str:
    """The chart as one `<svg>` element (points carry a `<title>` tooltip when there are few)."""
    w, h = chart.width, chart.height
    left, right, top, bottom = 62, 12, 26, 40
    pw, ph = w - left - right, h - top - bottom
    curves = []
    for c in chart.curves:
        x, y = minmax_bins(c.x, c.y)
        if chart.log_y:
            pos = y > 0
            x, y = x[pos], np.log10(y[pos])
        if len(x):
            curves.append((c, x, y))
    parts = [f'<svg class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
             f'aria-label="{escape(chart.title)}">',
             f'<text x="{left}" y="16" class="ct">{escape(chart.title)}</text>']
    if not curves:
        parts.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle" class="na">no data yet</text>'
                     "</svg>")
        return _figure("".join(parts), [], chart.note)
    xs = np.concatenate([x for _, x, _ in curves])
    ys = np.concatenate([y for _, _, y in curves])
    x0, x1 = float(xs.min()), float(xs.max())
    y0, y1 = float(ys.min()), float(ys.max())
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.06 or (abs(y0) * 0.1 or 1.0)
    y0, y1 = y0 - pad, y1 + pad

    def px(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * pw

    def py(v: float) -> float:
        return top + (1 - (v - y0) / (y1 - y0)) * ph

    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="plot"/>')
    yticks = _ticks(y0, y1)
    for t, label in zip(yticks, _labels([10 ** t for t in yticks] if chart.log_y else yticks)):
        yy = py(t)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{yy:.1f}" y2="{yy:.1f}" class="grid"/>'
                     f'<text x="{left - 4}" y="{yy + 3:.1f}" text-anchor="end" class="tick">{label}</text>')
    xticks = _ticks(x0, x1, 6)
    for t, label in zip(xticks, _labels(xticks)):
        xx = px(t)
        parts.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{top}" y2="{top + ph}" class="grid"/>'
                     f'<text x="{xx:.1f}" y="{top + ph + 14}" text-anchor="middle" class="tick">{label}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{h - 6}" text-anchor="middle" class="axis">{escape(chart.xlabel)}</text>'
                 f'<text transform="translate(12,{top + ph / 2}) rotate(-90)" text-anchor="middle" class="axis">'
                 f'{escape(chart.ylabel)}{" (log)" if chart.log_y else ""}</text>')
    for c, x, y in curves:
        pts = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(x, y))
        dash = f' stroke-dasharray="{c.dash}"' if c.dash else ""
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{c.color}" stroke-width="{c.width}" '
                     f'stroke-opacity="{c.opacity}"{dash}><title>{escape(c.label)}</title></polyline>')
        if c.markers and len(x) <= 64:
            for a, b in zip(x, y):
                value = 10 ** b if chart.log_y else b
                parts.append(f'<circle cx="{px(a):.1f}" cy="{py(b):.1f}" r="2.6" fill="{c.color}">'
                             f'<title>{escape(c.label)}: step {a:g}, {value:.5g}</title></circle>')
    parts.append("</svg>")
    return _figure("".join(parts), [c for c, _, _ in curves], chart.note)


def _figure(svg_text: str, curves: list[Curve], note: str = "") -> str:
    """The chart, its legend (HTML, under the plot: never over the lines) and its note."""
    items = []
    for c in curves:
        dash = f' stroke-dasharray="{c.dash}"' if c.dash else ""
        items.append(f'<span><svg width="18" height="8"><line x1="0" x2="18" y1="4" y2="4" stroke="{c.color}" '
                     f'stroke-width="2"{dash}/></svg>{escape(c.label)}</span>')
    legend = f'<div class="legend">{"".join(items)}</div>' if len(curves) > 1 else ""
    return (f'<figure class="fig">{svg_text}{legend}'
            f'{f"<figcaption>{escape(note)}</figcaption>" if note else ""}</figure>')


def bars(title: str, labels: list[str], series: dict[str, list[float | None]], ylabel: str,
         width: int = 820, height: int = 240, note: str = "") -> str:
    """Grouped vertical bars (per UNet block, say): one group per label, one bar per series."""
    left, right, top, bottom = 62, 12, 26, 46
    pw, ph = width - left - right, height - top - bottom
    values = [v for vs in series.values() for v in vs if v is not None and math.isfinite(v)]
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}"><text x="{left}" y="16" class="ct">{escape(title)}</text>']
    if not values or not labels:
        parts.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle" class="na">no data</text></svg>')
        return _figure("".join(parts), [])
    top_v = max(values) * 1.08 or 1.0
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="plot"/>')
    yticks = _ticks(0.0, top_v)
    for t, label in zip(yticks, _labels(yticks)):
        yy = top + (1 - t / top_v) * ph
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{yy:.1f}" y2="{yy:.1f}" class="grid"/>'
                     f'<text x="{left - 4}" y="{yy + 3:.1f}" text-anchor="end" class="tick">{label}</text>')
    group = pw / len(labels)
    bar = group * 0.8 / max(1, len(series))
    for gi, label in enumerate(labels):
        gx = left + gi * group + group * 0.1
        parts.append(f'<text x="{gx + group * 0.4:.1f}" y="{top + ph + 12}" text-anchor="end" class="tick" '
                     f'transform="rotate(-45 {gx + group * 0.4:.1f} {top + ph + 12})">{escape(label)}</text>')
        for si, (name, vs) in enumerate(series.items()):
            v = vs[gi] if gi < len(vs) else None
            if v is None or not math.isfinite(v):
                continue
            bh = v / top_v * ph
            parts.append(f'<rect x="{gx + si * bar:.1f}" y="{top + ph - bh:.1f}" width="{bar:.1f}" height="{bh:.1f}" '
                         f'fill="{PALETTE[si % len(PALETTE)]}"><title>{escape(name)} {escape(label)}: {v:.4g}</title></rect>')
    parts.append(f'<text transform="translate(12,{top + ph / 2}) rotate(-90)" text-anchor="middle" class="axis">'
                 f'{escape(ylabel)}</text>')
    parts.append("</svg>")
    return _figure("".join(parts), [Curve(n, np.zeros(0), np.zeros(0), PALETTE[i % len(PALETTE)])
                                    for i, n in enumerate(series)], note)
