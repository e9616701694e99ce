"""SQLite (WAL) persistence of run, round, participation and metrics state."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedsilo.coordinator.schema import SCHEMA, SCHEMA_VERSION, RoundRow, SiloRow

__all__ = ["Store"]


class Store:
    """The coordinator's database. Every write is one transaction; readers see committed state.

    Args:
        path: the SQLite file (created with its folder).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self.transaction():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            stored = self.get_meta("schema_version")
            if stored is None or int(stored) < SCHEMA_VERSION:  # later versions only add tables
                self.set_meta("schema_version", str(SCHEMA_VERSION))

    def close(self) -> None:
        """Closes the connection."""
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: all or nothing."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    # -- meta ---------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        """A value of the key/value table, or None."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row["value"]

    def set_meta(self, key: str, value: str) -> None:
        """Sets a key/value entry (inside or outside a transaction)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def get_json(self, key: str) -> object | None:
        """A JSON value of the key/value table."""
        raw = self.get_meta(key)
        return None if raw is None else json.loads(raw)

    # -- silos --------------------------------------------------------------------------
    def upsert_silo(self, row: SiloRow) -> None:
        """Records a join (keeps the first join time)."""
        with self._lock:
            self._db.execute(
                """INSERT INTO silos (name, joined_at_ms, last_seen_ms, num_train_examples, agent_version, kem_public_key)
                   VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT(name) DO UPDATE SET last_seen_ms = excluded.last_seen_ms,
                       num_train_examples = excluded.num_train_examples,
                       agent_version = excluded.agent_version,
                       kem_public_key = excluded.kem_public_key""",
                (row.name, row.joined_at_ms, row.last_seen_ms, row.num_train_examples, row.agent_version,
                 row.kem_public_key),
            )

    def flush_telemetry(self, last_seen: dict[str, int], traffic: dict[int, tuple[int, int]]) -> None:
        """Writes batched last-seen times and per-round (up, down) traffic in one transaction."""
        with self.transaction() as db:
            for name, ms in last_seen.items():
                db.execute("UPDATE silos SET last_seen_ms = MAX(last_seen_ms, ?) WHERE name = ?", (ms, name))
            for rnd, (up, down) in traffic.items():
                db.execute("UPDATE rounds SET bytes_up = bytes_up + ?, bytes_down = bytes_down + ? WHERE round = ?",
                           (up, down, rnd))

    def silos(self) -> dict[str, SiloRow]:
        """All joined silos by name."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM silos").fetchall()
        return {r["name"]: SiloRow(**dict(r)) for r in rows}

    # -- rounds -------------------------------------------------------------------------
    def insert_round(self, rnd: int, *, opened_at_ms: int, deadline_ms: int, params_shared: int,
                     weight_normalizer: float) -> None:
        """Opens a round."""
        with self._lock:
            self._db.execute(
                """INSERT INTO rounds (round, state, opened_at_ms, deadline_ms, params_shared, weight_normalizer)
                   VALUES (?, 'open', ?, ?, ?, ?)""",
                (rnd, opened_at_ms, deadline_ms, params_shared, weight_normalizer),
            )

    def get_round(self, rnd: int) -> RoundRow | None:
        """A round, or None."""
        with self._lock:
            row = self._db.execute("SELECT * FROM rounds WHERE round = ?", (rnd,)).fetchone()
        return None if row is None else RoundRow(**dict(row))

    def rounds(self) -> list[RoundRow]:
        """All rounds in order."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM rounds ORDER BY round").fetchall()
        return [RoundRow(**dict(r)) for r in rows]

    def open_round(self) -> RoundRow | None:
        """The open round, if any."""
        with self._lock:
            row = self._db.execute("SELECT * FROM rounds WHERE state = 'open'").fetchone()
        return None if row is None else RoundRow(**dict(row))

    def last_closed_round(self) -> int:
        """Highest closed round, 0 if none."""
        with self._lock:
            row = self._db.execute("SELECT MAX(round) AS r FROM rounds WHERE state = 'closed'").fetchone()
        return int(row["r"] or 0)

    def set_deadline(self, rnd: int, deadline_ms: int) -> None:
        """Moves a round's deadline."""
        with self._lock:
            self._db.execute("UPDATE rounds SET deadline_ms = ? WHERE round = ?", (deadline_ms, rnd))

    def record_upload(self, rnd: int, silo: str, *, seq: int, weight: float, payload_bytes: int, sha256: str,
                      wire_bytes: int, now_ms: int, statement: str = "") -> None:
        """Counts an accepted upload (the ``seq``-th of its round) with the sender's signed statement of
        it, if any; call inside a transaction."""
        self._db.execute(
            """INSERT INTO uploads (round, seq, silo, weight, payload_bytes, sha256, accepted_at_ms)
               VALUES (?, ?, ?, ?, ?, ?, ?)""",
            (rnd, seq, silo, weight, payload_bytes, sha256, now_ms),
        )
        if statement:
            self._db.execute("INSERT INTO upload_statements (round, silo, statement) VALUES (?, ?, ?)",
                             (rnd, silo, statement))
        self._db.execute(
            "UPDATE rounds SET total_weight = total_weight + ?, bytes_up = bytes_up + ? WHERE round = ?",
            (weight, wire_bytes, rnd),
        )

    def set_sum_version(self, rnd: int, version: int) -> None:
        """Records that the saved running sum of a round holds its first ``version`` uploads."""
        self._db.execute("UPDATE rounds SET sum_version = ? WHERE round = ?", (version, rnd))

    def uploads_after(self, rnd: int, seq: int) -> list[tuple[int, float]]:
        """(seq, weight) of a round's uploads with a sequence number above ``seq``, in order."""
        with self._lock:
            rows = self._db.execute("SELECT seq, weight FROM uploads WHERE round = ? AND seq > ? ORDER BY seq",
                                    (rnd, seq)).fetchall()
        return [(r["seq"], r["weight"]) for r in rows]

    def close_round(self, rnd: int, *, now_ms: int, aggregate_sha256: str) -> None:
        """Marks a round closed."""
        self._db.execute(
            "UPDATE rounds SET state = 'closed', closed_at_ms = ?, aggregate_sha256 = ? WHERE round = ?",
            (now_ms, aggregate_sha256, rnd),
        )

    def uploads(self, rnd: int) -> dict[str, float]:
        """Silo -> weight of the uploads accepted in a round."""
        with self._lock:
            rows = self._db.execute("SELECT silo, weight FROM uploads WHERE round = ? ORDER BY seq",
                                    (rnd,)).fetchall()
        return {r["silo"]: r["weight"] for r in rows}

    def upload_counts(self) -> dict[str, int]:
        """Silo -> number of uploads accepted from it, in every round (open ones included)."""
        with self._lock:
            rows = self._db.execute("SELECT silo, COUNT(*) AS n FROM uploads GROUP BY silo").fetchall()
        return {r["silo"]: r["n"] for r in rows}

    def upload_log(self, rnd: int) -> list[tuple[str, int, int]]:
        """(silo, accepted at ms, payload bytes) of the uploads accepted in a round, in arrival order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT silo, accepted_at_ms, payload_bytes FROM uploads WHERE round = ? ORDER BY seq", (rnd,)
            ).fetchall()
        return [(r["silo"], int(r["accepted_at_ms"]), int(r["payload_bytes"])) for r in rows]

    def contributions(self) -> dict[str, int]:
        """Silo -> number of closed rounds it contributed to."""
        with self._lock:
            rows = self._db.execute(
                """SELECT u.silo AS silo, COUNT(*) AS n FROM uploads u JOIN rounds r ON r.round = u.round
                   WHERE r.state = 'closed' GROUP BY u.silo"""
            ).fetchall()
        return {r["silo"]: r["n"] for r in rows}

    def upload_statements(self, rnd: int) -> dict[str, str]:
        """Silo -> its signed statement of its upload in round ``rnd`` (silos that sent one)."""
        with self._lock:
            rows = self._db.execute("SELECT silo, statement FROM upload_statements WHERE round = ? ORDER BY silo",
                                    (rnd,)).fetchall()
        return {r["silo"]: r["statement"] for r in rows}

    # -- failed rounds ------------------------------------------------------------------------
    def add_failure_report(self, rnd: int, silo: str, reason: str, now_ms: int) -> None:
        """Records that ``silo`` found round ``rnd``'s aggregate unusable (its first report stands)."""
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO failure_reports (round, silo, reason, at_ms) VALUES (?, ?, ?, ?)",
                       (rnd, silo, reason, now_ms))

    def failure_reports(self, rnd: int) -> dict[str, str]:
        """Silo -> the reason it gave, for the reports on round ``rnd``."""
        with self._lock:
            rows = self._db.execute("SELECT silo, reason FROM failure_reports WHERE round = ? ORDER BY silo",
                                    (rnd,)).fetchall()
        return {r["silo"]: r["reason"] for r in rows}

    def mark_failed(self, rnd: int, reason: str, now_ms: int) -> None:
        """Marks a closed round failed; call inside a transaction."""
        self._db.execute("INSERT OR IGNORE INTO failed_rounds (round, reason, at_ms) VALUES (?, ?, ?)",
                         (rnd, reason, now_ms))

    def failed_rounds(self) -> dict[int, str]:
        """Round -> why it failed, for every failed round."""
        with self._lock:
            rows = self._db.execute("SELECT round, reason FROM failed_rounds ORDER BY round").fetchall()
        return {r["round"]: r["reason"] for r in rows}

    # -- wrapped keys (HE key ceremony; opaque bytes) ---------------------------------------
    def put_wrapped_keys(self, entries: list[tuple[str, bytes]], now_ms: int) -> None:
        """Stores (replaces) wrapped keys, all or none."""
        with self.transaction() as db:
            for recipient, wrapped in entries:
                db.execute(
                    """INSERT INTO wrapped_keys (recipient, wrapped, stored_at_ms) VALUES (?, ?, ?)
                       ON CONFLICT(recipient) DO UPDATE SET wrapped = excluded.wrapped,
                           stored_at_ms = excluded.stored_at_ms""",
                    (recipient, wrapped, now_ms),
                )

    def wrapped_key(self, recipient: str) -> bytes | None:
        """The wrapped key stored for a silo, or None."""
        with self._lock:
            row = self._db.execute("SELECT wrapped FROM wrapped_keys WHERE recipient = ?", (recipient,)).fetchone()
        return None if row is None else bytes(row["wrapped"])

    def wrapped_key_recipients(self) -> set[str]:
        """Silos that have a wrapped key."""
        with self._lock:
            return {r["recipient"] for r in self._db.execute("SELECT recipient FROM wrapped_keys").fetchall()}

    # -- the sealed relay (opaque blobs by purpose and silo) -------------------------------
    def put_sealed(self, purpose: str, silo: str, blob: bytes, now_ms: int) -> None:
        """Stores a silo's blob under ``purpose`` (the caller checked it has none)."""
        with self.transaction() as db:
            db.execute("INSERT INTO sealed_blobs (purpose, silo, blob, stored_at_ms) VALUES (?, ?, ?, ?)",
                       (purpose, silo, blob, now_ms))

    def sealed(self, purpose: str, silo: str) -> bytes | None:
        """A silo's blob under ``purpose``, or None."""
        with self._lock:
            row = self._db.execute("SELECT blob FROM sealed_blobs WHERE purpose = ? AND silo = ?",
                                   (purpose, silo)).fetchone()
        return None if row is None else bytes(row["blob"])

    def sealed_count(self, purpose: str) -> int:
        """How many silos stored a blob under ``purpose``."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM sealed_blobs WHERE purpose = ?", (purpose,)).fetchone()[0])

    def sealed_sizes(self, purpose: str, *, after: str, exclude: str) -> list[tuple[str, int]]:
        """(silo, blob size) under ``purpose`` for silos named after ``after``, but ``exclude``, by name."""
        with self._lock:
            rows = self._db.execute(
                "SELECT silo, length(blob) AS n FROM sealed_blobs WHERE purpose = ? AND silo > ? AND silo != ? "
                "ORDER BY silo", (purpose, after, exclude)).fetchall()
        return [(r["silo"], int(r["n"])) for r in rows]

    # -- metrics ------------------------------------------------------------------------
    def retire(self, silo: str, *, from_round: int, reason: str, now_ms: int) -> None:
        """Records that a silo stopped training (first record wins)."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO retired (silo, from_round, reason, at_ms) VALUES (?, ?, ?, ?)",
                             (silo, from_round, reason, now_ms))

    def retired(self) -> dict[str, tuple[int, str]]:
        """Silos that stopped training: name -> (from round, reason)."""
        with self._lock:
            rows = self._db.execute("SELECT silo, from_round, reason FROM retired").fetchall()
        return {r[0]: (int(r[1]), str(r[2])) for r in rows}

    def put_metrics(self, rnd: int, silo: str, metrics: list[tuple[str, float, int]]) -> None:
        """Stores (replaces) a silo's metrics for a round."""
        with self.transaction() as db:
            for name, value, n in metrics:
                db.execute(
                    """INSERT INTO metrics (round, silo, name, value, num_examples) VALUES (?, ?, ?, ?, ?)
                       ON CONFLICT(round, silo, name) DO UPDATE SET value = excluded.value,
                           num_examples = excluded.num_examples""",
                    (rnd, silo, name, value, n),
                )

    def metrics(self, rnd: int) -> dict[str, list[tuple[str, float, int]]]:
        """Silo -> [(name, value, num_examples)] for a round."""
        with self._lock:
            rows = self._db.execute(
                "SELECT silo, name, value, num_examples FROM metrics WHERE round = ? ORDER BY silo, name", (rnd,)
            ).fetchall()
        out: dict[str, list[tuple[str, float, int]]] = {}
        for r in rows:
            out.setdefault(r["silo"], []).append((r["name"], r["value"], r["num_examples"]))
        return out
