"""SQLite plumbing of the ledger and its mirror: their schemas, WAL connections and transactions."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from fedsilo.privacy.ledger.entries import LedgerError


_BUSY_TIMEOUT_S = 30.0
_SCHEMA_VERSION = "1"


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
    neighbouring TEXT NOT NULL,
    entry_json TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (silo, seq)
);
CREATE INDEX IF NOT EXISTS mirrored_by_relation ON mirrored (silo, neighbouring, seq);
CREATE TRIGGER IF NOT EXISTS mirrored_append_only_delete BEFORE DELETE ON mirrored
BEGIN SELECT RAISE(ABORT, 'the ledger mirror is append-only'); END;
CREATE TRIGGER IF NOT EXISTS mirrored_append_only_update BEFORE UPDATE ON mirrored
BEGIN SELECT RAISE(ABORT, 'the ledger mirror is append-only'); END;
"""


def open_database(path: Path, schema: str, meta: Mapping[str, str],
                  check: Callable[[dict[str, str]], None]) -> sqlite3.Connection:
    """Opens (creating if new) a ledger database: its folder (0700), the schema, and its ``meta``
    rows on first use; an existing file's stored meta must pass ``check`` (which raises
    LedgerError naming what the file is instead). The connection is closed on any error."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    conn = _connect(path)
    try:
        with _transaction(conn):
            for statement in _statements(schema):
                conn.execute(statement)
            stored = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if not stored:
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", list(meta.items()))
            else:
                check(stored)
    except BaseException:
        conn.close()
        raise
    return conn
