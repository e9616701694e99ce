"""SQLite plumbing of the ledger and its mirror: their schemas, WAL connections and transactions."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from fedsilo.privacy.ledger.entries import LedgerEntry, LedgerError


_BUSY_TIMEOUT_S = 30.0
_LEDGER_SCHEMA_VERSION = "1"
#: Version 2 added the mirror's ``run_id``, ``round`` and ``upload_index`` columns and their index;
#: `migrate_mirror` brings a version-1 file up to it.
_MIRROR_SCHEMA_VERSION = "2"


def _statements(script: str) -> list[str]:
    """Splits a schema script into statements (trigger bodies keep their ``;``)."""
    statements: list[str] = []
    buffer = ""
    for line in script.strip().splitlines():
        buffer += line + "\n"
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        raise AssertionError(f"incomplete schema statement: {buffer!r}")
    return statements


def _connect(path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(
            str(path), timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot open {str(path)!r}: {exc}") from None
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise LedgerError(
                f"SQLite cannot use write-ahead logging for {str(path)!r} (journal mode "
                f"{mode!r}); put the state directory on a local disk"
            )
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise LedgerError(f"{str(path)!r} is not a usable SQLite database: {exc}") from None
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


_LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    upload_index INTEGER NOT NULL,
    neighbouring TEXT NOT NULL,
    entry_json TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'released', 'abandoned'))
);
CREATE INDEX IF NOT EXISTS entries_by_release
    ON entries (run_id, round, upload_index, neighbouring);
CREATE INDEX IF NOT EXISTS entries_by_relation ON entries (neighbouring, seq);
CREATE TRIGGER IF NOT EXISTS entries_append_only_delete BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_append_only_update
BEFORE UPDATE OF seq, run_id, round, upload_index, neighbouring, entry_json ON entries
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_status_once BEFORE UPDATE OF status ON entries
WHEN OLD.status != 'pending' OR NEW.status NOT IN ('released', 'abandoned')
BEGIN SELECT RAISE(ABORT, 'only a pending ledger entry may be committed or abandoned'); END;
"""


_MIRROR_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS mirrored (
    silo TEXT NOT NULL,
    seq INTEGER NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    upload_index INTEGER NOT NULL,
    neighbouring TEXT NOT NULL,
    entry_json TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (silo, seq)
);
CREATE INDEX IF NOT EXISTS mirrored_by_relation ON mirrored (silo, neighbouring, seq);
CREATE INDEX IF NOT EXISTS mirrored_by_position ON mirrored (silo, run_id, round, upload_index, seq);
CREATE TRIGGER IF NOT EXISTS mirrored_append_only_delete BEFORE DELETE ON mirrored
BEGIN SELECT RAISE(ABORT, 'the ledger mirror is append-only'); END;
CREATE TRIGGER IF NOT EXISTS mirrored_append_only_update BEFORE UPDATE ON mirrored
BEGIN SELECT RAISE(ABORT, 'the ledger mirror is append-only'); END;
"""


def migrate_mirror(conn: sqlite3.Connection, stored: Mapping[str, str]) -> None:
    """Brings a ledger mirror of schema 1 up to `_MIRROR_SCHEMA_VERSION` (a no-op for a current one).

    Runs inside `open_database`'s transaction, so a failure leaves the file as it was: the old
    table is renamed aside (its append-only triggers and index dropped first), the current schema
    creates the new one, every row is copied with ``run_id``, ``round`` and ``upload_index`` read
    from its entry, and the old table is dropped.

    Raises:
        LedgerError: The file has a schema this fedsilo does not know (a newer one's), or a stored
            entry does not parse (the file was changed outside fedsilo).
    """
    version = stored.get("schema")
    if version == _MIRROR_SCHEMA_VERSION:
        return
    if version != "1":
        raise LedgerError(f"the ledger mirror has schema {version!r}; this fedsilo reads {_MIRROR_SCHEMA_VERSION!r} "
                          "and upgrades '1' (open it with the fedsilo that wrote it)")
    for statement in ("DROP TRIGGER IF EXISTS mirrored_append_only_delete",
                      "DROP TRIGGER IF EXISTS mirrored_append_only_update", "DROP INDEX IF EXISTS mirrored_by_relation",
                      "ALTER TABLE mirrored RENAME TO mirrored_v1"):
        conn.execute(statement)
    for statement in _statements(_MIRROR_SCHEMA):
        conn.execute(statement)
    rows = conn.execute(
        "SELECT silo, seq, neighbouring, entry_json, received_at FROM mirrored_v1 ORDER BY silo, seq"
    ).fetchall()
    for silo, seq, neighbouring, text, received_at in rows:
        try:
            entry = LedgerEntry.from_json(text)
        except LedgerError as exc:
            raise LedgerError(f"cannot upgrade the ledger mirror: its entry seq {seq} of silo {silo!r} is "
                              f"damaged ({exc}); restore the file from a backup", seq=seq) from None
        conn.execute(
            "INSERT INTO mirrored (silo, seq, run_id, round, upload_index, neighbouring, entry_json, received_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (silo, seq, entry.run_id, entry.round, entry.upload_index, neighbouring, text, received_at),
        )
    conn.execute("DROP TABLE mirrored_v1")
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (_MIRROR_SCHEMA_VERSION,))


def open_database(path: Path, schema: str, meta: Mapping[str, str],
                  check: Callable[[dict[str, str]], None],
                  migrate: Callable[[sqlite3.Connection, dict[str, str]], None] | None = None) -> sqlite3.Connection:
    """Opens (creating if new) a ledger database: its folder (0700), the schema, and its ``meta``
    rows on first use; an existing file's stored meta must pass ``check`` (which raises
    LedgerError naming what the file is instead), then ``migrate`` brings it up to ``schema``, all
    in one transaction. The connection is closed on any error."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    conn = _connect(path)
    try:
        with _transaction(conn):
            has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
            stored = dict(conn.execute("SELECT key, value FROM meta").fetchall()) if has_meta else {}
            if stored:
                check(stored)
                if migrate is not None:
                    migrate(conn, stored)
            for statement in _statements(schema):
                conn.execute(statement)
            if not stored:
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", list(meta.items()))
    except BaseException:
        conn.close()
        raise
    return conn
