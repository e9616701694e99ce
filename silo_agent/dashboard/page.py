"""The dashboard's HTML: the page, and its live fragment (run state, warnings, silos, privacy, rounds, metrics).

Every value that reaches the HTML goes through :func:`~fedsilo.silo_agent.dashboard.plots.esc`. ε, budgets
and δ are printed as ``fedsilo audit report`` prints them (:func:`fmt_epsilon`, :func:`fmt_delta`).
"""

from __future__ import annotations

import time

from fedsilo.silo_agent.dashboard.data import RoundView, Snapshot
from fedsilo.silo_agent.dashboard.plots import budget_bar, esc, legend, metric_chart, timeline_chart

__all__ = ["fmt_bytes", "fmt_delta", "fmt_epsilon", "render_fragment", "render_page", "render_waiting"]


def fmt_epsilon(value: float) -> str:
    """An ε (spent, budget, or budget left) as the audit report's summary prints it."""
    return f"{value:.4g}"


def fmt_delta(value: float) -> str:
    """A δ as the audit report's summary prints it."""
    return f"{value:.3g}"


def fmt_bytes(n: int) -> str:
    """A byte count in B, KiB, MiB or GiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _clock(ms: int) -> str:
    """Epoch milliseconds as this machine's local time of day."""
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) if ms > 0 else "—"


def _ago(now_ms: int, ms: int) -> str:
    if ms <= 0:
        return "never"
    seconds = max(0.0, (now_ms - ms) / 1000)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _document(title: str, body: str, refresh_ms: int) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(title)}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<noscript><meta http-equiv="refresh" content="{max(1, refresh_ms // 1000)}"></noscript>'
        '<link rel="stylesheet" href="static/dashboard.css">'
        '<script src="static/dashboard.js" defer></script>'
        f"</head><body>{body}</body></html>\n"
    )


def render_page(snap: Snapshot, *, coordinator: str, refresh_s: float, near_budget_fraction: float) -> str:
    """The whole page: a header, and the live part that the script refreshes from ``/fragment``."""
    body = (f'<header><h1>fedsilo · run {esc(snap.run_id)}</h1>'
            f'<span class="small">coordinator {esc(coordinator)}</span>'
            '<span id="conn" class="conn ok">live</span></header>'
            f'<main id="live" data-refresh-ms="{int(refresh_s * 1000)}" data-updates="0">'
            f"{render_fragment(snap, near_budget_fraction=near_budget_fraction)}</main>")
    return _document(f"fedsilo dashboard · {snap.run_id}", body, int(refresh_s * 1000))


def render_waiting(*, coordinator: str, refresh_s: float, error: str) -> str:
    """The page before the first successful poll: what is wrong, refreshed like the real page."""
    body = (f'<header><h1>fedsilo dashboard</h1><span class="small">coordinator {esc(coordinator)}</span>'
            '<span id="conn" class="conn ok">live</span></header>'
            f'<main id="live" data-refresh-ms="{int(refresh_s * 1000)}" data-updates="0">'
            f"{render_no_data(error)}</main>")
    return _document("fedsilo dashboard", body, int(refresh_s * 1000))


def render_no_data(error: str) -> str:
    """The live part while no poll has succeeded."""
    return ('<ul class="alerts"><li class="alert critical" data-kind="unreachable">no data from the coordinator yet'
            f"{': ' + esc(error) if error else ''}</li></ul>")


def render_fragment(snap: Snapshot, *, near_budget_fraction: float) -> str:
    """The live part of the page, as of ``snap``."""
    return "".join((_run(snap), _alerts(snap), _silos(snap), _privacy(snap, near_budget_fraction), _rounds(snap),
                    _metrics(snap)))


