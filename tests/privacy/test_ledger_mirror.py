"""The ledger mirror's bounds and lookups: a silo may not flood it under other runs' ids or one round of the
run, the upload check's position lookup does not grow with the mirror, and a schema-1 mirror is upgraded."""

from __future__ import annotations

import dataclasses
import sqlite3
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from fedsilo.privacy import pki, signed
from fedsilo.privacy.accounting import Mechanism, Neighbouring
from fedsilo.privacy.ledger import GENESIS_HASH, Ledger, LedgerEntry, LedgerError, LedgerMirror, MirrorQuotaError
from fedsilo.privacy.ledger.mirror import MAX_ENTRIES_PER_ROUND
from fedsilo.privacy.pki import Role

RUN = "study-2025"
OTHER = "made-up-run"
SILO_A = "hospital-a"
SILO_B = "hospital-b"

#: The mirror's schema 1, as fedsilo wrote it before the run/round/upload columns (a frozen copy).
SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE mirrored (
    silo TEXT NOT NULL,
    seq INTEGER NOT NULL,
    neighbouring TEXT NOT NULL,
    entry_json TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (silo, seq)
);
CREATE INDEX mirrored_by_relation ON mirrored (silo, neighbouring, seq);
CREATE TRIGGER mirrored_append_only_delete BEFORE DELETE ON mirrored
BEGIN SELECT RAISE(ABORT, 'the ledger mirror is append-only'); END;
CREATE TRIGGER mirrored_append_only_update BEFORE UPDATE ON mirrored
BEGIN SELECT RAISE(ABORT, 'the ledger mirror is append-only'); END;
INSERT INTO meta (key, value) VALUES ('schema', '1'), ('kind', 'ledger-mirror');
"""


@dataclasses.dataclass(frozen=True)
class Silo:
    """A silo's CA-issued certificate and key, and one genuine entry of its ledger to copy from."""

    ca: bytes
    key: bytes
    template: LedgerEntry


def silo_with(ca_pem: bytes, name: str, paths: pki.IssuedPaths, ledger: Path) -> Silo:
    """Silo ``name`` holding ``paths`` (its certificate and key), with one real entry written to ``ledger``."""
    with Ledger.open(ledger, silo=name, certificate_pem=paths.cert.read_bytes(),
                     private_key_pem=paths.key.read_bytes()) as led:
        template = led.append(run_id=RUN, round=1, upload_index=0, mechanism=Mechanism.SUBSAMPLED_GAUSSIAN,
                              neighbouring=Neighbouring.RECORD, noise_multiplier=1.5, sample_rate=0.04, steps=2250,
                              clip_norm=1.0, delta=1e-5, epsilon_rdp=7.3291, rdp_order=6.0, cumulative_epsilon=7.3291)
    return Silo(ca=ca_pem, key=paths.key.read_bytes(), template=template)


def chain(silo: Silo, positions: Iterable[tuple[str, int, int]], *,
          after: LedgerEntry | None = None) -> list[LedgerEntry]:
    """The silo's next entries at ``positions`` (run, round, upload index), validly linked and signed with its
    own key, continuing ``after`` (or from seq 1): what a hostile but enrolled silo can make at will."""
    key = signed.load_signing_key(silo.key)
    out: list[LedgerEntry] = []
    seq, prev = (0, GENESIS_HASH) if after is None else (after.seq, after.entry_hash())
    for run_id, rnd, upload in positions:
        seq += 1
        entry = dataclasses.replace(silo.template, seq=seq, prev_hash=prev, run_id=run_id, round=rnd,
                                    upload_index=upload).signed_with(key)
        out.append(entry)
        prev = entry.entry_hash()
    return out


@pytest.fixture(scope="module")
def silos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Silo]:
    root = tmp_path_factory.mktemp("mirror-pki")
    ca = pki.init_ca(root / "ca")
    out = {}
    for name in (SILO_A, SILO_B):
        paths = pki.issue_certificate(root / "ca", root / "certs", role=Role.SILO, name=name)
        out[name] = silo_with(ca.cert.read_bytes(), name, paths, root / f"{name}.sqlite")
    return out


