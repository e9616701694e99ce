"""Upload weights are fixed by the coordinator (issue 14, "weight lies"), not by an upload's header.

An upload's weight must equal the training-set size its silo declared at Join (1 under silo-level
DP), else INVALID_ARGUMENT and nothing is stored; sizes are frozen once round 1 opens (a re-join
with another size is FAILED_PRECONDITION; before round 1 a re-join may correct it); the study may
bound sizes (``silos.train_examples``, ``silos.max_train_examples``: INVALID_ARGUMENT at join); the
weight normalizer is fixed when round 1 opens, the same for every round: the joined silos' sizes
plus a reservation for each enrolled silo not joined yet, and a late joiner may declare at most
its reservation.

The plain ``Coordinator`` with a fake clock (the harness of test_coordinator_run.py), a silo-level
DP coordinator (the harness of test_coordinator_privacy.py), and one test over real gRPC with
mutual TLS (the harness of test_coordinator_grpc_bad_input.py). State is observed only through
public methods (``status``, ``round_summaries``, ``get_task``, ``aggregate``) or the Admin RPCs.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.core.errors import FailedPrecondition, InvalidArgument
from fedsilo.coordinator.run import Coordinator
from fedsilo.coordinator.records import RunState, TaskKind
from fedsilo.privacy.plan import PrivacyPlan
from fedsilo.v1 import federation_pb2

# The in-process harness: fake clock, plain aggregation, insecure (no upload statements).
from test_coordinator_run import (  # noqa: F401  (clock, state_dir, new_coordinator are fixtures)
    DEADLINE_S,
    FINGERPRINT,
    GRACE_S,
    MANIFEST,
    FakeClock,
    assert_mean,
    clock,
    make_config,
    make_update,
    new_coordinator,
    silo,
    state_dir,
    upload_parts,
)

# The silo-level DP harness (real certificates, signed budgets and ledgers).
from test_coordinator_privacy import FP as DP_FP
from test_coordinator_privacy import MANIFEST as DP_MANIFEST
from test_coordinator_privacy import Clock, account, config, fed, ledger, statement, upload, who  # noqa: F401

# The real gRPC + mTLS harness (certs, start_fed are fixtures).
from test_coordinator_grpc_bad_input import (  # noqa: F401
    RPC_TIMEOUT_S,
    Fed,
    certs,
    expect,
    manifest_msg,
    start_fed,
    upload_msgs,
)
from test_coordinator_grpc_bad_input import FINGERPRINT as GRPC_FINGERPRINT
from test_coordinator_grpc_bad_input import make_update as grpc_update

SIZES = {"hospital-a": 120, "hospital-b": 380, "hospital-c": 48}
ALL = sum(SIZES.values())  # 548


def join(coord: Coordinator, name: str, n: int | None = None) -> RunState:
    """Joins ``name`` declaring ``n`` training examples (default: its size in SIZES)."""
    _, state, _ = coord.join(silo(name), model_fingerprint=FINGERPRINT, num_train_examples=SIZES[name] if n is None
                             else n, manifest=MANIFEST, agent_version="test")
    return state


def submit(coord: Coordinator, name: str, rnd: int, weight: float, seed: int) -> tuple[float, dict[str, np.ndarray]]:
    """Uploads ``make_update(seed)`` with ``weight``; returns the (weight, update) it sent."""
    arrays = make_update(seed)
    coord.submit(silo(name), upload_parts(rnd, weight, arrays))
    return weight, arrays


def honest(coord: Coordinator, name: str, rnd: int, seed: int) -> tuple[float, dict[str, np.ndarray]]:
    return submit(coord, name, rnd, float(SIZES[name]), seed)


def normalizer(coord: Coordinator, name: str, rnd: int) -> float:
    """The weight normalizer of round ``rnd`` as ``name``'s TRAIN task states it."""
    task = coord.get_task(silo(name), after_round=rnd - 1, wait_s=0)
    assert (task.kind, task.round) == (TaskKind.TRAIN, rnd), task
    return task.weight_normalizer


def snapshot(coord: Coordinator) -> tuple[object, object]:
    return coord.status(), coord.round_summaries()


def declared(coord: Coordinator) -> dict[str, int]:
    """Joined silos' declared sizes, as the run status shows them."""
    return {s.name: s.num_train_examples for s in coord.status().silos if s.joined}


