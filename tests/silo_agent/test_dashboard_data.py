"""The dashboard's data layer without a coordinator: snapshots from Admin API data, round phases, the
warnings (near or over a budget, a budget that no longer verifies, a failed round or run, a silo gone
quiet), and the settings' validation."""

from __future__ import annotations

import math

import pytest

from fedsilo.coordinator.records import RunState
from fedsilo.privacy.accounting import Neighbouring
from fedsilo.silo_agent.dashboard.data import AlertKind, DashboardSettings, RoundPhase, Severity, build_snapshot
from tests.silo_agent.dashboard_kit import NOW_MS, privacy_data, round_data, silo_data, status_data

SETTINGS = DashboardSettings(near_budget_fraction=0.8, quiet_after_s=60.0)


def kinds(snap) -> list[tuple[AlertKind, str]]:
    return [(a.kind, a.subject) for a in snap.alerts]


def test_snapshot_carries_status_rounds_and_privacy_as_given() -> None:
    snap = build_snapshot(status_data(), [round_data(1, closed=True), round_data(2, uploads=("hospital-b",))],
                          privacy_data({"hospital-a": (2.5, 10.0)}), SETTINGS, fetched_at_ms=NOW_MS + 5)
    assert (snap.run_id, snap.state, snap.total_rounds, snap.fetched_at_ms) == (
        "study-1", RunState.RUNNING, 5, NOW_MS + 5)
    assert [s.name for s in snap.silos] == ["hospital-a", "hospital-b"]
    assert [(r.round, r.phase) for r in snap.rounds] == [(1, RoundPhase.CLOSED), (2, RoundPhase.OPEN)]
    assert [u.silo for u in snap.rounds[1].uploads] == ["hospital-b"]
    assert snap.rounds[0].metrics == {"hospital-a": {"dice": 0.5}, "hospital-b": {"dice": 0.6}}
    assert snap.metric_names == ("dice",)
    (p,) = snap.privacy
    assert (p.silo, p.budget_epsilon, p.budget_delta) == ("hospital-a", 10.0, 1e-5)
    assert [(s.relation, s.epsilon, s.entries, s.last_round) for s in p.spends] == [(Neighbouring.RECORD, 2.5, 1, 1)]
    assert snap.alerts == ()


@pytest.mark.parametrize(("closed", "quorum_reached", "failure", "state", "phase"), [
    (False, False, "", "running", RoundPhase.OPEN),
    (False, True, "", "running", RoundPhase.QUORUM),
    (True, True, "", "running", RoundPhase.CLOSED),
    (True, True, "hospital-a reported the aggregate undecryptable", "running", RoundPhase.FAILED),
    (False, False, "", "failed", RoundPhase.FAILED),
])
def test_round_phase(closed: bool, quorum_reached: bool, failure: str, state: str, phase: RoundPhase) -> None:
    r = round_data(1, closed=closed, failure=failure)
    r["quorum_reached"] = quorum_reached
    snap = build_snapshot(status_data(state=state), [r], privacy_data({}), SETTINGS, fetched_at_ms=NOW_MS)
    assert snap.rounds[0].phase is phase


@pytest.mark.parametrize(("epsilon", "budget", "expected"), [
    (7.99, 10.0, None),
    (8.0, 10.0, (Severity.WARNING, AlertKind.NEAR_BUDGET)),
    (10.0, 10.0, (Severity.WARNING, AlertKind.NEAR_BUDGET)),
    (10.01, 10.0, (Severity.CRITICAL, AlertKind.OVER_BUDGET)),
    (50.0, None, None),
])
def test_budget_warnings(epsilon: float, budget: float | None, expected: tuple | None) -> None:
    snap = build_snapshot(status_data(), [], privacy_data({"hospital-b": (epsilon, budget)}), SETTINGS,
                          fetched_at_ms=NOW_MS)
    got = [(a.severity, a.kind) for a in snap.alerts]
    assert got == ([] if expected is None else [expected])
    if expected is not None:
        assert snap.alerts[0].subject == "hospital-b"
        assert f"{epsilon:.4g}" in snap.alerts[0].text and f"{budget:.4g}" in snap.alerts[0].text


def test_a_budget_that_no_longer_verifies_is_critical() -> None:
    data = privacy_data({"hospital-a": (1.0, None)})
    data["silos"][0]["budget_error"] = "the kept budget statement of 'hospital-a' does not verify: signature"
    snap = build_snapshot(status_data(), [], data, SETTINGS, fetched_at_ms=NOW_MS)
    assert [(a.severity, a.kind, a.subject) for a in snap.alerts] == [
        (Severity.CRITICAL, AlertKind.BUDGET_UNVERIFIED, "hospital-a")]


def test_failed_round_and_failed_run_critical_first() -> None:
    status = status_data(state="failed", message="failed: round 2 got 0 upload(s), fewer than min_silos = 2")
    rounds = [round_data(1, closed=True, failure="hospital-a: undecryptable"), round_data(2)]
    snap = build_snapshot(status, rounds, privacy_data({}), SETTINGS, fetched_at_ms=NOW_MS)
    assert kinds(snap) == [(AlertKind.RUN_FAILED, ""), (AlertKind.ROUND_FAILED, "1"), (AlertKind.ROUND_FAILED, "2")]
    assert "fewer than min_silos" in snap.alerts[0].text
    assert "undecryptable" in snap.alerts[1].text and "while it was open" in snap.alerts[2].text


def test_a_training_silo_gone_quiet_while_the_run_goes_on() -> None:
    silos = [silo_data("hospital-a", last_seen_ms=NOW_MS - 61_000), silo_data("hospital-b", last_seen_ms=NOW_MS - 59_000),
             silo_data("hospital-c", last_seen_ms=NOW_MS - 600_000, retired_from_round=2),
             silo_data("hospital-d", joined=False, last_seen_ms=0)]
    snap = build_snapshot(status_data(silos=silos), [], privacy_data({}), SETTINGS, fetched_at_ms=NOW_MS)
    assert kinds(snap) == [(AlertKind.SILO_QUIET, "hospital-a")]
    assert "61 s" in snap.alerts[0].text
    finished = build_snapshot(status_data(state="finished", silos=silos), [], privacy_data({}), SETTINGS,
                              fetched_at_ms=NOW_MS)
    assert finished.alerts == ()


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"refresh_s": 0.1}, "refresh_s must be in [0.2, 3600] seconds, got 0.1"),
    ({"refresh_s": math.nan}, "refresh_s must be a finite number, got nan"),
    ({"near_budget_fraction": 0.0}, "near_budget_fraction must be in (0, 1], got 0.0"),
    ({"near_budget_fraction": 1.5}, "near_budget_fraction must be in (0, 1], got 1.5"),
    ({"near_budget_fraction": True}, "near_budget_fraction must be a finite number, got True"),
    ({"quiet_after_s": 0}, "quiet_after_s must be > 0 seconds, got 0"),
    ({"quiet_after_s": "60"}, "quiet_after_s must be a finite number, got '60'"),
])
def test_settings_refuse_bad_values_naming_them(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        DashboardSettings(**kwargs)
    assert fragment in str(err.value)