def accept_all(mirror: LedgerMirror, silo: Silo, entries: Iterable[LedgerEntry]) -> None:
    for entry in entries:
        mirror.accept(entry.to_json(), ca_pem=silo.ca, expected_silo=entry.silo)


def test_a_flood_of_other_runs_is_refused_past_the_bound_and_the_run_goes_on(
    silos: dict[str, Silo], tmp_path: Path
) -> None:
    a, b = silos[SILO_A], silos[SILO_B]
    flood = chain(a, [(OTHER, r, 0) for r in range(1, 10)])
    with LedgerMirror.open(tmp_path / "m.sqlite", run_id=RUN, last_round=3, max_foreign_entries=8) as mirror:
        accept_all(mirror, a, flood[:8])
        for refused in (flood[8], *chain(a, [(RUN, 4, 0)], after=flood[7])):  # another run; this run past round 3
            with pytest.raises(MirrorQuotaError) as info:
                mirror.accept(refused.to_json(), ca_pem=a.ca, expected_silo=SILO_A)
            assert str(info.value) == (
                f"refusing ledger entry seq 9 of silo 'hospital-a' (run {refused.run_id!r}, round "
                f"{refused.round}): the mirror already keeps 8 entries of this silo outside run 'study-2025' "
                "rounds 0..3, the most it may (8); a silo's ledger may bring at most that many entries of other runs")
            assert info.value.seq == 9 and isinstance(info.value, LedgerError)
            assert mirror.entries(SILO_A) == flood[:8] and mirror.last(SILO_A) == flood[7]
        # The run's own entries still extend the chain, and the quota is per silo.
        own = chain(a, [(RUN, 1, 0), (RUN, 3, 1)], after=flood[7])
        accept_all(mirror, a, own)
        assert mirror.entries(SILO_A) == flood[:8] + own
        assert mirror.entries_at(SILO_A, RUN, 1, 0) == own[:1] and mirror.entries_at(SILO_A, RUN, 3, 1) == own[1:]
        accept_all(mirror, b, chain(b, [(OTHER, r, 0) for r in range(1, 9)]))
    with LedgerMirror.open(tmp_path / "m.sqlite", run_id=RUN, last_round=3, max_foreign_entries=8) as mirror:
        with pytest.raises(MirrorQuotaError, match="seq 11 .* already keeps 8 entries"):
            mirror.accept(chain(a, [(OTHER, 10, 0)], after=own[-1])[0].to_json(), ca_pem=a.ca)
    # A reader opened without a run counts every entry of a silo against the bound.
    with LedgerMirror.open(tmp_path / "m.sqlite", max_foreign_entries=10) as mirror:
        with pytest.raises(MirrorQuotaError, match=r"already keeps 10 entries of this silo, the most it may \(10\)"):
            mirror.accept(chain(a, [(RUN, 2, 0)], after=own[-1])[0].to_json(), ca_pem=a.ca)
        assert len(mirror.entries(SILO_A)) == 10


def test_one_round_of_the_run_keeps_at_most_the_per_round_bound(silos: dict[str, Silo], tmp_path: Path) -> None:
    a = silos[SILO_A]
    entries = chain(a, [(RUN, 2, i % 2) for i in range(MAX_ENTRIES_PER_ROUND + 1)])
    with LedgerMirror.open(tmp_path / "m.sqlite", run_id=RUN, last_round=3) as mirror:
        accept_all(mirror, a, entries[:MAX_ENTRIES_PER_ROUND])
        with pytest.raises(MirrorQuotaError) as info:
            mirror.accept(entries[MAX_ENTRIES_PER_ROUND].to_json(), ca_pem=a.ca)
        assert str(info.value) == (
            "refusing ledger entry seq 65 of silo 'hospital-a': the mirror already holds 64 entries of run "
            "'study-2025' round 2 from this silo, the most one round may have; a silo records each release of a "
            "round once (and again only after abandoning it)")
        assert len(mirror.entries(SILO_A)) == 64
        assert len(mirror.entries_at(SILO_A, RUN, 2, 0)) == len(mirror.entries_at(SILO_A, RUN, 2, 1)) == 32
        mirror.accept(chain(a, [(RUN, 3, 0)], after=entries[63])[0].to_json(), ca_pem=a.ca)
        assert mirror.last(SILO_A).round == 3


