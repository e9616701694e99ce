"""Failed rounds (``coordinator.failures``): silos report an unusable aggregate; a majority of the silos
training marks the round failed; nobody is handed it again; the run continues or stops as configured."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from fedsilo.coordinator.config import AggregationMode, ConfigError, FailedRoundPolicy, FederationConfig
from fedsilo.coordinator.failures import needed_reports
from fedsilo.coordinator.loading import load_federation_config
from fedsilo.coordinator.records import RunState, TaskKind, UploadChunk, UploadHeader, UploadTrailer
from fedsilo.coordinator.run import Coordinator
from fedsilo.core.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from fedsilo.core.tensors import Manifest, payload_chunks
from fedsilo.privacy.pki import Identity, Role

SILOS = ("hospital-a", "hospital-b", "hospital-c")
EXAMPLES = {"hospital-a": 10, "hospital-b": 20, "hospital-c": 30}
ARRAYS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
MANIFEST = Manifest.of_arrays(ARRAYS)


def silo(name: str) -> Identity:
    return Identity(role=Role.SILO, name=name)


def make(tmp_path: Path, **overrides: object) -> Coordinator:
    kwargs: dict[str, object] = dict(run_id="fail-test", silos=SILOS, rounds=3, min_silos=2, insecure=True,
                                     aggregation=AggregationMode.PLAIN, state_dir=tmp_path / "state",
                                     start_grace_s=600.0)  # round 1 opens once all three joined
    kwargs.update(overrides)
    coord = Coordinator(FederationConfig(**kwargs))  # type: ignore[arg-type]
    for name in SILOS:
        coord.join(silo(name), model_fingerprint="ab" * 32, num_train_examples=EXAMPLES[name], manifest=MANIFEST,
                   agent_version="t")
    return coord


def close_round(coord: Coordinator, rnd: int) -> None:
    chunks = list(payload_chunks(ARRAYS, 8))
    for name in SILOS:
        coord.submit(silo(name), [UploadHeader(round=rnd, weight=float(EXAMPLES[name]), manifest=MANIFEST),
                                  *(UploadChunk(data=c) for c in chunks),
                                  UploadTrailer(num_chunks=len(chunks),
                                                sha256=hashlib.sha256(b"".join(chunks)).digest())])


@pytest.fixture
def coord(tmp_path: Path):
    c = make(tmp_path)
    yield c
    c.close()


@pytest.mark.parametrize(("training", "needed"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (10, 6)])
def test_a_strict_majority_of_the_silos_training_is_needed(training: int, needed: int) -> None:
    assert needed_reports(training) == needed


def test_one_report_does_not_fail_a_round_a_majority_does_and_nobody_gets_it_again(coord: Coordinator) -> None:
    close_round(coord, 1)
    first = coord.report_aggregate_failure(silo("hospital-c"), 1, "does not decrypt: no noise budget")
    assert (first.round_failed, first.reports, first.needed) == (False, 1, 2)
    assert coord.aggregate(silo("hospital-a"), 1).failed == ""  # one silo (maybe the hostile one) cannot fail it
    again = coord.report_aggregate_failure(silo("hospital-c"), 1, "said twice")
    assert (again.round_failed, again.reports) == (False, 1)
    second = coord.report_aggregate_failure(silo("hospital-a"), 1, "does not decrypt")
    assert (second.round_failed, second.reports) == (True, 2)
    info = coord.aggregate(silo("hospital-b"), 1)
    assert info.failed.startswith("round 1 failed") and "hospital-a, hospital-c" in info.failed
    assert "uploads from hospital-a, hospital-b, hospital-c" in info.failed and "does not decrypt" in info.failed
    [r1] = coord.round_summaries()[:1]
    assert r1.closed and r1.failure == info.failed
    status = coord.status()
    assert status.state is RunState.RUNNING and status.open_round == 2 and "round 1 failed" in status.message
    # the run continues (run.on_failed_round = continue): round 2 trains from the last good aggregate
    task = coord.get_task(silo("hospital-b"), after_round=1, wait_s=0)
    assert (task.kind, task.round) == (TaskKind.TRAIN, 2)
    close_round(coord, 2)
    assert coord.aggregate(silo("hospital-a"), 2).failed == ""
    assert coord.report_aggregate_failure(silo("hospital-b"), 1, "late").round_failed  # still failed, reported 3 times


def test_stop_policy_ends_the_run_naming_the_round(tmp_path: Path) -> None:
    coord = make(tmp_path, on_failed_round=FailedRoundPolicy.STOP)
    try:
        close_round(coord, 1)
        coord.report_aggregate_failure(silo("hospital-a"), 1, "does not decrypt")
        coord.report_aggregate_failure(silo("hospital-b"), 1, "does not decrypt")
        status = coord.status()
        assert status.state is RunState.FAILED and "round 1 failed" in status.message
        assert "on_failed_round = stop" in status.message
        task = coord.get_task(silo("hospital-c"), after_round=1, wait_s=0)
        assert task.kind is TaskKind.STOP
    finally:
        coord.close()


@pytest.mark.parametrize(("rnd", "reason", "error", "fragment"), [
    (0, "x", InvalidArgument, "not in [1, 3]"),
    (4, "x", InvalidArgument, "not in [1, 3]"),
    (1, "", InvalidArgument, "1..1024 characters"),
    (1, "x" * 1025, InvalidArgument, "1..1024 characters"),
    (1, "x", FailedPrecondition, "round 1 is not closed"),
])
def test_bad_reports_are_refused_and_change_nothing(coord: Coordinator, rnd: int, reason: str,
                                                    error: type[Exception], fragment: str) -> None:
    def snapshot() -> tuple[object, ...]:
        status = coord.status()
        return status.state, status.message, status.open_round, coord.round_summaries()

    before = snapshot()
    with pytest.raises(error, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        coord.report_aggregate_failure(silo("hospital-a"), rnd, reason)
    assert snapshot() == before


def test_only_a_joined_enrolled_silo_may_report(coord: Coordinator) -> None:
    close_round(coord, 1)
    with pytest.raises(PermissionDenied):
        coord.report_aggregate_failure(Identity(role=Role.ADMIN, name="study-lead"), 1, "x")
    with pytest.raises(PermissionDenied):
        coord.report_aggregate_failure(silo("hospital-x"), 1, "x")
    assert coord.aggregate(silo("hospital-a"), 1).failed == ""


def test_a_failed_round_stays_failed_across_a_restart(tmp_path: Path) -> None:
    coord = make(tmp_path)
    close_round(coord, 1)
    for name in ("hospital-a", "hospital-b"):
        coord.report_aggregate_failure(silo(name), 1, "does not decrypt")
    coord.close()
    again = Coordinator(FederationConfig(run_id="fail-test", silos=SILOS, rounds=3, min_silos=2, insecure=True,
                                         aggregation=AggregationMode.PLAIN, state_dir=tmp_path / "state",
                                         start_grace_s=600.0))
    try:
        assert again.aggregate(silo("hospital-c"), 1).failed.startswith("round 1 failed")
        assert again.round_summaries()[0].failure.startswith("round 1 failed")
    finally:
        again.close()


def test_on_failed_round_is_read_from_the_config_file(tmp_path: Path) -> None:
    base = ('[run]\nid = "r"\nrounds = 2\nmin_silos = 1\naggregation = "plain"\n{extra}\n'
            '[silos]\nenrolled = ["a"]\n[server]\ninsecure = true\n')
    path = tmp_path / "federation.toml"
    path.write_text(base.format(extra='on_failed_round = "stop"'))
    assert load_federation_config(path).on_failed_round is FailedRoundPolicy.STOP
    path.write_text(base.format(extra=""))
    assert load_federation_config(path).on_failed_round is FailedRoundPolicy.CONTINUE
    path.write_text(base.format(extra='on_failed_round = "retry"'))
    with pytest.raises(ConfigError, match="run.on_failed_round"):
        load_federation_config(path)