def weight_refused(name: str, n: int) -> str:
    return re.escape(f"must be {n}: the coordinator fixes an upload's weight (the {n} training examples silo "
                     f"{name!r} declared at join)")


# -- the header's weight must be the declared size -----------------------------------------------


@pytest.mark.parametrize("bad", [119.0, 121.0, 120.5, 1.0, 380.0, float(ALL), 1e9])
def test_a_weight_other_than_the_declared_size_is_invalid_argument_and_stores_nothing(new_coordinator,
                                                                                      bad: float) -> None:
    coord = new_coordinator()
    for name in SIZES:
        join(coord, name)
    before = snapshot(coord)
    with pytest.raises(InvalidArgument, match=weight_refused("hospital-a", 120)):
        submit(coord, "hospital-a", 1, bad, 66)
    assert snapshot(coord) == before
    assert coord.round_summaries()[0].contributors == ()
    # Nothing of the refused upload is kept: the silo's honest upload is its first one.
    sent = [honest(coord, name, 1, i) for i, name in enumerate(SIZES)]
    assert coord.status().last_closed_round == 1
    assert_mean(coord, 1, sent)
    assert coord.round_summaries()[0].total_weight == ALL


def test_weight_1e9_from_a_silo_that_declared_48_is_refused_and_the_honest_mean_is_exact(
        new_coordinator, clock: FakeClock) -> None:
    coord = new_coordinator(rounds=2)
    for name in SIZES:
        join(coord, name)
    sent = [honest(coord, "hospital-a", 1, 1), honest(coord, "hospital-b", 1, 2)]
    before = snapshot(coord)
    with pytest.raises(InvalidArgument, match=weight_refused("hospital-c", 48)):
        submit(coord, "hospital-c", 1, 1e9, 66)
    assert snapshot(coord) == before
    clock.advance(DEADLINE_S)
    coord.tick()
    summary = coord.round_summaries()[0]
    assert summary.closed and set(summary.contributors) == {"hospital-a", "hospital-b"}
    assert summary.total_weight == 500.0
    assert_mean(coord, 1, sent)  # 120 and 380: the hostile silo scaled nothing
    info = coord.aggregate(silo("hospital-a"), 1)
    assert (info.total_weight, info.weight_normalizer) == (500.0, ALL)
    # The hostile silo can still take part honestly, with the weight it declared.
    assert honest(coord, "hospital-c", 2, 3)[0] == 48.0


# -- sizes are frozen once round 1 opens ---------------------------------------------------------


def test_a_rejoin_after_round_1_opened_cannot_change_the_size(new_coordinator) -> None:
    coord = new_coordinator(rounds=3)
    for name in SIZES:
        join(coord, name)
    assert normalizer(coord, "hospital-a", 1) == ALL
    before = snapshot(coord)
    for n in (10**9, 49, 47):
        with pytest.raises(FailedPrecondition, match=re.escape(
                f"silo 'hospital-c' declared 48 training examples when it joined; sizes are frozen once round 1 "
                f"opens, so a re-join cannot declare {n}")):
            join(coord, "hospital-c", n)
    assert snapshot(coord) == before
    assert declared(coord) == SIZES
    assert join(coord, "hospital-c") is RunState.RUNNING  # the same size: a plain re-join
    with pytest.raises(InvalidArgument, match=weight_refused("hospital-c", 48)):
        submit(coord, "hospital-c", 1, 1e9, 66)
    sent = [honest(coord, name, 1, i) for i, name in enumerate(SIZES)]
    assert_mean(coord, 1, sent)
    assert normalizer(coord, "hospital-a", 2) == ALL
    assert coord.aggregate(silo("hospital-a"), 1).weight_normalizer == ALL
    coord.close()

    # Frozen across a restart too: the normalizer and the sizes are in the state dir.
    again = new_coordinator(rounds=3)
    with pytest.raises(FailedPrecondition, match="sizes are frozen once round 1 opens"):
        join(again, "hospital-c", 10**9)
    assert declared(again) == SIZES
    assert normalizer(again, "hospital-b", 2) == ALL