def test_lookups_return_exactly_one_position_or_one_run_oldest_first(silos: dict[str, Silo], tmp_path: Path) -> None:
    a, b = silos[SILO_A], silos[SILO_B]
    positions = [(OTHER, 1, 0), (RUN, 1, 0), (RUN, 1, 1), (OTHER, 1, 0), (RUN, 2, 0), (RUN, 1, 0)]
    ea = chain(a, positions)
    eb = chain(b, [(RUN, 1, 0)])
    with LedgerMirror.open(tmp_path / "m.sqlite", run_id=RUN) as mirror:
        accept_all(mirror, a, ea)
        accept_all(mirror, b, eb)
        assert [e.seq for e in mirror.entries_at(SILO_A, RUN, 1, 0)] == [2, 6]
        assert [e.seq for e in mirror.entries_at(SILO_A, OTHER, 1, 0)] == [1, 4]
        assert mirror.entries_at(SILO_A, RUN, 1, 1) == [ea[2]] and mirror.entries_at(SILO_A, RUN, 3, 0) == []
        assert mirror.entries_at(SILO_B, RUN, 1, 0) == eb and mirror.entries_at("hospital-z", RUN, 1, 0) == []
        assert [e.seq for e in mirror.entries_of_run(SILO_A, RUN)] == [2, 3, 5, 6]
        assert mirror.entries_of_run(SILO_A, OTHER) == [ea[0], ea[3]]


def _median_lookup_s(mirror: LedgerMirror) -> float:
    times = []
    for _ in range(41):
        start = time.perf_counter()
        found = mirror.entries_at(SILO_A, RUN, 1, 0)
        times.append(time.perf_counter() - start)
        assert len(found) == 1
    return statistics.median(times)


def test_the_position_lookup_does_not_grow_with_the_mirror(silos: dict[str, Silo], tmp_path: Path) -> None:
    a = silos[SILO_A]
    medians = []
    for n in (10, 400):
        path = tmp_path / f"m{n}.sqlite"
        with LedgerMirror.open(path, run_id=RUN) as mirror:
            accept_all(mirror, a, chain(a, [(OTHER, r, 0) for r in range(1, n + 1)] + [(RUN, 1, 0)]))
            medians.append(_median_lookup_s(mirror))
        # The file answers that lookup from its index: one search, no scan, no sort.
        plan = [row[-1] for row in sqlite3.connect(path).execute(
            "EXPLAIN QUERY PLAN SELECT entry_json FROM mirrored WHERE silo = ? AND run_id = ? AND round = ? "
            "AND upload_index = ? ORDER BY seq", (SILO_A, RUN, 1, 0))]
        assert plan == ["SEARCH mirrored USING INDEX mirrored_by_position "
                        "(silo=? AND run_id=? AND round=? AND upload_index=?)"], plan
    # Reading and parsing all 401 entries took about 40x the 11; one position takes about the same in both.
    assert medians[1] < 4 * medians[0] + 0.001, medians


def schema_1_mirror(path: Path, entries: list[LedgerEntry]) -> None:
    """Writes a mirror of schema 1 holding ``entries`` (as an older coordinator left it)."""
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_1)
    with conn:
        conn.executemany("INSERT INTO mirrored (silo, seq, neighbouring, entry_json, received_at) "
                         "VALUES (?, ?, ?, ?, ?)",
                         [(e.silo, e.seq, e.neighbouring.value, e.to_json(), f"2024-01-0{e.seq}T00:00:00Z")
                          for e in entries])
    conn.close()


