"""The DP RPCs over REAL gRPC with mutual TLS: the plan in GetRun, budget statements at Join,
SubmitLedgerEntries and DeclineRound, each bad input with its exact status code and no change of
state (status, round history and the mirror are compared before and after)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from fedsilo.privacy.accounting import LEDGER_RDP_ORDERS, RdpAccountant
from fedsilo.privacy.budget import sign_budget
from fedsilo.privacy.ledger import Ledger
from fedsilo.privacy.plan import PrivacyPlan, ledger_fields
from fedsilo.v1 import federation_pb2
from tests.coordinator.test_coordinator_grpc_bad_input import (  # noqa: F401 - fixtures
    EXAMPLES,
    FINGERPRINT,
    RPC_TIMEOUT_S,
    SILOS,
    Certs,
    Fed,
    certs,
    expect,
    make_update,
    manifest_msg,
    start_fed,
    upload_msgs,
)

PLAN = PrivacyPlan(record_level=True, sample_rate=0.2, steps_per_round=5, max_grad_norm=1.0, noise_multiplier=1.2,
                   delta=1e-5)
RDP = RdpAccountant(orders=LEDGER_RDP_ORDERS)
RUN_ID = "grpc-bad-input"


def statement(certs: Certs, silo: str) -> bytes:
    p = certs.silo[silo]
    return sign_budget(silo=silo, epsilon=10.0, delta=1e-5, certificate_pem=p.cert.read_bytes(),
                       private_key_pem=p.key.read_bytes()).to_json().encode()


def join(fed: Fed, silo: str, budget: bytes | None) -> federation_pb2.JoinResponse:
    req = federation_pb2.JoinRequest(model_fingerprint=FINGERPRINT, num_train_examples=EXAMPLES[silo],
                                     shared_tensors=manifest_msg(make_update(0)).tensors, agent_version="t",
                                     budget_statement=budget or b"")
    return fed.stub(silo).Join(req, timeout=RPC_TIMEOUT_S)


def entries(certs: Certs, tmp: Path, silo: str, rounds: list[int]) -> list[str]:
    p = certs.silo[silo]
    with Ledger.open(tmp / f"{silo}.sqlite", silo=silo, certificate_pem=p.cert.read_bytes(),
                     private_key_pem=p.key.read_bytes()) as led:
        for rnd in rounds:
            led.append(**ledger_fields(led.entries(), PLAN.round_releases()[0], delta=1e-5, run_id=RUN_ID,
                                       round=rnd, accountant=RDP))
        return [e.to_json() for e in led.entries()]


def state(fed: Fed) -> tuple:
    """Status and round history, without liveness timestamps (any successful call updates those)."""
    status, rounds = fed.snapshot()
    for silo in status.silos:
        silo.last_seen_unix_ms = 0
    return status, rounds


def send(fed: Fed, silo: str, texts: list[str]) -> int:
    req = federation_pb2.SubmitLedgerEntriesRequest(entries_json=texts)
    return fed.stub(silo).SubmitLedgerEntries(req, timeout=RPC_TIMEOUT_S).mirrored_through_seq


@pytest.fixture
def dp_fed(start_fed: Callable[..., Fed], certs: Certs) -> Fed:
    fed = start_fed(privacy=PLAN)
    for silo in SILOS:
        join(fed, silo, statement(certs, silo))
    return fed


def test_getrun_carries_the_plan(start_fed: Callable[..., Fed]) -> None:
    fed = start_fed(privacy=PLAN)
    run = fed.stub("hospital-a").GetRun(federation_pb2.GetRunRequest(), timeout=RPC_TIMEOUT_S)
    p = run.privacy
    assert (p.record_level, p.sample_rate, p.steps_per_round, p.max_grad_norm, p.noise_multiplier, p.silo_level,
            p.noise_shares, p.delta) == (True, 0.2, 5, 1.0, 1.2, False, 1, 1e-5)
    plain = start_fed()
    assert not plain.stub("hospital-a").GetRun(federation_pb2.GetRunRequest(), timeout=RPC_TIMEOUT_S).privacy.record_level


def test_join_refuses_missing_or_foreign_budget_statements(start_fed: Callable[..., Fed], certs: Certs) -> None:
    fed = start_fed(privacy=PLAN)
    before = state(fed)
    expect(grpc.StatusCode.INVALID_ARGUMENT, "budget_statement", lambda: join(fed, "hospital-a", None))
    expect(grpc.StatusCode.INVALID_ARGUMENT, "caller is 'hospital-a'",
           lambda: join(fed, "hospital-a", statement(certs, "hospital-b")))
    expect(grpc.StatusCode.INVALID_ARGUMENT, "refused", lambda: join(fed, "hospital-a", b"\xff" * 40))
    assert state(fed) == before
    plain = start_fed()
    expect(grpc.StatusCode.INVALID_ARGUMENT, "no differential privacy",
           lambda: join(plain, "hospital-a", statement(certs, "hospital-a")))


def test_ledger_entries_bad_input(dp_fed: Fed, certs: Certs, tmp_path: Path) -> None:
    fed = dp_fed
    a = entries(certs, tmp_path, "hospital-a", [1, 2])
    assert send(fed, "hospital-a", a[:1]) == 1
    before = state(fed)
    bad = [
        (["not json"], "not valid JSON"),
        ([a[1].replace('"round":2', '"round":5')], "seq 2"),
        ([a[1][:-1] + " }"], "canonical"),
        (entries(certs, tmp_path, "hospital-b", [1])[:1], "sent by silo 'hospital-a'"),
        (["x" * (32 * 1024 + 1)], "characters"),
        (["{}"] * 65, "at most 64"),
    ]
    for texts, fragment in bad:
        expect(grpc.StatusCode.INVALID_ARGUMENT, fragment, lambda t=texts: send(fed, "hospital-a", t))
        assert send(fed, "hospital-a", []) == 1
    assert state(fed) == before
    expect(grpc.StatusCode.PERMISSION_DENIED, "admin", lambda: send(fed, "admin", a))
    assert send(fed, "hospital-a", a) == 2  # the resend of seq 1 is skipped, seq 2 appended


def test_uploads_without_accounting_are_refused_and_state_is_unchanged(dp_fed: Fed, certs: Certs,
                                                                       tmp_path: Path) -> None:
    fed = dp_fed
    fed.task("hospital-a", 0)
    before = state(fed)
    expect(grpc.StatusCode.FAILED_PRECONDITION, "privacy-ledger entry",
           lambda: fed.submit("hospital-a", upload_msgs(1, 120.0, make_update(1))))
    assert state(fed) == before
    send(fed, "hospital-a", entries(certs, tmp_path, "hospital-a", [1]))
    assert fed.submit("hospital-a", upload_msgs(1, 120.0, make_update(1))).uploads_in_round == 1


def test_decline_round_bad_input_then_retire(dp_fed: Fed) -> None:
    fed = dp_fed

    def decline(silo: str, rnd: int, reason: str, final: bool = True) -> federation_pb2.DeclineRoundResponse:
        return fed.stub(silo).DeclineRound(federation_pb2.DeclineRoundRequest(round=rnd, reason=reason, final=final),
                                           timeout=RPC_TIMEOUT_S)

    before = state(fed)
    expect(grpc.StatusCode.INVALID_ARGUMENT, "round 0", lambda: decline("hospital-a", 0, "budget"))
    expect(grpc.StatusCode.INVALID_ARGUMENT, "round 9", lambda: decline("hospital-a", 9, "budget"))
    expect(grpc.StatusCode.INVALID_ARGUMENT, "reason", lambda: decline("hospital-a", 1, ""))
    expect(grpc.StatusCode.INVALID_ARGUMENT, "reason", lambda: decline("hospital-a", 1, "x" * 1025))
    expect(grpc.StatusCode.PERMISSION_DENIED, "admin", lambda: decline("admin", 1, "budget"))
    assert state(fed) == before
    resp = decline("hospital-a", 1, "not this round", final=False)
    assert (resp.state, resp.silos_training) == (federation_pb2.RUN_STATE_RUNNING, 2)
    resp = decline("hospital-b", 1, "privacy budget spent")
    assert (resp.state, resp.silos_training) == (federation_pb2.RUN_STATE_FAILED, 1)  # min_silos = 2
    status, _ = fed.snapshot()
    assert "fewer than min_silos" in status.message
    b = {s.name: s for s in status.silos}["hospital-b"]
    assert (b.retired_from_round, b.retired_reason) == (1, "privacy budget spent")
    expect(grpc.StatusCode.FAILED_PRECONDITION, "failed", lambda: decline("hospital-a", 1, "budget"))
