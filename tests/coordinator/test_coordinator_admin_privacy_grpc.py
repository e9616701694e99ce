"""The Admin API's privacy view and round timeline over REAL gRPC with mutual TLS: GetPrivacy (budgets
from the verified statements, ε from the ledger mirror), the timeline fields of ListRounds, and who may
call them."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from fedsilo.privacy.accounting import Neighbouring
from fedsilo.privacy.budget import BUDGETS_DIR, MIRROR_FILE
from fedsilo.privacy.ledger import LedgerEntry, LedgerMirror
from fedsilo.v1 import admin_pb2
from tests.coordinator.test_coordinator_grpc_bad_input import (  # noqa: F401 - fixtures
    RPC_TIMEOUT_S,
    SILOS,
    Certs,
    Fed,
    certs,
    expect,
    make_update,
    start_fed,
    upload_msgs,
)
from tests.coordinator.test_coordinator_privacy_grpc import PLAN, dp_fed, entries, send  # noqa: F401 - fixture

WEIGHT = {"hospital-a": 120.0, "hospital-b": 380.0}


def privacy(fed: Fed) -> admin_pb2.GetPrivacyResponse:
    return fed.admin_stub().GetPrivacy(admin_pb2.GetPrivacyRequest(), timeout=RPC_TIMEOUT_S)


def rounds(fed: Fed) -> list[admin_pb2.RoundSummary]:
    return list(fed.admin_stub().ListRounds(admin_pb2.ListRoundsRequest(), timeout=RPC_TIMEOUT_S).rounds)


def test_budgets_then_the_mirrors_cumulative_epsilon_per_relation(dp_fed: Fed, certs: Certs, tmp_path: Path) -> None:
    fed = dp_fed
    joined = privacy(fed)
    assert joined.enabled and joined.plan_delta == PLAN.delta
    assert [(s.silo, s.has_budget, s.budget_epsilon, s.budget_delta, len(s.relations), s.last_seq, s.budget_error)
            for s in joined.silos] == [(silo, True, 10.0, 1e-5, 0, 0, "") for silo in SILOS]

    texts = entries(certs, tmp_path, "hospital-a", [1, 2])
    assert send(fed, "hospital-a", texts) == 2
    a, b = privacy(fed).silos
    silo_ledger = [LedgerEntry.from_json(t) for t in texts]
    assert [(r.relation, r.entries, r.last_round, r.delta) for r in a.relations] == [
        (admin_pb2.NEIGHBOURING_RECORD, 2, 2, 1e-5)]
    # the figure the silo's own ledger computed, which grows with each release
    assert a.relations[0].epsilon == silo_ledger[-1].cumulative_epsilon > silo_ledger[0].cumulative_epsilon > 0
    # both accountants' figures travel, and whose governed (RDP, the silo's default)
    spend = a.relations[0]
    assert spend.accountant == admin_pb2.ACCOUNTANT_RDP and spend.epsilon_rdp == spend.epsilon
    assert spend.HasField("epsilon_pld") and spend.epsilon_pld == silo_ledger[-1].cumulative_epsilon_pld < spend.epsilon
    assert a.last_seq == 2
    assert (b.silo, len(b.relations), b.last_seq) == ("hospital-b", 0, 0)
    # and the one the mirror itself reports, read from the coordinator's state dir
    with LedgerMirror.open(tmp_path / "state0" / MIRROR_FILE) as mirror:
        assert mirror.cumulative("hospital-a", Neighbouring.RECORD) == a.relations[0].epsilon


def test_a_budget_statement_altered_on_disk_is_reported_not_trusted(dp_fed: Fed) -> None:
    path = Path(dp_fed.server.config.state_dir) / BUDGETS_DIR / "hospital-b.json"
    text = path.read_text()
    assert json.loads(text)["epsilon"] == "10.0"
    altered = text.replace('"10.0"', '"99.0"', 1)
    assert json.loads(altered)["epsilon"] == "99.0"
    path.write_text(altered)
    a, b = privacy(dp_fed).silos
    assert (a.has_budget, a.budget_epsilon, a.budget_error) == (True, 10.0, "")
    assert (b.has_budget, b.budget_epsilon) == (False, 0.0)
    assert "hospital-b" in b.budget_error and "does not verify" in b.budget_error


def test_silo_certificates_may_not_read_the_privacy_view(dp_fed: Fed, certs: Certs) -> None:
    for silo in SILOS:
        expect(grpc.StatusCode.PERMISSION_DENIED, "admin certificate",
               lambda s=silo: dp_fed.admin_stub(certs.silo[s]).GetPrivacy(admin_pb2.GetPrivacyRequest(),
                                                                          timeout=RPC_TIMEOUT_S))
    assert privacy(dp_fed).enabled


def test_a_run_without_dp_has_an_empty_privacy_view(start_fed: Callable[..., Fed]) -> None:
    fed = start_fed()
    fed.join("hospital-a")
    resp = privacy(fed)
    assert (resp.enabled, resp.plan_delta, list(resp.silos)) == (False, 0.0, [])


def test_round_timeline_opened_quorum_uploads_closed(dp_fed: Fed, certs: Certs, tmp_path: Path) -> None:
    fed = dp_fed
    for silo in SILOS:
        fed.task(silo, 0)
        send(fed, silo, entries(certs, tmp_path, silo, [1]))
    now_ms = int(time.time() * 1000)
    (r1,) = rounds(fed)
    assert (r1.round, r1.closed, r1.quorum, r1.quorum_reached, list(r1.uploads), r1.closed_at_unix_ms) == (
        1, False, 2, False, [], 0)
    assert now_ms - 60_000 < r1.opened_at_unix_ms <= now_ms < r1.deadline_unix_ms
    assert r1.deadline_unix_ms - r1.opened_at_unix_ms == 20_000  # the run's round_deadline_s

    fed.submit("hospital-a", upload_msgs(1, WEIGHT["hospital-a"], make_update(1)))
    (r1,) = rounds(fed)
    assert [u.silo for u in r1.uploads] == ["hospital-a"] and not r1.quorum_reached and not r1.closed
    assert r1.uploads[0].payload_bytes == 68
    assert r1.opened_at_unix_ms <= r1.uploads[0].accepted_at_unix_ms

    fed.submit("hospital-b", upload_msgs(1, WEIGHT["hospital-b"], make_update(2)))
    r1, *_ = rounds(fed)
    assert r1.closed and r1.quorum_reached and [u.silo for u in r1.uploads] == ["hospital-a", "hospital-b"]
    assert list(r1.contributors) == ["hospital-a", "hospital-b"]
    assert r1.uploads[0].accepted_at_unix_ms <= r1.uploads[1].accepted_at_unix_ms <= r1.closed_at_unix_ms
    assert r1.seconds == (r1.closed_at_unix_ms - r1.opened_at_unix_ms) / 1000
