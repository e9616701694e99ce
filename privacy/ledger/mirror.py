"""The coordinator's verified, append-only copy of every silo's ledger (no keys)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsilo.privacy.accounting import Neighbouring
from fedsilo.privacy.ledger.chain import _ChainVerifier
from fedsilo.privacy.ledger.entries import (
    DuplicateEntryError,
    GuaranteeScope,
    LedgerEntry,
    LedgerError,
    MirrorQuotaError,
)
from fedsilo.privacy.ledger.fields import _MAX_INTEGER, _check_run_id, _enum, _integer
from fedsilo.privacy.ledger.sqlite import (
    _MIRROR_SCHEMA,
    _MIRROR_SCHEMA_VERSION,
    _transaction,
    migrate_mirror,
    open_database,
)
from fedsilo.privacy.signed import now_text

#: Entries of one silo the mirror keeps that the coordinator's run cannot use: other runs' (a
#: silo's ledger is one chain across its runs, so its history comes first and is kept, since the
#: budget check composes it) and this run's beyond its last round. 4096 holds, e.g., ten earlier
#: 200-round runs with both relations, yet caps what one silo makes the coordinator store and read
#: when a run starts and in an audit (about 6 MB of real entries; 128 MiB at the entry size limit).
MAX_FOREIGN_ENTRIES = 4096
#: Entries of one silo the mirror keeps for one round of the coordinator's run (all its uploads).
#: An honest agent writes at most four per attempt (record- and silo-level, a ResFIM mask's
#: Fisher, the style bank; DEeR: two uploads of two relations) and writes them again only after
#: abandoning an attempt, so 64 allows 16 attempts and bounds what an upload check reads.
MAX_ENTRIES_PER_ROUND = 64


class LedgerMirror:
    """The coordinator's verified copy of every silo's ledger (SQLite, WAL). No keys.

    Attributes:
        path: The SQLite file.
    """

    def __init__(self, conn: sqlite3.Connection, *, path: Path, run_id: str | None, last_round: int | None,
                 max_foreign_entries: int) -> None:
        self._conn = conn
        self.path = path
        self._run_id = run_id
        self._last_round = _MAX_INTEGER if last_round is None else last_round
        self._max_foreign = max_foreign_entries
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        run_id: str | None = None,
        last_round: int | None = None,
        max_foreign_entries: int = MAX_FOREIGN_ENTRIES,
    ) -> LedgerMirror:
        """Opens (or creates) the mirror; a mirror of an older schema is upgraded in place.

        Args:
            path: The SQLite file, in the coordinator's state directory.
            run_id: The coordinator's run: its entries up to ``last_round`` are kept up to
                `MAX_ENTRIES_PER_ROUND` per round, every other entry counts against
                ``max_foreign_entries``. None (a reader such as the audit): every entry counts.
            last_round: The highest ledger round of that run; None: no limit.
            max_foreign_entries: How many entries per silo `accept` keeps that the run cannot
                use (of other runs, or of this run beyond ``last_round``).

        Returns:
            The open mirror.

        Raises:
            LedgerError: If the file is not a ledger mirror (or one of a newer fedsilo), a
                stored entry is damaged, or SQLite cannot use write-ahead logging there.
            ValueError: If an argument is malformed.
        """
        path = Path(path)
        if run_id is not None:
            _check_run_id(run_id)
        if last_round is not None:
            last_round = _integer(last_round, "last_round", minimum=0)
        max_foreign_entries = _integer(max_foreign_entries, "max_foreign_entries", minimum=0)

        def check(stored: dict[str, str]) -> None:
            if stored.get("kind") != "ledger-mirror":
                raise LedgerError(f"{str(path)!r} is not a ledger mirror (it is {stored.get('kind')!r}); "
                                  "check the coordinator's state directory")

        meta = {"schema": _MIRROR_SCHEMA_VERSION, "kind": "ledger-mirror"}
        conn = open_database(path, _MIRROR_SCHEMA, meta, check, migrate_mirror)
        return cls(conn, path=path, run_id=run_id, last_round=last_round, max_foreign_entries=max_foreign_entries)

    def close(self) -> None:
        """Closes the database."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> LedgerMirror:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def accept(
        self,
        entry_json: str | bytes,
        *,
        ca_pem: bytes | str,
        expected_silo: str | None = None,
    ) -> LedgerEntry:
        """Verifies one entry from a silo and stores it if it extends that silo's chain.

        The entry must be the silo's next one (seq 1 first), fit the silo's quota (see
        `open`), link to the previously mirrored entry's hash, carry a silo certificate from
        the CA for its silo, verify, and not lower a cumulative ε. On any failure nothing is
        stored.

        Args:
            entry_json: `LedgerEntry.to_json` text as the silo sent it.
            ca_pem: The federation CA certificate, PEM.
            expected_silo: The silo that sent it (its mTLS identity); the entry must be
                that silo's. None skips this check.

        Returns:
            The stored entry.

        Raises:
            DuplicateEntryError: If exactly this entry is already mirrored (a resend).
            MirrorQuotaError: If the mirror already keeps as many entries of the entry's
                round of the run (`MAX_ENTRIES_PER_ROUND`), or of entries the run cannot use
                (``max_foreign_entries``), from this silo as it may.
            LedgerError: If the entry does not verify, is another silo's, or does not
                extend the chain (a gap, a replay of a different entry, a fork).
        """
        try:
            entry = LedgerEntry.from_json(entry_json)
        except LedgerError as exc:
            raise LedgerError(f"refusing a ledger entry: {exc}", seq=exc.seq) from None
        if expected_silo is not None and entry.silo != expected_silo:
            raise LedgerError(
                f"refusing ledger entry seq {entry.seq} of silo {entry.silo!r}: it was sent by "
                f"silo {expected_silo!r}; a silo may only send its own ledger",
                seq=entry.seq,
            )
        with self._lock, _transaction(self._conn):
            last = self._last(entry.silo)
            last_seq = 0 if last is None else last.seq
            if entry.seq <= last_seq:
                stored = self._conn.execute(
                    "SELECT entry_json FROM mirrored WHERE silo = ? AND seq = ?",
                    (entry.silo, entry.seq),
                ).fetchone()
                if stored is not None and stored[0] == entry.to_json():
                    raise DuplicateEntryError(
                        f"ledger entry seq {entry.seq} of silo {entry.silo!r} is already "
                        "mirrored (identical resend; nothing to do)",
                        seq=entry.seq,
                    )
                raise LedgerError(
                    f"refusing ledger entry seq {entry.seq} of silo {entry.silo!r}: the mirror "
                    f"already holds a different entry seq {entry.seq} (a replay or a forked "
                    f"ledger); the next entry expected is seq {last_seq + 1}",
                    seq=entry.seq,
                )
            if entry.seq != last_seq + 1:
                raise LedgerError(
                    f"refusing ledger entry seq {entry.seq} of silo {entry.silo!r}: out of "
                    f"order, the mirror holds up to seq {last_seq}; send seq {last_seq + 1} "
                    "first",
                    seq=entry.seq,
                )
            self._check_quota(entry)
            verifier = _ChainVerifier(ca_pem, expected_silo=entry.silo)
            if last is not None:
                verifier.resume(last, self._last_by_relation(entry.silo))
            try:
                verifier.feed(entry)
            except LedgerError as exc:
                raise LedgerError(f"refusing a ledger entry: {exc}", seq=exc.seq) from None
            self._conn.execute(
                "INSERT INTO mirrored (silo, seq, run_id, round, upload_index, neighbouring, entry_json, "
                "received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (entry.silo, entry.seq, entry.run_id, entry.round, entry.upload_index, entry.neighbouring.value,
                 entry.to_json(), now_text()),
            )
        return entry

    def silos(self) -> list[str]:
        """The silos with mirrored entries, sorted."""
        return [r[0] for r in self._query("SELECT DISTINCT silo FROM mirrored ORDER BY silo")]

    def entries(self, silo: str) -> list[LedgerEntry]:
        """A silo's mirrored entries, oldest first.

        Args:
            silo: The silo's name.

        Returns:
            The entries (empty if none).
        """
        rows = self._query(
            "SELECT entry_json FROM mirrored WHERE silo = ? ORDER BY seq", (silo,)
        )
        return [LedgerEntry.from_json(r[0]) for r in rows]

    def entries_at(self, silo: str, run_id: str, round_: int, upload_index: int) -> list[LedgerEntry]:
        """A silo's mirrored entries at one ledger position of a run, oldest first (an index
        lookup: its cost does not grow with the rest of the silo's ledger).

        Args:
            silo: The silo's name.
            run_id: The run.
            round_: The entries' ``round``.
            upload_index: The entries' ``upload_index``.

        Returns:
            The entries (empty if none).
        """
        rows = self._query(
            "SELECT entry_json FROM mirrored INDEXED BY mirrored_by_position "
            "WHERE silo = ? AND run_id = ? AND round = ? AND upload_index = ? ORDER BY seq",
            (silo, run_id, round_, upload_index),
        )
        return [LedgerEntry.from_json(r[0]) for r in rows]

    def entries_of_run(self, silo: str, run_id: str) -> list[LedgerEntry]:
        """A silo's mirrored entries of one run, oldest first (an index lookup over that run only).

        Args:
            silo: The silo's name.
            run_id: The run.

        Returns:
            The entries (empty if none).
        """
        rows = self._query(
            "SELECT entry_json FROM mirrored INDEXED BY mirrored_by_position WHERE silo = ? AND run_id = ? "
            "ORDER BY seq",
            (silo, run_id),
        )
        return [LedgerEntry.from_json(r[0]) for r in rows]

    def last(self, silo: str) -> LedgerEntry | None:
        """A silo's newest mirrored entry, or None."""
        with self._lock:
            return self._last(silo)

    def cumulative(
        self,
        silo: str,
        neighbouring: Neighbouring,
        *,
        scope: GuaranteeScope = GuaranteeScope.SINGLE_UPLOAD,
    ) -> float:
        """A silo's mirrored cumulative ε for one relation; see `Ledger.cumulative`.

        Args:
            silo: The silo's name.
            neighbouring: Record-level or silo-level.
            scope: Against whom (default ``SINGLE_UPLOAD``, the conservative figure).

        Returns:
            The cumulative ε by the accountant that governed the silo's budget
            (`LedgerEntry.budget_epsilon`); 0.0 if the silo has no entries for that relation.
        """
        relation = _enum(neighbouring, Neighbouring, "neighbouring")
        with self._lock:
            entry = self._last_by_relation(silo).get(relation)
        return 0.0 if entry is None else entry.budget_epsilon(scope)

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _check_quota(self, entry: LedgerEntry) -> None:
        """Raises MirrorQuotaError if keeping ``entry`` would exceed its silo's quota (see `open`)."""
        silo, run = entry.silo, self._run_id
        if run is not None and entry.run_id == run and entry.round <= self._last_round:
            held = self._conn.execute(
                "SELECT COUNT(*) FROM mirrored WHERE silo = ? AND run_id = ? AND round = ?", (silo, run, entry.round)
            ).fetchone()[0]
            if held >= MAX_ENTRIES_PER_ROUND:
                raise MirrorQuotaError(
                    f"refusing ledger entry seq {entry.seq} of silo {entry.silo!r}: the mirror already holds "
                    f"{held} entries of run {run!r} round {entry.round} from this silo, the most one round may "
                    "have; a silo records each release of a round once (and again only after abandoning it)",
                    seq=entry.seq,
                )
            return
        if run is None:
            held = self._conn.execute("SELECT COUNT(*) FROM mirrored WHERE silo = ?", (silo,)).fetchone()[0]
            outside = ""
        else:
            # Three index ranges, each over entries the run cannot use only.
            held = self._conn.execute(
                "SELECT (SELECT COUNT(*) FROM mirrored WHERE silo = ?1 AND run_id < ?2)"
                " + (SELECT COUNT(*) FROM mirrored WHERE silo = ?1 AND run_id > ?2)"
                " + (SELECT COUNT(*) FROM mirrored WHERE silo = ?1 AND run_id = ?2 AND round > ?3)",
                (silo, run, self._last_round),
            ).fetchone()[0]
            rounds = "" if self._last_round == _MAX_INTEGER else f" rounds 0..{self._last_round}"
            outside = f" outside run {run!r}{rounds}"
        if held >= self._max_foreign:
            raise MirrorQuotaError(
                f"refusing ledger entry seq {entry.seq} of silo {entry.silo!r} (run {entry.run_id!r}, round "
                f"{entry.round}): the mirror already keeps {held} entries of this silo{outside}, the most it may "
                f"({self._max_foreign}); a silo's ledger may bring at most that many entries of other runs",
                seq=entry.seq,
            )

    def _last(self, silo: str) -> LedgerEntry | None:
        row = self._conn.execute(
            "SELECT entry_json FROM mirrored WHERE silo = ? ORDER BY seq DESC LIMIT 1", (silo,)
        ).fetchone()
        return None if row is None else LedgerEntry.from_json(row[0])

    def _last_by_relation(self, silo: str) -> dict[Neighbouring, LedgerEntry]:
        result: dict[Neighbouring, LedgerEntry] = {}
        for relation in Neighbouring:
            row = self._conn.execute(
                "SELECT entry_json FROM mirrored WHERE silo = ? AND neighbouring = ? "
                "ORDER BY seq DESC LIMIT 1",
                (silo, relation.value),
            ).fetchone()
            if row is not None:
                result[relation] = LedgerEntry.from_json(row[0])
        return result
