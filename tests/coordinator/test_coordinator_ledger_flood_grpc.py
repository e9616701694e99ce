"""A hostile but enrolled silo flooding the coordinator's ledger mirror over REAL gRPC with mutual TLS: validly
signed entries of a made-up run past `MAX_FOREIGN_ENTRIES`, or of one round past `MAX_ENTRIES_PER_ROUND`, are
RESOURCE_EXHAUSTED with nothing stored; the run's own entries and other silos go on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc

from fedsilo.privacy.budget import MIRROR_FILE
from fedsilo.privacy.ledger.mirror import MAX_ENTRIES_PER_ROUND, MAX_FOREIGN_ENTRIES
from tests.coordinator.test_coordinator_grpc_bad_input import (  # noqa: F401 - fixtures
    SILOS,
    Certs,
    Fed,
    certs,
    expect,
    start_fed,
)
from tests.coordinator.test_coordinator_privacy_grpc import PLAN, RUN_ID, join, send, state, statement
from tests.privacy.test_ledger_mirror import Silo, chain, schema_1_mirror, silo_with

MADE_UP = "made-up-run"


def hospital(certs: Certs, tmp_path: Path, name: str) -> Silo:
    return silo_with(certs.ca.read_bytes(), name, certs.silo[name], tmp_path / f"{name}.sqlite")


def texts(batch: list) -> list[str]:
    return [e.to_json() for e in batch]


def test_a_flood_of_a_made_up_run_is_refused_past_the_bound(start_fed: Callable[..., Fed], certs: Certs,
                                                             tmp_path: Path) -> None:
    a = hospital(certs, tmp_path, "hospital-a")
    flood = chain(a, [(MADE_UP, r, 0) for r in range(1, MAX_FOREIGN_ENTRIES + 3)])
    # All but the last batch were mirrored by an older coordinator (schema 1), which this start upgrades:
    # the flood itself costs a disk sync per entry, minutes of test time.
    seeded = MAX_FOREIGN_ENTRIES - 64
    (tmp_path / "state0").mkdir()
    schema_1_mirror(tmp_path / "state0" / MIRROR_FILE, flood[:seeded])
    fed = start_fed(privacy=PLAN)
    for silo in SILOS:
        join(fed, silo, statement(certs, silo))
    assert send(fed, "hospital-a", []) == seeded
    assert send(fed, "hospital-a", texts(flood[seeded:MAX_FOREIGN_ENTRIES])) == MAX_FOREIGN_ENTRIES == 4096
    before = state(fed)
    message = ("refusing ledger entry seq 4097 of silo 'hospital-a' (run 'made-up-run', round 4097): the mirror "
               "already keeps 4096 entries of this silo outside run 'grpc-bad-input' rounds 0..2, the most it may "
               "(4096); a silo's ledger may bring at most that many entries of other runs")
    err = expect(grpc.StatusCode.RESOURCE_EXHAUSTED, message,
                 lambda: send(fed, "hospital-a", texts(flood[MAX_FOREIGN_ENTRIES:])))
    assert err.details() == message
    # Nothing past the bound was stored, the entry after it neither; this run's past its last round counts too.
    beyond = chain(a, [(RUN_ID, 3, 0)], after=flood[MAX_FOREIGN_ENTRIES - 1])
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "(run 'grpc-bad-input', round 3): the mirror already keeps 4096",
           lambda: send(fed, "hospital-a", texts(beyond)))
    assert send(fed, "hospital-a", []) == 4096 and state(fed) == before
    # The run's own entries still extend the chain; another silo's mirror is its own.
    own = chain(a, [(RUN_ID, 1, 0), (RUN_ID, 2, 0)], after=flood[MAX_FOREIGN_ENTRIES - 1])
    assert send(fed, "hospital-a", texts(own)) == 4098
    b = hospital(certs, tmp_path, "hospital-b")
    assert send(fed, "hospital-b", texts(chain(b, [(MADE_UP, 1, 0), (RUN_ID, 1, 0)]))) == 2


def test_one_round_of_the_run_is_bounded_too(start_fed: Callable[..., Fed], certs: Certs, tmp_path: Path) -> None:
    a = hospital(certs, tmp_path, "hospital-a")
    fed = start_fed(privacy=PLAN)
    for silo in SILOS:
        join(fed, silo, statement(certs, silo))
    burst = chain(a, [(RUN_ID, 1, 0)] * (MAX_ENTRIES_PER_ROUND + 1) + [(RUN_ID, 2, 0)])
    assert send(fed, "hospital-a", texts(burst[:MAX_ENTRIES_PER_ROUND])) == MAX_ENTRIES_PER_ROUND == 64
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED,
           "refusing ledger entry seq 65 of silo 'hospital-a': the mirror already holds 64 entries of run "
           "'grpc-bad-input' round 1 from this silo, the most one round may have",
           lambda: send(fed, "hospital-a", texts(burst[MAX_ENTRIES_PER_ROUND:])))
    assert send(fed, "hospital-a", []) == 64
    round_2 = chain(a, [(RUN_ID, 2, 0)], after=burst[MAX_ENTRIES_PER_ROUND - 1])
    assert send(fed, "hospital-a", texts(round_2)) == 65