def _rows(path: Path) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT * FROM meta ORDER BY key").fetchall() + conn.execute(
            "SELECT silo, seq, entry_json, received_at FROM mirrored ORDER BY silo, seq").fetchall()
    finally:
        conn.close()


def test_a_schema_1_mirror_is_upgraded_in_place(silos: dict[str, Silo], tmp_path: Path) -> None:
    a, b = silos[SILO_A], silos[SILO_B]
    ea = chain(a, [(OTHER, 1, 0), (RUN, 1, 0), (RUN, 1, 1)])
    eb = chain(b, [(RUN, 1, 0)])
    path = tmp_path / "coordinator" / "ledger_mirror.sqlite"
    path.parent.mkdir()
    schema_1_mirror(path, ea + eb)
    before = _rows(path)
    with LedgerMirror.open(path, run_id=RUN) as mirror:
        assert mirror.entries(SILO_A) == ea and mirror.entries(SILO_B) == eb
        assert mirror.entries_at(SILO_A, RUN, 1, 1) == [ea[2]] and mirror.entries_of_run(SILO_A, RUN) == ea[1:]
        nxt = chain(a, [(RUN, 2, 0)], after=ea[-1])
        accept_all(mirror, a, nxt)
    after = _rows(path)
    # The same entries and receipt times; only the schema version changed; the chain went on.
    assert after[0] == ("kind", "ledger-mirror") and after[1] == ("schema", "2") and before[1] == ("schema", "1")
    assert after[2:5] + after[6:] == before[2:] and after[5][:3] == (SILO_A, 4, nxt[0].to_json())
    assert [r[:2] for r in after[2:]] == [(SILO_A, 1), (SILO_A, 2), (SILO_A, 3), (SILO_A, 4), (SILO_B, 1)]
    conn = sqlite3.connect(path)
    try:
        for statement in ("UPDATE mirrored SET round = 9", "DELETE FROM mirrored"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                conn.execute(statement)
        columns = [r[1] for r in conn.execute("PRAGMA table_info(mirrored)")]
        assert columns == ["silo", "seq", "run_id", "round", "upload_index", "neighbouring", "entry_json",
                           "received_at"]
        assert conn.execute("SELECT run_id, round, upload_index FROM mirrored WHERE silo = ? ORDER BY seq",
                            (SILO_A,)).fetchall() == [(OTHER, 1, 0), (RUN, 1, 0), (RUN, 1, 1), (RUN, 2, 0)]
    finally:
        conn.close()
    with LedgerMirror.open(path, run_id=RUN) as mirror:  # opening again changes nothing
        assert mirror.entries(SILO_A) == ea + nxt
    assert _rows(path) == after


def test_an_upgrade_that_fails_leaves_the_schema_1_file_as_it_was(silos: dict[str, Silo], tmp_path: Path) -> None:
    a = silos[SILO_A]
    entries = chain(a, [(RUN, 1, 0), (RUN, 2, 0)])
    path = tmp_path / "m.sqlite"
    schema_1_mirror(path, entries)
    conn = sqlite3.connect(path)
    with conn:  # damage seq 2 behind fedsilo's back
        conn.execute("DROP TRIGGER mirrored_append_only_update")
        conn.execute("UPDATE mirrored SET entry_json = '{' WHERE seq = 2")
        conn.execute("CREATE TRIGGER mirrored_append_only_update BEFORE UPDATE ON mirrored "
                     "BEGIN SELECT RAISE(ABORT, 'the ledger mirror is append-only'); END")
    conn.close()
    before = _rows(path)
    with pytest.raises(LedgerError, match="cannot upgrade the ledger mirror: its entry seq 2 of silo 'hospital-a' "
                                          "is damaged") as info:
        LedgerMirror.open(path, run_id=RUN)
    assert info.value.seq == 2
    assert _rows(path) == before


def test_a_mirror_of_an_unknown_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite"
    LedgerMirror.open(path).close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
    conn.close()
    with pytest.raises(LedgerError, match="schema '3'; this fedsilo reads '2' and upgrades '1'"):
        LedgerMirror.open(path)