def _run(snap: Snapshot) -> str:
    state = snap.state.value if snap.state is not None else "unknown"
    open_round = f"round {snap.open_round} open" if snap.open_round else "no round open"
    return (f'<section id="run"><h2>Run</h2><p><span id="run-state" class="badge {esc(state)}" data-state="{esc(state)}">'
            f'{esc(state)}</span> <span id="progress">{snap.last_closed_round} of {snap.total_rounds} rounds closed'
            f"</span> · {esc(open_round)} · {len([s for s in snap.silos if s.joined])} of {len(snap.silos)} silos joined"
            f'</p><p id="run-message" class="muted">{esc(snap.message)}</p>'
            f'<p class="muted small" id="fetched" data-fetched-ms="{snap.fetched_at_ms}">as of {_clock(snap.fetched_at_ms)}'
            f"{' (latest poll failed)' if snap.error else ''}</p></section>")


def _alerts(snap: Snapshot) -> str:
    if not snap.alerts:
        return '<section id="warnings"><h2>Warnings</h2><p class="muted">None.</p></section>'
    items = "".join(f'<li class="alert {esc(a.severity.value)}" data-kind="{esc(a.kind.value)}" '
                    f'data-subject="{esc(a.subject)}">{esc(a.text)}</li>' for a in snap.alerts)
    return f'<section id="warnings"><h2>Warnings</h2><ul class="alerts">{items}</ul></section>'


