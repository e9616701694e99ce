"""End to end in a browser: ``fedsilo dashboard`` over a real federation (coordinator and agents as processes,
mutual TLS on loopback, record-level DP), read by headless Chromium. The page is loaded once, before any
silo joins, and must follow the run to its end without a reload; its ε and budgets must read exactly as
``fedsilo audit report`` prints them for the coordinator's state directory.

Set ``FEDSILO_DASHBOARD_SCREENSHOT=docs/dashboard.png`` to keep the final page as the README's picture.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsilo.silo_agent.demo import ADMIN_NAME

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]

#: Record-level DP-SGD costing ε 2.879 at δ = 1e-5 after three rounds: hospital-c's budget of 3 fits, but
#: above the dashboard's default warning line (80 %).
PRIVACY = {"record_level": True, "sample_rate": 0.25, "steps_per_round": 2, "max_grad_norm": 1.0,
           "noise_multiplier": 1.5, "delta": 1e-5}
BUDGETS = {"hospital-a": {"epsilon": 10.0, "delta": 1e-5}, "hospital-b": {"epsilon": 10.0, "delta": 1e-5},
           "hospital-c": {"epsilon": 3.0, "delta": 1e-5, "accountant": "pld"}}  # c's budget is enforced by PLD
ROUNDS = 3

#: What the page shows, read in one go inside the browser.
READ_PAGE = """
var live = document.getElementById("live");
function last(td) { return td.classList.length ? td.classList[td.classList.length - 1] : ""; }
return {
  marker: window.fedsiloMarker || null,
  updates: parseInt(live.getAttribute("data-updates"), 10),
  state: document.getElementById("run-state").getAttribute("data-state"),
  rounds: Array.from(document.querySelectorAll("tr.round")).map(function (r) {
    return [parseInt(r.getAttribute("data-round"), 10), r.getAttribute("data-phase")]; }),
  silos: Array.from(document.querySelectorAll("tr.silo")).map(function (r) {
    return [r.getAttribute("data-silo"), r.querySelector("td.participation").textContent]; }),
  spend: Array.from(document.querySelectorAll("tr.spend")).map(function (r) {
    var c = {silo: r.getAttribute("data-silo"), relation: r.getAttribute("data-relation")};
    r.querySelectorAll("td").forEach(function (td) { c[last(td)] = td.textContent; });
    return c; }),
  alerts: Array.from(document.querySelectorAll("li.alert")).map(function (li) {
    return [li.getAttribute("data-kind"), li.getAttribute("data-subject")]; }),
  charts: Array.from(document.querySelectorAll("svg.chart")).map(function (s) {
    return [s.getAttribute("data-metric"), s.querySelectorAll("polyline").length]; })
};
"""
AUDIT_LINE = re.compile(r"^(?P<silo>[\w-]+): record-level ε (?P<epsilon>\S+) by (?P<accountant>RDP|PLD) \(RDP (?P<rdp>\S+), PLD (?P<pld>\S+)\), budget left (?P<left>\S+)"
                        r"(?: \(OVER BUDGET\))?; budget ε (?P<budget>\S+) at δ (?P<delta>\S+)$")


def start_dashboard(fed) -> tuple[subprocess.Popen, str]:
    c = fed.work / "certs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsilo", "dashboard", "--coordinator", f"localhost:{fed.port}", "--ca",
         str(c / "ca.pem"), "--cert", str(c / f"{ADMIN_NAME}.pem"), "--key", str(c / f"{ADMIN_NAME}.key"),
         "--listen", "127.0.0.1:0", "--refresh", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = proc.stdout.readline()
    if not line.startswith("fedsilo dashboard: http://"):
        proc.kill()
        pytest.fail(f"the dashboard did not start: {line}{proc.communicate(timeout=10)}")
    return proc, line.split()[2]


def audit_lines(fed) -> dict[str, dict[str, str]]:
    made = subprocess.run([sys.executable, "-m", "fedsilo", "audit", "report", "--state", str(fed.work / "coordinator"),
                           "--out", str(fed.work / "audit")], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    found = {m["silo"]: m.groupdict() for m in map(AUDIT_LINE.match, made.stdout.splitlines()) if m}
    assert sorted(found) == fed.names, made.stdout
    return found


def test_dashboard_follows_a_dp_run_live_and_matches_the_audit_report(federation_factory, chromium) -> None:
    fed = federation_factory(silos=3, rounds=ROUNDS, deadline_s=60.0, privacy=PRIVACY, budgets=BUDGETS)
    fed.start("coordinator")
    fed.admin.status()  # retries until the coordinator answers
    dashboard, url = start_dashboard(fed)
    try:
        chromium.get(url)
        page = chromium.execute_script(READ_PAGE)
        assert (page["state"], page["rounds"], [s for s, _ in page["silos"]]) == ("waiting", [], fed.names)
        chromium.execute_script("window.fedsiloMarker = 'loaded once';")
        for name in fed.names:
            fed.start(name)

        seen_states: list[str] = []
        seen_rounds: set[tuple[int, str]] = set()
        end = time.monotonic() + 240
        while True:  # watch the page follow the run, the test never reloading it
            page = chromium.execute_script(READ_PAGE)
            seen_states.append(page["state"])
            seen_rounds |= {tuple(r) for r in page["rounds"]}
            if page["state"] == "finished" and len(page["rounds"]) == ROUNDS:
                break
            for name, proc in fed.procs.items():
                assert name == "coordinator" or proc.poll() in (None, 0), fed.log(name)
            assert page["state"] != "failed" and time.monotonic() < end, (page, fed.log("coordinator"))
            time.sleep(0.2)
        assert page["marker"] == "loaded once" and page["updates"] > 0  # the same page, updated in place
        # nothing refused by the page's Content-Security-Policy, no script error
        console = chromium.get_log("browser")
        assert not [e for e in console if e["level"] == "SEVERE"], console
        assert "running" in seen_states  # it showed the run going on, not only its end
        assert {rnd for rnd, phase in seen_rounds if phase != "closed"}  # and rounds before they closed
        assert page["rounds"] == [[3, "closed"], [2, "closed"], [1, "closed"]]
        assert page["silos"] == [[n, f"{ROUNDS} of {ROUNDS}"] for n in fed.names]

        # ε and budgets: each figure as `fedsilo audit report` prints it for the coordinator's state dir
        audit = audit_lines(fed)

        def privacy_rows() -> dict[str, dict[str, str]] | None:
            rows = {r["silo"]: r for r in chromium.execute_script(READ_PAGE)["spend"] if r["relation"] == "record"}
            done = all(rows.get(n, {}).get("entries") == str(ROUNDS) for n in fed.names)
            return rows if done else None

        end = time.monotonic() + 20
        while (rows := privacy_rows()) is None:
            assert time.monotonic() < end, chromium.execute_script(READ_PAGE)["spend"]
            time.sleep(0.2)
        for name in fed.names:
            want, got = audit[name], rows[name]
            assert (got["epsilon"], got["budget-left"], got["budget"], got["budget-delta"]) == (
                want["epsilon"], want["left"], want["budget"], want["delta"]), (name, got, want)
            assert (got["accountant"], got["epsilon-rdp"], got["epsilon-pld"]) == (
                want["accountant"], want["rdp"], want["pld"]), (name, got, want)
            assert got["last-round"] == str(ROUNDS)
        assert rows["hospital-c"]["budget"] == "3" and rows["hospital-a"]["budget"] == "10"
        assert (rows["hospital-a"]["accountant"], rows["hospital-c"]["accountant"]) == ("RDP", "PLD")
        assert rows["hospital-c"]["epsilon"] == rows["hospital-c"]["epsilon-pld"] != rows["hospital-c"]["epsilon-rdp"]
        page = chromium.execute_script(READ_PAGE)
        assert ["near-budget", "hospital-c"] in page["alerts"]
        assert not [a for a in page["alerts"] if a[1] in ("hospital-a", "hospital-b")]
        charts = dict(page["charts"])
        assert charts.get("dice") == len(fed.names), charts
        keep = os.environ.get("FEDSILO_DASHBOARD_SCREENSHOT")
        shot = Path(keep) if keep else fed.work / "dashboard.png"
        height = chromium.execute_script("return document.documentElement.scrollHeight;")
        chromium.set_window_size(1280, min(int(height) + 160, 2400))
        assert chromium.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        if keep:
            assert shot.stat().st_size < 300_000, f"{shot} is {shot.stat().st_size} bytes; keep it under 300 KB"
    finally:
        dashboard.send_signal(signal.SIGTERM)
        try:
            dashboard.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            dashboard.kill()
            dashboard.communicate()
