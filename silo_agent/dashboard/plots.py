"""Inline SVG charts made on the server: metrics over rounds, the round timeline, ε against a budget.

Every text that reaches the SVG (silo names, metric names, numbers) goes through :func:`esc`. Colours
are presentation attributes, never ``style``, so the page's Content-Security-Policy can forbid inline
styles.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

from fedsilo.silo_agent.dashboard.data import RoundPhase, RoundView

__all__ = ["PHASE_COLOURS", "budget_bar", "esc", "legend", "metric_chart", "silo_colour", "swatch", "timeline_chart"]

#: Tableau 10: one colour per silo, by its position in the run's config.
_PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
            "#bab0ac")
#: Metric values are drawn within ±this, so that every range and coordinate stays a finite float.
_EDGE = 1e300
PHASE_COLOURS = {RoundPhase.OPEN: "#9ecae1", RoundPhase.QUORUM: "#3182bd", RoundPhase.CLOSED: "#31a354",
                 RoundPhase.FAILED: "#de2d26"}


def esc(value: object) -> str:
    """``value`` as text safe inside HTML or SVG, in element content and in quoted attributes."""
    return html.escape(str(value), quote=True)


def silo_colour(index: int) -> str:
    """The colour of the silo at ``index`` of the run's silo list."""
    return _PALETTE[index % len(_PALETTE)]