def _silos(snap: Snapshot) -> str:
    closed = sum(1 for r in snap.rounds if r.closed_at_ms)
    rows = []
    for s in snap.silos:
        state = ("retired from round " + str(s.retired_from_round) + ": " + s.retired_reason if s.retired_from_round
                 else "joined" if s.joined else "not joined")
        rows.append(f'<tr class="silo" data-silo="{esc(s.name)}"><td class="name">{esc(s.name)}</td>'
                    f'<td class="state">{esc(state)}</td>'
                    f'<td class="last-contact" data-ms="{s.last_seen_ms}">{esc(_ago(snap.fetched_at_ms, s.last_seen_ms))}'
                    f'</td><td class="num participation">{s.rounds_contributed} of {closed}</td>'
                    f'<td class="num">{s.num_train_examples}</td></tr>')
    return ('<section id="silos"><h2>Silos</h2><table><thead><tr><th>silo</th><th>state</th><th>last contact</th>'
            '<th class="num">rounds in aggregate</th><th class="num">training examples</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table></section>")


def _privacy(snap: Snapshot, near: float) -> str:
    if not snap.privacy_enabled:
        return ('<section id="privacy"><h2>Privacy</h2><p class="muted">This run has no differential privacy: '
                "there are no ledgers and no budgets.</p></section>")
    rows = []
    for p in snap.privacy:
        budget = "no signed budget" if p.budget_epsilon is None else fmt_epsilon(p.budget_epsilon)
        budget_delta = "" if p.budget_delta is None else fmt_delta(p.budget_delta)
        if not p.spends:
            rows.append(f'<tr class="spend" data-silo="{esc(p.silo)}" data-relation=""><td>{esc(p.silo)}</td>'
                        f'<td colspan="5" class="muted">no releases</td><td class="num budget">{esc(budget)}</td>'
                        f'<td class="num budget-delta">{esc(budget_delta)}</td><td colspan="4"></td></tr>')
        for s in p.spends:
            left = "" if p.budget_epsilon is None else fmt_epsilon(p.budget_epsilon - s.epsilon)
            rows.append(
                f'<tr class="spend" data-silo="{esc(p.silo)}" data-relation="{esc(s.relation.value)}">'
                f"<td>{esc(p.silo)}</td><td>{esc(s.relation.value)}-level</td>"
                f'<td class="num epsilon">{esc(fmt_epsilon(s.epsilon))}</td>'
                f'<td class="accountant">{esc(s.accountant.value.upper())}</td>'
                f'<td class="num epsilon-rdp">{esc(fmt_epsilon(s.epsilon_rdp))}</td>'
                f'<td class="num epsilon-pld">{esc(_optional(s.epsilon_pld))}</td><td class="num budget">{esc(budget)}</td>'
                f'<td class="num budget-delta">{esc(budget_delta)}</td><td class="num budget-left">{esc(left)}</td>'
                f"<td>{budget_bar(s.epsilon, p.budget_epsilon, near=near)}</td>"
                f'<td class="num entries">{s.entries}</td><td class="num last-round">{s.last_round or "—"}</td></tr>')
    if not rows:
        rows.append('<tr><td colspan="12" class="muted">No silo has sent a budget or a ledger entry yet.</td></tr>')
    return ('<section id="privacy"><h2>Privacy</h2><p class="muted small">ε against anyone who sees a silo\'s uploads '
            "(single upload), cumulative over its verified ledger as mirrored by the coordinator, by the accountant "
            "the silo enforces its budget on (RDP and PLD both shown: two valid bounds on the same loss); the budget is "
            f"the silo's signed statement. Run δ {esc(fmt_delta(snap.plan_delta))}.</p>"
            '<table><thead><tr><th>silo</th><th>relation</th><th class="num">ε spent</th><th>by</th>'
            '<th class="num">RDP ε</th><th class="num">PLD ε</th><th class="num">budget ε</th>'
            '<th class="num">at δ</th><th class="num">budget left</th><th>used</th><th class="num">entries this run</th>'
            '<th class="num">last round</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table></section>")


def _round_row(r: RoundView, now_ms: int) -> str:
    if r.closed_at_ms:
        duration = f"{r.seconds:.1f} s"
    elif r.opened_at_ms:
        duration = f"{max(0, now_ms - r.opened_at_ms) / 1000:.0f} s so far"
    else:
        duration = "—"
    uploads = ", ".join(f"{u.silo} (+{max(0, u.accepted_at_ms - r.opened_at_ms) / 1000:.1f} s, {fmt_bytes(u.payload_bytes)})"
                        for u in r.uploads) or "none yet"
    return (f'<tr class="round" data-round="{r.round}" data-phase="{esc(r.phase.value)}"><td class="num">{r.round}</td>'
            f'<td><span class="badge {esc(r.phase.value)}">{esc(r.phase.value)}</span></td>'
            f"<td>{esc(_clock(r.opened_at_ms))}</td><td class=\"num\">{esc(duration)}</td>"
            f'<td class="num quorum">{len(r.uploads)} / {r.quorum}</td><td class="uploads">{esc(uploads)}</td>'
            f'<td class="num">{esc(fmt_bytes(r.bytes_up))}</td><td class="num">{esc(fmt_bytes(r.bytes_down))}</td>'
            f'<td class="failure">{esc(r.failure)}</td></tr>')


def _rounds(snap: Snapshot) -> str:
    names = [s.name for s in snap.silos]
    rows = "".join(_round_row(r, snap.fetched_at_ms) for r in reversed(snap.rounds))
    if not rows:
        rows = '<tr><td colspan="9" class="muted">No round has opened yet.</td></tr>'
    return ('<section id="rounds"><h2>Rounds</h2>'
            + timeline_chart(snap.rounds, names, now_ms=snap.fetched_at_ms) + legend(names)
            + '<table><thead><tr><th class="num">round</th><th>state</th><th>opened</th><th class="num">duration</th>'
            '<th class="num">uploads / quorum</th><th>who uploaded (after opening, payload)</th><th class="num">bytes up'
            '</th><th class="num">bytes down</th><th>failure</th></tr></thead><tbody>' + rows + "</tbody></table></section>")


def _metrics(snap: Snapshot) -> str:
    names = [s.name for s in snap.silos]
    if not snap.metric_names:
        return '<section id="metrics"><h2>Metrics</h2><p class="muted">No silo has reported metrics yet.</p></section>'
    charts = "".join(metric_chart(m, snap.rounds, names, total_rounds=snap.total_rounds) for m in snap.metric_names)
    return (f'<section id="metrics"><h2>Metrics</h2>{legend(names)}<div class="charts">{charts}</div>'
            '<p class="muted small">Each silo evaluates the aggregate of a round on its own data and reports it; '
            "the point of round r is that report.</p></section>")


def _optional(value: float | None) -> str:
    """An ε as the audit report prints it, or a dash where none is stated."""
    return "—" if value is None else fmt_epsilon(value)
