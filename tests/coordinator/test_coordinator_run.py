"""The plain ``Coordinator`` state machine with a fake clock: no gRPC, no sleeping.

Joins, start grace, early close, deadline and quorum, run failure, the last round, restarts on
the same state dir, and a silo that comes back after missing a round. State is observed only
through public methods: ``status()``, ``round_summaries()``, ``get_task()`` and ``aggregate()``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from fedsilo.coordinator.config import AggregationMode, ConfigError, FederationConfig
from fedsilo.core.errors import AlreadyExists, FailedPrecondition, PermissionDenied
from fedsilo.coordinator.run import Coordinator
from fedsilo.coordinator.records import RunState, SubmitResult, TaskKind, UploadChunk, UploadHeader, UploadPart, UploadTrailer
from fedsilo.core.tensors import Manifest, arrays_from_payload, payload_chunks
from fedsilo.privacy.pki import Identity, Role

SILOS = ("hospital-a", "hospital-b", "hospital-c")
#: Training examples each silo declares at join; an upload's weight must be its silo's (the coordinator
#: fixes it), so every weighted mean here is weighted by these sizes.
EXAMPLES = {"hospital-a": 25, "hospital-b": 75, "hospital-c": 40, **{f"site-{i:02d}": i + 1 for i in range(12)}}
SHAPES = {"layer.weight": (3, 4), "layer.bias": (5,)}
MANIFEST = Manifest.of_arrays({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
FINGERPRINT = "ab" * 32
T0 = 1_700_000_000.0
DEADLINE_S = 60.0
QUORUM_TIMEOUT_S = 120.0
GRACE_S = 30.0


class FakeClock:
    """Seconds since the epoch, moved only by the test."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def silo(name: str) -> Identity:
    return Identity(role=Role.SILO, name=name)