def swatch(colour: str) -> str:
    """A small square of ``colour`` (a legend key)."""
    return f'<svg class="swatch" width="10" height="10" aria-hidden="true"><rect width="10" height="10" fill="{esc(colour)}"/></svg>'


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round-numbered values spanning [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * step:
            step *= m
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def metric_chart(metric: str, rounds: Sequence[RoundView], silos: Sequence[str], *, total_rounds: int,
                 width: int = 390, height: int = 190) -> str:
    """One metric over rounds, a line per silo (silos in run order, coloured by position).

    Args:
        metric: The metric's name.
        rounds: The round timeline.
        silos: The run's silos, in config order (their colours).
        total_rounds: The run's rounds (the x axis).
        width: Pixels.
        height: Pixels.
    """
    points: dict[str, list[tuple[int, float, float]]] = {}  # silo -> (round, drawn at, value)
    for r in rounds:
        for silo, values in r.metrics.items():
            value = values.get(metric)
            if value is not None and math.isfinite(value):  # beyond ±1e300 drawn at the edge (ranges stay finite)
                points.setdefault(silo, []).append((r.round, min(max(value, -_EDGE), _EDGE), value))
    left, right, top, bottom = 48, 10, 22, 24
    w, h = width - left - right, height - top - bottom
    values = [v for series in points.values() for _, v, _ in series]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if high - low <= 1e-12 * max(1.0, abs(high)):
        widen = max(0.5, abs(high) * 0.05)
        low, high = low - widen, high + widen
    pad = (high - low) * 0.08
    low, high = low - pad, high + pad
    x_max = max(total_rounds, max((r.round for r in rounds), default=1), 2)

    def x(rnd: float) -> float:
        return left + (rnd - 1) / (x_max - 1) * w

    def y(v: float) -> float:
        return top + (high - v) / (high - low) * h

    out = [f'<svg class="chart" data-metric="{esc(metric)}" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(metric)} over rounds">',
           f'<text x="{left}" y="14" class="chart-title" fill="#222">{esc(metric)}</text>',
           f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="#fafafa" stroke="#ccc"/>']
    for t in _ticks(low, high):
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#e4e4e4"/>'
                   f'<text x="{left - 4}" y="{y(t) + 4:.1f}" text-anchor="end" class="tick" fill="#555">'
                   f'{esc(f"{t:.3g}")}</text>')
    step = max(1, math.ceil(x_max / 10))
    for rnd in range(1, x_max + 1, step):
        out.append(f'<text x="{x(rnd):.1f}" y="{top + h + 16}" text-anchor="middle" class="tick" fill="#555">'
                   f'{rnd}</text>')
    order = {name: i for i, name in enumerate(silos)}
    for silo in sorted(points, key=lambda s: (order.get(s, len(order)), s)):
        colour = silo_colour(order.get(silo, len(order)))
        series = points[silo]
        path = " ".join(f"{x(r):.1f},{y(v):.1f}" for r, v, _ in series)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2" data-silo="{esc(silo)}"/>')
        for r, v, value in series:
            out.append(f'<circle cx="{x(r):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}">'
                       f'<title>{esc(silo)}, round {r}: {esc(metric)} = {esc(f"{value:.4g}")}</title></circle>')
    if not points:
        out.append(f'<text x="{left + w / 2:.0f}" y="{top + h / 2:.0f}" text-anchor="middle" fill="#888">'
                   "no reports yet</text>")
    out.append("</svg>")
    return "".join(out)


def timeline_chart(rounds: Sequence[RoundView], silos: Sequence[str], *, now_ms: int, width: int = 900,
                   max_rounds: int = 40) -> str:
    """The newest ``max_rounds`` rounds as bars from opening to closing (or now), coloured by phase,
    with a tick per upload in its silo's colour."""
    shown = [r for r in rounds if r.opened_at_ms > 0][-max_rounds:]
    if not shown:
        return '<p class="muted">No round has opened yet.</p>'
    left, right, row = 64, 16, 18
    height = row * len(shown) + 30
    start = min(r.opened_at_ms for r in shown)
    end = max(max(r.closed_at_ms or now_ms, r.opened_at_ms) for r in shown)
    span = max(end - start, 1000)
    w = width - left - right

    def x(ms: int) -> float:
        return left + (ms - start) / span * w

    order = {name: i for i, name in enumerate(silos)}
    out = [f'<svg class="timeline" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
           'aria-label="round timeline">']
    for i, r in enumerate(shown):
        y0 = 6 + i * row
        stop = r.closed_at_ms or now_ms
        out.append(f'<text x="{left - 6}" y="{y0 + 12}" text-anchor="end" class="tick" fill="#333">round {r.round}</text>')
        out.append(f'<rect x="{x(r.opened_at_ms):.1f}" y="{y0 + 2}" width="{max(x(stop) - x(r.opened_at_ms), 2):.1f}" '
                   f'height="{row - 6}" fill="{PHASE_COLOURS[r.phase]}" data-round="{r.round}">'
                   f'<title>round {r.round}: {esc(r.phase.value)}, {esc(f"{(stop - r.opened_at_ms) / 1000:.1f}")} s'
                   f'</title></rect>')
        for u in r.uploads:
            colour = silo_colour(order.get(u.silo, len(order)))
            out.append(f'<line x1="{x(u.accepted_at_ms):.1f}" x2="{x(u.accepted_at_ms):.1f}" y1="{y0}" '
                       f'y2="{y0 + row - 2}" stroke="{colour}" stroke-width="3"><title>{esc(u.silo)} uploaded '
                       f'{esc(f"{(u.accepted_at_ms - r.opened_at_ms) / 1000:.1f}")} s after opening</title></line>')
    axis_y = 6 + len(shown) * row + 14
    for t in _ticks(0, span / 1000):
        out.append(f'<text x="{x(start + int(t * 1000)):.1f}" y="{axis_y}" text-anchor="middle" class="tick" '
                   f'fill="#555">{esc(f"{t:g}")} s</text>')
    out.append("</svg>")
    return "".join(out)


def budget_bar(epsilon: float, budget: float | None, *, near: float, width: int = 160, height: int = 14) -> str:
    """ε as a bar against its budget (full width), with a mark where warnings start (``near``)."""
    if budget is None or budget <= 0:
        return ""
    frac = epsilon / budget
    colour = "#de2d26" if frac > 1 else "#fd8d3c" if frac >= near else "#31a354"
    filled = min(frac, 1.0) * width
    return (f'<svg class="bar" width="{width}" height="{height}" role="img" aria-label="{esc(f"{frac:.0%}")} of budget">'
            f'<rect width="{width}" height="{height}" fill="#eee"/>'
            f'<rect width="{filled:.1f}" height="{height}" fill="{colour}"/>'
            f'<line x1="{near * width:.1f}" x2="{near * width:.1f}" y1="0" y2="{height}" stroke="#555" '
            f'stroke-dasharray="2,2"/></svg>')


def legend(silos: Sequence[str], present: Mapping[str, object] | None = None) -> str:
    """Silo colour keys (all silos, or those in ``present``)."""
    return '<p class="legend">' + " ".join(
        f'<span class="key">{swatch(silo_colour(i))} {esc(s)}</span>'
        for i, s in enumerate(silos) if present is None or s in present) + "</p>"
