"""The dashboard's HTML and SVG without a browser: hostile text from silos (names, reasons, metric names,
failure reports) stays text, odd numbers do not break the charts, and ε, budgets and δ are printed
the way ``fedsilo audit report`` prints them."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from fedsilo.silo_agent.dashboard.data import DashboardSettings, Snapshot, build_snapshot
from fedsilo.silo_agent.dashboard.page import fmt_bytes, fmt_delta, fmt_epsilon, render_fragment, render_page
from tests.silo_agent.dashboard_kit import NOW_MS, privacy_data, round_data, silo_data, status_data

HOSTILE = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(2)>',
    "' onmouseover='alert(3)",
    "</td></tr></table><iframe src=//evil>",
    "&lt;already-escaped&gt; & <b>bold</b>",
]
#: Every element the page's live part may contain.
ALLOWED_TAGS = {"section", "h2", "p", "span", "ul", "li", "table", "thead", "tbody", "tr", "th", "td", "div", "svg",
                "rect", "line", "text", "polyline", "circle", "title"}


class Parsed(HTMLParser):
    """Tags, attributes and text of an HTML fragment, as a browser's tokenizer sees them."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str]] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += [(k, v or "") for k, v in attrs]

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def hostile_snapshot() -> Snapshot:
    silos = [silo_data(name) for name in HOSTILE[:2]]
    silos.append(silo_data("hospital-c", retired_from_round=2, retired_reason=HOSTILE[2]))
    metrics = {HOSTILE[0]: {HOSTILE[1]: 0.5, "dice": 1e308}, HOSTILE[1]: {HOSTILE[1]: -1e308, "dice": float("inf")}}
    rounds = [round_data(1, closed=True, failure=HOSTILE[3], uploads=HOSTILE[:2], metrics=metrics),
              round_data(2, uploads=[HOSTILE[4]])]
    privacy = privacy_data({HOSTILE[0]: (9.5, 10.0), HOSTILE[4]: (1.0, None)})
    privacy["silos"][1]["budget_error"] = HOSTILE[3]
    status = status_data(state="failed", message=HOSTILE[4], run_id=HOSTILE[1], silos=silos)
    return build_snapshot(status, rounds, privacy, DashboardSettings(), fetched_at_ms=NOW_MS)


def test_hostile_text_from_silos_stays_text() -> None:
    snap = hostile_snapshot()
    assert {a.kind.value for a in snap.alerts} >= {"near-budget", "budget-unverified", "round-failed", "run-failed"}
    fragment = render_fragment(snap, near_budget_fraction=0.8)
    parsed = Parsed(fragment)
    assert set(parsed.tags) <= ALLOWED_TAGS, set(parsed.tags) - ALLOWED_TAGS
    assert not [k for k, _ in parsed.attrs if k.startswith("on") or k in ("src", "href", "style")]
    text = "".join(parsed.text)
    for hostile in HOSTILE:
        assert hostile in text, hostile  # shown as typed, after the browser decodes the escapes
    assert "<script" not in fragment.lower() and "<img" not in fragment.lower() and "<iframe" not in fragment.lower()
    # attribute values are quoted and escaped: a silo name in data-silo cannot end the attribute
    assert ("data-silo", HOSTILE[1]) in parsed.attrs and ("data-silo", HOSTILE[0]) in parsed.attrs
    # the infinite and huge values left every coordinate finite
    coords = [v for k, v in parsed.attrs if k in ("x", "y", "x1", "x2", "y1", "y2", "cx", "cy", "width", "height")]
    assert coords and all(re.fullmatch(r"-?\d+(\.\d+)?", v) for v in coords), coords
    for points in (v for k, v in parsed.attrs if k == "points"):
        assert re.fullmatch(r"(-?\d+\.\d,-?\d+\.\d ?)+", points), points
    assert "round 1: dice = 1e+308" in text  # drawn at the chart's edge, reported as it is


def test_whole_page_loads_its_script_and_stylesheet_from_itself_only() -> None:
    page = render_page(hostile_snapshot(), coordinator="<evil>:1", refresh_s=2.5, near_budget_fraction=0.8)
    parsed = Parsed(page)
    urls = [v for k, v in parsed.attrs if k in ("src", "href")]
    assert urls == ["static/dashboard.css", "static/dashboard.js"]
    assert ("data-refresh-ms", "2500") in parsed.attrs
    assert "<evil>:1" in "".join(parsed.text) and "<evil>" not in page
    assert parsed.tags.count("script") == 1 and ("http-equiv", "refresh") in parsed.attrs  # inside <noscript>


def test_numbers_are_formatted_as_the_audit_report_prints_them() -> None:
    assert (fmt_epsilon(2.879123), fmt_epsilon(10.0), fmt_epsilon(0.120912), fmt_delta(1e-5)) == (
        "2.879", "10", "0.1209", "1e-05")
    assert (fmt_bytes(512), fmt_bytes(4096), fmt_bytes(3 * 2**20)) == ("512 B", "4.0 KiB", "3.0 MiB")
    snap = build_snapshot(status_data(), [], privacy_data({"hospital-a": (2.879123, 3.0)}), DashboardSettings(),
                          fetched_at_ms=NOW_MS)
    fragment = render_fragment(snap, near_budget_fraction=0.8)
    row = re.search(r'<tr class="spend" data-silo="hospital-a" data-relation="record">(.*?)</tr>', fragment)
    assert row is not None
    cells = dict(re.findall(r'<td class="num ([a-z-]+)">([^<]*)</td>', row.group(1)))
    assert (cells["epsilon"], cells["budget"], cells["budget-delta"], cells["budget-left"]) == (
        "2.879", "3", "1e-05", "0.1209")


def test_a_run_without_dp_says_so() -> None:
    snap = build_snapshot(status_data(), [], privacy_data({}, enabled=False), DashboardSettings(),
                          fetched_at_ms=NOW_MS)
    assert "no differential privacy" in render_fragment(snap, near_budget_fraction=0.8)
