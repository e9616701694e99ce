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
)
from fedsilo.privacy.ledger.fields import _enum
from fedsilo.privacy.ledger.sqlite import _MIRROR_SCHEMA, _SCHEMA_VERSION, _transaction, open_database
from fedsilo.privacy.signed import now_text


class LedgerMirror:
    """The coordinator's verified copy of every silo's ledger (SQLite, WAL). No keys.

    Attributes:
        path: The SQLite file.
    """

    def __init__(self, conn: sqlite3.Connection, *, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path | str) -> LedgerMirror:
        """Opens (or creates) the mirror.

        Args:
            path: The SQLite file, in the coordinator's state directory.

        Returns:
            The open mirror.

        Raises:
            LedgerError: If the file is not a ledger mirror or SQLite cannot use
                write-ahead logging there.
        """
        path = Path(path)

        def check(stored: dict[str, str]) -> None:
            if stored.get("kind") != "ledger-mirror":
                raise LedgerError(f"{str(path)!r} is not a ledger mirror (it is {stored.get('kind')!r}); "
                                  "check the coordinator's state directory")

        conn = open_database(path, _MIRROR_SCHEMA, {"schema": _SCHEMA_VERSION, "kind": "ledger-mirror"}, check)
        return cls(conn, path=path)

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

        The entry must be the silo's next one (seq 1 first), link to the previously
        mirrored entry's hash, carry a silo certificate from the CA for its silo, verify,
        and not lower a cumulative ε. On any failure nothing is stored.

        Args:
            entry_json: `LedgerEntry.to_json` text as the silo sent it.
            ca_pem: The federation CA certificate, PEM.
            expected_silo: The silo that sent it (its mTLS identity); the entry must be
                that silo's. None skips this check.

        Returns:
            The stored entry.

        Raises:
            DuplicateEntryError: If exactly this entry is already mirrored (a resend).
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
            verifier = _ChainVerifier(ca_pem, expected_silo=entry.silo)
            if last is not None:
                verifier.resume(last, self._last_by_relation(entry.silo))
            try:
                verifier.feed(entry)
            except LedgerError as exc:
                raise LedgerError(f"refusing a ledger entry: {exc}", seq=exc.seq) from None
            self._conn.execute(
                "INSERT INTO mirrored (silo, seq, neighbouring, entry_json, received_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (entry.silo, entry.seq, entry.neighbouring.value, entry.to_json(), now_text()),
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
            The cumulative ε; 0.0 if the silo has no entries for that relation.
        """
        relation = _enum(neighbouring, Neighbouring, "neighbouring")
        with self._lock:
            entry = self._last_by_relation(silo).get(relation)
        return 0.0 if entry is None else entry.guarantee(scope).cumulative_epsilon

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

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
