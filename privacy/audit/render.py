"""The audit report as one self-contained HTML page, with an SVG plot of cumulative ε per silo."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fedsilo.privacy.audit.empirical import EMPIRICAL_KEY, empirical_html


_COLOURS = {"record": "#1f5fa8", "silo": "#b3541e"}
_PLD_COLOURS = {"record": "#5fa8e8", "silo": "#e8a06a"}
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:75em;
padding:0 1em;color:#1b1b1b;line-height:1.45}
h1,h2,h3{line-height:1.2}
table{border-collapse:collapse;margin:.8em 0;font-size:.85em}
th,td{border:1px solid #c8c8c8;padding:.25em .5em;text-align:right;white-space:nowrap}
th{background:#f0f0f0}
td.t,th.t{text-align:left}
.over{color:#a00000;font-weight:bold}
.ok{color:#006000}
code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em;word-break:break-all}
section.silo{border-top:2px solid #888;margin-top:2em}
.scroll{overflow-x:auto}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: object, digits: int = 5) -> str:
    if value is None:
        return "&#8212;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return _e(f"{value:.{digits}g}")
    return _e(value)


def _render_html(report: Mapping[str, Any]) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>fedsilo privacy audit report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>fedsilo privacy audit report</h1>",
        "<table>",
        f'<tr><th class="t">Generated</th><td class="t">{_e(report["generated_at"])}</td></tr>',
        f'<tr><th class="t">Source</th><td class="t">{_e(_source_text(report["source"]))}'
        "</td></tr>",
        f'<tr><th class="t">Silos</th><td class="t">'
        f'{_e(", ".join(s["silo"] for s in report["silos"]) or "none")}</td></tr>',
        f'<tr><th class="t">Federation CA SHA-256</th><td class="t mono">'
        f'{_e(report["ca_sha256"])}</td></tr>',
        f'<tr><th class="t">Report format</th><td class="t">{_e(report["format"])}</td></tr>',
        "</table>",
        "<h2>How to verify this report</h2>",
        "<p>The numbers below come from each silo's signed, hash-chained privacy ledger. To check "
        "that nothing was changed and that every &#949; is computed correctly, run (with the "
        "federation CA certificate obtained from the operator):</p>",
        "<pre><code>fedsilo audit verify report.json --ca federation_ca.pem</code></pre>",
        "<p>It checks every signature and hash link, every budget statement, and recomputes every "
        "&#949; with Google's dp_accounting library (independent of the code that wrote the "
        "ledger). Without <code>--ca</code> it trusts the CA inside the report: then compare the "
        "SHA-256 it prints with the one above and with the federation CA's fingerprint you "
        "received from the operator.</p>",
    ]
    for section in report["silos"]:
        parts.append(_silo_html(section))
    if report.get("disclosures"):
        parts.append("<h2>Disclosures not covered by the ledger</h2>")
        for item in report["disclosures"]:
            parts.append(f"<h3>{_e(item['topic'])}</h3><p>{_e(item['statement'])}</p>")
    if report.get(EMPIRICAL_KEY):
        parts.append(_empirical_part(report))
    parts.append("<h2>Threat model</h2>")
    for paragraph in str(report["threat_model"]).split("\n\n"):
        parts.append(f"<p>{_e(paragraph)}</p>")
    accounting_desc = report["accounting"]
    parts.append("<h2>Accounting</h2><table>")
    for key in sorted(accounting_desc):
        value = accounting_desc[key]
        if isinstance(value, list):
            value = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        parts.append(f'<tr><th class="t">{_e(key)}</th><td class="t">{_e(value)}</td></tr>')
    parts.append("</table>")
    parts.append("<h2>Federation CA certificate</h2>")
    parts.append(f'<pre class="mono">{_e(report["ca_certificate"])}</pre>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _empirical_part(report: Mapping[str, Any]) -> str:
    return empirical_html(report.get(EMPIRICAL_KEY, []))


def _source_text(source: str) -> str:
    if source == "silo":
        return "a silo's own ledger (agent state directory)"
    if source == "coordinator":
        return "the coordinator's verified mirror of every silo's ledger"
    return source


def _silo_html(section: Mapping[str, Any]) -> str:
    name = section["silo"]
    budget = section["budget"]
    parts = [f'<section class="silo"><h2>Silo {_e(name)}</h2>']
    if budget is None:
        parts.append("<p>No signed budget statement.</p>")
    else:
        parts.append(
            f"<p>Budget signed by silo {_e(budget['silo'])} at {_e(budget['created_at'])}: "
            f"&#949;<sub>max</sub> = {_num(float(budget['epsilon']))} at "
            f"&#948; = {_num(float(budget['delta']))}, for each neighbouring relation "
            "separately, against anyone who sees this silo's uploads.</p>"
        )
    cumulative = section["cumulative"]
    if cumulative:
        parts.append(
            '<table><tr><th class="t">Relation</th><th class="t">Budget enforced by</th>'
            "<th>Spent &#949; (single upload)</th><th>RDP &#949; (single upload)</th>"
            "<th>PLD &#949; (single upload)</th><th>RDP &#949; (aggregate)</th>"
            "<th>PLD &#949; (aggregate)</th><th>Budget &#949;<sub>max</sub></th>"
            "<th>Budget left</th><th>Within budget</th></tr>"
        )
        for relation, spent in cumulative.items():
            left = None if section["budget_left"] is None else section["budget_left"][relation]
            within = (
                None if section["within_budget"] is None else section["within_budget"][relation]
            )
            css = "" if within is None else (' class="ok"' if within else ' class="over"')
            parts.append(
                f'<tr><td class="t">{_e(relation)}-level</td>'
                f'<td class="t">{_e(str(spent["accountant"]).upper())}</td>'
                f"<td>{_num(spent['spent'])}</td>"
                f"<td>{_num(spent['single_upload'])}</td><td>{_num(spent['single_upload_pld'])}</td>"
                f"<td>{_num(spent['aggregate'])}</td><td>{_num(spent['aggregate_pld'])}</td>"
                f"<td>{_num(None if budget is None else float(budget['epsilon']))}</td>"
                f"<td>{_num(left)}</td><td{css}>{_num(within)}</td></tr>"
            )
        parts.append("</table>")
        parts.append(
            "<p>RDP and PLD are two valid upper bounds on the same privacy loss; the budget was "
            "enforced on the one named (the silo's choice), and PLD is blank where its size "
            "guard left it out (RDP above 100).</p>"
        )
    parts.append(_svg_plot(section))
    parts.append(_releases_table(section["releases"]))
    parts.append("</section>")
    return "\n".join(parts)


_RELEASE_COLUMNS = (
    ("seq", "Seq", False),
    ("run_id", "Run", True),
    ("round", "Round", False),
    ("upload_index", "Upload", False),
    ("neighbouring", "Relation", True),
    ("mechanism", "Mechanism", True),
    ("guarantee_scope", "Noise added for", True),
    ("noise_multiplier", "&#963; (aggregate)", False),
    ("single_upload_noise_multiplier", "&#963; (single upload)", False),
    ("sample_rate", "q", False),
    ("steps", "Steps", False),
    ("clip_norm", "Clip C", False),
    ("delta", "&#948;", False),
    ("epsilon_rdp", "&#949; release (RDP)", False),
    ("rdp_order", "Order &#945;", False),
    ("epsilon_prv", "&#949; release (PRV)", False),
    ("epsilon_pld", "&#949; release (PLD)", False),
    ("single_upload_epsilon_rdp", "&#949; release, single upload", False),
    ("cumulative_epsilon_single_upload", "Cumulative &#949; (single upload)", False),
    ("cumulative_epsilon_aggregate", "Cumulative &#949; (aggregate)", False),
    ("cumulative_epsilon_pld_single_upload", "Cumulative PLD &#949; (single upload)", False),
    ("cumulative_epsilon_pld_aggregate", "Cumulative PLD &#949; (aggregate)", False),
    ("accountant", "Budget by", True),
)


def _releases_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "<p>No releases recorded.</p>"
    head = "".join(
        (f'<th class="t">{label}</th>' if text else f"<th>{label}</th>")
        for _, label, text in _RELEASE_COLUMNS
    )
    body = []
    for row in rows:
        cells = []
        for key, _, text in _RELEASE_COLUMNS:
            value = row[key]
            if key == "guarantee_scope":
                value = "aggregate (distributed)" if value == "aggregate" else "single upload"
            elif key == "accountant":
                value = str(value).upper()
            cells.append(f'<td class="t">{_e(value)}</td>' if text else f"<td>{_num(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        "<h3>Releases</h3><p>Each row is one ledger entry: one DP release, counted from the "
        'moment it was written.</p><div class="scroll"><table><tr>'
        + head
        + "</tr>"
        + "".join(body)
        + "</table></div>"
    )


def _svg_plot(section: Mapping[str, Any]) -> str:
    rows = section["releases"]
    if not rows:
        return ""
    # x = round, runs laid end to end in ledger order so that a new run continues the axis.
    runs: list[str] = []
    low: dict[str, int] = {}
    high: dict[str, int] = {}
    for row in rows:
        run, rnd = row["run_id"], row["round"]
        if run not in low:
            runs.append(run)
            low[run], high[run] = rnd, rnd
        low[run], high[run] = min(low[run], rnd), max(high[run], rnd)
    offset: dict[str, int] = {}
    position = 0
    for run in runs:
        offset[run] = position - low[run]
        position += high[run] - low[run] + 1
    series: list[tuple[str, str, bool, list[tuple[float, float]]]] = []
    for relation in sorted({r["neighbouring"] for r in rows}):
        mine = [r for r in rows if r["neighbouring"] == relation]
        for accountant, scope, dotted in (("", "single_upload", False), ("", "aggregate", True),
                                          ("pld_", "single_upload", False), ("pld_", "aggregate", True)):
            key = f"cumulative_epsilon_{accountant}{scope}"
            if dotted and all(r[key] == r[f"cumulative_epsilon_{accountant}single_upload"] for r in mine):
                continue  # the same line twice
            points = [(offset[r["run_id"]] + r["round"], r[key]) for r in mine if r[key] is not None]
            if points:
                label = f"{'PLD' if accountant else 'RDP'}, {scope.replace('_', ' ')}"
                series.append((relation, label, dotted, points))
    budget = None if section["budget"] is None else float(section["budget"]["epsilon"])
    ys = [y for *_, points in series for _, y in points] + ([budget] if budget else [])
    y_step = _nice_step(max(ys) * 1.05 / 5) if max(ys) > 0 else 0.2
    y_max = y_step * max(1, math.ceil(max(ys) * 1.05 / y_step))
    x_min, x_max = -0.5, position - 0.5
    width, height, left, right, top, bottom = 760, 320, 64, 190, 20, 48
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x_min) / (x_max - x_min) * plot_w

    def sy(y: float) -> float:
        return top + plot_h - y / y_max * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" font-size="11" '
        f'font-family="sans-serif"><title>Cumulative privacy loss of silo {_e(section["silo"])}'
        "</title>",
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
        'stroke="#999"/>',
    ]
    for i in range(round(y_max / y_step) + 1):
        y = y_step * i
        out.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
            'stroke="#e2e2e2"/>'
            f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{_e(f"{y:.3g}")}</text>'
        )
    step = max(1, math.ceil(position / 12))
    for run in runs:
        for rnd in range(low[run], high[run] + 1):
            x = offset[run] + rnd
            if x % step == 0:
                out.append(
                    f'<text x="{sx(x):.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
                    f"{_e(rnd)}</text>"
                )
        if len(runs) > 1:
            x0 = sx(offset[run] + low[run] - 0.5)
            out.append(
                f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="{top}" y2="{top + plot_h}" '
                'stroke="#bbb" stroke-dasharray="2 3"/>'
                f'<text x="{x0 + 3:.1f}" y="{top + 12}" fill="#666">{_e(run[:24])}</text>'
            )
    out.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 10}" text-anchor="middle">round'
        f'{" (runs in ledger order)" if len(runs) > 1 else ""}</text>'
        f'<text x="14" y="{top + plot_h / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">cumulative &#949;</text>'
    )
    legend_y = top + 8
    if budget is not None:
        out.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(budget):.1f}" y2="{sy(budget):.1f}" '
            'stroke="#c00000" stroke-width="1.5" stroke-dasharray="8 5"/>'
        )
        out.append(_legend(left + plot_w + 12, legend_y, "#c00000", "8 5", f"budget {budget:.4g}"))
        legend_y += 18
    for relation, scope, dotted, points in series:
        colour = _COLOURS.get(relation, "#444")
        if scope.startswith("PLD"):
            colour = _PLD_COLOURS.get(relation, "#888")
        dash = ' stroke-dasharray="3 3"' if dotted else ""
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        out.append(
            f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>'
        )
        for x, y in points:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>')
        out.append(
            _legend(left + plot_w + 12, legend_y, colour, "3 3" if dotted else None,
                    f"{relation}-level, {scope}")
        )
        legend_y += 18
    out.append("</svg>")
    return "<h3>Cumulative &#949; by round</h3>" + "".join(out)


def _nice_step(rough: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is at least ``rough`` (> 0)."""
    power = 10.0 ** math.floor(math.log10(rough))
    for factor in (1.0, 2.0, 5.0, 10.0):
        if factor * power >= rough:
            return factor * power
    return 10.0 * power


def _legend(x: float, y: float, colour: str, dash: str | None, label: str) -> str:
    dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
    return (
        f'<line x1="{x:.1f}" x2="{x + 22:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="{colour}" '
        f'stroke-width="2"{dash_attr}/><text x="{x + 28:.1f}" y="{y + 4:.1f}">{_e(label)}</text>'
    )