def test_a_rejoin_before_round_1_may_correct_the_size(new_coordinator) -> None:
    coord = new_coordinator(min_silos=3)
    assert join(coord, "hospital-a", 1000) is RunState.WAITING
    assert declared(coord) == {"hospital-a": 1000}
    assert join(coord, "hospital-a", 120) is RunState.WAITING
    assert declared(coord) == {"hospital-a": 120}
    join(coord, "hospital-b")
    assert join(coord, "hospital-c") is RunState.RUNNING
    assert normalizer(coord, "hospital-a", 1) == ALL  # the corrected size, not the first one
    with pytest.raises(InvalidArgument, match=weight_refused("hospital-a", 120)):
        submit(coord, "hospital-a", 1, 1000.0, 66)
    sent = [honest(coord, name, 1, i) for i, name in enumerate(SIZES)]
    assert_mean(coord, 1, sent)


# -- the study's bounds ---------------------------------------------------------------------------


def test_the_study_bounds_refuse_a_size_at_join_naming_the_setting(new_coordinator) -> None:
    coord = new_coordinator(train_examples={"hospital-a": 120}, max_train_examples=400, min_silos=3)
    for n in (121, 119, 1, 400):
        with pytest.raises(InvalidArgument, match=re.escape(
                f"silo 'hospital-a' declared {n} training examples; the study expects 120 (silos.train_examples)")):
            join(coord, "hospital-a", n)
    for n in (401, 10**9, 0, -5):
        with pytest.raises(InvalidArgument, match=re.escape(
                f"num_train_examples {n} is not in [1, 400] (silos.max_train_examples)")):
            join(coord, "hospital-b", n)
    assert declared(coord) == {}
    join(coord, "hospital-a", 120)
    join(coord, "hospital-b", 400)
    assert join(coord, "hospital-c", 48) is RunState.RUNNING
    assert normalizer(coord, "hospital-b", 1) == 568.0


@pytest.mark.parametrize("n", [0, -1, 10**9 + 1])
def test_without_bounds_a_size_must_still_be_in_1_to_10_to_the_9(new_coordinator, n: int) -> None:
    coord = new_coordinator()
    with pytest.raises(InvalidArgument, match=re.escape(f"num_train_examples {n} is not in [1, 1000000000]")) as info:
        join(coord, "hospital-a", n)
    assert "silos." not in str(info.value)  # no study setting to blame
    assert declared(coord) == {}
    join(coord, "hospital-a", 10**9)
    assert declared(coord) == {"hospital-a": 10**9}


# -- the normalizer: fixed at round 1, with reservations ----------------------------------------------


@pytest.mark.parametrize("overrides, expected", [
    ({}, 120 + 380 + 380),  # the largest declared size
    ({"max_train_examples": 400}, 120 + 380 + 400),
    ({"train_examples": {"hospital-c": 48}}, 120 + 380 + 48),
    ({"train_examples": {"hospital-c": 48}, "max_train_examples": 400}, 120 + 380 + 48),
], ids=["largest-declared", "max-train-examples", "expected-size", "expected-size-and-max"])
def test_the_normalizer_is_the_same_every_round_and_reserves_a_size_for_a_silo_not_joined_yet(
        new_coordinator, clock: FakeClock, overrides: dict, expected: int) -> None:
    coord = new_coordinator(rounds=3, **overrides)
    join(coord, "hospital-a")
    join(coord, "hospital-b")
    clock.advance(GRACE_S)
    coord.tick()
    assert coord.status().open_round == 1
    assert normalizer(coord, "hospital-a", 1) == normalizer(coord, "hospital-b", 1) == expected
    sent1 = [honest(coord, "hospital-a", 1, 1), honest(coord, "hospital-b", 1, 2)]
    clock.advance(DEADLINE_S)
    coord.tick()
    assert coord.status().last_closed_round == 1
    assert_mean(coord, 1, sent1)

    assert join(coord, "hospital-c") is RunState.RUNNING  # 48: within every reservation above
    sent2 = [honest(coord, name, 2, 10 + i) for i, name in enumerate(SIZES)]
    assert coord.status().last_closed_round == 2
    assert_mean(coord, 2, sent2)
    for rnd in (1, 2):
        info = coord.aggregate(silo("hospital-c"), rnd)
        assert info.weight_normalizer == expected and info.total_weight <= expected
    for name in SIZES:  # the late joiner's size did not move it
        assert normalizer(coord, name, 3) == expected