def make_update(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def upload_parts(rnd: int, weight: float, arrays: dict[str, np.ndarray], chunk_bytes: int = 20) -> list[UploadPart]:
    chunks = list(payload_chunks(arrays, chunk_bytes))
    return [
        UploadHeader(round=rnd, weight=weight, manifest=Manifest.of_arrays(arrays)),
        *(UploadChunk(data=c) for c in chunks),
        UploadTrailer(num_chunks=len(chunks), sha256=hashlib.sha256(b"".join(chunks)).digest()),
    ]


def weighted_mean(updates: list[tuple[float, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    total = sum(w for w, _ in updates)
    return {k: sum(w * u[k].astype(np.float64) for w, u in updates) / total for k in SHAPES}


def fetch(coord: Coordinator, caller: Identity, rnd: int) -> dict[str, np.ndarray]:
    info = coord.aggregate(caller, rnd)
    return arrays_from_payload(info.manifest, info.path.read_bytes())


def assert_mean(coord: Coordinator, rnd: int, updates: list[tuple[float, dict[str, np.ndarray]]],
                caller: str = SILOS[0]) -> None:
    got = fetch(coord, silo(caller), rnd)
    want = weighted_mean(updates)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == np.float32 and got[k].shape == want[k].shape
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)


def make_config(state_dir: Path, **overrides: object) -> FederationConfig:
    kwargs: dict[str, object] = dict(
        aggregation=AggregationMode.PLAIN,
        run_id="run-test", silos=SILOS, rounds=2, min_silos=2, round_deadline_s=DEADLINE_S,
        quorum_timeout_s=QUORUM_TIMEOUT_S, start_grace_s=GRACE_S, insecure=True, state_dir=state_dir,
    )
    kwargs.update(overrides)
    return FederationConfig(**kwargs)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def new_coordinator(state_dir: Path, clock: FakeClock) -> Iterator[Callable[..., Coordinator]]:
    """Builds coordinators on the test's state dir; closes them all at teardown."""
    made: list[Coordinator] = []

    def build(**overrides: object) -> Coordinator:
        coord = Coordinator(make_config(state_dir, **overrides), clock=clock)
        made.append(coord)
        return coord

    yield build
    for coord in made:
        coord.close()  # closing twice is harmless


def join(coord: Coordinator, name: str, examples: int | None = None) -> RunState:
    """Joins ``name`` declaring ``examples`` training examples (default: its size in EXAMPLES)."""
    n = EXAMPLES.get(name, 1) if examples is None else examples
    _, state, _ = coord.join(silo(name), model_fingerprint=FINGERPRINT, num_train_examples=n,
                             manifest=MANIFEST, agent_version="test")
    return state


def weight(name: str) -> float:
    """The only weight ``name``'s uploads may carry: the size it declared at join."""
    return float(EXAMPLES[name])


def update_of(name: str, seed: int) -> tuple[float, dict[str, np.ndarray]]:
    """A valid upload of ``name``: its declared weight and a random update."""
    return weight(name), make_update(seed)


def submit(coord: Coordinator, name: str, rnd: int, weight: float, arrays: dict[str, np.ndarray]) -> SubmitResult:
    return coord.submit(silo(name), upload_parts(rnd, weight, arrays))


def contributors(coord: Coordinator, rnd: int) -> set[str]:
    return set(coord.round_summaries()[rnd - 1].contributors)


# -- starting the run -------------------------------------------------------------------


def test_run_starts_as_soon_as_every_enrolled_silo_joined(new_coordinator) -> None:
    coord = new_coordinator()
    assert coord.status().state is RunState.WAITING
    assert join(coord, "hospital-a") is RunState.WAITING
    assert join(coord, "hospital-b") is RunState.WAITING
    coord.tick()  # quorum reached but the grace period has not passed
    assert coord.status().state is RunState.WAITING and coord.status().open_round == 0
    assert join(coord, "hospital-c") is RunState.RUNNING
    status = coord.status()
    assert (status.state, status.open_round, status.last_closed_round) == (RunState.RUNNING, 1, 0)
    assert [s.joined for s in status.silos] == [True, True, True]
    task = coord.get_task(silo("hospital-c"), after_round=0, wait_s=0)
    assert (task.kind, task.round, task.base_round) == (TaskKind.TRAIN, 1, 0)
    assert task.deadline_ms == int((T0 + DEADLINE_S) * 1000)


def test_run_starts_after_grace_once_min_silos_joined(new_coordinator, clock: FakeClock) -> None:
    coord = new_coordinator()
    join(coord, "hospital-a")
    clock.advance(GRACE_S * 10)
    coord.tick()
    assert coord.status().state is RunState.WAITING, "one silo is below min_silos: no grace applies"
    assert coord.get_task(silo("hospital-a"), after_round=0, wait_s=0).kind is TaskKind.WAIT

    join(coord, "hospital-b")  # quorum reached now: the grace starts here
    clock.advance(GRACE_S - 1)
    coord.tick()
    assert coord.status().state is RunState.WAITING
    clock.advance(1)
    coord.tick()
    status = coord.status()
    assert (status.state, status.open_round) == (RunState.RUNNING, 1)
    for name in ("hospital-a", "hospital-b"):
        task = coord.get_task(silo(name), after_round=0, wait_s=0)
        assert (task.kind, task.round, task.base_round) == (TaskKind.TRAIN, 1, 0)
    # The late silo may still join and train the open round.
    assert join(coord, "hospital-c") is RunState.RUNNING
    assert coord.get_task(silo("hospital-c"), after_round=0, wait_s=0).round == 1


def test_only_enrolled_silos_may_join(new_coordinator) -> None:
    coord = new_coordinator()
    with pytest.raises(PermissionDenied, match="not enrolled"):
        join(coord, "hospital-x")
    with pytest.raises(PermissionDenied, match="cannot act as a silo"):
        coord.join(Identity(role=Role.ADMIN, name="hospital-a"), model_fingerprint=FINGERPRINT,
                   num_train_examples=1, manifest=MANIFEST, agent_version="test")
    assert [s.joined for s in coord.status().silos] == [False, False, False]


# -- closing rounds -----------------------------------------------------------------------


def test_round_closes_early_when_every_enrolled_silo_uploaded(new_coordinator) -> None:
    coord = new_coordinator()
    for name in SILOS:
        join(coord, name)
    updates = {name: update_of(name, i) for i, name in enumerate(SILOS)}
    for i, name in enumerate(SILOS):
        result = submit(coord, name, 1, *updates[name])
        assert (result.round, result.uploads_in_round) == (1, i + 1)
        if i < len(SILOS) - 1:
            assert coord.status().open_round == 1, "must not close before every silo uploaded"
    # No tick, no clock movement: the last upload closed the round.
    status = coord.status()
    assert (status.open_round, status.last_closed_round) == (2, 1)
    summary = coord.round_summaries()[0]
    assert summary.closed and set(summary.contributors) == set(SILOS)
    assert summary.params_shared == MANIFEST.numel
    assert_mean(coord, 1, list(updates.values()))
    task = coord.get_task(silo("hospital-a"), after_round=1, wait_s=0)
    assert (task.kind, task.round, task.base_round, task.last_closed_round) == (TaskKind.TRAIN, 2, 1, 1)


def test_deadline_closes_round_with_quorum_and_leaves_out_the_missing_silo(
        new_coordinator, clock: FakeClock) -> None:
    coord = new_coordinator()
    for name in SILOS:
        join(coord, name)
    updates = [update_of("hospital-a", 1), update_of("hospital-b", 2)]
    submit(coord, "hospital-a", 1, *updates[0])
    submit(coord, "hospital-b", 1, *updates[1])
    clock.advance(DEADLINE_S - 0.001)
    coord.tick()
    assert coord.status().open_round == 1, "closed before the deadline"
    clock.advance(0.001)
    coord.tick()
    status = coord.status()
    assert (status.state, status.open_round, status.last_closed_round) == (RunState.RUNNING, 2, 1)
    assert contributors(coord, 1) == {"hospital-a", "hospital-b"}
    assert [s.rounds_contributed for s in status.silos] == [1, 1, 0]
    assert_mean(coord, 1, updates)
    # The silo that missed the deadline can no longer upload round 1.
    with pytest.raises(FailedPrecondition, match="round 1 is closed"):
        submit(coord, "hospital-c", 1, *update_of("hospital-c", 3))


def test_below_quorum_at_deadline_waits_and_a_late_upload_closes_the_round(
        new_coordinator, clock: FakeClock) -> None:
    coord = new_coordinator()
    for name in SILOS:
        join(coord, name)
    first = update_of("hospital-a", 1)
    submit(coord, "hospital-a", 1, *first)
    clock.advance(DEADLINE_S + QUORUM_TIMEOUT_S - 1)
    coord.tick()
    status = coord.status()
    assert (status.state, status.open_round, status.last_closed_round) == (RunState.RUNNING, 1, 0)
    # Still waiting for quorum: a late upload is accepted and the next tick closes the round.
    late = update_of("hospital-b", 2)
    assert submit(coord, "hospital-b", 1, *late).uploads_in_round == 2
    coord.tick()
    assert coord.status().last_closed_round == 1
    assert contributors(coord, 1) == {"hospital-a", "hospital-b"}
    assert_mean(coord, 1, [first, late])


def test_run_fails_after_quorum_timeout_with_a_message(new_coordinator, clock: FakeClock) -> None:
    coord = new_coordinator()
    for name in SILOS:
        join(coord, name)
    submit(coord, "hospital-a", 1, *update_of("hospital-a", 1))
    clock.advance(DEADLINE_S)
    coord.tick()
    assert coord.status().state is RunState.RUNNING
    clock.advance(QUORUM_TIMEOUT_S - 0.001)
    coord.tick()
    assert coord.status().state is RunState.RUNNING
    clock.advance(0.001)
    coord.tick()
    status = coord.status()
    assert status.state is RunState.FAILED and status.last_closed_round == 0
    assert "round 1" in status.message and "min_silos = 2" in status.message
    summary = coord.round_summaries()[0]
    assert not summary.closed and summary.contributors == ("hospital-a",)
    for name in SILOS:
        task = coord.get_task(silo(name), after_round=0, wait_s=0)
        assert task.kind is TaskKind.STOP and task.state is RunState.FAILED
        assert task.message == status.message
    with pytest.raises(FailedPrecondition, match="failed"):
        submit(coord, "hospital-b", 1, *update_of("hospital-b", 2))
    with pytest.raises(FailedPrecondition, match="not closed"):
        coord.aggregate(silo("hospital-a"), 1)


def test_last_round_finishes_the_run(new_coordinator) -> None:
    coord = new_coordinator(silos=SILOS[:2], rounds=2)
    for name in SILOS[:2]:
        join(coord, name)
    per_round = {}
    for rnd in (1, 2):
        # Weights are fixed per silo (its declared size); the updates differ per round.
        per_round[rnd] = [update_of(name, 10 * rnd + i) for i, name in enumerate(SILOS[:2])]
        for name, update in zip(SILOS[:2], per_round[rnd], strict=True):
            task = coord.get_task(silo(name), after_round=rnd - 1, wait_s=0)
            assert (task.kind, task.round, task.base_round) == (TaskKind.TRAIN, rnd, rnd - 1)
            submit(coord, name, rnd, *update)
    status = coord.status()
    assert (status.state, status.open_round, status.last_closed_round) == (RunState.FINISHED, 0, 2)
    assert "finished" in status.message
    task = coord.get_task(silo("hospital-a"), after_round=2, wait_s=0)
    assert (task.kind, task.state, task.last_closed_round) == (TaskKind.STOP, RunState.FINISHED, 2)
    assert [s.closed for s in coord.round_summaries()] == [True, True]
    for rnd in (1, 2):
        assert_mean(coord, rnd, per_round[rnd])
    with pytest.raises(FailedPrecondition, match="finished"):
        submit(coord, "hospital-a", 2, *update_of("hospital-a", 99))


# -- restarts -----------------------------------------------------------------------------


def test_restart_keeps_an_accepted_upload_exactly_once(new_coordinator, clock: FakeClock) -> None:
    first = new_coordinator(silos=SILOS[:2])
    for name in SILOS[:2]:
        join(first, name)
    update_a = update_of("hospital-a", 1)  # 25 examples
    update_b = update_of("hospital-b", 2)  # 75 examples
    assert submit(first, "hospital-a", 1, *update_a).uploads_in_round == 1
    first.close()

    clock.advance(5)
    second = new_coordinator(silos=SILOS[:2])
    status = second.status()
    assert (status.state, status.open_round, status.last_closed_round) == (RunState.RUNNING, 1, 0)
    assert contributors(second, 1) == {"hospital-a"}
    # Not applied twice: the same silo cannot upload again after the restart.
    with pytest.raises(AlreadyExists):
        submit(second, "hospital-a", 1, *update_a)
    task = second.get_task(silo("hospital-b"), after_round=0, wait_s=0)
    assert (task.kind, task.round) == (TaskKind.TRAIN, 1)
    # Not lost: the second silo's upload is the second one counted and closes the round.
    assert submit(second, "hospital-b", 1, *update_b).uploads_in_round == 2
    assert second.status().last_closed_round == 1
    assert contributors(second, 1) == {"hospital-a", "hospital-b"}
    assert_mean(second, 1, [update_a, update_b])
    info = second.aggregate(silo("hospital-a"), 1)
    assert (info.num_contributors, info.total_weight) == (2, 100.0)
    assert second.round_summaries()[0].total_weight == 100.0


def test_restart_with_a_changed_run_config_is_refused(new_coordinator, state_dir: Path,
                                                      clock: FakeClock) -> None:
    first = new_coordinator(rounds=2)
    join(first, "hospital-a")
    first.close()
    with pytest.raises(ConfigError, match=re.escape(str(state_dir))):
        Coordinator(make_config(state_dir, rounds=3), clock=clock)
    # Operational settings may change: a longer deadline is accepted on the same state dir.
    again = new_coordinator(rounds=2, round_deadline_s=DEADLINE_S * 2)
    assert again.status().silos[0].joined


def test_dropped_silo_gets_the_next_round_with_the_right_base(new_coordinator, clock: FakeClock) -> None:
    coord = new_coordinator(rounds=3)
    for name in SILOS:
        join(coord, name)
    submit(coord, "hospital-a", 1, *update_of("hospital-a", 1))
    submit(coord, "hospital-b", 1, *update_of("hospital-b", 2))
    clock.advance(DEADLINE_S)
    coord.tick()
    assert coord.status().open_round == 2
    # hospital-c never finished round 1 (it was away); it resumes with round 2 on top of round 1.
    task = coord.get_task(silo("hospital-c"), after_round=0, wait_s=0)
    assert (task.kind, task.round, task.base_round, task.last_closed_round) == (TaskKind.TRAIN, 2, 1, 1)
    assert task.deadline_ms == int((clock.now + DEADLINE_S) * 1000)
    update = update_of("hospital-c", 3)
    assert submit(coord, "hospital-c", 2, *update).uploads_in_round == 1
    assert coord.get_task(silo("hospital-c"), after_round=2, wait_s=0).kind is TaskKind.WAIT
    # Its round-1 aggregate exists and does not include it.
    info = coord.aggregate(silo("hospital-c"), 1)
    assert info.num_contributors == 2


@pytest.mark.parametrize("before_restart", [1, 7, 8, 9, 11])
def test_restart_across_sum_checkpoints_counts_every_upload_once(new_coordinator, clock: FakeClock,
                                                                 before_restart: int) -> None:
    """With more silos than SUM_CHECKPOINT_EVERY, a restart anywhere rebuilds the exact running sum."""
    names = tuple(f"site-{i:02d}" for i in range(12))
    first = new_coordinator(silos=names, min_silos=1)
    for name in names:
        join(first, name)
    updates = [update_of(name, 100 + i) for i, name in enumerate(names)]  # weights 1..12
    for name, (w, arrays) in zip(names[:before_restart], updates[:before_restart]):
        submit(first, name, 1, w, arrays)
    first.close()
    second = new_coordinator(silos=names, min_silos=1)
    assert len(contributors(second, 1)) == before_restart
    for name, (w, arrays) in zip(names[before_restart:], updates[before_restart:]):
        submit(second, name, 1, w, arrays)
    assert second.status().last_closed_round == 1
    assert_mean(second, 1, updates, caller=names[0])
    assert second.round_summaries()[0].total_weight == sum(w for w, _ in updates)


def test_a_trailing_newline_does_not_pass_for_a_fingerprint_or_a_metric_name(new_coordinator) -> None:
    """Names are matched whole: a regex ``$`` would let ``"...\\n"`` through."""
    from fedsilo.core.errors import InvalidArgument

    coord = new_coordinator(min_silos=3, rounds=1)
    with pytest.raises(InvalidArgument, match="model_fingerprint must be 64 lowercase hex"):
        coord.join(silo("hospital-a"), model_fingerprint=FINGERPRINT + "\n", num_train_examples=1,
                   manifest=MANIFEST, agent_version="test")
    assert coord.status().silos[0].joined is False
    for name in SILOS:
        join(coord, name)
    for name in SILOS:
        submit(coord, name, 1, *update_of(name, 1))
    with pytest.raises(InvalidArgument, match="is not 1..64 chars"):
        coord.report_metrics(silo("hospital-a"), 1, [("dice\n", 0.5, 3)])
    assert coord.round_summaries()[0].metrics == {}
    assert coord.report_metrics(silo("hospital-a"), 1, [("dice", 0.5, 3)]) == 1
