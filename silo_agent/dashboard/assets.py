"""The dashboard page's stylesheet and script, served by the dashboard itself (no build step, no CDN)."""

from __future__ import annotations

__all__ = ["SCRIPT", "STYLESHEET"]

#: Replaces the live part of the page with a fresh /fragment every ``data-refresh-ms`` (no reload).
SCRIPT = """\
(function () {
  "use strict";
  var live = document.getElementById("live");
  var conn = document.getElementById("conn");
  if (!live || !window.fetch) { return; }
  var period = parseInt(live.getAttribute("data-refresh-ms"), 10) || 2000;
  function show(text, cls) { if (conn) { conn.textContent = text; conn.className = "conn " + cls; } }
  function tick() {
    fetch("fragment", {cache: "no-store", credentials: "same-origin"}).then(function (resp) {
      if (!resp.ok) { throw new Error("HTTP " + resp.status); }
      return resp.text();
    }).then(function (text) {
      live.innerHTML = text;
      live.setAttribute("data-updates", String((parseInt(live.getAttribute("data-updates"), 10) || 0) + 1));
      show("live", "ok");
    }).catch(function (err) {
      show("the dashboard server does not answer (" + err.message + "); retrying", "lost");
    }).then(function () { window.setTimeout(tick, period); });
  }
  window.setTimeout(tick, period);
})();
"""

STYLESHEET = """\
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #222; background: #fff; }
header { background: #1f3b57; color: #fff; padding: 10px 20px; display: flex; align-items: baseline; gap: 18px; }
header h1 { font-size: 18px; margin: 0; }
main { padding: 12px 20px 30px; }
section { margin: 18px 0; }
h2 { font-size: 16px; margin: 0 0 6px; border-bottom: 1px solid #ddd; padding-bottom: 3px; }
table { border-collapse: collapse; }
th, td { text-align: left; padding: 3px 10px 3px 0; vertical-align: top; border-bottom: 1px solid #f0f0f0; }
th { font-weight: 600; color: #444; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #777; }
.conn { font-size: 12px; }
.conn.ok { color: #b7e4c7; }
.conn.lost { color: #ffb3b3; font-weight: 600; }
.badge { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 12px; font-weight: 600; color: #fff; }
.badge.waiting, .badge.open { background: #6baed6; }
.badge.running, .badge.quorum { background: #3182bd; }
.badge.finished, .badge.closed { background: #31a354; }
.badge.failed, .badge.unknown { background: #de2d26; }
ul.alerts { list-style: none; padding: 0; margin: 0; }
li.alert { padding: 5px 10px; margin: 3px 0; border-left: 4px solid; }
li.alert.warning { border-color: #fd8d3c; background: #fff4e6; }
li.alert.critical { border-color: #de2d26; background: #fde8e8; font-weight: 600; }
.charts { display: flex; flex-wrap: wrap; gap: 14px; }
.legend .key { margin-right: 12px; white-space: nowrap; }
svg text { font-size: 11px; }
svg .chart-title { font-size: 12px; font-weight: 600; }
.small { font-size: 12px; }
"""