@pytest.mark.parametrize("accepted", [380, 48], ids=["at-reservation", "below-reservation"])
def test_a_late_joiner_may_declare_at_most_its_reservation(new_coordinator, clock: FakeClock, accepted: int) -> None:
    coord = new_coordinator(rounds=2)
    join(coord, "hospital-a")
    join(coord, "hospital-b")
    clock.advance(GRACE_S)
    coord.tick()
    assert normalizer(coord, "hospital-a", 1) == 880.0  # 120 + 380 + 380 reserved for hospital-c
    before = snapshot(coord)
    for n in (381, 10**9):
        with pytest.raises(FailedPrecondition, match=re.escape(
                f"silo 'hospital-c' joins after the run started: the weight normalizer, fixed at round 1, reserved "
                f"380 training examples for it, and it declared {n}")):
            join(coord, "hospital-c", n)
    assert snapshot(coord) == before
    assert "hospital-c" not in declared(coord)

    assert join(coord, "hospital-c", accepted) is RunState.RUNNING
    assert normalizer(coord, "hospital-c", 1) == 880.0
    sent = [honest(coord, "hospital-a", 1, 1), honest(coord, "hospital-b", 1, 2),
            submit(coord, "hospital-c", 1, float(accepted), 3)]
    assert coord.status().last_closed_round == 1
    assert_mean(coord, 1, sent)
    assert coord.round_summaries()[0].total_weight == 500 + accepted <= 880
    # Frozen now like every other size.
    with pytest.raises(FailedPrecondition, match="sizes are frozen"):
        join(coord, "hospital-c", accepted - 1)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 10**9), min_size=3, max_size=3),
       early=st.integers(1, 3),
       bound=st.one_of(st.none(), st.integers(1, 10**9)),
       late=st.lists(st.integers(1, 10**9), min_size=2, max_size=2))
def test_the_weights_of_joined_silos_never_sum_above_the_normalizer(sizes: list[int], early: int,
                                                                  bound: int | None, late: list[int]) -> None:
    """For any declared sizes and any order of joining, the declared sizes of all joined silos (so
    of any subset of uploads) sum to at most the normalizer; a late join is accepted exactly when
    it fits its reservation."""
    names = tuple(SIZES)
    if bound is not None:
        sizes = [min(n, bound) for n in sizes]
        late = [min(n, bound) for n in late]
    clock = FakeClock()
    with tempfile.TemporaryDirectory() as tmp:
        coord = Coordinator(make_config(Path(tmp), min_silos=early, max_train_examples=bound), clock=clock)
        try:
            for name, n in zip(names[:early], sizes[:early]):
                join(coord, name, n)
            clock.advance(GRACE_S)
            coord.tick()
            n_norm = normalizer(coord, names[0], 1)
            reservation = bound if bound is not None else max(sizes[:early])
            assert n_norm == sum(sizes[:early]) + reservation * (3 - early)
            for name, n in zip(names[early:], late):
                try:
                    join(coord, name, n)
                    assert n <= reservation
                except FailedPrecondition:
                    assert n > reservation
            joined = declared(coord)
            assert sum(joined.values()) <= n_norm
            assert normalizer(coord, names[0], 1) == n_norm
        finally:
            coord.close()


# -- silo-level DP: every weight is 1 -------------------------------------------------------------

def test_silo_level_dp_requires_weight_1_whatever_the_silo_declared(fed, tmp_path: Path) -> None:
    plan = PrivacyPlan(silo_level=True, update_clip_norm=1.0, update_noise_multiplier=1.0, delta=1e-5)
    coord = Coordinator(config(fed, tmp_path / "c", privacy=plan, rounds=2), clock=Clock())

    def dp_join(name: str, n: int) -> RunState:
        return coord.join(who(name), model_fingerprint=DP_FP, num_train_examples=n, manifest=DP_MANIFEST,
                          agent_version="t", budget_statement=statement(fed, name))[1]

    def accounted(name: str, rnd: int) -> None:
        coord.submit_ledger_entries(who(name), account(ledgers[name], rnd, plan))

    ledgers = {name: ledger(fed, tmp_path, name) for name in SIZES}
    dp_join("hospital-a", 120)
    assert dp_join("hospital-b", 380) is RunState.RUNNING  # min_silos = 2, no grace
    # Every enrolled silo counts once, hospital-c (not joined yet) too.
    assert coord.get_task(who("hospital-a"), after_round=0, wait_s=0).weight_normalizer == 3.0
    accounted("hospital-a", 1)
    before = snapshot(coord)
    for bad in (120.0, 0.5, 2.0, 1e9):
        with pytest.raises(InvalidArgument, match=re.escape(
                f"weight {bad} must be 1: the coordinator fixes an upload's weight (silo-level DP weights every "
                "silo equally)")):
            upload(coord, "hospital-a", 1, weight=bad)
    assert snapshot(coord) == before
    upload(coord, "hospital-a", 1, weight=1.0)
    # Under silo-level DP a late joiner's size moves no weight: any size in bounds is accepted.
    assert dp_join("hospital-c", 10**6) is RunState.RUNNING
    accounted("hospital-c", 1)
    with pytest.raises(InvalidArgument, match="must be 1"):
        upload(coord, "hospital-c", 1, weight=1e6)
    upload(coord, "hospital-c", 1, weight=1.0)
    accounted("hospital-b", 1)
    upload(coord, "hospital-b", 1, weight=1.0)
    info = coord.aggregate(who("hospital-a"), 1)
    assert (info.num_contributors, info.total_weight, info.weight_normalizer) == (3, 3.0, 3.0)
    assert coord.get_task(who("hospital-b"), after_round=1, wait_s=0).weight_normalizer == 3.0
    coord.close()


# -- over real gRPC with mutual TLS ---------------------------------------------------------------

GRPC_SIZES = {"hospital-a": 120, "hospital-b": 380, "hospital-x": 48}  # hospital-x: the hostile silo


def test_over_grpc_a_weight_lie_is_invalid_argument_and_a_size_lie_on_rejoin_failed_precondition(
        start_fed) -> None:
    fed: Fed = start_fed(silos=tuple(GRPC_SIZES), min_silos=3, rounds=2)

    def join_as(name: str, n: int) -> federation_pb2.JoinResponse:
        req = federation_pb2.JoinRequest(model_fingerprint=GRPC_FINGERPRINT, num_train_examples=n,
                                         shared_tensors=manifest_msg(grpc_update(0)).tensors, agent_version="test/1")
        return fed.stub(name).Join(req, timeout=RPC_TIMEOUT_S)

    for name, n in GRPC_SIZES.items():
        join_as(name, n)
    task = fed.task("hospital-x", 0)
    assert (task.kind, task.round, task.weight_normalizer) == (federation_pb2.TASK_KIND_TRAIN, 1, 548.0)

    before = fed.snapshot()
    expect(grpc.StatusCode.INVALID_ARGUMENT, "weight 1000000000.0 must be 48: the coordinator fixes an upload's weight "
           "(the 48 training examples silo 'hospital-x' declared at join)",
           lambda: fed.submit("hospital-x", upload_msgs(1, 1e9, grpc_update(66))))
    assert fed.snapshot() == before
    # Every silo uploads with its declared size: the mean is exact, weighted 120 : 380 : 48.
    fed.finish_round(1, {name: (float(n), grpc_update(i)) for i, (name, n) in enumerate(GRPC_SIZES.items())})

    before = fed.snapshot()
    expect(grpc.StatusCode.FAILED_PRECONDITION, "sizes are frozen once round 1 opens, so a re-join cannot "
           "declare 1000000000", lambda: join_as("hospital-x", 10**9))
    assert fed.snapshot() == before
    assert [(s.name, s.num_train_examples) for s in before[0].silos] == list(GRPC_SIZES.items())
    for name in GRPC_SIZES:
        task = fed.task(name, 1)
        assert (task.kind, task.round, task.weight_normalizer) == (federation_pb2.TASK_KIND_TRAIN, 2, 548.0)
    expect(grpc.StatusCode.INVALID_ARGUMENT, "must be 48",
           lambda: fed.submit("hospital-x", upload_msgs(2, 1e9, grpc_update(67))))
    fed.finish_round(2, {name: (float(n), grpc_update(10 + i)) for i, (name, n) in enumerate(GRPC_SIZES.items())})
